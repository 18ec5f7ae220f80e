//! Device selection: `auto`, `cpu`, `cuda` or `cuda:N`, resolved in one place and logged once.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::model::{DSelectKind, ModelDir};

use super::cpu::CpuBackend;
use super::options::EngineOptions;
use super::Engine;
use crate::cuda::{open_cuda_engine, CudaOptions};
use crate::router::{HostReadMeRouter, InModelRouter, ReadMeRouter, Router, StaticGateRouter};

/// A device a model can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA if a driver and a device are present, else the CPU.
    #[default]
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "unknown device `{s}` (expected auto, cpu, cuda or cuda:N)"
                    ))
                }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// The concrete device `self` stands for on this machine: `auto` is `cuda:0` when a CUDA
    /// driver and a device are present, else `cpu` (the choice is logged once to stderr); `cuda:N`
    /// is an error naming the reason when that device is unavailable. Probing never panics.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Device::Cpu => Ok(Device::Cpu),
            Device::Auto => {
                let (dev, why) = match pregate_kernels::device_count() {
                    Ok(n) if n > 0 => (Device::Cuda(0), format!("{n} CUDA device(s) found")),
                    Ok(_) => (Device::Cpu, "the CUDA driver reports no device".to_string()),
                    Err(e) => (Device::Cpu, format!("no CUDA: {e}")),
                };
                log_once(&format!("pregate: device auto -> {dev} ({why})"));
                Ok(dev)
            }
            Device::Cuda(n) => match pregate_kernels::device_count() {
                Ok(count) if n < count => Ok(Device::Cuda(n)),
                Ok(count) => Err(Error::Device(format!(
                    "cuda:{n} requested, but {count} CUDA device(s) are present"
                ))),
                Err(e) => Err(Error::Device(format!("cuda:{n} requested, but {e}"))),
            },
        }
    }
}

/// Prints `msg` to stderr the first time only.
fn log_once(msg: &str) {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| eprintln!("{msg}"));
}

fn open_cpu(model: &ModelDir, opts: &EngineOptions) -> Result<Engine> {
    let (mut backbone, router) = model.load_backbone()?;
    let cfg = &model.config;
    let router: Box<dyn Router> = match (router, cfg.dselect_gate()) {
        (Some(r), _) => Box::new(HostReadMeRouter::new(ReadMeRouter::new(r, cfg))),
        // The static gates leave the layers: the backbone then runs on the router's routes.
        (None, Some(DSelectKind::Static)) => {
            let gates = backbone
                .layers
                .iter_mut()
                .map(|l| l.extra.dselect.take())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::Internal("a static DSelect-k model with a layer without its gate".into())
                })?;
            Box::new(StaticGateRouter::per_layer(
                &gates,
                cfg.num_experts(),
                cfg.experts_per_token(),
            )?)
        }
        (None, _) => Box::new(InModelRouter::new(
            cfg.num_experts(),
            cfg.experts_per_token(),
        )),
    };
    let mut backend = CpuBackend::new(model.config.clone(), backbone)?;
    if let Some(c) = opts.expert_cache {
        backend = backend.with_expert_cache(c.capacity, c.policy)?;
    }
    let backend = backend.with_speculation(opts.speculate, opts.speculation())?;
    Ok(Engine::new(Box::new(backend), router))
}

/// Loads the model in `dir` onto `device` with the backend's default options and returns an
/// engine ready for requests. With `auto`, a CUDA
/// backend that fails to start (driver too old, a kernel NVRTC rejects, too little memory) falls
/// back to the CPU with the reason logged; an explicit `cuda:N` reports the error instead.
pub fn open_engine(model: &ModelDir, device: Device) -> Result<Engine> {
    open_engine_with(model, device, &EngineOptions::default())
}

/// [`open_engine`] with options (the expert cache, the CUDA dtype).
pub fn open_engine_with(model: &ModelDir, device: Device, opts: &EngineOptions) -> Result<Engine> {
    match device.resolve()? {
        Device::Cpu | Device::Auto => open_cpu(model, opts),
        Device::Cuda(_) if model.config.dselect_gate().is_some() => {
            let why = "DSelect-k gates (pregate_gate) are served by the CPU backend only";
            match device {
                Device::Auto => {
                    eprintln!("pregate: {why}; using the CPU");
                    open_cpu(model, opts)
                }
                _ => Err(Error::Device(why.into())),
            }
        }
        Device::Cuda(n) => {
            let opened = open_cuda_engine(model, &CudaOptions::from_engine_options(n, opts));
            match opened {
                Ok((engine, _stats)) => Ok(engine),
                Err(e) if device == Device::Auto => {
                    eprintln!("pregate: cuda:{n} failed to start ({e}); falling back to the CPU");
                    open_cpu(model, opts)
                }
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        let err = "tpu".parse::<Device>().unwrap_err().to_string();
        assert!(err.contains("tpu"));
        assert!("cuda:x".parse::<Device>().is_err());
    }
}
