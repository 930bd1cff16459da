//! `cargo run --release -p ipr-diffusion --example bench_train_step [UNET_DIR] [BATCH] [ITERS] [SHARDS]`:
//! the LoRA training step of `ipr bench train-step` (default: the toy-size config, batch 8).
fn main() -> ipr_diffusion::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = args.get(1).map(std::path::PathBuf::from).unwrap_or_else(|| here.join("examples/toy_unet_config.json"));
    let batch = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let iters = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let shards = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(ipr_diffusion::train::DEFAULT_SHARDS);
    let r = ipr_diffusion::train::bench::bench_train_step(
        &dir,
        batch,
        iters,
        shards,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        0,
    )?;
    println!("{}", serde_json::to_string(&r).expect("json"));
    Ok(())
}
