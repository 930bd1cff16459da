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
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Sr2d { out, vocab } => {
            let rows = sr2d_rows(&super::load_vocab(&vocab)?);
            ipr_core::fs::write_atomic(&out, to_visor_json(&rows).as_bytes())?;
            eprintln!("wrote {} prompts to {}", rows.len(), out.display());
            Ok(())
        }
    }
}
