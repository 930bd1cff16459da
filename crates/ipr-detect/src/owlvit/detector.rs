//! OWL-ViT as VISOR runs it (Gokhale et al. 2022, "Benchmarking Spatial Relationships in
//! Text-to-Image Generation"): queries "a photo of a {obj}", boxes with score > 0.1, each labelled
//! with its best query. A model folder is what `OwlViTForObjectDetection.save_pretrained` and
//! `OwlViTProcessor.save_pretrained` write (google/owlvit-base-patch32 on the hub has this layout);
//! OWLv2 folders (google/owlv2-*) load the same way.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use ipr_core::{BBox, Detection};
use ipr_diffusion::tokenizer::ClipTokenizer;

use super::config::OwlVersion;
use super::model::OwlVit;
use super::postprocess::{post_process_object_detection, QueryDetection};
use crate::detector::{DetectError, Detector};
use crate::model_error::{ModelError, Result};
use crate::preprocess::ImageProcessorConfig;

/// VISOR's query template; `{}` is replaced by the class name.
pub const VISOR_QUERY_TEMPLATE: &str = "a photo of a {}";
/// VISOR's score threshold (strict `>`).
pub const VISOR_THRESHOLD: f64 = 0.1;

/// The OWL-ViT network with its tokenizer and image processor.
pub struct OwlVitDetector {
    pub model: OwlVit,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessorConfig,
    /// Boxes with score > threshold are kept ([`VISOR_THRESHOLD`] by default).
    pub threshold: f64,
    /// How a class name becomes a text query ([`VISOR_QUERY_TEMPLATE`] by default).
    pub query_template: String,
    device: Device,
}

impl OwlVitDetector {
    /// Loads a model folder: `config.json`, `model.safetensors`, `vocab.json`, `merges.txt`,
    /// `tokenizer_config.json`, and `preprocessor_config.json` or `processor_config.json`.
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        if !folder.is_dir() {
            return Err(ModelError::missing(folder, "OWL-ViT model folder"));
        }
        let model = OwlVit::load(folder, device)?;
        let mut tokenizer = ClipTokenizer::load(folder)?;
        // OWL-ViT pads queries to 16 tokens; a folder without model_max_length would pad to 77,
        // past the position table. Padding length does not change the outputs (causal attention,
        // EOS pooling), so clamp rather than fail.
        tokenizer.model_max_length = tokenizer.model_max_length.min(model.config.text_config.max_position_embeddings);
        let size = model.config.vision_config.image_size;
        let defaults = match model.config.version {
            OwlVersion::V1 => ImageProcessorConfig::owlvit(size),
            OwlVersion::V2 => ImageProcessorConfig::owlv2(size),
        };
        let processor = ImageProcessorConfig::load(folder, defaults, true)?;
        let expect = model.config.vision_config.image_size;
        if processor.output_size(expect, expect + 1) != (expect, expect) {
            return Err(ModelError::config(
                &folder.join("preprocessor_config.json"),
                "size",
                format!("the processor does not produce {expect}x{expect} images (vision_config.image_size)"),
            ));
        }
        Ok(Self {
            model,
            tokenizer,
            processor,
            threshold: VISOR_THRESHOLD,
            query_template: VISOR_QUERY_TEMPLATE.to_string(),
            device: device.clone(),
        })
    }

    /// `input_ids (Q, L)` of text queries, as OwlViTProcessor (padding="max_length").
    pub fn tokenize(&self, queries: &[&str]) -> Result<Tensor> {
        if queries.is_empty() {
            return Err(ModelError::Input("no text queries".into()));
        }
        let ids = queries.iter().map(|q| self.tokenizer.encode(q)).collect::<std::result::Result<Vec<_>, _>>()?;
        let l = ids[0].len();
        Ok(Tensor::from_vec(ids.concat(), (queries.len(), l), &self.device)?)
    }

    /// Detections of `queries` in each image (all images get the same queries), with labels
    /// indexing `queries` and boxes in each image's own pixels.
    pub fn detect_batch(
        &self,
        images: &[&RgbImage],
        queries: &[&str],
        threshold: f64,
    ) -> Result<Vec<Vec<QueryDetection>>> {
        let pixel_values = self.processor.batch(images, &self.device)?;
        let ids = self.tokenize(queries)?;
        let ids = Tensor::cat(&vec![&ids; images.len()], 0)?;
        let out = self.model.forward(&pixel_values, &ids)?;
        // OWLv2 pads to a square, so its boxes are relative to the longer side (transformers
        // scales them by max(H, W) in both axes).
        let v2 = self.model.config.version == OwlVersion::V2 && self.processor.do_pad;
        let sizes: Vec<(usize, usize)> = images
            .iter()
            .map(|im| {
                let (h, w) = (im.height() as usize, im.width() as usize);
                if v2 {
                    (h.max(w), h.max(w))
                } else {
                    (h, w)
                }
            })
            .collect();
        post_process_object_detection(&out.logits, &out.pred_boxes, threshold as f32, &sizes)
    }

    /// Detections of `queries` in one image (`ipr detect --detector owlvit --query ...`).
    pub fn detect_queries(&self, image: &RgbImage, queries: &[&str], threshold: f64) -> Result<Vec<QueryDetection>> {
        Ok(self.detect_batch(&[image], queries, threshold)?.pop().unwrap_or_default())
    }

    /// The text query for a class name.
    pub fn query_for(&self, class: &str) -> String {
        self.query_template.replace("{}", class)
    }
}

impl Detector for OwlVitDetector {
    fn name(&self) -> String {
        self.model.config.version.prefix().into()
    }

    fn detect(&self, image: &RgbImage, classes: &[&str]) -> std::result::Result<Vec<Detection>, DetectError> {
        let backend = |message: String| DetectError::Backend { detector: "owlvit".into(), message };
        let queries: Vec<String> = classes.iter().map(|c| self.query_for(c)).collect();
        let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
        let found = self.detect_queries(image, &refs, self.threshold).map_err(|e| backend(e.to_string()))?;
        found
            .into_iter()
            .map(|d| {
                let [x1, y1, x2, y2] = d.bbox.map(f64::from);
                let bbox = BBox::new(x1, y1, x2, y2).map_err(backend)?;
                Detection::new(classes[d.label], f64::from(d.score), bbox).map_err(backend)
            })
            .collect()
    }
}
