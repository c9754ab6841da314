//! Progress and logs on stderr: a spinner with the stage name on a terminal, plain
//! lines otherwise (CI logs), nothing fancy when NO_COLOR is set.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Ui {
    fancy: bool,
    bar: Option<ProgressBar>,
}

impl Ui {
    pub(crate) fn new() -> Self {
        let fancy = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self { fancy, bar: None }
    }

    /// Whether command lines and other info logs should be shown (not on a spinner).
    pub(crate) fn is_fancy(&self) -> bool {
        self.fancy
    }

    pub(crate) fn stage(&mut self, index: usize, total: usize, name: &str) -> Instant {
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

    pub(crate) fn stage_done(&mut self, name: &str, took: Duration) {
        let line = format!("    {name} done in {:.1}s", took.as_secs_f64());
        match self.bar.take() {
            Some(bar) => bar.finish_with_message(format!("{name} ({:.1}s)", took.as_secs_f64())),
            None => eprintln!("{line}"),
        }
    }

    pub(crate) fn info(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }
}

/// A byte-count progress bar with bytes/s on a terminal; in logs, a line at every
/// quarter. Shared between worker threads.
pub(crate) struct Transfer {
    what: String,
    bar: Option<ProgressBar>,
    done: std::sync::atomic::AtomicU64,
    started: Instant,
}

impl Ui {
    pub(crate) fn transfer(&self, what: &str) -> Transfer {
        let bar = self.fancy.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(what.to_owned());
            bar
        });
        Transfer {
            what: what.to_owned(),
            bar,
            done: 0.into(),
            started: Instant::now(),
        }
    }
}

impl Transfer {
    pub(crate) fn advance(&self, bytes: u64, total: u64) {
        use std::sync::atomic::Ordering;
        let before = self.done.fetch_add(bytes, Ordering::Relaxed);
        let now = before + bytes;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(now);
            return;
        }
        let quarter = |n: u64| (n * 4).checked_div(total).unwrap_or(4);
        if bytes == 0 || quarter(before) != quarter(now) {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "    {}: {} of {} MiB ({:.1} MiB/s)",
                self.what,
                now >> 20,
                total >> 20,
                now as f64 / 1048576.0 / secs
            );
        }
    }

    pub(crate) fn log(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("    {msg}")),
            None => eprintln!("    {msg}"),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
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
