//! The shipped toy base model (`models/toy-base`, made by `ipr toy pretrain`; the command, seed
//! and time are in its `PRETRAIN.json`), embedded in the binary so that `ipr run` and
//! `ipr toy export` work from any folder with nothing but the executable.

use anyhow::Result;
use std::path::Path;

macro_rules! embedded {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/toy-base/", $path)))),*]
    };
}

/// Every file of the folder, by relative path.
pub const FILES: &[(&str, &[u8])] = embedded!(
    "model_index.json",
    "PRETRAIN.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
);

/// Write the base model to `dir` (built aside and renamed into place; `dir` must not exist).
pub fn export(dir: &Path) -> Result<()> {
    ipr_core::fs::build_dir(dir, |tmp| -> Result<()> {
        for (rel, bytes) in FILES {
            let path = tmp.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| ipr_core::Error::io(parent, e))?;
            }
            std::fs::write(&path, bytes).map_err(|e| ipr_core::Error::io(&path, e))?;
        }
        Ok(())
    })
}

/// `dir` holds exactly the embedded model (same files, same bytes).
pub fn is_exported(dir: &Path) -> bool {
    FILES.iter().all(|(rel, bytes)| std::fs::read(dir.join(rel)).is_ok_and(|b| b == *bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_files_are_the_committed_folder() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/toy-base");
        let mut on_disk: Vec<String> = walk(&root).into_iter().collect();
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "models/toy-base and toy_base::FILES list different files");
        assert!(is_exported(&root));
    }

    #[test]
    fn export_writes_a_loadable_model_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("base");
        export(&out).unwrap();
        assert!(is_exported(&out));
        assert!(export(&out).is_err());
        let pipe =
            ipr_diffusion::pipeline::Pipeline::load(&out, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert_eq!(pipe.latent_shape(1), (1, 3, 32, 32));
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out
    }
}
