//! The SR2D prompt set of VISOR, over any vocabulary.
//!
//! Reproduces `create_spatial_phrases.py` of microsoft/VISOR: for every unordered pair
//! (s1, s2) in `itertools.combinations` order, 10 consecutive rows: for each relation (left,
//! right, above, below) "s1 r s2" then the swapped "s2 r s1"; then "s1 and s2" and "s2 and
//! s1". Then one single-object row per class. With COCO-80: 31,680 rows, 25,280 spatial.
//! Rows serialise with VISOR's field names in VISOR's order.

use crate::error::{Error, Result};
use crate::prompt::Prompt;
use crate::relation::Relation;
use crate::vocab::Vocabulary;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One prompt with VISOR's metadata fields (the rows of `text_spatial_rel_phrases.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRow {
    pub unique_id: u64,
    pub num_objects: u32,
    pub obj_1_attributes: Vec<String>,
    pub obj_2_attributes: Vec<Option<String>>,
    /// A relation phrase ("to the left of"), "and" or "single".
    pub rel_type: String,
    pub text: String,
}

/// What `rel_type` says about a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelType {
    Spatial(Relation),
    And,
    Single,
}

impl PromptRow {
    pub fn rel(&self) -> Result<RelType, String> {
        match self.rel_type.as_str() {
            "and" => Ok(RelType::And),
            "single" => Ok(RelType::Single),
            other => other.parse().map(RelType::Spatial),
        }
    }

    /// The first object's name.
    pub fn obj1(&self) -> Option<&str> {
        self.obj_1_attributes.first().map(String::as_str)
    }

    /// The second object's name (`None` for single-object rows).
    pub fn obj2(&self) -> Option<&str> {
        self.obj_2_attributes.first().and_then(|o| o.as_deref())
    }

    /// The row as a [`Prompt`], checking that text, objects and rel_type agree.
    pub fn prompt(&self, vocab: &Vocabulary) -> Result<Prompt, String> {
        let parsed = Prompt::parse(&self.text, vocab)?;
        let obj = |name: Option<&str>| name.map(|n| vocab.require(n)).transpose();
        let (a, b) = (obj(self.obj1())?, obj(self.obj2())?);
        let expected = match (self.rel()?, a, b) {
            (RelType::Spatial(relation), Some(a), Some(b)) => Prompt::Spatial { a, relation, b },
            (RelType::And, Some(a), Some(b)) => Prompt::And { a, b },
            (RelType::Single, Some(a), None) => Prompt::Single { a },
            _ => return Err(format!("row {}: rel_type {:?} does not fit its objects", self.unique_id, self.rel_type)),
        };
        if parsed != expected {
            return Err(format!(
                "row {}: text {:?} does not match obj_1_attributes/obj_2_attributes/rel_type",
                self.unique_id, self.text
            ));
        }
        Ok(parsed)
    }

    fn new(unique_id: u64, prompt: &Prompt, vocab: &Vocabulary) -> Self {
        let (objs, rel_type) = match prompt {
            Prompt::Spatial { a, relation, b } => ((*a, Some(*b)), relation.phrase().to_string()),
            Prompt::And { a, b } => ((*a, Some(*b)), "and".to_string()),
            Prompt::Single { a } => ((*a, None), "single".to_string()),
            Prompt::Count { .. } => unreachable!("SR2D has no count prompts"),
        };
        PromptRow {
            unique_id,
            num_objects: if objs.1.is_some() { 2 } else { 1 },
            obj_1_attributes: vec![vocab.name(objs.0).to_string()],
            obj_2_attributes: vec![objs.1.map(|b| vocab.name(b).to_string())],
            rel_type,
            text: prompt.render(vocab),
        }
    }
}

/// The SR2D prompts over `vocab`, in VISOR's order.
pub fn sr2d_prompts(vocab: &Vocabulary) -> Vec<Prompt> {
    let n = vocab.len();
    let mut out = Vec::with_capacity(n * (n - 1) / 2 * 10 + n);
    for s1 in 0..n {
        for s2 in s1 + 1..n {
            for relation in Relation::ALL {
                out.push(Prompt::Spatial { a: s1, relation, b: s2 });
                out.push(Prompt::Spatial { a: s2, relation, b: s1 });
            }
            out.push(Prompt::And { a: s1, b: s2 });
            out.push(Prompt::And { a: s2, b: s1 });
        }
    }
    out.extend((0..n).map(|a| Prompt::Single { a }));
    out
}

/// The SR2D rows over `vocab` (ids are positions).
pub fn sr2d_rows(vocab: &Vocabulary) -> Vec<PromptRow> {
    sr2d_prompts(vocab).iter().enumerate().map(|(i, p)| PromptRow::new(i as u64, p, vocab)).collect()
}

/// Rows for an arbitrary list of prompts, with ids `0..`.
pub fn rows_for(prompts: &[Prompt], vocab: &Vocabulary) -> Vec<PromptRow> {
    prompts.iter().enumerate().map(|(i, p)| PromptRow::new(i as u64, p, vocab)).collect()
}

/// The rows as JSON text byte-identical to VISOR's `json.dump(data, f, indent=2)`
/// (two-space indent, no trailing newline).
pub fn to_visor_json(rows: &[PromptRow]) -> String {
    serde_json::to_string_pretty(rows).expect("rows serialise")
}

/// Read a prompt table: VISOR's `text_spatial_rel_phrases.json`, ours, or any subset of one
/// (the run folder's `prompts/*.json`). Ids must be strictly increasing, so that a full table
/// has ids equal to positions (visor.py indexes the list by id) and a subset keeps the full
/// table's ids; [`find_row`] looks them up.
pub fn read_rows(path: &Path) -> Result<Vec<PromptRow>> {
    let text = crate::fs::read_to_string(path)?;
    let rows: Vec<PromptRow> = crate::fs::from_json_str(&text).map_err(|m| Error::file(path, m))?;
    for (i, row) in rows.iter().enumerate() {
        if i > 0 && row.unique_id <= rows[i - 1].unique_id {
            return Err(Error::file(
                path,
                format!(
                    "row {i} has unique_id {} after {}: ids must be strictly increasing",
                    row.unique_id,
                    rows[i - 1].unique_id
                ),
            ));
        }
        row.rel().map_err(|m| Error::file(path, format!("row {i}: field rel_type: {m}")))?;
    }
    Ok(rows)
}

/// Checks that every row of a table is a prompt of `vocab` whose text agrees with its fields;
/// the error names the file, the row and the problem (an unknown class, a mismatched text).
pub fn check_rows(path: &Path, rows: &[PromptRow], vocab: &Vocabulary) -> Result<()> {
    for (i, row) in rows.iter().enumerate() {
        row.prompt(vocab).map_err(|m| Error::file(path, format!("row {i} (unique_id {}): {m}", row.unique_id)))?;
    }
    Ok(())
}

/// The row with `unique_id` of a table read by [`read_rows`] (ids increasing).
pub fn find_row(rows: &[PromptRow], unique_id: u64) -> Option<&PromptRow> {
    rows.binary_search_by_key(&unique_id, |r| r.unique_id).ok().map(|i| &rows[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_sr2d_matches_visor() {
        let v = Vocabulary::coco80();
        let rows = sr2d_rows(&v);
        assert_eq!(rows.len(), 31_680);
        let spatial = rows.iter().filter(|r| matches!(r.rel(), Ok(RelType::Spatial(_)))).count();
        assert_eq!(spatial, 25_280);
        assert_eq!(rows[1103].text, "a kite to the right of a bicycle");
        assert_eq!(rows[11036].text, "a cat below a bottle");
        assert_eq!(rows[0].text, "a person to the left of a bicycle");
        assert_eq!(rows[1].text, "a bicycle to the left of a person");
        assert_eq!(rows[8].text, "a person and a bicycle");
        assert_eq!(rows[8].rel_type, "and");
        let last = rows.last().unwrap();
        assert_eq!((last.text.as_str(), last.rel_type.as_str(), last.num_objects), ("a toothbrush", "single", 1));
        assert_eq!(last.obj_2_attributes, vec![None]);
        assert!(rows.iter().any(|r| r.text == "an airplane above an umbrella"));
        assert!(rows.iter().any(|r| r.text == "a hair drier below a tv"));
        for row in &rows {
            let p = row.prompt(&v).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.render(&v), row.text);
        }
    }

    #[test]
    fn json_layout_is_pythons() {
        let v = Vocabulary::coco80();
        let rows = sr2d_rows(&v);
        let json = to_visor_json(&rows[rows.len() - 1..]);
        let want = "[\n  {\n    \"unique_id\": 31679,\n    \"num_objects\": 1,\n    \"obj_1_attributes\": [\n      \"toothbrush\"\n    ],\n    \"obj_2_attributes\": [\n      null\n    ],\n    \"rel_type\": \"single\",\n    \"text\": \"a toothbrush\"\n  }\n]";
        assert_eq!(json, want);
    }

    #[test]
    fn read_rows_checks_ids_and_relations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let v = Vocabulary::coco80();
        let mut rows = sr2d_rows(&v)[..3].to_vec();
        std::fs::write(&path, to_visor_json(&rows)).unwrap();
        assert_eq!(read_rows(&path).unwrap(), rows);
        rows[1].unique_id = 0;
        std::fs::write(&path, to_visor_json(&rows)).unwrap();
        let e = read_rows(&path).unwrap_err().to_string();
        assert!(e.contains("row 1 has unique_id 0 after 0: ids must be strictly increasing"), "{e}");
        // A subset keeps the full table's ids.
        let subset = vec![sr2d_rows(&v)[5].clone(), sr2d_rows(&v)[1103].clone()];
        std::fs::write(&path, to_visor_json(&subset)).unwrap();
        let read = read_rows(&path).unwrap();
        assert_eq!(find_row(&read, 1103).unwrap().text, "a kite to the right of a bicycle");
        assert!(find_row(&read, 6).is_none());
        check_rows(&path, &read, &v).unwrap();
        let mut unknown = read.clone();
        unknown[1].obj_1_attributes = vec!["dragon".into()];
        unknown[1].text = "a dragon to the right of a bicycle".into();
        let e = check_rows(&path, &unknown, &v).unwrap_err().to_string();
        assert!(e.contains("p.json") && e.contains("row 1 (unique_id 1103)") && e.contains("dragon"), "{e}");
        rows[1].unique_id = 1;
        rows[2].rel_type = "beside".into();
        std::fs::write(&path, to_visor_json(&rows)).unwrap();
        let e = read_rows(&path).unwrap_err().to_string();
        assert!(e.contains("row 2: field rel_type: unknown relation \"beside\""), "{e}");
        std::fs::write(&path, "[{\"unique_id\": 0").unwrap();
        assert!(read_rows(&path).unwrap_err().to_string().contains("p.json"));
    }
}
