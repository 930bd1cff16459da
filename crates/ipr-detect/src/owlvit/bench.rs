//! Throughput of the OWL-ViT forward pass with random weights, for `ipr bench owlvit` and for a
//! side-by-side comparison with transformers (`scripts/fixtures/owlvit/bench_owlvit.py` times the
//! same shapes: B images of S x S pixels, Q queries of 16 tokens per image, text tower included).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use super::config::OwlVitConfig;
use super::model::OwlVit;
use crate::model_error::Result;

/// What [`bench_owlvit`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub batch: usize,
    pub queries: usize,
    pub image_size: usize,
    pub iters: usize,
    /// Mean seconds per forward pass of a batch (after one warm-up pass).
    pub secs_per_batch: f64,
    pub images_per_s: f64,
}

/// An OWL-ViT of `config`'s shape with N(0, 0.02) weights (unit layer-norm scales), seeded.
pub fn random_owlvit(config: &OwlVitConfig, seed: u64, device: &Device) -> Result<OwlVit> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = OwlVit::new(vb, config.clone())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let value = if name.contains("norm") && name.ends_with(".weight") {
            Tensor::ones(var.shape(), DType::F32, device)?
        } else {
            let t = Tensor::randn(0f32, 0.02, var.shape(), device)?;
            // Different values per tensor without depending on candle's global RNG.
            (t * rng.random_range(0.5f64..1.5))?
        };
        var.set(&value)?;
    }
    drop(data);
    // `Var::set` writes into the storage the model's tensors share, so the model is now random.
    Ok(model)
}

/// Times `iters` forward passes of `batch` random images with `queries` random queries each.
pub fn bench_owlvit(
    config: &OwlVitConfig,
    batch: usize,
    queries: usize,
    iters: usize,
    device: &Device,
) -> Result<BenchReport> {
    let model = random_owlvit(config, 0, device)?;
    let s = config.vision_config.image_size;
    let pixel_values = Tensor::randn(0f32, 1.0, (batch, 3, s, s), device)?;
    let l = config.text_config.max_position_embeddings;
    let vocab = config.text_config.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut ids = Vec::with_capacity(batch * queries * l);
    for _ in 0..batch * queries {
        // BOS, 5 words, EOS (the largest id), padding 0: the shape of "a photo of a dog".
        let mut row = vec![vocab - 2];
        row.extend((0..5).map(|_| rng.random_range(1..vocab - 2)));
        row.push(vocab - 1);
        row.resize(l, 0);
        ids.extend(row);
    }
    let input_ids = Tensor::from_vec(ids, (batch * queries, l), device)?;
    model.forward(&pixel_values, &input_ids)?.logits.sum_all()?.to_scalar::<f32>()?;
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        model.forward(&pixel_values, &input_ids)?.logits.sum_all()?.to_scalar::<f32>()?;
    }
    let secs_per_batch = start.elapsed().as_secs_f64() / iters.max(1) as f64;
    Ok(BenchReport {
        batch,
        queries,
        image_size: s,
        iters: iters.max(1),
        secs_per_batch,
        images_per_s: batch as f64 / secs_per_batch,
    })
}
