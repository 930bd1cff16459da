//! Throughput of OWL-ViT (Minderer et al. 2022) in candle at google/owlvit-base-patch32's shape,
//! random weights; ignored by default (slow). The transformers twin is
//! `scripts/fixtures/owlvit/bench_owlvit.py`; its docstring shows how to run both side by side.
//! `IPR_BENCH_BATCH`, `IPR_BENCH_QUERIES`, `IPR_BENCH_ITERS` override 1, 2, 3.

use candle_core::Device;
use ipr_detect::owlvit::{bench_owlvit, OwlVitConfig};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
#[ignore = "slow: times the full-size model"]
fn owlvit_base_patch32_throughput() {
    let (b, q, n) = (env("IPR_BENCH_BATCH", 1), env("IPR_BENCH_QUERIES", 2), env("IPR_BENCH_ITERS", 3));
    let report = bench_owlvit(&OwlVitConfig::base_patch32(), b, q, n, &Device::Cpu).unwrap();
    println!("{}", serde_json::json!({"impl": "candle", "report": report}));
}
