use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use ipr::config::{Method, RunConfig};
use ipr::prompt_sets::PromptSets;
use ipr::run_loop::{Run, RunLayout};
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
    /// ipr (default), pr, filter, weighted or ddpo; overrides the config's.
    #[arg(long)]
    method: Option<Method>,
    /// Model folder (diffusers layout); overrides model.source.
    #[arg(long)]
    model: Option<String>,
    /// Continue a run that was stopped: finished stages are kept, the rest is done.
    #[arg(long)]
    resume: bool,
    /// Run the config once per seed (comma-separated, e.g. 0,1,2), each into
    /// <runs_dir>/<name>/seed-<s>/, then summarise them there: every metric's mean over the seeds
    /// and its 95% interval (summary.json, summary.md, report.html).
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    ipr::world::World::init()?.run(|w| {
        let config = config_from_args(&a)?;
        let device_name = w.device_name(&config.model.device);
        let device = ipr_diffusion::sample::device_from_name(&device_name)?;
        w.attach_device(&device)?;
        let world: &ipr::world::World = w;
        if a.seeds.is_empty() {
            return run_config(config, &a, world, device, device_name);
        }
        let study = config.runs_dir.join(&config.name);
        for &seed in &a.seeds {
            let c = ipr::study::seed_config(&config, seed);
            if !a.quiet && world.is_root() {
                eprintln!("== seed {seed}: {}", study.join(&c.name).display());
            }
            run_config(c, &a, world, device.clone(), device_name.clone())?;
        }
        if world.is_root() {
            let summary = ipr::study::write_summary(&study)?;
            print!("{}", ipr::study::summary_table(&summary));
        }
        Ok(())
    })
}

/// The config the arguments describe.
fn config_from_args(a: &Args) -> Result<RunConfig> {
    let mut config = match &a.config {
        Some(p) => RunConfig::read(p).map_err(anyhow::Error::msg)?,
        None => RunConfig::default(),
    };
    if let Some(n) = &a.name {
        config.name = n.clone();
    }
    if let Some(d) = &a.runs_dir {
        config.runs_dir = d.clone();
    }
    if let Some(m) = a.method {
        config.method = m;
    }
    if let Some(m) = &a.model {
        config.model.source = m.clone();
    }
    config.validate().map_err(anyhow::Error::msg)?;
    Ok(config)
}

/// One run of `config` on every rank of `world` (one process alone, or the ranks of `mpirun`).
fn run_config(
    config: RunConfig,
    a: &Args,
    world: &ipr::world::World,
    device: candle_core::Device,
    device_name: String,
) -> Result<()> {
    let toy = config.model.source == "toy";
    let model = if toy { PathBuf::new() } else { ipr_diffusion::source::resolve_model(&config.model.source)? };
    let prompts = PromptSets::from_config(&config)?;
    // Everything that can be checked without sampling is checked before the run folder exists:
    // the device's dtype, the training pieces against the ranks, both detectors' folders, the
    // CLIP folder.
    check_dtype(&config, &device)?;
    ipr::training::check_shards(&config, world.size())?;
    let detector = ipr::detection::load_detector(&config.detector, &device).context("[detector]")?;
    let eval_config = config.eval_detector();
    let eval_detector = if eval_config == config.detector {
        None
    } else {
        Some(ipr::detection::load_detector(&eval_config, &device).context("[eval.detector]")?)
    };
    let clip = match &config.eval.clip_model {
        Some(m) => Some(
            ipr_detect::ClipScorer::load(&super::resolve_folder(m)?, &device)
                .with_context(|| format!("eval.clip_model {}", m.display()))?,
        ),
        None => None,
    };
    let layout = RunLayout::new(config.runs_dir.join(&config.name));
    let resolved = config.to_toml();
    let others = ipr_diffusion::collective::disagreeing_ranks(world.collective(), resolved.as_bytes())?;
    if !others.is_empty() {
        bail!(
            "ranks {others:?} resolved another configuration than rank 0: every rank must run the same command \
             on the same files"
        );
    }
    // Rank 0 owns the run folder: it checks, creates or resumes it while the others wait.
    let _lock =
        if world.is_root() { Some(prepare_folder(&config, &layout, &resolved, &model, toy, a.resume)?) } else { None };
    world.collective().barrier()?;
    let model = if toy { layout.root.join("base-model") } else { model };
    let run = Run {
        config,
        layout,
        prompts,
        model,
        detector: detector.as_ref(),
        eval_detector: eval_detector.as_deref().unwrap_or(detector.as_ref()),
        clip: clip.as_ref(),
        device,
        device_name,
        world: world.collective(),
        quiet: a.quiet,
    };
    let metrics = ipr::run_loop::run(&run)?;
    if world.is_root() {
        ipr::run_loop::write_report(&run, &metrics)?;
        print!("{}", ipr::run_loop::metrics_table(&metrics));
    }
    Ok(())
}

/// Creates the run folder (`run.toml`, and the toy base model when the run uses it), or checks
/// that a folder to `--resume` was made with the same configuration; then checks the model
/// against the training settings, removing a folder it has just created when they do not fit.
fn prepare_folder(
    config: &RunConfig,
    layout: &RunLayout,
    resolved: &str,
    model: &std::path::Path,
    toy: bool,
    resume: bool,
) -> Result<ipr_core::lock::Lock> {
    let fresh = !layout.root.exists();
    if !fresh && !resume {
        bail!("{} exists: pass --resume to continue it, or choose another --name", layout.root.display());
    }
    std::fs::create_dir_all(&layout.root).with_context(|| format!("creating {}", layout.root.display()))?;
    // Held until this process ends: a second `ipr run` on the folder is refused before any work.
    let lock = ipr_core::lock::Lock::acquire(&layout.lock(), &format!("the run {}", layout.root.display()))?;
    if !fresh {
        // What a killed process was writing when it died is never read: clear it.
        ipr_core::fs::remove_temporaries_under(&layout.root)?;
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
        model.to_path_buf()
    };
    if let Err(e) = ipr::training::preflight(config, &model) {
        if fresh {
            // Nothing but the config and the exported base is there yet: leave no half-made run.
            let _ = std::fs::remove_dir_all(&layout.root);
        }
        return Err(e);
    }
    Ok(lock)
}

/// Half precision needs a device with half-precision kernels: candle's CPU backend computes
/// f16/bf16 convolutions and matrix products so slowly that a run would not finish, and the
/// training path is not built for it there.
fn check_dtype(config: &RunConfig, device: &candle_core::Device) -> Result<()> {
    for (key, dtype) in [("model.dtype", config.dtype()), ("model.vae_dtype", config.vae_dtype())] {
        if device.is_cpu() && dtype != candle_core::DType::F32 {
            bail!(
                "{key} is {dtype:?} on the CPU: the CPU runs f32 only (half precision is for model.device = \"cuda\")"
            );
        }
    }
    Ok(())
}
