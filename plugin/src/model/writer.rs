//! Streaming safetensors writer, optionally sharded with a `model.safetensors.index.json`.
//!
//! The header is computed from the tensors' specs up front, then each tensor's bytes are produced
//! (on a helper thread, one tensor ahead) and written in order, so memory stays bounded by a couple
//! of tensors however large the model. Files are written under a temporary name and renamed when
//! complete.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use safetensors::Dtype;

use super::checkpoint::{INDEX_FILE, SINGLE_FILE};
use super::progress::Progress;
use crate::error::{Error, Result};

/// Default shard size of `make-model` and `convert`: models larger than this are sharded.
pub const DEFAULT_SHARD_BYTES: usize = 4 << 30;

/// A tensor to write: its name, dtype and shape (the bytes come from a producer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name.
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the tensor's data.
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

fn header_bytes(specs: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.byte_len();
        let dtype = serde_json::to_value(s.dtype).map_err(|e| Error::Internal(e.to_string()))?;
        map.insert(
            s.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&map).map_err(|e| Error::Internal(e.to_string()))?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

/// Writes one safetensors file holding `specs`, in that order; `produce` returns each tensor's
/// little-endian bytes (exactly `spec.byte_len()` of them).
pub fn write_file<F>(
    path: &Path,
    specs: &[TensorSpec],
    produce: &F,
    progress: Option<&dyn Progress>,
) -> Result<()>
where
    F: Fn(&TensorSpec) -> Result<Vec<u8>> + Sync,
{
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        if !seen.insert(s.name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "tensor `{}` would be written twice to {}",
                s.name,
                path.display()
            )));
        }
    }
    let header = header_bytes(specs)?;
    let tmp = path.with_extension("safetensors.partial");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e| Error::io(&tmp, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = sync_channel::<Result<Vec<u8>>>(1);
        scope.spawn(move || {
            for s in specs {
                let r = produce(s);
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        for s in specs {
            let bytes = rx
                .recv()
                .map_err(|_| Error::Internal("tensor producer stopped".into()))??;
            if bytes.len() != s.byte_len() {
                return Err(Error::Internal(format!(
                    "tensor `{}`: produced {} bytes, expected {}",
                    s.name,
                    bytes.len(),
                    s.byte_len()
                )));
            }
            w.write_all(&bytes).map_err(io)?;
            if let Some(p) = progress {
                p.advance(bytes.len() as u64);
            }
        }
        Ok(())
    })?;
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Splits `specs` into shards of at most `max_shard_bytes` (a larger tensor gets its own shard).
pub fn plan_shards(specs: &[TensorSpec], max_shard_bytes: usize) -> Vec<Vec<TensorSpec>> {
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for s in specs {
        if !current.is_empty() && bytes + s.byte_len() > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += s.byte_len();
        current.push(s.clone());
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes a model's weights into `dir`: `model.safetensors` when they fit in one shard of
/// `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
/// Removes a stale single file or index of the other form. Returns the files written.
pub fn write_model<F>(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: usize,
    produce: &F,
    progress: Option<&dyn Progress>,
) -> Result<Vec<PathBuf>>
where
    F: Fn(&TensorSpec) -> Result<Vec<u8>> + Sync,
{
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let shards = plan_shards(specs, max_shard_bytes.max(1));
    for stale in [SINGLE_FILE, INDEX_FILE] {
        let p = dir.join(stale);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    if shards.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        write_file(&path, &shards[0], produce, progress)?;
        return Ok(vec![path]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::with_capacity(n);
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let path = dir.join(&name);
        write_file(&path, shard, produce, progress)?;
        for s in shard {
            weight_map.insert(s.name.clone(), name.clone().into());
        }
        files.push(path);
    }
    let total: usize = specs.iter().map(TensorSpec::byte_len).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Checkpoint;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("a", Dtype::F32, vec![2, 3]),
            TensorSpec::new("b", Dtype::BF16, vec![5]),
            TensorSpec::new("c", Dtype::U8, vec![7]),
        ]
    }

    fn produce(s: &TensorSpec) -> Result<Vec<u8>> {
        Ok((0..s.byte_len())
            .map(|i| (i * 7 + s.name.len()) as u8)
            .collect())
    }

    #[test]
    fn single_and_sharded_round_trip() {
        for shard in [usize::MAX, 16] {
            let dir = tempfile::tempdir().unwrap();
            let files = write_model(dir.path(), &specs(), shard, &produce, None).unwrap();
            assert_eq!(files.len() > 1, shard == 16);
            let ck = Checkpoint::open(dir.path()).unwrap();
            for s in specs() {
                let t = ck.tensor(&s.name).unwrap();
                assert_eq!(t.dtype, s.dtype);
                assert_eq!(t.shape, &s.shape[..]);
                assert_eq!(t.data, &produce(&s).unwrap()[..]);
            }
        }
    }

    #[test]
    fn producer_errors_propagate() {
        let dir = tempfile::tempdir().unwrap();
        let bad = |s: &TensorSpec| {
            if s.name == "b" {
                Err(Error::Internal("boom".into()))
            } else {
                produce(s)
            }
        };
        let err = write_model(dir.path(), &specs(), usize::MAX, &bad, None).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert!(!dir.path().join(SINGLE_FILE).exists());
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = specs();
        s.push(s[0].clone());
        assert!(write_model(dir.path(), &s, usize::MAX, &produce, None).is_err());
    }
}
