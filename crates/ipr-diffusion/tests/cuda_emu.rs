//! The project's CUDA kernels (`src/*.cu`) run in the CPU emulator (feature `cuda-emu`): the op
//! self-test's cases take their CUDA paths on the CPU and must pass as the CPU kernels do, in
//! f32, bf16 and f16, whichever order each block's threads run in; every flash kernel (one per
//! padded head size) matches attention computed in f64. The emulator itself finds a barrier that
//! not every thread reaches and a read that races a write; a write past an output is an error,
//! and an index past a fixed-size array (shared memory) stops this test binary at once (SIGILL:
//! the emulator is built with `-fsanitize=bounds-strict`, trapping).

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use ipr_diffusion::cuda_kernels::emulation;
use ipr_diffusion::selftest::{self, Report};

/// The emulation is a process-wide switch: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The self-test on the CPU with the emulated kernels (threads in `reverse` order or not).
fn emulated_selftest(dtype: DType, reverse: bool) -> (Report, BTreeMap<String, usize>) {
    emulation::set(true);
    emulation::set_reverse_order(reverse);
    let before = emulation::launches();
    let report = selftest::run(&Device::Cpu, dtype).unwrap();
    emulation::set(false);
    emulation::set_reverse_order(false);
    let ran = emulation::launches()
        .into_iter()
        .filter_map(|(k, n)| {
            let new = n - before.get(&k).copied().unwrap_or(0);
            (new > 0).then_some((k, new))
        })
        .collect();
    (report, ran)
}

fn selftest_on_emulated_kernels(dtype: DType) {
    let _one = serial();
    emulation::set(false);
    let plain = selftest::run(&Device::Cpu, dtype).unwrap();
    let (emulated, ran) = emulated_selftest(dtype, false);

    // The same cases run; what the CPU cannot run in this dtype (bf16 products) fails alike.
    assert_eq!(emulated.errors, plain.errors, "errors with the emulated kernels");
    assert_eq!(emulated.checks.len(), plain.checks.len());
    for (e, p) in emulated.checks.iter().zip(&plain.checks) {
        assert_eq!((&e.case, &e.output), (&p.case, &p.output));
        // A check the CPU kernels pass, the CUDA kernels pass (the CPU's own known failures, such
        // as a trained bias's gradient summed in f16, are not the kernels').
        assert!(e.ok || !p.ok, "{dtype:?}: {e:?} fails with the emulated kernels (CPU: {p:?})");
    }

    // Every kernel the ops have for this dtype ran.
    let suffix = dtype.as_str();
    let mut expected = vec!["norm_fwd", "norm_bwd_x", "geglu_fwd", "geglu_bwd", "softmax_scaled"];
    if dtype != DType::F32 {
        expected.extend(["softmax_grad", "flash_fwd_d16", "flash_fwd_d48", "flash_fwd_d64", "flash_fwd_d80"]);
        expected.push("flash_fwd_d160");
    }
    for k in expected {
        let name = format!("{k}_{suffix}");
        assert!(ran.contains_key(&name), "{name} never ran; ran: {ran:?}");
    }

    // Threads last to first: the same results to the bit (no kernel reads another thread's
    // write without a barrier).
    let (reversed, _) = emulated_selftest(dtype, true);
    for (a, b) in emulated.checks.iter().zip(&reversed.checks) {
        assert_eq!(a.max_abs_diff.to_bits(), b.max_abs_diff.to_bits(), "{a:?} vs {b:?} in reverse order");
    }
}

#[test]
fn selftest_f32() {
    selftest_on_emulated_kernels(DType::F32);
}

#[test]
fn selftest_bf16() {
    selftest_on_emulated_kernels(DType::BF16);
}

#[test]
fn selftest_f16() {
    selftest_on_emulated_kernels(DType::F16);
}

/// `softmax(scale q kᵀ) v` in f64.
fn attention_f64(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(v).unwrap()
}

/// Each flash kernel (head sizes padded to 16..160, lengths not whole tiles, cross-attention's
/// shorter keys) against f64, within the self-test's tolerance for the dtype.
#[test]
fn flash_attention_every_head_size() {
    let _one = serial();
    emulation::set(true);
    let before = emulation::launches();
    let cpu = Device::Cpu;
    for dtype in [DType::BF16, DType::F16] {
        for (n, &(d, lq, lk)) in [
            (16, 37, 50),
            (29, 16, 16),
            (48, 33, 77),
            (64, 70, 13),
            (75, 20, 40),
            (96, 17, 33),
            (120, 5, 9),
            (160, 40, 77),
        ]
        .iter()
        .enumerate()
        {
            let draw = |seed, len| {
                let t = ipr_diffusion::noise::randn(seed, &[2, len, d][..], DType::F32, &cpu).unwrap();
                t.to_dtype(dtype).unwrap()
            };
            let (q, k, v) = (draw(10 * n as u64, lq), draw(10 * n as u64 + 1, lk), draw(10 * n as u64 + 2, lk));
            let scale = 1.0 / (d as f64).sqrt();
            let got = ipr_diffusion::attention::flash_attention(&q, &k, &v, scale).unwrap().expect("flash applies");
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = attention_f64(&f64s(&q), &f64s(&k), &f64s(&v), scale);
            let diff = (f64s(&got) - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let peak = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let rel = diff.to_scalar::<f64>().unwrap() / peak.to_scalar::<f64>().unwrap();
            assert!(rel <= selftest::tolerance(dtype), "{dtype:?} d={d} lq={lq} lk={lk}: {rel}");
        }
    }
    emulation::set(false);
    let after = emulation::launches();
    for dim in [16, 32, 48, 64, 80, 96, 128, 160] {
        for dtype in ["bf16", "f16"] {
            let name = format!("flash_fwd_d{dim}_{dtype}");
            assert!(after.get(&name) > before.get(&name), "{name} did not run");
        }
    }
}

/// The emulator runs warp shuffles right, and finds a barrier only some threads reach and a read
/// of another thread's write without a barrier.
#[test]
fn emulator_finds_divergent_barriers_and_races() {
    let _one = serial();
    let mut out = vec![0f32; 128];
    emulation::launch_check("emu_check_warp_sum", (2, 1), 64, &mut out).unwrap();
    // Each warp's lanes all get the sum of its 32 thread indices.
    assert!(out[..32].iter().all(|&v| v == 496.0) && out[96..].iter().all(|&v| v == 1520.0), "{out:?}");

    let err = emulation::launch_check("emu_check_divergent_barrier", (1, 1), 64, &mut out).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("deadlock") && msg.contains("32 at __syncthreads") && msg.contains("32 returned"), "{msg}");

    let mut forward = vec![0f32; 64];
    let mut reverse = vec![0f32; 64];
    emulation::launch_check("emu_check_race", (1, 1), 64, &mut forward).unwrap();
    emulation::set_reverse_order(true);
    emulation::launch_check("emu_check_race", (1, 1), 64, &mut reverse).unwrap();
    emulation::set_reverse_order(false);
    assert_ne!(forward, reverse, "the racing read gives the same in both orders");

    assert!(emulation::launch_check("norm_fwd_f32", (1, 1), 32, &mut out).is_err());
    // Launch limits: a multiple of 32 threads, at most 1024 (or the kernel's launch bounds).
    let mut big = vec![0f32; 2048];
    let err = emulation::launch_check("emu_check_warp_sum", (1, 1), 2048, &mut big).unwrap_err();
    assert!(err.to_string().contains("at most 1024"), "{err}");
    assert!(emulation::launch_check("emu_check_warp_sum", (1, 1), 48, &mut big).is_err());
}
