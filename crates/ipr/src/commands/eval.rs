use anyhow::{bail, Result};
use clap::{Args as ClapArgs, Subcommand};
use ipr_core::metrics::{visor_metrics, visor_metrics_by_relation, VisorMetrics};
use ipr_core::visor_format::{read_results, score_results, write_results};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum Command {
    /// VISOR metrics (OA, VISOR_uncond, VISOR_cond, VISOR_1..4) from a VISOR results file, an
    /// ipr detections.jsonl, or a folder of images (VISOR's protocol end to end with OWL-ViT).
    Visor(VisorArgs),
    /// CLIP score (torchmetrics' definition) of images against their own prompts.
    Clip(ClipArgs),
    /// A Markdown table comparing runs (their metrics.json): the base model and each run's last
    /// round, per split. Give runs made with the same config but the method. Studies (`ipr run
    /// --seeds`) are compared with every metric's 95% interval, and the first study's held-out,
    /// validation and seen VISOR_uncond against each other's with a paired interval.
    Compare {
        /// Run folders (or their metrics.json), labelled by method and folder; or study folders.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// With studies: also write the comparison as a page with the intervals plotted.
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

#[derive(ClapArgs)]
pub struct ClipArgs {
    /// An imagefolder (metadata.jsonl with prompts) or VISOR's layout (<id>_<k>.png).
    #[arg(long)]
    images: PathBuf,
    /// CLIP model folder (transformers' CLIPModel; VISOR/IPR use ViT-L/14).
    #[arg(long)]
    model: PathBuf,
    /// Prompt table for VISOR's layout (default: SR2D).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print {"clip_score": x, "images": n}.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    quiet: bool,
}

#[derive(ClapArgs)]
pub struct VisorArgs {
    /// VISOR-format results JSON: {"<unique_id>_<k>": {"classes", "centroid", "recall", "sra", "text"}}.
    #[arg(long, conflicts_with_all = ["detections", "images"], required_unless_present_any = ["detections", "images"])]
    results: Option<PathBuf>,
    /// ipr detections.jsonl (one record per image).
    #[arg(long, conflicts_with = "images")]
    detections: Option<PathBuf>,
    /// A folder of generated images: an imagefolder (metadata.jsonl) or VISOR's layout
    /// (<unique_id>_<k>.png, prompts from --prompts). Detected with OWL-ViT (--model),
    /// queries "a photo of a {object}", threshold 0.1, as VISOR does.
    #[arg(long)]
    images: Option<PathBuf>,
    /// OWL-ViT folder for --images.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Score threshold for --images.
    #[arg(long, default_value_t = ipr_detect::owlvit::detector::VISOR_THRESHOLD)]
    threshold: f64,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With --images: also write the detections here.
    #[arg(long, requires = "images")]
    detections_out: Option<PathBuf>,
    /// With --images: detect shard I of N only, into <detections-out>.shards/I-of-N.jsonl (no
    /// metrics yet); then `ipr merge` and `ipr eval visor --detections`. Without it, Slurm's array
    /// variables, an MPI launcher's rank, or JOB_COMPLETION_INDEX with --shards say it.
    #[arg(long, value_parser = ipr::shard::Shard::parse, requires = "images")]
    shard: Option<ipr::shard::Shard>,
    /// With --images under a Kubernetes Indexed Job: the Job's completions.
    #[arg(long, requires = "images")]
    shards: Option<usize>,
    /// Prompt table for --results and --images (default: SR2D generated in memory, as VISOR's file).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Vocabulary for --detections: "coco80" or a JSON array of class names.
    #[arg(long, default_value = "coco80")]
    vocab: String,
    /// With --detections or --images: also write VISOR's results format here.
    #[arg(long)]
    write_results: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
    /// Print one JSON object with OA, VISOR_uncond, VISOR_cond, VISOR_1..VISOR_4.
    #[arg(long)]
    json: bool,
    /// Add metrics per relation (left, right, above, below).
    #[arg(long)]
    by_relation: bool,
}

pub fn run(cmd: Command) -> Result<()> {
    let a = match cmd {
        Command::Visor(a) => a,
        Command::Clip(a) => return clip(a),
        Command::Compare { runs, report } => return compare(&runs, report.as_deref()),
    };
    let scores = if let Some(path) = &a.results {
        let rows = ipr::detection::prompt_table(a.prompts.as_ref())?;
        let entries = read_results(path)?;
        score_results(&entries, &rows).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?
    } else {
        let vocab = super::load_vocab(&a.vocab)?;
        let (rows, source) = if let Some(path) = &a.detections {
            (ipr_core::dataset::read_detections(path)?, path.clone())
        } else if let Some(dir) = &a.images {
            let Some(model) = &a.model else { bail!("--images needs --model OWLVIT_FOLDER") };
            let device = ipr_diffusion::sample::device_from_name(&a.device)?;
            let shard = ipr::shard::Shard::resolve(a.shard, a.shards, &|k| std::env::var(k).ok())?;
            let mut det = ipr_detect::OwlVitDetector::load(&super::resolve_folder(model)?, &device)?;
            det.threshold = a.threshold;
            if shard.count > 1 {
                let Some(out) = &a.detections_out else {
                    bail!(
                        "shard {}: give --detections-out FILE (the shards' parts go beside it, for ipr merge)",
                        shard.describe()
                    )
                };
                return super::detect::detect_shard(&det, dir, a.prompts.as_ref(), &vocab, shard, out, a.quiet);
            }
            let rows = ipr::detection::detect_folder(&det, dir, a.prompts.as_ref(), &vocab, a.quiet)?;
            if let Some(out) = &a.detections_out {
                ipr_core::fs::write_jsonl(out, &rows)?;
            }
            (rows, dir.clone())
        } else {
            bail!("give --results FILE, --detections FILE or --images DIR");
        };
        let ipr_core::stages::Scored { scores, entries, .. } = ipr_core::stages::score_detections(&rows, &vocab)
            .map_err(|m| anyhow::anyhow!("{}: {m}", source.display()))?;
        if let Some(out) = &a.write_results {
            write_results(out, &entries)?;
        }
        scores
    };
    let m = visor_metrics(&scores).map_err(anyhow::Error::msg)?;
    let by = visor_metrics_by_relation(&scores);
    if a.json {
        let mut obj = m.headline();
        if a.by_relation {
            let rel: serde_json::Map<_, _> = by.iter().map(|(k, m)| (k.to_string(), m.headline())).collect();
            obj["by_relation"] = rel.into();
        }
        println!("{obj}");
    } else {
        print_table(&m, a.by_relation.then_some(&by));
    }
    Ok(())
}

fn compare(runs: &[PathBuf], report: Option<&std::path::Path>) -> Result<()> {
    if runs.iter().all(|r| ipr::study::is_study(r)) {
        return compare_studies(runs, report);
    }
    if report.is_some() {
        bail!("--report needs study folders (ipr run --seeds): these runs have no intervals");
    }
    let mut files = Vec::new();
    for run in runs {
        let path = if run.is_dir() { run.join("metrics.json") } else { run.clone() };
        let folder = if run.is_dir() { run.as_path() } else { run.parent().unwrap_or(run) };
        let folder_name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let metrics = ipr::metrics_file::MetricsFile::read(&path)?;
        // Labelled by the method that made the last round, and the run folder.
        let label = match metrics.rows.iter().max_by_key(|r| r.iteration) {
            Some(r) if r.iteration > 0 => format!("{} ({folder_name})", r.method),
            _ => folder_name,
        };
        files.push((label, metrics));
    }
    print!("{}", ipr::metrics_file::comparison_table(&files));
    Ok(())
}

fn compare_studies(studies: &[PathBuf], report: Option<&std::path::Path>) -> Result<()> {
    let mut summaries = Vec::new();
    for s in studies {
        let label = s.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        summaries.push((label, ipr::study::summarize(s)?));
    }
    print!("{}", ipr::study::comparison_table(&summaries));
    let diffs = ipr::study::paired_differences(studies)?;
    if !diffs.is_empty() {
        println!("\n| {} minus | split | VISOR_uncond difference |\n| --- | --- | ---: |", summaries[0].0);
        for (label, split, d) in &diffs {
            println!("| {label} | {} | {} |", split.name(), ipr::study::cell(d));
        }
    }
    if let Some((_, s)) = summaries.first() {
        println!("\nSeeds {:?}; {}; differences paired over prompts, seeds and evaluation noise.", s.seeds, s.interval);
    }
    if let Some(path) = report {
        let refs: Vec<(String, &ipr::study::Summary)> = summaries.iter().map(|(l, s)| (l.clone(), s)).collect();
        ipr_core::fs::write_atomic(path, ipr::study::interval_report(&refs, &diffs).as_bytes())?;
    }
    Ok(())
}

fn clip(a: ClipArgs) -> Result<()> {
    let device = ipr_diffusion::sample::device_from_name(&a.device)?;
    let scorer = ipr_detect::ClipScorer::load(&super::resolve_folder(&a.model)?, &device)?;
    let table = ipr::detection::prompt_table(a.prompts.as_ref())?;
    let rows = ipr_detect::folder::read_samples(&a.images, &table)?;
    let pb = ipr::progress::bar(rows.len() as u64, "clip", a.quiet);
    let (per_image, score) =
        ipr_detect::folder::clip_score_rows(&scorer, &a.images, &rows, a.batch, &mut |i, _| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::json!({"clip_score": score, "images": per_image.len()}));
    } else {
        println!("CLIP score {score:.4} over {} images", per_image.len());
    }
    Ok(())
}

fn print_table(m: &VisorMetrics, by: Option<&std::collections::BTreeMap<&str, VisorMetrics>>) {
    println!(
        "{:<8} {:>7} {:>13} {:>11} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8}",
        "", "OA", "VISOR_uncond", "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4", "images", "prompts"
    );
    let line = |name: &str, m: &VisorMetrics| {
        println!(
            "{:<8} {:>7.2} {:>13.2} {:>11.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>8}",
            name,
            m.oa,
            m.visor_uncond,
            m.visor_cond,
            m.visor_1,
            m.visor_2,
            m.visor_3,
            m.visor_4,
            m.num_images,
            m.num_prompts
        )
    };
    line("all", m);
    for (k, m) in by.into_iter().flatten() {
        line(k, m);
    }
}
