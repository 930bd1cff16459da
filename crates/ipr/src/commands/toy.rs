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
    /// Write a freshly initialised (untrained) toy model, seeded: the starting point of
    /// pretraining, and a small real model for tests.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Tokenizer { out } => {
            ipr_toy::WordTokenizer::toy().save(&out)?;
            eprintln!("wrote the toy tokenizer to {}", out.display());
            Ok(())
        }
        Command::Init { out, seed } => {
            ipr::toy_model::init_toy_model(&out, seed)?;
            eprintln!("wrote an untrained toy model (seed {seed}) to {}", out.display());
            Ok(())
        }
    }
}
