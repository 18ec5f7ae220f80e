//! Zero-copy access to safetensors weight files.
//!
//! A [`Checkpoint`] memory-maps `model.safetensors`, or every shard named by
//! `model.safetensors.index.json`, parses the headers once and hands out [`TensorRef`]s: a tensor's
//! dtype, shape and raw little-endian bytes, borrowed from the map. Nothing is copied until a caller
//! converts a tensor ([`TensorRef::to_f32`]) or uploads its bytes to a device.
//!
//! Every malformed input (short file, header length past the end, bad JSON, offsets outside the
//! data, an index naming a missing shard or tensor) is an [`Error`], never a panic.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// The single-file weight name inside a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name inside a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The floating-point storage dtypes pregate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> Dtype {
        match self {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::BF16 => Dtype::BF16,
        }
    }

    /// The float dtype of a safetensors dtype, if it is one pregate reads.
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FloatDtype::F32),
            Dtype::F16 => Some(FloatDtype::F16),
            Dtype::BF16 => Some(FloatDtype::BF16),
            _ => None,
        }
    }

    /// The name `config.json`'s `torch_dtype` uses (`float32`, `float16`, `bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::BF16 => "bfloat16",
        }
    }
}

/// The dtypes accepted for weights, as error messages list them.
pub const FLOAT_DTYPES: &str = "BF16, F16, F32";

/// One memory-mapped safetensors file with its parsed header.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::checkpoint(
                path,
                format!("file is {len} bytes, too short for a safetensors header (truncated?)"),
            ));
        }
        // SAFETY: the map is read-only and lives as long as this struct. Another process truncating
        // the file while it is mapped would fault (SIGBUS); that is the documented contract of every
        // memory-mapped weight loader (safetensors, candle, llama.cpp) and no Rust reference outlives
        // the map.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bytes: &[u8] = &mmap;
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        if header_len > len - 8 {
            return Err(Error::checkpoint(
                path,
                format!(
                    "header length {header_len} exceeds the file ({len} bytes): truncated or not safetensors"
                ),
            ));
        }
        let (n, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::checkpoint(path, describe_safetensors_error(&e, len)))?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            data_start: 8 + n,
            mmap,
            metadata,
        })
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    fn data(&self, info: &TensorInfo) -> &[u8] {
        let (s, e) = info.data_offsets;
        // read_metadata checked that the offsets tile the data section exactly.
        self.mmap
            .get(self.data_start + s..self.data_start + e)
            .unwrap_or(&[])
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, len: u64) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => format!(
            "the header's tensors do not cover the file's {len} bytes exactly (truncated or corrupt)"
        ),
        E::InvalidHeaderDeserialization(err) => format!("corrupt header JSON: {err}"),
        E::InvalidHeader(err) => format!("header is not UTF-8: {err}"),
        E::InvalidOffset(name) => format!("tensor `{name}` has data offsets outside the data"),
        E::TensorInvalidInfo => "a tensor's byte size does not match its shape and dtype".into(),
        other => format!("not a valid safetensors file: {other}"),
    }
}

/// A borrowed view of one tensor in a [`Checkpoint`].
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its dtype as stored.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its raw little-endian bytes (memory-mapped).
    pub data: &'a [u8],
    /// The file holding it.
    pub path: &'a Path,
}

impl<'a> TensorRef<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The float dtype, or [`Error::Dtype`] if the tensor is not BF16, F16 or F32.
    pub fn float_dtype(&self) -> Result<FloatDtype> {
        FloatDtype::from_safetensors(self.dtype).ok_or_else(|| Error::Dtype {
            name: self.name.to_string(),
            found: self.dtype.to_string(),
            expected: FLOAT_DTYPES.to_string(),
            path: self.path.to_path_buf(),
        })
    }

    /// Checks the shape, returning [`Error::Shape`] naming the tensor and file on a mismatch.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(Error::Shape {
                name: self.name.to_string(),
                expected: expected.to_vec(),
                found: self.shape.to_vec(),
                path: self.path.to_path_buf(),
            })
        }
    }

    /// The first element (in storage order) that is NaN or infinite, with its value as f32;
    /// `None` when every element is finite. Reads the bits in place, in parallel for large
    /// tensors, without converting the tensor.
    pub fn first_non_finite(&self) -> Result<Option<(usize, f32)>> {
        const CHUNK: usize = 1 << 16;
        let dtype = self.float_dtype()?;
        let size = dtype.size();
        // An IEEE value is NaN or infinite exactly when its exponent bits are all ones.
        let bad = |s: &[u8]| match dtype {
            FloatDtype::F32 => {
                u32::from_le_bytes([s[0], s[1], s[2], s[3]]) & 0x7f80_0000 == 0x7f80_0000
            }
            FloatDtype::BF16 => u16::from_le_bytes([s[0], s[1]]) & 0x7f80 == 0x7f80,
            FloatDtype::F16 => u16::from_le_bytes([s[0], s[1]]) & 0x7c00 == 0x7c00,
        };
        let found = self
            .data
            .par_chunks(CHUNK * size)
            .enumerate()
            .find_map_first(|(c, chunk)| {
                chunk
                    .chunks_exact(size)
                    .position(bad)
                    .map(|i| c * CHUNK + i)
            });
        Ok(found.map(|i| {
            let at = &self.data[i * size..(i + 1) * size];
            (i, convert_to_f32(at, dtype)[0])
        }))
    }

    /// Converts the tensor to f32 (in parallel for large tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let dtype = self.float_dtype()?;
        Ok(convert_to_f32(self.data, dtype))
    }
}

/// Converts little-endian `data` of `dtype` to f32.
pub fn convert_to_f32(data: &[u8], dtype: FloatDtype) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let size = dtype.size();
    let n = data.len() / size;
    let mut out = vec![0f32; n];
    let convert = |dst: &mut [f32], src: &[u8]| match dtype {
        FloatDtype::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        FloatDtype::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
            }
        }
        FloatDtype::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
            }
        }
    };
    if n <= CHUNK {
        convert(&mut out, data);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(data.par_chunks(CHUNK * size))
            .for_each(|(d, s)| convert(d, s));
    }
    out
}

/// The weight files of a model, memory-mapped, with a name -> file lookup.
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory (or, for [`Checkpoint::open_file`], the file) errors name.
    origin: PathBuf,
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens a model directory's weights: `model.safetensors`, else the shards named by
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            let mut ck = Self::open_file(&single)?;
            ck.origin = dir.to_path_buf();
            return Ok(ck);
        }
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model directory does not exist",
                ),
            ));
        }
        Err(Error::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no weights: neither {SINGLE_FILE} nor {INDEX_FILE} exists"),
            ),
        ))
    }

    /// Opens one safetensors file (e.g. `masks.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let index = file
            .metadata
            .tensors()
            .into_keys()
            .map(|name| (name, 0))
            .collect();
        Ok(Checkpoint {
            origin: path.to_path_buf(),
            files: vec![file],
            index,
        })
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(index_path, format!("corrupt index JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::checkpoint(index_path, "no `weight_map` object"))?;
        // Shard names in a stable order, so file indices do not depend on hashing.
        let mut shard_ids: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::checkpoint(
                    index_path,
                    format!("weight_map entry `{name}` is not a file name"),
                )
            })?;
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(Error::checkpoint(
                    index_path,
                    format!("shard name `{shard}` must be a plain file name"),
                ));
            }
            shard_ids.insert(shard, 0);
        }
        let shard_names: Vec<&str> = shard_ids.keys().copied().collect();
        for (i, s) in shard_names.iter().enumerate() {
            shard_ids.insert(s, i);
        }
        let files = shard_names
            .par_iter()
            .map(|shard| {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(Error::checkpoint(
                        index_path,
                        format!("names shard `{shard}`, which does not exist"),
                    ));
                }
                MappedFile::open(&path)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::with_capacity(map.len());
        for (name, shard) in map {
            let shard = shard.as_str().unwrap_or_default();
            let i = shard_ids[shard];
            if files[i].info(name).is_none() {
                return Err(Error::checkpoint(
                    &files[i].path,
                    format!("tensor `{name}` is listed in {INDEX_FILE} for this shard but absent from it"),
                ));
            }
            index.insert(name.clone(), i);
        }
        Ok(Checkpoint {
            origin: dir.to_path_buf(),
            files,
            index,
        })
    }

    /// The directory (or single file) the checkpoint was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The weight files, in index order.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A tensor, or [`Error::MissingTensor`] naming it and the directory.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, &i) = self
            .index
            .get_key_value(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                dir: self.origin.clone(),
            })?;
        let file = &self.files[i];
        let info = file.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: file.path.clone(),
        })?;
        Ok(TensorRef {
            name: key,
            dtype: info.dtype,
            shape: &info.shape,
            data: file.data(info),
            path: &file.path,
        })
    }

    /// A tensor checked against an expected shape and a float dtype.
    pub fn float_tensor(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let t = self.tensor(name)?;
        t.expect_shape(shape)?;
        t.float_dtype()?;
        Ok(t)
    }

    /// Total bytes of tensor data over all files.
    pub fn data_bytes(&self) -> usize {
        self.files.iter().map(|f| f.metadata.data_len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact() {
        let vals = [0.0f32, 1.0, -2.5, 65504.0, 1e-3];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(convert_to_f32(&f32_bytes, FloatDtype::F32), vals);
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let back = convert_to_f32(&bf, FloatDtype::BF16);
        for (a, b) in back.iter().zip(vals) {
            assert_eq!(*a, half::bf16::from_f32(b).to_f32());
        }
        let h: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let back = convert_to_f32(&h, FloatDtype::F16);
        for (a, b) in back.iter().zip(vals) {
            assert_eq!(*a, half::f16::from_f32(b).to_f32());
        }
    }

    #[test]
    fn first_non_finite_finds_the_first_in_every_dtype() {
        let path = Path::new("x.safetensors");
        let n = (1 << 16) * 2 + 5;
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
            for (bad, at) in [
                (f32::NAN, 3),
                (f32::INFINITY, (1 << 16) + 7),
                (f32::NEG_INFINITY, n - 1),
            ] {
                let mut vals: Vec<f32> = (0..n).map(|i| (i % 100) as f32 - 50.0).collect();
                // A later one must not hide the first.
                vals[(at + 1).min(n - 1)] = f32::NAN;
                vals[at] = bad;
                let bytes: Vec<u8> = vals
                    .iter()
                    .flat_map(|&v| match dtype {
                        FloatDtype::F32 => v.to_le_bytes().to_vec(),
                        FloatDtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                        FloatDtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                    })
                    .collect();
                let shape = [n];
                let t = TensorRef {
                    name: "t",
                    dtype: dtype.safetensors(),
                    shape: &shape,
                    data: &bytes,
                    path,
                };
                let (i, v) = t.first_non_finite().unwrap().unwrap();
                assert_eq!(i, at, "{dtype:?}");
                assert_eq!(v.is_nan(), bad.is_nan(), "{dtype:?}");
                if !bad.is_nan() {
                    assert_eq!(v, bad, "{dtype:?}");
                }
                let clean: Vec<u8> = bytes[..at * dtype.size()].to_vec();
                let shape = [at];
                let t = TensorRef {
                    data: &clean,
                    shape: &shape,
                    ..t
                };
                assert_eq!(t.first_non_finite().unwrap(), None, "{dtype:?}");
            }
        }
        // The largest finite values are not flagged.
        let bytes: Vec<u8> = [f32::MAX, f32::MIN, 65504.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let shape = [3];
        let t = TensorRef {
            name: "t",
            dtype: Dtype::F32,
            shape: &shape,
            data: &bytes,
            path,
        };
        assert_eq!(t.first_non_finite().unwrap(), None);
    }

    #[test]
    fn large_parallel_conversion_matches_serial() {
        let n = (1 << 16) * 3 + 17;
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| half::bf16::from_f32(i as f32 * 0.5).to_le_bytes())
            .collect();
        let out = convert_to_f32(&bytes, FloatDtype::BF16);
        assert_eq!(out.len(), n);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, half::bf16::from_f32(i as f32 * 0.5).to_f32());
        }
    }
}
