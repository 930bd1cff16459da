use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// OWL-ViT forward throughput (images/s) with random weights of the given shape.
    Owlvit {
        /// The model shape; base-patch32 is VISOR's evaluator.
        #[arg(long, default_value = "base-patch32")]
        shape: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 2)]
        queries: usize,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// One LoRA training step (rank 4, default targets, AdamW, weighted loss, fp32) on random
    /// inputs of the UNet's sample size; median ms. Twin: scripts/bench/train_step.py.
    TrainStep {
        /// A UNet folder (config.json, weights optional) or a UNet config file.
        #[arg(long)]
        unet: std::path::PathBuf,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Shards of the batch computed in parallel (as `ipr train --shards`; 1: off).
        #[arg(long, default_value_t = ipr_diffusion::train::DEFAULT_SHARDS)]
        shards: usize,
        /// cpu or cuda (on CUDA the batch is never sharded).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The frozen UNet's and the inputs' dtype: f32, bf16 or f16 (LoRA and AdamW stay f32).
        #[arg(long, default_value = "f32", value_parser = super::parse_dtype)]
        dtype: candle_core::DType,
        /// After the timed steps, run this many more (unsharded) with every op timed between
        /// device synchronisations, and report where a step's time goes (`ops`).
        #[arg(long, default_value_t = 0)]
        profile_ops: usize,
        #[arg(long)]
        json: bool,
    },
    /// Text-to-image denoising steps per second of a pipeline folder (DDIM, classifier-free
    /// guidance), with the FLOP/s reached against the machine's measured peak. Twin:
    /// scripts/bench/sample.py.
    Sample {
        /// A diffusers pipeline folder (default: the toy base model built into ipr, written to a
        /// temporary folder for the run).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 4.0)]
        guidance: f64,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Parts of the batch denoised at once on the CPU (default: rayon's threads, as `ipr run`
        /// and `ipr sample` run their batches).
        #[arg(long)]
        parallel: Option<usize>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The pipeline's weights: f32, bf16 or f16 (latents and the sampler stay f32).
        #[arg(long, default_value = "f32", value_parser = super::parse_dtype)]
        dtype: candle_core::DType,
        /// After the timed runs, denoise this many steps more (the whole batch at once) with
        /// every op timed between device synchronisations, and report where a step's time goes.
        #[arg(long, default_value_t = 0)]
        profile_ops: usize,
        #[arg(long)]
        json: bool,
    },
    /// GFLOP/s of f32 n x n matrix products through the `gemm` crate (the kernels of the models'
    /// products), best of `iters`, for each `n`. Twin: scripts/bench/gemm.py (MKL through
    /// PyTorch, OpenBLAS through NumPy).
    Gemm {
        #[arg(long, value_delimiter = ',', default_value = "256,512,1024,1536,2048")]
        n: Vec<usize>,
        #[arg(long, default_value_t = 6)]
        iters: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Gemm { n, iters, device } => {
            let device = ipr_diffusion::sample::device_from_name(&device)?;
            for n in n {
                let gflops = ipr_diffusion::flops::matmul_gflops(&device, n, iters)?;
                println!(
                    "{}",
                    serde_json::json!({ "n": n, "gflop_per_s": gflops, "threads": rayon::current_num_threads() })
                );
            }
            Ok(())
        }
        Command::Sample { model, batch, steps, guidance, iters, parallel, device, dtype, profile_ops, json } => {
            let device = ipr_diffusion::sample::device_from_name(&device)?;
            let parallel = parallel.unwrap_or_else(rayon::current_num_threads);
            // The built-in toy base model goes to a temporary folder, removed afterwards.
            let exported = match model {
                Some(_) => None,
                None => {
                    let dir = std::env::temp_dir().join(format!("ipr-bench-toy-base-{}", std::process::id()));
                    ipr::toy_base::export(&dir)?;
                    Some(dir)
                }
            };
            let folder = model.as_deref().or(exported.as_deref()).expect("a model folder");
            let bench = ipr_diffusion::sample_bench::SampleBench {
                batch,
                steps,
                guidance_scale: guidance,
                iters,
                parallel,
                dtype,
                profile_steps: profile_ops,
            };
            let report = ipr_diffusion::sample_bench::bench_sampling(folder, &bench, &device);
            if let Some(dir) = exported {
                std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            let report = report?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report:?}");
            }
            Ok(())
        }
        Command::TrainStep { unet, batch, iters, shards, device, dtype, profile_ops, json } => {
            let device = ipr_diffusion::sample::device_from_name(&device)?;
            let report = ipr_diffusion::train::bench::bench_train_step(
                &unet,
                batch,
                iters,
                shards,
                &device,
                dtype,
                profile_ops,
            )?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report:?}");
            }
            Ok(())
        }
        Command::Owlvit { shape, batch, queries, iters, device, json } => {
            let config = match shape.as_str() {
                "base-patch32" => ipr_detect::owlvit::config::OwlVitConfig::base_patch32(),
                other => anyhow::bail!("unknown --shape {other:?}: expected base-patch32"),
            };
            let device = ipr_diffusion::sample::device_from_name(&device)?;
            let report = ipr_detect::owlvit::bench::bench_owlvit(&config, batch, queries, iters, &device)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report:?}");
            }
            Ok(())
        }
    }
}
