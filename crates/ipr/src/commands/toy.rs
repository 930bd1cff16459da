use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum Command {
    /// Write the toy world's tokenizer (tokenizer.json, vocab.json, tokenizer_config.json).
    Tokenizer {
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Tokenizer { out } => {
            ipr_toy::WordTokenizer::toy().save(&out)?;
            eprintln!("wrote the toy tokenizer to {}", out.display());
            Ok(())
        }
    }
}
