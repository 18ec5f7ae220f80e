//! Helpers shared by the integration tests that corrupt model files.
#![allow(dead_code)]

use std::path::Path;

use pregate::model::writer::{write_model, TensorSpec};
use pregate::model::Checkpoint;

/// Rewrites `dir`'s weights as one file through `edit`, which may drop (None) or replace a tensor.
pub fn rewrite(dir: &Path, edit: impl Fn(&TensorSpec, Vec<u8>) -> Option<(TensorSpec, Vec<u8>)>) {
    let tensors: Vec<(TensorSpec, Vec<u8>)> = {
        let ck = Checkpoint::open(dir).unwrap();
        ck.names()
            .iter()
            .filter_map(|n| {
                let t = ck.tensor(n).unwrap();
                edit(
                    &TensorSpec::new(*n, t.dtype, t.shape.to_vec()),
                    t.data.to_vec(),
                )
            })
            .collect()
    };
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let produce = |s: &TensorSpec| {
        Ok(tensors
            .iter()
            .find(|(t, _)| t.name == s.name)
            .map(|(_, b)| b.clone())
            .unwrap())
    };
    write_model(dir, &specs, usize::MAX, &produce, None).unwrap();
}

/// The relative L2 error of `a` against `b`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub mod fixtures;
