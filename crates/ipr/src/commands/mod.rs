//! One module per command: argument structs and a thin call into the libraries.

pub mod bench;
pub mod detect;
pub mod eval;
pub mod merge;
pub mod prompts;
pub mod relabel;
pub mod run;
pub mod sample;
pub mod selftest;
pub mod toy;
pub mod train;

use anyhow::{Context, Result};
use ipr_core::Vocabulary;
use std::path::Path;

/// The vocabulary named on the command line: "coco80" (SR2D's), "toy" (the shapes world), or a
/// JSON file holding an array of class names.
pub fn load_vocab(spec: &str) -> Result<Vocabulary> {
    match spec {
        "coco80" => return Ok(Vocabulary::coco80()),
        "toy" => return Ok(ipr_toy::vocabulary()),
        _ => {}
    }
    let path = Path::new(spec);
    let text = std::fs::read_to_string(path).with_context(|| format!("reading vocabulary {}", path.display()))?;
    let names: Vec<String> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON array of class names", path.display()))?;
    Vocabulary::new(names).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// `--dtype` values.
pub(crate) fn parse_dtype(s: &str) -> Result<candle_core::DType, String> {
    ipr::config::parse_dtype(s)
}

/// A model folder, or a Hugging Face repo id (`owner/name`) found in the local cache.
pub(crate) fn resolve_folder(spec: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(ipr_diffusion::source::resolve_model(&spec.to_string_lossy())?)
}
