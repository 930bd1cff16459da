//! One error type for everything that reads or writes files: it always names the place
//! (file, line, key or field) and says what was expected.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}{}", path.display(), if is_disk_full(source) { DISK_FULL } else { "" })]
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

/// What a full disk means for the user (appended to errors whose cause is one).
pub const DISK_FULL: &str =
    " (the disk is full: nothing was left half-written; free space, then run the command again, with --resume for ipr run)";

/// Whether `e` is "no space left on device" (or a full quota).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    // ENOSPC 28, EDQUOT 122 on Linux.
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28) | Some(122))
}

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
