//! `run.toml`: the one typed, validated configuration of a run.
//!
//! Every key has a default (the toy demo's), unknown keys are errors, and values are checked
//! before any work starts; errors name the key. A run directory keeps the fully resolved
//! config, so `--resume` can check that it continues the same experiment.

pub use ipr_core::method::Method;
use ipr_core::relabel::{RelabelPolicy, Weights};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name: the run lives in `<runs_dir>/<name>/`.
    pub name: String,
    pub runs_dir: PathBuf,
    pub method: Method,
    /// IPR rounds after the base evaluation.
    pub rounds: u32,
    /// Seed of everything: prompts order, sampling noise, training.
    pub seed: u64,
    pub model: ModelConfig,
    pub prompts: PromptsConfig,
    pub sampling: SamplingConfig,
    pub detector: DetectorConfig,
    pub relabel: RelabelConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// "toy" (the shipped base model) or a diffusers-format folder.
    pub source: String,
    /// "cpu" or "cuda".
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptsConfig {
    /// Use at most N training prompts, evenly spaced through the list (0: all).
    pub max_train: u32,
    /// Use at most N evaluation prompts of each split, evenly spaced (0: all).
    pub max_eval: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Images drawn per training prompt and round.
    pub images_per_prompt: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    /// "ddim" or "euler".
    pub scheduler: String,
    pub batch_size: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// "toy" (exact) or "owlvit".
    pub kind: String,
    /// Score threshold (OWL-ViT; VISOR uses 0.1).
    pub threshold: f64,
    /// Model folder for learned detectors.
    pub model: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelabelConfig {
    pub policy: RelabelPolicy,
    pub weights: Weights,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub lora_rank: u32,
    pub lora_alpha: f64,
    /// Optimiser steps per round.
    pub steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub warmup_steps: u32,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Also train adapters (same rank and alpha) on the text encoder(s)' attention projections, as
    /// the paper does for SDXL.
    pub text_encoder_lora: bool,
    /// Module-path patterns of the UNet layers that get adapters (PEFT's `target_modules`). The
    /// demo's default adds the transformer blocks' feed-forward layers to PEFT's attention
    /// projections: measured on the toy world, it is what made the held-out gain transfer
    /// (README, "The held-out sweep").
    pub lora_targets: Vec<String>,
    /// min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off (plain MSE).
    pub min_snr_gamma: f64,
    /// Train only on timesteps in `[lo, hi)`; unset = every timestep of the scheduler.
    pub timestep_range: Option<[u32; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Images per evaluation prompt (VISOR uses 4).
    pub images_per_prompt: u32,
    /// Fixed seed of the evaluation noise, the same for every round so rounds compare.
    pub seed: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: "toy".into(),
            runs_dir: "runs".into(),
            method: Method::Ipr,
            rounds: 2,
            seed: 0,
            model: ModelConfig::default(),
            prompts: PromptsConfig::default(),
            sampling: SamplingConfig::default(),
            detector: DetectorConfig::default(),
            relabel: RelabelConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { source: "toy".into(), device: "cpu".into() }
    }
}

impl Default for PromptsConfig {
    /// The demo: every training prompt; 56 evaluation prompts per split (all 56 held-out ones,
    /// every third of the 168 seen ones), to keep `ipr run` within minutes on 2 cores.
    fn default() -> Self {
        PromptsConfig { max_train: 0, max_eval: 56 }
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            images_per_prompt: 4,
            // The toy base model's sampler setting (README: 20 steps start nearer the cosine
            // schedule's zero-SNR end and score lower).
            steps: 10,
            guidance_scale: 4.0,
            scheduler: "ddim".into(),
            batch_size: 64,
        }
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig { kind: "toy".into(), threshold: 0.1, model: None }
    }
}

impl Default for RelabelConfig {
    fn default() -> Self {
        RelabelConfig { policy: RelabelPolicy::Measured, weights: Weights::default() }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lora_rank: 4,
            lora_alpha: 4.0,
            steps: 200,
            batch_size: 32,
            learning_rate: 2e-3,
            warmup_steps: 10,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            text_encoder_lora: false,
            lora_targets: ipr_diffusion::lora::UNET_TARGETS
                .iter()
                .chain(&["ff.net.0.proj", "ff.net.2"])
                .map(|s| s.to_string())
                .collect(),
            min_snr_gamma: 0.0,
            timestep_range: None,
        }
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { images_per_prompt: 4, seed: 1_000_003 }
    }
}

impl RunConfig {
    /// Parse `run.toml` text; unknown keys and wrong types name the key.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, String> {
        let c: RunConfig = toml::from_str(text).map_err(|e| format!("{}: {}", path.display(), e.to_string().trim()))?;
        c.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(c)
    }

    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml(&text, path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Check values that parse but cannot run. The message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive =
            |key: &str, v: u32| if v == 0 { Err(format!("{key} is 0, expected at least 1")) } else { Ok(()) };
        let finite_pos = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{key} is {v}, expected a finite number > 0"))
            }
        };
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return Err(format!("name {:?} must be a plain folder name", self.name));
        }
        positive("rounds", self.rounds)?;
        positive("sampling.images_per_prompt", self.sampling.images_per_prompt)?;
        positive("sampling.steps", self.sampling.steps)?;
        positive("sampling.batch_size", self.sampling.batch_size)?;
        if !(self.sampling.guidance_scale.is_finite() && self.sampling.guidance_scale >= 0.0) {
            return Err(format!(
                "sampling.guidance_scale is {}, expected a finite number >= 0",
                self.sampling.guidance_scale
            ));
        }
        if !["ddim", "euler"].contains(&self.sampling.scheduler.as_str()) {
            return Err(format!("sampling.scheduler is {:?}, expected \"ddim\" or \"euler\"", self.sampling.scheduler));
        }
        if !["cpu", "cuda"].contains(&self.model.device.as_str()) {
            return Err(format!("model.device is {:?}, expected \"cpu\" or \"cuda\"", self.model.device));
        }
        if self.model.source != "toy" && !Path::new(&self.model.source).join("model_index.json").is_file() {
            return Err(format!(
                "model.source {:?} is neither \"toy\" nor a diffusers folder (no model_index.json there)",
                self.model.source
            ));
        }
        match self.detector.kind.as_str() {
            "toy" => {}
            "owlvit" => {
                if self.detector.model.as_ref().is_none_or(|m| !m.join("config.json").is_file()) {
                    return Err(
                        "detector.model must be an OWL-ViT folder with config.json when detector.kind = \"owlvit\""
                            .into(),
                    );
                }
            }
            other => return Err(format!("detector.kind is {other:?}, expected \"toy\" or \"owlvit\"")),
        }
        if !(self.detector.threshold.is_finite() && (0.0..1.0).contains(&self.detector.threshold)) {
            return Err(format!("detector.threshold is {}, expected a number in [0, 1)", self.detector.threshold));
        }
        self.relabel.weights.validate().map_err(|e| format!("relabel.{e}"))?;
        positive("train.lora_rank", self.train.lora_rank)?;
        positive("train.steps", self.train.steps)?;
        positive("train.batch_size", self.train.batch_size)?;
        finite_pos("train.lora_alpha", self.train.lora_alpha)?;
        finite_pos("train.learning_rate", self.train.learning_rate)?;
        finite_pos("train.max_grad_norm", self.train.max_grad_norm)?;
        if !(self.train.weight_decay.is_finite() && self.train.weight_decay >= 0.0) {
            return Err(format!("train.weight_decay is {}, expected a finite number >= 0", self.train.weight_decay));
        }
        if self.train.lora_targets.is_empty() || self.train.lora_targets.iter().any(|t| t.is_empty()) {
            return Err("train.lora_targets is empty or has an empty pattern, expected module-path patterns".into());
        }
        if !(self.train.min_snr_gamma.is_finite() && self.train.min_snr_gamma >= 0.0) {
            return Err(format!("train.min_snr_gamma is {}, expected a finite number >= 0", self.train.min_snr_gamma));
        }
        if let Some([lo, hi]) = self.train.timestep_range {
            if lo >= hi {
                return Err(format!("train.timestep_range is [{lo}, {hi}], expected lo < hi"));
            }
        }
        positive("eval.images_per_prompt", self.eval.images_per_prompt)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunConfig, String> {
        RunConfig::from_toml(text, Path::new("run.toml"))
    }

    #[test]
    fn defaults_and_round_trip() {
        let c = parse("").unwrap();
        assert_eq!(c, RunConfig::default());
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        let c = parse("method = \"filter\"\nrounds = 3\n[train]\nsteps = 50\n[relabel]\npolicy = \"paper\"\n").unwrap();
        assert_eq!(
            (c.method, c.rounds, c.train.steps, c.relabel.policy),
            (Method::Filter, 3, 50, RelabelPolicy::Paper)
        );
        assert_eq!(c.train.batch_size, TrainConfig::default().batch_size, "unset keys keep their defaults");
    }

    #[test]
    fn errors_name_the_key() {
        for (text, want) in [
            ("roundz = 2", "unknown field `roundz`"),
            ("[train]\nlr = 0.1", "unknown field `lr`"),
            ("rounds = 0", "rounds is 0"),
            ("rounds = \"two\"", "rounds"),
            ("[train]\nlearning_rate = -1.0", "train.learning_rate is -1"),
            ("[sampling]\nscheduler = \"pndm\"", "sampling.scheduler is \"pndm\""),
            ("[model]\nsource = \"/nonexistent\"", "model.source \"/nonexistent\""),
            ("[relabel.weights]\ncorrect = -1.0", "relabel.weights.correct"),
            ("[relabel]\npolicy = \"best\"", "policy"),
            ("method = \"dpo\"", "method"),
            ("[detector]\nkind = \"owlvit\"", "detector.model"),
            ("name = \"../x\"", "name"),
            ("[train]\ntimestep_range = [900, 100]", "train.timestep_range is [900, 100]"),
            ("[train]\nlora_targets = []", "train.lora_targets"),
            ("[train]\nmin_snr_gamma = -5.0", "train.min_snr_gamma"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with("run.toml: ") && e.contains(want), "{text:?}: {e}");
        }
    }

    /// Every config shipped under `examples/` parses and validates (the README runs them).
    #[test]
    fn example_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut dirs = vec![root];
        let mut seen = 0;
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    RunConfig::read(&path).unwrap();
                    seen += 1;
                }
            }
        }
        assert!(seen >= 3, "found {seen} example configs");
    }
}
