//! Gives the shared object the soname it is installed under (`libpregate.so`), so that programs
//! linked against it look for that name.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpregate.so");
    println!("cargo:rerun-if-changed=build.rs");
}
