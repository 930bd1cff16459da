//! Damaged and hostile inputs through the commands a user runs: every one is a clear error that
//! names the file and the problem, before any large allocation, and never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ipr(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipr")).current_dir(dir).args(args).output().expect("ipr runs")
}

/// The error of a command that must fail cleanly (exit status 1, not a panic's 101 or a signal).
fn error(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "expected a clean error, got {:?}:\n{err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn tiny_pixel() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ipr-diffusion/tests/fixtures/tiny-pixel")
}

/// Rewrites the header of a safetensors file with `edit` (the data is kept as it is).
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header.as_object_mut().unwrap());
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// A tensor of the UNet (not the metadata entry) with 2 or more dimensions.
fn some_matrix(h: &serde_json::Map<String, serde_json::Value>) -> String {
    h.iter().find(|(k, v)| *k != "__metadata__" && v["shape"].as_array().unwrap().len() >= 2).unwrap().0.clone()
}

#[test]
fn damaged_models_are_errors_naming_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sample =
        |model: &str| ipr(dir, &["sample", "--model", model, "--prompt", "a dog", "--steps", "1", "--out", "x.png"]);
    type Damage = fn(&Path);
    let cases: [(&str, &str, Damage); 5] = [
        ("channels 10^9", "block_out_channels", |m| {
            let p = m.join("unet/config.json");
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            v["block_out_channels"][0] = serde_json::json!(1_000_000_000u64);
            std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        }),
        ("an integer weight", "must be floating point", |m| {
            edit_header(&m.join("unet/diffusion_pytorch_model.safetensors"), |h| {
                let k = some_matrix(h);
                h.get_mut(&k).unwrap()["dtype"] = "I32".into();
            })
        }),
        ("a weight of another shape", "shape", |m| {
            edit_header(&m.join("unet/diffusion_pytorch_model.safetensors"), |h| {
                let k = some_matrix(h);
                let shape: Vec<u64> = h[&k]["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
                h.get_mut(&k).unwrap()["shape"] = serde_json::json!([shape.iter().product::<u64>()]);
            })
        }),
        ("offsets past the end", "past the end", |m| {
            edit_header(&m.join("unet/diffusion_pytorch_model.safetensors"), |h| {
                let last = h
                    .iter()
                    .filter(|(k, _)| *k != "__metadata__")
                    .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
                    .unwrap()
                    .0
                    .clone();
                let t = h.get_mut(&last).unwrap();
                let (b, e) = (t["data_offsets"][0].as_u64().unwrap(), t["data_offsets"][1].as_u64().unwrap());
                t["data_offsets"] = serde_json::json!([b + 4, e + 4]);
            })
        }),
        ("a truncated weights file", "diffusion_pytorch_model.safetensors", |m| {
            let p = m.join("unet/diffusion_pytorch_model.safetensors");
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        }),
    ];
    for (i, (what, want, damage)) in cases.into_iter().enumerate() {
        let model = dir.join(format!("m{i}"));
        copy_dir(&tiny_pixel(), &model);
        damage(&model);
        let err = error(&sample(model.to_str().unwrap()));
        assert!(err.contains(&format!("m{i}/unet/")) && err.contains(want), "{what}: {err}");
    }
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 20, 20])).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn damaged_training_images_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_pixel();
    let train = |data: &str| {
        ipr(
            dir,
            &["train", "--model", model.to_str().unwrap(), "--data", data, "--out", "lora", "--steps", "1", "--quiet"],
        )
    };
    let folder = |name: &str, image: &dyn Fn(&Path)| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ok.png"), png(16, 16)).unwrap();
        image(&d);
        std::fs::write(
            d.join("metadata.jsonl"),
            "{\"file_name\": \"ok.png\", \"prompt\": \"a dog\"}\n{\"file_name\": \"bad.png\", \"prompt\": \"a cat\"}\n",
        )
        .unwrap();
    };
    folder("truncated", &|d| {
        let bytes = png(64, 64);
        std::fs::write(d.join("bad.png"), &bytes[..bytes.len() / 2]).unwrap();
    });
    let err = error(&train("truncated"));
    assert!(err.contains("truncated/bad.png") && err.contains("decode"), "{err}");

    folder("bomb", &|d| {
        // The header claims 100000 x 100000 pixels (its CRC left wrong: decoders must refuse it
        // either way, before allocating 30 GB).
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        std::fs::write(d.join("bad.png"), bytes).unwrap();
    });
    let err = error(&train("bomb"));
    assert!(err.contains("bomb/bad.png"), "{err}");

    std::fs::write(dir.join("outside.png"), png(16, 16)).unwrap();
    folder("symlink", &|d| std::os::unix::fs::symlink(d.join("../outside.png"), d.join("bad.png")).unwrap());
    let err = error(&train("symlink"));
    assert!(err.contains("symlink/metadata.jsonl:2") && err.contains("outside"), "{err}");
}
