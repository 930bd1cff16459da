use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use ipr_core::relabel::{RelabelPolicy, Weights};
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// detections.jsonl (one record per image).
    #[arg(long)]
    detections: PathBuf,
    /// paper: the public IPR code's rules exactly; measured: the observed relation, grammatical captions.
    #[arg(long, default_value = "measured")]
    policy: RelabelPolicy,
    /// Output imagefolder (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Folder holding the images named in the detections (default: "samples" beside the detections file).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Write metadata.jsonl only, without linking the images.
    #[arg(long, conflicts_with = "images")]
    manifest_only: bool,
    /// Vocabulary: "coco80" or a JSON array of class names.
    #[arg(long, default_value = "coco80")]
    vocab: String,
    /// Round number recorded in every row.
    #[arg(long, default_value_t = 0)]
    round: u32,
    #[arg(long, default_value_t = Weights::default().correct)]
    weight_correct: f64,
    #[arg(long, default_value_t = Weights::default().relabeled_location)]
    weight_location: f64,
    #[arg(long, default_value_t = Weights::default().relabeled_count)]
    weight_count: f64,
}

pub fn run(a: Args) -> Result<()> {
    let vocab = super::load_vocab(&a.vocab)?;
    let weights =
        Weights { correct: a.weight_correct, relabeled_location: a.weight_location, relabeled_count: a.weight_count };
    let rows = ipr_core::dataset::read_detections(&a.detections)?;
    let (labelled, summary) = ipr_core::stages::relabel_detections(&rows, &vocab, a.policy, &weights, a.round)
        .map_err(|m| anyhow::anyhow!("{}: {m}", a.detections.display()))?;
    let images = if a.manifest_only {
        None
    } else {
        let dir = a.images.clone().unwrap_or_else(|| a.detections.with_file_name("samples"));
        if !dir.is_dir() {
            bail!("image folder {} does not exist: pass --images DIR, or --manifest-only", dir.display());
        }
        Some(dir)
    };
    ipr_core::stages::write_labelled_folder(&a.out, &labelled, images.as_deref())?;
    eprintln!(
        "{} images: {} correct, {} location errors, {} count errors, {} dropped; wrote {} rows to {}",
        summary.images,
        summary.correct,
        summary.location_errors,
        summary.count_errors,
        summary.dropped,
        labelled.len(),
        a.out.display()
    );
    Ok(())
}
