//! The processes of one job and the few collective operations ipr needs from them.
//!
//! ipr never coordinates processes itself (docs: scale-out.md): under `mpirun` / `srun` every
//! rank runs the same command, and an implementation of [`Collective`] over the launcher's MPI
//! (the `ipr` crate's `mpi` feature), or NCCL for tensors on GPUs, does the exchanges. Alone, a
//! process is [`SingleProcess`], a world of one, where every operation is the identity.
//!
//! Only gathers are offered, never a reduction: a sum done by the library (MPI_SUM, NCCL's
//! all-reduce) is not bit-stable across world sizes (measured: 4 ranks differ from a rank-order
//! sum in 65,473 of 65,536 floats), so callers gather every rank's values and sum them in a fixed
//! order themselves.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A group of processes running the same command. Every rank must make the same calls in the
/// same order (a collective on one rank waits for it on all).
pub trait Collective {
    /// This process's index, `0 <= rank < size`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Every rank's `data` (the same length on all ranks), concatenated in rank order, on every rank.
    fn all_gather_f64(&self, data: &[f64]) -> Result<Vec<f64>>;
    /// Every rank's `data` (the same length on all ranks), concatenated in rank order, on every rank.
    fn all_gather_f32(&self, data: &[f32]) -> Result<Vec<f32>>;
    /// Rank `root`'s bytes on every rank (`data` has the same length everywhere).
    fn broadcast_bytes(&self, root: usize, data: &mut [u8]) -> Result<()>;
    /// [`Collective::all_gather_f32`] of a 1-D f32 tensor: `(size * n,)` on the tensor's device.
    /// The default copies through the host; a GPU implementation (NCCL) gathers on the device.
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(t.clone());
        }
        let host: Vec<f32> = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1()?;
        let all = self.all_gather_f32(&host)?;
        let n = all.len();
        Ok(Tensor::from_vec(all, n, t.device())?)
    }
    /// Whether tensors are gathered on their device (NCCL). Such a collective exchanges even in a
    /// world of one process, which is how one GPU checks the device path against the plain one.
    fn on_device(&self) -> bool {
        false
    }
    /// The launcher's name for this world, for logs and `metrics.json` ("single process",
    /// "MPI", "MPI + NCCL").
    fn describe(&self) -> String;
}

/// One process alone: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_f64(&self, data: &[f64]) -> Result<Vec<f64>> {
        Ok(data.to_vec())
    }
    fn all_gather_f32(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn broadcast_bytes(&self, root: usize, _data: &mut [u8]) -> Result<()> {
        if root != 0 {
            return Err(Error::Input(format!("broadcast from rank {root} in a world of one process")));
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

/// Rank 0's bytes on every rank, of any length (`data` matters on rank 0 only): how ranks agree
/// on what rank 0 read or decided, rather than each reading a shared file system that may not
/// show them the same state at the same moment.
pub fn broadcast_from_root(c: &dyn Collective, data: Vec<u8>) -> Result<Vec<u8>> {
    if c.size() == 1 {
        return Ok(data);
    }
    let mut len = (data.len() as u64).to_le_bytes();
    c.broadcast_bytes(0, &mut len)?;
    let mut out = if c.rank() == 0 { data } else { vec![0u8; u64::from_le_bytes(len) as usize] };
    c.broadcast_bytes(0, &mut out)?;
    Ok(out)
}

/// Rank 0's `flag` on every rank.
pub fn root_decides(c: &dyn Collective, flag: bool) -> Result<bool> {
    Ok(broadcast_from_root(c, vec![u8::from(flag)])?[0] != 0)
}

/// Checks that `data` is the same on every rank (a config, a file's bytes): its length and a
/// 64-bit hash are gathered and compared. Returns the ranks that disagree with rank 0.
pub fn disagreeing_ranks(c: &dyn Collective, data: &[u8]) -> Result<Vec<usize>> {
    let mine = [data.len() as f64, (fnv1a(data) >> 32) as f64, (fnv1a(data) & 0xFFFF_FFFF) as f64];
    let all = c.all_gather_f64(&mine)?;
    let root = &all[..3];
    Ok(all.chunks(3).enumerate().filter(|(_, v)| *v != root).map(|(r, _)| r).collect())
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_is_the_identity() {
        let c = SingleProcess;
        assert_eq!((c.rank(), c.size()), (0, 1));
        assert_eq!(c.all_gather_f32(&[1.0, 2.0]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(c.all_gather_f64(&[3.0]).unwrap(), vec![3.0]);
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        assert_eq!(c.all_gather_tensor(&t).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        assert!(c.broadcast_bytes(1, &mut [0u8; 4]).is_err());
        assert!(disagreeing_ranks(&c, b"run.toml").unwrap().is_empty());
        assert_eq!(broadcast_from_root(&c, b"abc".to_vec()).unwrap(), b"abc");
        assert!(root_decides(&c, true).unwrap() && !root_decides(&c, false).unwrap());
    }
}
