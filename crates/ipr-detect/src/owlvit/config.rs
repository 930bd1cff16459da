//! `config.json` of an `OwlViTForObjectDetection` checkpoint (Minderer et al. 2022, "Simple
//! Open-Vocabulary Object Detection with Vision Transformers"; transformers' `OwlViTConfig`).
//!
//! The text tower is a CLIP text transformer, so its config is ipr-diffusion's
//! [`ClipTextConfig`]; the vision tower is this crate's [`ClipVisionConfig`].

use std::path::Path;

use ipr_diffusion::config::ClipTextConfig;
use serde_json::Value;

use crate::clip_vision::ClipVisionConfig;
use crate::model_error::{read_json, ModelError, Result};

/// OWL-ViT (v1) or OWLv2 (Minderer et al. 2023, "Scaling Open-Vocabulary Object Detection"):
/// same towers and heads, plus an objectness head and a different image processor in v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwlVersion {
    V1,
    V2,
}

impl OwlVersion {
    /// The checkpoint's prefix of the CLIP part (`owlvit.` / `owlv2.`).
    pub fn prefix(self) -> &'static str {
        match self {
            OwlVersion::V1 => "owlvit",
            OwlVersion::V2 => "owlv2",
        }
    }
}

/// The parts of `OwlViTConfig` / `Owlv2Config` the detector uses.
#[derive(Debug, Clone)]
pub struct OwlVitConfig {
    pub version: OwlVersion,
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    /// Width of the projected text embeddings; OWL-ViT's class head needs it equal to the text
    /// width (`class_head.dense0` maps image features to `text_config.hidden_size`).
    pub projection_dim: usize,
}

/// Reads `v[key]` over `defaults`: older checkpoints store only the keys that differ from
/// transformers' defaults, so a missing key takes transformers' default for that model type.
pub(crate) fn sub_config<T: serde::de::DeserializeOwned>(
    v: &Value,
    path: &Path,
    key: &str,
    defaults: Value,
) -> Result<T> {
    let sub = v.get(key).ok_or_else(|| ModelError::config(path, key, "missing"))?;
    let mut merged = defaults;
    match (sub, merged.as_object_mut()) {
        (Value::Object(given), Some(m)) => {
            for (k, val) in given {
                m.insert(k.clone(), val.clone());
            }
        }
        _ => return Err(ModelError::config(path, key, format!("expected an object, found {sub}"))),
    }
    serde_json::from_value(merged).map_err(|e| ModelError::config(path, key, e.to_string()))
}

/// transformers' `CLIPVisionConfig` / `OwlViTVisionConfig` defaults (they differ in image size).
pub(crate) fn vision_defaults(image_size: usize) -> Value {
    serde_json::json!({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": image_size, "patch_size": 32})
}

pub(crate) fn check_text(c: &ClipTextConfig, path: &Path) -> Result<()> {
    if c.hidden_act != "quick_gelu" && c.hidden_act != "gelu" {
        return Err(ModelError::config(path, "text_config.hidden_act", format!("unsupported {:?}", c.hidden_act)));
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(ModelError::config(path, "text_config.num_attention_heads", "must divide hidden_size"));
    }
    Ok(())
}

pub(crate) fn check_vision(c: &ClipVisionConfig, path: &Path) -> Result<()> {
    if c.hidden_act != "quick_gelu" && c.hidden_act != "gelu" {
        return Err(ModelError::config(path, "vision_config.hidden_act", format!("unsupported {:?}", c.hidden_act)));
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(ModelError::config(path, "vision_config.num_attention_heads", "must divide hidden_size"));
    }
    if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
        return Err(ModelError::config(path, "vision_config.patch_size", "must divide image_size"));
    }
    Ok(())
}

impl OwlVitConfig {
    /// Reads and checks `config.json`; errors name the file and key.
    pub fn load(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_value(&v, path)
    }

    pub(crate) fn from_value(v: &Value, path: &Path) -> Result<Self> {
        let version = match v.get("model_type").and_then(Value::as_str) {
            Some("owlvit") => OwlVersion::V1,
            Some("owlv2") => OwlVersion::V2,
            other => {
                return Err(ModelError::config(
                    path,
                    "model_type",
                    format!(
                        "expected \"owlvit\" or \"owlv2\" (an OwlViT/Owlv2ForObjectDetection folder), found {other:?}"
                    ),
                ));
            }
        };
        // OwlViTTextConfig's defaults where they differ from CLIP's: 16 positions.
        let text_defaults = serde_json::json!({"max_position_embeddings": 16});
        let mut text_config: ClipTextConfig = sub_config(v, path, "text_config", text_defaults)?;
        // OWL-ViT always pools the text at argmax(input_ids); ipr-diffusion's CLIP text model does
        // so for the legacy eos_token_id 2.
        text_config.eos_token_id = 2;
        let mut vdefaults = vision_defaults(768);
        if version == OwlVersion::V2 {
            vdefaults["patch_size"] = 16.into(); // Owlv2VisionConfig: 768 px, patch 16
        }
        let vision_config: ClipVisionConfig = sub_config(v, path, "vision_config", vdefaults)?;
        check_text(&text_config, path)?;
        check_vision(&vision_config, path)?;
        let projection_dim = v.get("projection_dim").and_then(Value::as_u64).unwrap_or(512) as usize;
        if projection_dim != text_config.hidden_size {
            return Err(ModelError::config(
                path,
                "projection_dim",
                format!("{projection_dim} differs from text_config.hidden_size {}", text_config.hidden_size),
            ));
        }
        Ok(Self { version, text_config, vision_config, projection_dim })
    }

    /// google/owlvit-base-patch32's shape (ViT-B/32 at 768 px, 512-wide text), for benchmarks.
    pub fn base_patch32() -> Self {
        let v = serde_json::json!({
            "model_type": "owlvit",
            "projection_dim": 512,
            "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 16,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407},
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "image_size": 768, "patch_size": 32, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5}
        });
        Self::from_value(&v, Path::new("<owlvit-base-patch32>")).expect("built-in config is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_configs_take_transformers_defaults() {
        let v = serde_json::json!({"model_type": "owlvit", "text_config": {}, "vision_config": {}});
        let c = OwlVitConfig::from_value(&v, Path::new("config.json")).unwrap();
        let full = OwlVitConfig::base_patch32();
        assert_eq!(c.text_config.max_position_embeddings, 16);
        assert_eq!((c.vision_config.image_size, c.vision_config.patch_size), (768, 32));
        assert_eq!(c.vision_config.hidden_size, full.vision_config.hidden_size);
        assert_eq!(c.projection_dim, 512);
    }

    #[test]
    fn wrong_model_types_name_the_key() {
        for (mt, needle) in [("owl", "\"owl\""), ("clip", "\"clip\"")] {
            let v = serde_json::json!({"model_type": mt, "text_config": {}, "vision_config": {}});
            let e = OwlVitConfig::from_value(&v, Path::new("m/config.json")).unwrap_err().to_string();
            assert!(e.contains("m/config.json") && e.contains("model_type") && e.contains(needle), "{e}");
        }
        let v = serde_json::json!({"model_type": "owlvit", "text_config": {}, "vision_config": {"patch_size": 33}});
        let e = OwlVitConfig::from_value(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("vision_config.patch_size"), "{e}");
    }
}
