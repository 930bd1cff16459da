//! The `ipr` binary end to end: the commands of the foundation, on real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ipr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipr")).args(args).output().expect("ipr runs")
}

fn visor_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ipr-core/tests/fixtures/visor")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn prompts_sr2d_writes_visors_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sr2d.json");
    let o = ipr(&["prompts", "sr2d", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(rows.len(), 31_680);
    assert_eq!(rows[1103]["text"], "a kite to the right of a bicycle");
    assert_eq!(rows[11036]["text"], "a cat below a bottle");
    let keys: Vec<_> = rows[0].as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["unique_id", "num_objects", "obj_1_attributes", "obj_2_attributes", "rel_type", "text"]);

    // The spatial prompts alone, the rows VISOR scores, ids kept.
    let spatial = dir.path().join("spatial.json");
    let o = ipr(&["prompts", "sr2d", "--spatial-only", "--out", spatial.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let some: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&spatial).unwrap()).unwrap();
    let want: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r["rel_type"] != "and" && r["rel_type"] != "single").collect();
    assert_eq!(some.len(), 25_280);
    assert!(some.iter().zip(want).all(|(a, b)| a == b));
}

#[test]
fn eval_visor_json_prints_one_object_matching_visor_py() {
    let results = visor_fixtures().join("results_seed2.json");
    let o = ipr(&["eval", "visor", "--results", results.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "one JSON object on one line");
    let got: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let keys: Vec<_> = got.keys().cloned().collect();
    assert_eq!(keys, ["OA", "VISOR_uncond", "VISOR_cond", "VISOR_1", "VISOR_2", "VISOR_3", "VISOR_4"]);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(visor_fixtures().join("expected.json")).unwrap()).unwrap();
    for k in keys {
        let (g, w) = (got[&k].as_f64().unwrap(), expected["models"]["seed2"][&k].as_f64().unwrap());
        assert!((g - w).abs() <= 0.005 + 1e-9, "{k}: {g} vs visor.py {w}");
    }
    // The readable table.
    let o = ipr(&["eval", "visor", "--results", results.to_str().unwrap(), "--by-relation"]);
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.contains("VISOR_uncond") && table.contains("above"), "{table}");
}

#[test]
fn bad_inputs_fail_with_the_place_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"12_0": {"classes": ["dog"], "recall": 1}}"#).unwrap();
    let o = ipr(&["eval", "visor", "--results", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("bad.json") && e.contains("\"12_0\"") && e.contains("missing field `sra`"), "{e}");
    let o = ipr(&["eval", "visor", "--results", dir.path().join("missing.json").to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("missing.json"));
    let o = ipr(&["relabel", "--detections", bad.to_str().unwrap(), "--policy", "best", "--out", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("best"), "{}", stderr(&o));
}

#[test]
fn detections_to_labelled_imagefolder_and_visor_results() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    std::fs::create_dir(&samples).unwrap();
    let det = |k: u32, dog: f64, cat: f64| {
        serde_json::json!({"file_name": format!("10801_{k}.png"), "prompt_id": 10801, "prompt": "a dog to the left of a cat",
            "image_index": k, "detections": [{"label": "dog", "score": 0.9, "box": [dog, 0.0, dog + 2.0, 2.0]},
                                              {"label": "cat", "score": 0.8, "box": [cat, 0.0, cat + 2.0, 2.0]}]})
    };
    let lines: Vec<String> = [det(0, 0.0, 10.0), det(1, 10.0, 0.0)].iter().map(|v| v.to_string()).collect();
    let detections = dir.path().join("detections.jsonl");
    std::fs::write(&detections, lines.join("\n") + "\n").unwrap();
    for k in 0..2 {
        std::fs::write(samples.join(format!("10801_{k}.png")), b"not decoded here").unwrap();
    }
    let out = dir.path().join("labelled");
    let o = ipr(&[
        "relabel",
        "--detections",
        detections.to_str().unwrap(),
        "--policy",
        "paper",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = std::fs::read_to_string(out.join("metadata.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = meta.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows[0]["prompt"], "a dog to the left of a cat");
    assert_eq!(rows[1]["prompt"], "a dog to the right of a cat");
    assert_eq!((rows[1]["weight"].as_f64(), rows[1]["reason"].as_str()), (Some(0.5), Some("location")));
    assert!(out.join("10801_1.png").is_file());

    let results = dir.path().join("results.json");
    let o = ipr(&[
        "eval",
        "visor",
        "--detections",
        detections.to_str().unwrap(),
        "--write-results",
        results.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((m["OA"].as_f64(), m["VISOR_uncond"].as_f64()), (Some(100.0), Some(50.0)));
    // The written results file scores the same through VISOR's path.
    // Prompt 10801 of SR2D is "a dog to the left of a cat": the written results file, scored
    // through VISOR's path (objects from the SR2D table), gives the same numbers.
    let o2 = ipr(&["eval", "visor", "--results", results.to_str().unwrap(), "--json"]);
    assert!(o2.status.success(), "{}", stderr(&o2));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o2.stdout).unwrap(), m);
}

fn owlvit_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ipr-detect/tests/fixtures/owlvit")
}

/// VISOR end to end from a folder of images in VISOR's layout (<id>_<k>.png): detection with
/// OWL-ViT, then scoring; the same numbers come back through the written detections file.
#[test]
fn eval_visor_from_images_matches_the_detections_path() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for (k, src) in ["wide.png", "gray.png", "small.png"].iter().enumerate() {
        std::fs::copy(owlvit_fixtures().join("images").join(src), images.join(format!("10801_{k}.png"))).unwrap();
    }
    let model = owlvit_fixtures().join("tiny-owlvit");
    let det = dir.path().join("detections.jsonl");
    let res = dir.path().join("results.json");
    let o = ipr(&[
        "eval",
        "visor",
        "--images",
        images.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--detections-out",
        det.to_str().unwrap(),
        "--write-results",
        res.to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_images: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&det).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["prompt"], "a dog to the left of a cat", "prompt from the SR2D table by id");
    for r in &rows {
        for d in r["detections"].as_array().unwrap() {
            assert!(d["label"] == "dog" || d["label"] == "cat");
            assert!(d["score"].as_f64().unwrap() > 0.1, "VISOR's threshold is strict");
        }
    }
    let o = ipr(&["eval", "visor", "--detections", det.to_str().unwrap(), "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap(), from_images);
    let o = ipr(&["eval", "visor", "--results", res.to_str().unwrap(), "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap(), from_images);

    let o = ipr(&[
        "eval",
        "clip",
        "--images",
        images.to_str().unwrap(),
        "--model",
        owlvit_fixtures().join("tiny-clip").to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let clip: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(clip["images"], 3);
    assert!(clip["clip_score"].as_f64().unwrap() >= 0.0);

    // Sharded (a Kubernetes Indexed Job's index with --shards, and --shard): each shard writes
    // its part and no metrics; `ipr merge` then gives the unsharded call's detections, byte for
    // byte. 40 images: three batches of 16.
    let many = dir.path().join("many");
    std::fs::create_dir(&many).unwrap();
    let srcs = ["wide.png", "gray.png", "small.png"];
    for i in 0..40u64 {
        let name = format!("{}_{}.png", 10801 + i / 4, i % 4);
        std::fs::copy(owlvit_fixtures().join("images").join(srcs[i as usize % 3]), many.join(name)).unwrap();
    }
    let eval_many = |out: &Path, extra: &[&str], index: Option<usize>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipr"));
        cmd.args(["eval", "visor", "--images", many.to_str().unwrap(), "--model", model.to_str().unwrap()])
            .args(["--detections-out", out.to_str().unwrap(), "--json", "--quiet"])
            .args(extra)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX");
        if let Some(i) = index {
            cmd.env("JOB_COMPLETION_INDEX", i.to_string());
        }
        cmd.output().unwrap()
    };
    let one = dir.path().join("one.jsonl");
    let o = eval_many(&one, &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = o.stdout;
    let merged = dir.path().join("merged.jsonl");
    for i in 0..3 {
        let o = if i == 1 {
            eval_many(&merged, &["--shard", "1/3"], None)
        } else {
            eval_many(&merged, &["--shards", "3"], Some(i))
        };
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(o.stdout.is_empty(), "a shard prints no metrics");
    }
    assert!(!merged.exists());
    let o = ipr(&["merge", "--samples", many.to_str().unwrap(), "--detections", merged.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&merged).unwrap() == std::fs::read(&one).unwrap(), "merged shards: the unsharded detections");
    let o = ipr(&["eval", "visor", "--detections", merged.to_str().unwrap(), "--json"]);
    assert_eq!(o.stdout, want, "and the unsharded metrics");
    let o = ipr(&[
        "eval",
        "visor",
        "--images",
        many.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--shard",
        "0/2",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--detections-out"), "{}", stderr(&o));

    let o = ipr(&["eval", "visor", "--images", images.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--model"));
    let o = ipr(&[
        "eval",
        "visor",
        "--images",
        dir.path().join("nope").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("nope"), "{}", stderr(&o));
}

#[test]
fn detect_one_image_with_owlvit_and_toy() {
    let img = owlvit_fixtures().join("images/wide.png");
    let model = owlvit_fixtures().join("tiny-owlvit");
    let o = ipr(&[
        "detect",
        "--detector",
        "owlvit",
        "--model",
        model.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--query",
        "a photo of a cat",
        "--query",
        "a photo of a dog",
        "--threshold",
        "0.0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let found: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!found.is_empty());
    for d in &found {
        assert!(d["label"].as_u64().unwrap() < 2 && d["box"].as_array().unwrap().len() == 4);
    }

    // The toy detector on a perfect toy image.
    let vocab = ipr_toy::vocabulary();
    let prompt = ipr_core::Prompt::parse("an apple to the left of a box", &vocab).unwrap();
    let (_, image) = ipr_toy::oracle::oracle_image(&prompt, &vocab, 7, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.png");
    image.save(&path).unwrap();
    let o =
        ipr(&["detect", "--detector", "toy", "--image", path.to_str().unwrap(), "--query", "apple", "--query", "box"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let found: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let labels: Vec<u64> = found.iter().map(|d| d["label"].as_u64().unwrap()).collect();
    assert_eq!(labels.len(), 2);
    assert!(labels.contains(&0) && labels.contains(&1));
    let (a, b) =
        (&found[labels.iter().position(|l| *l == 0).unwrap()], &found[labels.iter().position(|l| *l == 1).unwrap()]);
    assert!(a["box"][0].as_f64() < b["box"][0].as_f64(), "the apple is left of the box");

    let o = ipr(&["detect", "--detector", "owlvit", "--image", img.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--model"));
}
