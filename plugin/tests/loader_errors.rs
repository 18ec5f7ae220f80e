//! Bad model directories: every one gives a clear error naming the file, tensor or value, and none
//! panics.

mod common;
use common::rewrite;
use std::path::Path;

use pregate::model::checkpoint::FloatDtype;
use pregate::model::names;
use pregate::model::writer::TensorSpec;
use pregate::model::{make_model, Checkpoint, ExpertLayout, ModelDir, Preset};
use pregate::Error;
use safetensors::Dtype;

fn tiny_dir(max_shard_bytes: Option<usize>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Preset::Tiny.spec();
    if let Some(b) = max_shard_bytes {
        spec.max_shard_bytes = b;
    }
    make_model(&spec, ExpertLayout::Fused, 1, dir.path()).unwrap();
    dir
}

fn load_err(dir: &Path) -> Error {
    let r = std::panic::catch_unwind(|| ModelDir::open(dir).and_then(|m| m.load_weights()));
    match r {
        Ok(Ok(_)) => panic!("loaded a bad model"),
        Ok(Err(e)) => e,
        Err(_) => panic!("the loader panicked"),
    }
}

#[test]
fn missing_tensor_names_it_and_the_directory() {
    let d = tiny_dir(None);
    let gone = names::expert_tensor_names(1, 2)[2].clone();
    rewrite(d.path(), |s, b| (s.name != gone).then(|| (s.clone(), b)));
    match load_err(d.path()) {
        Error::MissingTensor { name, dir } => {
            assert_eq!(name, gone);
            assert_eq!(dir, d.path());
        }
        e => panic!("{e}"),
    }
}

#[test]
fn wrong_shape_names_tensor_expected_found_and_file() {
    let d = tiny_dir(None);
    let victim = names::attention_tensor_names(1)[5].clone();
    rewrite(d.path(), |s, b| {
        Some(if s.name == victim {
            (TensorSpec::new(&s.name, s.dtype, vec![32, 2]), b)
        } else {
            (s.clone(), b)
        })
    });
    let e = load_err(d.path());
    let msg = e.to_string();
    match e {
        Error::Shape {
            name,
            expected,
            found,
            path,
        } => {
            assert_eq!(name, victim);
            assert_eq!(expected, vec![64]);
            assert_eq!(found, vec![32, 2]);
            assert!(path.ends_with("model.safetensors"));
            assert!(msg.contains("model.safetensors"), "{msg}");
        }
        e => panic!("{e}"),
    }
}

#[test]
fn experts_of_one_layer_must_share_a_width() {
    let d = tiny_dir(None);
    let [g, u, dn] = names::expert_tensor_names(0, 3);
    let h = 64;
    rewrite(d.path(), |s, _| {
        let shape = if s.name == g || s.name == u {
            vec![32, h]
        } else if s.name == dn {
            vec![h, 32]
        } else {
            s.shape.clone()
        };
        let spec = TensorSpec::new(&s.name, s.dtype, shape);
        let bytes = vec![0u8; spec.byte_len()];
        Some((spec, bytes))
    });
    match load_err(d.path()) {
        Error::Shape { name, found, .. } => {
            assert!([&g, &u, &dn].contains(&&name), "{name}");
            assert!(found.contains(&32));
        }
        e => panic!("{e}"),
    }
}

#[test]
fn integer_dtype_is_refused_by_name() {
    let d = tiny_dir(None);
    rewrite(d.path(), |s, b| {
        Some(if s.name == names::FINAL_NORM {
            (TensorSpec::new(&s.name, Dtype::I32, s.shape.clone()), b)
        } else {
            (s.clone(), b)
        })
    });
    let e = load_err(d.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::Dtype { .. }), "{msg}");
    assert!(
        msg.contains(names::FINAL_NORM) && msg.contains("I32"),
        "{msg}"
    );
    assert!(msg.contains("BF16, F16, F32"), "{msg}");
}

#[test]
fn truncated_and_corrupt_files_are_checkpoint_errors() {
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "truncated",
            Box::new(|b| b.truncate(b.len() - 100)),
            "truncated",
        ),
        ("tiny", Box::new(|b| b.truncate(3)), "too short"),
        ("empty", Box::new(|b| b.clear()), "too short"),
        (
            "header past end",
            Box::new(|b| b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes())),
            "exceeds the file",
        ),
        (
            "bad json",
            Box::new(|b| {
                let i = b.iter().position(|&c| c == b'{').unwrap();
                b[i] = b'x';
            }),
            "corrupt header",
        ),
        (
            "not safetensors",
            Box::new(|b| *b = b"hello, this is not a weight file at all".to_vec()),
            "bad checkpoint file",
        ),
    ];
    for (what, edit, needle) in cases {
        let d = tiny_dir(None);
        let path = d.path().join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        edit(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let e = load_err(d.path());
        let msg = e.to_string();
        assert!(matches!(e, Error::Checkpoint { .. }), "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
        assert!(msg.contains("model.safetensors"), "{what}: {msg}");
    }
}

#[test]
fn offsets_outside_the_data_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("x.safetensors");
    for header in [
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8000]}}"#,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}}"#,
        r#"[1,2,3]"#,
    ] {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 8]);
        std::fs::write(&path, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| Checkpoint::open_file(&path));
        match r {
            Ok(Err(Error::Checkpoint { path: p, .. })) => assert_eq!(p, path),
            other => panic!("{header}: {other:?}"),
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let d = tiny_dir(None);
    let path = d.path().join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..150 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % header_end;
            bytes[i] = next() as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        let r =
            std::panic::catch_unwind(|| ModelDir::open(d.path()).and_then(|m| m.load_weights()));
        assert!(r.is_ok(), "panic on a corrupted header");
    }
}

#[test]
fn config_disagreeing_with_tensors_names_field_and_tensor() {
    for (field, value, needles) in [
        ("vocab_size", 500, vec!["vocab_size = 500", names::EMBED]),
        ("hidden_size", 128, vec!["hidden_size = 128", names::EMBED]),
        ("N_cluster", 3, vec!["N_cluster = 3", "proj_out.weight"]),
        ("num_hidden_layers", 3, vec!["num_hidden_layers = 3"]),
        (
            "num_hidden_layers",
            1,
            vec!["num_hidden_layers = 1", "layer 1"],
        ),
        ("inter_dim", 40, vec!["inter_dim = 40", "proj_1_0.weight"]),
        (
            "num_key_value_heads",
            4,
            vec!["num_key_value_heads", "k_proj.weight"],
        ),
    ] {
        let d = tiny_dir(None);
        let cfg_path = d.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg[field] = value.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let e = load_err(d.path());
        let msg = e.to_string();
        assert!(matches!(e, Error::Config { .. }), "{field}: {msg}");
        assert!(msg.contains("config.json"), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{field}: `{n}` not in {msg}");
        }
    }
}

#[test]
fn index_naming_a_missing_shard_or_tensor() {
    let d = tiny_dir(Some(64 << 10));
    let index_path = d.path().join("model.safetensors.index.json");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let mut shards: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() > 2, "{shards:?}");

    // A tensor the index places in a shard that lacks it.
    let mut bad = index.clone();
    bad["weight_map"]["extra.weight"] = shards[0].clone().into();
    std::fs::write(&index_path, bad.to_string()).unwrap();
    let msg = load_err(d.path()).to_string();
    assert!(
        msg.contains("extra.weight") && msg.contains(&shards[0]),
        "{msg}"
    );

    // A shard that does not exist.
    std::fs::write(&index_path, index.to_string()).unwrap();
    std::fs::remove_file(d.path().join(&shards[1])).unwrap();
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains(&shards[1]), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");

    // A corrupt index.
    std::fs::write(&index_path, "{\"weight_map\": ").unwrap();
    let msg = load_err(d.path()).to_string();
    assert!(
        msg.contains("index.json") && msg.contains("corrupt"),
        "{msg}"
    );
}

#[test]
fn missing_directory_and_weights_are_io_errors() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope");
    let msg = load_err(&missing).to_string();
    assert!(msg.contains("nope") && msg.contains("config.json"), "{msg}");
    let m = tiny_dir(None);
    std::fs::remove_file(m.path().join("model.safetensors")).unwrap();
    let e = load_err(m.path());
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    let e = Checkpoint::open(&missing).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn unknown_preset_and_layout_are_named() {
    let e = Preset::parse("gigantic").unwrap_err().to_string();
    assert!(e.contains("gigantic") && e.contains("readme-7b"), "{e}");
    let e = ExpertLayout::parse("dense").unwrap_err().to_string();
    assert!(e.contains("dense") && e.contains("residual"), "{e}");
}

#[test]
fn conversion_reads_bf16_f16_f32_only() {
    let d = tiny_dir(None);
    let ck = Checkpoint::open(d.path()).unwrap();
    let t = ck.tensor(names::EMBED).unwrap();
    assert_eq!(t.float_dtype().unwrap(), FloatDtype::F32);
    assert_eq!(t.to_f32().unwrap().len(), t.numel());
}
