//! LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
//! Large Language Models"), as PEFT's `lora.Linear` implements them:
//! `y = x W^T + b + scale * dropout(x) A^T B^T` with `A` `(r, in)` initialised kaiming-uniform
//! (`a = sqrt(5)`, i.e. uniform in `+-1/sqrt(in)`), `B` `(out, r)` zeros (so a fresh adapter
//! changes nothing) and `scale = alpha / r`.
//!
//! Adapters attach to [`Linear`]s by module-path pattern, PEFT's `target_modules` rule: a pattern
//! matches a module whose path equals it or ends with `.` + pattern. The defaults are PEFT's and
//! diffusers' training scripts': `to_q`, `to_k`, `to_v`, `to_out.0` in the UNet (self- and
//! cross-attention of every transformer block) and `q_proj`, `k_proj`, `v_proj`, `out_proj` in a
//! CLIP text encoder. [`LoraAdapter::merged`] folds `scale * B A` into the weight for sampling.
//! File formats (PEFT / diffusers / kohya keys) are in [`crate::lora_io`].

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};

use crate::clip_text::ClipTextModel;
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::noise::SplitMix64;
use crate::unet::UNet2DConditionModel;

/// PEFT's default UNet targets (diffusers' `train_text_to_image_lora.py`).
pub const UNET_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
/// PEFT's default CLIP text-encoder targets (diffusers' SDXL LoRA script).
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// Shape of the adapters to attach.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`; the scale is `alpha / rank` (diffusers' scripts use `alpha = rank`).
    pub alpha: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`), 0 = none.
    pub dropout: f64,
    /// Module-path patterns (PEFT's `target_modules`).
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// Rank `rank`, `alpha = rank`, no dropout, the default UNet targets.
    pub fn unet(rank: usize) -> Self {
        Self { rank, alpha: rank as f64, dropout: 0.0, targets: UNET_TARGETS.iter().map(|s| s.to_string()).collect() }
    }

    /// Rank `rank`, `alpha = rank`, no dropout, the default text-encoder targets.
    pub fn text_encoder(rank: usize) -> Self {
        Self::unet(rank).for_text_encoder()
    }

    /// The same rank, alpha and dropout on the text encoder's default targets.
    pub fn for_text_encoder(&self) -> Self {
        Self { targets: TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()).collect(), ..self.clone() }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// PEFT's `target_modules` rule for a list of names.
pub fn matches_target(path: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| path == t || path.ends_with(&format!(".{t}")))
}

/// The trainable part of one adapted layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `lora_A`, `(r, in)`, f32.
    pub a: Var,
    /// `lora_B`, `(out, r)`, f32.
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// Whether `scale * B A` is folded into the base weight (forward then skips the adapter).
    pub merged: bool,
    /// Whether dropout is active (training); sampling turns it off.
    pub training: bool,
    /// Seeded dropout masks, so a run is reproducible given its seed.
    rng: Arc<Mutex<SplitMix64>>,
}

impl LoraAdapter {
    /// A fresh adapter for a `(out, in)` layer: A kaiming-uniform from `seed`, B zeros.
    pub fn new(in_dim: usize, out_dim: usize, config: &LoraConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
        let a: Vec<f32> = (0..config.rank * in_dim).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect();
        let a = Tensor::from_vec(a, (config.rank, in_dim), device)?;
        let b = Tensor::zeros((out_dim, config.rank), DType::F32, device)?;
        Self::from_tensors(&a, &b, config.scale(), config.dropout, seed ^ 0x5EED)
    }

    /// An adapter with the given `A` `(r, in)` and `B` `(out, r)` (stored as f32 variables).
    pub fn from_tensors(a: &Tensor, b: &Tensor, scale: f64, dropout: f64, seed: u64) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout,
            merged: false,
            training: true,
            rng: Arc::new(Mutex::new(SplitMix64::new(seed))),
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale * dropout(x) A^T B^T` for a 2-d `x`, in `x`'s dtype (the adapter runs in its own dtype,
    /// f32 unless a test put f64 variables in).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let mut h = x.to_dtype(self.a.dtype())?;
        if self.training && self.dropout > 0.0 {
            let n = h.elem_count();
            let keep = 1.0 - self.dropout;
            let mask: Vec<f32> = {
                let mut rng = self.rng.lock().map_err(|_| Error::Input("LoRA dropout RNG poisoned".into()))?;
                (0..n).map(|_| if rng.next_f64() <= keep { (1.0 / keep) as f32 } else { 0.0 }).collect()
            };
            let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(h.dtype())?;
            h = (h * mask)?;
        }
        let d = h.matmul(&self.a.as_tensor().t()?)?.matmul(&self.b.as_tensor().t()?)?;
        Ok((d * self.scale)?.to_dtype(dtype)?)
    }

    /// `scale * B A`, `(out, in)`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}

impl Linear {
    /// Folds the adapter into the weight (`W + scale * B A`), for sampling; no-op without one.
    pub fn merge_lora(&mut self) -> Result<()> {
        if let Some(lora) = &mut self.lora {
            if !lora.merged {
                // Detached: a merged weight is for sampling, and a weight that still carried
                // the adapters' graph would make every forward pass record (and keep alive)
                // its activations.
                let dw = lora.delta_weight()?.detach().to_dtype(self.weight.dtype())?;
                self.weight = (self.weight.detach() + dw)?;
                lora.merged = true;
            }
        }
        Ok(())
    }

    /// Undoes [`Linear::merge_lora`] (`W - scale * B A`, exact up to rounding).
    pub fn unmerge_lora(&mut self) -> Result<()> {
        if let Some(lora) = &mut self.lora {
            if lora.merged {
                let dw = lora.delta_weight()?.detach().to_dtype(self.weight.dtype())?;
                self.weight = (self.weight.detach() - dw)?;
                lora.merged = false;
            }
        }
        Ok(())
    }
}

/// One adapted layer: its key prefix in adapter files (`unet.<path>` or `text_encoder.<path>`)
/// and its variables.
#[derive(Debug, Clone)]
pub struct LoraParam {
    pub key: String,
    pub a: Var,
    pub b: Var,
}

/// Every adapter attached to a model (or to a pipeline's parts), in a fixed order.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    pub params: Vec<LoraParam>,
    /// Per component (`unet`, `text_encoder`, ...): the config its adapters were made with.
    pub configs: Vec<(String, LoraConfig)>,
}

impl LoraSet {
    /// The trainable variables: A then B of each layer.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().flat_map(|p| [p.a.clone(), p.b.clone()]).collect()
    }

    /// The trainable variables by their PEFT names (`<key>.lora_A.weight`, `<key>.lora_B.weight`),
    /// as the optimiser and its saved state know them.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .flat_map(|p| {
                [(format!("{}.lora_A.weight", p.key), p.a.clone()), (format!("{}.lora_B.weight", p.key), p.b.clone())]
            })
            .collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.a.elem_count() + p.b.elem_count()).sum()
    }

    /// Appends another set (e.g. the text encoder's after the UNet's).
    pub fn extend(&mut self, other: LoraSet) {
        self.params.extend(other.params);
        self.configs.extend(other.configs);
    }
}

/// FNV-1a of a string: a per-layer seed that does not depend on the order layers are visited in.
fn path_seed(seed: u64, path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Attaches fresh adapters to the layers among `linears` whose path matches `config.targets`;
/// `component` (`unet`, `text_encoder`, `text_encoder_2`) prefixes the keys. Errors when nothing
/// matches (a typo in a target list should not train nothing).
pub fn attach(linears: Vec<&mut Linear>, component: &str, config: &LoraConfig, seed: u64) -> Result<LoraSet> {
    if config.rank == 0 {
        return Err(Error::Input("LoRA rank must be at least 1".into()));
    }
    let mut set = LoraSet { params: Vec::new(), configs: vec![(component.to_string(), config.clone())] };
    for lin in linears {
        if !matches_target(&lin.path, &config.targets) {
            continue;
        }
        let adapter = LoraAdapter::new(
            lin.in_features(),
            lin.out_features(),
            config,
            path_seed(seed, &lin.path),
            lin.weight.device(),
        )?;
        set.params.push(LoraParam {
            key: format!("{component}.{}", lin.path),
            a: adapter.a.clone(),
            b: adapter.b.clone(),
        });
        lin.lora = Some(adapter);
    }
    if set.params.is_empty() {
        return Err(Error::Input(format!("no {component} layer matches the LoRA targets {:?}", config.targets)));
    }
    Ok(set)
}

/// Attaches adapters to the UNet (see [`attach`]).
pub fn attach_unet(unet: &mut UNet2DConditionModel, config: &LoraConfig, seed: u64) -> Result<LoraSet> {
    attach(unet.linears_mut(), "unet", config, seed)
}

/// Attaches adapters to a CLIP text encoder; `component` is `text_encoder` or `text_encoder_2`.
pub fn attach_text_encoder(te: &mut ClipTextModel, component: &str, config: &LoraConfig, seed: u64) -> Result<LoraSet> {
    attach(te.linears_mut(), component, config, seed)
}

/// Sets dropout on or off in every adapter of `linears`.
pub fn set_training(linears: Vec<&mut Linear>, training: bool) {
    for lin in linears {
        if let Some(l) = &mut lin.lora {
            l.training = training;
        }
    }
}

/// Merges every adapter of `linears` into its weight.
pub fn merge(linears: Vec<&mut Linear>) -> Result<()> {
    linears.into_iter().try_for_each(|l| l.merge_lora())
}

/// Undoes [`merge`].
pub fn unmerge(linears: Vec<&mut Linear>) -> Result<()> {
    linears.into_iter().try_for_each(|l| l.unmerge_lora())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    fn linear(path: &str) -> Linear {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let mut l = Linear::load(vb.pp(path), 6, 5, true).unwrap();
        l.weight = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
        l
    }

    #[test]
    fn targets_follow_peft_suffix_rule() {
        let t: Vec<String> = UNET_TARGETS.iter().map(|s| s.to_string()).collect();
        assert!(matches_target("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", &t));
        assert!(matches_target("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", &t));
        assert!(!matches_target("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qq", &t));
        assert!(!matches_target("down_blocks.1.attentions.0.proj_in", &t));
    }

    #[test]
    fn fresh_adapter_is_identity_and_merge_equals_unmerged_forward() {
        let mut l = linear("attn1.to_q");
        let x = Tensor::randn(0f32, 1.0, (3, 6), &Device::Cpu).unwrap();
        let before = l.forward(&x).unwrap();
        let set = attach(vec![&mut l], "unet", &LoraConfig::unet(2), 1).unwrap();
        assert_eq!(set.params[0].key, "unet.attn1.to_q");
        let same = l.forward(&x).unwrap();
        assert_eq!(before.to_vec2::<f32>().unwrap(), same.to_vec2::<f32>().unwrap());
        let lora = l.lora.as_ref().unwrap();
        let a: Vec<f32> = lora.a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let bound = 1.0 / 6f32.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > bound / 2.0));
        lora.b.set(&Tensor::randn(0f32, 1.0, (5, 2), &Device::Cpu).unwrap()).unwrap();
        let adapted = l.forward(&x).unwrap();
        l.merge_lora().unwrap();
        let merged = l.forward(&x).unwrap();
        let diff: f32 = (&adapted - &merged).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-5, "{diff}");
        // A merged weight records no graph: sampling with it keeps no activations alive (a run's
        // evaluation once grew to 23 GB when it did).
        let grads = merged.sum_all().unwrap().backward().unwrap();
        let (a, b) = (&set.params[0].a, &set.params[0].b);
        assert!(grads.get(a.as_tensor()).is_none() && grads.get(b.as_tensor()).is_none());
        l.unmerge_lora().unwrap();
        let back = l.forward(&x).unwrap();
        let diff: f32 = (&adapted - &back).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn no_matching_target_is_an_error() {
        let mut l = linear("ff.net.2");
        assert!(attach(vec![&mut l], "unet", &LoraConfig::unet(2), 1).is_err());
    }
}
