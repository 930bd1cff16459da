//! LoRA files across tools (fixtures: `scripts/fixtures/lora/make_lora_fixtures.py`): an adapter
//! made by PEFT and saved by diffusers loads in ipr and gives diffusers' latents; an adapter trained
//! by `ipr train` loads in diffusers (`load_lora_weights`) and gives the latents `ipr sample --lora`
//! gives.

mod common;

use common::{assert_close, fixtures};
use ipr_diffusion::pipeline::SampleParams;
use ipr_diffusion::sample::{sample, save_latents, SampleRequest};
use ipr_diffusion::scheduler::SamplerKind;

fn reference() -> std::collections::HashMap<String, candle_core::Tensor> {
    let path = fixtures().join("lora").join("reference.safetensors");
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap()
}

fn run(lora: Option<&str>) -> candle_core::Tensor {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("latents.safetensors");
    save_latents(&input, &r["latents"]).unwrap();
    let req = SampleRequest {
        model: fixtures().join("tiny-sd15").to_string_lossy().into_owned(),
        prompts: vec!["a dog to the left of a car".into(), "a cat above a bench".into()],
        params: SampleParams { num_inference_steps: 4, guidance_scale: 5.0, sampler: SamplerKind::Ddim },
        latents: Some(input),
        lora: lora.map(|l| fixtures().join("lora").join(l)),
        ..Default::default()
    };
    sample(&req).unwrap().latents
}

#[test]
fn base_pipeline_matches_without_adapter() {
    assert_close("base", &run(None), &reference()["base_out"], 1e-4);
}

#[test]
fn peft_made_adapter_gives_diffusers_latents() {
    assert_close("peft adapter", &run(Some("peft-sd15")), &reference()["peft_out"], 1e-4);
}

#[test]
fn ipr_trained_adapter_gives_the_latents_diffusers_gets_with_load_lora_weights() {
    assert_close("ipr adapter", &run(Some("ipr-sd15")), &reference()["ipr_out"], 1e-4);
}
