//! [`Collective`] over MPI (the `mpi` feature: rsmpi over the system's MPI library, e.g. Open MPI
//! from Debian's `openmpi-bin libopenmpi-dev`).
//!
//! MPI is initialised with `MPI_THREAD_FUNNELED`: the rayon threads that compute never call MPI,
//! only the thread that started it does. Collectives are gathers and a broadcast; sums are done
//! by the caller in a fixed order (MPI_SUM at 4 ranks was measured not to equal a rank-order sum).

use anyhow::{anyhow, bail, Result};
use ipr_diffusion::collective::Collective;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

pub use mpi::environment::Universe;

/// The world of ranks MPI started.
pub struct MpiCollective {
    world: SimpleCommunicator,
}

/// Initialises MPI and returns this rank's world, with its rank among the ranks of its machine.
pub fn init() -> Result<crate::world::World> {
    let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .ok_or_else(|| anyhow!("MPI was already initialised in this process"))?;
    if threading < mpi::Threading::Funneled {
        bail!("the MPI library gives thread level {threading:?}; ipr needs Funneled (compute threads beside MPI)");
    }
    let world = universe.world();
    // The ranks that share this machine's memory, in world order: the local rank picks the GPU.
    let local_rank = world.split_shared(world.rank()).rank() as usize;
    Ok(crate::world::World::from_mpi(Box::new(MpiCollective { world }), local_rank, universe))
}

/// MPI_Abort on the world: every rank ends.
pub fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn barrier(&self) -> ipr_diffusion::Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn all_gather_f64(&self, data: &[f64]) -> ipr_diffusion::Result<Vec<f64>> {
        let mut out = vec![0f64; data.len() * self.size()];
        self.world.all_gather_into(data, &mut out[..]);
        Ok(out)
    }
    fn all_gather_f32(&self, data: &[f32]) -> ipr_diffusion::Result<Vec<f32>> {
        let mut out = vec![0f32; data.len() * self.size()];
        self.world.all_gather_into(data, &mut out[..]);
        Ok(out)
    }
    fn broadcast_bytes(&self, root: usize, data: &mut [u8]) -> ipr_diffusion::Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(data);
        Ok(())
    }
    fn describe(&self) -> String {
        let (major, minor) = mpi::environment::version();
        // "Open MPI v4.1.4, package: ..., repo rev: ..." -> "Open MPI v4.1.4"
        let library = mpi::environment::library_version().unwrap_or_default();
        let library = library.split([',', '\0', '\n']).next().unwrap_or_default().trim().to_string();
        format!("MPI {major}.{minor} ({library})")
    }
}
