//! The gradient exchange on GPUs: [`Collective::all_gather_tensor`] over NCCL (the `nccl`
//! feature: candle's, through cudarc), everything else over the host collective (MPI, or a
//! process alone).
//!
//! One rank per GPU (NCCL refuses two ranks on one device): the device is the rank's local index
//! (`World::device_name`). Rank 0 makes the NCCL id and the host collective broadcasts it, so the
//! launcher that started the ranks is the only rendezvous (no TCP of ipr's own). A world of one
//! process still gets a communicator, of size one, and still exchanges through it: that is how a
//! single GPU checks the NCCL path against the plain one.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use ipr_diffusion::collective::Collective;

/// A communicator of the ranks' GPUs beside their host collective.
pub struct NcclCollective {
    host: Box<dyn Collective>,
    comm: Arc<SharedComm>,
}

/// The communicator, shared with the all-gather op. candle's custom ops must be `Send + Sync`;
/// NCCL communicators are not thread-safe, so only the thread that made it calls it (ipr calls
/// collectives from its main thread alone: MPI is initialised `Funneled` for the same reason).
struct SharedComm(Comm);
// SAFETY: see above: one thread uses the communicator; the wrapper only satisfies the op's bounds.
unsafe impl Send for SharedComm {}
// SAFETY: as above.
unsafe impl Sync for SharedComm {}

/// A communicator over `host`'s ranks on `device` (this rank's GPU).
pub fn init(host: Box<dyn Collective>, device: &Device) -> Result<NcclCollective> {
    let cuda = device.as_cuda_device()?;
    let mut id = [0u8; 128];
    if host.rank() == 0 {
        let made = Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)"))?;
        for (b, c) in id.iter_mut().zip(made.internal()) {
            *b = *c as u8;
        }
    }
    host.broadcast_bytes(0, &mut id)?;
    let internal = id.map(|b| b as std::ffi::c_char);
    let comm = Comm::from_rank(cuda.cuda_stream(), host.rank(), host.size(), Id::uninit(internal))
        .map_err(|e| anyhow!("ncclCommInitRank (rank {} of {}): {e:?}", host.rank(), host.size()))?;
    Ok(NcclCollective { host, comm: Arc::new(SharedComm(comm)) })
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn barrier(&self) -> ipr_diffusion::Result<()> {
        self.host.barrier()
    }
    fn all_gather_f64(&self, data: &[f64]) -> ipr_diffusion::Result<Vec<f64>> {
        self.host.all_gather_f64(data)
    }
    fn all_gather_f32(&self, data: &[f32]) -> ipr_diffusion::Result<Vec<f32>> {
        self.host.all_gather_f32(data)
    }
    fn broadcast_bytes(&self, root: usize, data: &mut [u8]) -> ipr_diffusion::Result<()> {
        self.host.broadcast_bytes(root, data)
    }
    fn all_gather_tensor(&self, t: &Tensor) -> ipr_diffusion::Result<Tensor> {
        if !t.device().is_cuda() {
            let host: Vec<f32> = t.to_dtype(DType::F32)?.to_vec1()?;
            let all = self.host.all_gather_f32(&host)?;
            let n = all.len();
            return Ok(Tensor::from_vec(all, n, t.device())?);
        }
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        Ok(t.apply_op1_no_bwd(&AllGather { comm: self.comm.clone(), size: self.size() })?)
    }
    fn on_device(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        format!("{} + NCCL", self.host.describe())
    }
}

/// NCCL's all-gather of a contiguous 1-D f32 tensor: `(size * n,)`, rank order.
struct AllGather {
    comm: Arc<SharedComm>,
    size: usize,
}

impl CustomOp1 for AllGather {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-gather runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-gather needs a contiguous tensor")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let device = s.device().clone();
        let mut dst = device.alloc_zeros::<f32>((end - start) * self.size)?;
        self.comm.0.all_gather(&src, &mut dst).map_err(|e| candle_core::Error::Msg(format!("ncclAllGather: {e:?}")))?;
        let n = dst.len();
        Ok((CudaStorage::wrap_cuda_slice(dst, device), Shape::from(n)))
    }
}
