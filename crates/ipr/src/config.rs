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
    /// The `ddpo` method's settings (unused by the others).
    pub ddpo: DdpoConfig,
}

/// DDPO (Black et al. 2023) in the same harness: the same samples per round as the other methods,
/// drawn with DDIM at `eta > 0`; LoRA rank, targets, weight decay and clipping from `[train]`.
/// Defaults are ddpo-pytorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DdpoConfig {
    /// DDIM noise of the sampled chains (1.0: DDPM-like).
    pub eta: f64,
    /// PPO's importance-ratio clip.
    pub clip_range: f64,
    /// Advantages are clipped to `[-adv_clip_max, adv_clip_max]`.
    pub adv_clip_max: f64,
    /// Trajectories per optimiser step.
    pub batch_size: u32,
    /// Passes over each round's trajectories.
    pub epochs: u32,
    pub learning_rate: f64,
    /// "visor" (both objects found and the relation holds, as the evaluation counts) or "strict"
    /// (IPR's judge: exactly one box of each).
    pub reward: ipr_core::method::Reward,
}

impl Default for DdpoConfig {
    /// The library's defaults (ddpo-pytorch's).
    fn default() -> Self {
        let d = ipr_diffusion::train::ddpo::DdpoConfig::default();
        DdpoConfig {
            eta: d.eta,
            clip_range: d.clip_range,
            adv_clip_max: d.adv_clip_max,
            batch_size: d.batch_size as u32,
            epochs: d.epochs as u32,
            learning_rate: d.learning_rate,
            reward: ipr_core::method::Reward::Visor,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// "toy" (the shipped base model), a diffusers-format folder, or a Hugging Face repo id
    /// found in the local cache (`stabilityai/stable-diffusion-2-1`).
    pub source: String,
    /// "cpu" or "cuda".
    pub device: String,
    /// Weights and activations: "f32", "bf16" or "f16"; unset = f32 on the CPU, bf16 on CUDA.
    /// LoRA adapters, gradients, optimiser state and the sampler's latents stay f32.
    pub dtype: Option<String>,
    /// The VAE's own precision (unset = `dtype`): SDXL's original VAE overflows in f16, so
    /// `vae_dtype = "f32"` keeps it exact while the UNet runs in half precision.
    pub vae_dtype: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptsConfig {
    /// "toy" (the shapes world's split) or "sr2d" (VISOR's SR2D over COCO-80, its pairs split
    /// by `split_seed`); unset = "toy" for `model.source = "toy"`, "sr2d" for any other (a toy
    /// model in a folder, from `ipr toy init` or `ipr toy export`, needs `set = "toy"`).
    pub set: Option<PromptSetName>,
    /// SR2D: the seed of the pair split (training / validation / held-out).
    pub split_seed: u64,
    /// SR2D: fraction of the 3,160 unordered pairs held out for choosing settings.
    pub validation_fraction: f64,
    /// SR2D: fraction of the pairs held out for reporting (never sampled in training).
    pub heldout_fraction: f64,
    /// SR2D training prompts: "pairs" (every spatial prompt of the training pairs) or
    /// "ipr-paper" (exactly the public code's 100 prompt ids; their pairs are kept out of the
    /// validation and held-out pairs).
    pub train: TrainPrompts,
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
    /// "ddim", "euler" or "dpmsolver++" (diffusers' DPMSolverMultistepScheduler, 2nd order).
    pub scheduler: String,
    pub batch_size: u32,
    /// Image size in pixels; unset = the model's native size (`unet.sample_size` times the
    /// VAE's factor). Must be a multiple of the model's factor (VAE x UNet downsampling).
    pub height: Option<u32>,
    pub width: Option<u32>,
    /// The negative prompt of every image (unset: the pipeline's default, "" or SDXL's zeros).
    pub negative_prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// "toy" (exact), "owlvit" or "owlv2".
    pub kind: String,
    /// Score threshold (OWL-ViT; VISOR uses 0.1).
    pub threshold: f64,
    /// Model folder for learned detectors.
    pub model: Option<PathBuf>,
    /// The text query of a class for learned detectors; `{}` is the class name.
    pub query: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelabelConfig {
    pub policy: RelabelPolicy,
    pub weights: Weights,
    /// What `ipr` (and `pr`) train on for a location error: "relabel" (the paper), "original"
    /// (the original prompt, feedback weight), "both" (the two rows) or "drop".
    pub location: ipr_core::method::Treatment,
    /// ... and for a count error: "relabel", "original" (the default), "original-if-visor" (the
    /// original prompt when VISOR counts the image right: the right pair, an extra object),
    /// "both" or "drop".
    pub count: ipr_core::method::Treatment,
}

impl RelabelConfig {
    pub fn treatments(&self) -> ipr_core::method::Treatments {
        ipr_core::method::Treatments { location: self.location, count: self.count }
    }
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
    /// CPU: each micro-batch is cut into this many pieces whose passes run in parallel, their
    /// gradients summed in order. Under `mpirun` the pieces are spread over the ranks (a multiple
    /// of the number of ranks), so the numbers do not depend on how many processes computed them.
    /// On GPUs each rank computes its slice of the micro-batch whole.
    pub shards: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Images per evaluation prompt (VISOR uses 4).
    pub images_per_prompt: u32,
    /// Fixed seed of the evaluation noise, the same for every round so rounds compare.
    pub seed: u64,
    /// A CLIP model folder (transformers' CLIPModel; the paper used ViT-L/14): adds each
    /// evaluated model's CLIP score against the original prompts.
    pub clip_model: Option<PathBuf>,
    /// The detector that scores the evaluation, apart from the one that judges training
    /// samples. Unset: for SR2D, VISOR's protocol (OWL-ViT from `detector.model`, queries
    /// "a photo of a {}", threshold 0.1); for the toy world, the exact detector.
    pub detector: Option<DetectorConfig>,
}

/// The prompt sets a run can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSetName {
    Toy,
    Sr2d,
}

/// Which SR2D prompts are sampled for training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainPrompts {
    #[serde(rename = "pairs")]
    Pairs,
    #[serde(rename = "ipr-paper")]
    IprPaper,
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
            ddpo: DdpoConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { source: "toy".into(), device: "cpu".into(), dtype: None, vae_dtype: None }
    }
}

impl Default for PromptsConfig {
    /// The demo: every training prompt; 56 evaluation prompts per split (all 56 held-out ones,
    /// every third of the 168 seen ones), to keep `ipr run` within minutes on 2 cores.
    fn default() -> Self {
        PromptsConfig {
            set: None,
            split_seed: 0,
            validation_fraction: 0.1,
            heldout_fraction: 0.1,
            train: TrainPrompts::Pairs,
            max_train: 0,
            max_eval: 56,
        }
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
            height: None,
            width: None,
            negative_prompt: None,
        }
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig { kind: "toy".into(), threshold: 0.1, model: None, query: "a photo of a {}".into() }
    }
}

impl Default for RelabelConfig {
    fn default() -> Self {
        RelabelConfig {
            policy: RelabelPolicy::Measured,
            weights: Weights::default(),
            location: ipr_core::method::Treatment::Relabel,
            // Ours: chosen on the toy world's validation pairs (3 seeds; README, "The toy world");
            // the paper relabels count errors too (`count = "relabel"`).
            count: ipr_core::method::Treatment::Original,
        }
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
            shards: ipr_diffusion::train::DEFAULT_SHARDS as u32,
        }
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { images_per_prompt: 4, seed: 1_000_003, detector: None, clip_model: None }
    }
}

/// The samplers `sampling.scheduler` takes.
pub const SCHEDULERS: [&str; 3] = ["ddim", "euler", "dpmsolver++"];

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(name: &str) -> Result<candle_core::DType, String> {
    match name {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        other => Err(format!("{other:?} is not a dtype, expected \"f32\", \"bf16\" or \"f16\"")),
    }
}

/// `owner/name` that is not an existing path: a Hugging Face repo id, looked up in the local
/// cache when the run starts.
pub fn is_hub_id(source: &str) -> bool {
    let mut parts = source.split('/');
    let ok = |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && !s.starts_with('.'));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none() && !Path::new(source).exists()
}

impl PromptsConfig {
    /// The SR2D pair split's rule.
    pub fn split_rule(&self) -> ipr_core::pair_split::SplitRule {
        ipr_core::pair_split::SplitRule {
            seed: self.split_seed,
            validation: self.validation_fraction,
            heldout: self.heldout_fraction,
        }
    }
}

impl DetectorConfig {
    /// One line for reports: kind, model, threshold and query.
    pub fn describe(&self) -> String {
        match self.kind.as_str() {
            "toy" => "the exact toy detector".into(),
            kind => format!(
                "{kind} {} (score > {}, query {:?})",
                self.model.as_ref().map(|m| m.display().to_string()).unwrap_or_default(),
                self.threshold,
                self.query
            ),
        }
    }

    fn validate(&self, key: &str) -> Result<(), String> {
        match self.kind.as_str() {
            "toy" => {}
            "owlvit" | "owlv2" => {
                let Some(m) = &self.model else {
                    return Err(format!("{key}.model must be set when {key}.kind = {:?}", self.kind));
                };
                if !is_hub_id(&m.to_string_lossy()) && !m.join("config.json").is_file() {
                    return Err(format!(
                        "{key}.model {}: no config.json there (expected an {} folder)",
                        m.display(),
                        if self.kind == "owlv2" { "Owlv2ForObjectDetection" } else { "OwlViTForObjectDetection" }
                    ));
                }
            }
            other => return Err(format!("{key}.kind is {other:?}, expected \"toy\", \"owlvit\" or \"owlv2\"")),
        }
        if !(self.threshold.is_finite() && (0.0..1.0).contains(&self.threshold)) {
            return Err(format!("{key}.threshold is {}, expected a number in [0, 1)", self.threshold));
        }
        if self.query.matches("{}").count() != 1 {
            return Err(format!(
                "{key}.query is {:?}, expected a template with one {{}} for the class name",
                self.query
            ));
        }
        Ok(())
    }
}

impl RunConfig {
    /// The prompt set in force: `prompts.set`, or "toy" for the toy model and "sr2d" otherwise.
    pub fn prompt_set(&self) -> PromptSetName {
        self.prompts.set.unwrap_or(if self.model.source == "toy" { PromptSetName::Toy } else { PromptSetName::Sr2d })
    }

    /// The detector that scores the evaluation: `[eval.detector]`, else VISOR's protocol for SR2D
    /// (the feedback detector's model with VISOR's query and threshold 0.1), else (the toy
    /// world) the exact detector.
    pub fn eval_detector(&self) -> DetectorConfig {
        match (&self.eval.detector, self.prompt_set()) {
            (Some(d), _) => d.clone(),
            (None, PromptSetName::Sr2d) => DetectorConfig {
                kind: self.detector.kind.clone(),
                model: self.detector.model.clone(),
                threshold: ipr_detect::owlvit::detector::VISOR_THRESHOLD,
                query: ipr_detect::owlvit::detector::VISOR_QUERY_TEMPLATE.into(),
            },
            (None, PromptSetName::Toy) => DetectorConfig::default(),
        }
    }

    /// The image size in pixels, `(height, width)`, when `sampling.height` / `width` set it;
    /// a side left unset takes the other's value.
    pub fn image_size(&self) -> Option<(usize, usize)> {
        match (self.sampling.height, self.sampling.width) {
            (None, None) => None,
            (h, w) => {
                let (h, w) = (h.or(w).unwrap() as usize, w.or(h).unwrap() as usize);
                Some((h, w))
            }
        }
    }

    /// The weights' dtype on `device`: `model.dtype`, else f32 on the CPU and bf16 on CUDA.
    pub fn dtype(&self) -> candle_core::DType {
        match &self.model.dtype {
            Some(d) => parse_dtype(d).expect("validated"),
            None if self.model.device == "cpu" => candle_core::DType::F32,
            None => candle_core::DType::BF16,
        }
    }

    /// The VAE's dtype: `model.vae_dtype`, else [`Self::dtype`].
    pub fn vae_dtype(&self) -> candle_core::DType {
        self.model.vae_dtype.as_deref().map(|d| parse_dtype(d).expect("validated")).unwrap_or(self.dtype())
    }

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
        if !SCHEDULERS.contains(&self.sampling.scheduler.as_str()) {
            return Err(format!(
                "sampling.scheduler is {:?}, expected one of {}",
                self.sampling.scheduler,
                quoted(&SCHEDULERS)
            ));
        }
        for (key, v) in [("sampling.height", self.sampling.height), ("sampling.width", self.sampling.width)] {
            if let Some(v) = v {
                if v == 0 || v > 8192 {
                    return Err(format!("{key} is {v}, expected a size in pixels from 1 to 8192"));
                }
            }
        }
        if !["cpu", "cuda"].contains(&self.model.device.as_str())
            && self.model.device.strip_prefix("cuda:").is_none_or(|n| n.parse::<u32>().is_err())
        {
            return Err(format!("model.device is {:?}, expected \"cpu\", \"cuda\" or \"cuda:N\"", self.model.device));
        }
        for (key, v) in [("model.dtype", &self.model.dtype), ("model.vae_dtype", &self.model.vae_dtype)] {
            if let Some(v) = v {
                parse_dtype(v).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        if self.model.source != "toy"
            && !is_hub_id(&self.model.source)
            && !Path::new(&self.model.source).join("model_index.json").is_file()
        {
            return Err(format!(
                "model.source {:?} is neither \"toy\", a diffusers folder (no model_index.json there) nor a \
                     Hugging Face repo id (owner/name)",
                self.model.source
            ));
        }
        self.prompts
            .split_rule()
            .check()
            .map_err(|e| format!("prompts.validation_fraction / prompts.heldout_fraction: {e}"))?;
        self.detector.validate("detector")?;
        if let Some(d) = &self.eval.detector {
            d.validate("eval.detector")?;
        }
        if self.prompt_set() == PromptSetName::Sr2d && self.eval.detector.is_none() && self.detector.kind == "toy" {
            return Err("prompts.set = \"sr2d\" is evaluated with OWL-ViT (VISOR's protocol): set detector.kind = \
                        \"owlvit\" with detector.model, or an [eval.detector]"
                .into());
        }
        if let Some(m) = &self.eval.clip_model {
            if !m.join("config.json").is_file() {
                return Err(format!(
                    "eval.clip_model {}: no config.json there (expected a CLIPModel folder)",
                    m.display()
                ));
            }
        }
        self.relabel.weights.validate().map_err(|e| format!("relabel.{e}"))?;
        positive("train.lora_rank", self.train.lora_rank)?;
        positive("train.steps", self.train.steps)?;
        positive("train.batch_size", self.train.batch_size)?;
        positive("train.shards", self.train.shards)?;
        self.relabel.treatments().validate()?;
        positive("ddpo.batch_size", self.ddpo.batch_size)?;
        positive("ddpo.epochs", self.ddpo.epochs)?;
        finite_pos("ddpo.eta", self.ddpo.eta)?;
        finite_pos("ddpo.clip_range", self.ddpo.clip_range)?;
        finite_pos("ddpo.adv_clip_max", self.ddpo.adv_clip_max)?;
        finite_pos("ddpo.learning_rate", self.ddpo.learning_rate)?;
        if self.method == Method::Ddpo && self.sampling.scheduler != "ddim" {
            return Err(format!(
                "sampling.scheduler is {:?}: the ddpo method samples its chains with DDIM (set \"ddim\")",
                self.sampling.scheduler
            ));
        }
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
            ("[prompts]\nset = \"coco\"", "set"),
            ("[prompts]\ntrain = \"all\"", "train"),
            ("[prompts]\nheldout_fraction = 0.95", "prompts.validation_fraction / prompts.heldout_fraction"),
            ("[model]\ndtype = \"f8\"", "model.dtype: \"f8\" is not a dtype"),
            ("[model]\nvae_dtype = \"int8\"", "model.vae_dtype"),
            ("[model]\ndevice = \"tpu\"", "model.device is \"tpu\""),
            ("[sampling]\nheight = 0", "sampling.height is 0"),
            ("[sampling]\nscheduler = \"unipc\"", "expected one of \"ddim\", \"euler\", \"dpmsolver++\""),
            ("[detector]\nkind = \"glip\"", "detector.kind is \"glip\""),
            ("[detector]\nquery = \"a photo\"", "detector.query"),
            ("[eval.detector]\nkind = \"owlv2\"", "eval.detector.model must be set"),
            ("[eval]\nclip_model = \"/nonexistent\"", "eval.clip_model /nonexistent"),
            ("[prompts]\nset = \"sr2d\"", "prompts.set = \"sr2d\" is evaluated with OWL-ViT"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with("run.toml: ") && e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn real_model_settings_resolve() {
        let c = parse("[model]\nsource = \"stabilityai/stable-diffusion-2-1\"\ndevice = \"cuda\"\n[detector]\nkind = \"owlvit\"\nmodel = \"google/owlvit-base-patch32\"\nthreshold = 0.3\n[sampling]\nheight = 512").unwrap();
        assert_eq!(c.prompt_set(), PromptSetName::Sr2d, "a real model defaults to SR2D");
        assert_eq!((c.dtype(), c.vae_dtype()), (candle_core::DType::BF16, candle_core::DType::BF16));
        assert_eq!(c.image_size(), Some((512, 512)), "an unset side takes the other's value");
        let e = c.eval_detector();
        assert_eq!(
            (e.kind.as_str(), e.threshold, e.query.as_str()),
            ("owlvit", 0.1, "a photo of a {}"),
            "VISOR's protocol"
        );
        assert_eq!(e.model, c.detector.model);
        let toy = RunConfig::default();
        assert_eq!(
            (toy.prompt_set(), toy.dtype(), toy.eval_detector().kind.as_str()),
            (PromptSetName::Toy, candle_core::DType::F32, "toy")
        );
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
