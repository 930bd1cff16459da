//! VISOR's results-file format: `{"<unique_id>_<k>": {"classes", "centroid", "recall", "sra",
//! "text"}}`, one entry per image, and its scoring against a prompt table (as visor.py does).
//!
//! Reading follows what visor.py needs: `classes`, `recall` and `sra` are required; `centroid`
//! and `text` are optional (the VISOR notebook writes `rel_type` instead of `text`) and other
//! keys are ignored. The prompt comes from the table by id, never from the entry's text.

use crate::error::{Error, Result};
use crate::judge::Verdict;
use crate::metrics::ImageScore;
use crate::sr2d::{PromptRow, RelType};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::Path;

/// One image's entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisorResult {
    /// The label of every kept box, duplicates included.
    pub classes: Vec<String>,
    /// Box centres `[cx, cy]`, one per class entry.
    #[serde(default)]
    pub centroid: Vec<[f64; 2]>,
    /// How many of the prompt's objects were found.
    pub recall: u32,
    #[serde(serialize_with = "sra_as_int", deserialize_with = "sra_from_json")]
    pub sra: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

fn sra_as_int<S: Serializer>(v: &bool, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u8(u8::from(*v))
}

/// visor.py multiplies `sra` by 0/1, so 0, 1, true and false are the values it means.
fn sra_from_json<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(b) => Ok(b),
        serde_json::Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
        serde_json::Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
        other => Err(serde::de::Error::custom(format!("sra is {other}, expected 0, 1, true or false"))),
    }
}

impl VisorResult {
    /// The entry VISOR's protocol writes for a judged image.
    pub fn from_verdict(verdict: &Verdict, text: &str) -> Self {
        VisorResult {
            classes: verdict.labels.clone(),
            centroid: verdict.centers.iter().map(|&(x, y)| [x, y]).collect(),
            recall: verdict.recall(),
            sra: verdict.visor_sra,
            text: Some(text.to_string()),
        }
    }
}

/// Results-file entries in order: image key ("<unique_id>_<k>") and its result.
pub type ResultEntries = Vec<(String, VisorResult)>;

/// Split an image key "<unique_id>_<k>".
pub fn parse_image_key(key: &str) -> std::result::Result<(u64, u32), String> {
    let bad = || format!("image key {key:?} is not \"<unique_id>_<k>\" with whole numbers");
    let (id, k) = key.split_once('_').ok_or_else(bad)?;
    Ok((id.parse().map_err(|_| bad())?, k.parse().map_err(|_| bad())?))
}

pub fn image_key(prompt_id: u64, k: u32) -> String {
    format!("{prompt_id}_{k}")
}

/// Read a results file; entries keep the file's order. Errors name the file and the key.
pub fn read_results(path: &Path) -> Result<ResultEntries> {
    let text = crate::fs::read_to_string(path)?;
    let map: serde_json::Map<String, serde_json::Value> = crate::fs::from_json_str(&text)
        .map_err(|m| Error::file(path, format!("{m} (expected a JSON object of image keys to results)")))?;
    map.into_iter()
        .map(|(key, value)| {
            parse_image_key(&key).map_err(|m| Error::file(path, m))?;
            let r = crate::fs::from_json_str::<VisorResult>(&value.to_string())
                .map_err(|m| Error::file(path, format!("key {key:?}: {m}")))?;
            Ok((key, r))
        })
        .collect()
}

/// Write a results file (atomically), in the given order.
pub fn write_results(path: &Path, entries: &[(String, VisorResult)]) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> =
        entries.iter().map(|(k, r)| (k.clone(), serde_json::to_value(r).expect("result serialises"))).collect();
    crate::fs::write_json(path, &map)
}

/// Score entries against the prompt table as visor.py does: the objects and relation come
/// from `rows[unique_id]`, an object counts as detected when its name is among `classes`, and
/// "and" and single-object prompts are skipped.
pub fn score_results(
    entries: &[(String, VisorResult)],
    rows: &[PromptRow],
) -> std::result::Result<Vec<ImageScore>, String> {
    let mut out = Vec::new();
    for (key, r) in entries {
        let (id, _) = parse_image_key(key)?;
        let row = crate::sr2d::find_row(rows, id).ok_or_else(|| {
            format!("image key {key:?}: unique_id {id} is not in the prompt table ({} rows)", rows.len())
        })?;
        let RelType::Spatial(relation) = row.rel().map_err(|m| format!("prompt {id}: {m}"))? else {
            continue;
        };
        let (Some(a), Some(b)) = (row.obj1(), row.obj2()) else {
            continue;
        };
        let found = |name: &str| r.classes.iter().any(|c| c == name);
        out.push(ImageScore { prompt_id: id, relation, found_a: found(a), found_b: found(b), sra: r.sra });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("results.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_visor_readme_example_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"{"1103_0": {"classes": ["kite"], "centroid": [[170.6, 135.6]], "recall": 1, "sra": 0, "text": "a kite to the right of a bicycle"},
            "11036_1": {"classes": ["cat"], "centroid": [[170.2, 108.2]], "recall": 1, "sra": false, "rel_type": "below"}}"#,
        );
        let entries = read_results(&p).unwrap();
        assert_eq!(entries[0].0, "1103_0");
        assert_eq!(entries[1].1.text, None);
        let out = dir.path().join("out.json");
        write_results(&out, &entries).unwrap();
        assert_eq!(read_results(&out).unwrap(), entries);
        assert!(std::fs::read_to_string(&out).unwrap().contains("\"sra\": 0"));
    }

    /// A results file worked out by hand, with "and" and single rows that must be skipped and
    /// prompts with fewer than 4 images.
    #[test]
    fn hand_computed_results_file() {
        use crate::metrics::visor_metrics;
        let rows = crate::sr2d::sr2d_rows(&crate::Vocabulary::coco80());
        // 0: "a person to the left of a bicycle"; 4: "a person above a bicycle";
        // 8: "a person and a bicycle" (and); 31600: "a person" (single).
        assert_eq!(
            (rows[0].text.as_str(), rows[4].text.as_str()),
            ("a person to the left of a bicycle", "a person above a bicycle")
        );
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"{
            "0_0": {"classes": ["person", "bicycle"], "recall": 2, "sra": 1},
            "0_1": {"classes": ["person", "bicycle", "bicycle"], "recall": 2, "sra": 0},
            "0_2": {"classes": ["person"], "recall": 1, "sra": 0},
            "4_0": {"classes": ["bicycle", "person"], "recall": 2, "sra": true},
            "8_0": {"classes": [], "recall": 0, "sra": 0},
            "8_1": {"classes": ["person", "bicycle"], "recall": 2, "sra": 1},
            "31600_0": {"classes": ["person"], "recall": 1, "sra": 1}
        }"#,
        );
        let scores = score_results(&read_results(&p).unwrap(), &rows).unwrap();
        assert_eq!(scores.len(), 4, "the 'and' and single rows are skipped");
        let m = visor_metrics(&scores).unwrap();
        // Both found in 3 of 4 images; 2 of those 3 correct; prompt 0 has 1 correct of 3
        // images, prompt 4 has 1 of 1.
        assert_eq!(m.oa, 75.0);
        assert!((m.visor_cond - 200.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.visor_uncond, 50.0);
        assert_eq!((m.visor_1, m.visor_2, m.visor_3, m.visor_4), (100.0, 0.0, 0.0, 0.0));
        assert_eq!((m.obj_acc_a, m.obj_acc_b), (100.0, 75.0));
        let e = score_results(&[("40000_0".into(), read_results(&p).unwrap()[0].1.clone())], &rows).unwrap_err();
        assert!(e.contains("unique_id 40000 is not in the prompt table"), "{e}");
    }

    #[test]
    fn malformed_results_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for (text, want) in [
            (r#"{"1_0": {"classes": ["a"], "recall": 1, "sra": 0"#, "EOF"),
            (r#"{"1_0": {"classes": ["a"], "sra": 0}}"#, "key \"1_0\": missing field `recall`"),
            (r#"{"1_0": {"classes": ["a"], "recall": 1, "sra": 2}}"#, "key \"1_0\": field sra: sra is 2"),
            (r#"{"1-0": {"classes": [], "recall": 0, "sra": 0}}"#, "image key \"1-0\""),
            (r#"{"1_0": {"classes": "a", "recall": 1, "sra": 0}}"#, "field classes"),
            (r#"[1, 2]"#, "expected a JSON object"),
        ] {
            let e = read_results(&write(dir.path(), text)).unwrap_err().to_string();
            assert!(e.contains("results.json") && e.contains(want), "{e} (wanted {want})");
        }
    }
}
