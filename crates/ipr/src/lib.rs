//! The IPR loop and its artifacts: what `ipr run` does, as library functions.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into this crate and the
//! method/engine crates. See ARCHITECTURE.md.

pub mod config;
pub mod detection;
pub mod metrics_file;
pub mod pretrain;
pub mod progress;
pub mod prompt_sets;
pub mod report;
pub mod run_loop;
pub mod sampling;
pub mod shard;
pub mod toy_base;
pub mod toy_grid;
pub mod toy_model;
pub mod training;
