//! CI check without a GPU: every kernel source compiles with NVRTC for sm_80, sm_89 and sm_90.
//!
//! Needs NVRTC (`PREGATE_NVRTC_LIB` or `LD_LIBRARY_PATH`, see `pregate_kernels::nvrtc`); without it
//! the tests are reported as ignored, unless `PREGATE_REQUIRE_NVRTC=1` (what `ci-nvrtc.sh` sets),
//! which makes them fail.

use std::process::ExitCode;

use libtest_mimic::{Arguments, Failed, Trial};
use pregate_kernels::{Nvrtc, SOURCES};

const ARCHS: [&str; 3] = ["sm_80", "sm_89", "sm_90"];

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let required = std::env::var("PREGATE_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let missing = match Nvrtc::load() {
        Err(e) if !required => Some(e.to_string()),
        _ => None,
    };
    let trials: Vec<Trial> = [
        Trial::test("nvrtc_compiles_all", nvrtc_compiles_all),
        Trial::test(
            "a_compile_error_carries_nvrtc_log",
            a_compile_error_carries_nvrtc_log,
        ),
    ]
    .into_iter()
    .map(|t| t.with_ignored_flag(missing.is_some()))
    .collect();
    if let Some(why) = &missing {
        if !args.list {
            eprintln!(
                "NVRTC not available: {} tests skipped ({why})",
                trials.len()
            );
        }
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// NVRTC; an error (a failed test) when it cannot be loaded, which the harness only runs into
/// with `PREGATE_REQUIRE_NVRTC=1`.
fn nvrtc() -> Result<Nvrtc, Failed> {
    Nvrtc::load()
        .map_err(|e| format!("PREGATE_REQUIRE_NVRTC=1 but NVRTC cannot be loaded: {e}").into())
}

fn nvrtc_compiles_all() -> Result<(), Failed> {
    let nvrtc = nvrtc()?;
    println!(
        "NVRTC {}.{}, include dirs {:?}",
        nvrtc.version().0,
        nvrtc.version().1,
        nvrtc.include_dirs()
    );
    let mut failures = Vec::new();
    for arch in ARCHS {
        for src in SOURCES {
            let t = std::time::Instant::now();
            match nvrtc.compile(src.name, &src.full_source(), arch) {
                Ok(cubin) => println!(
                    "ok   {arch} {:<12} {:>8} bytes {:>6.2} s",
                    src.name,
                    cubin.len(),
                    t.elapsed().as_secs_f64()
                ),
                Err(e) => {
                    println!("FAIL {arch} {}: {e}", src.name);
                    failures.push(format!("{arch} {}", src.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "NVRTC failed on: {failures:?}");
    Ok(())
}

fn a_compile_error_carries_nvrtc_log() -> Result<(), Failed> {
    let nvrtc = nvrtc()?;
    let err = nvrtc
        .compile(
            "broken",
            "extern \"C\" __global__ void k() { undefined_thing(); }",
            "sm_80",
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("broken") && msg.contains("undefined_thing"),
        "{msg}"
    );
    Ok(())
}
