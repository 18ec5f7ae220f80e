//! Device selection: `auto`, `cpu`, `cuda` or `cuda:N`, resolved in one place and logged once.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::model::ModelDir;

use super::cpu::{BackboneWeights, CpuBackend};
use super::Engine;
use crate::router::ReadMeRouter;

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
    /// The concrete device `self` stands for on this machine.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Device::Cpu => Ok(Device::Cpu),
            Device::Auto => Ok(Device::Cpu),
            Device::Cuda(n) => Err(Error::Device(format!(
                "cuda:{n} requested, but this build has no CUDA backend"
            ))),
        }
    }
}

/// Loads the model in `dir` onto `device` and returns an engine ready for requests.
pub fn open_engine(model: &ModelDir, device: Device) -> Result<Engine> {
    match device.resolve()? {
        Device::Cpu | Device::Auto => {
            let w = model.load_weights()?;
            let router = ReadMeRouter::new(w.router, &model.config);
            let backbone = BackboneWeights {
                embed: w.embed,
                layers: w.layers,
                norm: w.norm,
                lm_head: w.lm_head,
            };
            let backend = CpuBackend::new(model.config.clone(), backbone);
            Ok(Engine::new(Box::new(backend), router))
        }
        Device::Cuda(n) => Err(Error::Device(format!("cuda:{n} is not available"))),
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
