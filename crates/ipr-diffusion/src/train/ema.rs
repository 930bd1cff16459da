//! Exponential moving average of weights, as diffusers' `EMAModel` (default settings:
//! `decay 0.9999`, `min_decay 0`, `update_after_step 0`, `use_ema_warmup false`): at optimisation
//! step `s` (counted from 1 after the update) the decay is `min(max_decay, (1 + s') / (10 + s'))`
//! with `s' = s - update_after_step - 1`, and `ema -= (1 - decay) * (ema - param)`.

use candle_core::{Tensor, Var};

use crate::error::Result;

#[derive(Debug)]
pub struct Ema {
    pub max_decay: f64,
    pub min_decay: f64,
    pub update_after_step: usize,
    /// Number of updates so far (diffusers' `optimization_step`).
    pub optimization_step: usize,
    /// `(name, shadow)` for each tracked variable.
    pub shadow: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], max_decay: f64) -> Result<Self> {
        let shadow =
            vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?))).collect::<Result<_>>()?;
        Ok(Self { max_decay, min_decay: 0.0, update_after_step: 0, optimization_step: 0, shadow })
    }

    /// diffusers' `get_decay(optimization_step)` (without EMA warmup).
    pub fn decay(&self, optimization_step: usize) -> f64 {
        let step = optimization_step as i64 - self.update_after_step as i64 - 1;
        if step <= 0 {
            return 0.0;
        }
        let d = (1.0 + step as f64) / (10.0 + step as f64);
        d.min(self.max_decay).max(self.min_decay)
    }

    /// `step()` after an optimiser update: `vars` in the order given to [`Ema::new`].
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        self.optimization_step += 1;
        let one_minus = 1.0 - self.decay(self.optimization_step);
        for ((_, s), (_, v)) in self.shadow.iter_mut().zip(vars) {
            *s = (&*s - ((&*s - v.as_tensor().detach())? * one_minus)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_warms_up_like_diffusers() {
        let v = vec![("w".to_string(), Var::new(&[0f32], &Device::Cpu).unwrap())];
        let mut ema = Ema::new(&v, 0.9999).unwrap();
        // diffusers: step 1 -> 0 (copy), step 2 -> 2/11, step 11 -> 11/20.
        assert_eq!(ema.decay(1), 0.0);
        assert!((ema.decay(2) - 2.0 / 11.0).abs() < 1e-12);
        assert!((ema.decay(11) - 11.0 / 20.0).abs() < 1e-12);
        assert_eq!(ema.decay(10_000_000), 0.9999);
        v[0].1.set(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&v).unwrap();
        assert_eq!(ema.shadow[0].1.to_vec1::<f32>().unwrap(), vec![1.0]);
        v[0].1.set(&Tensor::new(&[0f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&v).unwrap();
        let s = ema.shadow[0].1.to_vec1::<f32>().unwrap()[0];
        assert!((s - 2.0 / 11.0).abs() < 1e-6, "{s}");
    }
}
