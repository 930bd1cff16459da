//! Where a model folder comes from: a local diffusers-format folder, or a Hugging Face repo id
//! (`org/name`, optionally `@revision`) found in the local Hugging Face cache, laid out as
//! `huggingface_hub` writes it: `<cache>/models--org--name/refs/<revision>` holds a commit hash,
//! `<cache>/models--org--name/snapshots/<commit>/` the files. The cache is `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. Nothing is downloaded unless the crate is built
//! with the opt-in feature `hub`: then a repo missing from the cache is fetched into it (only the
//! files a pipeline needs, see [`pipeline_files`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

fn not_found(path: PathBuf, what: &str) -> Error {
    Error::Io { path, source: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()) }
}

/// The Hugging Face hub cache directory from the environment.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("huggingface").join("hub"))
}

/// Resolves `repo` (`org/name` or `org/name@revision`) inside `cache`.
pub fn resolve_in_cache(cache: &Path, repo: &str) -> Result<PathBuf> {
    let (id, revision) = repo.split_once('@').unwrap_or((repo, "main"));
    let root = cache.join(format!("models--{}", id.replace('/', "--")));
    if !root.is_dir() {
        return Err(not_found(
            root,
            "model not in the Hugging Face cache (download it with huggingface-cli, or pass a folder)",
        ));
    }
    let snapshots = root.join("snapshots");
    // A revision may be a commit hash already.
    if snapshots.join(revision).is_dir() {
        return Ok(snapshots.join(revision));
    }
    let reference = root.join("refs").join(revision);
    let commit = std::fs::read_to_string(&reference).map_err(|source| Error::Io { path: reference.clone(), source })?;
    let dir = snapshots.join(commit.trim());
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(not_found(dir, "snapshot named by the ref is missing"))
    }
}

/// A local folder if `spec` is one; otherwise a repo id looked up in the Hugging Face cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let looks_like_repo = spec.split('@').next().is_some_and(|id| id.matches('/').count() == 1)
        && !spec.starts_with('.')
        && !spec.starts_with('/');
    if !looks_like_repo {
        return Err(not_found(path.to_path_buf(), "no such model folder"));
    }
    let cache = hf_cache_dir().ok_or_else(|| not_found(PathBuf::from("$HF_HOME"), "no Hugging Face cache"))?;
    match resolve_in_cache(&cache, spec) {
        #[cfg(feature = "hub")]
        Err(_) => download_model(spec),
        found => found,
    }
}

const COMPONENTS: [&str; 7] =
    ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"];

/// The files of a diffusers repository (listed as repo-relative paths) that [`crate::pipeline`]
/// reads: `model_index.json`, every JSON / text file of the pipeline's component folders, and per
/// component the weights [`weight_files`] would choose (full precision before the fp16 variant,
/// a single file before shards).
pub fn pipeline_files(files: &[String]) -> Vec<String> {
    let has = |f: &str| files.iter().any(|x| x == f);
    let mut out = vec!["model_index.json".to_string()];
    for comp in COMPONENTS {
        let prefix = format!("{comp}/");
        let in_comp: Vec<&String> =
            files.iter().filter(|f| f.strip_prefix(&prefix).is_some_and(|rest| !rest.contains('/'))).collect();
        out.extend(
            in_comp.iter().filter(|f| f.ends_with(".json") && !f.contains(".safetensors")).map(|f| f.to_string()),
        );
        out.extend(in_comp.iter().filter(|f| f.ends_with(".txt")).map(|f| f.to_string()));
        let stem = if comp.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
        'variants: for variant in ["", ".fp16"] {
            let single = format!("{comp}/{stem}{variant}.safetensors");
            if has(&single) {
                out.push(single);
                break 'variants;
            }
            let index = format!("{comp}/{stem}{variant}.safetensors.index.json");
            if has(&index) {
                // diffusers names shards `<stem>[.fp16]-00001-of-00002.safetensors`.
                let shard_prefix = format!("{comp}/{stem}{variant}-");
                out.push(index);
                out.extend(
                    in_comp
                        .iter()
                        .filter(|f| f.starts_with(&shard_prefix) && f.ends_with(".safetensors") && f.contains("-of-"))
                        .map(|f| f.to_string()),
                );
                break 'variants;
            }
        }
    }
    out
}

/// Downloads the files of `org/name[@revision]` that a pipeline needs into the Hugging Face cache
/// and returns the snapshot folder (feature `hub`; honours `HF_HOME` / `HF_TOKEN` like
/// `huggingface_hub`).
#[cfg(feature = "hub")]
pub fn download_model(spec: &str) -> Result<PathBuf> {
    let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let err = |e: hf_hub::api::sync::ApiError| Error::Download { repo: spec.to_string(), message: e.to_string() };
    let api = hf_hub::api::sync::ApiBuilder::from_env().build().map_err(err)?;
    let repo = api.repo(hf_hub::Repo::with_revision(id.to_string(), hf_hub::RepoType::Model, revision.to_string()));
    let listing: Vec<String> = repo.info().map_err(err)?.siblings.into_iter().map(|s| s.rfilename).collect();
    if !listing.iter().any(|f| f == "model_index.json") {
        return Err(Error::Download {
            repo: spec.to_string(),
            message: "not a diffusers pipeline (no model_index.json)".into(),
        });
    }
    let mut root = None;
    for file in pipeline_files(&listing) {
        let local = repo.get(&file).map_err(err)?;
        if file == "model_index.json" {
            root = local.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| Error::Download { repo: spec.to_string(), message: "no snapshot folder".into() })
}

/// The safetensors files of one component, full precision first: `<stem>.safetensors`, else the
/// shards listed in `<stem>.safetensors.index.json`, else the same two for the `fp16` variant
/// (`<stem>.fp16.safetensors`, what `variant="fp16"` downloads). Errors name the expected file.
pub fn weight_files(folder: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for variant in ["", ".fp16"] {
        let single = folder.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = folder.join(format!("{stem}{variant}.safetensors.index.json"));
        if index.is_file() {
            let v: serde_json::Value = crate::config::read_json(&index)?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                Error::config(&index, "weight_map", "expected an object of tensor name -> shard file")
            })?;
            let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| folder.join(f)).collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
    }
    Err(not_found(folder.join(format!("{stem}.safetensors")), "missing weights (also looked for .fp16 and sharded)"))
}

/// The largest safetensors header read (the format's own readers refuse above 100 MB).
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Checks a safetensors file before its tensors are mapped, so that a damaged or hostile file
/// is an error naming the file and the tensor instead of a crash or a silent conversion: the
/// header's length and JSON; each tensor's dtype (floating point; integers only for
/// `position_ids` buffers, which transformers saves), shape and byte range (inside the file, as
/// long as dtype and shape say, no two overlapping). Reads only the header.
pub fn check_safetensors(path: &Path) -> Result<()> {
    use std::io::Read;
    let bad = |msg: String| Error::Input(format!("{}: not a usable safetensors file: {msg}", path.display()));
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(bad(format!("{len} bytes, too short for the header length")));
    }
    f.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_SAFETENSORS_HEADER || n > len - 8 {
        return Err(bad(format!("a header of {n} bytes in a file of {len} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("the header is not JSON ({e})")))?;
    let map = v.as_object().ok_or_else(|| bad("the header is not a JSON object".into()))?;
    let data_len = len - 8 - n;
    let mut ranges = Vec::new();
    for (name, t) in map {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| t.get(k).ok_or_else(|| bad(format!("tensor {name}: no {k}")));
        let dtype = field("dtype")?.as_str().ok_or_else(|| bad(format!("tensor {name}: dtype is not a string")))?;
        let size: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => return Err(bad(format!("tensor {name}: unknown dtype {other:?}"))),
        };
        let float = matches!(dtype, "F64" | "F32" | "F16" | "BF16");
        if !float && !name.ends_with("position_ids") {
            return Err(bad(format!(
                "tensor {name} is {dtype}: model weights must be floating point (F32, F16, BF16 or F64)"
            )));
        }
        let shape = field("shape")?.as_array().ok_or_else(|| bad(format!("tensor {name}: shape is not a list")))?;
        let mut count: u64 = 1;
        for d in shape {
            let d = d.as_u64().ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} is not a list of sizes")))?;
            count = count.checked_mul(d).ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} overflows")))?;
        }
        let offsets = field("data_offsets")?.as_array().filter(|o| o.len() == 2);
        let (b, e) = match offsets.map(|o| (o[0].as_u64(), o[1].as_u64())) {
            Some((Some(b), Some(e))) if b <= e => (b, e),
            _ => return Err(bad(format!("tensor {name}: data_offsets is not [begin, end]"))),
        };
        if count.checked_mul(size) != Some(e - b) {
            return Err(bad(format!(
                "tensor {name}: {dtype} of shape {shape:?} needs {} bytes, its data_offsets give {}",
                count.saturating_mul(size),
                e - b
            )));
        }
        if e > data_len {
            return Err(bad(format!(
                "tensor {name}: bytes [{b}, {e}) run past the end of the data ({data_len} bytes)"
            )));
        }
        ranges.push((b, e, name.as_str()));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("tensors {} and {} overlap", w[0].2, w[1].2)));
        }
    }
    Ok(())
}

/// Memory-maps `files` into a `VarBuilder` (tensors converted to `dtype` on `device`), after
/// [`check_safetensors`] on each.
pub fn mmap_weights(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for f in files {
        check_safetensors(f)?;
    }
    // SAFETY: the files are mapped read-only and must not be modified while the model lives (as
    // with any memory-mapped checkpoint).
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|source| Error::Weights { path: files[0].clone(), source })
}

/// Names the weights file in a tensor error raised while building a model from it.
pub fn in_weights(e: Error, files: &[PathBuf]) -> Error {
    match e {
        Error::Candle(source) => Error::Weights { path: files[0].clone(), source },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshot_through_ref_and_names_missing_paths() {
        let tmp = std::env::temp_dir().join(format!("ipr-hf-cache-{}", std::process::id()));
        let root = tmp.join("models--org--tiny");
        std::fs::create_dir_all(root.join("snapshots").join("abc123")).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs").join("main"), "abc123\n").unwrap();
        assert_eq!(resolve_in_cache(&tmp, "org/tiny").unwrap(), root.join("snapshots").join("abc123"));
        assert_eq!(resolve_in_cache(&tmp, "org/tiny@abc123").unwrap(), root.join("snapshots").join("abc123"));
        let msg = resolve_in_cache(&tmp, "org/other").unwrap_err().to_string();
        assert!(msg.contains("models--org--other"), "{msg}");
        let msg = resolve_in_cache(&tmp, "org/tiny@v2").unwrap_err().to_string();
        assert!(msg.contains("refs"), "{msg}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn pipeline_files_pick_configs_tokenizers_and_the_best_weights() {
        let listing: Vec<String> = [
            "model_index.json",
            "README.md",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.fp16-00001-of-00001.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "scheduler/scheduler_config.json",
            "safety_checker/model.safetensors",
            "vae_1_0/diffusion_pytorch_model.safetensors",
        ]
        .map(String::from)
        .to_vec();
        let mut got = pipeline_files(&listing);
        got.sort();
        let fp16_shards: Vec<String> = [
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors.index.json",
            "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(pipeline_files(&fp16_shards)[1..], fp16_shards[..]);
        let mut want: Vec<String> = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
        .map(String::from)
        .to_vec();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn weight_files_prefer_full_precision_then_fp16_then_shards() {
        let tmp = std::env::temp_dir().join(format!("ipr-weights-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let msg = weight_files(&tmp, "model").unwrap_err().to_string();
        assert!(msg.contains("model.safetensors"), "{msg}");
        std::fs::write(tmp.join("model.fp16.safetensors"), b"").unwrap();
        assert_eq!(weight_files(&tmp, "model").unwrap(), vec![tmp.join("model.fp16.safetensors")]);
        let index = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
        std::fs::write(tmp.join("model.safetensors.index.json"), index).unwrap();
        assert_eq!(
            weight_files(&tmp, "model").unwrap(),
            vec![tmp.join("m-1.safetensors"), tmp.join("m-2.safetensors")]
        );
        std::fs::write(tmp.join("model.safetensors"), b"").unwrap();
        assert_eq!(weight_files(&tmp, "model").unwrap(), vec![tmp.join("model.safetensors")]);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
