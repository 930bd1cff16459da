//! Errors of the neural evaluators (OWL-ViT, CLIP score). Every error that comes from a file names
//! the file and, where it can, the key or tensor inside it (ripgrep's rule: say where and why).

use std::path::{Path, PathBuf};

/// Result alias of the model code.
pub type Result<T> = std::result::Result<T, ModelError>;

/// What can go wrong while loading or running OWL-ViT or CLIP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file is missing or could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A JSON file did not parse (serde names the key, line and column).
    #[error("{path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    /// A configuration key is missing, unsupported, or disagrees with the model.
    #[error("{path}: key `{key}`: {message}")]
    Config { path: PathBuf, key: String, message: String },
    /// A weights file lacks a tensor or holds one of the wrong shape (candle names the tensor).
    #[error("{path}: {source}")]
    Weights { path: PathBuf, source: candle_core::Error },
    /// An image could not be opened or decoded.
    #[error("{path}: cannot read image: {message}")]
    Image { path: PathBuf, message: String },
    /// Wrong inputs (empty query list, shapes).
    #[error("{0}")]
    Input(String),
    /// The CLIP tokenizer or text tower of ipr-diffusion failed.
    #[error(transparent)]
    Diffusion(#[from] ipr_diffusion::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A manifest (`metadata.jsonl`, `detections.jsonl`) could not be read or written.
    #[error(transparent)]
    Dataset(#[from] ipr_core::Error),
    /// A detector behind the `Detector` trait failed.
    #[error(transparent)]
    Detect(#[from] crate::detector::DetectError),
}

impl ModelError {
    pub(crate) fn config(path: &Path, key: &str, message: impl Into<String>) -> Self {
        ModelError::Config { path: path.to_path_buf(), key: key.to_string(), message: message.into() }
    }

    pub(crate) fn missing(path: &Path, what: &str) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("missing {what}")),
        }
    }
}

/// Reads and parses a JSON file, naming it in every error.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let v = serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
    ipr_diffusion::config::check_sizes(path, &v)?;
    Ok(v)
}
