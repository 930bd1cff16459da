//! `ipr run` end to end at CI size: two IPR rounds on a small untrained toy model, every
//! artifact of the run layout, the metrics file, the report, and resume after an interruption
//! between stages, and after SIGKILL in the middle of stages, giving the same results.

use std::path::Path;
use std::process::{Command, Output};

fn ipr(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipr")).current_dir(dir).args(args).output().expect("ipr runs")
}

fn ok(o: &Output) {
    assert!(o.status.success(), "ipr failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

const CONFIG: &str = r#"
name = "ci"
rounds = 2
seed = 11
[prompts]
# The model is a toy model in a folder: a folder alone would mean SR2D.
set = "toy"
max_train = 3
max_eval = 2
[sampling]
images_per_prompt = 2
steps = 2
batch_size = 16
[train]
steps = 2
batch_size = 4
[eval]
images_per_prompt = 2
[relabel]
# The untrained model draws no recognisable object: the measured policy would drop every pair,
# the paper's keeps them as count captions, so training runs.
policy = "paper"
"#;

#[test]
fn two_rounds_artifacts_metrics_report_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&ipr(dir, &["toy", "init", "--out", "model", "--seed", "2"]));
    std::fs::write(dir.join("run.toml"), CONFIG).unwrap();
    let args = ["run", "--config", "run.toml", "--model", "model", "--quiet"];
    let first = ipr(dir, &args);
    ok(&first);
    let root = dir.join("runs/ci");
    for p in [
        "run.toml",
        "metrics.json",
        "report.html",
        "round-0/samples/metadata.jsonl",
        "round-0/detections.jsonl",
        "round-0/labelled/metadata.jsonl",
        "round-0/train/metadata.jsonl",
        "round-1/lora/pytorch_lora_weights.safetensors",
        "round-1/lora/adapter_config.json",
        "round-1/samples/metadata.jsonl",
        "round-1/labelled/metadata.jsonl",
        "round-1/train/metadata.jsonl",
        "round-2/lora/pytorch_lora_weights.safetensors",
        "round-0/eval/seen/metrics.json",
        "round-2/eval/heldout/visor_results.json",
    ] {
        assert!(root.join(p).exists(), "missing {p}");
    }
    // The training set of round 1 accumulates the labelled rows of rounds 0 and 1.
    let lines = |p: &str| std::fs::read_to_string(root.join(p)).unwrap().lines().count();
    assert_eq!(lines("round-0/labelled/metadata.jsonl"), 6);
    assert_eq!(lines("round-1/train/metadata.jsonl"), 12);

    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("metrics.json")).unwrap()).unwrap();
    let rows = metrics["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 9, "models 0, 1, 2 on seen, validation and heldout");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["iteration"].as_u64().unwrap(), i as u64 / 3);
        assert_eq!(row["split"], ["seen", "validation", "heldout"][i % 3]);
        for k in ["OA", "VISOR_uncond", "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4"] {
            let v = row[k].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{k} = {v}");
        }
    }
    let html = std::fs::read_to_string(root.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("data:image/png;base64,") && !html.contains("<script"));
    let table = String::from_utf8_lossy(&first.stdout);
    assert!(table.contains("VISOR_uncond") && table.lines().count() == 10, "{table}");

    // Interrupted between stages: round 1's training and everything after it are gone.
    let sample_time = std::fs::metadata(root.join("round-0/samples/metadata.jsonl")).unwrap().modified().unwrap();
    for p in ["round-2", "round-1/train", "metrics.json", "report.html"] {
        let p = root.join(p);
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    let again = ipr(dir, &args);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let resumed = ipr(dir, &[&args[..], &["--resume"]].concat());
    ok(&resumed);
    assert_eq!(
        std::fs::read_to_string(root.join("metrics.json")).unwrap(),
        serde_json::to_string_pretty(&metrics).unwrap() + "\n"
    );
    assert_eq!(resumed.stdout, first.stdout, "same table");
    let after = std::fs::metadata(root.join("round-0/samples/metadata.jsonl")).unwrap().modified().unwrap();
    assert_eq!(sample_time, after, "finished stages are not redone");

    // Killed with SIGKILL in the middle of stages (twice), then resumed: the same numbers.
    let killed_cfg = CONFIG.replace("name = \"ci\"", "name = \"killed\"");
    std::fs::write(dir.join("killed.toml"), &killed_cfg).unwrap();
    let kargs = ["run", "--config", "killed.toml", "--model", "model", "--quiet"];
    let kroot = dir.join("runs/killed");
    for (i, marker) in ["round-0/samples", "round-1/samples"].into_iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ipr"))
            .current_dir(dir)
            .args(if i == 0 { kargs.to_vec() } else { [&kargs[..], &["--resume"]].concat() })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while !kroot.join(marker).exists() && start.elapsed().as_secs() < 120 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL: no cleanup runs
        child.wait().unwrap();
        assert!(!kroot.join("metrics.json").exists(), "killed before the end ({marker})");
    }
    ok(&ipr(dir, &[&kargs[..], &["--resume"]].concat()));
    assert_eq!(
        std::fs::read_to_string(kroot.join("metrics.json")).unwrap(),
        serde_json::to_string_pretty(&metrics).unwrap() + "\n",
        "killed twice and resumed: the uninterrupted run's metrics"
    );

    // A different configuration cannot resume this run.
    std::fs::write(dir.join("run.toml"), CONFIG.replace("seed = 11", "seed = 12")).unwrap();
    let other = ipr(dir, &[&args[..], &["--resume"]].concat());
    assert!(!other.status.success() && String::from_utf8_lossy(&other.stderr).contains("another configuration"));
}

/// Runs `ipr run --config run.toml` with `text` in `dir`, asserts that it fails with `want` in
/// its error, and returns that error.
fn run_fails(dir: &Path, text: &str, want: &str) -> String {
    std::fs::write(dir.join("run.toml"), text).unwrap();
    let o = ipr(dir, &["run", "--config", "run.toml"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains(want), "{text}: {err}");
    err
}

#[test]
fn bad_configs_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (text, want) in [
        ("roundz = 1", "roundz"),
        ("[train]\nsteps = 0", "train.steps"),
        ("[model]\nsource = \"nowhere\"", "model.source"),
    ] {
        let err = run_fails(dir, text, want);
        assert!(err.contains("run.toml"), "{text}: {err}");
        assert!(!dir.join("runs").exists(), "nothing was started");
    }
}

/// Keys that need the model to check (LoRA targets, timestep range) fail before any stage runs
/// and leave no run folder behind.
#[test]
fn model_dependent_keys_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (text, want) in [
        ("[train]\nlora_targets = [\"to_qq\"]", "train.lora_targets"),
        ("[train]\ntimestep_range = [0, 2000]", "train.timestep_range is [0, 2000] for"),
    ] {
        run_fails(dir, text, want);
        assert!(!dir.join("runs/toy").exists(), "no half-made run is left");
    }
}

/// `relabel.* = "both"` names each wrong image twice (its relabeled caption and its original
/// prompt): the training set links the image once, and no image of the round is damaged (a copy
/// of a file onto its own hard link once truncated both).
#[test]
fn both_treatment_trains_on_two_captions_of_each_wrong_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&ipr(dir, &["toy", "init", "--out", "model", "--seed", "2"]));
    let config = CONFIG.replace("rounds = 2", "rounds = 1") + "location = \"both\"\ncount = \"both\"\n";
    std::fs::write(dir.join("run.toml"), config).unwrap();
    ok(&ipr(dir, &["run", "--config", "run.toml", "--model", "model", "--quiet"]));
    let root = dir.join("runs/ci/round-0");
    let rows = |p: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(root.join(p)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (labelled, train) = (rows("labelled/metadata.jsonl"), rows("train/metadata.jsonl"));
    let wrong = labelled.iter().filter(|r| r["correct"] == false).count();
    assert!(wrong > 0, "the untrained model gets some pair wrong");
    assert_eq!(train.len(), labelled.len() + wrong, "one row per correct image, two per wrong one");
    for r in &labelled {
        let name = r["file_name"].as_str().unwrap();
        let sample = std::fs::read(root.join("samples").join(name)).unwrap();
        assert!(!sample.is_empty());
        assert_eq!(std::fs::read(root.join("labelled").join(name)).unwrap(), sample, "{name} intact");
        assert_eq!(std::fs::read(root.join("train").join(format!("r0_{name}"))).unwrap(), sample);
        if r["correct"] == false {
            let prompts: Vec<_> =
                train.iter().filter(|t| t["file_name"] == format!("r0_{name}")).map(|t| &t["prompt"]).collect();
            assert_eq!(prompts, [&r["prompt"], &r["original_prompt"]], "{name}: relabeled, then original");
        }
    }
    assert!(dir.join("runs/ci/round-1/lora/pytorch_lora_weights.safetensors").exists());
}
