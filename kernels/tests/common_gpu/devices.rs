//! A test harness (libtest-mimic, for `harness = false` test targets) that runs each device test
//! once per device present: `NAME::cpu` for a test with a CPU form, `NAME::cuda:N` for each CUDA
//! device the driver reports. Without a CUDA device the CUDA trials are still listed, as
//! `NAME::cuda`, but ignored, so the test counts show them as skipped rather than passed.
//!
//! Shared by the kernel and the engine tests (`#[path]`-included by the latter), so it depends on
//! nothing but libtest-mimic and `pregate_kernels::device_count`.
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     let mut tests = DeviceTests::new();
//!     register!(tests, cuda: rmsnorm_f32, rmsnorm_bf16);
//!     register!(tests, every: cache_matches_all_resident);
//!     tests.run()
//! }
//! fn rmsnorm_f32(device: &Device) -> Result<(), Failed> { /* assert!, or Err(..) */ Ok(()) }
//! ```
#![allow(dead_code)]

use std::fmt;
use std::process::ExitCode;

pub use libtest_mimic::Failed;
use libtest_mimic::{Arguments, Trial};

/// The device a trial runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The host.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A test body, run once per device it is registered for. A panic fails it too.
pub type DeviceTest = fn(&Device) -> Result<(), Failed>;

/// The devices a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// The CPU only (the test has no device form, or is about the host).
    Cpu,
    /// Each CUDA device (a CUDA kernel or backend against its CPU reference).
    Cuda,
    /// The CPU and each CUDA device (the same body on every backend).
    Every,
}

/// The tests of one test binary.
#[derive(Default)]
pub struct DeviceTests {
    tests: Vec<(String, On, DeviceTest)>,
}

/// `register!(tests, cuda: a, b)` registers the functions `a` and `b` under their own names, on
/// each CUDA device (`cpu:` on the CPU only, `every:` on the CPU and each CUDA device).
macro_rules! register {
    ($tests:expr, $on:ident: $($f:ident),+ $(,)?) => {
        $( $tests.$on(stringify!($f), $f); )+
    };
}
pub(crate) use register;

impl DeviceTests {
    /// No tests yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `test` as `name` on the devices `on`.
    pub fn add(&mut self, name: &str, on: On, test: DeviceTest) -> &mut Self {
        self.tests.push((name.to_string(), on, test));
        self
    }

    /// Registers `test` as `name` on the CPU.
    pub fn cpu(&mut self, name: &str, test: DeviceTest) -> &mut Self {
        self.add(name, On::Cpu, test)
    }

    /// Registers `test` as `name` on each CUDA device.
    pub fn cuda(&mut self, name: &str, test: DeviceTest) -> &mut Self {
        self.add(name, On::Cuda, test)
    }

    /// Registers `test` as `name` on the CPU and on each CUDA device.
    pub fn every(&mut self, name: &str, test: DeviceTest) -> &mut Self {
        self.add(name, On::Every, test)
    }

    /// The trials for `cuda_devices` CUDA devices: with none, one ignored CUDA trial per test.
    fn trials(&self, cuda_devices: usize) -> Vec<Trial> {
        let mut trials = Vec::new();
        for &(ref name, on, test) in &self.tests {
            if on != On::Cuda {
                trials.push(trial(name, Device::Cpu, test));
            }
            if on == On::Cpu {
                continue;
            }
            if cuda_devices == 0 {
                trials
                    .push(Trial::test(format!("{name}::cuda"), || Ok(())).with_ignored_flag(true));
            }
            for n in 0..cuda_devices {
                trials.push(trial(name, Device::Cuda(n), test));
            }
        }
        trials
    }

    /// Parses the command line (the built-in harness's flags: filters, `--exact`, `--list`,
    /// `--ignored`, `--test-threads`, ...), runs the trials and returns the exit status.
    pub fn run(self) -> ExitCode {
        let args = Arguments::from_args();
        let (cuda_devices, why) = match pregate_kernels::device_count() {
            Ok(0) => (0, "the CUDA driver reports no device".to_string()),
            Ok(n) => (n, String::new()),
            Err(e) => (0, e.to_string()),
        };
        let trials = self.trials(cuda_devices);
        if cuda_devices == 0 && !args.list {
            let skipped = trials
                .iter()
                .filter(|t| t.has_ignored_flag() && !args.is_filtered_out(t))
                .count();
            if skipped > 0 {
                eprintln!("no CUDA device: {skipped} GPU tests skipped ({why})");
            }
        }
        libtest_mimic::run(&args, trials).exit_code()
    }
}

fn trial(name: &str, device: Device, test: DeviceTest) -> Trial {
    Trial::test(format!("{name}::{device}"), move || test(&device))
}
