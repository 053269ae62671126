//! The one error type a sub-command returns to `main`: a message for stderr and an exit code.

use std::fmt;

/// A failure that ends the process: `main` prints `message` to stderr and exits with
/// `code`. etcd exits 1 for every startup error, so [`ExitError::new`] uses 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitError {
    /// What went wrong, without a trailing newline: one line, or for command-line errors two
    /// (cobra's `Error: ...` and a `Run '... --help' for usage.` hint).
    pub message: String,
    /// The process exit code.
    pub code: i32,
}

impl ExitError {
    /// An error with exit code 1.
    pub fn new(message: impl Into<String>) -> Self {
        ExitError {
            message: message.into(),
            code: 1,
        }
    }

    /// An error with the given exit code.
    pub fn with_code(message: impl Into<String>, code: i32) -> Self {
        ExitError {
            message: message.into(),
            code,
        }
    }
}

impl fmt::Display for ExitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitError {}
