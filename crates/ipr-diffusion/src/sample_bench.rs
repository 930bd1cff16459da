//! Timing of text-to-image denoising (the library side of `ipr bench sample`; its diffusers twin
//! is `scripts/bench/sample.py`): a pipeline folder (f32 unless asked otherwise), `batch` images
//! with classifier-free guidance (the UNet sees `2 x batch` samples per step), DDIM, the empty
//! prompt's embeddings for both halves (speed does not depend on the text). On the CPU the batch
//! is cut into `parallel` parts denoised at once, as `ipr run` and `ipr sample` run their batches
//! (candle's elementwise kernels are single-threaded): each image is computed as it would be alone.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::flops::Counted;
use crate::pipeline::{Pipeline, SampleParams};
use crate::scheduler::SamplerKind;

/// What the benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleReport {
    /// Denoising steps per second of the whole batch (median run).
    pub steps_per_s: f64,
    /// Seconds of each timed run of `steps` steps.
    pub s_runs: Vec<f64>,
    pub batch: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Parts of the batch denoised at once (1 on a GPU).
    pub parallel: usize,
    pub threads: usize,
    /// FLOPs of one step's matrix products ([`crate::flops`]), the rate reached and the
    /// machine's measured matrix-product peak.
    pub gflop_per_step: f64,
    pub gflop_per_s: f64,
    pub peak_gflop_per_s: f64,
    pub device: String,
    pub dtype: String,
    /// With `profile_steps > 0`: the milliseconds of one profiled denoising step (one part,
    /// every op synchronised) and where they went, op by op ([`crate::op_profile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_profiled_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<Vec<crate::op_profile::OpTime>>,
}

/// What `ipr bench sample` runs.
#[derive(Debug, Clone)]
pub struct SampleBench {
    pub batch: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Timed runs of `steps` steps (after one warm-up run).
    pub iters: usize,
    /// Parts of the batch denoised at once on the CPU.
    pub parallel: usize,
    /// The pipeline's weights (f32 on the CPU; bf16 is the GPU's usual setting); latents stay f32.
    pub dtype: DType,
    /// Denoising steps run once more, of the whole batch as one part, with op timing on (0: none).
    pub profile_steps: usize,
}

/// Runs one warm-up and `iters` timed denoising runs of `steps` DDIM steps (then the profiled
/// steps, if any).
pub fn bench_sampling(model: &Path, b: &SampleBench, device: &Device) -> Result<SampleReport> {
    crate::train::cpu_runtime();
    let SampleBench { batch, steps, guidance_scale, iters, .. } = *b;
    let pipe = Pipeline::load(model, b.dtype, device)?;
    let parallel = if device.is_cpu() { b.parallel.clamp(1, batch.max(1)) } else { 1 };
    let params = SampleParams { num_inference_steps: steps, guidance_scale, sampler: SamplerKind::Ddim };
    let parts: Vec<usize> = (0..parallel).map(|i| batch / parallel + usize::from(i < batch % parallel)).collect();
    let inputs = parts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let e = pipe.empty_negative(n)?;
            Ok((e.clone(), e, crate::noise::randn(i as u64, pipe.latent_shape(n), DType::F32, device)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let run = || -> Result<()> {
        let out: Vec<Result<Tensor>> = inputs.par_iter().map(|(c, u, x)| pipe.denoise(c, u, x, &params)).collect();
        for o in out {
            o?;
        }
        device.synchronize()?;
        Ok(())
    };
    run()?;
    let before = Counted::now();
    let mut runs = Vec::new();
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        run()?;
        runs.push(start.elapsed().as_secs_f64());
    }
    let per_step = Counted::now().since(before).forward() as f64 / (runs.len() * steps) as f64;
    let median = crate::train::bench::median(&runs);
    let profiled = crate::op_profile::profile(b.profile_steps, || {
        let e = pipe.empty_negative(batch)?;
        let x = crate::noise::randn(0, pipe.latent_shape(batch), DType::F32, device)?;
        pipe.denoise(&e, &e, &x, &SampleParams { num_inference_steps: b.profile_steps, ..params.clone() })?;
        Ok::<_, crate::Error>(device.synchronize()?)
    })?;
    Ok(SampleReport {
        steps_per_s: steps as f64 / median,
        s_runs: runs,
        batch,
        steps,
        guidance_scale,
        parallel,
        threads: rayon::current_num_threads(),
        gflop_per_step: per_step / 1e9,
        gflop_per_s: per_step * steps as f64 / median / 1e9,
        peak_gflop_per_s: crate::flops::peak_gflops(device)?,
        device: format!("{:?}", device.location()),
        dtype: b.dtype.as_str().to_string(),
        ms_profiled_step: profiled.as_ref().map(|p| p.0),
        ops: profiled.map(|p| p.1),
    })
}
