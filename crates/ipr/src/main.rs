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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => commands::run::run(a),
        Command::Prompts(c) => commands::prompts::run(c),
        Command::Eval(c) => commands::eval::run(c),
        Command::Relabel(a) => commands::relabel::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
