//! OWL-ViT (Minderer et al. 2022, "Simple Open-Vocabulary Object Detection with Vision
//! Transformers"), VISOR's evaluator, on candle: loads transformers' `OwlViTForObjectDetection`
//! folders and reproduces `OwlViTProcessor` + the model + `post_process_object_detection`
//! (checked against transformers 5.24 by `tests/owlvit_parity.rs`). The same code runs OWLv2
//! (Minderer et al. 2023, "Scaling Open-Vocabulary Object Detection"; `model_type` "owlv2"):
//! its objectness head, its pad-to-square float preprocessing ([`crate::scipy_resize`]) and its
//! boxes relative to the padded square.
//!
//! Modules: `config` (`config.json`), `model` (the forward pass: CLIP towers + detection heads),
//! `heads` (class head, box head, box bias), `postprocess` (scores, labels, corner boxes in
//! pixels, strict threshold), `detector` (tokenizer + processor + model, VISOR's query template,
//! the `Detector` trait), `bench` (random-weight throughput).

pub mod bench;
pub mod config;
pub mod detector;
pub mod heads;
pub mod model;
pub mod postprocess;

pub use bench::{bench_owlvit, BenchReport};
pub use config::OwlVitConfig;
pub use detector::{OwlVitDetector, VISOR_QUERY_TEMPLATE, VISOR_THRESHOLD};
pub use model::{OwlVit, OwlVitOutput};
pub use postprocess::{post_process_object_detection, QueryDetection};
