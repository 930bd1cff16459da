//! `ipr merge`: the detections of a folder from its shards' parts, checked complete and disjoint,
//! written as one process detecting the whole folder would write them (byte for byte).

use anyhow::Result;
use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// The folder the shards detected (an imagefolder, or VISOR's <unique_id>_<k>.png layout).
    #[arg(long)]
    samples: PathBuf,
    /// The detections file to write; the parts are in <detections>.shards/ (`ipr detect
    /// --samples ... --out <detections> --shard I/N`, or `ipr eval visor --images ...
    /// --detections-out <detections> --shard I/N`).
    #[arg(long)]
    detections: PathBuf,
    /// Prompt table of VISOR's layout (default: SR2D), as the shards were given.
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let table = ipr::detection::prompt_table(a.prompts.as_ref())?;
    let rows = ipr_detect::folder::read_samples(&a.samples, &table)?;
    let merged = ipr::detection::merge_detection_parts(&rows, &a.detections)?;
    ipr_core::fs::write_jsonl(&a.detections, &merged)?;
    if !a.quiet {
        eprintln!(
            "merged the detections of {} images from {} into {}",
            merged.len(),
            ipr::shard::parts_dir(&a.detections).display(),
            a.detections.display()
        );
    }
    Ok(())
}
