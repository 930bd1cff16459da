//! Launching the project's CUDA kernels (`norm.cu`, `geglu.cu`, `attention.cu`, compiled to PTX by
//! `build.rs`) from the `cuda_fwd` of the ops whose CPU kernels sit beside them (`norm.rs`,
//! `geglu.rs`, `attention.rs`).
//! Every kernel exists for f32, bf16 and f16 storage and computes in f32.
//!
//! `IPR_CUDA_KERNELS=0` switches them off (the ops then fall back to candle's primitive ops), so
//! one GPU run can time and check both paths.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{kernel_name, CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

pub(crate) const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
pub(crate) const GEGLU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx"));
pub(crate) const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// Whether the kernels are used (`IPR_CUDA_KERNELS` is not `0`), read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("IPR_CUDA_KERNELS").map_or(true, |v| v != "0"))
}

/// Whether the kernels take `dtype`.
pub(crate) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// A kernel's scalar arguments after its tensors.
pub(crate) enum Scalars {
    /// `groups, cg, s, eps, silu` of a norm kernel.
    Norm { groups: i32, cg: i32, s: i32, eps: f32, silu: i32 },
    /// `rows, n` of a GEGLU kernel.
    Geglu { rows: i64, n: i64 },
    /// `cols, scale` of the attention softmax.
    Softmax { cols: i64, scale: f32 },
    /// `lq, lk, dh, scale` of the flash attention forward.
    Flash { lq: i32, lk: i32, dh: i32, scale: f32 },
    /// `rows, cols` of a row-wise elementwise kernel.
    Rows { rows: i64, cols: i64 },
}

/// Launches `kernel` (`<name>_<dtype>` in `ptx`, loaded once as `module`) on the contiguous
/// `inputs` (of the first input's dtype, or f32: per-row statistics) and a new output of `out_len`
/// elements of the first input's dtype, with `grid` blocks of `block` threads (a one-dimensional
/// grid as `(n, 1)`); returns the output.
pub(crate) fn launch(
    (module, ptx, kernel): (&str, &str, &str),
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    scalars: Scalars,
    (grid, block): ((u32, u32), u32),
) -> Result<CudaStorage> {
    let first = inputs.first().ok_or_else(|| candle_core::Error::Msg(format!("{kernel}: no inputs")))?;
    match first.0.dtype() {
        DType::F32 => typed::<f32>((module, ptx, kernel), inputs, out_len, scalars, (grid, block)),
        DType::BF16 => typed::<half::bf16>((module, ptx, kernel), inputs, out_len, scalars, (grid, block)),
        DType::F16 => typed::<half::f16>((module, ptx, kernel), inputs, out_len, scalars, (grid, block)),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other, "ipr CUDA kernel")),
    }
}

fn typed<T: CudaDType + DeviceRepr + WithDType>(
    (module, ptx, kernel): (&str, &str, &str),
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    scalars: Scalars,
    (grid, block): ((u32, u32), u32),
) -> Result<CudaStorage> {
    let dev = inputs[0].0.device().clone();
    // An input of the kernel's type, or f32 (statistics beside half-precision tensors).
    enum View<'a, T> {
        Typed(candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>),
        F32(candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>),
    }
    let views = inputs
        .iter()
        .map(|(s, l)| {
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg(format!("{kernel}: an input is not contiguous")))?;
            Ok(if s.dtype() == T::DTYPE || s.dtype() != DType::F32 {
                View::Typed(s.as_cuda_slice::<T>()?.slice(start..end))
            } else {
                View::F32(s.as_cuda_slice::<f32>()?.slice(start..end))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(out_len)? };
    let func = dev.get_or_load_custom_func(&kernel_name::<T>(kernel), module, ptx)?;
    let mut b = func.builder();
    for v in &views {
        match v {
            View::Typed(v) => b.arg(v),
            View::F32(v) => b.arg(v),
        };
    }
    b.arg(&out);
    // The builder keeps references until the launch: to the fields of `scalars`, alive till then.
    match &scalars {
        Scalars::Norm { groups, cg, s, eps, silu } => {
            b.arg(groups).arg(cg).arg(s).arg(eps).arg(silu);
        }
        Scalars::Geglu { rows, n } => {
            b.arg(rows).arg(n);
        }
        Scalars::Softmax { cols, scale } => {
            b.arg(cols).arg(scale);
        }
        Scalars::Flash { lq, lk, dh, scale } => {
            b.arg(lq).arg(lk).arg(dh).arg(scale);
        }
        Scalars::Rows { rows, cols } => {
            b.arg(rows).arg(cols);
        }
    }
    let cfg = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the argument list matches the kernel's signature in the .cu file.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Threads per block for a row of `len` elements reduced by one block: a power of two from 32 to
/// 1024, about eight elements per thread.
pub(crate) fn row_block(len: usize) -> u32 {
    (len / 8).next_power_of_two().clamp(32, 1024) as u32
}

/// Blocks of 256 threads for `n` elementwise items (each thread loops over the rest).
pub(crate) fn elementwise_grid(n: usize) -> ((u32, u32), u32) {
    ((n.div_ceil(256).clamp(1, 65_535) as u32, 1), 256)
}
