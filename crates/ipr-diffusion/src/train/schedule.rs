//! Learning-rate schedules as diffusers' `get_scheduler` defines them (`constant`,
//! `constant_with_warmup`, `cosine` with linear warmup, after transformers' schedules): the
//! factor applied to the base learning rate at optimiser step `step` (0-based, as torch's
//! `LambdaLR` evaluates it before the step).

use std::f64::consts::PI;

use crate::error::{Error, Result};

/// A schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    Constant,
    /// Linear warmup from 0 over `warmup` steps, then constant.
    ConstantWithWarmup {
        warmup: usize,
    },
    /// Linear warmup, then half a cosine from 1 to 0 at `total` steps.
    Cosine {
        warmup: usize,
        total: usize,
    },
}

impl LrSchedule {
    /// Parses diffusers' names (`constant`, `constant_with_warmup`, `cosine`).
    pub fn parse(name: &str, warmup: usize, total: usize) -> Result<Self> {
        match name {
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" | "warmup" => Ok(Self::ConstantWithWarmup { warmup }),
            "cosine" => Ok(Self::Cosine { warmup, total }),
            other => Err(Error::Input(format!(
                "unknown LR schedule {other:?}: expected constant, constant_with_warmup or cosine"
            ))),
        }
    }

    /// The multiplier at `step`.
    pub fn factor(&self, step: usize) -> f64 {
        let s = step as f64;
        match *self {
            Self::Constant => 1.0,
            Self::ConstantWithWarmup { warmup } => {
                if step < warmup {
                    s / warmup.max(1) as f64
                } else {
                    1.0
                }
            }
            Self::Cosine { warmup, total } => {
                if step < warmup {
                    return s / warmup.max(1) as f64;
                }
                let progress = (s - warmup as f64) / (total.saturating_sub(warmup)).max(1) as f64;
                (0.5 * (1.0 + (PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        assert_eq!(LrSchedule::Constant.factor(123), 1.0);
        let w = LrSchedule::ConstantWithWarmup { warmup: 4 };
        assert_eq!([w.factor(0), w.factor(1), w.factor(4), w.factor(9)], [0.0, 0.25, 1.0, 1.0]);
        let c = LrSchedule::Cosine { warmup: 2, total: 10 };
        assert_eq!(c.factor(1), 0.5);
        assert!((c.factor(2) - 1.0).abs() < 1e-12);
        assert!((c.factor(6) - 0.5).abs() < 1e-12);
        assert!(c.factor(10).abs() < 1e-12);
        assert!(LrSchedule::parse("linear", 0, 1).is_err());
    }
}
