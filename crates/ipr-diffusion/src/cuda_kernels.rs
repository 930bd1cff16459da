//! The project's CUDA kernels (`norm.cu`, `geglu.cu`, `attention.cu`, compiled to PTX by
//! `build.rs` with the `cuda` feature), launched from the `cuda_fwd` of the ops whose CPU kernels
//! sit beside them (`norm.rs`, `geglu.rs`, `attention.rs`). Every kernel exists for f32, bf16 and
//! f16 storage and computes in f32.
//!
//! `IPR_CUDA_KERNELS=0` switches them off (the ops then fall back to candle's primitive ops), so
//! one GPU run can time and check both paths. [`applies`] is the one gate, also without the
//! feature (then always false), so callers need no `cfg`.
//!
//! An op describes its launch once (`Launch`: kernel, grid, block, scalar arguments); the CUDA
//! driver runs it, and with the `cuda-emu` feature (tests) so can `emulation`: the same `.cu`
//! files built for the host, their threads run as fibers on the CPU, for CPU tensors while the
//! emulation is switched on. Then the ops take their CUDA paths on the CPU, and `ipr selftest`'s
//! cases check the kernels' arithmetic and indexing without a GPU.

use candle_core::{DType, Layout, Result, Shape, Tensor};

/// Whether the kernels are used (`IPR_CUDA_KERNELS` is not `0`), read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("IPR_CUDA_KERNELS").map_or(true, |v| v != "0"))
}

/// Whether the kernels take `t`: switched on, `t` in f32, bf16 or f16, on a CUDA device (feature
/// `cuda`) or on the CPU while the emulation is switched on (feature `cuda-emu`, `emulation::set`).
pub fn applies(t: &Tensor) -> bool {
    let device = (cfg!(feature = "cuda") && t.device().is_cuda()) || (emulating() && t.device().is_cpu());
    device && enabled() && kernel_dtype(t.dtype())
}

fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Whether a CPU op's `cpu_fwd` runs its kernel in the emulator: emulation on and `dtype` one the
/// kernels have (f64, the self-test's reference, always takes the CPU kernels).
pub(crate) fn emulates(dtype: DType) -> bool {
    emulating() && enabled() && kernel_dtype(dtype)
}

#[cfg(feature = "cuda-emu")]
fn emulating() -> bool {
    emulation::on()
}

#[cfg(not(feature = "cuda-emu"))]
fn emulating() -> bool {
    false
}

/// The `.cu` file a kernel is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Norm,
    Geglu,
    Attention,
}

impl Source {
    /// The file's name without `.cu` (the emulator's name for it).
    #[cfg_attr(not(feature = "cuda-emu"), allow(dead_code))]
    fn file(self) -> &'static str {
        &self.module()["ipr-".len()..]
    }

    /// The name its PTX module is loaded under (once per device).
    #[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
    fn module(self) -> &'static str {
        match self {
            Source::Norm => "ipr-norm",
            Source::Geglu => "ipr-geglu",
            Source::Attention => "ipr-attention",
        }
    }
}

/// A kernel's scalar arguments after its tensors.
#[derive(Debug, Clone, Copy)]
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

impl Scalars {
    /// The arguments in the kernel's order, as f64 (exact for each of them).
    #[cfg_attr(not(feature = "cuda-emu"), allow(dead_code))]
    pub(crate) fn values(&self) -> Vec<f64> {
        match *self {
            Scalars::Norm { groups, cg, s, eps, silu } => {
                vec![groups.into(), cg.into(), s.into(), eps.into(), silu.into()]
            }
            Scalars::Rows { rows, cols } => vec![rows as f64, cols as f64],
            Scalars::Softmax { cols, scale } => vec![cols as f64, scale.into()],
            Scalars::Flash { lq, lk, dh, scale } => vec![lq.into(), lk.into(), dh.into(), scale.into()],
        }
    }
}

/// One launch of `kernel` (`<kernel>_<dtype>` in `source`): tensors in (contiguous, of the first
/// input's dtype, or f32: per-row statistics), one tensor of `out_shape` in the first input's
/// dtype out (every element written by the kernel), `grid` blocks (a one-dimensional grid as
/// `(n, 1)`) of `block` threads.
#[derive(Debug, Clone)]
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
pub(crate) struct Launch {
    pub(crate) source: Source,
    pub(crate) kernel: &'static str,
    pub(crate) out_shape: Shape,
    pub(crate) scalars: Scalars,
    pub(crate) grid: (u32, u32),
    pub(crate) block: u32,
}

/// An op that is one kernel launch: its [`Launch`] for the inputs' layouts. Its `cuda_fwd`
/// launches it ([`kernel_op_fwd!`]), and so does its `cpu_fwd` in the emulator.
pub(crate) trait KernelOp {
    fn launch_spec(&self, layouts: &[&Layout]) -> Result<Launch>;
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

/// `l` on CPU tensors in the emulator (feature `cuda-emu`; without it, an error): the output and
/// its shape.
pub(crate) fn emulate(
    l: Launch,
    inputs: &[(&candle_core::CpuStorage, &Layout)],
) -> Result<(candle_core::CpuStorage, Shape)> {
    #[cfg(feature = "cuda-emu")]
    return Ok((emulation::launch(&l, inputs)?, l.out_shape));
    #[cfg(not(feature = "cuda-emu"))]
    {
        let _ = inputs;
        candle_core::bail!("{}: the CUDA kernel emulator is not built (feature `cuda-emu`)", l.kernel)
    }
}

/// The `cpu_fwd` and `cuda_fwd` of a [`KernelOp`] that has no CPU kernel (its callers gate on
/// [`applies`]): on CUDA its kernel; on the CPU the emulated kernel, or an error.
macro_rules! kernel_op_fwd {
    (1) => {
        fn cpu_fwd(
            &self,
            s: &candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            use crate::cuda_kernels::KernelOp;
            crate::cuda_kernels::emulate(self.launch_spec(&[l])?, &[(s, l)])
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            use crate::cuda_kernels::KernelOp;
            crate::cuda_kernels::launch(self.launch_spec(&[l])?, &[(s, l)])
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            s1: &candle_core::CpuStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            l2: &candle_core::Layout,
            s3: &candle_core::CpuStorage,
            l3: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            use crate::cuda_kernels::KernelOp;
            crate::cuda_kernels::emulate(self.launch_spec(&[l1, l2, l3])?, &[(s1, l1), (s2, l2), (s3, l3)])
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CudaStorage,
            l2: &candle_core::Layout,
            s3: &candle_core::CudaStorage,
            l3: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            use crate::cuda_kernels::KernelOp;
            crate::cuda_kernels::launch(self.launch_spec(&[l1, l2, l3])?, &[(s1, l1), (s2, l2), (s3, l3)])
        }
    };
}
pub(crate) use kernel_op_fwd;

#[cfg(feature = "cuda")]
pub(crate) use launching::*;

#[cfg(feature = "cuda")]
mod launching {
    use super::{Launch, Scalars, Source};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernel_name, CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape, WithDType};

    const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
    const GEGLU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx"));
    const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

    /// The PTX of a source.
    fn ptx(source: Source) -> &'static str {
        match source {
            Source::Norm => NORM_PTX,
            Source::Geglu => GEGLU_PTX,
            Source::Attention => ATTENTION_PTX,
        }
    }

    /// Runs `l` on the contiguous CUDA `inputs`: the output and its shape.
    pub(crate) fn launch(l: Launch, inputs: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
        let first = inputs.first().ok_or_else(|| candle_core::Error::Msg(format!("{}: no inputs", l.kernel)))?;
        let out = match first.0.dtype() {
            DType::F32 => typed::<f32>(&l, inputs),
            DType::BF16 => typed::<half::bf16>(&l, inputs),
            DType::F16 => typed::<half::f16>(&l, inputs),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, "ipr CUDA kernel")),
        }?;
        Ok((out, l.out_shape))
    }

    fn typed<T: CudaDType + DeviceRepr + WithDType>(
        l: &Launch,
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
        let out = unsafe { dev.alloc::<T>(l.out_shape.elem_count())? };
        // One module per source, loaded once per device.
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(l.kernel), l.source.module(), ptx(l.source))?;
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
}

/// The CUDA kernel emulator (feature `cuda-emu`, for tests; see `src/cuda/emu/runtime.h`): the
/// `.cu` files built for the host by `build.rs`, every block's threads run as fibers, barriers
/// and warp shuffles kept. While [`set`] has switched it on, the ops take their CUDA paths for
/// CPU tensors in f32, bf16 and f16 and run the kernels here.
#[cfg(feature = "cuda-emu")]
pub mod emulation {
    use super::{Launch, Layout, Result};
    use candle_core::backend::BackendStorage;
    use candle_core::CpuStorage;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    static ON: AtomicBool = AtomicBool::new(false);
    static REVERSE: AtomicBool = AtomicBool::new(false);
    static LAUNCHES: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

    extern "C" {
        fn ipr_cuda_emu_launch(
            file: *const std::ffi::c_char,
            name: *const std::ffi::c_char,
            grid_x: u32,
            grid_y: u32,
            block: u32,
            args: *const *mut std::ffi::c_void,
            n_args: usize,
            scalars: *const f64,
            n_scalars: usize,
            reverse: i32,
            err: *mut std::ffi::c_char,
            err_len: usize,
        ) -> i32;
    }

    /// Switches the emulation on or off for the whole process.
    pub fn set(on: bool) {
        ON.store(on, Ordering::SeqCst);
    }

    pub(crate) fn on() -> bool {
        ON.load(Ordering::Relaxed)
    }

    /// Runs each block's threads last to first instead of first to last: a kernel whose output
    /// changes with the order reads what another thread writes without a barrier between.
    pub fn set_reverse_order(reverse: bool) {
        REVERSE.store(reverse, Ordering::SeqCst);
    }

    /// How many times each kernel (`<kernel>_<dtype>`) has run in the emulator.
    pub fn launches() -> BTreeMap<String, usize> {
        LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs one of the emulator's own check kernels (`emu_check_*`, which take one f32 buffer of
    /// `grid.0 * grid.1 * block` elements), for its tests.
    pub fn launch_check(name: &str, grid: (u32, u32), block: u32, out: &mut [f32]) -> Result<()> {
        if !name.starts_with("emu_check_") || out.len() < (grid.0 * grid.1 * block) as usize {
            candle_core::bail!("{name}: not a check kernel, or {} elements for {grid:?} x {block}", out.len());
        }
        let mut args = [out.as_mut_ptr().cast()];
        // SAFETY: a check kernel writes at most one element per thread of `out`, checked above.
        unsafe { run("emu", name, grid, block, &mut args, &[]) }
    }

    /// # Safety
    /// `args` point to buffers as large as the kernel `name` addresses for `grid`, `block` and
    /// `scalars`, of its parameters' types.
    unsafe fn run(
        file: &str,
        name: &str,
        grid: (u32, u32),
        block: u32,
        args: &mut [*mut std::ffi::c_void],
        scalars: &[f64],
    ) -> Result<()> {
        let cstr = |s: &str| std::ffi::CString::new(s).map_err(|e| candle_core::Error::Msg(e.to_string()));
        let (c_file, c_name) = (cstr(file)?, cstr(name)?);
        let mut err = vec![0 as std::ffi::c_char; 1024];
        let status = ipr_cuda_emu_launch(
            c_file.as_ptr(),
            c_name.as_ptr(),
            grid.0,
            grid.1,
            block,
            args.as_ptr(),
            args.len(),
            scalars.as_ptr(),
            scalars.len(),
            i32::from(REVERSE.load(Ordering::SeqCst)),
            err.as_mut_ptr(),
            err.len(),
        );
        if status != 0 {
            let msg = std::ffi::CStr::from_ptr(err.as_ptr()).to_string_lossy().into_owned();
            candle_core::bail!("CUDA emulator: {msg}");
        }
        *LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_string()).or_default() += 1;
        Ok(())
    }

    /// A contiguous input's elements as the kernel reads them.
    fn input_ptr(s: &CpuStorage, l: &Layout, kernel: &str) -> Result<*mut std::ffi::c_void> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{kernel}: an input is not contiguous")))?;
        // The kernels never write their inputs (the pointer is `const` in their signatures).
        Ok(match s {
            CpuStorage::F32(v) => v[start..end].as_ptr() as *mut std::ffi::c_void,
            CpuStorage::BF16(v) => v[start..end].as_ptr() as *mut std::ffi::c_void,
            CpuStorage::F16(v) => v[start..end].as_ptr() as *mut std::ffi::c_void,
            other => candle_core::bail!("{kernel}: no kernel for {:?}", other.dtype()),
        })
    }

    /// Elements of a guard zone on each side of an output.
    const GUARD: usize = 1024;

    /// Runs `l` on the contiguous CPU `inputs`. The output starts as NaN, so an element the
    /// kernel fails to write shows in any comparison, and it lies between two guard zones that
    /// must still be NaN afterwards: a write past either end is an error.
    pub(crate) fn launch(l: &Launch, inputs: &[(&CpuStorage, &Layout)]) -> Result<CpuStorage> {
        let first = inputs.first().ok_or_else(|| candle_core::Error::Msg(format!("{}: no inputs", l.kernel)))?;
        let n = l.out_shape.elem_count();
        let name = format!("{}_{}", l.kernel, first.0.dtype().as_str());
        let args = inputs.iter().map(|(s, layout)| input_ptr(s, layout, &name)).collect::<Result<Vec<_>>>()?;
        match first.0 {
            CpuStorage::F32(_) => typed(l, &name, args, vec![f32::NAN; n + 2 * GUARD]).map(CpuStorage::F32),
            CpuStorage::BF16(_) => typed(l, &name, args, vec![half::bf16::NAN; n + 2 * GUARD]).map(CpuStorage::BF16),
            CpuStorage::F16(_) => typed(l, &name, args, vec![half::f16::NAN; n + 2 * GUARD]).map(CpuStorage::F16),
            other => candle_core::bail!("{}: no kernel for {:?}", l.kernel, other.dtype()),
        }
    }

    /// [`launch`] with the guarded output `out` (NaN) of the kernel's type `T`.
    fn typed<T: Copy>(l: &Launch, name: &str, mut args: Vec<*mut std::ffi::c_void>, mut out: Vec<T>) -> Result<Vec<T>> {
        let nan = out[0];
        // NaN != NaN: compare the bits.
        let bits = |v: &T| -> Vec<u8> {
            // SAFETY: T is a plain number type (f32, bf16, f16).
            unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
        };
        args.push(out[GUARD..].as_mut_ptr().cast());
        // SAFETY: the inputs hold what the launch's shapes say (the same spec CUDA runs), the
        // output `out_shape` elements after its guard zone; the emulator checks the argument counts.
        unsafe { run(l.source.file(), name, l.grid, l.block, &mut args, &l.scalars.values())? };
        let n = out.len() - 2 * GUARD;
        if out[..GUARD].iter().chain(&out[GUARD + n..]).any(|v| bits(v) != bits(&nan)) {
            candle_core::bail!("CUDA emulator: {name} wrote outside its output of {n} elements");
        }
        out.truncate(GUARD + n);
        Ok(out.split_off(GUARD))
    }
}
