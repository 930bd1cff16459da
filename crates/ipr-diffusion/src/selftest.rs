//! The op self-test (`ipr selftest`): every layer op the models are built from (convolutions of
//! each kind the UNet has, group norm with and without SiLU, layer norm, GEGLU, linear with and
//! without a LoRA adapter, attention plain, cross and blockwise, softmaxes), forward and the
//! gradients training takes, on a device and dtype, against the same op on the CPU in f64 (each
//! CPU kernel is itself tested against candle's primitive ops). A GPU run of it proves the CUDA
//! paths correct in the same call that measures them, and it travels inside the binary (a GPU
//! machine may have no Rust toolchain).
//!
//! Both sides see the same values: the inputs are drawn in f32 ([`crate::noise::randn`]), rounded
//! to the tested dtype, and the reference takes those rounded values in f64. A difference is the
//! largest absolute difference over an output divided by the output's largest reference
//! magnitude; see [`tolerance`].

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear};

/// The largest relative difference accepted for `dtype` (relative to an output's largest
/// magnitude). f32: the order of summation differs between kernels (1e-6 is typical); 1e-4 leaves
/// room for long sums on a GPU with TF32 off. bf16 keeps 8 significant bits (each rounding is
/// up to 2^-9 = 2e-3 relative) and an op rounds several times: its inputs, intermediate tensors
/// stored in bf16 (attention's scores before the softmax, whose error the exponential scales by
/// the score's size), its output; 3e-2 is a few such roundings. f16 has 11 bits: 8x tighter.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

/// One compared output of one case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub case: String,
    /// `y` (the forward) or `d<input>` (a gradient).
    pub output: String,
    pub rel_max_diff: f64,
    pub max_abs_diff: f64,
    pub ok: bool,
}

/// The self-test's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub device: String,
    pub dtype: String,
    pub tolerance: f64,
    pub checks: Vec<Check>,
    /// Cases that failed to run at all: (case, error).
    pub errors: Vec<(String, String)>,
    pub ok: bool,
}

/// An operand of a case.
struct Input {
    name: &'static str,
    dims: Vec<usize>,
    /// Standard deviation of its values.
    scale: f64,
    /// Whether it gets a gradient (activations, adapters, a trained kernel).
    tracked: bool,
    /// LoRA adapters are f32 whatever the model's dtype.
    f32_always: bool,
}

fn input(name: &'static str, dims: &[usize], scale: f64, tracked: bool) -> Input {
    Input { name, dims: dims.to_vec(), scale, tracked, f32_always: false }
}

type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

struct Case {
    name: &'static str,
    inputs: Vec<Input>,
    op: Op,
}

fn conv(stride: usize, padding: usize) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| Conv2d { weight: t[1].clone(), bias: Some(t[2].clone()), stride, padding }.forward(&t[0])
}

fn group_norm(groups: usize, silu: bool) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| {
        let n = GroupNorm { weight: t[1].clone(), bias: t[2].clone(), num_groups: groups, eps: 1e-5 };
        if silu {
            n.forward_silu(&t[0])
        } else {
            n.forward(&t[0])
        }
    }
}

fn linear(t: &[Tensor]) -> Result<Tensor> {
    Linear { weight: t[1].clone(), bias: Some(t[2].clone()), path: "selftest".into(), lora: None }.forward(&t[0])
}

fn attention(heads: usize) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| crate::nn::attention(&t[0], &t[1], &t[2], heads, None)
}

fn cases() -> Vec<Case> {
    let conv_inputs = |x: &[usize], w: &[usize], trained: bool| {
        vec![input("x", x, 1.0, true), input("w", w, 0.2, trained), input("b", &[w[0]], 0.5, trained)]
    };
    let norm_inputs = |x: &[usize]| {
        vec![
            input("x", x, 2.0, true),
            input("weight", &[x[x.len() - 1]], 0.5, false),
            input("bias", &[x[x.len() - 1]], 0.5, false),
        ]
    };
    let gn_inputs = |x: &[usize]| {
        vec![input("x", x, 2.0, true), input("weight", &[x[1]], 0.5, false), input("bias", &[x[1]], 0.5, false)]
    };
    let qkv = |q: &[usize], kv: &[usize]| {
        vec![input("q", q, 1.0, true), input("k", kv, 1.0, true), input("v", kv, 1.0, true)]
    };
    let frozen_qkv = |q: &[usize], kv: &[usize]| {
        vec![input("q", q, 1.0, false), input("k", kv, 1.0, false), input("v", kv, 1.0, false)]
    };
    let lora = |t: &[Tensor]| -> Result<Tensor> {
        let mut adapter = crate::lora::LoraAdapter::from_tensors(&t[3], &t[4], 0.5, 0.0, 0)?;
        // The adapter takes the case's variables (its own copies would get the gradients).
        adapter.a = Var::from_tensor(&t[3])?;
        adapter.b = Var::from_tensor(&t[4])?;
        Linear { weight: t[1].clone(), bias: Some(t[2].clone()), path: "selftest".into(), lora: Some(adapter) }
            .forward(&t[0])
    };
    let adapter =
        |name, dims: &[usize]| Input { name, dims: dims.to_vec(), scale: 0.3, tracked: true, f32_always: true };
    vec![
        Case {
            name: "conv 3x3 stride 1",
            inputs: conv_inputs(&[2, 8, 12, 12], &[16, 8, 3, 3], false),
            op: Box::new(conv(1, 1)),
        },
        Case {
            name: "conv 3x3 stride 2",
            inputs: conv_inputs(&[2, 8, 12, 12], &[8, 8, 3, 3], false),
            op: Box::new(conv(2, 1)),
        },
        Case {
            name: "conv 1x1",
            inputs: conv_inputs(&[2, 8, 12, 12], &[16, 8, 1, 1], false),
            op: Box::new(conv(1, 0)),
        },
        Case {
            name: "conv 3x3, kernel trained",
            inputs: conv_inputs(&[2, 8, 10, 10], &[8, 8, 3, 3], true),
            op: Box::new(conv(1, 1)),
        },
        Case { name: "group norm + SiLU", inputs: gn_inputs(&[2, 32, 10, 10]), op: Box::new(group_norm(8, true)) },
        Case { name: "group norm", inputs: gn_inputs(&[2, 32, 10, 10]), op: Box::new(group_norm(8, false)) },
        // Full fine-tuning trains the affine parameters: their gradients sum over a batch's pixels.
        Case {
            name: "group norm + SiLU, affine trained",
            inputs: vec![
                input("x", &[2, 32, 12, 12], 2.0, true),
                input("weight", &[32], 0.5, true),
                input("bias", &[32], 0.5, true),
            ],
            op: Box::new(group_norm(8, true)),
        },
        Case {
            name: "group norm + SiLU, SD-size groups",
            inputs: gn_inputs(&[1, 320, 32, 32]),
            op: Box::new(group_norm(32, true)),
        },
        Case {
            name: "layer norm",
            inputs: norm_inputs(&[2, 40, 64]),
            op: Box::new(|t: &[Tensor]| {
                LayerNorm { weight: t[1].clone(), bias: t[2].clone(), eps: 1e-5 }.forward(&t[0])
            }),
        },
        Case {
            name: "GEGLU",
            inputs: vec![input("h", &[2, 40, 128], 1.5, true)],
            op: Box::new(|t: &[Tensor]| crate::nn::geglu(&t[0])),
        },
        Case {
            name: "linear, frozen weight",
            inputs: vec![
                input("x", &[2, 40, 64], 1.0, true),
                input("w", &[96, 64], 0.2, false),
                input("b", &[96], 0.5, false),
            ],
            op: Box::new(linear),
        },
        Case {
            name: "linear, trained",
            inputs: vec![
                input("x", &[2, 40, 64], 1.0, true),
                input("w", &[96, 64], 0.2, true),
                input("b", &[96], 0.5, true),
            ],
            op: Box::new(linear),
        },
        Case {
            name: "linear + LoRA",
            inputs: vec![
                input("x", &[2, 40, 64], 1.0, true),
                input("w", &[96, 64], 0.2, false),
                input("b", &[96], 0.5, false),
                adapter("lora_A", &[4, 64]),
                adapter("lora_B", &[96, 4]),
            ],
            op: Box::new(lora),
        },
        Case { name: "self-attention", inputs: qkv(&[2, 40, 64], &[2, 40, 64]), op: Box::new(attention(4)) },
        Case { name: "cross-attention", inputs: qkv(&[2, 40, 64], &[2, 8, 64]), op: Box::new(attention(2)) },
        Case {
            name: "blockwise attention",
            inputs: qkv(&[8, 45, 16], &[8, 45, 16]),
            op: Box::new(|t: &[Tensor]| Ok(crate::attention::blockwise_attention(&t[0], &t[1], &t[2], 0.25, 7)?)),
        },
        // Without a gradient (sampling; the flash kernel on CUDA): head sizes of SD 1.5 (40, 80,
        // 160), SD 2.1 / SDXL (64) and the toy (16); lengths that are not whole tiles.
        Case {
            name: "attention, no gradient, 4 heads of 40",
            inputs: frozen_qkv(&[2, 70, 160], &[2, 70, 160]),
            op: Box::new(attention(4)),
        },
        Case {
            name: "attention, no gradient, 2 heads of 64",
            inputs: frozen_qkv(&[1, 100, 128], &[1, 100, 128]),
            op: Box::new(attention(2)),
        },
        Case {
            name: "cross-attention, no gradient, 64",
            inputs: frozen_qkv(&[2, 70, 128], &[2, 13, 128]),
            op: Box::new(attention(2)),
        },
        Case {
            name: "attention, no gradient, 2 heads of 80",
            inputs: frozen_qkv(&[1, 33, 160], &[1, 33, 160]),
            op: Box::new(attention(2)),
        },
        Case {
            name: "attention, no gradient, 1 head of 160",
            inputs: frozen_qkv(&[1, 40, 160], &[1, 77, 160]),
            op: Box::new(attention(1)),
        },
        Case {
            name: "attention, no gradient, 8 heads of 16",
            inputs: frozen_qkv(&[3, 64, 128], &[3, 64, 128]),
            op: Box::new(attention(8)),
        },
        Case {
            name: "attention softmax, scaled, no gradient",
            inputs: vec![Input { name: "s", dims: vec![6, 20, 300], scale: 4.0, tracked: false, f32_always: false }],
            op: Box::new(|t: &[Tensor]| Ok(crate::attention::scaled_softmax(&t[0], 0.125)?)),
        },
        Case {
            name: "softmax",
            inputs: vec![input("x", &[4, 33, 50], 3.0, true)],
            op: Box::new(|t: &[Tensor]| crate::nn::softmax(&t[0])),
        },
    ]
}

/// The case's forward output and the gradients of its tracked inputs (named), for inputs in
/// `dtype` on `device`. The loss is `sum(y r)` with `r` drawn from `r_seed` and rounded to
/// `r_dtype` (the tested dtype, on both sides).
fn evaluate(
    case: &Case,
    values: &[Tensor],
    (r_seed, r_dtype): (u64, DType),
    dtype: DType,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let tensors = case
        .inputs
        .iter()
        .zip(values)
        .map(|(i, v)| {
            let dt = if i.f32_always && dtype != DType::F64 { DType::F32 } else { dtype };
            let t = v.to_dtype(dt)?.to_device(device)?;
            Ok(if i.tracked { Var::from_tensor(&t)?.as_tensor().clone() } else { t })
        })
        .collect::<Result<Vec<_>>>()?;
    let y = (case.op)(&tensors)?;
    let acc = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let r = crate::noise::randn(r_seed, y.shape(), DType::F32, &Device::Cpu)?.to_dtype(r_dtype)?;
    let loss = (y.to_dtype(acc)? * r.to_dtype(acc)?.to_device(device)?)?.sum_all()?;
    let grads = loss.backward()?;
    let mut out = vec![("y".to_string(), y.detach())];
    for (i, t) in case.inputs.iter().zip(&tensors) {
        if i.tracked {
            let g = grads
                .get(t)
                .ok_or_else(|| crate::Error::Input(format!("{}: no gradient for {}", case.name, i.name)))?;
            out.push((format!("d{}", i.name), g.clone()));
        }
    }
    Ok(out)
}

/// `(max |got - want| / max |want|, max |got - want|)`, `got` on any device and dtype.
fn difference(want: &Tensor, got: &Tensor) -> Result<(f64, f64)> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    if got.dims() != want.dims() {
        return Err(crate::Error::Input(format!("shape {:?}, expected {:?}", got.dims(), want.dims())));
    }
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1e-30);
    let max_abs = (&got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    // NaN compares false: a NaN anywhere makes the difference infinite.
    let max_abs =
        if got.flatten_all()?.to_vec1::<f64>()?.iter().all(|v| v.is_finite()) { max_abs } else { f64::INFINITY };
    Ok((max_abs / scale, max_abs))
}

/// Runs every case on `device` in `dtype` against the CPU in f64.
pub fn run(device: &Device, dtype: DType) -> Result<Report> {
    let (mut checks, mut errors) = (Vec::new(), Vec::new());
    let tol = tolerance(dtype);
    for (n, case) in cases().iter().enumerate() {
        let seed = 1000 * n as u64;
        // The values both sides see: drawn in f32, rounded to the tested dtype (adapters: f32).
        let values = case
            .inputs
            .iter()
            .enumerate()
            .map(|(j, i)| {
                let t = (crate::noise::randn(seed + j as u64, i.dims.as_slice(), DType::F32, &Device::Cpu)? * i.scale)?;
                let dt = if i.f32_always { DType::F32 } else { dtype };
                Ok(t.to_dtype(dt)?.to_dtype(DType::F64)?)
            })
            .collect::<Result<Vec<_>>>();
        let result = values.and_then(|values| {
            let reference = evaluate(case, &values, (seed + 99, dtype), DType::F64, &Device::Cpu)?;
            let tested = evaluate(case, &values, (seed + 99, dtype), dtype, device)?;
            Ok((reference, tested))
        });
        match result {
            // The first line: candle appends a backtrace to some errors.
            Err(e) => errors.push((case.name.to_string(), e.to_string().lines().next().unwrap_or("").to_string())),
            Ok((reference, tested)) => {
                for ((name, want), (_, got)) in reference.iter().zip(&tested) {
                    let (rel, max_abs) = difference(want, got)?;
                    checks.push(Check {
                        case: case.name.to_string(),
                        output: name.clone(),
                        rel_max_diff: rel,
                        max_abs_diff: max_abs,
                        ok: rel <= tol,
                    });
                }
            }
        }
    }
    let ok = errors.is_empty() && checks.iter().all(|c| c.ok);
    Ok(Report {
        device: format!("{:?}", device.location()),
        dtype: dtype.as_str().to_string(),
        tolerance: tol,
        checks,
        errors,
        ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU in f32 every op's kernels (the direct convolutions, the fused norms, GEGLU,
    /// attention ops) agree with the f64 paths within the f32 tolerance.
    #[test]
    fn cpu_f32_passes_against_f64() {
        let report = run(&Device::Cpu, DType::F32).unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        for c in &report.checks {
            assert!(c.ok, "{c:?}");
        }
        // Every case has its forward and at least one gradient.
        assert_eq!(report.checks.iter().filter(|c| c.output == "y").count(), cases().len());
        assert!(report.checks.len() > 2 * cases().len());
        assert!(report.ok);
    }

    /// The comparison sees a perturbed element, a NaN and a wrong shape.
    #[test]
    fn difference_catches_wrong_outputs() {
        let d = Device::Cpu;
        let want = Tensor::new(&[1.0f64, -4.0, 2.0], &d).unwrap();
        assert_eq!(difference(&want, &want.to_dtype(DType::F32).unwrap()).unwrap(), (0.0, 0.0));
        let (rel, abs) = difference(&want, &Tensor::new(&[1.0f32, -4.0, 2.2], &d).unwrap()).unwrap();
        assert!((abs - 0.2).abs() < 1e-6 && (rel - 0.05).abs() < 1e-6, "{rel} {abs}");
        assert!(difference(&want, &Tensor::new(&[1.0f32, f32::NAN, 2.0], &d).unwrap()).unwrap().0.is_infinite());
        assert!(difference(&want, &Tensor::new(&[1.0f32, -4.0], &d).unwrap()).is_err());
    }
}
