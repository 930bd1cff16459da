//! Fuzzing every parser of untrusted input, on stable Rust: each target starts from valid files
//! (the repo's fixtures and examples), mutates them (bit flips, byte edits, cuts, repeats,
//! splices, numbers made absurd) or draws raw bytes, and runs the parser and what follows it on
//! the result. A panic, or an allocation above [`ALLOC_LIMIT`], is a crash; anything else (an
//! error naming the file) is the wanted outcome.
//!
//! CI runs each target for `IPR_FUZZ_SECONDS` (default 1.5) from a fixed seed; `scripts/fuzz.sh`
//! runs them for 10 minutes each from random seeds. Every file under `tests/fuzz_corpus/<target>/`
//! (the crashes found so far, kept as regression tests) is replayed first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// No parser may ask for more than this at once (the largest stated limit is the 512 MiB of an
/// image decode). Above it the allocation fails, and the process aborts: a crash.
const ALLOC_LIMIT: usize = 1 << 30;

struct Limited;

// SAFETY: forwards to the system allocator; refusing a request is allowed by GlobalAlloc.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Limited = Limited;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// SplitMix64: the same inputs from the same seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break parsers more often than random bytes do.
const TOKENS: [&[u8]; 16] = [
    b"99999999999999999999",
    b"18446744073709551615",
    b"-1",
    b"1e400",
    b"NaN",
    b"null",
    b"\"\"",
    b"[]",
    b"{}",
    b"0",
    b"4294967296",
    b"\xff\xfe",
    b"\\u0000",
    b"\"..\\/..\\/etc\\/passwd\"",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\n",
];

/// One to four random edits of `seed` (or of a splice of it with `other`).
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(9) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b']', b',', b'9'][rng.below(10)];
            }
            2 if n > 0 => {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(64)).min(n);
                v.drain(a..b);
            }
            3 if n > 0 => {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(64)).min(n);
                let chunk = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            4 => {
                let at = rng.below(n + 1);
                let bytes: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            5 => v.truncate(rng.below(n + 1)),
            6 if !other.is_empty() => {
                let cut = rng.below(n + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            7 => {
                // Replace a run of digits by a token, or insert one.
                let at = rng.below(n + 1);
                let end = (at..n).find(|&i| !v[i].is_ascii_digit()).unwrap_or(n);
                let token = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..end.max(at), token.iter().copied());
            }
            _ => {
                let i = rng.below(n + 1);
                let j = (i + rng.below(8)).min(n);
                let token = TOKENS[rng.below(TOKENS.len())];
                v.splice(i..j, token.iter().copied());
            }
        }
    }
    v
}

/// A parser under test: where its input goes (a file name in a scratch folder prepared by
/// `setup`) and what runs on it.
struct Target {
    name: &'static str,
    file: &'static str,
    seeds: Vec<Vec<u8>>,
    setup: fn(&Path),
    run: fn(&Path, &Path),
}

fn fuzz(t: Target) {
    let seconds: f64 = std::env::var("IPR_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.5);
    let seed: u64 = std::env::var("IPR_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let keep_last = std::env::var_os("IPR_FUZZ_LAST").map(PathBuf::from);
    let scratch = tempfile::tempdir().unwrap();
    (t.setup)(scratch.path());
    let input = scratch.path().join(t.file);
    let run_one = |bytes: &[u8]| -> Result<(), String> {
        if let Some(last) = &keep_last {
            // Survives an abort (an allocation above the limit): scripts/fuzz.sh keeps it.
            std::fs::write(last.join(format!("{}.bin", t.name)), bytes).unwrap();
        }
        std::fs::write(&input, bytes).unwrap();
        std::panic::catch_unwind(|| (t.run)(&input, scratch.path())).map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    };
    // The crashes found so far, then the valid seeds themselves.
    let corpus = root().join("crates/ipr/tests/fuzz_corpus").join(t.name);
    if let Ok(entries) = std::fs::read_dir(&corpus) {
        for e in entries {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if let Err(p) = run_one(&bytes) {
                panic!("{}: the regression input {} crashes again: {p}", t.name, path.display());
            }
        }
    }
    for s in &t.seeds {
        run_one(s).unwrap_or_else(|p| panic!("{}: a valid seed crashes: {p}", t.name));
    }
    let mut rng = Rng(seed ^ t.name.bytes().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b)));
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        let bytes = if rng.below(16) == 0 {
            (0..rng.below(512)).map(|_| rng.next() as u8).collect()
        } else {
            let a = &t.seeds[rng.below(t.seeds.len())];
            let b = &t.seeds[rng.below(t.seeds.len())];
            mutate(&mut rng, a, b)
        };
        if let Err(p) = run_one(&bytes) {
            let name = format!(
                "crash-{:016x}.bin",
                bytes
                    .iter()
                    .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| { (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3) })
            );
            std::fs::create_dir_all(&corpus).unwrap();
            std::fs::write(corpus.join(&name), &bytes).unwrap();
            panic!(
                "{}: crash after {runs} inputs (seed {seed}): {p}; input kept as {}",
                t.name,
                corpus.join(name).display()
            );
        }
        runs += 1;
    }
    eprintln!("{}: {runs} inputs in {seconds} s, no crash (seed {seed})", t.name);
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn no_setup(_: &Path) {}

/// Two images the manifests below name.
fn images(dir: &Path) {
    std::fs::write(dir.join("a.png"), png(4, 4)).unwrap();
    std::fs::write(dir.join("b.png"), png(4, 4)).unwrap();
}

#[test]
fn fuzz_run_toml() {
    let seeds =
        ["examples/tiny-run.toml", "examples/seed-1.toml", "examples/toy-cuda.toml", "examples/paper/sd21-lora.toml"]
            .iter()
            .map(|p| read(p))
            .collect();
    fuzz(Target {
        name: "run_toml",
        file: "run.toml",
        seeds,
        setup: no_setup,
        run: |input, _| {
            if let Ok(c) = ipr::config::RunConfig::read(input) {
                let _ = c.validate();
                let _ = c.to_toml();
            }
        },
    });
}

#[test]
fn fuzz_metadata_jsonl() {
    let seeds = vec![
        br#"{"file_name": "a.png", "prompt": "a dog to the left of a cat", "prompt_id": 3, "image_index": 0, "seed": 9}
{"file_name": "b.png", "prompt": "a cat above a dog", "prompt_id": 4, "image_index": 1, "seed": 10}
"#
        .to_vec(),
        br#"{"file_name": "a.png", "prompt": "a dog to the left of a cat", "weight": 0.5}
{"file_name": "b.png", "text": "a cat", "weight": 1}
"#
        .to_vec(),
        br#"{"file_name":"a.png","prompt":"a dog to the right of a cat","original_prompt":"a dog to the left of a cat","correct":false,"reason":"location","weight":0.5,"round":0}
"#
        .to_vec(),
    ];
    fuzz(Target {
        name: "metadata_jsonl",
        file: "metadata.jsonl",
        seeds,
        setup: images,
        run: |_, dir| {
            let _ = ipr_core::dataset::read_imagefolder::<ipr_core::dataset::SampleRow>(dir);
            let _ = ipr_core::dataset::read_imagefolder::<ipr_core::dataset::LabelledRow>(dir);
            if let Ok(rows) = ipr_core::dataset::read_imagefolder::<ipr_core::dataset::TrainingRow>(dir) {
                let _ = ipr_core::dataset::check_weights(&dir.join("metadata.jsonl"), &rows);
            }
        },
    });
}

#[test]
fn fuzz_detections_jsonl() {
    let seeds = vec![
        br#"{"file_name": "a.png", "prompt_id": 3, "prompt": "a dog to the left of a cat", "image_index": 0, "detections": [{"label": "dog", "score": 0.9, "bbox": [1, 2, 10, 12]}, {"label": "cat", "score": 0.4, "bbox": [20, 2, 30, 12]}]}
{"file_name": "b.png", "prompt_id": 4, "prompt": "a cat above a dog", "image_index": 1, "detections": []}
"#
        .to_vec(),
    ];
    fuzz(Target {
        name: "detections_jsonl",
        file: "detections.jsonl",
        seeds,
        setup: no_setup,
        run: |input, _| {
            let vocab = ipr_core::Vocabulary::coco80();
            if let Ok(rows) = ipr_core::dataset::read_detections(input) {
                if let Ok(s) = ipr_core::stages::score_detections(&rows, &vocab) {
                    let _ = ipr_core::metrics::visor_metrics(&s.scores);
                }
                for policy in [ipr_core::relabel::RelabelPolicy::Paper, ipr_core::relabel::RelabelPolicy::Measured] {
                    let _ = ipr_core::stages::relabel_detections(&rows, &vocab, policy, &Default::default(), 0);
                }
            }
        },
    });
}

#[test]
fn fuzz_visor_results() {
    let seeds = (1..=4).map(|i| read(&format!("crates/ipr-core/tests/fixtures/visor/results_seed{i}.json"))).collect();
    fuzz(Target {
        name: "visor_results",
        file: "results.json",
        seeds,
        setup: no_setup,
        run: |input, _| {
            let rows = sr2d();
            if let Ok(entries) = ipr_core::visor_format::read_results(input) {
                if let Ok(scores) = ipr_core::visor_format::score_results(&entries, rows) {
                    let _ = ipr_core::metrics::visor_metrics(&scores);
                    let _ = ipr_core::metrics::visor_metrics_by_relation(&scores);
                }
            }
        },
    });
}

fn sr2d() -> &'static [ipr_core::sr2d::PromptRow] {
    static ROWS: std::sync::OnceLock<Vec<ipr_core::sr2d::PromptRow>> = std::sync::OnceLock::new();
    ROWS.get_or_init(|| ipr_core::sr2d::sr2d_rows(&ipr_core::Vocabulary::coco80()))
}

#[test]
fn fuzz_prompt_tables() {
    let some: Vec<ipr_core::sr2d::PromptRow> = sr2d().iter().step_by(997).cloned().collect();
    let seeds = vec![
        ipr_core::sr2d::to_visor_json(&some).into_bytes(),
        ipr_core::sr2d::to_visor_json(&sr2d()[..3]).into_bytes(),
    ];
    fuzz(Target {
        name: "prompt_tables",
        file: "table.json",
        seeds,
        setup: no_setup,
        run: |input, _| {
            if let Ok(rows) = ipr_core::sr2d::read_rows(input) {
                let vocab = ipr_core::Vocabulary::coco80();
                if ipr_core::sr2d::check_rows(input, &rows, &vocab).is_ok() {
                    for r in &rows {
                        let _ = ipr_core::Prompt::parse(&r.text, &vocab);
                    }
                }
            }
        },
    });
}

#[test]
fn fuzz_model_configs() {
    let mut seeds = Vec::new();
    for p in ["tiny-pixel", "tiny-sd15", "tiny-sd21", "tiny-sdxl"] {
        for f in ["unet/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json"] {
            seeds.push(read(&format!("crates/ipr-diffusion/tests/fixtures/{p}/{f}")));
        }
    }
    seeds.push(read("crates/ipr-diffusion/tests/fixtures/tiny-sd15/vae/config.json"));
    for p in ["tiny-owlvit", "tiny-owlv2", "tiny-clip"] {
        seeds.push(read(&format!("crates/ipr-detect/tests/fixtures/owlvit/{p}/config.json")));
    }
    fuzz(Target {
        name: "model_configs",
        file: "config.json",
        seeds,
        setup: no_setup,
        run: |input, _| {
            use ipr_diffusion::config::{ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
            if let Ok(c) = UNetConfig::load(input) {
                let _ = c.layout(input);
            }
            let _ = ClipTextConfig::load(input);
            let _ = VaeConfig::load(input);
            if let Ok(c) = SchedulerConfig::load(input) {
                let _ = ipr_diffusion::scheduler::Ddpm::from_config(&c, input);
                if let Ok(d) = ipr_diffusion::scheduler::DdimConfig::from_config(&c, input) {
                    let _ = ipr_diffusion::scheduler::Ddim::new(d, 10);
                }
                if let Ok(d) = ipr_diffusion::scheduler::DpmSolverMultistepConfig::from_config(&c, input) {
                    let _ = ipr_diffusion::scheduler::DpmSolverMultistep::new(d, 10);
                }
            }
            let _ = ipr_detect::owlvit::config::OwlVitConfig::load(input);
        },
    });
}

#[test]
fn fuzz_safetensors_headers() {
    let small = {
        let t = std::collections::HashMap::from([
            (
                "w".to_string(),
                candle_core::Tensor::ones((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                candle_core::Tensor::zeros(3, candle_core::DType::F16, &candle_core::Device::Cpu).unwrap(),
            ),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        candle_core::safetensors::save(&t, &p).unwrap();
        std::fs::read(p).unwrap()
    };
    let seeds = vec![small, read("crates/ipr-diffusion/tests/fixtures/lora/reference.safetensors")];
    fuzz(Target {
        name: "safetensors_headers",
        file: "pytorch_lora_weights.safetensors",
        seeds,
        setup: no_setup,
        run: |input, _| {
            if ipr_diffusion::source::check_safetensors(input).is_ok() {
                let _ = candle_core::safetensors::load(input, &candle_core::Device::Cpu);
            }
            let _ = ipr_diffusion::lora_io::load(input, "unet");
        },
    });
}

#[test]
fn fuzz_png_input() {
    let mut seeds: Vec<Vec<u8>> = ["alpha.png", "gray.png", "small.png", "wide.png"]
        .iter()
        .map(|f| read(&format!("crates/ipr-detect/tests/fixtures/owlvit/images/{f}")))
        .collect();
    seeds.push(png(3, 2));
    fuzz(Target {
        name: "png_input",
        file: "image.png",
        seeds,
        setup: no_setup,
        run: |input, _| {
            let _ = ipr_diffusion::image_file::open(input);
            let _ = ipr_detect::preprocess::load_rgb(input);
            let _ = ipr_diffusion::train::data::load_image(input, 8);
        },
    });
}
