//! `metrics.json` of a run: one row per (method, iteration, split) with VISOR's headline
//! numbers and the strict IPR judge's accuracy.
//!
//! Schema: `{"rows": [{"iteration": int, "split": "seen"|"validation"|"heldout", "OA",
//! "VISOR_uncond", "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4", "IPR_strict",
//! "method", "CLIP_score"?}]}`. Iteration 0 is the base model; `CLIP_score` is present when the
//! run has `eval.clip_model`.

use ipr_core::metrics::VisorMetrics;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which prompts a row was measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    /// Prompts over the training pairs (the ones IPR learns from).
    Seen,
    /// Prompts over validation pairs: never trained on, used to choose settings.
    Validation,
    /// Prompts over held-out pairs: never trained on, only reported.
    Heldout,
}

impl EvalSplit {
    pub const ALL: [EvalSplit; 3] = [EvalSplit::Seen, EvalSplit::Validation, EvalSplit::Heldout];

    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Seen => "seen",
            EvalSplit::Validation => "validation",
            EvalSplit::Heldout => "heldout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsRow {
    pub iteration: u32,
    pub split: EvalSplit,
    #[serde(rename = "OA")]
    pub oa: f64,
    #[serde(rename = "VISOR_uncond")]
    pub visor_uncond: f64,
    #[serde(rename = "VISOR_cond")]
    pub visor_cond: f64,
    #[serde(rename = "VISOR_1")]
    pub visor_1: f64,
    #[serde(rename = "VISOR_2")]
    pub visor_2: f64,
    #[serde(rename = "VISOR_3")]
    pub visor_3: f64,
    #[serde(rename = "VISOR_4")]
    pub visor_4: f64,
    /// Percentage of evaluation images right by IPR's strict judge (exactly one box of each).
    #[serde(rename = "IPR_strict")]
    pub ipr_strict: f64,
    /// The method that produced the model ("ipr", "pr", "filter", "weighted"; "base" for 0).
    pub method: String,
    /// CLIP score (torchmetrics' definition) against the original prompts, with `eval.clip_model`.
    #[serde(rename = "CLIP_score", default, skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f64>,
}

impl MetricsRow {
    pub fn new(method: &str, iteration: u32, split: EvalSplit, m: &VisorMetrics, ipr_strict: f64) -> Self {
        MetricsRow {
            iteration,
            split,
            oa: m.oa,
            visor_uncond: m.visor_uncond,
            visor_cond: m.visor_cond,
            visor_1: m.visor_1,
            visor_2: m.visor_2,
            visor_3: m.visor_3,
            visor_4: m.visor_4,
            ipr_strict,
            method: method.to_string(),
            clip_score: None,
        }
    }
}

/// The numeric columns of a row, in the order tables print them.
pub const VALUE_NAMES: [&str; 8] =
    ["OA", "VISOR_uncond", "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4", "IPR_strict"];

impl MetricsRow {
    /// The values of [`VALUE_NAMES`], in that order.
    pub fn values(&self) -> [f64; 8] {
        [
            self.oa,
            self.visor_uncond,
            self.visor_cond,
            self.visor_1,
            self.visor_2,
            self.visor_3,
            self.visor_4,
            self.ipr_strict,
        ]
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    pub rows: Vec<MetricsRow>,
    /// How the run was spread over processes (absent in files of older runs). The rows do not
    /// depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
}

/// The processes a run ran on: every independent stage cut by global batch index (batch `j` to
/// rank `j % world_size`), training data-parallel with `train_shards_per_rank` pieces of each
/// micro-batch per rank on the CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    pub world_size: usize,
    /// "single process", or the MPI library.
    pub collective: String,
    pub train_shards_per_rank: usize,
}

impl MetricsFile {
    pub fn read(path: &Path) -> ipr_core::Result<Self> {
        let text = ipr_core::fs::read_to_string(path)?;
        ipr_core::fs::from_json_str(&text).map_err(|m| ipr_core::Error::file(path, m))
    }

    pub fn write(&self, path: &Path) -> ipr_core::Result<()> {
        ipr_core::fs::write_json(path, self)
    }

    /// The row of `method` at `iteration` on `split`.
    pub fn get(&self, method: &str, iteration: u32, split: EvalSplit) -> Option<&MetricsRow> {
        self.rows.iter().find(|r| r.method == method && r.iteration == iteration && r.split == split)
    }
}

/// The header of a Markdown comparison table with the metric columns `names`.
pub fn comparison_header(names: &[&str]) -> String {
    format!(
        "| model | round | split | {} |\n| --- | ---: | --- |{}\n",
        names.join(" | "),
        " ---: |".repeat(names.len())
    )
}

/// The rows a comparison shows, in order: the base model's (iteration 0 of the first run,
/// labelled `None`), then each run's last iteration under the run's label (none for a run
/// without rounds). Works for any kind of row (a run's metrics, a study's summary).
pub fn base_then_last<'a, R>(
    runs: &[(&'a str, &'a [R])],
    iteration: impl Fn(&R) -> u32,
) -> Vec<(Option<&'a str>, &'a R)> {
    let mut out: Vec<(Option<&str>, &R)> = match runs.first() {
        Some((_, first)) => first.iter().filter(|r| iteration(r) == 0).map(|r| (None, r)).collect(),
        None => Vec::new(),
    };
    for (label, rows) in runs {
        let last = rows.iter().map(&iteration).max().unwrap_or(0);
        out.extend(rows.iter().filter(|r| last > 0 && iteration(r) == last).map(|r| (Some(*label), r)));
    }
    out
}

/// A Markdown table comparing runs: the base model (iteration 0 of the first run) and each run's
/// last iteration, per split. The runs should share prompts, seeds and budget (same config but
/// the method) for the comparison to mean anything; each run comes with its label.
pub fn comparison_table(runs: &[(String, MetricsFile)]) -> String {
    let mut s = comparison_header(&VALUE_NAMES);
    let runs: Vec<(&str, &[MetricsRow])> = runs.iter().map(|(l, m)| (l.as_str(), m.rows.as_slice())).collect();
    for (label, r) in base_then_last(&runs, |r| r.iteration) {
        let values: Vec<String> = r.values().iter().map(|v| format!("{v:.1}")).collect();
        let label = label.unwrap_or("base");
        s.push_str(&format!("| {label} | {} | {} | {} |\n", r.iteration, r.split.name(), values.join(" | ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_round_trip() {
        let m = VisorMetrics {
            oa: 80.0,
            visor_uncond: 40.0,
            visor_cond: 50.0,
            visor_1: 90.0,
            visor_2: 60.0,
            visor_3: 30.0,
            visor_4: 10.0,
            obj_acc_a: 90.0,
            obj_acc_b: 85.0,
            num_images: 8,
            num_prompts: 2,
        };
        let file = MetricsFile { rows: vec![MetricsRow::new("base", 0, EvalSplit::Heldout, &m, 35.0)], launch: None };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        file.write(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let row = &v["rows"][0];
        assert_eq!((row["iteration"].as_u64(), row["split"].as_str()), (Some(0), Some("heldout")));
        for k in ["OA", "VISOR_uncond", "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4"] {
            assert!(row[k].is_f64(), "{k}");
        }
        assert_eq!(MetricsFile::read(&path).unwrap(), file);
        assert!(file.get("base", 0, EvalSplit::Heldout).is_some() && file.get("ipr", 0, EvalSplit::Heldout).is_none());
    }

    #[test]
    fn comparison_has_the_base_once_and_each_runs_last_round() {
        let m = |uncond: f64| VisorMetrics {
            oa: 80.0,
            visor_uncond: uncond,
            visor_cond: 50.0,
            visor_1: 0.0,
            visor_2: 0.0,
            visor_3: 0.0,
            visor_4: 0.0,
            obj_acc_a: 0.0,
            obj_acc_b: 0.0,
            num_images: 4,
            num_prompts: 1,
        };
        let run = |method: &str, last: f64| MetricsFile {
            rows: vec![
                MetricsRow::new("base", 0, EvalSplit::Seen, &m(40.0), 0.0),
                MetricsRow::new("base", 0, EvalSplit::Heldout, &m(41.0), 0.0),
                MetricsRow::new(method, 1, EvalSplit::Heldout, &m(45.0), 0.0),
                MetricsRow::new(method, 2, EvalSplit::Seen, &m(last), 0.0),
                MetricsRow::new(method, 2, EvalSplit::Heldout, &m(last + 1.0), 0.0),
            ],
            launch: None,
        };
        let t = comparison_table(&[("a".into(), run("ipr", 60.0)), ("b".into(), run("filter", 50.0))]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + 2 + 2 + 2, "{t}");
        assert!(lines[2].starts_with("| base | 0 | seen | 80.0 | 40.0 |"), "{t}");
        assert!(lines[5].starts_with("| a | 2 | heldout | 80.0 | 61.0 |"), "{t}");
        assert!(lines[7].starts_with("| b | 2 | heldout | 80.0 | 51.0 |"), "{t}");
    }
}
