//! The IPR loop, one readable function per stage, coupled only by artifacts on disk.
//!
//! ```text
//! runs/<name>/run.toml                  the resolved config (a resumed run must match it)
//! runs/<name>/.lock                     held by the process that runs it (one at a time)
//! runs/<name>/prompts/<set>.json        the prompt tables of the run (train, seen, validation,
//!                                       heldout) in VISOR's row format, SR2D ids kept
//! runs/<name>/round-<r>/samples/        training prompts sampled from model r (imagefolder)
//! runs/<name>/round-<r>/detections.jsonl
//! runs/<name>/round-<r>/labelled/       judged + relabeled (imagefolder: the round's feedback)
//! runs/<name>/round-<r>/train/          what model r+1 is trained on: the method's rows of
//!                                       rounds 0..=r (imagefolder)
//! runs/<name>/round-<r+1>/lora/         the adapter after round r (PEFT/diffusers keys)
//! runs/<name>/round-<i>/eval/<split>/   samples, detections.jsonl, metrics.json of model i
//! runs/<name>/metrics.json, report.html
//! ```
//!
//! Model 0 is the base model; model i > 0 is the base plus `round-<i>/lora`. Each stage skips
//! when its artifact exists (every artifact is written aside and renamed into place), so a
//! killed run restarted with `--resume` redoes only unfinished work and, all seeds being fixed
//! per stage, ends with the same results as an uninterrupted run.
//!
//! Under `mpirun` (a [`Collective`] of several ranks) every rank runs this loop: the sample,
//! detect and CLIP stages cut their work by global batch index (batch `j` to rank `j % n`), each
//! rank writes its part beside the artifact (`<artifact>.shards/<rank>-of-<n>`), and rank 0
//! merges the parts into the artifact one process would have written; training is data-parallel
//! over the ranks; rank 0 alone writes everything else. Rank 0 decides which stages to skip and
//! sends the small files it wrote (records, manifests) to the others, so every rank takes the
//! same branches whatever its view of the shared file system; a barrier ends every stage.

use crate::config::RunConfig;
use crate::metrics_file::{EvalSplit, MetricsFile, MetricsRow};
use crate::prompt_sets::PromptSets;
use crate::sampling::{sample_images_shard, write_sample_folder, PromptJob, SampleSettings};
use crate::shard::Shard;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use ipr_core::dataset::{read_detections, read_imagefolder, LabelledRow, SampleRow};
use ipr_core::metrics::visor_metrics;
use ipr_core::sr2d::PromptRow;
use ipr_core::stages::{relabel_detections, score_detections, write_labelled_folder, JudgeSummary};
use ipr_detect::Detector;
use ipr_diffusion::collective::{broadcast_from_root, root_decides, Collective};
use ipr_diffusion::pipeline::{Pipeline, SampleParams};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Paths of a run directory.
#[derive(Debug, Clone)]
pub struct RunLayout {
    pub root: PathBuf,
}

impl RunLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("run.toml")
    }
    /// The lock file of the process that owns the run (see `ipr_core::lock`).
    pub fn lock(&self) -> PathBuf {
        self.root.join(".lock")
    }
    pub fn prompts(&self) -> PathBuf {
        self.root.join("prompts")
    }
    pub fn round(&self, r: u32) -> PathBuf {
        self.root.join(format!("round-{r}"))
    }
    pub fn samples(&self, r: u32) -> PathBuf {
        self.round(r).join("samples")
    }
    pub fn detections(&self, r: u32) -> PathBuf {
        self.round(r).join("detections.jsonl")
    }
    pub fn labelled(&self, r: u32) -> PathBuf {
        self.round(r).join("labelled")
    }
    pub fn train(&self, r: u32) -> PathBuf {
        self.round(r).join("train")
    }
    pub fn lora(&self, i: u32) -> PathBuf {
        self.round(i).join("lora")
    }
    pub fn eval(&self, i: u32, split: EvalSplit) -> PathBuf {
        self.round(i).join("eval").join(split.name())
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.json")
    }
    pub fn report(&self) -> PathBuf {
        self.root.join("report.html")
    }
}

/// `metrics.json` of one evaluation (also the stage's completion marker).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    pub metrics: ipr_core::metrics::VisorMetrics,
    pub strict: JudgeSummary,
    /// CLIP score of the split's images against their prompts, with `eval.clip_model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f64>,
}

/// Everything the stages share.
pub struct Run<'a> {
    pub config: RunConfig,
    pub layout: RunLayout,
    pub prompts: PromptSets,
    pub model: PathBuf,
    /// Judges the training samples (the feedback IPR learns from).
    pub detector: &'a dyn Detector,
    /// Scores the evaluation: kept apart from `detector`, so that a loop cannot learn its own
    /// judge's blind spots and report them as progress.
    pub eval_detector: &'a dyn Detector,
    /// CLIP scorer for the evaluation images (`eval.clip_model`).
    pub clip: Option<&'a ipr_detect::ClipScorer>,
    pub device: Device,
    /// The device as named to the training request (`cuda:<local rank>` under a launcher).
    pub device_name: String,
    /// The ranks running this loop together (a process alone: `SingleProcess`).
    pub world: &'a dyn Collective,
    pub quiet: bool,
}

fn jobs(rows: &[PromptRow]) -> Vec<PromptJob> {
    rows.iter().map(|r| PromptJob { prompt_id: r.unique_id, text: r.text.clone() }).collect()
}

impl Run<'_> {
    /// Rank 0 reports for all ranks.
    pub(crate) fn quiet(&self) -> bool {
        self.quiet || self.world.rank() != 0
    }

    pub(crate) fn log(&self, msg: impl AsRef<str>) {
        if !self.quiet() {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Whether `path` exists as rank 0 sees it: every rank takes the same branch (a stage that
    /// one rank skips and another runs would leave their collectives out of step), whatever the
    /// rank's own view of the shared file system.
    pub(crate) fn exists(&self, path: &Path) -> Result<bool> {
        Ok(root_decides(self.world, path.exists())?)
    }

    /// The text of `path` as rank 0 reads it, on every rank (small files rank 0 has just written:
    /// a record, a manifest).
    fn read_on_root(&self, path: &Path) -> Result<String> {
        let bytes = if self.world.rank() == 0 {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        } else {
            Vec::new()
        };
        let bytes = broadcast_from_root(self.world, bytes)?;
        String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", path.display()))
    }

    /// This rank's share of the independent stages.
    fn shard(&self) -> Shard {
        Shard { index: self.world.rank(), count: self.world.size() }
    }

    /// Runs `write` on rank 0 alone; every rank returns once it is done. (An error on rank 0
    /// ends every rank: see `World::run`.)
    pub(crate) fn on_root(&self, write: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.world.rank() == 0 {
            write()?;
        }
        self.world.barrier()?;
        Ok(())
    }

    pub(crate) fn sample_params(&self) -> Result<SampleParams> {
        Ok(SampleParams {
            num_inference_steps: self.config.sampling.steps as usize,
            guidance_scale: self.config.sampling.guidance_scale,
            sampler: ipr_diffusion::sample::sampler_from_name(&self.config.sampling.scheduler)?,
        })
    }

    /// The base model, with the adapter of model `i` merged in when `i > 0`.
    pub(crate) fn pipeline(&self, i: u32) -> Result<Pipeline> {
        let mut pipe =
            Pipeline::load_with_vae_dtype(&self.model, self.config.dtype(), self.config.vae_dtype(), &self.device)
                .with_context(|| format!("loading {}", self.model.display()))?;
        if i > 0 {
            let lora = self.layout.lora(i);
            ipr_diffusion::train::load_lora(&mut pipe, &lora).with_context(|| format!("loading {}", lora.display()))?;
            for (_, linears) in ipr_diffusion::train::pipeline_linears(&mut pipe) {
                ipr_diffusion::lora::merge(linears)?;
            }
        }
        Ok(pipe)
    }

    /// Sample `rows` with model `i` into `out` (skipped when `out` exists); with several ranks,
    /// each samples its batches into its part and rank 0 merges them.
    fn sample_stage(&self, i: u32, rows: &[PromptRow], images_per_prompt: u32, seed: u64, out: &Path) -> Result<()> {
        if self.exists(out)? {
            return Ok(());
        }
        let shard = self.shard();
        let jobs = jobs(rows);
        let part =
            if shard.count > 1 { crate::shard::parts_dir(out).join(shard.part_name()) } else { out.to_path_buf() };
        if !part.exists() {
            let pipe = self.pipeline(i)?;
            let settings = SampleSettings {
                images_per_prompt,
                params: self.sample_params()?,
                seed,
                batch_size: self.config.sampling.batch_size as usize,
                size: self.config.image_size(),
                negative_prompt: self.config.sampling.negative_prompt.clone(),
            };
            let total = jobs.len() * images_per_prompt as usize;
            let mine = shard.items(total, settings.batch_size).len();
            let pb = crate::progress::bar(mine as u64, "sample", self.quiet());
            let samples = sample_images_shard(&pipe, &jobs, &settings, shard, &mut |n| pb.set_position(n as u64))
                .map_err(|e| {
                    let stage = format!("sampling {} with model {i}", out.display());
                    crate::oom::explain(e, &stage, settings.batch_size, "sampling.batch_size in run.toml")
                })?;
            pb.finish_and_clear();
            write_sample_folder(&part, &samples)?;
        }
        if shard.count > 1 {
            self.world.barrier()?;
            self.on_root(|| {
                crate::sampling::merge_sample_parts(out, &crate::sampling::file_names(&jobs, images_per_prompt))
            })?;
        }
        Ok(())
    }

    /// Detect every image of `samples` with `detector` into `out` (skipped when `out` exists);
    /// with several ranks, each detects its batches into its part and rank 0 merges them.
    fn detect_stage(&self, detector: &dyn Detector, samples: &Path, out: &Path) -> Result<()> {
        if self.exists(out)? {
            return Ok(());
        }
        let shard = self.shard();
        if shard.count == 1 {
            let rows = crate::detection::detect_folder(detector, samples, None, &self.prompts.vocab, self.quiet())?;
            ipr_core::fs::write_jsonl(out, &rows)?;
            return Ok(());
        }
        let rows: Vec<SampleRow> = read_imagefolder(samples)?;
        crate::detection::detect_shard(detector, samples, &rows, &self.prompts.vocab, shard, out, self.quiet())?;
        self.world.barrier()?;
        self.on_root(|| {
            let merged = crate::detection::merge_detection_parts(&rows, out)?;
            ipr_core::fs::write_jsonl(out, &merged)?;
            let parts = crate::shard::parts_dir(out);
            std::fs::remove_dir_all(&parts).with_context(|| format!("removing {}", parts.display()))
        })
    }

    /// Evaluate model `i` on `split` (skipped when its metrics exist).
    pub fn eval_stage(&self, i: u32, split: EvalSplit) -> Result<EvalRecord> {
        let dir = self.layout.eval(i, split);
        let record = dir.join("metrics.json");
        let read = || -> Result<EvalRecord> {
            let text = self.read_on_root(&record)?;
            ipr_core::fs::from_json_str(&text).map_err(|m| anyhow::anyhow!("{}: {m}", record.display()))
        };
        if self.exists(&record)? {
            return read();
        }
        let (samples, detections) = (dir.join("samples"), dir.join("detections.jsonl"));
        let rows = self.prompts.eval_rows(split);
        self.sample_stage(i, rows, self.config.eval.images_per_prompt, self.config.eval.seed, &samples)?;
        self.detect_stage(self.eval_detector, &samples, &detections)?;
        let clip_score = match self.clip {
            Some(scorer) => Some(self.clip_stage(scorer, &samples, &dir.join("clip_scores.json"))?),
            None => None,
        };
        self.on_root(|| {
            let found = read_detections(&detections)?;
            let scored = score_detections(&found, &self.prompts.vocab).map_err(anyhow::Error::msg)?;
            ipr_core::visor_format::write_results(&dir.join("visor_results.json"), &scored.entries)?;
            let metrics = visor_metrics(&scored.scores).map_err(anyhow::Error::msg)?;
            let out = EvalRecord { metrics, strict: scored.strict, clip_score };
            ipr_core::fs::write_json(&record, &out)?;
            self.log(format!(
                "model {i} {:<10}: OA {:6.2}  VISOR_uncond {:6.2}  VISOR_cond {:6.2}  strict {:6.2}{}",
                split.name(),
                metrics.oa,
                metrics.visor_uncond,
                metrics.visor_cond,
                out.strict.strict_accuracy(),
                clip_score.map(|c| format!("  CLIP {c:6.2}")).unwrap_or_default()
            ));
            Ok(())
        })?;
        read()
    }

    /// CLIP score of every image of `samples` against the prompt it was sampled from (the
    /// original prompt, never a relabeled one); per-image scores go to `out` (skipped when it
    /// exists). With several ranks, each scores its batches of [`CLIP_BATCH`] images (the same
    /// batches one process scores, so the same numbers) and rank 0 merges them.
    fn clip_stage(&self, scorer: &ipr_detect::ClipScorer, samples: &Path, out: &Path) -> Result<f64> {
        #[derive(Serialize, Deserialize)]
        struct ImageScore {
            file_name: String,
            score: f32,
        }
        let read = || -> Result<f64> {
            let text = self.read_on_root(out)?;
            let v: serde_json::Value =
                ipr_core::fs::from_json_str(&text).map_err(|m| anyhow::anyhow!("{}: {m}", out.display()))?;
            v["clip_score"].as_f64().ok_or_else(|| anyhow::anyhow!("{}: no clip_score", out.display()))
        };
        if self.exists(out)? {
            return read();
        }
        let rows: Vec<SampleRow> = read_imagefolder(samples)?;
        let shard = self.shard();
        let part = crate::shard::part_path(out, shard, ".jsonl");
        if shard.count == 1 || !part.exists() {
            let mine: Vec<SampleRow> =
                shard.items(rows.len(), CLIP_BATCH).into_iter().map(|i| rows[i].clone()).collect();
            let pb = crate::progress::bar(mine.len() as u64, "clip", self.quiet());
            let scores = if mine.is_empty() {
                Vec::new() // more ranks than batches
            } else {
                ipr_detect::folder::clip_score_rows(scorer, samples, &mine, CLIP_BATCH, &mut |n, _| {
                    pb.set_position(n as u64)
                })?
                .0
            };
            pb.finish_and_clear();
            let scores: Vec<ImageScore> =
                scores.into_iter().map(|(file_name, score)| ImageScore { file_name, score }).collect();
            ipr_core::fs::write_jsonl(&part, &scores)?;
        }
        self.world.barrier()?;
        self.on_root(|| {
            let parts = crate::shard::complete_parts(&crate::shard::parts_dir(out), ".jsonl")?;
            let parts = parts
                .into_iter()
                .map(|p| Ok((p.clone(), ipr_core::fs::read_jsonl(&p)?)))
                .collect::<Result<Vec<_>>>()?;
            let expected: Vec<String> = rows.iter().map(|r| r.file_name.clone()).collect();
            let scores = crate::shard::merge_rows(parts, |s: &ImageScore| s.file_name.clone(), &expected)?;
            let all: Vec<f32> = scores.iter().map(|s| s.score).collect();
            let per_image: serde_json::Map<String, serde_json::Value> =
                scores.into_iter().map(|s| (s.file_name, serde_json::Value::from(f64::from(s.score)))).collect();
            let score = ipr_detect::clip_score::clip_score(&all);
            ipr_core::fs::write_json(out, &serde_json::json!({"clip_score": score, "images": per_image}))?;
            let dir = crate::shard::parts_dir(out);
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
        })?;
        read()
    }

    /// Judge and relabel round `r`'s detections (skipped when the labelled folder exists).
    fn relabel_stage(&self, r: u32) -> Result<()> {
        let out = self.layout.labelled(r);
        if self.exists(&out)? {
            return Ok(());
        }
        self.on_root(|| self.relabel(r, &out))
    }

    fn relabel(&self, r: u32, out: &Path) -> Result<()> {
        let found = read_detections(&self.layout.detections(r))?;
        let (rows, s) = relabel_detections(
            &found,
            &self.prompts.vocab,
            self.config.relabel.policy,
            &self.config.relabel.weights,
            r,
        )
        .map_err(anyhow::Error::msg)?;
        self.log(format!(
            "round {r}: {} images, {} correct, {} location errors, {} count errors, {} dropped",
            s.images, s.correct, s.location_errors, s.count_errors, s.dropped
        ));
        write_labelled_folder(out, &rows, Some(&self.layout.samples(r)))?;
        Ok(())
    }

    /// The training set after round `r`: the method's rows of rounds 0..=r, images linked from
    /// their rounds' folders (file names prefixed by the round to stay unique).
    fn train_set_stage(&self, r: u32) -> Result<usize> {
        let out = self.layout.train(r);
        if !self.exists(&out)? {
            self.on_root(|| self.build_train_set(r, &out))?;
        }
        let manifest = out.join(ipr_core::dataset::METADATA);
        Ok(ipr_core::fs::parse_jsonl::<LabelledRow>(&manifest, &self.read_on_root(&manifest)?)?.len())
    }

    fn build_train_set(&self, r: u32, out: &Path) -> Result<()> {
        let method = self.config.method;
        let first = if method == ipr_core::method::Method::Pr { r } else { 0 };
        let mut all = Vec::new();
        // An image may be named by several rows (`relabel.* = "both"`): linked once.
        let mut linked = std::collections::HashSet::new();
        ipr_core::fs::build_dir(out, |tmp| -> Result<()> {
            for round in first..=r {
                let dir = self.layout.labelled(round);
                let rows: Vec<LabelledRow> = read_imagefolder(&dir)?;
                for mut row in method.training_rows(&rows, &self.config.relabel.treatments()) {
                    let name = format!("r{round}_{}", row.file_name);
                    if linked.insert(name.clone()) {
                        ipr_core::stages::link_or_copy(&dir.join(&row.file_name), &tmp.join(&name))?;
                    }
                    row.file_name = name;
                    all.push(row);
                }
            }
            Ok(ipr_core::fs::write_jsonl(&tmp.join(ipr_core::dataset::METADATA), &all)?)
        })
    }

    /// Train the adapter of model `r + 1` on the training set of round `r`, continuing from the
    /// adapter of model `r` (skipped when it exists).
    fn train_stage(&self, r: u32) -> Result<()> {
        let out = self.layout.lora(r + 1);
        if self.exists(&out)? {
            return Ok(());
        }
        let n = self.train_set_stage(r)?;
        if n == 0 {
            bail!(
                "round {r}: nothing to train on ({} has no rows): the base model produced no usable pair; \
                 sample more images per prompt or use relabel.policy = \"paper\"",
                self.layout.train(r).display()
            );
        }
        let previous = (r > 0).then(|| self.layout.lora(r));
        let mut req = crate::training::request(
            &self.config,
            r,
            &self.prompts.vocab,
            &self.model,
            previous.as_deref(),
            &self.layout.train(r),
            out,
            self.world.size(),
        );
        req.device = self.device_name.clone();
        let pb = crate::progress::bar(u64::from(self.config.train.steps), "train", self.quiet());
        crate::training::train_atomically(&req, self.world, &mut |step, loss| {
            pb.set_position(step as u64);
            pb.set_message(format!("loss {loss:.4}"));
        })
        .map_err(|e| {
            let stage = format!("round {r}: training {}", self.layout.lora(r + 1).display());
            crate::oom::explain(e, &stage, self.config.train.batch_size as usize, "train.batch_size in run.toml")
        })?;
        pb.finish_and_clear();
        Ok(())
    }
}

/// Images per CLIP batch in the evaluation; also the grain of its cut over ranks.
pub const CLIP_BATCH: usize = 16;

/// Seeds of round `r`'s stages, derived from the run seed.
fn round_seed(seed: u64, r: u32, stage: u64) -> u64 {
    crate::sampling::image_seed(seed, u64::from(r) + 1, stage as u32)
}

/// Run (or resume) the loop; returns the metrics rows.
pub fn run(run: &Run) -> Result<MetricsFile> {
    let c = &run.config;
    let method = c.method;
    let rounds = method.rounds(c.rounds);
    let mut metrics = MetricsFile::default();
    let mut push = |i: u32, split: EvalSplit, rec: &EvalRecord| {
        let name = if i == 0 { "base" } else { method.name() };
        let mut row = MetricsRow::new(name, i, split, &rec.metrics, rec.strict.strict_accuracy());
        row.clip_score = rec.clip_score;
        metrics.rows.push(row);
    };
    run.on_root(|| run.prompts.write_tables(&run.layout.prompts()).map(|_| ()))?;
    let splits = run.prompts.splits();
    for &split in &splits {
        push(0, split, &run.eval_stage(0, split)?);
    }
    for r in 0..rounds {
        run.log(format!("== round {} of {rounds} ({method})", r + 1));
        let seed = round_seed(c.seed, r, 1);
        if method.is_reinforcement() {
            run.ddpo_sample_stage(r, &run.prompts.train, seed, &run.layout.samples(r))?;
        } else {
            run.sample_stage(r, &run.prompts.train, c.sampling.images_per_prompt, seed, &run.layout.samples(r))?;
        }
        run.detect_stage(run.detector, &run.layout.samples(r), &run.layout.detections(r))?;
        // The judged set: what the supervised methods train on, and the report's gallery.
        run.relabel_stage(r)?;
        if method.is_reinforcement() {
            run.ddpo_train_stage(r)?;
        } else {
            run.train_stage(r)?;
        }
        for &split in &splits {
            push(r + 1, split, &run.eval_stage(r + 1, split)?);
        }
    }
    metrics.launch = Some(crate::metrics_file::Launch {
        world_size: run.world.size(),
        collective: run.world.describe(),
        train_shards_per_rank: (c.train.shards as usize / run.world.size()).max(1),
    });
    run.on_root(|| Ok(metrics.write(&run.layout.metrics())?))?;
    Ok(metrics)
}

/// The terminal table: one line per model and split.
pub fn metrics_table(m: &MetricsFile) -> String {
    use crate::metrics_file::VALUE_NAMES;
    let widths = VALUE_NAMES.map(|n| n.len().max(7));
    // "validation" is wider than the toy table's split column; the toy table keeps its layout.
    let split_w = m.rows.iter().map(|r| r.split.name().len()).max().unwrap_or(0).max(8);
    let clip = m.rows.iter().any(|r| r.clip_score.is_some());
    let mut s = format!("{:<9} {:>5} {:<split_w$}", "method", "round", "split");
    for (name, w) in VALUE_NAMES.iter().zip(widths) {
        s.push_str(&format!(" {name:>w$}"));
    }
    if clip {
        s.push_str(" CLIP_score");
    }
    s.push('\n');
    for r in &m.rows {
        s.push_str(&format!("{:<9} {:>5} {:<split_w$}", r.method, r.iteration, r.split.name()));
        for (v, w) in r.values().iter().zip(widths) {
            s.push_str(&format!(" {v:>w$.2}"));
        }
        if let Some(c) = r.clip_score {
            s.push_str(&format!(" {c:>10.2}"));
        }
        s.push('\n');
    }
    s
}

/// `report.html`: the metrics, the plot, and for every round the first images of its labelled
/// set with their relabeled prompts.
pub fn write_report(run: &Run, metrics: &MetricsFile) -> Result<()> {
    const PER_ROUND: usize = 24;
    let rounds = run.config.method.rounds(run.config.rounds);
    let mut galleries = Vec::new();
    for r in 0..rounds {
        let dir = run.layout.labelled(r);
        let rows: Vec<LabelledRow> = read_imagefolder(&dir)?;
        let items = rows
            .iter()
            .take(PER_ROUND)
            .map(|row| {
                Ok(crate::report::GalleryItem {
                    png: std::fs::read(dir.join(&row.file_name))?,
                    original_prompt: row.original_prompt.clone(),
                    prompt: row.prompt.clone(),
                    reason: format!("{:?}", row.reason).to_lowercase(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        galleries.push(crate::report::RoundGallery {
            title: format!("Round {r}: samples of model {r}, judged and relabeled ({} of {})", items.len(), rows.len()),
            items,
        });
    }
    let config = std::fs::read_to_string(run.layout.config())?;
    let title = format!("ipr run {} ({})", run.config.name, run.config.method);
    let html = crate::report::render_report(&crate::report::ReportData {
        title: &title,
        config_toml: &config,
        rows: &metrics.rows,
        galleries: &galleries,
        notes: &format!(
            "{}\ntraining samples judged by: {}\nevaluation scored by: {}\n",
            metrics_table(metrics),
            run.config.detector.describe(),
            run.config.eval_detector().describe()
        ),
    });
    ipr_core::fs::write_atomic(&run.layout.report(), html.as_bytes())?;
    Ok(())
}
