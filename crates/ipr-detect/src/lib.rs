//! Detectors: the `Detector` trait, the exact toy detector, OWL-ViT. See ARCHITECTURE.md.
