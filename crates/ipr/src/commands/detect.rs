use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use ipr_detect::{Detector, OwlVitDetector, ToyDetector};
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum DetectorKind {
    /// OWL-ViT / OWLv2 from a transformers folder (VISOR's evaluator).
    Owlvit,
    /// The exact detector of the toy shapes world.
    Toy,
}

#[derive(ClapArgs)]
pub struct Args {
    #[arg(long, value_enum)]
    detector: DetectorKind,
    /// Model folder (OWL-ViT).
    #[arg(long, required_if_eq("detector", "owlvit"))]
    model: Option<PathBuf>,
    /// One image: print its detections.
    #[arg(long, conflicts_with = "samples", required_unless_present = "samples")]
    image: Option<PathBuf>,
    /// Text queries for --image (OWL-ViT: the full text, e.g. "a photo of a dog"; toy: class names).
    #[arg(long, requires = "image")]
    query: Vec<String>,
    /// An imagefolder of samples (metadata.jsonl) or VISOR's layout (<id>_<k>.png): detect every
    /// image with its prompt's objects as queries and write detections.jsonl to --out.
    #[arg(long)]
    samples: Option<PathBuf>,
    #[arg(long, requires = "samples")]
    out: Option<PathBuf>,
    /// Prompt table for VISOR's layout (default: SR2D).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Vocabulary of the prompts: "coco80", "toy" or a JSON array of class names.
    #[arg(long)]
    vocab: Option<String>,
    /// Score threshold (strictly greater is kept), VISOR's 0.1 by default.
    #[arg(long, default_value_t = ipr_detect::owlvit::detector::VISOR_THRESHOLD)]
    threshold: f64,
    /// With --samples: detect shard I of N (batches of 16 images, batch j to shard j % N) into
    /// <out>.shards/I-of-N.jsonl; `ipr merge` then writes --out. Without it, Slurm's
    /// SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, an MPI launcher's rank, or Kubernetes'
    /// JOB_COMPLETION_INDEX with --shards say it.
    #[arg(long, value_parser = ipr::shard::Shard::parse, requires = "samples")]
    shard: Option<ipr::shard::Shard>,
    /// With --samples under a Kubernetes Indexed Job: the Job's completions.
    #[arg(long, requires = "samples")]
    shards: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON (single-image mode always prints JSON).
    #[arg(long)]
    json: bool,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let device = ipr_diffusion::sample::device_from_name(&a.device)?;
    let detector: Box<dyn Detector> = match a.detector {
        DetectorKind::Owlvit => {
            let folder = a.model.as_ref().expect("clap requires --model for owlvit");
            let mut d = OwlVitDetector::load(&super::resolve_folder(folder)?, &device)?;
            d.threshold = a.threshold;
            if let Some(image) = &a.image {
                if a.query.is_empty() {
                    bail!("give at least one --query with --image");
                }
                let img = ipr_detect::preprocess::load_rgb(image)?;
                let queries: Vec<&str> = a.query.iter().map(String::as_str).collect();
                let found = d.detect_queries(&img, &queries, a.threshold)?;
                println!("{}", serde_json::to_string(&found)?);
                return Ok(());
            }
            Box::new(d)
        }
        DetectorKind::Toy => {
            let d = ToyDetector::default();
            if let Some(image) = &a.image {
                let img = ipr_detect::preprocess::load_rgb(image)?;
                let queries: Vec<&str> = a.query.iter().map(String::as_str).collect();
                let found = d.detect(&img, &queries)?;
                // Same shape as OWL-ViT's output: the label is the query's index.
                let out: Vec<serde_json::Value> = found
                    .iter()
                    .map(|f| {
                        let label = queries.iter().position(|q| *q == f.label).unwrap_or(usize::MAX);
                        serde_json::json!({"label": label, "score": f.score, "box": f.bbox})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(out));
                return Ok(());
            }
            Box::new(d)
        }
    };
    let samples = a.samples.as_ref().expect("clap requires --samples without --image");
    let out = a.out.as_ref().context("--out detections.jsonl is required with --samples")?;
    let default_vocab = if matches!(a.detector, DetectorKind::Toy) { "toy" } else { "coco80" };
    let vocab = super::load_vocab(a.vocab.as_deref().unwrap_or(default_vocab))?;
    let shard = ipr::shard::Shard::resolve(a.shard, a.shards, &|k| std::env::var(k).ok())?;
    if shard.count > 1 {
        return detect_shard(detector.as_ref(), samples, a.prompts.as_ref(), &vocab, shard, out, a.quiet);
    }
    let rows = ipr::detection::detect_folder(detector.as_ref(), samples, a.prompts.as_ref(), &vocab, a.quiet)?;
    ipr_core::fs::write_jsonl(out, &rows)?;
    if !a.quiet {
        eprintln!("wrote {} records to {}", rows.len(), out.display());
    }
    Ok(())
}

/// One shard of `ipr detect --samples` (also `ipr eval visor --images` under a shard): its part
/// of `out`, and what to run once every shard is done.
pub fn detect_shard(
    detector: &dyn Detector,
    samples: &std::path::Path,
    prompts: Option<&PathBuf>,
    vocab: &ipr_core::Vocabulary,
    shard: ipr::shard::Shard,
    out: &std::path::Path,
    quiet: bool,
) -> Result<()> {
    let table = ipr::detection::prompt_table(prompts)?;
    let rows = ipr_detect::folder::read_samples(samples, &table)?;
    let (n, part, kept) = ipr::detection::detect_shard(detector, samples, &rows, vocab, shard, out, quiet)?;
    if !quiet {
        let what = if kept { "already there, kept" } else { "written" };
        eprintln!(
            "shard {}: {n} of {} images, {} {what}; once every shard is done: ipr merge --samples {}{} --detections {}",
            shard.describe(),
            rows.len(),
            part.display(),
            samples.display(),
            prompts.map(|p| format!(" --prompts {}", p.display())).unwrap_or_default(),
            out.display()
        );
    }
    Ok(())
}
