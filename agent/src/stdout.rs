//! Data on stdout, for `devos` and `devos-build`. A reader that closes the pipe early
//! (`| head -1`) has read all it wants, so the command ends quietly instead of
//! panicking the way `print!` does.
//!
//! The closed pipe is recognised here, where stdout is written, rather than by
//! restoring the default SIGPIPE: that signal would also kill the builder when a
//! program it feeds on stdin (sfdisk) exits early, before its error can be reported.

use std::io::{ErrorKind, Write};

use anyhow::Result;

/// The reader of stdout closed it; `main` exits quietly on this error.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// Whether `e` (anywhere in its chain) is a closed stdout.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.is::<StdoutClosed>())
}

/// Write `data` to stdout and flush it.
pub fn print(data: impl AsRef<[u8]>) -> Result<()> {
    write_all(&mut std::io::stdout().lock(), data.as_ref())
}

fn write_all(out: &mut impl Write, data: &[u8]) -> Result<()> {
    match out.write_all(data).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// `print!` that returns [`StdoutClosed`] from the enclosing function (which returns
/// an `anyhow::Result`) when the reader closed stdout.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::print(format!($($arg)*))?
    };
}

/// `println!` that returns [`StdoutClosed`] from the enclosing function when the
/// reader closed stdout.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::print("\n")?
    };
    ($($arg:tt)*) => {
        $crate::stdout::print(format!("{}\n", format_args!($($arg)*)))?
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails every write with `kind`.
    struct Failing(ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_reader_is_recognised_and_other_write_errors_are_not() {
        let closed = write_all(&mut Failing(ErrorKind::BrokenPipe), b"x").unwrap_err();
        assert!(is_closed(&closed));
        let full = write_all(&mut Failing(ErrorKind::StorageFull), b"x").unwrap_err();
        assert!(!is_closed(&full));
        assert!(
            format!("{full:#}").contains("cannot write to stdout"),
            "{full:#}"
        );
        let mut written = Vec::new();
        write_all(&mut written, b"data").unwrap();
        assert_eq!(written, b"data");
    }
}
