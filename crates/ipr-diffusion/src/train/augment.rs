//! Horizontal flip that keeps the caption true: the image is mirrored and "left of" / "right of"
//! are swapped in its prompt (ipr-core's [`Relation::mirrored`]). The public IPR code flips images
//! without touching the caption (docs/ipr-reference.md, section 2), which silently turns half of
//! the left/right training pairs into wrong ones; here a caption that does not parse in the
//! vocabulary is never flipped.

use candle_core::Tensor;
use ipr_core::{prompt::Prompt, Vocabulary};

use crate::error::Result;

/// The caption of the mirrored image, or `None` when the caption does not parse (such images
/// must not be flipped). Captions without a left/right relation come back unchanged, and so
/// does the empty caption (an unconditional example says nothing about sides).
pub fn mirror_caption(caption: &str, vocab: &Vocabulary) -> Option<String> {
    if caption.is_empty() {
        return Some(String::new());
    }
    match Prompt::parse(caption, vocab).ok()? {
        Prompt::Spatial { a, relation, b } if relation.mirrored() != relation => {
            Some(Prompt::Spatial { a, relation: relation.mirrored(), b }.render(vocab))
        }
        _ => Some(caption.to_string()),
    }
}

/// Mirrors `(..., H, W)` images left to right.
pub fn flip_horizontal(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(candle_core::D::Minus1)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::new(idx, x.device())?;
    Ok(x.index_select(&idx, x.rank() - 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn left_right_swap_and_unparsable_captions_are_not_flipped() {
        let v = Vocabulary::coco80();
        assert_eq!(mirror_caption("a dog to the left of a car", &v).as_deref(), Some("a dog to the right of a car"));
        assert_eq!(
            mirror_caption("an apple to the right of a tv", &v).as_deref(),
            Some("an apple to the left of a tv")
        );
        assert_eq!(mirror_caption("a dog above a car", &v).as_deref(), Some("a dog above a car"));
        assert_eq!(mirror_caption("a dog and a car", &v).as_deref(), Some("a dog and a car"));
        assert_eq!(mirror_caption("", &v).as_deref(), Some(""));
        assert_eq!(mirror_caption("a dog on the left, photorealistic", &v), None);
        assert_eq!(mirror_caption("a wug to the left of a car", &v), None);
    }

    #[test]
    fn flip_mirrors_columns() {
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((1, 2, 3)).unwrap();
        let f = flip_horizontal(&x).unwrap();
        assert_eq!(f.to_vec3::<f32>().unwrap(), vec![vec![vec![2.0, 1.0, 0.0], vec![5.0, 4.0, 3.0]]]);
    }
}
