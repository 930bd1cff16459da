//! Parity of the schedulers with diffusers' DDIMScheduler, EulerDiscreteScheduler,
//! DPMSolverMultistepScheduler and DDPMScheduler (add_noise, get_velocity) for the configs in
//! `reference/schedulers.json`.

mod common;

use std::path::Path;

use common::{assert_close, fixtures, rel_err, Reference};
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
        let mut s = Sampler::from_config(kind, &config, Path::new(name), n).unwrap();
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

/// DPM-Solver++: timesteps, sigmas and every step's sample (each step depending on the previous
/// steps' data predictions), within 1e-5 of the largest reference value.
#[test]
fn dpm_solver_matches_diffusers() {
    let r = Reference::load("schedulers");
    let all = cases();
    let (mut checked, mut worst_rel, mut worst_abs) = (0, 0.0f64, 0.0f64);
    for (name, case) in all.as_object().unwrap() {
        if case["class"] != "DPMSolverMultistepScheduler" {
            continue;
        }
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let mut s = Sampler::from_config(SamplerKind::DpmSolverPlusPlus, &config, Path::new(name), n).unwrap();
        let want: Vec<f64> = r.i64s(&format!("{name}/timesteps")).into_iter().map(|t| t as f64).collect();
        assert_eq!(s.timesteps(), want, "{name}: timesteps");
        let Sampler::DpmSolver(dpm) = &s else { unreachable!() };
        let want = r.f64s(&format!("{name}/sigmas"));
        assert_eq!(dpm.sigmas.len(), want.len(), "{name}: sigmas {:?} vs {want:?}", dpm.sigmas);
        for (g, w) in dpm.sigmas.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{name}: sigmas {:?} vs {want:?}", dpm.sigmas);
        }
        assert_eq!(s.init_noise_sigma(), 1.0);
        let mut x = r.get("sample");
        let (mut case_rel, mut case_abs) = (0.0f64, 0.0f64);
        for i in 0..n {
            assert_close(&format!("{name} scaled {i}"), &s.scale_model_input(&x, i).unwrap(), &x, 0.0);
            x = s.step(&r.get(&format!("model_output.{i}")), i, &x).unwrap();
            let want = r.get(&format!("{name}/prev.{i}"));
            let err = rel_err(&x, &want);
            let abs: f64 =
                (&x - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
                    as f64;
            (case_rel, case_abs) = (case_rel.max(err), case_abs.max(abs));
            assert!(err <= 1e-5, "{name} step {i}: relative error {err:.3e} > 1e-5");
        }
        eprintln!("{name}: {n} steps, largest relative error {case_rel:.2e}, absolute {case_abs:.2e}");
        (worst_rel, worst_abs) = (worst_rel.max(case_rel), worst_abs.max(case_abs));
        checked += 1;
    }
    eprintln!("DPM-Solver++, {checked} configs: largest relative error {worst_rel:.2e}, absolute {worst_abs:.2e}");
    assert_eq!(checked, 12);
}

/// The multistep state: a second run from step 0 on the same sampler starts afresh (first order),
/// and a step whose predecessor was not the previous call is first order too.
#[test]
fn dpm_solver_restarts_at_step_zero() {
    let r = Reference::load("schedulers");
    let config: SchedulerConfig = serde_json::from_value(cases()["dpm_sd15_4"]["config"].clone()).unwrap();
    let mut s = Sampler::from_config(SamplerKind::DpmSolverPlusPlus, &config, Path::new("s.json"), 4).unwrap();
    let run = |s: &mut Sampler| {
        let mut x = r.get("sample");
        for i in 0..4 {
            x = s.step(&r.get(&format!("model_output.{i}")), i, &x).unwrap();
        }
        x
    };
    let first = run(&mut s);
    assert_close("rerun", &run(&mut s), &first, 0.0);
    assert_close("diffusers", &first, &r.get("dpm_sd15_4/prev.3"), 1e-5);
    // Step 1 without step 0 before it: first order, as a scheduler whose first step is step 1.
    let mut fresh = Sampler::from_config(SamplerKind::DpmSolverPlusPlus, &config, Path::new("s.json"), 4).unwrap();
    let x1 = r.get("dpm_sd15_4/prev.0");
    let a = fresh.step(&r.get("model_output.1"), 1, &x1).unwrap();
    let order1 = SchedulerConfig { solver_order: Some(1), ..config };
    let mut euler_like = Sampler::from_config(SamplerKind::DpmSolverPlusPlus, &order1, Path::new("s.json"), 4).unwrap();
    let b = euler_like.step(&r.get("model_output.1"), 1, &x1).unwrap();
    assert_close("fresh step 1", &a, &b, 0.0);
    assert!(rel_err(&a, &r.get("dpm_sd15_4/prev.1")) > 1e-3, "the second-order step 1 differs");
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
    for (json, key) in [
        (r#"{"algorithm_type": "sde-dpmsolver++"}"#, "algorithm_type"),
        (r#"{"algorithm_type": "dpmsolver"}"#, "algorithm_type"),
        (r#"{"solver_order": 3}"#, "solver_order"),
        (r#"{"solver_type": "bogus"}"#, "solver_type"),
        (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
        (r#"{"use_lu_lambdas": true}"#, "use_lu_lambdas"),
        (r#"{"final_sigmas_type": "denoise_to_zero"}"#, "final_sigmas_type"),
        (r#"{"variance_type": "learned_range"}"#, "variance_type"),
        (r#"{"thresholding": true}"#, "thresholding"),
        (r#"{"prediction_type": "flow_prediction"}"#, "prediction_type"),
    ] {
        let config: SchedulerConfig = serde_json::from_str(json).unwrap();
        let msg = Sampler::from_config(SamplerKind::DpmSolverPlusPlus, &config, Path::new("s.json"), 4)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("s.json") && msg.contains(key), "{json}: {msg}");
    }
    // What diffusers maps to DPM-Solver++ / midpoint is accepted.
    let config: SchedulerConfig =
        serde_json::from_str(r#"{"algorithm_type": "deis", "solver_type": "bh2", "variance_type": "fixed_small"}"#)
            .unwrap();
    Sampler::from_config(SamplerKind::DpmSolverPlusPlus, &config, Path::new("s.json"), 4).unwrap();
    assert_eq!(ipr_diffusion::sample::sampler_from_name("dpmsolver++").unwrap(), SamplerKind::DpmSolverPlusPlus);
    let msg = ipr_diffusion::sample::sampler_from_name("dpm").unwrap_err().to_string();
    assert!(msg.contains("dpmsolver++"), "{msg}");
}
