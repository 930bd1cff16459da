//! The processes one command runs on: a process alone, or the ranks an MPI launcher started.
//!
//! Under `mpirun -n N ipr ...` or `srun ipr ...` every rank runs the same command (scale-out.md:
//! the launcher is the engine, ipr has no coordinator). `ipr train` and `ipr run` then train
//! data-parallel and shard their independent stages over the ranks; rank 0 alone writes shared
//! artifacts. MPI comes from the `mpi` cargo feature (the system's MPI library); a binary built
//! without it refuses to run under a launcher rather than let every rank do all the work and
//! write the same files.

use anyhow::{bail, Result};
use ipr_diffusion::collective::{Collective, SingleProcess};

/// Environment variables that MPI launchers set in each rank: (rank, size) pairs.
const LAUNCHER_VARS: [(&str, &str); 3] = [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), // Open MPI's mpirun (and srun with PMIx)
    ("PMI_RANK", "PMI_SIZE"),                         // MPICH / Intel MPI (hydra), srun --mpi=pmi2
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),   // MVAPICH2
];

/// The rank and size a launcher gave this process, when one did (size > 1).
pub fn launcher_world(env: &dyn Fn(&str) -> Option<String>) -> Option<(String, usize, usize)> {
    LAUNCHER_VARS.iter().find_map(|(rank, size)| {
        let r: usize = env(rank)?.trim().parse().ok()?;
        let n: usize = env(size)?.trim().parse().ok()?;
        (n > 1).then(|| (format!("{rank}={r}, {size}={n}"), r, n))
    })
}

/// The processes of this command and their collective operations.
pub struct World {
    collective: Box<dyn Collective>,
    /// Index of this rank among the ranks on its machine (picks its GPU).
    pub local_rank: usize,
    #[cfg(feature = "mpi")]
    _mpi: Option<crate::mpi::Universe>,
}

impl World {
    /// A process alone.
    pub fn single() -> Self {
        World {
            collective: Box::new(SingleProcess),
            local_rank: 0,
            #[cfg(feature = "mpi")]
            _mpi: None,
        }
    }

    /// The world this process was started in: the MPI ranks when a launcher started it (with the
    /// `mpi` feature), else a process alone. Without the feature, a launcher's world of more than
    /// one rank is an error naming the variable that showed it.
    pub fn init() -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok();
        let launched = launcher_world(&env);
        #[cfg(feature = "mpi")]
        if launched.is_some() || env("PMIX_RANK").is_some() {
            return crate::mpi::init();
        }
        if let Some((seen, _, _)) = launched {
            bail!(
                "started by an MPI launcher ({seen}), but this ipr was built without MPI: every rank would \
                 do all the work and write the same files. Rebuild with `cargo build --release --features mpi`, \
                 or run one process"
            );
        }
        Ok(Self::single())
    }

    #[cfg(feature = "mpi")]
    pub(crate) fn from_mpi(collective: Box<dyn Collective>, local_rank: usize, universe: crate::mpi::Universe) -> Self {
        World { collective, local_rank, _mpi: Some(universe) }
    }

    /// Moves the tensor exchange onto `device` when it is a GPU and this binary has NCCL (the
    /// `nccl` feature): a communicator over this world's ranks, its id sent by the host
    /// collective. Elsewhere, or with `IPR_NCCL=0` (gradients then go through the host), nothing
    /// changes.
    pub fn attach_device(&mut self, device: &candle_core::Device) -> Result<()> {
        #[cfg(feature = "nccl")]
        if device.is_cuda() && std::env::var("IPR_NCCL").as_deref() != Ok("0") {
            let host = std::mem::replace(&mut self.collective, Box::new(SingleProcess));
            self.collective = Box::new(crate::nccl::init(host, device)?);
        }
        let _ = device;
        Ok(())
    }

    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }
    pub fn size(&self) -> usize {
        self.collective.size()
    }
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// The device of this rank: `cuda` means the GPU of its local rank when several ranks run
    /// (one rank per GPU: NCCL refuses two ranks on one device).
    pub fn device_name(&self, name: &str) -> String {
        if name == "cuda" && self.size() > 1 {
            format!("cuda:{}", self.local_rank)
        } else {
            name.to_string()
        }
    }

    /// Runs `body`; an error on any rank of a world of several ends every rank (MPI_Abort) after
    /// printing it, instead of leaving the others waiting forever in their next collective.
    pub fn run<T>(&mut self, body: impl FnOnce(&mut World) -> Result<T>) -> Result<T> {
        let out = body(self);
        if let Err(e) = &out {
            if self.size() > 1 {
                eprintln!("error (rank {} of {}): {}", self.rank(), self.size(), crate::error_chain(e));
                self.abort(1);
            }
        }
        out
    }

    /// Ends every rank of the world with `code`.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if self._mpi.is_some() {
            crate::mpi::abort(code);
        }
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn finds_the_launchers_world() {
        let env = |vars: &[(&str, &str)]| {
            let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            move |k: &str| m.get(k).cloned()
        };
        assert_eq!(launcher_world(&env(&[])), None);
        let ompi = launcher_world(&env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")])).unwrap();
        assert_eq!((ompi.1, ompi.2), (1, 2));
        assert!(ompi.0.contains("OMPI_COMM_WORLD_SIZE=2"));
        // A world of one is a process alone.
        assert_eq!(launcher_world(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "1")])), None);
        assert_eq!(launcher_world(&env(&[("PMI_RANK", "3"), ("PMI_SIZE", "4")])).map(|w| w.1), Some(3));
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn without_mpi_a_launched_world_is_refused() {
        // Only the variables of this test process are read: set, checked, removed.
        std::env::set_var("MV2_COMM_WORLD_RANK", "0");
        std::env::set_var("MV2_COMM_WORLD_SIZE", "2");
        let e = World::init().err().map(|e| e.to_string());
        std::env::remove_var("MV2_COMM_WORLD_RANK");
        std::env::remove_var("MV2_COMM_WORLD_SIZE");
        let e = e.expect("refused");
        assert!(e.contains("MV2_COMM_WORLD_SIZE=2") && e.contains("--features mpi"), "{e}");
    }
}
