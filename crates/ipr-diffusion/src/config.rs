//! `config.json` files of diffusers-format folders, parsed with serde.
//!
//! Field names and defaults equal those of the reference libraries (diffusers 0.42
//! `UNet2DConditionModel`, `AutoencoderKL`, `DDIMScheduler`, `EulerDiscreteScheduler`,
//! `DPMSolverMultistepScheduler`; transformers 5.x `CLIPTextConfig`), so a folder written by
//! `save_pretrained` loads without surprises. Keys this crate does not implement are accepted only
//! at their default value; any other value is an error that names the file and the key (`validate`).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Reads and parses a JSON file, naming the file in any error; model sizes are checked against
/// [`SIZE_LIMITS`] first.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    parse_json(path, &text)
}

/// [`read_json`] of text already read from `path`.
pub fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    check_sizes(path, &v)?;
    serde_json::from_value(v).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// The largest value a config's size keys may hold: far above any Stable Diffusion, CLIP or
/// OWL-ViT checkpoint, far below what would make building the model allocate without bound.
pub const SIZE_LIMITS: [(&str, u64); 22] = [
    ("in_channels", 1 << 12),
    ("out_channels", 1 << 12),
    ("latent_channels", 1 << 12),
    ("block_out_channels", 1 << 15),
    ("cross_attention_dim", 1 << 15),
    ("hidden_size", 1 << 15),
    ("intermediate_size", 1 << 17),
    ("projection_dim", 1 << 15),
    ("addition_time_embed_dim", 1 << 15),
    ("projection_class_embeddings_input_dim", 1 << 17),
    ("norm_num_groups", 1 << 15),
    ("layers_per_block", 1 << 8),
    ("transformer_layers_per_block", 1 << 8),
    ("num_hidden_layers", 1 << 8),
    ("attention_head_dim", 1 << 12),
    ("num_attention_heads", 1 << 12),
    ("vocab_size", 1 << 22),
    ("max_position_embeddings", 1 << 16),
    ("sample_size", 1 << 14),
    ("image_size", 1 << 14),
    ("patch_size", 1 << 10),
    ("num_train_timesteps", 1 << 20),
];

/// Checks every size key of `v` (and of its nested objects, e.g. `text_config`) against
/// [`SIZE_LIMITS`]: an absurd size is an error naming the file and key before any model is built.
pub fn check_sizes(path: &Path, v: &serde_json::Value) -> Result<()> {
    fn walk(path: &Path, prefix: &str, v: &serde_json::Value, depth: usize) -> Result<()> {
        let Some(map) = v.as_object() else { return Ok(()) };
        for (k, val) in map {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if let Some((_, limit)) = SIZE_LIMITS.iter().find(|(name, _)| name == k) {
                let values: Vec<&serde_json::Value> = match val {
                    serde_json::Value::Array(items) => items.iter().collect(),
                    other => vec![other],
                };
                for x in values {
                    let too_big = match x {
                        serde_json::Value::Number(n) => n.as_u64().is_none_or(|n| n > *limit),
                        _ => false,
                    };
                    if too_big {
                        return Err(Error::config(path, &key, format!("{x} is outside 0..={limit}")));
                    }
                }
            }
            if depth < 4 && val.is_object() {
                walk(path, &key, val, depth + 1)?;
            }
        }
        Ok(())
    }
    walk(path, "", v, 0)
}

/// Writes `value` as pretty JSON with `"_class_name": class_name` first, atomically (temporary
/// file in the same folder, then rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T, class_name: Option<&str>) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut v = serde_json::to_value(value).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    if let (Some(name), Some(obj)) = (class_name, v.as_object_mut()) {
        let mut with_class = serde_json::Map::new();
        with_class.insert("_class_name".into(), name.into());
        with_class.extend(std::mem::take(obj));
        *obj = with_class;
    }
    let text = serde_json::to_string_pretty(&v).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    ipr_core::fs::write_atomic_with(path, |tmp| std::fs::write(tmp, text + "\n")).map_err(io)
}

/// A config value that diffusers accepts either as one number for all blocks or as one per block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `n` blocks; errors if a list has the wrong length.
    pub fn expand(&self, n: usize, path: &Path, key: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => {
                Err(Error::config(path, key, format!("has {} entries, expected one per down block ({n})", v.len())))
            }
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_blocks() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down_blocks() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn d_up_blocks() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn d_4() -> usize {
    4
}
fn d_1() -> usize {
    1
}
fn d_1f() -> f64 {
    1.0
}
fn d_32() -> usize {
    32
}
fn d_eps5() -> f64 {
    1e-5
}
fn d_cross() -> usize {
    1280
}
fn d_head_dim() -> PerBlock {
    PerBlock::One(8)
}
fn d_layers() -> PerBlock {
    PerBlock::One(1)
}
fn d_positional() -> String {
    "positional".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct UNetConfig {
    /// Latent (or pixel) height and width the model was trained at.
    pub sample_size: Option<usize>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    /// Adds 0.5-centred input scaling (`2x - 1`) when true.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Order of sin and cos in the timestep embedding.
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    #[serde(default = "d_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: bool,
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps5")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    /// Transformer blocks per attention; reversed for the up blocks, the last for the mid block.
    #[serde(default = "d_layers")]
    pub transformer_layers_per_block: PerBlock,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Legacy naming in diffusers: this is the number of heads, unless `num_attention_heads` is set.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_1f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub dropout: f64,
}

fn d_3() -> usize {
    3
}

/// The per-block numbers of a UNet config, resolved as diffusers resolves them.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetLayout {
    pub layers_per_block: Vec<usize>,
    /// Heads of each down block's attentions (the up blocks use them reversed, the mid block the last).
    pub num_attention_heads: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    /// Transformer layers of each up block.
    pub reverse_transformer_layers_per_block: Vec<usize>,
}

impl UNetConfig {
    /// Reads `unet/config.json` and checks it (see [`UNetConfig::validate`]).
    pub fn load(path: &Path) -> Result<Self> {
        let c: Self = read_json(path)?;
        c.validate(path)?;
        Ok(c)
    }

    /// Rejects values of keys this crate does not implement, naming the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config(path, key, msg));
        let n = self.block_out_channels.len();
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(
                "down_block_types",
                format!(
                    "{} down and {} up blocks for {n} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad("down_block_types", format!("unsupported block `{t}`"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad("up_block_types", format!("unsupported block `{t}`"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return bad("mid_block_type", format!("unsupported value {other:?}")),
        }
        if self.act_fn != "silu" {
            return bad("act_fn", format!("only \"silu\" is supported, got {:?}", self.act_fn));
        }
        if self.time_embedding_type != "positional" {
            return bad("time_embedding_type", "only \"positional\" is supported".into());
        }
        if self.resnet_time_scale_shift != "default" {
            return bad("resnet_time_scale_shift", "only \"default\" is supported".into());
        }
        if self.attention_type != "default" {
            return bad("attention_type", "only \"default\" is supported".into());
        }
        let unsupported_flags = [
            ("only_cross_attention", self.only_cross_attention),
            ("dual_cross_attention", self.dual_cross_attention),
            ("center_input_sample", self.center_input_sample),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            ("class_embeddings_concat", self.class_embeddings_concat),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            ("time_embedding_act_fn", self.time_embedding_act_fn.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some()),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            ("mid_block_only_cross_attention", self.mid_block_only_cross_attention == Some(true)),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()),
            ),
        ];
        for (key, set) in unsupported_flags {
            if set {
                return bad(key, "is not supported by ipr-diffusion (only diffusers' default)".into());
            }
        }
        if self.resnet_out_scale_factor != 1.0 {
            return bad("resnet_out_scale_factor", "only 1.0 is supported".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none() {
                    return bad("addition_time_embed_dim", "required by addition_embed_type \"text_time\"".into());
                }
                if self.projection_class_embeddings_input_dim.is_none() {
                    return bad(
                        "projection_class_embeddings_input_dim",
                        "required by addition_embed_type \"text_time\"".into(),
                    );
                }
            }
            Some(other) => return bad("addition_embed_type", format!("unsupported value {other:?}")),
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return bad(
                    "norm_num_groups",
                    format!("{} does not divide block_out_channels[{i}] = {c}", self.norm_num_groups),
                );
            }
        }
        let layout = self.layout(path)?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&layout.num_attention_heads).enumerate() {
            if h == 0 || c % h != 0 {
                return bad("attention_head_dim", format!("{h} heads do not divide block_out_channels[{i}] = {c}"));
            }
        }
        Ok(())
    }

    /// Per-block numbers as diffusers derives them from the config.
    pub fn layout(&self, path: &Path) -> Result<UNetLayout> {
        let n = self.block_out_channels.len();
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (the legacy
        // `attention_head_dim` is really the head count).
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, path, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, path, "attention_head_dim")?,
        };
        let tl = self.transformer_layers_per_block.expand(n, path, "transformer_layers_per_block")?;
        let mut rev = tl.clone();
        rev.reverse();
        Ok(UNetLayout {
            layers_per_block: self.layers_per_block.expand(n, path, "layers_per_block")?,
            num_attention_heads: heads,
            transformer_layers_per_block: tl,
            reverse_transformer_layers_per_block: rev,
        })
    }

    /// Channels of the time embedding (`4 * block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}

fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_vocab() -> usize {
    49408
}
fn d_512() -> usize {
    512
}
fn d_2048() -> usize {
    2048
}
fn d_12() -> usize {
    12
}
fn d_8() -> usize {
    8
}
fn d_77() -> usize {
    77
}
fn d_eos() -> i64 {
    2
}

/// `text_encoder*/config.json` of a transformers `CLIPTextModel` / `CLIPTextModelWithProjection`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_512")]
    pub hidden_size: usize,
    #[serde(default = "d_2048")]
    pub intermediate_size: usize,
    /// Present (and used) only in `CLIPTextModelWithProjection` checkpoints.
    #[serde(default = "d_512")]
    pub projection_dim: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_8")]
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP, SD 1.x) or `gelu` (OpenCLIP, SD 2.x, SDXL encoder 2).
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
    /// With the legacy value 2, the pooled output is read at `argmax(input_ids)` (as transformers).
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub architectures: Vec<String>,
}

impl ClipTextConfig {
    /// Reads `text_encoder*/config.json` and checks it.
    pub fn load(path: &Path) -> Result<Self> {
        let c: Self = read_json(path)?;
        if c.hidden_act != "quick_gelu" && c.hidden_act != "gelu" {
            return Err(Error::config(path, "hidden_act", format!("unsupported value {:?}", c.hidden_act)));
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::config(path, "num_attention_heads", "must divide hidden_size"));
        }
        Ok(c)
    }

    /// Whether the checkpoint holds `text_projection` (transformers' `CLIPTextModelWithProjection`).
    pub fn with_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }
}

fn d_vae_blocks() -> Vec<usize> {
    vec![64]
}
fn d_3ch() -> usize {
    3
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_down_enc() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up_dec() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct VaeConfig {
    #[serde(default = "d_3ch")]
    pub in_channels: usize,
    #[serde(default = "d_3ch")]
    pub out_channels: usize,
    #[serde(default = "d_down_enc")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up_dec")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_vae_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    /// Latents are `scaling_factor * (z - shift_factor)` of the encoder's distribution.
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Reads `vae/config.json` and checks it.
    pub fn load(path: &Path) -> Result<Self> {
        let c: Self = read_json(path)?;
        if c.act_fn != "silu" {
            return Err(Error::config(path, "act_fn", "only \"silu\" is supported"));
        }
        let n = c.block_out_channels.len();
        if c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "down_block_types",
                "one down and one up block per block_out_channels entry",
            ));
        }
        if c.down_block_types.iter().any(|t| t != "DownEncoderBlock2D") {
            return Err(Error::config(path, "down_block_types", "only DownEncoderBlock2D is supported"));
        }
        if c.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") {
            return Err(Error::config(path, "up_block_types", "only UpDecoderBlock2D is supported"));
        }
        Ok(c)
    }
}

/// `scheduler/scheduler_config.json`: the union of the keys of the schedulers this crate runs.
///
/// Every key is optional because diffusers' `XScheduler.from_config(other_config)` takes the keys
/// the file has and X's own defaults for the rest; [`crate::scheduler`] applies the defaults of the
/// scheduler being built.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample_range: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thresholding: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescale_betas_zero_snr: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interpolation_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_karras_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_beta_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_sigmas_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma_max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub euler_at_final: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_lu_lambdas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_flow_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<String>,
    /// diffusers writes its default, `-inf`, as the bare token `-Infinity` (see [`SchedulerConfig::load`]).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "maybe_nonfinite")]
    pub lambda_min_clipped: Option<f64>,
}

/// An `f64` that may be non-finite: written as a number, or as the string `"-Infinity"`,
/// `"Infinity"` or `"NaN"` (Python's spelling) where JSON has no number for it.
mod maybe_nonfinite {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Name(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Option::<Repr>::deserialize(d)? {
            None => Ok(None),
            Some(Repr::Number(v)) => Ok(Some(v)),
            Some(Repr::Name(name)) => match name.as_str() {
                "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
                "Infinity" => Ok(Some(f64::INFINITY)),
                "NaN" => Ok(Some(f64::NAN)),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"-Infinity\", \"Infinity\" or \"NaN\", got {other:?}"
                ))),
            },
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) if v.is_nan() => s.serialize_str("NaN"),
            Some(v) if v.is_infinite() => s.serialize_str(if *v > 0.0 { "Infinity" } else { "-Infinity" }),
            Some(v) => s.serialize_f64(*v),
            None => s.serialize_none(),
        }
    }
}

/// Quotes the bare tokens `-Infinity`, `Infinity` and `NaN` that Python's `json` writes for
/// non-finite floats (not JSON, so serde_json rejects them), leaving strings untouched.
pub fn quote_nonfinite_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Reads `scheduler/scheduler_config.json`. Configs that diffusers saved may hold `-Infinity`
    /// (`DPMSolverMultistepScheduler`'s default `lambda_min_clipped`), which is read as `-inf`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        parse_json(path, &quote_nonfinite_numbers(&text))
    }

    /// What diffusers' `StableDiffusionPipeline.__init__` does to the scheduler it loads (SD 1.x /
    /// 2.x only; the SDXL pipeline does not): a `steps_offset` other than 1 is set to 1, and a
    /// `clip_sample` that is true (explicitly, or by default in DDIM / DDPM configs) is set to
    /// false. Samplers built later with `from_config` inherit the fixed values.
    pub fn apply_sd_pipeline_fixups(&mut self) {
        self.steps_offset = Some(1);
        let class_default_true = matches!(self.class_name.as_deref(), Some("DDIMScheduler") | Some("DDPMScheduler"));
        if self.clip_sample == Some(true) || (self.clip_sample.is_none() && class_default_true) {
            self.clip_sample = Some(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_pipeline_fixups_match_diffusers() {
        let mut c: SchedulerConfig =
            serde_json::from_str(r#"{"_class_name": "DDIMScheduler", "steps_offset": 0}"#).unwrap();
        c.apply_sd_pipeline_fixups();
        assert_eq!((c.steps_offset, c.clip_sample), (Some(1), Some(false)));
        // PNDM has no clip_sample parameter: a missing key stays missing (DDIM's default applies later).
        let mut c: SchedulerConfig = serde_json::from_str(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
        c.apply_sd_pipeline_fixups();
        assert_eq!((c.steps_offset, c.clip_sample), (Some(1), None));
    }

    #[test]
    fn python_nonfinite_floats_are_read() {
        let text = r#"{"lambda_min_clipped": -Infinity, "timestep_spacing": "NaN -Infinity", "beta_end": 0.012}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(&path, text).unwrap();
        let c = SchedulerConfig::load(&path).unwrap();
        assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(c.timestep_spacing.as_deref(), Some("NaN -Infinity"));
        assert_eq!(c.beta_end, Some(0.012));
        // Written back as a string, read back the same.
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""lambda_min_clipped":"-Infinity""#), "{json}");
        let back: SchedulerConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.lambda_min_clipped, Some(f64::NEG_INFINITY));
        let c: SchedulerConfig = serde_json::from_str(r#"{"lambda_min_clipped": -5.1}"#).unwrap();
        assert_eq!(c.lambda_min_clipped, Some(-5.1));
        let c: SchedulerConfig = serde_json::from_str(r#"{"lambda_min_clipped": null}"#).unwrap();
        assert_eq!(c.lambda_min_clipped, None);
        assert_eq!(quote_nonfinite_numbers(r#"["a\"NaN", NaN]"#), r#"["a\"NaN", "NaN"]"#);
    }

    #[test]
    fn unet_config_errors_name_file_and_key() {
        let c: UNetConfig = serde_json::from_str(r#"{"resnet_time_scale_shift": "scale_shift"}"#).unwrap();
        let msg = c.validate(Path::new("unet/config.json")).unwrap_err().to_string();
        assert!(msg.contains("unet/config.json") && msg.contains("resnet_time_scale_shift"), "{msg}");
        let c: UNetConfig = serde_json::from_str(r#"{"attention_head_dim": [8, 8]}"#).unwrap();
        let msg = c.validate(Path::new("u.json")).unwrap_err().to_string();
        assert!(msg.contains("attention_head_dim") && msg.contains("2 entries"), "{msg}");
    }

    #[test]
    fn unet_defaults_are_sd15() {
        let c: UNetConfig = serde_json::from_str("{}").unwrap();
        c.validate(Path::new("u.json")).unwrap();
        let l = c.layout(Path::new("u.json")).unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(l.num_attention_heads, vec![8; 4]);
        assert_eq!((c.cross_attention_dim, c.norm_num_groups, c.in_channels), (1280, 32, 4));
    }
}
