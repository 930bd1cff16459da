//! The IPR loop and its artifacts: what `ipr run` does, as library functions.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into this crate and the
//! method/engine crates. See ARCHITECTURE.md.

pub mod config;
pub mod ddpo;
pub mod detection;
pub mod metrics_file;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod oom;
pub mod pretrain;
pub mod progress;
pub mod prompt_sets;
pub mod report;
pub mod run_loop;
pub mod sampling;
pub mod shard;
pub mod study;
pub mod toy_base;
pub mod toy_grid;
pub mod toy_model;
pub mod training;
pub mod world;

/// An error and its causes on one line, each cause only where it adds to what was already said
/// (several library errors already print their source inline); a full disk is said so, with what
/// to do, whichever layer met it.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    let full = e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(ipr_core::error::is_disk_full))
        || msg.contains("No space left on device")
        || msg.contains("Disk quota exceeded");
    if full && !msg.contains(ipr_core::error::DISK_FULL) {
        msg.push_str(ipr_core::error::DISK_FULL);
    }
    msg
}
