//! Detectors: the [`Detector`] trait, the exact toy detector and a seeded noise wrapper.
//!
//! IPR's feedback and VISOR's scores both come from an object detector: GLIP in the paper's
//! relabeling, OWL-ViT in VISOR. A detector here takes an image and the class names to look
//! for (the prompt's objects, as VISOR queries them) and returns labelled boxes in pixels.
//! The toy world's detector is exact by construction, so the loop can be studied without
//! detector error, and [`noise::NoisyDetector`] adds misses, false boxes and label swaps at
//! chosen rates to study feedback as imperfect as GLIP's. See ARCHITECTURE.md.

pub mod detector;
pub mod noise;
pub mod toy;
// Neural evaluators on candle (VISOR's OWL-ViT, CLIP score), parity-tested against transformers.
pub mod clip_score;
pub mod clip_vision;
pub mod folder;
pub mod model_error;
pub mod owlvit;
pub mod pil_resize;
pub mod preprocess;
pub mod scipy_resize;

pub use clip_score::{clip_score, ClipScorer};
pub use detector::{DetectError, Detector};
pub use model_error::ModelError;
pub use noise::{DetectorNoise, NoisyDetector};
pub use owlvit::OwlVitDetector;
pub use toy::{ToyDetector, ToyDetectorConfig};
