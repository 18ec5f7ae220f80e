//! `inspect` checks every tensor the engine reads: a missing or renamed tensor, a wrong dtype or
//! shape and a non-finite value are each reported by name, all of them at once, and a sound model
//! passes. The header-only mode stays available and reads no values.

mod common;
use common::rewrite;
use std::path::Path;

use pregate::model::checkpoint::FloatDtype;
use pregate::model::inspect::{inspect, inspect_with, validate, Check};
use pregate::model::names;
use pregate::model::writer::TensorSpec;
use pregate::model::{make_model, Checkpoint, ExpertLayout, ModelDir, Preset};
use pregate::Error;
use safetensors::Dtype;

fn model_dir(dtype: FloatDtype, layout: ExpertLayout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Preset::Tiny.spec();
    spec.dtype = dtype;
    make_model(&spec, layout, 1, dir.path()).unwrap();
    dir
}

/// The bytes of `value` in `dtype`.
fn encode(value: f32, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => value.to_le_bytes().to_vec(),
        Dtype::F16 => half::f16::from_f32(value).to_le_bytes().to_vec(),
        Dtype::BF16 => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        other => panic!("{other}"),
    }
}

/// Writes `value` at flat index `at` of tensor `name`.
fn poke(dir: &Path, name: &str, at: usize, value: f32) {
    rewrite(dir, |s, mut b| {
        if s.name == name {
            let bytes = encode(value, s.dtype);
            let n = bytes.len();
            b[at * n..(at + 1) * n].copy_from_slice(&bytes);
        }
        Some((s.clone(), b))
    });
}

/// The error message of a full inspection, which must fail without panicking.
fn inspect_err(dir: &Path) -> String {
    match std::panic::catch_unwind(|| inspect(dir)) {
        Ok(Ok(_)) => panic!("inspection passed a bad model"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("inspection panicked"),
    }
}

#[test]
fn a_sound_model_passes_and_every_tensor_is_checked() {
    for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
        for layout in [ExpertLayout::Fused, ExpertLayout::Residual] {
            let d = model_dir(dtype, layout);
            let report = inspect(d.path()).unwrap();
            let ck = Checkpoint::open(d.path()).unwrap();
            // The tiny model holds nothing the engine does not read.
            assert_eq!(
                report.tensors_checked,
                Some(ck.names().len()),
                "{dtype:?} {layout:?}"
            );
            assert!(report.to_text().contains("checked      all"));
            let headers = inspect_with(d.path(), Check::Headers).unwrap();
            assert_eq!(headers.tensors_checked, None);
            assert_eq!(headers.params, report.params);
        }
    }
}

#[test]
fn the_plan_is_what_the_loader_reads() {
    let d = model_dir(FloatDtype::F32, ExpertLayout::Residual);
    let model = ModelDir::open(d.path()).unwrap();
    let inventory = model.plan.inventory();
    let w = model.load_weights().unwrap();
    let find = |n: &str| {
        inventory
            .weights()
            .find(|t| t.name == n)
            .unwrap()
            .shape
            .clone()
    };
    let l = &w.layers[1];
    assert_eq!(
        find(&names::expert_tensor_names(1, 2)[2]),
        vec![l.experts[2].down.rows, l.experts[2].down.cols]
    );
    let shared = l.shared.as_ref().unwrap();
    assert_eq!(
        find(&names::shared_tensor_names(1)[0]),
        vec![shared.gate.rows, shared.gate.cols]
    );
    assert_eq!(
        find(&names::attention_tensor_names(0)[1]),
        vec![w.layers[0].q.rows, w.layers[0].q.cols]
    );
    assert_eq!(
        find(&names::router("proj_out.weight")),
        vec![w.router.proj_out.weight.rows, w.router.proj_out.weight.cols]
    );
}

#[test]
fn missing_tensor_is_named() {
    let d = model_dir(FloatDtype::F32, ExpertLayout::Fused);
    let gone = names::expert_tensor_names(1, 2)[2].clone();
    rewrite(d.path(), |s, b| (s.name != gone).then(|| (s.clone(), b)));
    let msg = inspect_err(d.path());
    assert!(msg.contains(&format!("missing tensor `{gone}`")), "{msg}");
    assert!(msg.contains("1 problem found"), "{msg}");
}

#[test]
fn renamed_tensor_is_missing_under_its_expected_name() {
    let d = model_dir(FloatDtype::BF16, ExpertLayout::Fused);
    let old = names::attention_tensor_names(1)[2].clone();
    let new = old.replace("k_proj", "key_proj");
    rewrite(d.path(), |s, b| {
        let name = if s.name == old { &new } else { &s.name };
        Some((TensorSpec::new(name, s.dtype, s.shape.clone()), b))
    });
    let msg = inspect_err(d.path());
    assert!(msg.contains(&format!("missing tensor `{old}`")), "{msg}");
}

#[test]
fn wrong_dtype_is_named() {
    let d = model_dir(FloatDtype::F32, ExpertLayout::Fused);
    rewrite(d.path(), |s, b| {
        let dtype = if s.name == names::FINAL_NORM {
            Dtype::I32
        } else {
            s.dtype
        };
        Some((TensorSpec::new(&s.name, dtype, s.shape.clone()), b))
    });
    let msg = inspect_err(d.path());
    assert!(
        msg.contains(&format!("tensor `{}` has dtype I32", names::FINAL_NORM)),
        "{msg}"
    );
}

#[test]
fn wrong_shape_is_named_with_expected_and_found() {
    let d = model_dir(FloatDtype::F16, ExpertLayout::Fused);
    let victim = names::expert_tensor_names(0, 2)[2].clone();
    rewrite(d.path(), |s, b| {
        let shape = if s.name == victim {
            vec![s.shape[0] / 2, s.shape[1] * 2]
        } else {
            s.shape.clone()
        };
        Some((TensorSpec::new(&s.name, s.dtype, shape), b))
    });
    let model = ModelDir::open(d.path()).unwrap();
    let expected = model
        .plan
        .inventory()
        .weights()
        .find(|t| t.name == victim)
        .unwrap()
        .shape
        .clone();
    let msg = inspect_err(d.path());
    assert!(
        msg.contains(&format!(
            "tensor `{victim}` has shape {:?}, expected {expected:?}",
            [expected[0] / 2, expected[1] * 2]
        )),
        "{msg}"
    );
}

#[test]
fn a_nan_in_one_expert_is_named_with_its_position() {
    for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
        let d = model_dir(dtype, ExpertLayout::Fused);
        let name = names::expert_tensor_names(1, 3)[1].clone();
        let cols = Checkpoint::open(d.path())
            .unwrap()
            .tensor(&name)
            .unwrap()
            .shape[1];
        let at = 5 * cols + 7;
        poke(d.path(), &name, at, f32::NAN);
        // The loader itself accepts it: only the inspection catches it before serving.
        assert!(ModelDir::open(d.path()).unwrap().load_weights().is_ok());
        let msg = inspect_err(d.path());
        assert!(
            msg.contains(&format!("tensor `{name}` holds a non-finite value (NaN) at flat index {at} (position [5, 7]")),
            "{dtype:?}: {msg}"
        );
        assert!(msg.contains("1 problem found"), "{dtype:?}: {msg}");
        // The cheap mode reads no values.
        assert_eq!(
            inspect_with(d.path(), Check::Headers)
                .unwrap()
                .tensors_checked,
            None
        );
    }
}

#[test]
fn the_first_of_several_infinities_is_reported() {
    let d = model_dir(FloatDtype::BF16, ExpertLayout::Residual);
    let name = names::shared_tensor_names(0)[2].clone();
    poke(d.path(), &name, 9, f32::NEG_INFINITY);
    poke(d.path(), &name, 3, f32::INFINITY);
    let msg = inspect_err(d.path());
    assert!(
        msg.contains(&format!(
            "tensor `{name}` holds a non-finite value (inf) at flat index 3"
        )),
        "{msg}"
    );
}

#[test]
fn every_problem_is_reported_together() {
    let d = model_dir(FloatDtype::F32, ExpertLayout::Fused);
    let gone = names::expert_tensor_names(0, 1)[0].clone();
    let old = names::router("proj_2_0.bias");
    let new = names::router("proj_2_0.b");
    let bad_dtype = names::attention_tensor_names(1)[0].clone();
    let bad_shape = names::attention_tensor_names(1)[5].clone();
    let nan = names::expert_tensor_names(1, 0)[2].clone();
    rewrite(d.path(), |s, b| {
        if s.name == gone {
            return None;
        }
        let name = if s.name == old { &new } else { &s.name };
        let dtype = if s.name == bad_dtype {
            Dtype::I32
        } else {
            s.dtype
        };
        let shape = if s.name == bad_shape {
            vec![2, s.shape[0] / 2]
        } else {
            s.shape.clone()
        };
        Some((TensorSpec::new(name, dtype, shape), b))
    });
    poke(d.path(), &nan, 0, f32::NAN);
    let msg = inspect_err(d.path());
    assert!(msg.contains("5 problems found"), "{msg}");
    for n in [&gone, &old, &bad_dtype, &bad_shape, &nan] {
        assert!(msg.contains(&format!("`{n}`")), "{n} not in {msg}");
    }
    // One per line, in a list.
    assert_eq!(msg.lines().filter(|l| l.starts_with("  - ")).count(), 5);
    let model = ModelDir::open(d.path()).unwrap();
    let problems = validate(&model, true);
    assert_eq!(problems.len(), 5, "{problems:?}");
    assert!(matches!(problems[0], Error::MissingTensor { .. }));
    assert_eq!(validate(&model, false).len(), 4);
}

#[test]
fn one_odd_expert_width_is_blamed_on_that_expert() {
    let d = model_dir(FloatDtype::F32, ExpertLayout::Fused);
    // Expert 0 is the odd one: the width comes from the other experts, not from it.
    let [g, u, dn] = names::expert_tensor_names(1, 0);
    rewrite(d.path(), |s, _| {
        let shape = if s.name == g || s.name == u {
            vec![8, s.shape[1]]
        } else if s.name == dn {
            vec![s.shape[0], 8]
        } else {
            s.shape.clone()
        };
        let spec = TensorSpec::new(&s.name, s.dtype, shape);
        let bytes = vec![0u8; spec.byte_len()];
        Some((spec, bytes))
    });
    let msg = inspect_err(d.path());
    assert!(msg.contains("3 problems found"), "{msg}");
    for n in [&g, &u, &dn] {
        assert!(
            msg.contains(&format!("`{n}` has shape")),
            "{n} not in {msg}"
        );
    }
    match ModelDir::open(d.path()).unwrap().load_weights() {
        Err(Error::Shape { name, .. }) => assert!([&g, &u, &dn].contains(&&name), "{name}"),
        other => panic!("{other:?}"),
    }
}
