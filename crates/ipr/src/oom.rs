//! A GPU that runs out of memory, told as what to change: the stage, the batch size it ran with
//! and the settings that lower memory, instead of the CUDA driver's error code.

/// Whether `e` (or a cause of it) is a device out-of-memory error (CUDA's, as candle and cudarc
/// report it).
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let text = c.to_string();
        text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("cudaErrorMemoryAllocation")
    })
}

/// `e` unchanged, or, when it is a GPU out-of-memory error, an error that names `stage`, the batch
/// size `batch` and what lowers memory: `batch_setting` (the flag or run.toml key that sets the
/// batch) and the attention block budget.
pub fn explain(e: anyhow::Error, stage: &str, batch: usize, batch_setting: &str) -> anyhow::Error {
    if !is_out_of_memory(&e) {
        return e;
    }
    let budget = match ipr_diffusion::attention::block_bytes() {
        usize::MAX => "0, blocking off".to_string(),
        b => format!("{} MiB", b >> 20),
    };
    anyhow::anyhow!(
        "{stage}: the GPU ran out of memory with batches of {batch}: lower {batch_setting}, or the attention \
         budget --attention-block-mib (now {budget}: smaller blocks hold fewer attention scores at once); \
         a smaller image size (sampling.height / width) or model.dtype = \"bf16\" also lower it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_stage_batch_and_settings_only_for_out_of_memory() {
        // The text candle 0.11 gives a failed CUDA allocation (cudarc's DriverError).
        let oom = anyhow::Error::msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").context("denoising");
        let e = explain(oom, "round 1: sample", 64, "sampling.batch_size").to_string();
        assert!(
            e.contains("round 1: sample") && e.contains("batches of 64") && e.contains("sampling.batch_size"),
            "{e}"
        );
        assert!(e.contains("--attention-block-mib") && !e.contains("DriverError"), "{e}");
        let other = explain(anyhow::Error::msg("shape mismatch"), "train", 2, "train.batch_size");
        assert_eq!(other.to_string(), "shape mismatch");
    }
}
