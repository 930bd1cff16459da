//! `ipr train`, `ipr sample --lora` and `ipr bench train-step` end to end on the tiny pixel-space
//! fixture pipeline of ipr-diffusion.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ipr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipr")).args(args).output().expect("ipr runs")
}

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ipr-diffusion/tests/fixtures/tiny-pixel")
}

fn check(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn imagefolder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let rows = [("a dog to the left of a car", [200u8, 20, 20], 1.0), ("a car above a dog", [20, 200, 20], 0.5)];
    let mut meta = String::new();
    for (i, (prompt, colour, weight)) in rows.iter().enumerate() {
        let mut img = image::RgbImage::from_pixel(16, 16, image::Rgb([120, 120, 120]));
        for y in 3..9 {
            for x in (2 + 6 * i as u32)..(8 + 6 * i as u32) {
                img.put_pixel(x, y, image::Rgb(*colour));
            }
        }
        img.save(dir.join(format!("{i}.png"))).unwrap();
        meta.push_str(&format!("{{\"file_name\": \"{i}.png\", \"prompt\": \"{prompt}\", \"weight\": {weight}}}\n"));
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
}

fn latents(path: &Path) -> Vec<f32> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t["latents"].flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn train_then_sample_with_the_adapter_then_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    imagefolder(&data);
    let out = tmp.path().join("lora");
    let (m, d, o) = (model(), data.to_str().unwrap().to_string(), out.to_str().unwrap().to_string());
    let m = m.to_str().unwrap();
    let train = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            m,
            "--data",
            &d,
            "--out",
            &o,
            "--lora-rank",
            "4",
            "--steps",
            steps,
            "--lr",
            "1e-2",
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--quiet",
            "--flip",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
        ];
        args.extend_from_slice(extra);
        ipr(&args)
    };
    check(&train("2", &[]));
    for f in ["pytorch_lora_weights.safetensors", "adapter_config.json", "training_state.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    check(&train("4", &["--resume"]));

    let sample = |lora: Option<&str>, file: &str| {
        let lat = tmp.path().join(file);
        let mut args = vec![
            "sample",
            "--model",
            m,
            "--prompt",
            "a dog to the left of a car",
            "--steps",
            "3",
            "--guidance",
            "3",
            "--seed",
            "7",
            "--output-latents",
            lat.to_str().unwrap(),
            "--out",
        ];
        let png = tmp.path().join(format!("{file}.png"));
        args.push(png.to_str().unwrap());
        if let Some(l) = lora {
            args.extend_from_slice(&["--lora", l]);
        }
        check(&ipr(&args));
        assert!(png.is_file());
        latents(&lat)
    };
    let base = sample(None, "base.safetensors");
    let adapted = sample(Some(&o), "lora.safetensors");
    assert_eq!(base.len(), adapted.len());
    assert!(base.iter().zip(&adapted).any(|(a, b)| a != b), "the adapter changed nothing");
}

/// `ipr bench train-step` prints its report as JSON; with `--profile-ops` also the table of
/// where a profiled step's time went, whose rows (the untimed rest included) add up to it.
#[test]
fn bench_train_step_prints_json() {
    let unet = model().join("unet");
    let o = ipr(&["bench", "train-step", "--unet", unet.to_str().unwrap(), "--batch", "2", "--iters", "1", "--json"]);
    check(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["ms_per_step"].as_f64().unwrap() > 0.0);
    assert!(v.get("ops").is_none());
    let args = ["bench", "train-step", "--unet", unet.to_str().unwrap(), "--batch", "2", "--iters", "1"];
    let o = ipr(&[&args[..], &["--profile-ops", "2", "--json"]].concat());
    check(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ops = v["ops"].as_array().unwrap();
    let names: Vec<&str> = ops.iter().map(|r| r["op"].as_str().unwrap()).collect();
    for op in ["conv", "linear", "linear.backward", "attention", "(untimed)"] {
        assert!(names.contains(&op), "{op} missing from {names:?}");
    }
    let sum: f64 = ops.iter().map(|r| r["ms"].as_f64().unwrap()).sum();
    let step = v["ms_profiled_step"].as_f64().unwrap();
    assert!((sum - step).abs() < 1e-6 * step.max(1.0), "{sum} vs {step}");
}

/// `ipr bench train-step` on an SDXL UNet (`addition_embed_type: "text_time"`) passes its added
/// conditioning (it failed without it).
#[test]
fn bench_train_step_runs_an_sdxl_unet() {
    let unet = model().join("../tiny-sdxl/unet");
    let o = ipr(&["bench", "train-step", "--unet", unet.to_str().unwrap(), "--batch", "2", "--iters", "1", "--json"]);
    check(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["ms_per_step"].as_f64().unwrap() > 0.0 && v["lora_parameters"].as_u64().unwrap() > 0);
}

/// `ipr selftest` passes on the CPU in f32 (every op against its f64 twin) and says so in JSON;
/// a dtype the CPU cannot compute fails with a non-zero exit status naming the checks.
#[test]
fn selftest_passes_on_the_cpu() {
    let o = ipr(&["selftest", "--json"]);
    check(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["checks"].as_array().unwrap().len() > 30);
    let o = ipr(&["selftest", "--dtype", "bf16"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("check(s) failed on Cpu in bf16"));
}

/// `ipr bench sample` with no `--model` runs the built-in toy base model from any directory,
/// leaves no temporary folder behind, and reports the products' FLOPs against a measured peak.
#[test]
fn bench_sample_runs_the_built_in_model_from_anywhere() {
    let cwd = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ipr"))
        .args(["bench", "sample", "--batch", "2", "--steps", "2", "--iters", "1", "--json"])
        .current_dir(cwd.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ipr runs");
    let exported = std::env::temp_dir().join(format!("ipr-bench-toy-base-{}", child.id()));
    let o = child.wait_with_output().unwrap();
    check(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["steps_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["gflop_per_step"].as_f64().unwrap() > 0.0 && v["peak_gflop_per_s"].as_f64().unwrap() > 0.0);
    assert!(!exported.exists(), "the exported model was left at {}", exported.display());
}

/// `ipr bench gemm` prints one JSON line per size with the rate of that product.
#[test]
fn bench_gemm_prints_a_line_per_size() {
    let o = ipr(&["bench", "gemm", "--n", "32,96", "--iters", "1"]);
    check(&o);
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|v| v["n"].as_u64().unwrap()).collect::<Vec<_>>(), [32, 96]);
    assert!(lines.iter().all(|v| v["gflop_per_s"].as_f64().unwrap() > 0.0));
}

/// `--timestep-range` takes `LO,HI` and refuses an empty or malformed range by name.
#[test]
fn timestep_range_flag_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model();
    for bad in ["300", "900,100", "a,b"] {
        let o = ipr(&[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            tmp.path().to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
            "--timestep-range",
            bad,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--timestep-range") && err.contains("LO < HI"), "{bad}: {err}");
    }
}
