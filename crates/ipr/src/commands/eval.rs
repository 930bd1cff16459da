use anyhow::{bail, Result};
use clap::{Args as ClapArgs, Subcommand};
use ipr_core::metrics::{visor_metrics, visor_metrics_by_relation, VisorMetrics};
use ipr_core::sr2d::{read_rows, sr2d_rows};
use ipr_core::visor_format::{read_results, score_results, write_results};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum Command {
    /// VISOR metrics (OA, VISOR_uncond, VISOR_cond, VISOR_1..4) from a VISOR results file or
    /// from an ipr detections.jsonl.
    Visor(VisorArgs),
}

#[derive(ClapArgs)]
pub struct VisorArgs {
    /// VISOR-format results JSON: {"<unique_id>_<k>": {"classes", "centroid", "recall", "sra", "text"}}.
    #[arg(long, conflicts_with = "detections", required_unless_present = "detections")]
    results: Option<PathBuf>,
    /// ipr detections.jsonl (one record per image).
    #[arg(long)]
    detections: Option<PathBuf>,
    /// Prompt table for --results (default: SR2D generated in memory, as VISOR's file).
    #[arg(long, requires = "results")]
    prompts: Option<PathBuf>,
    /// Vocabulary for --detections: "coco80" or a JSON array of class names.
    #[arg(long, default_value = "coco80")]
    vocab: String,
    /// With --detections: also write VISOR's results format here.
    #[arg(long, requires = "detections")]
    write_results: Option<PathBuf>,
    /// Print one JSON object with OA, VISOR_uncond, VISOR_cond, VISOR_1..VISOR_4.
    #[arg(long)]
    json: bool,
    /// Add metrics per relation (left, right, above, below).
    #[arg(long)]
    by_relation: bool,
}

pub fn run(cmd: Command) -> Result<()> {
    let Command::Visor(a) = cmd;
    let scores = if let Some(path) = &a.results {
        let rows = match &a.prompts {
            Some(p) => read_rows(p)?,
            None => sr2d_rows(&ipr_core::Vocabulary::coco80()),
        };
        let entries = read_results(path)?;
        score_results(&entries, &rows).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?
    } else if let Some(path) = &a.detections {
        let vocab = super::load_vocab(&a.vocab)?;
        let rows = ipr_core::dataset::read_detections(path)?;
        let (scores, entries) = ipr_core::stages::score_detections(&rows, &vocab)
            .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
        if let Some(out) = &a.write_results {
            write_results(out, &entries)?;
        }
        scores
    } else {
        bail!("give --results FILE or --detections FILE");
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
