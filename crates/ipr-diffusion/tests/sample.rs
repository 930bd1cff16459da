//! `ipr sample`'s library function on a tiny folder: starting from diffusers' initial latents
//! (a `latents` safetensors file), the saved final latents equal diffusers' and the PNGs exist.

mod common;

use common::{assert_close, fixtures, Reference};
use ipr_diffusion::pipeline::SampleParams;
use ipr_diffusion::sample::{load_latents, sample, save_latents, SampleRequest};
use ipr_diffusion::scheduler::SamplerKind;

#[test]
fn sample_from_latents_file_reproduces_diffusers() {
    let r = Reference::load("tiny-sd21");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    save_latents(&input, &r.get("pipeline/latents")).unwrap();
    let req = SampleRequest {
        model: fixtures().join("tiny-sd21").to_string_lossy().into_owned(),
        prompts: vec!["a photo of a red cube to the left of a blue sphere".into(), "A Dog   above a cat!".into()],
        negative_prompts: vec!["blurry, bad quality".into(), "".into()],
        params: SampleParams { num_inference_steps: 4, guidance_scale: 5.0, sampler: SamplerKind::Ddim },
        latents: Some(input),
        output_latents: Some(dir.path().join("out.safetensors")),
        out: Some(dir.path().join("image.png")),
        ..Default::default()
    };
    let out = sample(&req).unwrap();
    let saved = load_latents(&dir.path().join("out.safetensors")).unwrap();
    assert_close("saved latents", &saved, &r.get("pipeline/ddim_out"), 1e-4);
    assert_close("returned latents", &out.latents, &saved, 0.0);
    assert_eq!(out.images, vec![dir.path().join("image-0.png"), dir.path().join("image-1.png")]);
    let img = image::open(&out.images[0]).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
}

#[test]
fn seeded_noise_is_reproducible_and_errors_name_the_model() {
    let req = SampleRequest {
        model: fixtures().join("tiny-pixel").to_string_lossy().into_owned(),
        prompts: vec!["a red cube".into()],
        params: SampleParams { num_inference_steps: 2, guidance_scale: 3.0, sampler: SamplerKind::Euler },
        seed: 42,
        ..Default::default()
    };
    let a = sample(&req).unwrap().latents;
    let b = sample(&req).unwrap().latents;
    assert_close("same seed", &a, &b, 0.0);
    assert_eq!(a.dims(), &[1, 3, 16, 16]);
    let missing = SampleRequest { model: fixtures().join("no-such-model").to_string_lossy().into_owned(), ..req };
    let msg = sample(&missing).unwrap_err().to_string();
    assert!(msg.contains("no-such-model"), "{msg}");
}
