//! `ipr`: Iterative Prompt Relabeling for text-to-image diffusion models, measured with VISOR.
//!
//! The binary only parses arguments and dispatches; every command is a library function
//! (see ARCHITECTURE.md).

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ipr",
    version,
    about = "Iterative Prompt Relabeling for text-to-image diffusion models, measured with VISOR"
)]
struct Cli {
    /// Memory bound of attention: the scores of one block of queries may take at most this many
    /// MiB; larger attention runs block by block (forward and backward). 0: never block.
    #[arg(long, global = true, value_name = "MIB", default_value_t = ipr_diffusion::attention::DEFAULT_BLOCK_BYTES >> 20)]
    attention_block_mib: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the IPR loop (with no arguments: the toy demo).
    Run(commands::run::Args),
    /// Generate prompt sets.
    #[command(subcommand)]
    Prompts(commands::prompts::Command),
    /// Evaluate: VISOR metrics from results or detections.
    #[command(subcommand)]
    Eval(commands::eval::Command),
    /// Judge detections and relabel the wrong pairs into a training imagefolder.
    Relabel(commands::relabel::Args),
    /// Detect objects: one image, or every sample of a folder into detections.jsonl.
    Detect(commands::detect::Args),
    /// Merge the detections of shards (`--shard I/N` parts) into one detections.jsonl.
    Merge(commands::merge::Args),
    /// The toy shapes world: tokenizer, base model, evaluation, grids.
    #[command(subcommand)]
    Toy(commands::toy::Command),
    /// Train a LoRA adapter with IPR's reward-weighted loss on an imagefolder.
    Train(commands::train::Args),
    /// Generate images (optionally with a LoRA adapter).
    Sample(commands::sample::Args),
    /// Benchmarks (speed), each beside a Python twin in scripts/bench/.
    #[command(subcommand)]
    Bench(commands::bench::Command),
    /// Check every layer op, forward and backward, on a device and dtype against the CPU in f64.
    Selftest(commands::selftest::SelftestArgs),
}

// mimalloc: per-thread heaps without a shared lock (the training shards allocate in parallel)
// that keep freed pages (see `main`). glibc's malloc either shared one arena between the shards
// (8% of a LoRA step) or, with per-thread arenas, gave the pages of every freed 64 MB heap back
// to the kernel and faulted them in again (10% of a batch-32 step in page faults).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e` of mimalloc 3, the version
/// libmimalloc-sys builds; a test checks it against the option's default of 1000 ms).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never return freed pages to the kernel: tensors of the same sizes are freed and allocated
/// again at every step, and purging them made sampling pay page faults on each (toy
/// evaluation: 16.5 s with the default delay of 1 s, 14.9 s without purging).
fn keep_freed_pages() {
    // SAFETY: sets an allocator option; called first in main, before other threads exist.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

fn main() {
    keep_freed_pages();
    let cli = Cli::parse();
    // Every command runs models on the CPU: keep freed buffers in the heap (no mmap/munmap and
    // page faults per tensor) and leave the cores to rayon (see `cpu_runtime`).
    ipr_diffusion::train::cpu_runtime();
    ipr_diffusion::attention::set_block_bytes(match cli.attention_block_mib {
        0 => usize::MAX,
        mib => mib << 20,
    });
    let result = match cli.command {
        Command::Run(a) => commands::run::run(a),
        Command::Prompts(c) => commands::prompts::run(c),
        Command::Eval(c) => commands::eval::run(c),
        Command::Relabel(a) => commands::relabel::run(a),
        Command::Detect(a) => commands::detect::run(a),
        Command::Merge(a) => commands::merge::run(a),
        Command::Bench(c) => commands::bench::run(c),
        Command::Selftest(a) => commands::selftest::run(a),
        Command::Toy(c) => commands::toy::run(c),
        Command::Train(a) => commands::train::run(a),
        Command::Sample(a) => commands::sample::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", ipr::error_chain(&e));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_mimallocs() {
        // Tests do not run main: the option holds its default, 1000 (ms); the neighbouring
        // options default to 1 (eager_commit_delay) and 0 (use_numa_nodes).
        // SAFETY: reads an option.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, 1000);
    }
}
