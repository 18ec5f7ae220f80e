//! The compiled-kernel cache: in memory for the process, and on disk across runs.
//!
//! Key: a 128-bit FNV-1a hash of the source, the NVRTC options (architecture included) and the
//! NVRTC version. Files: `<dir>/<module>-<key>.cubin`, written atomically (temporary file, rename),
//! starting with a magic and the key so a foreign or truncated file is ignored. The folder is
//! `PREGATE_KERNEL_CACHE` (`off` or empty disables the disk cache), else
//! `$XDG_CACHE_HOME/pregate/kernels`, else `~/.cache/pregate/kernels`. Disk errors never fail a
//! compilation: the cache is only an accelerator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Environment variable naming the disk cache folder (`off` disables it).
pub const KERNEL_CACHE_ENV: &str = "PREGATE_KERNEL_CACHE";

const MAGIC: &[u8; 8] = b"PGKCUB1\0";

/// Where a module's cubin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Already compiled by this process.
    Memory,
    /// Read from the disk cache.
    Disk,
    /// Compiled now.
    Compiled,
}

/// The cache key of a compilation.
pub fn cache_key(source: &str, options: &[String], nvrtc_version: (i32, i32)) -> u128 {
    let mut h = Fnv128::new();
    h.write(source.as_bytes());
    h.write(&[0xff]);
    for o in options {
        h.write(o.as_bytes());
        h.write(&[0]);
    }
    h.write(&nvrtc_version.0.to_le_bytes());
    h.write(&nvrtc_version.1.to_le_bytes());
    h.finish()
}

struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;

    fn new() -> Self {
        Fnv128(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u128;
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn finish(&self) -> u128 {
        self.0
    }
}

/// The disk cache folder from the environment, or `None` when disabled or no home is known.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(KERNEL_CACHE_ENV) {
        if v.is_empty() || v == "off" {
            return None;
        }
        return Some(PathBuf::from(v));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("pregate").join("kernels"));
    }
    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("pregate")
            .join("kernels")
    })
}

fn memory() -> &'static Mutex<HashMap<u128, Arc<Vec<u8>>>> {
    static MEM: OnceLock<Mutex<HashMap<u128, Arc<Vec<u8>>>>> = OnceLock::new();
    MEM.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Looks `key` up in memory, then on disk under `dir`.
pub fn lookup(dir: Option<&Path>, module: &str, key: u128) -> Option<(Arc<Vec<u8>>, CacheOutcome)> {
    let mem = memory().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = mem.get(&key) {
        return Some((c.clone(), CacheOutcome::Memory));
    }
    drop(mem);
    let bytes = std::fs::read(file_path(dir?, module, key)).ok()?;
    let body = bytes
        .strip_prefix(MAGIC.as_slice())?
        .strip_prefix(key.to_le_bytes().as_slice())?;
    if body.is_empty() {
        return None;
    }
    let cubin = Arc::new(body.to_vec());
    remember(key, cubin.clone());
    Some((cubin, CacheOutcome::Disk))
}

/// Keeps `cubin` in memory, and on disk under `dir` when given (best effort).
pub fn store(dir: Option<&Path>, module: &str, key: u128, cubin: Arc<Vec<u8>>) {
    if let Some(dir) = dir {
        let _ = write_file(dir, module, key, &cubin);
    }
    remember(key, cubin);
}

fn remember(key: u128, cubin: Arc<Vec<u8>>) {
    memory()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, cubin);
}

fn file_path(dir: &Path, module: &str, key: u128) -> PathBuf {
    dir.join(format!("{module}-{key:032x}.cubin"))
}

fn write_file(dir: &Path, module: &str, key: u128, cubin: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let final_path = file_path(dir, module, key);
    let tmp = dir.join(format!(".{module}-{key:032x}.{}.tmp", std::process::id()));
    let mut data = Vec::with_capacity(MAGIC.len() + 16 + cubin.len());
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&key.to_le_bytes());
    data.extend_from_slice(cubin);
    std::fs::write(&tmp, &data)?;
    std::fs::rename(&tmp, &final_path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_source_options_and_version() {
        let o = vec!["--gpu-architecture=sm_90".to_string()];
        let k = cache_key("a", &o, (13, 0));
        assert_eq!(k, cache_key("a", &o, (13, 0)));
        assert_ne!(k, cache_key("b", &o, (13, 0)));
        assert_ne!(
            k,
            cache_key("a", &["--gpu-architecture=sm_80".into()], (13, 0))
        );
        assert_ne!(k, cache_key("a", &o, (13, 1)));
    }

    #[test]
    fn disk_round_trip_and_corrupt_files_are_ignored() {
        let dir = std::env::temp_dir().join(format!("pregate-kcache-{}", std::process::id()));
        let key = cache_key("round trip", &[], (1, 2));
        store(Some(&dir), "m", key, Arc::new(vec![1, 2, 3]));
        memory().lock().unwrap().remove(&key);
        let (c, how) = lookup(Some(&dir), "m", key).unwrap();
        assert_eq!((c.as_slice(), how), (&[1u8, 2, 3][..], CacheOutcome::Disk));
        let (_, how) = lookup(Some(&dir), "m", key).unwrap();
        assert_eq!(how, CacheOutcome::Memory);
        let other = key ^ 1;
        std::fs::write(file_path(&dir, "m", other), b"garbage").unwrap();
        assert!(lookup(Some(&dir), "m", other).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
