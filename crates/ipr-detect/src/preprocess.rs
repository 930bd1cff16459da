//! Image preprocessing of transformers' CLIP-family image processors with the PIL backend
//! (`OwlViTImageProcessorPil`, `CLIPImageProcessorPil`, transformers 5.24): `convert_to_rgb`,
//! bicubic resize by Pillow, center crop, rescale by 1/255, normalise by the CLIP mean and std;
//! and `Owlv2ImageProcessorPil`'s rescale, pad to square, anti-aliased float resize, normalise.
//!
//! The arithmetic is numpy's: `(u8 as f64 * rescale_factor) as f32`, then `(x - mean) / std` in f32,
//! so pixel values are bit-identical to transformers' (checked by the parity tests).
//! Settings come from the model folder's `preprocessor_config.json` (hub checkpoints) or the
//! `image_processor` entry of `processor_config.json` (what transformers 5 `save_pretrained` writes).

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde_json::Value;

use crate::model_error::{read_json, ModelError, Result};
use crate::pil_resize::resize_bicubic;
use crate::scipy_resize::{resize_antialiased, HwcImage};

/// OpenAI CLIP's normalisation (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How the resize target is given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResizeTo {
    /// Exactly `height x width`, aspect ratio not kept (OWL-ViT).
    Exact { height: usize, width: usize },
    /// Shorter edge to this length, the other `int(size * long / short)` (CLIP).
    ShortestEdge(usize),
}

/// How an image is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeBackend {
    /// Pillow's bicubic on uint8, before rescaling (OWL-ViT, CLIP: [`resize_bicubic`]).
    PilBicubic,
    /// OWLv2: rescale, pad to a square with zeros (bottom, right), then scikit-image-style
    /// anti-aliased linear resize of the float image ([`crate::scipy_resize`]).
    ScipyAntialiased,
}

/// The settings of one image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub backend: ResizeBackend,
    /// OWLv2 only: pad to a square before resizing.
    pub do_pad: bool,
    pub do_resize: bool,
    pub size: ResizeTo,
    pub do_center_crop: bool,
    /// `(height, width)`.
    pub crop_size: (usize, usize),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ImageProcessorConfig {
    /// `OwlViTImageProcessor`'s defaults (google/owlvit-base-patch32: 768 x 768, no crop).
    pub fn owlvit(image_size: usize) -> Self {
        Self {
            backend: ResizeBackend::PilBicubic,
            do_pad: false,
            do_resize: true,
            size: ResizeTo::Exact { height: image_size, width: image_size },
            do_center_crop: false,
            crop_size: (image_size, image_size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// `Owlv2ImageProcessor`'s defaults (google/owlv2-*: 960 x 960 after padding to a square).
    pub fn owlv2(image_size: usize) -> Self {
        Self { backend: ResizeBackend::ScipyAntialiased, do_pad: true, ..Self::owlvit(image_size) }
    }

    /// `CLIPImageProcessor`'s defaults (shortest edge 224, center crop 224).
    pub fn clip(image_size: usize) -> Self {
        Self { size: ResizeTo::ShortestEdge(image_size), do_center_crop: true, ..Self::owlvit(image_size) }
    }

    /// Reads the processor settings of a model folder over `defaults`. `square` says how a bare
    /// integer `size` reads: OWL-ViT's processor makes it square, CLIP's a shortest edge.
    pub fn load(folder: &Path, defaults: Self, square: bool) -> Result<Self> {
        let pre = folder.join("preprocessor_config.json");
        let proc = folder.join("processor_config.json");
        let (path, v) = if pre.exists() {
            let v = read_json(&pre)?;
            (pre, v)
        } else if proc.exists() {
            let v = read_json(&proc)?;
            let inner = v.get("image_processor").cloned().ok_or_else(|| {
                ModelError::config(&proc, "image_processor", "missing (and there is no preprocessor_config.json)")
            })?;
            (proc, inner)
        } else {
            return Err(ModelError::missing(&pre, "image processor settings (nor processor_config.json)"));
        };
        Self::from_json(&v, &path, defaults, square)
    }

    fn from_json(v: &Value, path: &Path, defaults: Self, square: bool) -> Result<Self> {
        let mut c = defaults;
        let flag = |key: &str, d: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(d),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(ModelError::config(path, key, format!("expected true or false, found {other}"))),
            }
        };
        c.do_resize = flag("do_resize", c.do_resize)?;
        c.do_center_crop = flag("do_center_crop", c.do_center_crop)?;
        if c.backend == ResizeBackend::ScipyAntialiased {
            c.do_pad = flag("do_pad", c.do_pad)?;
        }
        // Early OWL-ViT configs on the hub spell do_rescale "rescale" (transformers maps it too).
        c.do_rescale = flag("do_rescale", flag("rescale", c.do_rescale)?)?;
        c.do_normalize = flag("do_normalize", c.do_normalize)?;
        // OWLv2's processor ignores `resample` (it always uses its own linear resize).
        if let Some(r) = v.get("resample").filter(|r| !r.is_null() && c.backend == ResizeBackend::PilBicubic) {
            if r.as_u64() != Some(3) {
                return Err(ModelError::config(
                    path,
                    "resample",
                    format!("only 3 (PIL bicubic) is supported, found {r}"),
                ));
            }
        }
        if let Some(s) = v.get("size").filter(|s| !s.is_null()) {
            c.size = parse_size(s, path, "size", square)?;
        }
        if let Some(s) = v.get("crop_size").filter(|s| !s.is_null()) {
            c.crop_size = match parse_size(s, path, "crop_size", true)? {
                ResizeTo::Exact { height, width } => (height, width),
                ResizeTo::ShortestEdge(_) => {
                    return Err(ModelError::config(path, "crop_size", "expected height and width"));
                }
            };
        }
        if let Some(f) = v.get("rescale_factor").filter(|s| !s.is_null()) {
            c.rescale_factor =
                f.as_f64().ok_or_else(|| ModelError::config(path, "rescale_factor", format!("not a number: {f}")))?;
        }
        for (key, dst) in [("image_mean", &mut c.image_mean), ("image_std", &mut c.image_std)] {
            if let Some(m) = v.get(key).filter(|s| !s.is_null()) {
                let vals: Vec<f64> =
                    m.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
                if vals.len() != 3 {
                    return Err(ModelError::config(path, key, format!("expected 3 numbers, found {m}")));
                }
                *dst = [vals[0] as f32, vals[1] as f32, vals[2] as f32];
            }
        }
        Ok(c)
    }

    /// The `(height, width)` of the pixel values this processor produces for an image.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let (h, w) = if self.do_resize { resize_target(self.size, height, width) } else { (height, width) };
        if self.do_center_crop {
            self.crop_size
        } else {
            (h, w)
        }
    }

    /// `pixel_values` of one RGB image, `(3, H, W)` f32, as the transformers processor computes them.
    pub fn pixel_values(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        if w == 0 || h == 0 {
            return Err(ModelError::Input("empty image".into()));
        }
        if self.backend == ResizeBackend::ScipyAntialiased {
            return self.owlv2_pixel_values(image, device);
        }
        let (mut buf, mut h, mut w) = (image.as_raw().clone(), h, w);
        if self.do_resize {
            let (nh, nw) = resize_target(self.size, h, w);
            buf = resize_bicubic(&buf, w, h, 3, nw, nh);
            (h, w) = (nh, nw);
        }
        if self.do_center_crop {
            let (ch, cw) = self.crop_size;
            if ch > h || cw > w {
                return Err(ModelError::Input(format!(
                    "center crop {ch}x{cw} is larger than the resized image {h}x{w} (padding is not implemented)"
                )));
            }
            // transformers: top = (h - crop_h) // 2, left = (w - crop_w) // 2.
            let (top, left) = ((h - ch) / 2, (w - cw) / 2);
            let mut out = Vec::with_capacity(ch * cw * 3);
            for y in top..top + ch {
                out.extend_from_slice(&buf[(y * w + left) * 3..(y * w + left + cw) * 3]);
            }
            (buf, h, w) = (out, ch, cw);
        }
        let mut chw = vec![0f32; 3 * h * w];
        for (i, px) in buf.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale { (px[c] as f64 * self.rescale_factor) as f32 } else { px[c] as f32 };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                chw[c * h * w + i] = v;
            }
        }
        Ok(Tensor::from_vec(chw, (3, h, w), device)?)
    }

    /// OWLv2's order: rescale, pad, resize (float), normalise.
    fn owlv2_pixel_values(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (ph, pw) = if self.do_pad { (w.max(h), w.max(h)) } else { (h, w) };
        let mut img = HwcImage { height: ph, width: pw, channels: 3, data: vec![0f32; ph * pw * 3] };
        for (i, px) in image.as_raw().chunks_exact(3).enumerate() {
            let (y, x) = (i / w, i % w);
            for (dst, &v) in img.data[(y * pw + x) * 3..(y * pw + x + 1) * 3].iter_mut().zip(px) {
                *dst = if self.do_rescale { (v as f64 * self.rescale_factor) as f32 } else { v as f32 };
            }
        }
        if self.do_resize {
            let (nh, nw) = resize_target(self.size, ph, pw);
            img = resize_antialiased(&img, nh, nw);
        }
        let (h, w) = (img.height, img.width);
        let mut chw = vec![0f32; 3 * h * w];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * h * w + i] =
                    if self.do_normalize { (px[c] - self.image_mean[c]) / self.image_std[c] } else { px[c] };
            }
        }
        Ok(Tensor::from_vec(chw, (3, h, w), device)?)
    }

    /// `pixel_values` of several images, `(B, 3, H, W)`; all must come out the same size.
    pub fn batch(&self, images: &[&RgbImage], device: &Device) -> Result<Tensor> {
        let each = images.iter().map(|im| self.pixel_values(im, device)).collect::<Result<Vec<_>>>()?;
        if each.is_empty() {
            return Err(ModelError::Input("no images".into()));
        }
        Ok(Tensor::stack(&each, 0)?)
    }
}

fn parse_size(v: &Value, path: &Path, key: &str, square: bool) -> Result<ResizeTo> {
    let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
    if let Some(s) = v.as_u64() {
        let s = s as usize;
        return Ok(if square { ResizeTo::Exact { height: s, width: s } } else { ResizeTo::ShortestEdge(s) });
    }
    if let (Some(height), Some(width)) = (get("height"), get("width")) {
        return Ok(ResizeTo::Exact { height, width });
    }
    if let Some(s) = get("shortest_edge") {
        if v.get("longest_edge").is_some_and(|l| !l.is_null()) {
            return Err(ModelError::config(path, key, "longest_edge is not supported"));
        }
        return Ok(ResizeTo::ShortestEdge(s));
    }
    Err(ModelError::config(
        path,
        key,
        format!("expected an integer, {{height, width}} or {{shortest_edge}}, found {v}"),
    ))
}

fn resize_target(size: ResizeTo, h: usize, w: usize) -> (usize, usize) {
    match size {
        ResizeTo::Exact { height, width } => (height, width),
        ResizeTo::ShortestEdge(s) => {
            // transformers' get_resize_output_image_size(default_to_square=False).
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (s as f64 * long as f64 / short as f64) as usize;
            if w <= h {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// Opens an image file and converts it to RGB as transformers' `convert_to_rgb` does: RGB as is,
/// anything else through RGBA alpha-composited onto white (Pillow's integer `alpha_composite`).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = ipr_diffusion::image_file::open(path).map_err(|e| match e {
        ipr_diffusion::Error::Image { path, message } => ModelError::Image { path, message },
        other => ModelError::Diffusion(other),
    })?;
    Ok(to_rgb(img))
}

/// transformers' `convert_to_rgb` on a decoded image.
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => {
            let rgba = other.to_rgba8();
            let (w, h) = rgba.dimensions();
            let mut out = RgbImage::new(w, h);
            for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
                let [r, g, b, a] = src.0;
                dst.0 = [over_white(r, a), over_white(g, a), over_white(b, a)];
            }
            out
        }
    }
}

/// One channel of Pillow's `ImagingAlphaComposite` with an opaque white destination.
fn over_white(c: u8, a: u8) -> u8 {
    const PRECISION: u32 = 7;
    let shift_div_255 = |v: u32| ((v >> 8) + v) >> 8;
    if a == 0 {
        return 255;
    }
    let (c, a) = (c as u32, a as u32);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION) / outa255;
    let coef2 = 255 * (1 << PRECISION) - coef1;
    let tmp = c * coef1 + 255 * coef2;
    (shift_div_255(tmp + (0x80 << PRECISION)) >> PRECISION) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_aspect_like_transformers() {
        assert_eq!(resize_target(ResizeTo::ShortestEdge(224), 480, 640), (224, 298));
        assert_eq!(resize_target(ResizeTo::ShortestEdge(224), 640, 480), (298, 224));
        assert_eq!(resize_target(ResizeTo::ShortestEdge(32), 37, 53), (32, 45));
    }

    #[test]
    fn opaque_and_transparent_pixels_composite_onto_white() {
        for c in [0u8, 1, 77, 254, 255] {
            assert_eq!(over_white(c, 255), c);
            assert_eq!(over_white(c, 0), 255);
        }
    }

    #[test]
    fn bad_settings_name_the_key() {
        let p = Path::new("preprocessor_config.json");
        let v: Value = serde_json::json!({"resample": 2});
        let e = ImageProcessorConfig::from_json(&v, p, ImageProcessorConfig::owlvit(768), true).unwrap_err();
        assert!(e.to_string().contains("key `resample`"), "{e}");
        let v: Value = serde_json::json!({"size": 768, "crop_size": 768, "do_center_crop": true});
        let c = ImageProcessorConfig::from_json(&v, p, ImageProcessorConfig::owlvit(64), true).unwrap();
        assert_eq!(c.size, ResizeTo::Exact { height: 768, width: 768 });
        assert_eq!(c.output_size(10, 20), (768, 768));
    }
}
