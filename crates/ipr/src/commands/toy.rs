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
        #[arg(long)]
        quiet: bool,
    },
    /// VISOR metrics of a toy model on the seen and held-out spatial prompts (exact detector).
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 4)]
        images_per_prompt: u32,
        #[arg(long, default_value_t = 20)]
        steps: u32,
        #[arg(long, default_value_t = 4.0)]
        guidance: f64,
        #[arg(long, default_value_t = 1_000_003)]
        seed: u64,
        /// Keep the samples and detections here (default: a temporary folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print {"seen": {...}, "heldout": {...}} with VISOR's metric names.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// Write a freshly initialised (untrained) toy model, seeded: the starting point of
    /// pretraining, and a small real model for tests.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Tokenizer { out } => {
            ipr_toy::WordTokenizer::toy().save(&out)?;
            eprintln!("wrote the toy tokenizer to {}", out.display());
            Ok(())
        }
        Command::Pretrain { out, seed, steps, batch_size, lr, scenes, p_correct_relation, p_wrong_relation, quiet } => {
            let noise = ipr_toy::CaptionNoise { p_correct_relation, p_wrong_relation, ..Default::default() };
            noise.validate().map_err(anyhow::Error::msg)?;
            let s = ipr::pretrain::PretrainSettings {
                seed,
                steps,
                batch_size,
                learning_rate: lr,
                num_scenes: scenes,
                noise,
                ..Default::default()
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let pb = ipr::progress::bar(steps as u64, "pretrain", quiet);
            let record = ipr::pretrain::pretrain(&out, &s, &command, &mut |step, loss| {
                pb.set_position(step as u64);
                pb.set_message(format!("loss {loss:.4}"));
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
        Command::Eval { model, images_per_prompt, steps, guidance, seed, out, json, quiet } => {
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
                prompts: ipr::run_loop::PromptSets::toy(),
                model,
                detector: &detector,
                device: candle_core::Device::Cpu,
                quiet,
            };
            let mut result = serde_json::Map::new();
            for split in ipr::metrics_file::EvalSplit::ALL {
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
        Command::Init { out, seed } => {
            ipr::toy_model::init_toy_model(&out, seed)?;
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
