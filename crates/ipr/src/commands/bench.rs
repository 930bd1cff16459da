use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// OWL-ViT forward throughput (images/s) with random weights of the given shape.
    Owlvit {
        /// The model shape; base-patch32 is VISOR's evaluator.
        #[arg(long, default_value = "base-patch32")]
        shape: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 2)]
        queries: usize,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Owlvit { shape, batch, queries, iters, device, json } => {
            let config = match shape.as_str() {
                "base-patch32" => ipr_detect::owlvit::config::OwlVitConfig::base_patch32(),
                other => anyhow::bail!("unknown --shape {other:?}: expected base-patch32"),
            };
            let device = ipr_diffusion::sample::device_from_name(&device)?;
            let report = ipr_detect::owlvit::bench::bench_owlvit(&config, batch, queries, iters, &device)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report:?}");
            }
            Ok(())
        }
    }
}
