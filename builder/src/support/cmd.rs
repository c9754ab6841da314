//! The one way this crate runs external programs (mmdebstrap, qemu-img, mkfs, sfdisk,
//! dpkg, cargo, ...): logged, stdin closed, killed if we die, stderr's tail in the error.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

/// How many trailing lines of a failed command's output go into the error.
const TAIL_LINES: usize = 25;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CmdError {
    #[error(
        "`{program}` was not found: install it (`devos-build doctor` says which package has it)"
    )]
    NotFound { program: String },
    #[error("could not start `{line}`: {source}")]
    Spawn {
        line: String,
        source: std::io::Error,
    },
    #[error("`{line}` failed ({status}){tail}")]
    Failed {
        line: String,
        status: String,
        tail: String,
    },
}

/// A command line as a user would type it, for logs and errors.
fn display(cmd: &Command) -> String {
    let mut line = quote(cmd.get_program());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

/// `s` as a shell word: as it is when that is safe, else in single quotes.
pub(crate) fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Run to completion, capturing stdout and stderr. Fails on a non-zero exit.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, CmdError> {
    run_with_input(cmd, None)
}

/// Like [`run`], feeding `input` to the program's stdin (e.g. an sfdisk script).
pub(crate) fn run_with_input(cmd: &mut Command, input: Option<&[u8]>) -> Result<Output, CmdError> {
    let output = output_with_input(cmd, input)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failure(cmd, &output))
    }
}

/// The error for `cmd` having exited with `output`'s failing status, for a caller that
/// reads the output itself before failing (see [`output_with_input`]).
pub(crate) fn failure(cmd: &Command, output: &Output) -> CmdError {
    CmdError::Failed {
        line: display(cmd),
        status: output.status.to_string(),
        tail: tail(output),
    }
}

/// Like [`run_with_input`], whatever the exit status: for programs whose answer is in
/// their output either way (`gpg --status-fd`).
pub(crate) fn output_with_input(
    cmd: &mut Command,
    input: Option<&[u8]>,
) -> Result<Output, CmdError> {
    use std::io::Write;
    let line = display(cmd);
    tracing::info!(target: "devos_build::support::cmd", "$ {line}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    die_with_parent(cmd);
    let mut child = cmd
        .spawn()
        .map_err(|source| spawn_error(cmd, line.clone(), source))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        // A program that exits without reading its input fails below with its own message.
        let _ = stdin.write_all(data);
    }
    let output = child.wait_with_output().map_err(|source| CmdError::Spawn {
        line: line.clone(),
        source,
    })?;
    for l in String::from_utf8_lossy(&output.stderr).lines() {
        tracing::debug!(target: "devos_build::support::cmd", "  {l}");
    }
    Ok(output)
}

/// Run and return stdout as text.
pub(crate) fn stdout(cmd: &mut Command) -> Result<String, CmdError> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

/// Start a long-running child (QEMU) with the same logging and parent-death handling.
/// The caller chooses where its output goes; stdin is closed unless `interactive`.
pub(crate) fn spawn(cmd: &mut Command, interactive: bool) -> Result<std::process::Child, CmdError> {
    let line = display(cmd);
    tracing::info!(target: "devos_build::support::cmd", "$ {line}");
    if !interactive {
        cmd.stdin(Stdio::null());
    }
    die_with_parent(cmd);
    cmd.spawn().map_err(|source| spawn_error(cmd, line, source))
}

fn spawn_error(cmd: &Command, line: String, source: std::io::Error) -> CmdError {
    if source.kind() == std::io::ErrorKind::NotFound {
        CmdError::NotFound {
            program: cmd.get_program().to_string_lossy().into_owned(),
        }
    } else {
        CmdError::Spawn { line, source }
    }
}

fn tail(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = String::new();
    if !lines.is_empty() {
        out.push_str("; its last output:");
    }
    for l in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
        out.push_str("\n    ");
        out.push_str(l);
    }
    out
}

/// Ask the kernel to SIGKILL the child when this process dies, so a killed build
/// never leaves mmdebstrap or QEMU running.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe, and touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Hand the open file `fd` (made close-on-exec, as every file this process opens) to
/// `cmd`'s child alone: the child clears close-on-exec on it, so no other child
/// inherits it, whatever else this process starts meanwhile.
pub(crate) fn pass_fd(cmd: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls fcntl(2), which is
    // async-signal-safe, on a descriptor number it copied; it touches no other memory.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The full path of a program on PATH.
pub(crate) fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("mmdebstrap");
        cmd.args(["--include=a,b", "Acquire::Languages \"none\"", "it's"]);
        assert_eq!(
            display(&cmd),
            r#"mmdebstrap --include=a,b 'Acquire::Languages "none"' 'it'\''s'"#
        );
    }

    #[test]
    fn failure_carries_the_tail_of_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("one") && err.contains("two"), "{err}");
    }

    #[test]
    fn missing_program_says_so() {
        let err = run(&mut Command::new("devos-no-such-tool")).unwrap_err();
        assert!(matches!(err, CmdError::NotFound { .. }), "{err}");
    }
}
