//! Finite-difference check of every trainable parameter's gradient (the guard named in
//! docs/stack-notes.md: candle's fused softmax / layer norm have no backward and would silently
//! drop gradients). For each parameter tensor of the tiny UNets and text encoders, the analytic
//! gradient of `sum(output * R)` is compared, in f64, with a central difference at the element of
//! largest analytic gradient and at one pseudo-random element.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::{fixtures, Reference};
use ipr_diffusion::clip_text::ClipTextModel;
use ipr_diffusion::config::{ClipTextConfig, UNetConfig};
use ipr_diffusion::unet::{AddedCond, UNet2DConditionModel};

fn load_vars(weights: &Path) -> (Vec<(String, Var)>, VarBuilder<'static>) {
    let tensors = candle_core::safetensors::load(weights, &Device::Cpu).unwrap();
    let mut vars: Vec<(String, Var)> =
        tensors.into_iter().map(|(k, t)| (k, Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let map: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let vb = VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
    (vars, vb)
}

fn set_element(var: &Var, index: usize, value: f64) {
    let shape = var.shape().clone();
    let mut data: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    data[index] = value;
    var.set(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap();
}

/// Checks d loss / d p for every var against central differences; `loss` recomputes the scalar.
fn check_all(vars: &[(String, Var)], loss: &dyn Fn() -> Tensor) {
    let l = loss();
    let grads = l.backward().unwrap();
    let h = 1e-6;
    let mut failures = Vec::new();
    for (n, (name, var)) in vars.iter().enumerate() {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        let values: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let argmax = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let random = (n * 7919 + 13) % g.len();
        for idx in [argmax, random] {
            let v = values[idx];
            set_element(var, idx, v + h);
            let lp: f64 = loss().to_scalar().unwrap();
            set_element(var, idx, v - h);
            let lm: f64 = loss().to_scalar().unwrap();
            set_element(var, idx, v);
            let fd = (lp - lm) / (2.0 * h);
            if (g[idx] - fd).abs() > 1e-7 + 1e-4 * fd.abs().max(g[idx].abs()) {
                failures.push(format!("{name}[{idx}]: analytic {:.6e}, finite difference {fd:.6e}", g[idx]));
            }
        }
    }
    assert!(failures.is_empty(), "{} wrong gradients:\n{}", failures.len(), failures.join("\n"));
}

fn unet_gradients(name: &str) {
    let dir = fixtures().join(name).join("unet");
    let config = UNetConfig::load(&dir.join("config.json")).unwrap();
    let (vars, vb) = load_vars(&dir.join("diffusion_pytorch_model.safetensors"));
    let unet = UNet2DConditionModel::new(vb, config, &dir.join("config.json")).unwrap();
    let r = Reference::load(name);
    let f64_of = |k: &str| r.get(k).to_dtype(DType::F64).unwrap();
    // One sample and a short context keep the 2 x (parameters) forward passes cheap.
    let sample = f64_of("unet/sample").narrow(0, 0, 1).unwrap();
    let ehs = f64_of("unet/encoder_hidden_states").narrow(0, 0, 1).unwrap().narrow(1, 0, 5).unwrap();
    let t = Tensor::new(&[731f64], &Device::Cpu).unwrap();
    let added = r.has("unet/text_embeds").then(|| AddedCond {
        text_embeds: f64_of("unet/text_embeds").narrow(0, 0, 1).unwrap(),
        time_ids: f64_of("unet/time_ids").narrow(0, 0, 1).unwrap(),
    });
    let weights = sample.cos().unwrap();
    let loss = || unet.forward(&sample, &t, &ehs, added.as_ref()).unwrap().mul(&weights).unwrap().sum_all().unwrap();
    check_all(&vars, &loss);
}

#[test]
fn sd15_unet_gradients_conv_projection() {
    unet_gradients("tiny-sd15");
}

#[test]
fn sdxl_unet_gradients_text_time_linear_projection() {
    unet_gradients("tiny-sdxl");
}

fn text_gradients(name: &str, sub: &str) {
    let dir = fixtures().join(name).join(sub);
    let config = ClipTextConfig::load(&dir.join("config.json")).unwrap();
    let (vars, vb) = load_vars(&dir.join("model.safetensors"));
    let te = ClipTextModel::new(vb, config).unwrap();
    let ids = Tensor::new(&[[571u32, 320, 530, 572, 2, 2, 2]], &Device::Cpu).unwrap();
    let loss = || {
        let o = te.forward(&ids).unwrap();
        let a = o.last_hidden_state.sin().unwrap().sum_all().unwrap();
        let b = o.penultimate_hidden_state.cos().unwrap().sum_all().unwrap();
        let c = o.pooled.sqr().unwrap().sum_all().unwrap();
        ((a + b).unwrap() + c).unwrap()
    };
    check_all(&vars, &loss);
}

#[test]
fn text_encoder_gradients_quick_gelu() {
    text_gradients("tiny-sd15", "text_encoder");
}

#[test]
fn text_encoder_gradients_gelu_with_projection() {
    text_gradients("tiny-sdxl", "text_encoder_2");
}
