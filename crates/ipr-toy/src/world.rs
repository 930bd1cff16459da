//! Scenes of the toy world: which objects stand where, in what colour, with which box.
//!
//! A scene is a list of objects on a plain grey 32x32 canvas. Objects never overlap and keep
//! a gap of at least [`MIN_GAP`] pixels between their boxes, so every object is fully visible
//! and the exact detector can count them. An object's box is the tight box of the pixels its
//! shape covers (pixel-edge coordinates, `[x1, y1, x2, y2]` with `x2` one past the last
//! column), the same box the detector reports for a clean render.
//!
//! Spatial scenes ([`Scene::spatial`]) make the stated relation unambiguous: the two boxes are
//! separated along the relation's axis, and the centre offset across that axis is at most half
//! the offset along it, so [`Relation::observed`] returns the stated relation and VISOR's
//! centre test holds. Everything is drawn from a caller's seeded RNG.

use crate::classes::{class, Shape, NUM_CLASSES};
use crate::colour::hsv_to_rgb;
use ipr_core::{BBox, ObjectId, Relation};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Width and height of every toy image, in pixels.
pub const IMAGE_SIZE: u32 = 32;
/// The background colour, a neutral grey: mixing with it (blur) keeps an object's hue.
pub const BACKGROUND: [u8; 3] = [200, 200, 200];
/// Range of an object's nominal size (its height) in pixels, inclusive.
pub const SIZE_RANGE: (u32, u32) = (9, 13);
/// Smallest size used when a crowded scene does not fit at the usual sizes.
pub const MIN_SIZE: u32 = 7;
/// Largest deviation of an object's hue from its class hue, in degrees.
pub const HUE_JITTER: f64 = 6.0;
/// Range of an object's HSV saturation.
pub const SATURATION_RANGE: (f64, f64) = (0.7, 0.95);
/// Range of an object's HSV value (brightness).
pub const VALUE_RANGE: (f64, f64) = (0.7, 0.95);
/// Smallest gap in pixels between two objects' boxes (on at least one axis). Three pixels
/// keep two blurred objects of one class from running into one blob at the detector's blur
/// tolerance, and leave room for two 13 px objects side by side.
pub const MIN_GAP: u32 = 3;
/// In a spatial scene, the largest ratio of the cross-axis centre offset to the along-axis one.
pub const MAX_CROSS_RATIO: f64 = 0.5;

const MAX_TRIES: usize = 2000;

/// A layout rectangle in pixels: top-left corner and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// One object of a scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacedObject {
    /// Id in [`crate::classes::vocabulary`].
    pub class: ObjectId,
    /// Where the shape is drawn.
    pub rect: Rect,
    /// Its colour (class hue plus jitter).
    pub colour: [u8; 3],
    /// Tight box of the drawn pixels.
    #[serde(rename = "box")]
    pub bbox: BBox,
}

impl PlacedObject {
    /// An object of `class` drawn in `rect`; its box is computed from the shape's pixels.
    pub fn new(class_id: ObjectId, rect: Rect, colour: [u8; 3]) -> Self {
        let bbox = drawn_box(class(class_id).shape, rect);
        Self { class: class_id, rect, colour, bbox }
    }

    /// The shape of the object's class.
    pub fn shape(&self) -> Shape {
        class(self.class).shape
    }

    /// Is image pixel `(px, py)` covered by this object?
    pub fn covers(&self, px: u32, py: u32) -> bool {
        let Rect { x, y, w, h } = self.rect;
        px >= x && py >= y && px < x + w && py < y + h && self.shape().covers(px - x, py - y, w, h)
    }

    /// Centre of the box, the point relations are decided on.
    pub fn center(&self) -> (f64, f64) {
        self.bbox.center()
    }
}

/// A toy scene: objects in drawing order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<PlacedObject>,
}

impl Scene {
    /// One object of `a`, anywhere.
    pub fn single<R: Rng + ?Sized>(a: ObjectId, rng: &mut R) -> Scene {
        Scene::with_classes(&[a], rng)
    }

    /// `a` stands in `relation` to `b`, unambiguously (see the module doc).
    pub fn spatial<R: Rng + ?Sized>(a: ObjectId, relation: Relation, b: ObjectId, rng: &mut R) -> Scene {
        let mut max_size = SIZE_RANGE.1;
        loop {
            for _ in 0..MAX_TRIES {
                let oa = random_object(a, max_size, rng);
                let ob = random_object(b, max_size, rng);
                if unambiguous(&oa, relation, &ob) {
                    return Scene { objects: vec![oa, ob] };
                }
            }
            // Unreachable at the default sizes (two 13 px objects fit side by side); kept so a
            // change of constants degrades to smaller objects instead of looping forever.
            assert!(max_size > MIN_SIZE, "no room for a spatial scene on a {IMAGE_SIZE} px canvas");
            max_size -= 1;
        }
    }

    /// Objects of the given classes (repeats allowed) placed anywhere without overlap.
    pub fn with_classes<R: Rng + ?Sized>(classes: &[ObjectId], rng: &mut R) -> Scene {
        let mut max_size = SIZE_RANGE.1;
        loop {
            'attempt: for _ in 0..MAX_TRIES {
                let mut objects: Vec<PlacedObject> = Vec::with_capacity(classes.len());
                for &c in classes {
                    let o = random_object(c, max_size, rng);
                    if objects.iter().any(|p| !separated(p, &o)) {
                        continue 'attempt;
                    }
                    objects.push(o);
                }
                return Scene { objects };
            }
            assert!(max_size > MIN_SIZE, "{} objects do not fit on a {IMAGE_SIZE} px canvas", classes.len());
            max_size -= 1;
        }
    }

    /// A random scene of one to three objects of random classes (for tests and grids).
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> Scene {
        let n = rng.random_range(1..=3);
        let classes: Vec<ObjectId> = (0..n).map(|_| rng.random_range(0..NUM_CLASSES)).collect();
        Scene::with_classes(&classes, rng)
    }

    /// How many objects of `class` the scene holds.
    pub fn count(&self, class_id: ObjectId) -> usize {
        self.objects.iter().filter(|o| o.class == class_id).count()
    }
}

/// An object of class `c` with random size (at most `max_size`), position and colour.
fn random_object<R: Rng + ?Sized>(c: ObjectId, max_size: u32, rng: &mut R) -> PlacedObject {
    let spec = class(c);
    let lo = SIZE_RANGE.0.min(max_size);
    let size = rng.random_range(lo..=max_size);
    let (w, h) = (spec.shape.width_for(size), size);
    let x = rng.random_range(0..=IMAGE_SIZE - w);
    let y = rng.random_range(0..=IMAGE_SIZE - h);
    let hue = spec.hue + rng.random_range(-HUE_JITTER..=HUE_JITTER);
    let s = rng.random_range(SATURATION_RANGE.0..=SATURATION_RANGE.1);
    let v = rng.random_range(VALUE_RANGE.0..=VALUE_RANGE.1);
    PlacedObject::new(c, Rect { x, y, w, h }, hsv_to_rgb(hue, s, v))
}

/// Boxes at least [`MIN_GAP`] apart on the x axis or on the y axis.
fn separated(p: &PlacedObject, q: &PlacedObject) -> bool {
    gap(p, q, Axis::X) >= f64::from(MIN_GAP) || gap(p, q, Axis::Y) >= f64::from(MIN_GAP)
}

#[derive(Clone, Copy)]
enum Axis {
    X,
    Y,
}

/// Empty pixels between two boxes along an axis (negative when they overlap on it).
fn gap(p: &PlacedObject, q: &PlacedObject, axis: Axis) -> f64 {
    let [px1, py1, px2, py2] = p.bbox.corners();
    let [qx1, qy1, qx2, qy2] = q.bbox.corners();
    match axis {
        Axis::X => (qx1 - px2).max(px1 - qx2),
        Axis::Y => (qy1 - py2).max(py1 - qy2),
    }
}

fn unambiguous(a: &PlacedObject, relation: Relation, b: &PlacedObject) -> bool {
    let (ca, cb) = (a.center(), b.center());
    let (dx, dy) = (cb.0 - ca.0, cb.1 - ca.1);
    let (along, cross, axis) = match relation {
        Relation::LeftOf => (dx, dy, Axis::X),
        Relation::RightOf => (-dx, dy, Axis::X),
        Relation::Above => (dy, dx, Axis::Y),
        Relation::Below => (-dy, dx, Axis::Y),
    };
    along > 0.0 && cross.abs() <= MAX_CROSS_RATIO * along && gap(a, b, axis) >= f64::from(MIN_GAP)
}

/// Tight box of the pixels `shape` covers in `rect`.
fn drawn_box(shape: Shape, rect: Rect) -> BBox {
    let (mut x1, mut y1, mut x2, mut y2) = (u32::MAX, u32::MAX, 0, 0);
    for j in 0..rect.h {
        for i in 0..rect.w {
            if shape.covers(i, j, rect.w, rect.h) {
                x1 = x1.min(i);
                y1 = y1.min(j);
                x2 = x2.max(i + 1);
                y2 = y2.max(j + 1);
            }
        }
    }
    assert!(x1 < x2, "shape {shape:?} covers no pixel of {rect:?}");
    let f = |v: u32, o: u32| f64::from(v + o);
    BBox::new(f(x1, rect.x), f(y1, rect.y), f(x2, rect.x), f(y2, rect.y)).expect("ordered box")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn spatial_scenes_state_their_relation_unambiguously() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for i in 0..2000 {
            let (a, b) = (i % NUM_CLASSES, (i / NUM_CLASSES + 1 + i) % NUM_CLASSES);
            let r = Relation::ALL[i % 4];
            let s = Scene::spatial(a, r, b, &mut rng);
            let (ca, cb) = (s.objects[0].center(), s.objects[1].center());
            assert!(r.holds(ca, cb), "{r:?} fails: {s:?}");
            assert_eq!(Relation::observed(ca, cb), Some(r), "{s:?}");
            assert!(separated(&s.objects[0], &s.objects[1]));
        }
    }

    #[test]
    fn objects_fit_and_never_overlap() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..2000 {
            let s = Scene::with_classes(&[0, 3, 3], &mut rng);
            assert_eq!(s.count(3), 2);
            for (i, p) in s.objects.iter().enumerate() {
                let [x1, y1, x2, y2] = p.bbox.corners();
                assert!(x1 >= 0.0 && y1 >= 0.0 && x2 <= 32.0 && y2 <= 32.0, "{p:?}");
                for q in &s.objects[i + 1..] {
                    assert!(separated(p, q), "{p:?} {q:?}");
                }
            }
        }
    }

    #[test]
    fn scenes_are_a_function_of_the_seed() {
        let draw = |seed| Scene::random(&mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let json = serde_json::to_string(&draw(7)).unwrap();
        assert_eq!(serde_json::from_str::<Scene>(&json).unwrap(), draw(7));
    }
}
