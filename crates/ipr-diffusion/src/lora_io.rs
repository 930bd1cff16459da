//! LoRA adapter files as diffusers and PEFT write and read them (diffusers'
//! `StableDiffusionPipeline.save_lora_weights` / `load_lora_weights`, PEFT's
//! `get_peft_model_state_dict`), and the older layouts `load_lora_weights` still accepts.
//!
//! Written: `pytorch_lora_weights.safetensors` with PEFT keys `unet.<module path>.lora_A.weight`
//! / `.lora_B.weight` (and `text_encoder.` / `text_encoder_2.` likewise), the adapter configs in the
//! safetensors metadata under `lora_adapter_metadata` (diffusers >= 0.33 reads rank, alpha and
//! targets from there, so `alpha != rank` survives the round trip), and `adapter_config.json`
//! (the same configs, per component, for people and for [`load`]).
//!
//! Read: PEFT keys (with or without the adapter name `default`, with PEFT's own
//! `base_model.model.` prefix), diffusers' `lora.down` / `lora.up` keys (also the old attention
//! processor naming `processor.to_q_lora.down`), and kohya keys (`lora_unet_..._to_q.lora_down`,
//! `lora_te_...`, `lora_te1_` / `lora_te2_`) with their `.alpha`. The scale is `alpha / r`, alpha
//! from a `.alpha` tensor or the metadata or `adapter_config.json`; without any, the scale is 1
//! (as diffusers).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraConfig, LoraSet};
use crate::nn::Linear;

/// diffusers' file name.
pub const LORA_WEIGHTS: &str = "pytorch_lora_weights.safetensors";
/// Our copy of the adapter configs.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// The PEFT `LoraConfig` kwargs of one component, as diffusers stores them in the metadata.
fn peft_config(config: &LoraConfig) -> serde_json::Value {
    json!({
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "init_lora_weights": "gaussian",
        "bias": "none",
        "use_dora": false,
    })
}

/// Writes `dir/pytorch_lora_weights.safetensors` and `dir/adapter_config.json` (each atomically:
/// temporary file, then rename).
pub fn save(dir: &Path, set: &LoraSet) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for p in &set.params {
        tensors.insert(format!("{}.lora_A.weight", p.key), p.a.as_tensor().to_device(&Device::Cpu)?.contiguous()?);
        tensors.insert(format!("{}.lora_B.weight", p.key), p.b.as_tensor().to_device(&Device::Cpu)?.contiguous()?);
    }
    let mut meta = serde_json::Map::new();
    let mut configs = serde_json::Map::new();
    for (component, config) in &set.configs {
        let c = peft_config(config);
        for (k, v) in c.as_object().expect("object") {
            meta.insert(format!("{component}.{k}"), v.clone());
        }
        configs.insert(component.clone(), c);
    }
    // One metadata key only: safetensors writes the metadata map in HashMap order, and a second
    // key ("format": "pt", which loaders ignore) would make the file's bytes differ run to run.
    let metadata = HashMap::from([("lora_adapter_metadata".to_string(), serde_json::to_string(&meta).expect("json"))]);
    let path = dir.join(LORA_WEIGHTS);
    ipr_core::fs::write_atomic_with(&path, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.clone(), v)), Some(metadata), tmp)
            .map_err(safetensors_io_error)
    })
    .map_err(|e| io_err(&path, e))?;
    let cpath = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(configs)).expect("json");
    ipr_core::fs::write_atomic_with(&cpath, |tmp| std::fs::write(tmp, text + "\n")).map_err(|e| io_err(&cpath, e))
}

/// A safetensors writer's error as an I/O error, keeping the kind of an underlying one (a full
/// disk stays a full disk).
pub(crate) fn safetensors_io_error(e: safetensors::SafeTensorError) -> std::io::Error {
    match e {
        safetensors::SafeTensorError::IoError(io) => io,
        other => std::io::Error::other(other.to_string()),
    }
}

/// One adapted layer read from a file.
#[derive(Debug, Clone)]
pub struct LoadedLayer {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    /// `None`: no alpha in the file (scale 1).
    pub alpha: Option<f64>,
}

/// The layers of an adapter file, by component (`unet`, `text_encoder`, `text_encoder_2`) and by
/// module path; kohya paths (underscores) are resolved against the model when applied.
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    pub layers: BTreeMap<(String, String), LoadedLayer>,
    /// Where they came from (for errors).
    pub path: PathBuf,
}

/// `(component, module path or kohya name, kind)` of a key; kind is "A", "B" or "alpha".
fn parse_key(key: &str, default_component: &str) -> Option<(String, String, &'static str)> {
    // kohya: lora_unet_<path with _>.lora_down.weight | .lora_up.weight | .alpha
    for (prefix, comp) in [
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (name, kind) = if let Some(n) = rest.strip_suffix(".lora_down.weight") {
                (n, "A")
            } else if let Some(n) = rest.strip_suffix(".lora_up.weight") {
                (n, "B")
            } else if let Some(n) = rest.strip_suffix(".alpha") {
                (n, "alpha")
            } else {
                return None;
            };
            return Some((comp.to_string(), format!("kohya:{name}"), kind));
        }
    }
    let (comp, rest) = if let Some(r) = key.strip_prefix("base_model.model.") {
        (default_component.to_string(), r)
    } else {
        match key.split_once('.') {
            Some((c, r)) if matches!(c, "unet" | "text_encoder" | "text_encoder_2") => (c.to_string(), r),
            _ => (default_component.to_string(), key),
        }
    };
    let suffixes: [(&str, &'static str); 10] = [
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_A.default.weight", "A"),
        (".lora_B.default.weight", "B"),
        (".lora.down.weight", "A"),
        (".lora.up.weight", "B"),
        (".lora_linear_layer.down.weight", "A"),
        (".lora_linear_layer.up.weight", "B"),
        (".alpha", "alpha"),
        (".lora.alpha", "alpha"),
    ];
    // Old attention-processor naming: attn1.processor.to_q_lora.down -> attn1.to_q.lora.down.
    let rest = rest
        .replace(".processor.to_out_lora.", ".to_out.0.lora.")
        .replace(".processor.to_q_lora.", ".to_q.lora.")
        .replace(".processor.to_k_lora.", ".to_k.lora.")
        .replace(".processor.to_v_lora.", ".to_v.lora.");
    for (suffix, kind) in suffixes {
        if let Some(path) = rest.strip_suffix(suffix) {
            return Some((comp, path.to_string(), kind));
        }
    }
    None
}

fn read_metadata_alphas(bytes: &[u8]) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    if let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(bytes) {
        if let Some(raw) = meta.metadata().as_ref().and_then(|m| m.get("lora_adapter_metadata")) {
            if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(raw) {
                for (k, v) in m {
                    if let (Some(comp), Some(a)) = (k.strip_suffix(".lora_alpha"), v.as_f64()) {
                        out.insert(comp.to_string(), a);
                    }
                }
            }
        }
    }
    out
}

/// A, B and alpha of one layer as they are found in a file.
type Parts = (Option<Tensor>, Option<Tensor>, Option<f64>);

/// Reads an adapter: a safetensors file, or a folder holding `pytorch_lora_weights.safetensors`
/// (or PEFT's `adapter_model.safetensors`, whose keys belong to `default_component`).
pub fn load(path: &Path, default_component: &str) -> Result<LoraWeights> {
    let file = if path.is_dir() {
        [LORA_WEIGHTS, "adapter_model.safetensors"].iter().map(|n| path.join(n)).find(|p| p.is_file()).ok_or_else(
            || {
                io_err(
                    &path.join(LORA_WEIGHTS),
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no LoRA weights file in the folder"),
                )
            },
        )?
    } else {
        path.to_path_buf()
    };
    crate::source::check_safetensors(&file)?;
    let bytes = std::fs::read(&file).map_err(|e| io_err(&file, e))?;
    let mut comp_alpha = read_metadata_alphas(&bytes);
    // adapter_config.json next to the weights: ours (per component) or PEFT's (one config).
    if let Some(dir) = file.parent() {
        let c = dir.join(ADAPTER_CONFIG);
        if c.is_file() {
            let v: serde_json::Value = crate::config::read_json(&c)?;
            if let Some(a) = v.get("lora_alpha").and_then(|a| a.as_f64()) {
                comp_alpha.entry(default_component.to_string()).or_insert(a);
            } else if let Some(m) = v.as_object() {
                for (comp, cfg) in m {
                    if let Some(a) = cfg.get("lora_alpha").and_then(|a| a.as_f64()) {
                        comp_alpha.entry(comp.clone()).or_insert(a);
                    }
                }
            }
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|source| Error::Weights { path: file.clone(), source })?;
    let mut parts: BTreeMap<(String, String), Parts> = BTreeMap::new();
    for (key, t) in tensors {
        let Some((comp, p, kind)) = parse_key(&key, default_component) else {
            return Err(Error::Input(format!("{}: tensor {key:?} is not a LoRA weight", file.display())));
        };
        let e = parts.entry((comp, p)).or_default();
        match kind {
            "A" => e.0 = Some(t.to_dtype(DType::F32)?),
            "B" => e.1 = Some(t.to_dtype(DType::F32)?),
            _ => e.2 = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]),
        }
    }
    let mut layers = BTreeMap::new();
    for ((comp, p), (a, b, alpha)) in parts {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::Input(format!("{}: {comp}.{p} lacks its down (A) or up (B) matrix", file.display())));
        };
        let (a, b) = (squeeze_conv(a)?, squeeze_conv(b)?);
        let alpha = alpha.or_else(|| comp_alpha.get(&comp).copied());
        layers.insert((comp, p), LoadedLayer { a, b, alpha });
    }
    Ok(LoraWeights { layers, path: file })
}

/// kohya stores linear LoRA of 1x1-conv layers as `(r, in, 1, 1)`: drop the trailing unit dims.
fn squeeze_conv(t: Tensor) -> Result<Tensor> {
    if t.rank() == 4 {
        let (o, i, _, _) = t.dims4()?;
        return Ok(t.reshape((o, i))?);
    }
    Ok(t)
}

impl LoraWeights {
    /// Attaches the `component` layers of this file to `linears` (adapters made trainable, so a
    /// loaded adapter can be trained further). Errors on a layer of the file that the model lacks
    /// or whose shape differs; returns the attached set.
    pub fn apply(&self, linears: Vec<&mut Linear>, component: &str) -> Result<LoraSet> {
        let mut by_path: HashMap<String, &mut Linear> = HashMap::new();
        let mut kohya: HashMap<String, String> = HashMap::new();
        for l in linears {
            kohya.insert(l.path.replace('.', "_"), l.path.clone());
            by_path.insert(l.path.clone(), l);
        }
        let mut set = LoraSet::default();
        let mut rank = 0;
        let mut alpha = None;
        let mut targets = Vec::new();
        for ((comp, p), layer) in &self.layers {
            if comp != component {
                continue;
            }
            let mut path = match p.strip_prefix("kohya:") {
                Some(k) => kohya.get(k).cloned().unwrap_or_else(|| p.clone()),
                None => p.clone(),
            };
            // transformers 5 names CLIP text modules without `text_model.` (PEFT files made with it
            // lack the prefix); transformers 4 and real repositories have it. Accept both.
            if !by_path.contains_key(&path) && component.starts_with("text_encoder") {
                let alt = format!("text_model.{path}");
                if by_path.contains_key(&alt) {
                    path = alt;
                }
            }
            let lin = by_path.get_mut(&path).ok_or_else(|| {
                Error::Input(format!("{}: the model has no layer {component}.{path}", self.path.display()))
            })?;
            let r = layer.a.dim(0)?;
            if layer.a.dims() != [r, lin.in_features()] || layer.b.dims() != [lin.out_features(), r] {
                return Err(Error::Input(format!(
                    "{}: {component}.{path}: A {:?} / B {:?} do not fit a ({}, {}) layer",
                    self.path.display(),
                    layer.a.dims(),
                    layer.b.dims(),
                    lin.out_features(),
                    lin.in_features()
                )));
            }
            let scale = layer.alpha.map(|a| a / r as f64).unwrap_or(1.0);
            let device = lin.weight.device().clone();
            let adapter =
                LoraAdapter::from_tensors(&layer.a.to_device(&device)?, &layer.b.to_device(&device)?, scale, 0.0, 0)?;
            set.params.push(crate::lora::LoraParam {
                key: format!("{component}.{path}"),
                a: adapter.a.clone(),
                b: adapter.b.clone(),
            });
            lin.lora = Some(adapter);
            rank = r;
            alpha = Some(layer.alpha.unwrap_or(r as f64));
            targets.push(path);
        }
        if !set.params.is_empty() {
            let config = LoraConfig { rank, alpha: alpha.unwrap_or(rank as f64), dropout: 0.0, targets };
            set.configs.push((component.to_string(), config));
        }
        Ok(set)
    }

    /// Components present in the file.
    pub fn components(&self) -> Vec<String> {
        let mut c: Vec<String> = self.layers.keys().map(|(c, _)| c.clone()).collect();
        c.dedup();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_layout_parse() {
        let cases = [
            ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", "unet", "A"),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight", "text_encoder", "B"),
            (
                "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.default.weight",
                "unet",
                "A",
            ),
            ("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora.up.weight", "unet", "B"),
            ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora.down.weight", "unet", "A"),
        ];
        for (k, comp, kind) in cases {
            let (c, _, kd) = parse_key(k, "unet").unwrap();
            assert_eq!((c.as_str(), kd), (comp, kind), "{k}");
        }
        let (_, p, _) = parse_key(
            "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
            "unet",
        )
        .unwrap();
        assert_eq!(p, "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0");
        let (c, p, kd) = parse_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha", "unet").unwrap();
        assert_eq!(
            (c.as_str(), p.as_str(), kd),
            ("text_encoder", "kohya:text_model_encoder_layers_0_self_attn_q_proj", "alpha")
        );
    }
}
