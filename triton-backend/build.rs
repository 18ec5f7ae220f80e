//! Compiles the C++ shim and the cxx bridge. Triton's symbols stay undefined: the shared library is
//! linked without libtritonserver, and they resolve from the server that loads it.

fn main() {
    cxx_build::bridge("src/bridge.rs")
        .file("shim/shim.cc")
        .include("include")
        .std("c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .compile("pregate_triton_shim");
    for f in [
        "src/bridge.rs",
        "shim/shim.cc",
        "shim/shim.h",
        "include/pregate_triton_api.h",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
}
