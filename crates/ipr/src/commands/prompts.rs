use anyhow::Result;
use clap::Subcommand;
use ipr_core::sr2d::{sr2d_rows, to_visor_json};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum Command {
    /// Write the SR2D prompt set (VISOR's text_spatial_rel_phrases.json, byte for byte with COCO-80).
    Sr2d {
        /// Output JSON file.
        #[arg(long)]
        out: PathBuf,
        /// "coco80" or a JSON file with an array of class names.
        #[arg(long, default_value = "coco80")]
        vocab: String,
        /// Only the spatial prompts (25,280 of SR2D's 31,680): the ones VISOR's metrics score, so
        /// a benchmark samples 20% fewer images. Rows keep their unique_ids.
        #[arg(long)]
        spatial_only: bool,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Sr2d { out, vocab, spatial_only } => {
            let mut rows = sr2d_rows(&super::load_vocab(&vocab)?);
            if spatial_only {
                rows.retain(|r| matches!(r.rel(), Ok(ipr_core::sr2d::RelType::Spatial(_))));
            }
            ipr_core::fs::write_atomic(&out, to_visor_json(&rows).as_bytes())?;
            eprintln!("wrote {} prompts to {}", rows.len(), out.display());
            Ok(())
        }
    }
}
