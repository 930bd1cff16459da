//! Sharded independent stages on the toy world, as a Slurm job array or a Kubernetes Indexed Job
//! runs them: `ipr sample --prompts` and `ipr detect --samples` cut by global batch index, then
//! `ipr merge`. Every shard count gives the unsharded call's images, detections.jsonl and VISOR
//! metrics byte for byte; a lost shard rerun gives them again; merge refuses incomplete and
//! overlapping parts.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn ipr(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipr"));
    cmd.current_dir(dir).args(args);
    // The test's own environment may come from a launcher: only the variables given here count.
    for k in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "JOB_COMPLETION_INDEX"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("ipr runs")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "ipr failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(o: &Output) -> String {
    assert!(!o.status.success(), "ipr should have failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file of `dir` (not recursing) by name, but the shards' lock files (`.lock-<i>-of-<n>`).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file() && !e.file_name().to_string_lossy().starts_with(".lock-"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// How the shards learn their index.
#[derive(Clone, Copy)]
enum Source {
    Flag,
    Slurm,
    Kubernetes,
}

const SAMPLE: [&str; 14] = [
    "sample",
    "--model",
    "model",
    "--prompts",
    "table.json",
    "--vocab",
    "toy",
    "--images-per-prompt",
    "2",
    "--steps",
    "3",
    "--guidance",
    "4",
    "--batch-size",
];

/// Samples and detects into `<name>/` and `<name>.jsonl` with `n` shards (1: no shard at all),
/// then merges; returns the metrics `ipr eval visor` prints for the merged detections.
fn sharded(dir: &Path, name: &str, n: usize, source: Source) -> String {
    let dets = format!("{name}.jsonl");
    let shard_args = |i: usize| -> (Vec<String>, Vec<(&'static str, String)>) {
        match (n, source) {
            (1, _) => (vec![], vec![]),
            (_, Source::Flag) => (vec!["--shard".into(), format!("{i}/{n}")], vec![]),
            (_, Source::Slurm) => {
                // Arrays may start at 1: the index counts from SLURM_ARRAY_TASK_MIN.
                (
                    vec![],
                    vec![
                        ("SLURM_ARRAY_TASK_ID", (i + 1).to_string()),
                        ("SLURM_ARRAY_TASK_COUNT", n.to_string()),
                        ("SLURM_ARRAY_TASK_MIN", "1".into()),
                    ],
                )
            }
            (_, Source::Kubernetes) => {
                (vec!["--shards".into(), n.to_string()], vec![("JOB_COMPLETION_INDEX", i.to_string())])
            }
        }
    };
    for i in 0..n {
        let (extra, env) = shard_args(i);
        let mut args: Vec<&str> = SAMPLE.to_vec();
        args.extend(["3", "--out", name]);
        args.extend(extra.iter().map(String::as_str));
        ok(&ipr(dir, &args, &env));
    }
    for i in 0..n {
        let (extra, env) = shard_args(i);
        let mut args = vec![
            "detect",
            "--detector",
            "toy",
            "--samples",
            name,
            "--prompts",
            "table.json",
            "--out",
            &dets,
            "--quiet",
        ];
        args.extend(extra.iter().map(String::as_str));
        ok(&ipr(dir, &args, &env));
    }
    if n > 1 {
        assert!(!dir.join(&dets).exists(), "a shard writes its part only");
        ok(&ipr(dir, &["merge", "--samples", name, "--prompts", "table.json", "--detections", &dets, "--quiet"], &[]));
    }
    ok(&ipr(dir, &["eval", "visor", "--detections", &dets, "--vocab", "toy", "--json"], &[]))
}

#[test]
fn shards_give_the_unsharded_bytes_and_merge_checks_its_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&ipr(dir, &["toy", "export", "--out", "model"], &[]));
    ok(&ipr(dir, &["prompts", "sr2d", "--vocab", "toy", "--out", "sr2d.json"], &[]));
    // 7 spatial prompts x 2 images = 14 images: 5 sampling batches of 3, an odd count for every n.
    let all: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(dir.join("sr2d.json")).unwrap()).unwrap();
    let some: Vec<&serde_json::Value> = all.iter().filter(|r| r["num_objects"] == 2).step_by(9).take(7).collect();
    std::fs::write(dir.join("table.json"), serde_json::to_vec_pretty(&some).unwrap()).unwrap();

    let want_metrics = sharded(dir, "one", 1, Source::Flag);
    let want_images = files(&dir.join("one"));
    let want_dets = std::fs::read(dir.join("one.jsonl")).unwrap();
    assert_eq!(want_images.len(), 14);
    for (name, n, source) in [
        ("flag3", 3, Source::Flag),
        ("slurm3", 3, Source::Slurm),
        ("slurm2", 2, Source::Slurm),
        ("k8s4", 4, Source::Kubernetes),
    ] {
        let metrics = sharded(dir, name, n, source);
        assert!(files(&dir.join(name)) == want_images, "{name}: the images of one process, byte for byte");
        assert!(std::fs::read(dir.join(format!("{name}.jsonl"))).unwrap() == want_dets, "{name}: the detections");
        assert_eq!(metrics, want_metrics, "{name}: the metrics");
    }

    // A lost shard (its images and its detections) rerun alone gives the same bytes.
    let parts = dir.join("flag3.jsonl.shards");
    std::fs::remove_file(parts.join("1-of-3.jsonl")).unwrap();
    std::fs::remove_file(dir.join("flag3.jsonl")).unwrap();
    let owned: Vec<String> = files(&dir.join("flag3")).into_keys().collect();
    let mut removed = 0;
    // Images are in sampling order by (id, k); batch j of 3 belongs to shard j % 3.
    let mut order: Vec<(u64, u32, String)> = owned
        .iter()
        .map(|f| {
            let (id, k) = f.trim_end_matches(".png").split_once('_').unwrap();
            (id.parse().unwrap(), k.parse().unwrap(), f.clone())
        })
        .collect();
    order.sort();
    for (j, (_, _, f)) in order.iter().enumerate() {
        if (j / 3) % 3 == 1 {
            std::fs::remove_file(dir.join("flag3").join(f)).unwrap();
            removed += 1;
        }
    }
    assert!(removed > 0);
    let merge = ["merge", "--samples", "flag3", "--prompts", "table.json", "--detections", "flag3.jsonl"];
    let e = fails(&ipr(dir, &merge, &[]));
    assert!(e.contains("--shard 1/3"), "a missing part is named with the shard that makes it: {e}");
    let mut args: Vec<&str> = SAMPLE.to_vec();
    args.extend(["3", "--out", "flag3", "--shard", "1/3"]);
    let made = ipr(dir, &args, &[]);
    assert!(String::from_utf8_lossy(&made.stderr).contains(&format!("{removed} images made")), "only the lost ones");
    ok(&ipr(
        dir,
        &[
            "detect",
            "--detector",
            "toy",
            "--samples",
            "flag3",
            "--prompts",
            "table.json",
            "--out",
            "flag3.jsonl",
            "--shard",
            "1/3",
        ],
        &[],
    ));
    ok(&ipr(dir, &merge, &[]));
    assert!(files(&dir.join("flag3")) == want_images);
    assert!(std::fs::read(dir.join("flag3.jsonl")).unwrap() == want_dets, "a rerun shard gives the same detections");

    // Overlapping parts: parts of two shard counts, or one image in two parts.
    std::fs::copy(dir.join("slurm2.jsonl.shards/0-of-2.jsonl"), parts.join("0-of-2.jsonl")).unwrap();
    let e = fails(&ipr(dir, &merge, &[]));
    assert!(e.contains("2 different shard counts") && e.contains("overlap"), "{e}");
    std::fs::remove_file(parts.join("0-of-2.jsonl")).unwrap();
    let first = std::fs::read_to_string(parts.join("0-of-3.jsonl")).unwrap();
    let mut second = std::fs::read_to_string(parts.join("1-of-3.jsonl")).unwrap();
    second.push_str(first.lines().next().unwrap());
    second.push('\n');
    std::fs::write(parts.join("1-of-3.jsonl"), second).unwrap();
    let e = fails(&ipr(dir, &merge, &[]));
    assert!(e.contains("is in two parts") && e.contains("overlap"), "{e}");

    // The Slurm launch script's three phases, as a 3-task array would run them: the unsharded
    // images, and the detections of VISOR's evaluator (here the tiny OWL-ViT fixture).
    let owl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ipr-detect/tests/fixtures/owlvit/tiny-owlvit");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/launch/slurm/visor.sbatch");
    let settings: Vec<(&str, String)> = vec![
        ("IPR", env!("CARGO_BIN_EXE_ipr").into()),
        ("MODEL", "model".into()),
        ("PROMPTS", "table.json".into()),
        ("VOCAB", "toy".into()),
        ("OWL", owl.display().to_string()),
        ("WORK", "slurm".into()),
        ("K", "2".into()),
        ("STEPS", "3".into()),
        ("GUIDANCE", "4".into()),
        ("BATCH", "3".into()),
        ("DEVICE", "cpu".into()),
    ];
    let phase = |name: &str, task: Option<usize>| {
        let mut cmd = Command::new("bash");
        cmd.current_dir(dir).arg(&script).arg(name).envs(settings.iter().map(|(k, v)| (*k, v)));
        cmd.env_remove("SLURM_ARRAY_TASK_MIN");
        match task {
            Some(i) => cmd.env("SLURM_ARRAY_TASK_ID", i.to_string()).env("SLURM_ARRAY_TASK_COUNT", "3"),
            None => cmd.env_remove("SLURM_ARRAY_TASK_ID").env_remove("SLURM_ARRAY_TASK_COUNT"),
        };
        ok(&cmd.output().unwrap())
    };
    for name in ["sample", "detect"] {
        for i in 0..3 {
            phase(name, Some(i));
        }
    }
    let table = phase("score", None);
    assert!(table.contains("VISOR_uncond"), "{table}");
    assert!(files(&dir.join("slurm/images")) == want_images, "the script's array: the unsharded images");
    let owl = owl.display().to_string();
    ok(&ipr(
        dir,
        &[
            "detect",
            "--detector",
            "owlvit",
            "--model",
            &owl,
            "--samples",
            "one",
            "--prompts",
            "table.json",
            "--vocab",
            "toy",
        ]
        .into_iter()
        .chain(["--out", "owl.jsonl", "--quiet"])
        .collect::<Vec<_>>(),
        &[],
    ));
    assert!(
        std::fs::read(dir.join("slurm/detections.jsonl")).unwrap() == std::fs::read(dir.join("owl.jsonl")).unwrap()
    );
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("slurm/metrics.json")).unwrap()).unwrap();
    assert!(metrics["OA"].is_f64(), "{metrics}");

    // Shard sources that disagree, and a Kubernetes index without the count, are refused.
    let mut args: Vec<&str> = SAMPLE.to_vec();
    args.extend(["3", "--out", "x", "--shard", "0/2"]);
    let e = fails(&ipr(dir, &args, &[("SLURM_ARRAY_TASK_ID", "1".into()), ("SLURM_ARRAY_TASK_COUNT", "2".into())]));
    assert!(e.contains("the shard sources disagree"), "{e}");
    let detect = ["detect", "--detector", "toy", "--samples", "one", "--prompts", "table.json", "--out", "x.jsonl"];
    let e = fails(&ipr(dir, &detect, &[("JOB_COMPLETION_INDEX", "0".into())]));
    assert!(e.contains("--shards N"), "{e}");
}
