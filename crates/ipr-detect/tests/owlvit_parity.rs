//! Parity of OWL-ViT (Minderer et al. 2022) and CLIP score with transformers 5.24, on the tiny
//! random models and images written by `scripts/fixtures/owlvit/make_owlvit_fixtures.py`:
//! pixel values bit for bit (Pillow's bicubic resize), token ids exactly, logits, boxes,
//! embeddings, post-processed detections and CLIP scores within 1e-4 relative.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ipr_detect::clip_score::{clip_score, ClipScorer};
use ipr_detect::owlvit::{post_process_object_detection, OwlVitDetector};
use ipr_detect::preprocess::load_rgb;
use ipr_detect::Detector;
use serde_json::Value;

const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-6;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/owlvit")
}

fn reference() -> (HashMap<String, Tensor>, Value) {
    let t = candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap();
    let j = serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap()).unwrap();
    (t, j)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// `|a - b| <= RTOL * |b| + ATOL` everywhere; returns the largest absolute error and the
/// largest relative error over entries with `|b| >= 1e-2`.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (flat(got), flat(want));
    let (mut abs, mut rel) = (0f32, 0f32);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let err = (a - b).abs();
        assert!(err <= RTOL * b.abs() + ATOL, "{what}[{i}]: got {a}, want {b}");
        abs = abs.max(err);
        if b.abs() >= 1e-2 {
            rel = rel.max(err / b.abs());
        }
    }
    eprintln!("{what}: max abs err {abs:.2e}, max rel err {rel:.2e}");
    (abs, rel)
}

#[test]
fn owlvit_matches_transformers() {
    owl_matches_transformers("owlvit");
}

#[test]
fn owlv2_matches_transformers() {
    owl_matches_transformers("owlv2");
}

/// OWL-ViT or OWLv2 against transformers: preprocessing, ids, model outputs, post-processing, and
/// the library entry points.
fn owl_matches_transformers(name: &str) {
    let (t, j) = reference();
    let v2 = name == "owlv2";
    let det = OwlVitDetector::load(&fixtures().join(format!("tiny-{name}")), &Device::Cpu).unwrap();
    let queries: Vec<&str> = j[name]["queries"].as_array().unwrap().iter().map(|q| q.as_str().unwrap()).collect();
    let ids = det.tokenize(&queries).unwrap();
    for im in j[name]["images"].as_array().unwrap() {
        let key = im["key"].as_str().unwrap();
        let r = |n: &str| t[&format!("{name}.{key}.{n}")].clone();
        let image = load_rgb(&fixtures().join(im["file"].as_str().unwrap())).unwrap();
        assert_eq!(
            (image.width() as u64, image.height() as u64),
            (im["width"].as_u64().unwrap(), im["height"].as_u64().unwrap())
        );

        // Preprocessing: OWL-ViT's is Pillow's resize and numpy's normalisation, bit for bit;
        // OWLv2's is scipy's float filters, equal up to float32 rounding.
        let pv = det.processor.pixel_values(&image, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let want = r("pixel_values");
        assert_eq!(pv.dims(), want.dims());
        let diff = (&pv - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("{name} {key} pixel_values: max abs err {diff:.2e}");
        assert!(diff <= if v2 { 2e-6 } else { 0.0 }, "{name} {key}: pixel_values differ by up to {diff}");
        assert_eq!(
            ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
            r("input_ids").to_vec2::<i64>().unwrap(),
            "{key}: input_ids"
        );

        let out = det.model.forward(&pv, &ids).unwrap();
        assert_close(&format!("{name} {key} logits"), &out.logits, &r("logits"));
        assert_close(&format!("{name} {key} pred_boxes"), &out.pred_boxes, &r("pred_boxes"));
        assert_close(&format!("{name} {key} text_embeds"), &out.text_embeds, &r("text_embeds"));
        assert_close(&format!("{name} {key} image_embeds"), &out.image_embeds, &r("image_embeds"));
        if let Some(o) = &out.objectness_logits {
            assert_close(&format!("{name} {key} objectness"), o, &r("objectness_logits"));
        }
        assert_eq!(out.objectness_logits.is_some(), v2, "objectness head iff OWLv2");

        // post_process_object_detection(threshold, target_sizes=[(H, W)]) through the library.
        let threshold = im["threshold"].as_f64().unwrap();
        let got = det.detect_queries(&image, &queries, threshold).unwrap();
        let want = im["detections"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{name} {key}: number of kept boxes");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.label as u64, w["label"].as_u64().unwrap(), "{key}: label");
            let ws = w["score"].as_f64().unwrap() as f32;
            assert!((g.score - ws).abs() <= RTOL * ws, "{key}: score {} vs {ws}", g.score);
            for (a, b) in g.bbox.iter().zip(w["box"].as_array().unwrap()) {
                let b = b.as_f64().unwrap() as f32;
                assert!((a - b).abs() <= RTOL * b.abs() + 1e-4, "{key}: box {:?} vs {w}", g.bbox);
            }
        }
        if !v2 {
            let size = (image.height() as usize, image.width() as usize);
            let pp = post_process_object_detection(&out.logits, &out.pred_boxes, threshold as f32, &[size]).unwrap();
            assert_eq!(pp[0], got);
        }

        // And through the Detector trait with VISOR's "a photo of a {}" template.
        let mut visor = OwlVitDetector::load(&fixtures().join(format!("tiny-{name}")), &Device::Cpu).unwrap();
        visor.threshold = threshold;
        assert_eq!(visor.query_for("dog"), "a photo of a dog");
        assert_eq!(visor.name(), name);
        let dets = visor.detect(&image, &["dog", "cat", "red cube"]).unwrap();
        assert_eq!(dets.len(), want.len());
        for (d, w) in dets.iter().zip(want) {
            assert_eq!(d.label, ["dog", "cat", "red cube"][w["label"].as_u64().unwrap() as usize]);
        }
    }
}

#[test]
fn owlvit_batches_match_single_images() {
    let (t, j) = reference();
    let det = OwlVitDetector::load(&fixtures().join("tiny-owlvit"), &Device::Cpu).unwrap();
    let queries: Vec<&str> = j["owlvit"]["queries"].as_array().unwrap().iter().map(|q| q.as_str().unwrap()).collect();
    let images: Vec<_> = j["owlvit"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|im| load_rgb(&fixtures().join(im["file"].as_str().unwrap())).unwrap())
        .collect();
    let refs: Vec<_> = images.iter().collect();
    let batch = det.detect_batch(&refs, &queries, 0.0).unwrap();
    for ((im, image), got) in j["owlvit"]["images"].as_array().unwrap().iter().zip(&images).zip(&batch) {
        let key = im["key"].as_str().unwrap();
        let logits = &t[&format!("owlvit.{key}.logits")];
        let boxes = &t[&format!("owlvit.{key}.pred_boxes")];
        let want =
            post_process_object_detection(logits, boxes, 0.0, &[(image.height() as usize, image.width() as usize)])
                .unwrap();
        assert_eq!(got.len(), want[0].len());
        for (g, w) in got.iter().zip(&want[0]) {
            assert_eq!(g.label, w.label);
            assert!((g.score - w.score).abs() <= RTOL * w.score);
        }
    }
}

#[test]
fn clip_score_matches_transformers_and_torchmetrics() {
    let (t, j) = reference();
    let scorer = ClipScorer::load(&fixtures().join("tiny-clip"), &Device::Cpu).unwrap();
    let files: Vec<_> = j["clip"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| load_rgb(&fixtures().join(f.as_str().unwrap())).unwrap())
        .collect();
    let images: Vec<_> = files.iter().collect();
    let prompts: Vec<&str> = j["clip"]["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();

    let pv = scorer.processor.batch(&images, &Device::Cpu).unwrap();
    let diff = (&pv - &t["clip.pixel_values"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "CLIP pixel_values differ by up to {diff}");
    // transformers pads to the longest prompt, we pad to 77: the prefixes must agree.
    let ids = scorer.tokenize(&prompts).unwrap().to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    for (ours, theirs) in ids.iter().zip(t["clip.input_ids"].to_vec2::<i64>().unwrap()) {
        assert_eq!(&ours[..theirs.len()], &theirs[..]);
    }
    assert_close("clip image_embeds", &scorer.image_embeds(&images).unwrap(), &t["clip.image_embeds"]);
    assert_close("clip text_embeds", &scorer.text_embeds(&prompts).unwrap(), &t["clip.text_embeds"]);
    let pairs = scorer.pair_scores(&images, &prompts).unwrap();
    for (g, w) in pairs.iter().zip(j["clip"]["per_pair"].as_array().unwrap()) {
        let w = w.as_f64().unwrap() as f32;
        assert!((g - w).abs() <= RTOL * w.abs() + 1e-4, "pair score {g} vs {w}");
    }
    let want = j["clip"]["clip_score"].as_f64().unwrap();
    assert!((clip_score(&pairs) - want).abs() <= 1e-4 * want, "{} vs {want}", clip_score(&pairs));
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ipr-owlvit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_folder(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn errors_name_the_file_and_key() {
    let cpu = Device::Cpu;
    let err = |r: Result<OwlVitDetector, ipr_detect::ModelError>| r.err().expect("should fail").to_string();

    let e = err(OwlVitDetector::load(Path::new("/nonexistent/owlvit"), &cpu));
    assert!(e.contains("/nonexistent/owlvit") && e.contains("missing"), "{e}");
    // A CLIP folder is not an OWL-ViT folder.
    let e = err(OwlVitDetector::load(&fixtures().join("tiny-clip"), &cpu));
    assert!(e.contains("config.json") && e.contains("model_type") && e.contains("clip"), "{e}");
    let e = ClipScorer::load(&fixtures().join("tiny-owlvit"), &cpu).err().unwrap().to_string();
    assert!(e.contains("config.json") && e.contains("model_type"), "{e}");

    // Missing weights, mismatched weights, missing tokenizer.
    let d = scratch("mismatch");
    copy_folder(&fixtures().join("tiny-owlvit"), &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = err(OwlVitDetector::load(&d, &cpu));
    assert!(e.contains("model.safetensors"), "{e}");
    copy_folder(&fixtures().join("tiny-owlvit"), &d);
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 48", "\"intermediate_size\": 50");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = err(OwlVitDetector::load(&d, &cpu));
    assert!(e.contains("model.safetensors") && e.contains("fc1"), "{e}");
    copy_folder(&fixtures().join("tiny-owlvit"), &d);
    std::fs::remove_file(d.join("merges.txt")).unwrap();
    let e = err(OwlVitDetector::load(&d, &cpu));
    assert!(e.contains("merges.txt"), "{e}");
    copy_folder(&fixtures().join("tiny-owlvit"), &d);
    std::fs::remove_file(d.join("processor_config.json")).unwrap();
    let e = err(OwlVitDetector::load(&d, &cpu));
    assert!(e.contains("preprocessor_config.json"), "{e}");
    let _ = std::fs::remove_dir_all(&d);

    // Unreadable images name the file.
    let d = scratch("image");
    std::fs::write(d.join("broken.png"), b"not a png").unwrap();
    let e = load_rgb(&d.join("broken.png")).unwrap_err().to_string();
    assert!(e.contains("broken.png") && e.contains("cannot read image"), "{e}");
    let e = load_rgb(&d.join("absent.png")).unwrap_err().to_string();
    assert!(e.contains("absent.png"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bench_runs_on_a_tiny_config() {
    let cfg = ipr_detect::owlvit::OwlVitConfig::load(&fixtures().join("tiny-owlvit/config.json")).unwrap();
    let r = ipr_detect::owlvit::bench_owlvit(&cfg, 2, 2, 1, &Device::Cpu).unwrap();
    assert!(r.images_per_s > 0.0 && r.images_per_s.is_finite(), "{r:?}");
}

#[test]
fn pil_bicubic_resize_is_bit_exact() {
    use ipr_detect::pil_resize::resize_bicubic;
    let t = candle_core::safetensors::load(fixtures().join("resize.safetensors"), &Device::Cpu).unwrap();
    for i in 0.. {
        let Some(input) = t.get(&format!("case{i}.input")) else { break };
        let want = &t[&format!("case{i}.output")];
        let (h, w) = input.dims2().unwrap();
        let (nh, nw) = want.dims2().unwrap();
        let px: Vec<u8> = input.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        let got = resize_bicubic(&px, w, h, 1, nw, nh);
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "case {i}: {w}x{h} -> {nw}x{nh}: {diff} pixels differ from Pillow");
    }
}

#[test]
fn imagefolder_stages_detect_and_clip_score() {
    use ipr_detect::folder::{clip_score_samples, detect_samples, prompt_classes};
    let vocab = ipr_core::Vocabulary::new(["dog", "cat"]).unwrap();
    assert_eq!(prompt_classes("a dog to the left of a cat", &vocab).unwrap(), ["dog", "cat"]);
    let d = scratch("folder");
    let mut manifest = String::new();
    for (k, name) in ["wide", "gray", "alpha"].iter().enumerate() {
        std::fs::copy(fixtures().join(format!("images/{name}.png")), d.join(format!("7_{k}.png"))).unwrap();
        manifest += &format!(
            "{{\"file_name\":\"7_{k}.png\",\"prompt_id\":7,\"prompt\":\"a dog to the left of a cat\",\"image_index\":{k},\"seed\":{k}}}\n"
        );
    }
    std::fs::write(d.join("metadata.jsonl"), manifest).unwrap();

    let mut det = OwlVitDetector::load(&fixtures().join("tiny-owlvit"), &Device::Cpu).unwrap();
    det.threshold = 0.3;
    let mut calls = 0;
    let rows = detect_samples(&det, &d, &vocab, &mut |_, _| calls += 1).unwrap();
    assert_eq!((rows.len(), calls), (3, 3));
    for row in &rows {
        let image = load_rgb(&d.join(&row.file_name)).unwrap();
        assert_eq!(row.detections, det.detect(&image, &["dog", "cat"]).unwrap());
        assert!(row.detections.iter().all(|x| x.label == "dog" || x.label == "cat"));
    }

    let scorer = ClipScorer::load(&fixtures().join("tiny-clip"), &Device::Cpu).unwrap();
    let (per_image, score) = clip_score_samples(&scorer, &d, 2, &mut |_, _| {}).unwrap();
    let images: Vec<_> = ["wide", "gray", "alpha"]
        .iter()
        .map(|n| load_rgb(&fixtures().join(format!("images/{n}.png"))).unwrap())
        .collect();
    let direct = scorer.pair_scores(&images.iter().collect::<Vec<_>>(), &["a dog to the left of a cat"; 3]).unwrap();
    for ((_, a), b) in per_image.iter().zip(&direct) {
        assert!((a - b).abs() <= 1e-4 * b.abs() + 1e-4);
    }
    assert!((score - clip_score(&direct)).abs() < 1e-4);
    let _ = std::fs::remove_dir_all(&d);
}
