use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `ipr selftest`.
#[derive(Args)]
pub struct SelftestArgs {
    /// cpu or cuda (cuda:N for another GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The dtype tested: f32, bf16 or f16 (the reference is the CPU in f64).
    #[arg(long, default_value = "f32", value_parser = super::parse_dtype)]
    dtype: candle_core::DType,
    /// Print the report as one JSON line.
    #[arg(long)]
    json: bool,
}

/// Runs the op self-test; fails (exit 1) when an op differs from its CPU reference.
pub fn run(a: SelftestArgs) -> Result<()> {
    let device = ipr_diffusion::sample::device_from_name(&a.device)?;
    let report = ipr_diffusion::selftest::run(&device, a.dtype)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "op self-test on {} in {} (tolerance {:.0e}, relative to each output's largest reference value)",
            report.device, report.dtype, report.tolerance
        );
        for c in &report.checks {
            let verdict = if c.ok { "ok" } else { "FAIL" };
            println!("  {:<40} {:<8} {:>10.2e}  {verdict}", c.case, c.output, c.rel_max_diff);
        }
        for (case, e) in &report.errors {
            println!("  {case:<40} ERROR {e}");
        }
    }
    if !report.ok {
        let failed = report.checks.iter().filter(|c| !c.ok).count() + report.errors.len();
        bail!("op self-test: {failed} check(s) failed on {} in {}", report.device, report.dtype);
    }
    Ok(())
}
