//! The toy shapes world: vocabulary, renderer, caption noise model, pretraining. See ARCHITECTURE.md.
