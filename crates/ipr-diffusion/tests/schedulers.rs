//! Parity of the schedulers with diffusers' DDIMScheduler, EulerDiscreteScheduler and
//! DDPMScheduler (add_noise, get_velocity) for the configs in `reference/schedulers.json`.

mod common;

use std::path::Path;

use common::{assert_close, fixtures, Reference};
use ipr_diffusion::config::SchedulerConfig;
use ipr_diffusion::scheduler::{add_noise, velocity, Ddpm, Sampler, SamplerKind};

fn cases() -> serde_json::Value {
    let path = fixtures().join("reference").join("schedulers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn samplers_match_diffusers() {
    let r = Reference::load("schedulers");
    let all = cases();
    let mut checked = 0;
    for (name, case) in all.as_object().unwrap() {
        let kind = match case["class"].as_str().unwrap() {
            "DDIMScheduler" => SamplerKind::Ddim,
            "EulerDiscreteScheduler" => SamplerKind::Euler,
            _ => continue,
        };
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let s = Sampler::from_config(kind, &config, Path::new(name), n).unwrap();
        let want = r.f64s(&format!("{name}/timesteps"));
        let got = s.timesteps();
        assert_eq!(got.len(), want.len(), "{name}: timesteps {got:?} vs {want:?}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-3, "{name}: timesteps {got:?} vs {want:?}");
        }
        if let Sampler::Euler(e) = &s {
            let want = r.f64s(&format!("{name}/sigmas"));
            for (g, w) in e.sigmas.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{name}: sigmas {:?} vs {want:?}", e.sigmas);
            }
        }
        let mut x = (r.get("sample") * s.init_noise_sigma()).unwrap();
        for i in 0..n {
            let inp = s.scale_model_input(&x, i).unwrap();
            if kind == SamplerKind::Euler {
                assert_close(&format!("{name} scaled {i}"), &inp, &r.get(&format!("{name}/scaled.{i}")), 1e-5);
            }
            x = s.step(&r.get(&format!("model_output.{i}")), i, &x).unwrap();
            assert_close(&format!("{name} step {i}"), &x, &r.get(&format!("{name}/prev.{i}")), 1e-4);
        }
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
fn ddpm_noising_matches_diffusers() {
    let r = Reference::load("schedulers");
    let all = cases();
    for name in ["ddpm_linear", "ddpm_scaled"] {
        let config: SchedulerConfig = serde_json::from_value(all[name]["config"].clone()).unwrap();
        let ddpm = Ddpm::from_config(&config, Path::new(name)).unwrap();
        let ac = candle_core::Tensor::new(ddpm.alphas_cumprod.clone(), &candle_core::Device::Cpu).unwrap();
        assert_close(&format!("{name} alphas_cumprod"), &ac, &r.get(&format!("{name}/alphas_cumprod")), 1e-5);
        let t: Vec<usize> = r.i64s(&format!("{name}/t")).into_iter().map(|t| t as usize).collect();
        let x0 = r.get(&format!("{name}/x0"));
        let noise = r.get(&format!("{name}/noise"));
        let noisy = add_noise(&ddpm.alphas_cumprod, &x0, &noise, &t).unwrap();
        assert_close(&format!("{name} add_noise"), &noisy, &r.get(&format!("{name}/noisy")), 1e-5);
        let v = velocity(&ddpm.alphas_cumprod, &x0, &noise, &t).unwrap();
        assert_close(&format!("{name} velocity"), &v, &r.get(&format!("{name}/velocity")), 1e-5);
    }
}

#[test]
fn unsupported_scheduler_keys_are_named() {
    let config: SchedulerConfig = serde_json::from_str(r#"{"beta_schedule": "sigmoid"}"#).unwrap();
    let err = Sampler::from_config(SamplerKind::Ddim, &config, Path::new("s.json"), 4).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("s.json") && msg.contains("beta_schedule"), "{msg}");
    let config: SchedulerConfig = serde_json::from_str(r#"{"use_karras_sigmas": true}"#).unwrap();
    let msg = Sampler::from_config(SamplerKind::Euler, &config, Path::new("s.json"), 4).unwrap_err().to_string();
    assert!(msg.contains("use_karras_sigmas"), "{msg}");
}
