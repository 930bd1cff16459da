//! The parity checks for any diffusers folder and a reference file recorded by
//! `make_tiny_pipelines.py --real FOLDER OUT.safetensors` (real SD 1.5 / 2.1 / SDXL checkpoints,
//! which cannot be downloaded here):
//!
//! ```text
//! IPR_PARITY_MODEL=/path/to/model IPR_PARITY_REFERENCE=/tmp/ref.safetensors \
//!     cargo test --release -p ipr-diffusion --test real_models -- --nocapture
//! ```
//!
//! `IPR_PARITY_TOL` overrides the relative tolerance (default 1e-4). Without the variables the real
//! check is skipped; the same checker always runs on the tiny SDXL fixture.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, rel_err};
use ipr_diffusion::pipeline::{Pipeline, SampleParams, TextEncoders};
use ipr_diffusion::scheduler::SamplerKind;
use ipr_diffusion::unet::AddedCond;

const PROMPTS: [&str; 2] = ["a photo of a red cube to the left of a blue sphere", "A Dog   above a cat!"];
const NEGATIVES: [&str; 2] = ["blurry, bad quality", ""];
const PROBES: usize = 7;

fn probe(i: usize) -> String {
    match i {
        0 | 1 => PROMPTS[i].to_string(),
        2 | 3 => NEGATIVES[i - 2].to_string(),
        4 => "zebra's 42 cubes, (sphere) -- LEFT\tof\n\nthe cat's  tail".into(),
        5 => "the ".repeat(60),
        _ => "héllo wörld ☃ it'll we've".into(),
    }
}

fn check_folder(folder: &Path, reference: &Path, tol: f64) {
    let r = candle_core::safetensors::load(reference, &Device::Cpu).unwrap();
    let get = |k: &str| r.get(k).unwrap_or_else(|| panic!("{}: no {k}", reference.display())).clone();
    let mut report = Vec::new();
    let mut check = |what: &str, a: &Tensor, b: &Tensor| {
        let e = rel_err(a, b);
        println!("{what:<40} relative error {e:.2e}");
        if e > tol {
            report.push(format!("{what}: {e:.2e}"));
        }
    };
    let pipe = Pipeline::load(folder, DType::F32, &Device::Cpu).unwrap();
    let toks = match &pipe.text {
        TextEncoders::Single { tokenizer, .. } => vec![("tokenizer", tokenizer)],
        TextEncoders::Dual { tokenizer, tokenizer_2, .. } => {
            vec![("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)]
        }
    };
    for (sub, tok) in toks {
        for i in 0..PROBES {
            let want: Vec<i64> = get(&format!("{sub}/ids.{i}")).to_vec1().unwrap();
            let got: Vec<i64> = tok.encode(&probe(i)).unwrap().into_iter().map(i64::from).collect();
            assert_eq!(got, want, "{sub} ids for {:?}", probe(i));
        }
    }
    let cond = pipe.encode_prompts(&PROMPTS).unwrap();
    let uncond = pipe.encode_prompts(&NEGATIVES).unwrap();
    check("text/prompt_embeds", &cond.embeds, &get("text/prompt_embeds"));
    check("text/negative_prompt_embeds", &uncond.embeds, &get("text/negative_prompt_embeds"));
    if let (Some(p), Some(n)) = (&cond.pooled, &uncond.pooled) {
        check("text/pooled_prompt_embeds", p, &get("text/pooled_prompt_embeds"));
        check("text/negative_pooled_prompt_embeds", n, &get("text/negative_pooled_prompt_embeds"));
    }
    let added = r
        .contains_key("unet/text_embeds")
        .then(|| AddedCond { text_embeds: get("unet/text_embeds"), time_ids: get("unet/time_ids") });
    let out = pipe
        .unet
        .forward(&get("unet/sample"), &get("unet/timesteps"), &get("unet/encoder_hidden_states"), added.as_ref())
        .unwrap();
    check("unet/out", &out, &get("unet/out"));
    if let Some(vae) = &pipe.vae {
        check("vae/decoded", &vae.decode(&get("vae/latents")).unwrap(), &get("vae/decoded"));
        check("vae/encoded_mean", &vae.encode_mean(&get("vae/image")).unwrap(), &get("vae/encoded_mean"));
    }
    for (kind, key) in [(SamplerKind::Ddim, "pipeline/ddim_out"), (SamplerKind::Euler, "pipeline/euler_out")] {
        let params = SampleParams { num_inference_steps: 4, guidance_scale: 5.0, sampler: kind };
        let out = pipe.denoise(&cond, &uncond, &get("pipeline/latents"), &params).unwrap();
        check(key, &out, &get(key));
    }
    assert!(report.is_empty(), "{}: over {tol:.0e}: {report:?}", folder.display());
}

#[test]
fn checker_runs_on_tiny_sdxl() {
    let f = fixtures();
    check_folder(&f.join("tiny-sdxl"), &f.join("reference").join("tiny-sdxl.safetensors"), 1e-4);
}

#[test]
fn real_checkpoint_when_given() {
    let (Some(model), Some(reference)) =
        (std::env::var_os("IPR_PARITY_MODEL"), std::env::var_os("IPR_PARITY_REFERENCE"))
    else {
        eprintln!("IPR_PARITY_MODEL / IPR_PARITY_REFERENCE not set: real checkpoint parity skipped");
        return;
    };
    let tol = std::env::var("IPR_PARITY_TOL").ok().and_then(|v| v.parse().ok()).unwrap_or(1e-4);
    check_folder(Path::new(&model), Path::new(&reference), tol);
}
