//! Progress and logs on stderr: a spinner with the stage name on a terminal, plain
//! lines otherwise (CI logs), nothing fancy when NO_COLOR is set.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Ui {
    fancy: bool,
    bar: Option<ProgressBar>,
}

impl Ui {
    pub fn new() -> Self {
        let fancy = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self { fancy, bar: None }
    }

    /// Whether command lines and other info logs should be shown (not on a spinner).
    pub fn is_fancy(&self) -> bool {
        self.fancy
    }

    pub fn stage(&mut self, index: usize, total: usize, name: &str) -> Instant {
        if self.fancy {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{prefix}] {msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(format!("{index}/{total}"));
            bar.set_message(name.to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bar = Some(bar);
        } else {
            eprintln!("==> [{index}/{total}] {name}");
        }
        Instant::now()
    }

    pub fn stage_done(&mut self, name: &str, took: Duration) {
        let line = format!("    {name} done in {:.1}s", took.as_secs_f64());
        match self.bar.take() {
            Some(bar) => bar.finish_with_message(format!("{name} ({:.1}s)", took.as_secs_f64())),
            None => eprintln!("{line}"),
        }
    }

    pub fn info(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }
}

impl Default for Ui {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}
