//! Helpers shared by the parity tests: fixture paths, reference tensors, and the tolerance check.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/` of this crate.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The reference tensors recorded by `scripts/fixtures/diffusion/make_tiny_pipelines.py`.
pub struct Reference(HashMap<String, Tensor>);

impl Reference {
    pub fn load(name: &str) -> Self {
        let path = fixtures().join("reference").join(format!("{name}.safetensors"));
        Self(candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    pub fn get(&self, key: &str) -> Tensor {
        self.0.get(key).unwrap_or_else(|| panic!("no reference tensor {key}")).clone()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        self.get(key).to_dtype(DType::I64).unwrap().to_vec1().unwrap()
    }

    pub fn f64s(&self, key: &str) -> Vec<f64> {
        self.get(key).to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    }
}

/// Largest absolute difference relative to the largest absolute reference value.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shapes differ");
    let a = actual.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let e = expected.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff: f64 = (a - &e).unwrap().abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    let scale: f64 = e.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    diff / scale.max(1e-12)
}

/// Asserts `actual` matches `expected` within `tol` relative (see [`rel_err`]).
#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let err = rel_err(actual, expected);
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}
