//! transformers' `OwlViTImageProcessor.post_process_object_detection(outputs, threshold,
//! target_sizes)` (Minderer et al. 2022's detector read out as VISOR does): per box, the best
//! query's sigmoid score and index; `(cx, cy, w, h)` -> corners, scaled by the target `(H, W)`;
//! keep `score > threshold` (strict). No NMS, as in transformers and VISOR.

use candle_core::{DType, Tensor};

use crate::model_error::{ModelError, Result};

/// One kept box.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueryDetection {
    /// Index of the query (text) the box is labelled with.
    pub label: usize,
    pub score: f32,
    /// `[x1, y1, x2, y2]` in target-size pixels.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// Post-processes a batch: `logits (B, P, Q)`, `pred_boxes (B, P, 4)`, one `(height, width)` per
/// image. Detections come in box (token) order, as transformers returns them. All arithmetic is
/// f32, as torch's.
pub fn post_process_object_detection(
    logits: &Tensor,
    pred_boxes: &Tensor,
    threshold: f32,
    target_sizes: &[(usize, usize)],
) -> Result<Vec<Vec<QueryDetection>>> {
    let (b, _, _) = logits.dims3()?;
    if target_sizes.len() != b {
        return Err(ModelError::Input(format!("{} target sizes for {b} images", target_sizes.len())));
    }
    let logits = logits.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let boxes = pred_boxes.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let mut out = Vec::with_capacity(b);
    for ((per_box, per_box_coords), &(h, w)) in logits.iter().zip(&boxes).zip(target_sizes) {
        let (h, w) = (h as f32, w as f32);
        let mut kept = Vec::new();
        for (row, coords) in per_box.iter().zip(per_box_coords) {
            // torch.max returns the first index of the maximum.
            let (label, best) =
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc });
            let score = 1.0 / (1.0 + (-best).exp());
            // Strict, as transformers (`scores > threshold`); NaN scores are dropped.
            if score.partial_cmp(&threshold) != Some(std::cmp::Ordering::Greater) {
                continue;
            }
            let [cx, cy, bw, bh] = [coords[0], coords[1], coords[2], coords[3]];
            let bbox = [(cx - 0.5 * bw) * w, (cy - 0.5 * bh) * h, (cx + 0.5 * bw) * w, (cy + 0.5 * bh) * h];
            kept.push(QueryDetection { label, score, bbox });
        }
        out.push(kept);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn strict_threshold_best_query_and_scaling() {
        let d = Device::Cpu;
        // Two boxes, two queries; sigmoid(0) = 0.5 exactly.
        let logits = Tensor::new(&[[[0.0f32, -1.0], [-3.0, 2.0]]], &d).unwrap();
        let boxes = Tensor::new(&[[[0.5f32, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]], &d).unwrap();
        let r = post_process_object_detection(&logits, &boxes, 0.5, &[(100, 200)]).unwrap();
        assert_eq!(r[0].len(), 1, "score 0.5 is not > 0.5");
        assert_eq!(r[0][0].label, 1);
        assert_eq!(r[0][0].bbox, [0.0, 50.0, 100.0, 100.0]);
        let r = post_process_object_detection(&logits, &boxes, 0.4, &[(100, 200)]).unwrap();
        for (a, b) in r[0][0].bbox.iter().zip([80.0, 30.0, 120.0, 70.0]) {
            assert!((a - b).abs() < 1e-4, "{:?}", r[0][0].bbox);
        }
        assert!(post_process_object_detection(&logits, &boxes, 0.4, &[]).is_err());
    }
}
