use anyhow::Result;
use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// Run configuration (run.toml). Without it: the toy demo.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The loop lands with the diffusion engine, training and the toy world (see the issues);
/// until then this says what it will do rather than pretending to do it.
pub fn run(a: Args) -> Result<()> {
    if let Some(c) = a.config {
        anyhow::bail!("{}: `ipr run --config` is not available yet: the IPR loop has not landed", c.display());
    }
    println!(
        "ipr run (toy demo) will: evaluate the shipped toy base model on seen and held-out SR2D-style prompts,\n\
         then for each IPR round sample K images per training prompt, detect the objects with the exact toy\n\
         detector, judge and relabel the pairs (policy `measured`), train a LoRA on all labelled rounds with\n\
         the feedback weights, and evaluate with VISOR; it writes runs/<name>/ with metrics.json and report.html.\n\
         Not yet available: the diffusion engine, training and the toy base model are still being built.\n\
         What works today: `ipr prompts sr2d`, `ipr eval visor`, `ipr relabel` (see README.md)."
    );
    Ok(())
}
