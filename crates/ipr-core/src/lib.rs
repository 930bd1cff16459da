//! The IPR method without tensors.
//!
//! Everything a researcher reads to check that ipr does what the paper ("Learning from
//! Mistakes: Iterative Prompt Relabeling for Text-to-Image Diffusion Model Training", Chen et
//! al., arXiv 2312.16204) and the VISOR benchmark (Gokhale et al., arXiv 2212.10015) say:
//! the SR2D prompt grammar, boxes and relations, the judge, relabel policies and loss weights,
//! VISOR metrics, and the dataset manifests that couple the stages on disk.

pub mod dataset;
pub mod detection;
pub mod error;
pub mod fs;
pub mod judge;
pub mod lock;
pub mod method;
pub mod metrics;
pub mod pair_split;
pub mod prompt;
pub mod relabel;
pub mod relation;
pub mod sr2d;
pub mod stages;
pub mod stats;
pub mod visor_format;
pub mod vocab;

pub use detection::{BBox, Detection};
pub use error::{Error, Result};
pub use prompt::Prompt;
pub use relation::Relation;
pub use vocab::{ObjectId, Vocabulary};
