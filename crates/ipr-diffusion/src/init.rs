//! Seeded initialisation of models built from scratch.
//!
//! candle's CPU random generator cannot be seeded (`Device::set_seed` fails on the CPU), so a
//! model built from a plain `VarMap` differs on every run. [`SeededVarMap`] is a `VarBuilder`
//! backend that draws each new variable from the initialiser the model asks for (torch-like
//! bounds, CLIP's normal 0.02, constants for norms) with a generator seeded by the run seed and
//! the variable's name: the same seed gives the same weights on every machine, whatever order
//! the variables are created in.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::{Init, VarBuilder, VarMap};

use crate::noise::SplitMix64;

/// A `VarMap` whose new variables are drawn from a seeded generator.
#[derive(Clone)]
pub struct SeededVarMap {
    pub varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    pub fn new(seed: u64) -> Self {
        Self { varmap: VarMap::new(), seed }
    }

    /// A `VarBuilder` over this map.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn rng(&self, name: &str) -> SplitMix64 {
        // FNV-1a of the name, mixed with the seed.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        SplitMix64::new(h ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The initial values of a variable, drawn as `init` says.
    fn draw(&self, shape: &Shape, name: &str, init: Init) -> Vec<f64> {
        let n = shape.elem_count();
        let mut rng = self.rng(name);
        let uniform = |rng: &mut SplitMix64, lo: f64, up: f64| -> Vec<f64> {
            (0..n).map(|_| lo + (up - lo) * (rng.next_f64() - f64::EPSILON).max(0.0)).collect()
        };
        match init {
            Init::Const(c) => vec![c; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => rng.normals(n).into_iter().map(|z| mean + stdev * z).collect(),
            Init::Kaiming { dist, fan, non_linearity } => {
                let fan = match fan {
                    FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape),
                };
                let std = non_linearity.gain() / (fan as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => uniform(&mut rng, -(3f64.sqrt()) * std, 3f64.sqrt() * std),
                    NormalOrUniform::Normal => rng.normals(n).into_iter().map(|z| std * z).collect(),
                }
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("var map lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let values = self.draw(&s, name, h);
        let t = Tensor::from_vec(values, s, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: a seeded var map creates variables only through `get` (with a shape)")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("var map lock").contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_in_any_order() {
        let dev = Device::Cpu;
        let a = SeededVarMap::new(3);
        let b = SeededVarMap::new(3);
        let c = SeededVarMap::new(4);
        let init = Init::Uniform { lo: -0.5, up: 0.5 };
        let get =
            |m: &SeededVarMap, name: &str| m.var_builder(DType::F32, &dev).get_with_hints((4, 8), name, init).unwrap();
        let (a1, a2) = (get(&a, "x.weight"), get(&a, "y.weight"));
        let (b2, b1) = (get(&b, "y.weight"), get(&b, "x.weight"));
        let diff =
            |p: &Tensor, q: &Tensor| (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&a1, &b1), 0.0);
        assert_eq!(diff(&a2, &b2), 0.0);
        assert!(diff(&a1, &get(&c, "x.weight")) > 0.0);
        assert!(diff(&a1, &a2) > 0.0);
        let v = a1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.abs() <= 0.5) && v.iter().any(|x| x.abs() > 0.3));
        let n =
            a.var_builder(DType::F32, &dev).get_with_hints(1000, "n", Init::Randn { mean: 0.0, stdev: 0.02 }).unwrap();
        let std = n.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
        assert_eq!(
            a.var_builder(DType::F32, &dev)
                .get_with_hints(3, "norm.weight", Init::Const(1.0))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0; 3]
        );
        assert_eq!(a.varmap.all_vars().len(), 4);
    }
}
