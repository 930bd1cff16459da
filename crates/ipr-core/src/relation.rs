//! The four spatial relations of SR2D and how they are decided from box centres.
//!
//! Image coordinates: x grows to the right, y grows downward (as in VISOR and the IPR code), so
//! "above" means a smaller centre y. Every comparison is strict: equal centres satisfy nothing.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A spatial relation between object A (first named) and object B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Relation {
    #[serde(rename = "to the left of")]
    LeftOf,
    #[serde(rename = "to the right of")]
    RightOf,
    #[serde(rename = "above")]
    Above,
    #[serde(rename = "below")]
    Below,
}

impl Relation {
    /// VISOR's order: left, right, above, below.
    pub const ALL: [Relation; 4] = [Self::LeftOf, Self::RightOf, Self::Above, Self::Below];

    /// The words used in prompts and in VISOR's `rel_type` field.
    pub fn phrase(self) -> &'static str {
        match self {
            Self::LeftOf => "to the left of",
            Self::RightOf => "to the right of",
            Self::Above => "above",
            Self::Below => "below",
        }
    }

    /// A short name for tables and metric keys.
    pub fn short(self) -> &'static str {
        match self {
            Self::LeftOf => "left",
            Self::RightOf => "right",
            Self::Above => "above",
            Self::Below => "below",
        }
    }

    /// The relation with A and B swapped in meaning (left <-> right, above <-> below).
    pub fn opposite(self) -> Self {
        match self {
            Self::LeftOf => Self::RightOf,
            Self::RightOf => Self::LeftOf,
            Self::Above => Self::Below,
            Self::Below => Self::Above,
        }
    }

    /// The relation seen in a horizontally mirrored image.
    pub fn mirrored(self) -> Self {
        match self {
            Self::LeftOf => Self::RightOf,
            Self::RightOf => Self::LeftOf,
            other => other,
        }
    }

    /// Does the relation hold between centre `a` and centre `b` (strict comparison)?
    pub fn holds(self, a: (f64, f64), b: (f64, f64)) -> bool {
        let (dx, dy) = (a.0 - b.0, a.1 - b.1);
        match self {
            Self::LeftOf => dx < 0.0,
            Self::RightOf => dx > 0.0,
            Self::Above => dy < 0.0,
            Self::Below => dy > 0.0,
        }
    }

    /// The relation actually observed between two centres: the axis with the larger centre
    /// offset, its sign giving the word. On an exact diagonal (|dx| == |dy|) the horizontal
    /// relation is chosen, which is then just as true as the vertical one. `None` when the
    /// centres coincide: no relation can be stated.
    pub fn observed(a: (f64, f64), b: (f64, f64)) -> Option<Self> {
        let (dx, dy) = (a.0 - b.0, a.1 - b.1);
        if dx == 0.0 && dy == 0.0 {
            return None;
        }
        Some(if dx.abs() >= dy.abs() {
            if dx < 0.0 {
                Self::LeftOf
            } else {
                Self::RightOf
            }
        } else if dy < 0.0 {
            Self::Above
        } else {
            Self::Below
        })
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.phrase())
    }
}

impl FromStr for Relation {
    type Err = String;
    /// Accepts the prompt phrase ("to the left of") or the short name ("left").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|r| r.phrase() == s || r.short() == s).ok_or_else(|| {
            format!(
                "unknown relation {s:?}: expected one of \"to the left of\", \"to the right of\", \"above\", \"below\""
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_comparisons_and_ties() {
        assert!(Relation::LeftOf.holds((1.0, 5.0), (2.0, 0.0)));
        assert!(!Relation::LeftOf.holds((2.0, 5.0), (2.0, 0.0)), "a tie is not left");
        assert!(!Relation::RightOf.holds((2.0, 5.0), (2.0, 0.0)), "a tie is not right");
        assert!(Relation::Above.holds((9.0, 1.0), (0.0, 2.0)), "y grows downward");
        assert!(Relation::Below.holds((9.0, 3.0), (0.0, 2.0)));
        assert!(!Relation::Above.holds((0.0, 2.0), (5.0, 2.0)));
    }

    #[test]
    fn observed_takes_the_dominant_axis() {
        assert_eq!(Relation::observed((0.0, 0.0), (10.0, 3.0)), Some(Relation::LeftOf));
        assert_eq!(Relation::observed((10.0, 0.0), (0.0, 3.0)), Some(Relation::RightOf));
        assert_eq!(Relation::observed((0.0, 0.0), (1.0, 10.0)), Some(Relation::Above));
        assert_eq!(Relation::observed((0.0, 10.0), (1.0, 0.0)), Some(Relation::Below));
        assert_eq!(Relation::observed((0.0, 0.0), (4.0, 4.0)), Some(Relation::LeftOf));
        assert_eq!(Relation::observed((3.0, 3.0), (3.0, 3.0)), None);
    }

    #[test]
    fn opposite_mirror_and_parse() {
        for r in Relation::ALL {
            assert_eq!(r.opposite().opposite(), r);
            assert_ne!(r.opposite(), r);
            assert_eq!(r.phrase().parse::<Relation>().unwrap(), r);
            assert_eq!(r.short().parse::<Relation>().unwrap(), r);
        }
        assert_eq!(Relation::Above.mirrored(), Relation::Above);
        assert_eq!(Relation::LeftOf.mirrored(), Relation::RightOf);
        assert!("beside".parse::<Relation>().unwrap_err().contains("beside"));
    }
}
