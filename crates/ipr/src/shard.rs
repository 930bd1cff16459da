//! Which part of an independent stage this process does: shard `i` of `n`.
//!
//! The scheduler is the engine (scale-out.md): a Slurm job array or a Kubernetes Indexed Job
//! starts `n` copies of the same command, and each finds its index in the launcher's variables,
//! or in `--shard i/n`. Work is cut by global batch index (batch `j` goes to shard `j % n`), so
//! which images share a batch, and so every image's bytes, do not depend on `n`.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Shard `index` of `count` (`index < count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole job.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/n`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parsed = s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if count > 0 && index < count => Ok(Shard { index, count }),
            _ => Err(format!("{s:?}: expected I/N with 0 <= I < N, e.g. 0/4")),
        }
    }

    /// Whether batch `j` of the global batch list is this shard's.
    pub fn owns(&self, batch: usize) -> bool {
        batch % self.count == self.index
    }

    /// The item indices this shard does out of `len` items cut into global batches of `batch`
    /// (batch `j` = items `[j * batch, (j + 1) * batch)`), in order.
    pub fn items(&self, len: usize, batch: usize) -> Vec<usize> {
        let batch = batch.max(1);
        (0..len).filter(|i| self.owns(i / batch)).collect()
    }

    /// The name of this shard's part of an artifact: `<index>-of-<count>`.
    pub fn part_name(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// `--shard i/n` as it would be written.
    pub fn describe(&self) -> String {
        format!("{}/{}", self.index, self.count)
    }

    /// The shard from `--shard` (`flag`), Slurm's array variables, or Kubernetes'
    /// `JOB_COMPLETION_INDEX` with `--shards N` (`shards`); `env` reads a variable. Sources that
    /// are given must agree; none given means the whole job.
    pub fn resolve(flag: Option<Shard>, shards: Option<usize>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) => match v.trim().parse() {
                    Ok(n) => Ok(Some(n)),
                    Err(_) => bail!("{name}={v:?} is not a non-negative integer"),
                },
            }
        };
        let mut found: Vec<(String, Shard)> = Vec::new();
        if let Some(s) = flag {
            found.push((format!("--shard {}/{}", s.index, s.count), s));
        }
        if let Some(id) = var("SLURM_ARRAY_TASK_ID")? {
            let Some(count) = var("SLURM_ARRAY_TASK_COUNT")? else {
                bail!("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not");
            };
            // Arrays may start anywhere (--array=1-8): the index counts from the first task.
            let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).filter(|&i| i < count);
            let Some(index) = index else {
                bail!("SLURM_ARRAY_TASK_ID={id} with SLURM_ARRAY_TASK_MIN={min} is outside the {count} tasks of the array");
            };
            found.push((format!("SLURM_ARRAY_TASK_ID={id} of {count}"), Shard { index, count }));
        }
        // Under mpirun / srun without data-parallel work to do, each rank takes its shard.
        if let Some((seen, index, count)) = crate::world::launcher_world(env) {
            found.push((seen, Shard { index, count }));
        }
        if let Some(index) = var("JOB_COMPLETION_INDEX")? {
            match shards {
                Some(count) if index < count => {
                    found.push((format!("JOB_COMPLETION_INDEX={index} with --shards {count}"), Shard { index, count }))
                }
                Some(count) => bail!("JOB_COMPLETION_INDEX={index} is not below --shards {count}"),
                // Kubernetes gives no variable with the total: --shards says it.
                None if flag.is_none() => bail!("JOB_COMPLETION_INDEX is set: give --shards N (the Job's completions)"),
                None => {}
            }
        } else if let (Some(n), None) = (shards, flag) {
            if found.is_empty() {
                bail!("--shards {n} needs JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) or --shard I/N");
            }
        }
        match found.split_first() {
            None => Ok(Shard::ALL),
            Some(((_, first), rest)) => {
                if let Some((name, other)) = rest.iter().find(|(_, s)| s != first) {
                    bail!(
                        "the shard sources disagree: {} says {}/{}, {name} says {}/{}",
                        found[0].0,
                        first.index,
                        first.count,
                        other.index,
                        other.count
                    );
                }
                Ok(*first)
            }
        }
    }
}

/// Where the shards of `artifact` put their parts: `<artifact>.shards/`, beside it.
pub fn parts_dir(artifact: &Path) -> PathBuf {
    let name = artifact.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    artifact.with_file_name(format!("{name}.shards"))
}

/// The path of `shard`'s part of `artifact` (`<artifact>.shards/<i>-of-<n><ext>`).
pub fn part_path(artifact: &Path, shard: Shard, ext: &str) -> PathBuf {
    parts_dir(artifact).join(format!("{}{ext}", shard.part_name()))
}

/// The parts in `dir` (`<i>-of-<n><ext>`), checked to be the `n` parts of one shard count, every
/// one present; returned in shard order. Missing parts are named (with the `--shard` that makes
/// each), and so are parts of two different counts (two shardings of one artifact overlap).
pub fn complete_parts(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(Shard, PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!("{}: no shard parts here (run the shards first, each with --shard I/N)", dir.display())
    })?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // a part being written (atomic temporaries start with a dot)
        }
        let Some(stem) = name.strip_suffix(ext) else { continue };
        let parsed = stem.split_once("-of-").and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => found.push((Shard { index, count }, entry.path())),
            _ => bail!("{}: not a shard part (expected <i>-of-<n>{ext})", entry.path().display()),
        }
    }
    let Some(count) = found.first().map(|(s, _)| s.count) else {
        bail!("{}: no shard parts here (run the shards first, each with --shard I/N)", dir.display());
    };
    let counts: std::collections::BTreeSet<usize> = found.iter().map(|(s, _)| s.count).collect();
    if counts.len() > 1 {
        let names: Vec<String> = counts.iter().map(|n| format!("of {n}")).collect();
        bail!(
            "{}: parts of {} different shard counts ({}) overlap: keep the parts of one count and remove the others",
            dir.display(),
            counts.len(),
            names.join(", ")
        );
    }
    found.sort_by_key(|(s, _)| s.index);
    let missing: Vec<String> =
        (0..count).filter(|i| !found.iter().any(|(s, _)| s.index == *i)).map(|i| format!("{i}/{count}")).collect();
    if !missing.is_empty() {
        bail!(
            "{}: {} of {count} shards missing: run --shard {} and merge again",
            dir.display(),
            missing.len(),
            missing.join(", --shard ")
        );
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Merges rows from shard parts into the order of `expected` (the item keys of the whole job, in
/// the order one process writes them): every expected key exactly once. A key in two parts (the
/// parts overlap), a key in no part (a part is incomplete) or a key not expected (the parts come
/// from other inputs) is an error naming the part and the key.
pub fn merge_rows<T>(parts: Vec<(PathBuf, Vec<T>)>, key: impl Fn(&T) -> String, expected: &[String]) -> Result<Vec<T>> {
    let place: HashMap<&str, usize> = expected.iter().enumerate().map(|(i, k)| (k.as_str(), i)).collect();
    let mut slots: Vec<Option<(T, usize)>> = (0..expected.len()).map(|_| None).collect();
    let names: Vec<PathBuf> = parts.iter().map(|(p, _)| p.clone()).collect();
    for (p, (path, rows)) in parts.into_iter().enumerate() {
        for row in rows {
            let k = key(&row);
            let Some(&i) = place.get(k.as_str()) else {
                bail!(
                    "{}: {k} is not one of the {} items of the job (a part of other inputs?)",
                    path.display(),
                    expected.len()
                );
            };
            if let Some((_, other)) = &slots[i] {
                bail!("{k} is in two parts, {} and {}: the shards overlap", names[*other].display(), path.display());
            }
            slots[i] = Some((row, p));
        }
    }
    let missing: Vec<&str> = slots.iter().zip(expected).filter(|(s, _)| s.is_none()).map(|(_, k)| k.as_str()).collect();
    if let Some(first) = missing.first() {
        bail!(
            "{} of the {} items are in no part (the first: {first}): a shard did not finish, or ran on other inputs",
            missing.len(),
            expected.len()
        );
    }
    Ok(slots.into_iter().map(|s| s.expect("checked above").0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn sources_and_their_agreement() {
        let s = |i, n| Shard { index: i, count: n };
        assert_eq!(Shard::resolve(None, None, &env(&[])).unwrap(), Shard::ALL);
        assert_eq!(Shard::resolve(Some(s(1, 3)), None, &env(&[])).unwrap(), s(1, 3));
        let slurm = env(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        assert_eq!(Shard::resolve(None, None, &slurm).unwrap(), s(2, 4));
        assert_eq!(Shard::resolve(Some(s(2, 4)), None, &slurm).unwrap(), s(2, 4));
        let e = Shard::resolve(Some(s(1, 4)), None, &slurm).unwrap_err().to_string();
        assert!(e.contains("disagree") && e.contains("--shard 1/4") && e.contains("SLURM_ARRAY_TASK_ID=2"), "{e}");
        let from_one =
            env(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_MIN", "1")]);
        assert_eq!(Shard::resolve(None, None, &from_one).unwrap(), s(0, 4));
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(Shard::resolve(None, Some(5), &k8s).unwrap(), s(3, 5));
        assert!(Shard::resolve(None, None, &k8s).unwrap_err().to_string().contains("--shards N"));
        assert!(Shard::resolve(None, Some(3), &k8s).unwrap_err().to_string().contains("not below --shards 3"));
        assert!(Shard::resolve(None, Some(3), &env(&[]))
            .unwrap_err()
            .to_string()
            .contains("needs JOB_COMPLETION_INDEX"));
        let bad = env(&[("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        assert!(Shard::resolve(None, None, &bad).unwrap_err().to_string().contains("SLURM_ARRAY_TASK_ID=\"x\""));
    }

    #[test]
    fn parse_and_ownership() {
        assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
        for bad in ["3/3", "1", "a/b", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (0..3).map(|i| Shard { index: i, count: 3 }).collect();
        for j in 0..20 {
            assert_eq!(shards.iter().filter(|s| s.owns(j)).count(), 1, "batch {j} has exactly one owner");
        }
    }
}
