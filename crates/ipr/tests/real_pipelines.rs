//! `ipr run` on diffusers folders: the SR2D prompt set over COCO-80 with a learned detector, on
//! the committed tiny SD 1.5-like, SD 2.1-like and SDXL-like pipelines (random weights, real
//! formats) and the tiny OWL-ViT, at a non-square size; kill and resume; `ipr sample --prompts`
//! in VISOR's layout; the bad inputs a real run meets, each refused before any work.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ipr_core::pair_split::row_pair;
use ipr_core::sr2d::{read_rows, sr2d_rows};
use ipr_core::Vocabulary;

fn ipr(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipr")).current_dir(dir).args(args).output().expect("ipr runs")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "ipr failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fails(o: &Output) -> String {
    assert!(!o.status.success(), "ipr should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn pipeline(name: &str) -> PathBuf {
    root().join("crates/ipr-diffusion/tests/fixtures").join(name)
}

fn owl(name: &str) -> PathBuf {
    root().join("crates/ipr-detect/tests/fixtures/owlvit").join(name)
}

/// The contract's config: SR2D, 64 x 96 images, OWL-ViT feedback with a model and threshold;
/// budgets cut to CI size.
fn config(model: &Path, extra: &str) -> String {
    format!(
        r#"
name = "sr2d"
rounds = 2
seed = 3
[model]
source = "{model}"
[prompts]
set = "sr2d"
max_train = 3
max_eval = 1
[sampling]
height = 64
width = 96
steps = 2
images_per_prompt = 2
batch_size = 4
negative_prompt = "blurry"
[detector]
kind = "owlvit"
model = "{owl}"
threshold = 0.05
[relabel]
# Random weights draw nothing recognisable: the paper's policy keeps every pair (count
# captions), so each round has something to train on.
policy = "paper"
[train]
steps = 2
batch_size = 2
[eval]
images_per_prompt = 2
{extra}
"#,
        model = model.display(),
        owl = owl("tiny-owlvit").display()
    )
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs the contract's config on `model` and checks the run's prompts, splits, sizes and pairs.
fn run_and_check(text: String) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("run.toml"), text).unwrap();
    ok(&ipr(dir, &["run", "--config", "run.toml", "--quiet"]));
    let run = dir.join("runs/sr2d");
    let vocab = Vocabulary::coco80();
    let sr2d = sr2d_rows(&vocab);
    let pairs_of = |table: &str| -> BTreeSet<_> {
        read_rows(&run.join("prompts").join(table)).unwrap().iter().map(|r| row_pair(r, &vocab).unwrap()).collect()
    };
    let never_trained: BTreeSet<_> = pairs_of("heldout.json").union(&pairs_of("validation.json")).copied().collect();
    assert!(!never_trained.is_empty());
    for r in 0..2 {
        let rows = jsonl(&run.join(format!("round-{r}/samples/metadata.jsonl")));
        assert_eq!(rows.len(), 3 * 2, "3 training prompts x 2 images");
        for row in &rows {
            let id = row["prompt_id"].as_u64().unwrap();
            assert_eq!(row["prompt"], sr2d[id as usize].text.as_str(), "prompt_id is the SR2D unique_id");
            let pair = row_pair(&sr2d[id as usize], &vocab).unwrap();
            assert!(!never_trained.contains(&pair), "{} is a held-out or validation pair", row["prompt"]);
            let img =
                image::open(run.join(format!("round-{r}/samples")).join(row["file_name"].as_str().unwrap())).unwrap();
            assert_eq!((img.width(), img.height()), (96, 64), "sampling.width x sampling.height");
        }
    }
    for i in 0..=2 {
        for split in ["seen", "validation", "heldout"] {
            let d = run.join(format!("round-{i}/eval/{split}"));
            assert!(d.join("metrics.json").is_file(), "missing {}", d.display());
            for row in jsonl(&d.join("samples/metadata.jsonl")) {
                let id = row["prompt_id"].as_u64().unwrap();
                assert_eq!(row["prompt"], sr2d[id as usize].text.as_str());
            }
        }
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    let splits: Vec<&str> = metrics["rows"].as_array().unwrap().iter().map(|r| r["split"].as_str().unwrap()).collect();
    assert_eq!(splits.len(), 9, "models 0..=2 on three splits");
    assert_eq!(&splits[..3], ["seen", "validation", "heldout"]);
    (tmp, run)
}

#[test]
fn sr2d_run_on_tiny_sd15() {
    run_and_check(config(&pipeline("tiny-sd15"), ""));
}

/// SDXL as the paper trains it: adapters on the UNet and both text encoders; sampled with
/// DPM-Solver++.
#[test]
fn sr2d_run_on_tiny_sdxl_with_text_encoder_lora_and_dpmsolver() {
    let text = config(&pipeline("tiny-sdxl"), "")
        .replace("[train]\n", "[train]\ntext_encoder_lora = true\n")
        .replace("steps = 2\nimages_per_prompt", "steps = 2\nscheduler = \"dpmsolver++\"\nimages_per_prompt");
    let (_tmp, run) = run_and_check(text);
    let adapter = std::fs::read(run.join("round-2/lora/pytorch_lora_weights.safetensors")).unwrap();
    let keys: Vec<String> =
        safetensors::SafeTensors::deserialize(&adapter).unwrap().names().into_iter().map(String::from).collect();
    for prefix in ["unet.", "text_encoder.", "text_encoder_2."] {
        assert!(keys.iter().any(|k| k.starts_with(prefix)), "no {prefix} adapter in {keys:?}");
    }
}

/// SD 2.1-like, with a CLIP score and a separate evaluator; killed mid-run and resumed to the
/// uninterrupted run's metrics.
#[test]
fn sr2d_run_on_tiny_sd21_with_clip_score_resumes_after_kill() {
    let clip = format!("clip_model = \"{}\"", owl("tiny-clip").display());
    let (_tmp, run) = run_and_check(config(&pipeline("tiny-sd21"), &clip));
    let metrics = std::fs::read_to_string(run.join("metrics.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    for row in m["rows"].as_array().unwrap() {
        let c = row["CLIP_score"].as_f64().expect("CLIP_score in every row");
        assert!((0.0..=100.0).contains(&c));
    }
    let report = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(report.contains("training samples judged by: owlvit") && report.contains("evaluation scored by: owlvit"));
    assert!(report.contains("score &gt; 0.1"), "VISOR's threshold evaluates when [eval.detector] is unset");

    // Kill the same run at a random-ish point after it started, then resume.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("run.toml"), config(&pipeline("tiny-sd21"), &clip)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipr"))
        .current_dir(dir)
        .args(["run", "--config", "run.toml", "--quiet"])
        .spawn()
        .unwrap();
    let marker = dir.join("runs/sr2d/round-0/samples");
    let start = std::time::Instant::now();
    while !marker.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&ipr(dir, &["run", "--config", "run.toml", "--quiet", "--resume"]));
    let resumed = std::fs::read_to_string(dir.join("runs/sr2d/metrics.json")).unwrap();
    assert_eq!(resumed, metrics, "a killed and resumed run ends with the uninterrupted run's metrics");
}

#[test]
fn sample_prompts_writes_visors_layout_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vocab = Vocabulary::coco80();
    let rows: Vec<_> = [1103u64, 11036, 19100].iter().map(|&i| sr2d_rows(&vocab)[i as usize].clone()).collect();
    std::fs::write(dir.join("table.json"), ipr_core::sr2d::to_visor_json(&rows)).unwrap();
    let model = pipeline("tiny-sd15");
    let args = [
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        "table.json",
        "--images-per-prompt",
        "3",
        "--out",
        "bench",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "48",
        "--batch-size",
        "2",
    ];
    ok(&ipr(dir, &args));
    let listing = || -> Vec<(String, std::time::SystemTime, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir.join("bench"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().modified().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let first = listing();
    let names: Vec<&str> = first.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "11036_0.png",
            "11036_1.png",
            "11036_2.png",
            "1103_0.png",
            "1103_1.png",
            "1103_2.png",
            "19100_0.png",
            "19100_1.png",
            "19100_2.png"
        ],
        "exactly <unique_id>_<k>.png for k < K"
    );
    let img = image::load_from_memory(&first[0].2).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = ok(&ipr(dir, &args));
    assert!(again.contains("0 images made, 9 already there"), "{again}");
    assert_eq!(listing(), first, "a repeated call rewrites nothing");
    // A stopped call resumes: a missing image is made again, the same image.
    std::fs::remove_file(dir.join("bench/1103_1.png")).unwrap();
    std::fs::write(dir.join("bench/.1103_1.png.tmp-1"), b"half").unwrap();
    let resumed = ok(&ipr(dir, &args));
    assert!(resumed.contains("1 images made, 8 already there"), "{resumed}");
    let after = listing();
    assert_eq!(
        after.iter().map(|(n, _, b)| (n, b)).collect::<Vec<_>>(),
        first.iter().map(|(n, _, b)| (n, b)).collect::<Vec<_>>()
    );

    // Sharded into one folder, by flag or by Slurm's array variables: the unsharded call's files,
    // byte for byte.
    for (n, by_env) in [(2usize, false), (3, true)] {
        let sharded = format!("bench-{n}");
        for i in 0..n {
            let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let pos = a.iter().position(|x| x == "bench").unwrap();
            a[pos] = sharded.clone();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipr"));
            cmd.current_dir(dir);
            if by_env {
                cmd.env("SLURM_ARRAY_TASK_ID", i.to_string()).env("SLURM_ARRAY_TASK_COUNT", n.to_string());
            } else {
                a.extend(["--shard".to_string(), format!("{i}/{n}")]);
            }
            ok(&cmd.args(&a).output().unwrap());
        }
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.join(&sharded))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        let want: Vec<(String, Vec<u8>)> = first.iter().map(|(n, _, b)| (n.clone(), b.clone())).collect();
        assert!(files == want, "{n} shards give the unsharded call's files, byte for byte");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_ipr"))
        .current_dir(dir)
        .args(args)
        .args(["--shard", "0/2"])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    assert!(fails(&o).contains("the shard sources disagree"));

    // VISOR's protocol scores the folder with the prompt table.
    let owlvit = owl("tiny-owlvit");
    let o = ipr(
        dir,
        &[
            "eval",
            "visor",
            "--images",
            "bench",
            "--prompts",
            "table.json",
            "--model",
            owlvit.to_str().unwrap(),
            "--json",
            "--quiet",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ok(&o);
    assert!(out.contains("VISOR_uncond"), "{out}");
}

#[test]
fn bad_inputs_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = pipeline("tiny-sd15");
    let run_with = |name: &str, text: String| -> String {
        std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
        let e = fails(&ipr(dir, &["run", "--config", &format!("{name}.toml"), "--quiet"]));
        assert!(!dir.join("runs/sr2d").exists(), "{name}: no run folder is left behind");
        e
    };
    // The tiny pipelines need multiples of 4 (VAE factor 2 x UNet downsampling 2).
    let e = run_with("size", config(&model, "").replace("height = 64", "height = 66"));
    assert!(e.contains("sampling.height is 66, not a multiple of 4"), "{e}");
    let e = run_with("dtype", config(&model, "").replace("[model]", "[model]\ndtype = \"f16\""));
    assert!(e.contains("model.dtype is F16 on the CPU"), "{e}");
    let e = run_with("kind", config(&model, "").replace("tiny-owlvit", "tiny-owlv2"));
    assert!(e.contains("config.json: model_type is \"owlv2\", but the detector kind is \"owlvit\""), "{e}");
    let e = run_with("folder", config(&model, "").replace(owl("tiny-owlvit").to_str().unwrap(), "/nonexistent"));
    assert!(e.contains("detector.model /nonexistent: no config.json there"), "{e}");

    // A prompt table naming classes outside COCO-80.
    let mut rows = vec![sr2d_rows(&Vocabulary::coco80())[1103].clone()];
    rows[0].obj_1_attributes = vec!["dragon".into()];
    rows[0].text = "a dragon to the right of a bicycle".into();
    std::fs::write(dir.join("bad.json"), ipr_core::sr2d::to_visor_json(&rows)).unwrap();
    let o = ipr(dir, &["sample", "--model", model.to_str().unwrap(), "--prompts", "bad.json", "--out", "x"]);
    let e = fails(&o);
    assert!(e.contains("bad.json") && e.contains("row 0 (unique_id 1103)") && e.contains("dragon"), "{e}");
    assert!(!dir.join("x").exists(), "nothing sampled");
}
