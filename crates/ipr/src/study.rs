//! A study: one run config under several seeds (`ipr run --seeds 0,1,2`), each seed a run folder
//! `<runs_dir>/<name>/seed-<s>/`, and the summary of them in `<runs_dir>/<name>/`: every metric's
//! mean over the seeds pooled and its 95% interval (`summary.json`, `summary.md`,
//! `report.html`).
//!
//! Intervals are [`ipr_core::stats`]'s cluster bootstrap over prompts, each prompt carrying its
//! images of every seed; the evaluation noise is the same for every seed and method (`eval.seed`),
//! so two studies of the same config are compared image for image ([`paired_differences`]).

use crate::config::RunConfig;
use crate::metrics_file::{base_then_last, comparison_header, EvalSplit, MetricsFile};
use crate::prompt_sets::PromptSets;
use anyhow::{bail, Context, Result};
use ipr_core::metrics::ImageScore;
use ipr_core::stats::{paired_difference, visor_intervals, Interval, METRICS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Bootstrap resamples of every interval, and the seed they are drawn from.
pub const RESAMPLES: usize = 2000;
const RESAMPLE_SEED: u64 = 0x5EED;

/// The folder of seed `seed` in a study.
pub fn seed_dir(study: &Path, seed: u64) -> PathBuf {
    study.join(format!("seed-{seed}"))
}

/// The config of seed `seed` of the study `c` describes: the same settings with `seed`, living in
/// `<runs_dir>/<name>/seed-<seed>/`.
pub fn seed_config(c: &RunConfig, seed: u64) -> RunConfig {
    let mut s = c.clone();
    s.runs_dir = c.runs_dir.join(&c.name);
    s.name = format!("seed-{seed}");
    s.seed = seed;
    s
}

/// The seed runs of a study folder, by seed (folders `seed-<s>` with a `metrics.json`).
pub fn seed_runs(study: &Path) -> Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(study).with_context(|| format!("reading {}", study.display()))? {
        let p = e?.path();
        let seed =
            p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("seed-")).and_then(|s| s.parse().ok());
        if let Some(seed) = seed.filter(|_| p.join("metrics.json").is_file()) {
            out.insert(seed, p);
        }
    }
    Ok(out)
}

/// Whether `dir` is a study folder (it holds finished seed runs).
pub fn is_study(dir: &Path) -> bool {
    seed_runs(dir).is_ok_and(|r| !r.is_empty())
}

/// One (method, iteration, split) of a study: every metric over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SummaryRow {
    pub method: String,
    pub iteration: u32,
    pub split: EvalSplit,
    pub metrics: BTreeMap<String, Interval>,
}

/// `summary.json` of a study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub seeds: Vec<u64>,
    /// How the intervals were made, in words.
    pub interval: String,
    pub rows: Vec<SummaryRow>,
}

/// The images of model `iteration` on `split` in the run folder `run`, as VISOR scores them.
pub fn scores(run: &Path, iteration: u32, split: EvalSplit) -> Result<Vec<ImageScore>> {
    let config = RunConfig::read(&run.join("run.toml")).map_err(anyhow::Error::msg)?;
    let vocab = PromptSets::from_config(&config)?.vocab;
    let path = run.join(format!("round-{iteration}/eval/{}/detections.jsonl", split.name()));
    let rows = ipr_core::dataset::read_detections(&path)?;
    let scored =
        ipr_core::stages::score_detections(&rows, &vocab).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
    Ok(scored.scores)
}

/// The images of every seed of a study for one (iteration, split), in seed order.
fn study_scores(runs: &BTreeMap<u64, PathBuf>, iteration: u32, split: EvalSplit) -> Result<Vec<Vec<ImageScore>>> {
    runs.values().map(|run| scores(run, iteration, split)).collect()
}

/// The summary of a study folder: the (method, iteration, split) rows of its seed runs' metrics,
/// each metric with its interval.
pub fn summarize(study: &Path) -> Result<Summary> {
    let runs = seed_runs(study)?;
    let Some(first) = runs.values().next() else {
        bail!("{}: no finished seed runs (seed-<s>/metrics.json)", study.display());
    };
    let layout = MetricsFile::read(&first.join("metrics.json"))?;
    let mut rows = Vec::new();
    for r in &layout.rows {
        let per_seed = study_scores(&runs, r.iteration, r.split)?;
        let metrics = visor_intervals(&per_seed, RESAMPLES, RESAMPLE_SEED).map_err(anyhow::Error::msg)?;
        rows.push(SummaryRow {
            method: r.method.clone(),
            iteration: r.iteration,
            split: r.split,
            metrics: metrics.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
    }
    Ok(Summary {
        seeds: runs.keys().copied().collect(),
        interval: format!(
            "95% percentile interval of a cluster bootstrap over prompts ({RESAMPLES} resamples), each prompt carrying \
             its images of all {} seeds; the mean pools the seeds",
            runs.len()
        ),
        rows,
    })
}

/// `mean [lo, hi]` with one decimal.
pub fn cell(i: &Interval) -> String {
    format!("{:.1} [{:.1}, {:.1}]", i.mean, i.lo, i.hi)
}

/// A Markdown table of a summary's rows.
pub fn summary_table(s: &Summary) -> String {
    let names: Vec<&str> = METRICS.iter().map(|(n, _)| *n).collect();
    let mut t = format!(
        "| method | round | split | {} |\n| --- | ---: | --- |{}\n",
        names.join(" | "),
        " ---: |".repeat(names.len())
    );
    for r in &s.rows {
        let cells: Vec<String> = names.iter().map(|n| cell(&r.metrics[*n])).collect();
        let _ = writeln!(t, "| {} | {} | {} | {} |", r.method, r.iteration, r.split.name(), cells.join(" | "));
    }
    let _ = writeln!(t, "\nSeeds {:?}; {}.", s.seeds, s.interval);
    t
}

/// Writes `summary.json`, `summary.md` and `report.html` into the study folder; returns the
/// summary.
pub fn write_summary(study: &Path) -> Result<Summary> {
    let s = summarize(study)?;
    ipr_core::fs::write_json(&study.join("summary.json"), &s)?;
    ipr_core::fs::write_atomic(&study.join("summary.md"), summary_table(&s).as_bytes())?;
    let labelled: Vec<(String, &Summary)> = vec![(study_label(study), &s)];
    ipr_core::fs::write_atomic(&study.join("report.html"), interval_report(&labelled, &[]).as_bytes())?;
    Ok(s)
}

fn study_label(study: &Path) -> String {
    study.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The last round of each study against the last round of the first one, on every split:
/// `VISOR_uncond(first) - VISOR_uncond(other)` with its paired interval (same prompts, seeds and
/// evaluation noise). Studies made with other seeds or prompts cannot be paired: an error.
pub fn paired_differences(studies: &[PathBuf]) -> Result<Vec<(String, EvalSplit, Interval)>> {
    let Some((first, others)) = studies.split_first() else { return Ok(Vec::new()) };
    let last = |study: &Path| -> Result<(BTreeMap<u64, PathBuf>, u32, Vec<EvalSplit>)> {
        let runs = seed_runs(study)?;
        let m = MetricsFile::read(&runs.values().next().context("no seed runs")?.join("metrics.json"))?;
        let it = m.rows.iter().map(|r| r.iteration).max().unwrap_or(0);
        let splits = m.rows.iter().filter(|r| r.iteration == it).map(|r| r.split).collect();
        Ok((runs, it, splits))
    };
    let (runs_a, it_a, splits) = last(first)?;
    let mut out = Vec::new();
    for other in others {
        let (runs_b, it_b, _) = last(other)?;
        if runs_a.keys().ne(runs_b.keys()) {
            bail!("{} and {} ran other seeds: no paired comparison", first.display(), other.display());
        }
        for &split in &splits {
            let a = study_scores(&runs_a, it_a, split)?;
            let b = study_scores(&runs_b, it_b, split)?;
            let d = paired_difference(&a, &b, |m| m.visor_uncond, RESAMPLES, RESAMPLE_SEED)
                .map_err(|m| anyhow::anyhow!("{} vs {}: {m}", first.display(), other.display()))?;
            out.push((study_label(other), split, d));
        }
    }
    Ok(out)
}

/// The comparison of studies: the base model (round 0 of the first) and each study's last round,
/// per split, every metric with its interval (Markdown).
pub fn comparison_table(studies: &[(String, Summary)]) -> String {
    let names: Vec<&str> = METRICS.iter().map(|(n, _)| *n).collect();
    let mut t = comparison_header(&names);
    let studies: Vec<(&str, &[SummaryRow])> = studies.iter().map(|(l, s)| (l.as_str(), s.rows.as_slice())).collect();
    for (label, r) in base_then_last(&studies, |r| r.iteration) {
        let cells: Vec<String> = names.iter().map(|n| cell(&r.metrics[*n])).collect();
        let label = label.map_or_else(|| "base".to_string(), |l| format!("{} ({l})", r.method));
        let _ = writeln!(t, "| {label} | {} | {} | {} |", r.iteration, r.split.name(), cells.join(" | "));
    }
    t
}

/// A self-contained page: the comparison table, and per split a plot of each model's
/// VISOR_uncond with its interval; `differences` (from [`paired_differences`]) below.
pub fn interval_report(studies: &[(String, &Summary)], differences: &[(String, EvalSplit, Interval)]) -> String {
    use crate::report::esc;
    let owned: Vec<(String, Summary)> = studies.iter().map(|(l, s)| (l.clone(), (*s).clone())).collect();
    let mut h = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ipr study</title><style>\
         body{font-family:sans-serif;margin:2em;max-width:1200px}pre{background:#f6f6f6;padding:1em;overflow:auto}\
         </style></head><body>\n<h1>VISOR_uncond with 95% intervals</h1>\n",
    );
    for split in EvalSplit::ALL {
        // (label, interval) of the base model and of each study's last round.
        let mut points: Vec<(String, Interval)> = Vec::new();
        if let Some((_, first)) = owned.first() {
            if let Some(r) = first.rows.iter().find(|r| r.iteration == 0 && r.split == split) {
                points.push(("base".into(), r.metrics["VISOR_uncond"]));
            }
        }
        for (label, s) in &owned {
            let last = s.rows.iter().map(|r| r.iteration).max().unwrap_or(0);
            if let Some(r) = s.rows.iter().find(|r| r.iteration == last && last > 0 && r.split == split) {
                points.push((format!("{} ({label})", r.method), r.metrics["VISOR_uncond"]));
            }
        }
        if points.is_empty() {
            continue;
        }
        let _ = writeln!(h, "<h2>{} prompts</h2>", split.name());
        let (w, row, left) = (640.0, 26.0, 220.0);
        let hgt = row * points.len() as f64 + 40.0;
        let x = |v: f64| left + (w - left - 20.0) * v / 100.0;
        let _ = writeln!(h, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" role=\"img\" aria-label=\"VISOR_uncond, {}\">", split.name());
        for v in [0.0, 25.0, 50.0, 75.0, 100.0] {
            let _ = writeln!(h, "<line x1=\"{0}\" x2=\"{0}\" y1=\"10\" y2=\"{1}\" stroke=\"#ddd\"/><text x=\"{0}\" y=\"{2}\" font-size=\"11\" text-anchor=\"middle\">{v}</text>", x(v), hgt - 24.0, hgt - 10.0);
        }
        for (k, (label, i)) in points.iter().enumerate() {
            let y = 20.0 + row * k as f64;
            let _ = writeln!(
                h,
                "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text><line x1=\"{}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#1f77b4\" stroke-width=\"2\"/><circle cx=\"{}\" cy=\"{y}\" r=\"4\" fill=\"#1f77b4\"/>",
                left - 8.0,
                y + 4.0,
                esc(label),
                x(i.lo),
                x(i.hi),
                x(i.mean)
            );
        }
        h.push_str("</svg>\n");
    }
    let _ = writeln!(h, "<h2>Every metric</h2>\n<pre>{}</pre>", esc(&comparison_table(&owned)));
    if !differences.is_empty() {
        let mut t = String::from("| against | split | VISOR_uncond difference |\n| --- | --- | ---: |\n");
        for (label, split, d) in differences {
            let _ = writeln!(t, "| {label} | {} | {} |", split.name(), cell(d));
        }
        let _ = writeln!(h, "<h2>Paired differences (first study minus each other)</h2>\n<pre>{}</pre>", esc(&t));
    }
    if let Some((_, s)) = owned.first() {
        let _ = writeln!(h, "<p>Seeds {:?}; {}.</p>", s.seeds, esc(&s.interval));
    }
    h.push_str("</body></html>\n");
    h
}
