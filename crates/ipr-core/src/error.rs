//! One error type for everything that reads or writes files: it always names the place
//! (file, line, key or field) and says what was expected.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A problem at a line of a line-oriented file (JSON Lines).
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: usize, msg: String },
    /// A problem in a whole-file format, at a key or path inside it.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// Invalid input that does not come from a file (arguments, configs in memory).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    pub fn line(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        Error::Line { path: path.to_path_buf(), line, msg: msg.into() }
    }

    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        Error::File { path: path.to_path_buf(), msg: msg.into() }
    }
}
