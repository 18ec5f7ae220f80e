//! NVRTC: finding the library and the CUDA headers, and compiling a source to a cubin.
//!
//! The library is found, in order, at `PREGATE_NVRTC_LIB` (the file `libnvrtc.so.13` or the folder
//! holding it, for example the `nvidia/cu13/lib` folder of the `nvidia-cuda-nvrtc` wheel), then by
//! the loader's usual search (`LD_LIBRARY_PATH`, the system paths). The CUDA headers (`cuda_bf16.h`)
//! come from `PREGATE_CUDA_INCLUDE` (a `:`-separated list), `$CUDA_HOME/include`, `$CUDA_PATH/include`,
//! the `include` folder beside the library's folder (the wheels' layout), the same beside each
//! `LD_LIBRARY_PATH` entry, and `/usr/local/cuda/include`; only folders that hold `cuda_bf16.h` count.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;

use crate::error::{catch, KernelError, Result};

/// Environment variable naming the NVRTC library file or its folder.
pub const NVRTC_LIB_ENV: &str = "PREGATE_NVRTC_LIB";
/// Environment variable listing folders with the CUDA headers (`:`-separated).
pub const CUDA_INCLUDE_ENV: &str = "PREGATE_CUDA_INCLUDE";

/// A loaded NVRTC library and the header folders its compilations use.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    version: (i32, i32),
    include_dirs: Vec<PathBuf>,
    lib_dir: Option<PathBuf>,
}

/// The library file (or folder) `PREGATE_NVRTC_LIB` names, preloaded once for the process.
fn preload() -> &'static std::result::Result<Option<PathBuf>, String> {
    static PRELOADED: OnceLock<std::result::Result<Option<PathBuf>, String>> = OnceLock::new();
    PRELOADED.get_or_init(|| {
        let Some(raw) = std::env::var_os(NVRTC_LIB_ENV).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let path = PathBuf::from(raw);
        let file = if path.is_dir() {
            ["libnvrtc.so.13", "libnvrtc.so", "nvrtc64_130_0.dll"]
                .iter()
                .map(|n| path.join(n))
                .find(|p| p.exists())
                .ok_or_else(|| format!("{NVRTC_LIB_ENV}={} holds no libnvrtc", path.display()))?
        } else {
            path
        };
        let dir = file.parent().map(Path::to_path_buf);
        // NVRTC opens `libnvrtc-builtins.so.M.m` by name at compile time: load it from the same
        // folder first so that name resolves to the resident copy.
        let builtins = dir.as_deref().and_then(|d| {
            std::fs::read_dir(d)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with("libnvrtc-builtins.so.") && !n.contains(".alt.")
                    })
                })
        });
        for lib_path in builtins.iter().chain(std::iter::once(&file)) {
            // SAFETY: loading NVRTC (and its builtins) runs initialisers without preconditions.
            // The handle is leaked on purpose: the library stays resident, so the later
            // `dlopen("libnvrtc.so.13")` of cudarc (and NVRTC's of its builtins) finds it by soname.
            let lib = unsafe { libloading::Library::new(lib_path) }
                .map_err(|e| format!("{NVRTC_LIB_ENV}: {}: {e}", lib_path.display()))?;
            std::mem::forget(lib);
        }
        Ok(dir)
    })
}

fn status_string(r: sys::nvrtcResult) -> String {
    format!("{r:?}")
}

impl Nvrtc {
    /// Loads NVRTC (see the module docs for where it is looked for) and finds the CUDA headers.
    pub fn load() -> Result<Self> {
        let lib_dir = preload().clone().map_err(KernelError::NvrtcUnavailable)?;
        // SAFETY: `is_culib_present` only tries to open the library by its candidate names.
        let present = catch("nvrtc probe", || unsafe { sys::is_culib_present() })?;
        if !present {
            return Err(KernelError::NvrtcUnavailable(format!(
                "libnvrtc.so.13 not found; set {NVRTC_LIB_ENV} to it (or its folder) or add its folder to LD_LIBRARY_PATH"
            )));
        }
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: both pointers are valid for writes of one c_int.
        let r = catch("nvrtcVersion", || unsafe {
            sys::nvrtcVersion(&mut major, &mut minor)
        })?;
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(KernelError::Nvrtc {
                call: "nvrtcVersion",
                status: status_string(r),
            });
        }
        let include_dirs = find_include_dirs(lib_dir.as_deref());
        Ok(Nvrtc {
            version: (major, minor),
            include_dirs,
            lib_dir,
        })
    }

    /// NVRTC's version, (major, minor).
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The folders passed to NVRTC as include paths.
    pub fn include_dirs(&self) -> &[PathBuf] {
        &self.include_dirs
    }

    /// The folder the library was preloaded from, when `PREGATE_NVRTC_LIB` named it.
    pub fn lib_dir(&self) -> Option<&Path> {
        self.lib_dir.as_deref()
    }

    /// The NVRTC options used to compile for `arch` (`sm_90`).
    pub fn options(&self, arch: &str) -> Vec<String> {
        let mut opts = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
        ];
        for dir in &self.include_dirs {
            opts.push(format!("--include-path={}", dir.display()));
        }
        opts
    }

    /// Compiles `source` (named `module` in messages) for `arch` (`sm_XY`, a real architecture)
    /// and returns the cubin.
    pub fn compile(&self, module: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
        let options = self.options(arch);
        let src = CString::new(source).map_err(|_| KernelError::Compile {
            module: module.into(),
            arch: arch.into(),
            status: "invalid source".into(),
            log: "the source contains a NUL byte".into(),
            hint: String::new(),
        })?;
        let name = CString::new(format!("{module}.cu")).unwrap_or_default();
        let c_opts: Vec<CString> = options
            .iter()
            .filter_map(|o| CString::new(o.as_str()).ok())
            .collect();
        let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
        catch("NVRTC compile", || {
            let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
            // SAFETY: `src` and `name` are NUL-terminated and outlive the program; no headers are
            // passed (null arrays with a count of 0).
            let r = unsafe {
                sys::nvrtcCreateProgram(
                    &mut prog,
                    src.as_ptr(),
                    name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(KernelError::Nvrtc {
                    call: "nvrtcCreateProgram",
                    status: status_string(r),
                });
            }
            let guard = ProgramGuard(prog);
            // SAFETY: `prog` is a live program; `opt_ptrs` holds `len` NUL-terminated strings
            // owned by `c_opts`, alive for the call.
            let r = unsafe {
                sys::nvrtcCompileProgram(guard.0, opt_ptrs.len() as c_int, opt_ptrs.as_ptr())
            };
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                let hint = if self.include_dirs.is_empty() {
                    format!(
                        "\nhint: no folder with cuda_bf16.h was found; set {CUDA_INCLUDE_ENV} to the CUDA include folder"
                    )
                } else {
                    String::new()
                };
                return Err(KernelError::Compile {
                    module: module.into(),
                    arch: arch.into(),
                    status: status_string(r),
                    log: program_log(guard.0),
                    hint,
                });
            }
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; `size` is valid for a write.
            let r = unsafe { sys::nvrtcGetCUBINSize(guard.0, &mut size) };
            if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                return Err(KernelError::Nvrtc {
                    call: "nvrtcGetCUBINSize",
                    status: status_string(r),
                });
            }
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
            let r = unsafe { sys::nvrtcGetCUBIN(guard.0, cubin.as_mut_ptr().cast()) };
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(KernelError::Nvrtc {
                    call: "nvrtcGetCUBIN",
                    status: status_string(r),
                });
            }
            Ok(cubin)
        })?
    }
}

/// Destroys an NVRTC program when dropped.
struct ProgramGuard(sys::nvrtcProgram);

impl Drop for ProgramGuard {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once; a failure
        // only leaks it.
        let _ = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: `prog` is a live program; `size` is valid for a write.
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS
        || size == 0
    {
        return "(no log)".into();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` has the `size` bytes (NUL included) NVRTC asked for.
    if unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr().cast()) }
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return "(the log could not be read)".into();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&buf).into_owned())
}

fn has_headers(dir: &Path) -> bool {
    dir.join("cuda_bf16.h").is_file()
}

/// The header folders, in the order of the module docs, deduplicated.
fn find_include_dirs(lib_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(list) = std::env::var_os(CUDA_INCLUDE_ENV) {
        candidates.extend(std::env::split_paths(&list));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(root).join("include"));
        }
    }
    if let Some(dir) = lib_dir.and_then(Path::parent) {
        candidates.push(dir.join("include"));
    }
    if let Some(list) = std::env::var_os("LD_LIBRARY_PATH") {
        for dir in std::env::split_paths(&list) {
            if let Some(parent) = dir.parent() {
                candidates.push(parent.join("include"));
            }
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let mut out: Vec<PathBuf> = Vec::new();
    for c in candidates {
        if has_headers(&c) && !out.contains(&c) {
            out.push(c);
        }
    }
    // One folder is enough and two different CUDA versions would clash: keep the first.
    out.truncate(1);
    out
}
