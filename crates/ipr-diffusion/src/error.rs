//! Errors of the diffusion engine. Every error that comes from a file names the file, and where it
//! can, the key or tensor inside it.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A JSON file did not parse (serde names the key, line and column).
    #[error("{path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    /// A configuration key holds a value this crate does not support, or values that disagree.
    #[error("{path}: key `{key}`: {message}")]
    Config { path: PathBuf, key: String, message: String },
    /// A weights file is missing a tensor or holds one of the wrong shape.
    #[error("{path}: {source}")]
    Weights { path: PathBuf, source: candle_core::Error },
    /// An image file that cannot be used (corrupt, truncated, too large).
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
    /// A tokenizer could not be built from its files.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A model could not be downloaded from the Hugging Face Hub (feature `hub`).
    #[error("{repo}: download failed: {message}")]
    Download { repo: String, message: String },
    /// Wrong inputs to a function of this crate (shapes, lengths, step indices).
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn config(path: impl Into<PathBuf>, key: &str, message: impl Into<String>) -> Self {
        Error::Config { path: path.into(), key: key.to_string(), message: message.into() }
    }
}
