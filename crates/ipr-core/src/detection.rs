//! Boxes and detections: what a detector says about one image.
//!
//! Boxes are `[x1, y1, x2, y2]` in image pixels (x right, y down), the layout of
//! transformers' `post_process_object_detection` and of GLIP. Construction validates, so a
//! `BBox` in hand is always finite and well ordered.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An axis-aligned box in pixel coordinates, `x1 <= x2`, `y1 <= y2`, all finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    x1: f64,
    y1: f64,
    x2: f64,
    y2: f64,
}

impl BBox {
    /// A box from its corners; errors say which coordinate is wrong.
    pub fn new(x1: f64, y1: f64, x2: f64, y2: f64) -> Result<Self, String> {
        for (name, v) in [("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)] {
            if !v.is_finite() {
                return Err(format!("box coordinate {name} is {v}, expected a finite number"));
            }
        }
        if x2 < x1 {
            return Err(format!("box has x2 ({x2}) < x1 ({x1}): expected [x1, y1, x2, y2] with x1 <= x2"));
        }
        if y2 < y1 {
            return Err(format!("box has y2 ({y2}) < y1 ({y1}): expected [x1, y1, x2, y2] with y1 <= y2"));
        }
        Ok(Self { x1, y1, x2, y2 })
    }

    pub fn corners(&self) -> [f64; 4] {
        [self.x1, self.y1, self.x2, self.y2]
    }

    /// Centre `(cx, cy)`, the point every relation is decided on.
    pub fn center(&self) -> (f64, f64) {
        ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)
    }

    pub fn width(&self) -> f64 {
        self.x2 - self.x1
    }

    pub fn height(&self) -> f64 {
        self.y2 - self.y1
    }

    pub fn area(&self) -> f64 {
        self.width() * self.height()
    }

    /// Intersection over union; 0 for two empty boxes.
    pub fn iou(&self, other: &BBox) -> f64 {
        let w = (self.x2.min(other.x2) - self.x1.max(other.x1)).max(0.0);
        let h = (self.y2.min(other.y2) - self.y1.max(other.y1)).max(0.0);
        let inter = w * h;
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }

    /// The box in a horizontally mirrored image of width `image_width`.
    pub fn mirrored(&self, image_width: f64) -> BBox {
        BBox { x1: image_width - self.x2, y1: self.y1, x2: image_width - self.x1, y2: self.y2 }
    }
}

impl Serialize for BBox {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.corners().serialize(s)
    }
}

impl<'de> Deserialize<'de> for BBox {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let [x1, y1, x2, y2] = <[f64; 4]>::deserialize(d)?;
        BBox::new(x1, y1, x2, y2).map_err(serde::de::Error::custom)
    }
}

/// One detected object: the class name it was labelled with, its confidence and its box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detection {
    pub label: String,
    #[serde(deserialize_with = "finite_score")]
    pub score: f64,
    #[serde(rename = "box")]
    pub bbox: BBox,
}

fn finite_score<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    // JSON has no NaN literal, but a writer may emit null or a string for it; both land here.
    let v = Option::<f64>::deserialize(d)?;
    match v {
        Some(v) if v.is_finite() => Ok(v),
        Some(v) => Err(serde::de::Error::custom(format!("score is {v}, expected a finite number"))),
        None => Err(serde::de::Error::custom("score is null (NaN?), expected a finite number")),
    }
}

impl Detection {
    pub fn new(label: impl Into<String>, score: f64, bbox: BBox) -> Result<Self, String> {
        if !score.is_finite() {
            return Err(format!("score is {score}, expected a finite number"));
        }
        Ok(Self { label: label.into(), score, bbox })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_boxes() {
        assert!(BBox::new(0.0, 0.0, 1.0, 1.0).is_ok());
        assert!(BBox::new(2.0, 0.0, 1.0, 1.0).unwrap_err().contains("x2 (1) < x1 (2)"));
        assert!(BBox::new(0.0, 3.0, 1.0, 1.0).unwrap_err().contains("y2"));
        assert!(BBox::new(f64::NAN, 0.0, 1.0, 1.0).unwrap_err().contains("x1 is NaN"));
        let e = serde_json::from_str::<Detection>(r#"{"label":"dog","score":0.5,"box":[5,0,1,1]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x2 (1) < x1 (5)"), "{e}");
        let e = serde_json::from_str::<Detection>(r#"{"label":"dog","score":null,"box":[0,0,1,1]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("score"), "{e}");
        assert!(Detection::new("dog", f64::NAN, BBox::new(0.0, 0.0, 1.0, 1.0).unwrap()).is_err());
    }

    #[test]
    fn geometry() {
        let a = BBox::new(0.0, 0.0, 4.0, 2.0).unwrap();
        assert_eq!(a.center(), (2.0, 1.0));
        assert_eq!(a.area(), 8.0);
        let b = BBox::new(2.0, 0.0, 6.0, 2.0).unwrap();
        assert!((a.iou(&b) - 4.0 / 12.0).abs() < 1e-12);
        assert_eq!(a.mirrored(10.0).corners(), [6.0, 0.0, 10.0, 2.0]);
        let json = serde_json::to_string(&Detection::new("cat", 0.25, a).unwrap()).unwrap();
        assert_eq!(json, r#"{"label":"cat","score":0.25,"box":[0.0,0.0,4.0,2.0]}"#);
    }
}
