//! Atomic file output and strict JSON Lines input.
//!
//! Artifacts are written to a temporary name beside their destination and renamed into place,
//! so a reader (or a resumed run) never sees half a file. JSON Lines are parsed line by line and
//! every error names the file, the line and the field (through `serde_path_to_error`).

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A temporary path beside `path`, unique to this process.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomic_with(path, |tmp| {
        let mut f = fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })
    .map_err(|e| Error::io(path, e))
}

/// Writes `path` atomically with `write`, which writes the whole file at the temporary path it is
/// given (beside `path`); then renames it into place. When `write` or the rename fails (a full
/// disk, a serializer error) the temporary file is removed: `path` keeps its old content or has
/// the new one, never a part of it, and nothing else is left behind.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Build the folder `out` atomically: `fill` writes into a fresh temporary folder beside it,
/// which is then renamed to `out`; on any error the temporary folder is removed. `out` must not
/// exist (a complete artifact is never replaced).
pub fn build_dir<E: From<Error>>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    if out.exists() {
        return Err(Error::file(out, "already exists: remove it or choose another output folder").into());
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    remove_stale_temporaries(out);
    let tmp = temp_path(out);
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| fs::rename(&tmp, out).map_err(|e| Error::io(out, e).into()));
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Removes what killed processes left of earlier attempts at `out` (`.<name>.tmp-<pid>`, any pid).
/// Safe because one process at a time owns an output (the run, training and shard locks of
/// [`crate::lock`]).
fn remove_stale_temporaries(out: &Path) {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else { return };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let p = e.path();
            let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
    }
}

/// Removes, under `dir`, every file or folder a writer of this module left half-written when its
/// process was killed (`.<name>.tmp-<pid>`); returns how many. For the owner of `dir` (a resumed
/// run holding its lock).
pub fn remove_temporaries_under(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let e = e.map_err(|e| Error::io(&d, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            let dir = e.file_type().map_err(|e| Error::io(&p, e))?.is_dir();
            if name.starts_with('.') && name.contains(".tmp-") {
                let r = if dir { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                r.map_err(|e| Error::io(&p, e))?;
                removed += 1;
            } else if dir {
                stack.push(p);
            }
        }
    }
    Ok(removed)
}

/// Write `rows` as JSON Lines, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut out = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut out, row).map_err(|e| Error::file(path, e.to_string()))?;
        out.push(b'\n');
    }
    write_atomic(path, &out)
}

/// Write `value` as pretty JSON, atomically.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut out = serde_json::to_vec_pretty(value).map_err(|e| Error::file(path, e.to_string()))?;
    out.push(b'\n');
    write_atomic(path, &out)
}

pub fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Parse one JSON value, naming the field path on error ("weight: invalid type ...").
pub fn from_json_str<T: DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if field == "." {
            inner.to_string()
        } else {
            format!("field {field}: {inner}")
        }
    })?;
    Ok(value)
}

/// Read JSON Lines strictly: blank lines are allowed (a trailing newline), anything else must
/// parse as `T`. Errors carry the 1-based line number.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = read_to_string(path)?;
    parse_jsonl(path, &text)
}

pub fn parse_jsonl<T: DeserializeOwned>(path: &Path, text: &str) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        rows.push(from_json_str(line).map_err(|msg| Error::line(path, i + 1, msg))?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Row {
        name: String,
        weight: f64,
    }

    #[test]
    fn round_trip_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/rows.jsonl");
        let rows = vec![Row { name: "a".into(), weight: 0.5 }, Row { name: "b".into(), weight: 1.0 }];
        write_jsonl(&path, &rows).unwrap();
        assert_eq!(read_jsonl::<Row>(&path).unwrap(), rows);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["rows.jsonl"], "no temporary file left behind");
    }

    #[test]
    fn build_dir_is_complete_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("art");
        let failed: Result<()> = build_dir(&out, |tmp| {
            fs::write(tmp.join("a"), b"1").unwrap();
            Err(Error::Invalid("boom".into()))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
        build_dir::<Error>(&out, |tmp| fs::write(tmp.join("a"), b"1").map_err(|e| Error::io(tmp, e))).unwrap();
        assert_eq!(fs::read(out.join("a")).unwrap(), b"1");
        let again = build_dir::<Error>(&out, |_| Ok(()));
        assert!(again.unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn errors_name_line_and_field() {
        let p = Path::new("meta.jsonl");
        let text = "{\"name\":\"a\",\"weight\":1}\n\n{\"name\":\"b\",\"weight\":\"heavy\"}\n";
        let e = parse_jsonl::<Row>(p, text).unwrap_err().to_string();
        assert!(e.starts_with("meta.jsonl:3: field weight: invalid type"), "{e}");
        let e = parse_jsonl::<Row>(p, "{\"name\":\"a\"}").unwrap_err().to_string();
        assert!(e.contains("meta.jsonl:1:") && e.contains("missing field `weight`"), "{e}");
        let e = parse_jsonl::<Row>(p, "{\"name\":\"a\",\"weight\":1,\"colour\":2}").unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = parse_jsonl::<Row>(p, "{\"name\":\"a\",\"wei").unwrap_err().to_string();
        assert!(e.contains("meta.jsonl:1:") && e.contains("EOF"), "{e}");
    }
}
