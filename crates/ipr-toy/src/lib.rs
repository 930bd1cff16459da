//! The toy shapes world: classes, scenes, renderer, pair split, caption noise model,
//! word-level tokenizer, an oracle sampler, VISOR evaluation per split, imagefolder export,
//! image grids.
//!
//! A world small enough to train and evaluate a diffusion model on two CPU cores, with an exact
//! detector (in `ipr-detect`), so the whole IPR loop runs and is tested anywhere. Prompts are in
//! exactly the SR2D grammar of `ipr-core` over the toy [`classes::vocabulary`], so the judge,
//! relabeler and VISOR metrics run unchanged. See ARCHITECTURE.md.

pub mod captions;
pub mod classes;
pub mod colour;
pub mod degrade;
pub mod eval;
pub mod export;
pub mod grid;
pub mod oracle;
pub mod render;
pub mod split;
pub mod tokenizer;
pub mod world;

pub use captions::{CaptionNoise, CaptionedScenes, TrainingPair};
pub use classes::{vocabulary, ClassSpec, Shape, CLASSES};
pub use grid::write_grid;
pub use oracle::oracle_image;
pub use render::render;
pub use split::{PairSplit, Split};
pub use tokenizer::WordTokenizer;
pub use world::{PlacedObject, Rect, Scene, IMAGE_SIZE};
