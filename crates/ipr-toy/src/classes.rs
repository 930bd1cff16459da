//! The eight object classes of the toy world: a noun, a shape and a hue each.
//!
//! Every class differs from every other in shape AND colour, so the exact detector can label
//! objects by colour alone while a generative model still has to learn both (a caption names
//! the noun, never the colour or the shape). Hues sit 45 degrees apart, the largest even spacing
//! for eight classes, which leaves the detector a wide margin for a model's colour drift.
//! The nouns are ordinary words whose natural look fits the shape, in hue order.

use ipr_core::{ObjectId, Vocabulary};

/// A filled (or, for the ring, outlined) shape drawn inside an object's layout rectangle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Disc,
    /// Apex at the bottom.
    TriangleDown,
    Diamond,
    /// Apex at the top.
    TriangleUp,
    /// A disc outline, about a quarter of the diameter thick.
    Ring,
    Square,
    /// A tall rectangle, about 0.4 times as wide as it is high.
    Bar,
    /// A plus sign with arms a third of the box wide.
    Cross,
}

/// One class of the toy world.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassSpec {
    pub name: &'static str,
    pub shape: Shape,
    /// Reference hue in degrees; rendered objects vary around it by [`crate::world::HUE_JITTER`].
    pub hue: f64,
}

/// The classes in vocabulary order (ids are positions).
pub const CLASSES: [ClassSpec; 8] = [
    ClassSpec { name: "apple", shape: Shape::Disc, hue: 0.0 },
    ClassSpec { name: "carrot", shape: Shape::TriangleDown, hue: 45.0 },
    ClassSpec { name: "leaf", shape: Shape::Diamond, hue: 90.0 },
    ClassSpec { name: "tree", shape: Shape::TriangleUp, hue: 135.0 },
    ClassSpec { name: "bubble", shape: Shape::Ring, hue: 180.0 },
    ClassSpec { name: "box", shape: Shape::Square, hue: 225.0 },
    ClassSpec { name: "candle", shape: Shape::Bar, hue: 270.0 },
    ClassSpec { name: "flower", shape: Shape::Cross, hue: 315.0 },
];

/// Number of classes.
pub const NUM_CLASSES: usize = CLASSES.len();

/// The toy vocabulary (articles and plurals by ipr-core's rules: "an apple", "2 leaves").
pub fn vocabulary() -> Vocabulary {
    Vocabulary::new(CLASSES.iter().map(|c| c.name)).expect("toy class names are valid")
}

/// The class spec of an id of [`vocabulary`].
pub fn class(id: ObjectId) -> &'static ClassSpec {
    &CLASSES[id]
}

/// The id of a class name, if it is one of the toy classes.
pub fn class_id(name: &str) -> Option<ObjectId> {
    CLASSES.iter().position(|c| c.name == name)
}

impl Shape {
    /// Width of the layout rectangle for a shape of nominal size `size` (its height).
    pub fn width_for(self, size: u32) -> u32 {
        match self {
            Shape::Bar => ((f64::from(size) * 0.4).round() as u32).max(2),
            _ => size,
        }
    }

    /// Is pixel `(i, j)` of a `w` x `h` rectangle covered by the shape? Decided at the pixel
    /// centre, so the result is exact and the same on every platform.
    pub fn covers(self, i: u32, j: u32, w: u32, h: u32) -> bool {
        let (w, h) = (f64::from(w), f64::from(h));
        // Pixel centre in coordinates relative to the rectangle centre, scaled to [-1, 1].
        let u = (f64::from(i) + 0.5) / w * 2.0 - 1.0;
        let v = (f64::from(j) + 0.5) / h * 2.0 - 1.0;
        match self {
            Shape::Disc => u * u + v * v <= 1.0,
            Shape::TriangleDown => u.abs() <= (1.0 - v) / 2.0 + 0.5 / w,
            Shape::TriangleUp => u.abs() <= (1.0 + v) / 2.0 + 0.5 / w,
            Shape::Diamond => u.abs() + v.abs() <= 1.0,
            Shape::Ring => {
                let r = u * u + v * v;
                let inner = 1.0 - 2.0 * (0.25f64).max(2.0 / w);
                r <= 1.0 && r > inner * inner
            }
            Shape::Square | Shape::Bar => true,
            Shape::Cross => u.abs() <= 1.0 / 3.0 || v.abs() <= 1.0 / 3.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colour::hue_distance;

    #[test]
    fn names_shapes_and_hues_are_distinct() {
        let v = vocabulary();
        assert_eq!(v.len(), NUM_CLASSES);
        assert_eq!(v.with_article(class_id("apple").unwrap()), "an apple");
        assert_eq!(v.count_phrase(class_id("leaf").unwrap(), 2), "2 leaves");
        assert_eq!(v.count_phrase(class_id("box").unwrap(), 3), "3 boxes");
        for (i, a) in CLASSES.iter().enumerate() {
            for b in &CLASSES[i + 1..] {
                assert_ne!(a.shape, b.shape);
                assert!(hue_distance(a.hue, b.hue) >= 45.0);
            }
        }
    }

    #[test]
    fn shapes_fill_their_rectangle_to_every_edge() {
        for c in CLASSES {
            for size in 6..=14 {
                let (w, h) = (c.shape.width_for(size), size);
                let covered = |i, j| c.shape.covers(i, j, w, h);
                assert!((0..w).any(|i| covered(i, 0)), "{} {size}: top row empty", c.name);
                assert!((0..w).any(|i| covered(i, h - 1)), "{} {size}: bottom row empty", c.name);
                assert!((0..h).any(|j| covered(0, j)), "{} {size}: left column empty", c.name);
                assert!((0..h).any(|j| covered(w - 1, j)), "{} {size}: right column empty", c.name);
            }
        }
    }
}
