//! A C program compiled against `include/pregate.h` with the system C compiler and linked to the
//! shared object under its installed name, `libpregate.so`: the header's declarations, the
//! structs' layout as C sees it and the exported symbols, end to end. Skipped (and said so) when
//! no C compiler is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::{Arguments, Failed, Trial};

fn compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let ok = Command::new(&cc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(cc)
}

/// The cdylib cargo built beside this test (`target/<profile>/deps/`).
fn shared_object() -> Result<PathBuf, Failed> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().ok_or("test binary has no folder")?;
    let so = deps.join("libpregate_adapters.so");
    if so.exists() {
        return Ok(so);
    }
    let up = deps
        .parent()
        .ok_or("no target folder")?
        .join("libpregate_adapters.so");
    up.exists()
        .then_some(up)
        .ok_or_else(|| format!("libpregate_adapters.so not found beside {}", deps.display()).into())
}

fn compile_and_run(cc: &str) -> Result<(), Failed> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir()?;
    std::fs::copy(shared_object()?, tmp.path().join("libpregate.so"))?;
    let exe = tmp.path().join("smoke");
    let out = Command::new(cc)
        .args(["-std=c99", "-Wall", "-Werror", "-I"])
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/smoke.c"))
        .arg("-L")
        .arg(tmp.path())
        .arg(format!("-Wl,-rpath,{}", tmp.path().display()))
        .args(["-lpregate", "-lm", "-o"])
        .arg(&exe)
        .output()?;
    if !out.status.success() {
        return Err(format!("{cc} failed:\n{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let run = Command::new(&exe).output()?;
    if !run.status.success() {
        return Err(format!(
            "the C program failed ({}):\n{}{}",
            run.status,
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        )
        .into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let cc = compiler();
    if cc.is_none() {
        eprintln!("no C compiler (cc, or $CC): the C program test is skipped");
    }
    let trial = Trial::test(
        "c_program_uses_the_header_and_the_shared_object",
        move || compile_and_run(cc.as_deref().unwrap_or("cc")),
    )
    .with_ignored_flag(compiler().is_none());
    libtest_mimic::run(&args, vec![trial]).exit_code()
}
