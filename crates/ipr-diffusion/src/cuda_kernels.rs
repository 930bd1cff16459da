//! The project's CUDA kernels (`norm.cu`, `geglu.cu`, `attention.cu`, compiled to PTX by
//! `build.rs` with the `cuda` feature), launched from the `cuda_fwd` of the ops whose CPU kernels
//! sit beside them (`norm.rs`, `geglu.rs`, `attention.rs`). Every kernel exists for f32, bf16 and
//! f16 storage and computes in f32.
//!
//! `IPR_CUDA_KERNELS=0` switches them off (the ops then fall back to candle's primitive ops), so
//! one GPU run can time and check both paths. [`applies`] is the one gate, also without the
//! feature (then always false), so callers need no `cfg`.

use candle_core::{DType, Tensor};

/// Whether the kernels are used (`IPR_CUDA_KERNELS` is not `0`), read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("IPR_CUDA_KERNELS").map_or(true, |v| v != "0"))
}

/// Whether the kernels take `t`: built with the `cuda` feature, switched on, `t` on a CUDA device
/// in f32, bf16 or f16.
pub fn applies(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && enabled()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// The `cpu_fwd` of an op that only exists on CUDA (its callers gate on [`applies`]): an error.
macro_rules! cuda_only_cpu_fwd {
    (1) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
}
pub(crate) use cuda_only_cpu_fwd;

#[cfg(feature = "cuda")]
pub(crate) use launching::*;

#[cfg(feature = "cuda")]
mod launching {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernel_name, CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

    pub(crate) const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
    pub(crate) const GEGLU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx"));
    pub(crate) const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

    /// A kernel's scalar arguments after its tensors.
    pub(crate) enum Scalars {
        /// `groups, cg, s, eps, silu` of a norm kernel.
        Norm { groups: i32, cg: i32, s: i32, eps: f32, silu: i32 },
        /// `rows, cols` of a row-wise kernel (GEGLU: `cols` = half the row).
        Rows { rows: i64, cols: i64 },
        /// `cols, scale` of the attention softmax.
        Softmax { cols: i64, scale: f32 },
        /// `lq, lk, dh, scale` of the flash attention forward.
        Flash { lq: i32, lk: i32, dh: i32, scale: f32 },
    }

    /// One launch: `kernel` (`<kernel>_<dtype>` in `ptx`, loaded once as `module`), an output of
    /// `out_len` elements, `grid` blocks (a one-dimensional grid as `(n, 1)`) of `block` threads.
    pub(crate) struct Launch<'a> {
        pub(crate) module: &'a str,
        pub(crate) ptx: &'static str,
        pub(crate) kernel: &'a str,
        pub(crate) out_len: usize,
        pub(crate) scalars: Scalars,
        pub(crate) grid: (u32, u32),
        pub(crate) block: u32,
    }

    /// Runs `l` on the contiguous `inputs` (of the first input's dtype, or f32: per-row
    /// statistics); the output has the first input's dtype.
    pub(crate) fn launch(l: Launch, inputs: &[(&CudaStorage, &Layout)]) -> Result<CudaStorage> {
        let first = inputs.first().ok_or_else(|| candle_core::Error::Msg(format!("{}: no inputs", l.kernel)))?;
        match first.0.dtype() {
            DType::F32 => typed::<f32>(l, inputs),
            DType::BF16 => typed::<half::bf16>(l, inputs),
            DType::F16 => typed::<half::f16>(l, inputs),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, "ipr CUDA kernel")),
        }
    }

    fn typed<T: CudaDType + DeviceRepr + WithDType>(
        l: Launch,
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<CudaStorage> {
        let dev = inputs[0].0.device().clone();
        // An input of the kernel's type, or f32 (statistics beside half-precision tensors).
        enum View<'a, T> {
            Typed(CudaView<'a, T>),
            F32(CudaView<'a, f32>),
        }
        let views = inputs
            .iter()
            .map(|(s, layout)| {
                let (start, end) = layout
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg(format!("{}: an input is not contiguous", l.kernel)))?;
                Ok(if s.dtype() == T::DTYPE || s.dtype() != DType::F32 {
                    View::Typed(s.as_cuda_slice::<T>()?.slice(start..end))
                } else {
                    View::F32(s.as_cuda_slice::<f32>()?.slice(start..end))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(l.out_len)? };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(l.kernel), l.module, l.ptx)?;
        let mut b = func.builder();
        for v in &views {
            match v {
                View::Typed(v) => b.arg(v),
                View::F32(v) => b.arg(v),
            };
        }
        b.arg(&out);
        // The builder keeps references until the launch: to the fields of `l.scalars`.
        match &l.scalars {
            Scalars::Norm { groups, cg, s, eps, silu } => {
                b.arg(groups).arg(cg).arg(s).arg(eps).arg(silu);
            }
            Scalars::Rows { rows, cols } => {
                b.arg(rows).arg(cols);
            }
            Scalars::Softmax { cols, scale } => {
                b.arg(cols).arg(scale);
            }
            Scalars::Flash { lq, lk, dh, scale } => {
                b.arg(lq).arg(lk).arg(dh).arg(scale);
            }
        }
        let cfg = LaunchConfig { grid_dim: (l.grid.0, l.grid.1, 1), block_dim: (l.block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list matches the kernel's signature in the .cu file.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// Threads per block for a row of `len` elements reduced by one block: a power of two from 32
    /// to 1024, about eight elements per thread.
    pub(crate) fn row_block(len: usize) -> u32 {
        (len / 8).next_power_of_two().clamp(32, 1024) as u32
    }

    /// Threads per block of the elementwise kernels.
    pub(crate) const ELEMENTWISE_BLOCK: u32 = 256;

    /// Blocks of [`ELEMENTWISE_BLOCK`] threads for `n` elementwise items (each thread loops over
    /// the rest).
    pub(crate) fn elementwise_grid(n: usize) -> (u32, u32) {
        (n.div_ceil(ELEMENTWISE_BLOCK as usize).clamp(1, 65_535) as u32, 1)
    }
}
