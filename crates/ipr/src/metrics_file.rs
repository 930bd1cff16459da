//! `metrics.json` of a run: one row per (method, iteration, split) with VISOR's headline
//! numbers and the strict IPR judge's accuracy.
//!
//! Schema: `{"rows": [{"iteration": int, "split": "seen"|"heldout", "OA", "VISOR_uncond",
//! "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4", "IPR_strict", "method"}]}`.
//! Iteration 0 is the base model.

use ipr_core::metrics::VisorMetrics;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which prompts a row was measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    /// Prompts over the training pairs (the ones IPR learns from).
    Seen,
    /// Prompts over held-out pairs (evaluation only).
    Heldout,
}

impl EvalSplit {
    pub const ALL: [EvalSplit; 2] = [EvalSplit::Seen, EvalSplit::Heldout];

    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Seen => "seen",
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
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    pub rows: Vec<MetricsRow>,
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
        let file = MetricsFile { rows: vec![MetricsRow::new("base", 0, EvalSplit::Heldout, &m, 35.0)] };
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
}
