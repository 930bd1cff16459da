use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use ipr::config::{Method, RunConfig};
use ipr::run_loop::{PromptSets, Run, RunLayout};
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// Run configuration (run.toml). Without it: the toy demo with the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run name (the folder under runs_dir); overrides the config's.
    #[arg(long)]
    name: Option<String>,
    /// Folder of runs; overrides the config's runs_dir.
    #[arg(long)]
    runs_dir: Option<PathBuf>,
    /// ipr (default), pr, filter or weighted; overrides the config's.
    #[arg(long)]
    method: Option<Method>,
    /// Model folder (diffusers layout); overrides model.source.
    #[arg(long)]
    model: Option<String>,
    /// Continue a run that was stopped: finished stages are kept, the rest is done.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut config = match &a.config {
        Some(p) => RunConfig::read(p).map_err(anyhow::Error::msg)?,
        None => RunConfig::default(),
    };
    if let Some(n) = a.name {
        config.name = n;
    }
    if let Some(d) = a.runs_dir {
        config.runs_dir = d;
    }
    if let Some(m) = a.method {
        config.method = m;
    }
    if let Some(m) = a.model {
        config.model.source = m;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let toy = config.model.source == "toy";
    let model = if toy { PathBuf::new() } else { PathBuf::from(&config.model.source) };
    let prompts = PromptSets::toy().truncated(config.prompts.max_train, config.prompts.max_eval);
    let layout = RunLayout::new(config.runs_dir.join(&config.name));
    let resolved = config.to_toml();
    let fresh = !layout.root.exists();
    if !fresh {
        if !a.resume {
            bail!("{} exists: pass --resume to continue it, or choose another --name", layout.root.display());
        }
        let before = std::fs::read_to_string(layout.config())
            .with_context(|| format!("reading {}", layout.config().display()))?;
        if before != resolved {
            bail!(
                "{} was made with another configuration: --resume continues a run only with the same settings \
                 (compare it with the current config, or choose another --name)",
                layout.config().display()
            );
        }
    } else {
        std::fs::create_dir_all(&layout.root)?;
        ipr_core::fs::write_atomic(&layout.config(), resolved.as_bytes())?;
    }
    let model = if toy {
        // The embedded base model, written into the run so that the run folder is complete.
        let dir = layout.root.join("base-model");
        if !dir.exists() {
            ipr::toy_base::export(&dir)?;
        } else if !ipr::toy_base::is_exported(&dir) {
            bail!("{} is not this binary's toy base model (the run was made by another build)", dir.display());
        }
        dir
    } else {
        model
    };
    if let Err(e) = ipr::training::preflight(&config, &model) {
        if fresh {
            // Nothing but the config and the exported base is there yet: leave no half-made run.
            let _ = std::fs::remove_dir_all(&layout.root);
        }
        return Err(e);
    }
    let detector: Box<dyn ipr_detect::Detector> = match config.detector.kind.as_str() {
        "toy" => Box::new(ipr_detect::ToyDetector::default()),
        _ => {
            let folder = config.detector.model.as_ref().context("detector.model")?;
            let device = ipr_diffusion::sample::device_from_name(&config.model.device)?;
            let mut d = ipr_detect::OwlVitDetector::load(folder, &device)?;
            d.threshold = config.detector.threshold;
            Box::new(d)
        }
    };
    let device = ipr_diffusion::sample::device_from_name(&config.model.device)?;
    let run = Run { config, layout, prompts, model, detector: detector.as_ref(), device, quiet: a.quiet };
    let metrics = ipr::run_loop::run(&run)?;
    ipr::run_loop::write_report(&run, &metrics)?;
    print!("{}", ipr::run_loop::metrics_table(&metrics));
    Ok(())
}
