use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum Command {
    /// Write the toy world's tokenizer (tokenizer.json, vocab.json, tokenizer_config.json).
    Tokenizer {
        #[arg(long)]
        out: PathBuf,
    },
    /// Train the toy base model from scratch on rendered scenes with noisy captions.
    Pretrain {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = ipr::pretrain::PretrainSettings::default().steps)]
        steps: usize,
        #[arg(long, default_value_t = ipr::pretrain::PretrainSettings::default().batch_size)]
        batch_size: usize,
        #[arg(long, default_value_t = ipr::pretrain::PretrainSettings::default().learning_rate)]
        lr: f64,
        #[arg(long, default_value_t = ipr::pretrain::PretrainSettings::default().num_scenes)]
        scenes: usize,
        /// Probability that a two-object caption states the true relation.
        #[arg(long, default_value_t = ipr_toy::CaptionNoise::default().p_correct_relation)]
        p_correct_relation: f64,
        /// Probability that a two-object caption states a false relation.
        #[arg(long, default_value_t = ipr_toy::CaptionNoise::default().p_wrong_relation)]
        p_wrong_relation: f64,
        /// Fraction of scenes trained with an empty caption (for classifier-free guidance).
        #[arg(long, default_value_t = ipr::pretrain::PretrainSettings::default().p_uncond)]
        p_uncond: f64,
        /// Learning-rate warm-up steps.
        #[arg(long, default_value_t = ipr::pretrain::PretrainSettings::default().warmup_steps)]
        warmup: usize,
        /// EMA decay of the saved weights (0: save the raw weights).
        #[arg(long, default_value_t = 0.999)]
        ema_decay: f64,
        /// Min-SNR loss weighting gamma (0: off).
        #[arg(long, default_value_t = 5.0)]
        min_snr_gamma: f64,
        /// Save the model every N steps to <out>.snapshots/step-<N> (0: never).
        #[arg(long, default_value_t = 0)]
        snapshot_every: usize,
        #[command(flatten)]
        model: ModelArgs,
        /// Shards per batch computed in parallel on the CPU (1: off); results depend on it only
        /// through float rounding.
        #[arg(long, default_value_t = ipr_diffusion::train::DEFAULT_SHARDS)]
        shards: usize,
        /// Print the mean loss every N steps to stderr (0: never), for logs.
        #[arg(long, default_value_t = 0)]
        log_every: usize,
        #[arg(long)]
        quiet: bool,
    },
    /// VISOR metrics of a toy model on the seen and held-out spatial prompts (exact detector).
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 4)]
        images_per_prompt: u32,
        #[command(flatten)]
        sampler: SamplerArgs,
        /// Keep the samples and detections here (default: a temporary folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print {"seen": {...}, "heldout": {...}} with VISOR's metric names.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// Write the toy base model that ships in this binary (a diffusers-format folder) to OUT.
    Export {
        #[arg(long)]
        out: PathBuf,
    },
    /// A PNG grid of samples (rows: seen and held-out spatial prompts; the row prompts are written
    /// to <out>.txt and printed).
    Grid {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Rows from the seen prompts and as many from the held-out prompts.
        #[arg(long, default_value_t = 4)]
        rows_per_split: usize,
        #[arg(long, default_value_t = 8)]
        columns: u32,
        #[command(flatten)]
        sampler: SamplerArgs,
        /// Each pixel as a scale x scale block.
        #[arg(long, default_value_t = 3)]
        scale: u32,
    },
    /// Write a freshly initialised (untrained) toy model, seeded: the starting point of
    /// pretraining, and a small real model for tests.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        model: ModelArgs,
    },
}

/// How evaluation and grid images are sampled.
#[derive(clap::Args)]
pub struct SamplerArgs {
    /// DDIM steps (10: the toy base model's setting; see the README).
    #[arg(long, default_value_t = 10)]
    steps: u32,
    #[arg(long, default_value_t = 4.0)]
    guidance: f64,
    #[arg(long, default_value_t = 1_000_003)]
    seed: u64,
}

/// The toy model's size and parametrisation (defaults: `ToyModelSpec::default()`).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// UNet channels per level, top level first, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ipr::toy_model::ToyModelSpec::default().channels)]
    channels: Vec<usize>,
    /// How many of the lowest levels have attention.
    #[arg(long, default_value_t = ipr::toy_model::ToyModelSpec::default().attention_levels)]
    attention_levels: usize,
    #[arg(long, default_value_t = ipr::toy_model::ToyModelSpec::default().norm_groups)]
    norm_groups: usize,
    #[arg(long, default_value_t = ipr::toy_model::ToyModelSpec::default().text_width)]
    text_width: usize,
    #[arg(long, default_value_t = ipr::toy_model::ToyModelSpec::default().text_layers)]
    text_layers: usize,
    /// epsilon or v_prediction.
    #[arg(long, default_value_t = ipr::toy_model::ToyModelSpec::default().prediction_type)]
    prediction_type: String,
}

impl ModelArgs {
    fn spec(self) -> Result<ipr::toy_model::ToyModelSpec> {
        let spec = ipr::toy_model::ToyModelSpec {
            channels: self.channels,
            attention_levels: self.attention_levels,
            norm_groups: self.norm_groups,
            text_width: self.text_width,
            text_layers: self.text_layers,
            prediction_type: self.prediction_type,
        };
        spec.validate().map_err(anyhow::Error::msg)?;
        Ok(spec)
    }
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Tokenizer { out } => {
            ipr_toy::WordTokenizer::toy().save(&out)?;
            eprintln!("wrote the toy tokenizer to {}", out.display());
            Ok(())
        }
        Command::Pretrain {
            out,
            seed,
            steps,
            batch_size,
            lr,
            scenes,
            p_correct_relation,
            p_wrong_relation,
            p_uncond,
            warmup,
            ema_decay,
            min_snr_gamma,
            snapshot_every,
            model,
            shards,
            log_every,
            quiet,
        } => {
            let noise = ipr_toy::CaptionNoise { p_correct_relation, p_wrong_relation, ..Default::default() };
            noise.validate().map_err(anyhow::Error::msg)?;
            anyhow::ensure!((0.0..=1.0).contains(&p_uncond), "--p-uncond {p_uncond}: expected a probability in [0, 1]");
            let s = ipr::pretrain::PretrainSettings {
                seed,
                steps,
                batch_size,
                learning_rate: lr,
                num_scenes: scenes,
                noise,
                p_uncond,
                warmup_steps: warmup,
                ema_decay: (ema_decay > 0.0).then_some(ema_decay),
                min_snr_gamma: (min_snr_gamma > 0.0).then_some(min_snr_gamma),
                model: model.spec()?,
                snapshot_every: (snapshot_every > 0).then_some(snapshot_every),
                shards,
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let pb = ipr::progress::bar(steps as u64, "pretrain", quiet);
            let (start, mut window) = (std::time::Instant::now(), Vec::new());
            let record = ipr::pretrain::pretrain(&out, &s, &command, &mut |step, loss| {
                pb.set_position(step as u64);
                pb.set_message(format!("loss {loss:.4}"));
                window.push(loss);
                if log_every > 0 && step % log_every == 0 {
                    let mean = window.iter().sum::<f64>() / window.len() as f64;
                    let secs = start.elapsed().as_secs_f64();
                    pb.suspend(|| eprintln!("step {step}/{steps} loss {mean:.5} ({secs:.0} s)"));
                    window.clear();
                }
            })?;
            pb.finish_and_clear();
            eprintln!(
                "trained in {:.0} s (final loss {:.4}); wrote {}",
                record.seconds,
                record.final_loss,
                out.display()
            );
            Ok(())
        }
        Command::Eval {
            model,
            images_per_prompt,
            sampler: SamplerArgs { steps, guidance, seed },
            out,
            json,
            quiet,
        } => {
            let tmp = tempdir_in_target()?;
            let root = out.unwrap_or_else(|| tmp.clone());
            let mut config = ipr::config::RunConfig::default();
            config.sampling.steps = steps;
            config.sampling.guidance_scale = guidance;
            config.eval.images_per_prompt = images_per_prompt;
            config.eval.seed = seed;
            config.validate().map_err(anyhow::Error::msg)?;
            let detector = ipr_detect::ToyDetector::default();
            let run = ipr::run_loop::Run {
                config,
                layout: ipr::run_loop::RunLayout::new(&root),
                prompts: ipr::prompt_sets::PromptSets::toy(),
                model,
                detector: &detector,
                eval_detector: &detector,
                clip: None,
                device: candle_core::Device::Cpu,
                device_name: "cpu".into(),
                world: &ipr_diffusion::collective::SingleProcess,
                quiet,
            };
            let mut result = serde_json::Map::new();
            for split in run.prompts.splits() {
                let rec = run.eval_stage(0, split)?;
                let mut m = rec.metrics.headline();
                m["IPR_strict"] = rec.strict.strict_accuracy().into();
                result.insert(split.name().to_string(), m);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            if json {
                println!("{}", serde_json::Value::Object(result));
            } else {
                for (k, v) in &result {
                    println!("{k:<8} {v}");
                }
            }
            Ok(())
        }
        Command::Export { out } => {
            ipr::toy_base::export(&out)?;
            eprintln!("wrote the toy base model to {}", out.display());
            Ok(())
        }
        Command::Grid {
            model,
            out,
            rows_per_split,
            columns,
            sampler: SamplerArgs { steps, guidance, seed },
            scale,
        } => {
            anyhow::ensure!(scale >= 1 && columns >= 1, "--scale and --columns must be at least 1");
            let params = ipr_diffusion::pipeline::SampleParams {
                num_inference_steps: steps as usize,
                guidance_scale: guidance,
                ..Default::default()
            };
            let s = ipr::toy_grid::GridSettings { rows_per_split, columns, params, seed, scale };
            let rows = ipr::toy_grid::write_grid(&model, &out, &s)?;
            let text: String = rows.iter().enumerate().map(|(i, (p, split))| format!("{i}\t{split}\t{p}\n")).collect();
            let txt = PathBuf::from(format!("{}.txt", out.display()));
            ipr_core::fs::write_atomic(&txt, text.as_bytes())?;
            print!("{text}");
            eprintln!("wrote {} ({} rows x {columns}) and {}", out.display(), rows.len(), txt.display());
            Ok(())
        }
        Command::Init { out, seed, model } => {
            ipr::toy_model::init_toy_model(&out, &model.spec()?, seed)?;
            eprintln!("wrote an untrained toy model (seed {seed}) to {}", out.display());
            Ok(())
        }
    }
}

/// A fresh temporary folder path (not created).
fn tempdir_in_target() -> Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("ipr-toy-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    Ok(base)
}
