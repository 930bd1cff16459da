//! The `Detector` trait: an image and class names in, labelled boxes out.
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels of the given image (ipr-core's [`BBox`]); labels are
//! the queried class names exactly as given, so a detection can be matched to the prompt's
//! objects by name. Only queried classes are reported, as with an open-vocabulary detector
//! that is asked for the prompt's objects (VISOR, and GLIP in the IPR paper).
//!
//! [`BBox`]: ipr_core::BBox

use image::RgbImage;
use ipr_core::Detection;

/// Why a detector could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetectError {
    #[error("the {detector} detector does not know the class {class:?} (it knows: {known})")]
    UnknownClass { detector: String, class: String, known: String },
    #[error("the {detector} detector failed: {message}")]
    Backend { detector: String, message: String },
}

/// Finds objects of the named classes in an image.
pub trait Detector {
    /// A short name for logs and run configs ("toy", "toy+noise").
    fn name(&self) -> String;

    /// Detections of `classes` in `image`, each labelled with one of the given names.
    fn detect(&self, image: &RgbImage, classes: &[&str]) -> Result<Vec<Detection>, DetectError>;
}

impl<D: Detector + ?Sized> Detector for &D {
    fn name(&self) -> String {
        (**self).name()
    }

    fn detect(&self, image: &RgbImage, classes: &[&str]) -> Result<Vec<Detection>, DetectError> {
        (**self).detect(image, classes)
    }
}

impl<D: Detector + ?Sized> Detector for Box<D> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn detect(&self, image: &RgbImage, classes: &[&str]) -> Result<Vec<Detection>, DetectError> {
        (**self).detect(image, classes)
    }
}
