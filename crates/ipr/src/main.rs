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
}

impl Command {
    /// Commands that mostly train (their shards allocate in parallel; see `single_malloc_arena`).
    /// `ipr run` samples most of its time, so it is not one of them.
    fn is_training(&self) -> bool {
        matches!(
            self,
            Command::Train(_)
                | Command::Bench(commands::bench::Command::TrainStep { .. })
                | Command::Toy(commands::toy::Command::Pretrain { .. })
        )
    }
}

fn main() {
    let cli = Cli::parse();
    // Every command runs models on the CPU: keep freed buffers in the heap (no mmap/munmap and
    // page faults per tensor) and leave the cores to rayon (see `cpu_runtime`).
    ipr_diffusion::train::cpu_runtime();
    ipr_diffusion::attention::set_block_bytes(match cli.attention_block_mib {
        0 => usize::MAX,
        mib => mib << 20,
    });
    if !cli.command.is_training() {
        ipr_diffusion::train::single_malloc_arena();
    }
    let result = match cli.command {
        Command::Run(a) => commands::run::run(a),
        Command::Prompts(c) => commands::prompts::run(c),
        Command::Eval(c) => commands::eval::run(c),
        Command::Relabel(a) => commands::relabel::run(a),
        Command::Detect(a) => commands::detect::run(a),
        Command::Merge(a) => commands::merge::run(a),
        Command::Bench(c) => commands::bench::run(c),
        Command::Toy(c) => commands::toy::run(c),
        Command::Train(a) => commands::train::run(a),
        Command::Sample(a) => commands::sample::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", ipr::error_chain(&e));
        std::process::exit(1);
    }
}
