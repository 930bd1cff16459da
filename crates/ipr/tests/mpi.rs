//! `ipr train` and `ipr run` under `mpirun` (the `mpi` feature; Open MPI from Debian's
//! `openmpi-bin libopenmpi-dev`, installed by `.ci/run`): data-parallel training gives one
//! process's adapter bit for bit, and a run spread over ranks ends with one process's results.
//! Built and run by `.ci/run` as `cargo test -p ipr --features mpi --test mpi`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ipr(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipr")).current_dir(dir).args(args).output().expect("ipr runs")
}

/// One `mpirun` at a time: Open MPI's ranks poll while they wait in a collective, so several
/// jobs on CI's 2 cores would mostly take turns spinning.
static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `mpirun -n <ranks> ipr <args>`, ended (and failed) if it is not done in 5 minutes: a rank
/// left waiting in a collective must show up as a failure, not as a CI job that never ends.
fn mpirun(dir: &Path, ranks: usize, args: &[&str]) -> Output {
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("mpirun");
    cmd.current_dir(dir)
        // CI runs as root, and more ranks than the machine's 2 cores: waiting ranks yield.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_mpi_yield_when_idle", "1")
        .args(["--oversubscribe", "-n", &ranks.to_string(), env!("CARGO_BIN_EXE_ipr")])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("mpirun runs (install openmpi-bin)");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("mpirun -n {ranks} ipr {args:?} did not end in 5 minutes (a rank left waiting?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn imagefolder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let prompts =
        ["a dog to the left of a car", "a car above a dog", "a dog below a car", "a car to the right of a dog"];
    let mut meta = String::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let img =
            image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(i as u32 * 40 + x * 7) as u8, (y * 9) as u8, 90]));
        img.save(dir.join(format!("{i}.png"))).unwrap();
        let weight = if i % 2 == 0 { 1.0 } else { 0.5 };
        meta.push_str(&format!("{{\"file_name\": \"{i}.png\", \"prompt\": \"{prompt}\", \"weight\": {weight}}}\n"));
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
}

#[test]
fn data_parallel_training_gives_one_process_adapter_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    imagefolder(&dir.join("data"));
    let model = root().join("crates/ipr-diffusion/tests/fixtures/tiny-pixel");
    let model = model.to_str().unwrap();
    let train = |out: &str, shards: &str, batch: &str| -> Vec<String> {
        [
            "train",
            "--model",
            model,
            "--data",
            "data",
            "--out",
            out,
            "--steps",
            "3",
            "--batch-size",
            batch,
            "--grad-accum",
            "2",
            "--lr",
            "1e-2",
            "--seed",
            "5",
            "--flip",
            "--vocab",
            "coco80",
            "--shards",
            shards,
            "--quiet",
        ]
        .map(String::from)
        .to_vec()
    };
    let adapter = |out: &str| std::fs::read(dir.join(out).join("pytorch_lora_weights.safetensors")).unwrap();
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    // (ranks, shards per rank, batch) against one process with ranks x shards.
    for (ranks, per_rank, batch) in [(2, 1, 4), (3, 1, 4), (2, 2, 4), (3, 1, 2)] {
        let one = format!("one-{ranks}-{per_rank}-{batch}");
        let many = format!("mpi-{ranks}-{per_rank}-{batch}");
        ok(&ipr(dir, &args(&train(&one, &(ranks * per_rank).to_string(), &batch.to_string()))));
        ok(&mpirun(dir, ranks, &args(&train(&many, &per_rank.to_string(), &batch.to_string()))));
        assert!(
            adapter(&one) == adapter(&many),
            "mpirun -n {ranks} --shards {per_rank} (batch {batch}) gives one process's --shards {} adapter",
            ranks * per_rank
        );
        for f in ["adapter_config.json", "training_state.safetensors"] {
            assert!(
                std::fs::read(dir.join(&one).join(f)).unwrap() == std::fs::read(dir.join(&many).join(f)).unwrap(),
                "{f}"
            );
        }
    }
    // Against a different number of pieces the adapter differs only in float rounding.
    ok(&ipr(dir, &args(&train("whole", "1", "4"))));
    let load = |out: &str| {
        candle_core::safetensors::load(
            dir.join(out).join("pytorch_lora_weights.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (load("whole"), load("mpi-2-1-4"));
    for (k, t) in &a {
        let d = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{k}: {d}");
    }
}

const TOY_RUN: &str = r#"
name = "toy"
rounds = 2
[prompts]
max_train = 8
max_eval = 6
[sampling]
images_per_prompt = 2
steps = 4
# 16 images per round in batches of 3: 6 batches, so both ranks sample, detect and judge some.
batch_size = 3
[train]
steps = 4
batch_size = 4
# Large enough that the rounds' models differ from the base model.
learning_rate = 0.05
[eval]
images_per_prompt = 2
"#;

/// Every file under `dir` but the ones named, by relative path.
fn tree(dir: &Path, skip: &[&str]) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if skip.iter().any(|s| rel == Path::new(s)) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_run_over_two_ranks_ends_with_one_process_results() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("run.toml"), TOY_RUN).unwrap();
    ok(&ipr(dir, &["run", "--config", "run.toml", "--name", "one", "--quiet"]));
    let table = ok(&mpirun(dir, 2, &["run", "--config", "run.toml", "--name", "two", "--quiet"]));
    // 2 rounds x 3 evaluation splits (seen, validation, heldout): printed once, by rank 0.
    assert_eq!(table.matches("ipr ").count(), 6, "rank 0 alone prints the table:\n{table}");
    let metrics = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("runs").join(name).join("metrics.json")).unwrap()).unwrap()
    };
    let (one, two) = (metrics("one"), metrics("two"));
    assert_eq!(one["rows"], two["rows"], "the same metrics, every digit");
    // Training changed the model: some metric of some split differs between the base and round 2.
    let row = |i: u64, split: &serde_json::Value| {
        one["rows"].as_array().unwrap().iter().find(|r| r["iteration"] == i && &r["split"] == split).unwrap().clone()
    };
    let base: Vec<_> = one["rows"].as_array().unwrap().iter().filter(|r| r["iteration"] == 0).collect();
    assert_eq!(base.len(), 3, "seen, validation and heldout are evaluated");
    assert!(
        base.iter().any(|b| ["OA", "VISOR_uncond"].iter().any(|k| b[*k] != row(2, &b["split"])[*k])),
        "training changed the model"
    );
    assert_eq!((one["launch"]["world_size"].as_u64(), two["launch"]["world_size"].as_u64()), (Some(1), Some(2)));
    assert_eq!(two["launch"]["train_shards_per_rank"].as_u64(), Some(1));
    assert!(two["launch"]["collective"].as_str().unwrap().starts_with("MPI"));
    // Every artifact, byte for byte: samples, detections, labelled sets, adapters, evaluations.
    let skip = ["run.toml", "metrics.json", "report.html", ".lock"];
    let (a, b) = (tree(&dir.join("runs/one"), &skip), tree(&dir.join("runs/two"), &skip));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "the same files, and no part left behind");
    for (path, bytes) in &a {
        assert!(bytes == &b[path], "{} differs", path.display());
    }

    // A rank that fails ends every rank, with the error, instead of leaving the others waiting.
    let o = mpirun(dir, 2, &["run", "--config", "run.toml", "--name", "two", "--quiet"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("exists: pass --resume"), "{err}");
    // Resumed under mpirun, a finished run does nothing and prints the same table.
    let again = ok(&mpirun(dir, 2, &["run", "--config", "run.toml", "--name", "two", "--quiet", "--resume"]));
    assert_eq!(again, table);
}

#[test]
fn a_run_over_ranks_with_learned_detectors_and_clip_matches_one_process() {
    // SR2D on the tiny SD 2.1-like pipeline: OWL-ViT judge, VISOR's evaluator, CLIP score, all
    // cut over 3 ranks.
    let fixtures = root().join("crates/ipr-detect/tests/fixtures/owlvit");
    let config = format!(
        r#"
name = "sd21"
rounds = 1
seed = 3
[model]
source = "{model}"
[prompts]
set = "sr2d"
max_train = 3
max_eval = 3
[sampling]
height = 64
width = 64
steps = 2
images_per_prompt = 2
batch_size = 2
[detector]
kind = "owlvit"
model = "{owl}"
threshold = 0.05
[relabel]
policy = "paper"
[train]
steps = 2
batch_size = 2
shards = 3
[eval]
images_per_prompt = 2
clip_model = "{clip}"
"#,
        model = root().join("crates/ipr-diffusion/tests/fixtures/tiny-sd21").display(),
        owl = fixtures.join("tiny-owlvit").display(),
        clip = fixtures.join("tiny-clip").display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("run.toml"), config).unwrap();
    ok(&ipr(dir, &["run", "--config", "run.toml", "--name", "one", "--quiet"]));
    ok(&mpirun(dir, 3, &["run", "--config", "run.toml", "--name", "three", "--quiet"]));
    let skip = ["run.toml", "metrics.json", "report.html", ".lock"];
    let (a, b) = (tree(&dir.join("runs/one"), &skip), tree(&dir.join("runs/three"), &skip));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.keys().any(|p| p.ends_with("clip_scores.json")));
    for (path, bytes) in &a {
        assert!(bytes == &b[path], "{} differs", path.display());
    }
}
