//! [`KernelSet`]: every kernel of the crate, compiled once for a context's device.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::cache::{self, CacheOutcome};
use crate::device::device_arch;
use crate::error::{catch, KernelError, Result};
use crate::nvrtc::Nvrtc;
use crate::sources::{KernelSource, SOURCES};

/// How a [`KernelSet`] finds and caches its code.
#[derive(Debug, Clone)]
pub struct KernelSetOptions {
    /// The disk cache folder; `None` disables the disk cache (the in-memory one always works).
    pub cache_dir: Option<PathBuf>,
    /// Compile for this architecture (`sm_XY`) instead of the device's own.
    pub arch: Option<String>,
}

impl Default for KernelSetOptions {
    fn default() -> Self {
        KernelSetOptions {
            cache_dir: cache::default_cache_dir(),
            arch: None,
        }
    }
}

/// Compiles (or fetches from the cache) one source for `arch`.
pub fn compile_cached(
    nvrtc: &Nvrtc,
    src: &KernelSource,
    arch: &str,
    cache_dir: Option<&std::path::Path>,
) -> Result<(Arc<Vec<u8>>, CacheOutcome)> {
    let text = src.full_source();
    let key = cache::cache_key(&text, &nvrtc.options(arch), nvrtc.version());
    if let Some(hit) = cache::lookup(cache_dir, src.name, key) {
        return Ok(hit);
    }
    let cubin = Arc::new(nvrtc.compile(src.name, &text, arch)?);
    cache::store(cache_dir, src.name, key, cubin.clone());
    Ok((cubin, CacheOutcome::Compiled))
}

/// The crate's kernels loaded into one CUDA context. Launchers are methods of this type (see the
/// `ops` modules); they check shapes and buffer lengths and return [`KernelError::Shape`] before
/// any launch.
#[derive(Debug)]
pub struct KernelSet {
    ctx: Arc<CudaContext>,
    arch: String,
    functions: HashMap<&'static str, CudaFunction>,
    outcomes: Vec<(&'static str, CacheOutcome)>,
    _modules: Vec<Arc<CudaModule>>,
}

impl KernelSet {
    /// Compiles every source for `ctx`'s device with the default options.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        Self::with_options(ctx, &KernelSetOptions::default())
    }

    /// Compiles (or loads from the caches) every source and loads it into `ctx`.
    pub fn with_options(ctx: &Arc<CudaContext>, opts: &KernelSetOptions) -> Result<Self> {
        let nvrtc = Nvrtc::load()?;
        let arch = match &opts.arch {
            Some(a) => a.clone(),
            None => device_arch(ctx)?,
        };
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        let mut outcomes = Vec::new();
        for src in SOURCES {
            let (cubin, outcome) = compile_cached(&nvrtc, src, &arch, opts.cache_dir.as_deref())?;
            let module = catch("cuModuleLoadData", || {
                ctx.load_module(Ptx::from_binary(cubin.as_ref().clone()))
            })??;
            for &name in src.kernels {
                let f = module
                    .load_function(name)
                    .map_err(|_| KernelError::MissingKernel(name.to_string()))?;
                functions.insert(name, f);
            }
            modules.push(module);
            outcomes.push((src.name, outcome));
        }
        Ok(KernelSet {
            ctx: ctx.clone(),
            arch,
            functions,
            outcomes,
            _modules: modules,
        })
    }

    /// The context the kernels are loaded in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The architecture the kernels were compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Where each module's code came from (memory, disk cache, or a fresh compilation).
    pub fn cache_outcomes(&self) -> &[(&'static str, CacheOutcome)] {
        &self.outcomes
    }

    /// The kernel `name`.
    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| KernelError::MissingKernel(name.to_string()))
    }
}
