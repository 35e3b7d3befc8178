//! Link-time settings for libtorch.
//!
//! * rpath to the libtorch `tch` was built against, so binaries run without `LD_LIBRARY_PATH`
//!   (the container image also sets it, for a relocated libtorch).
//! * `libtorch_cuda` is linked with `--no-as-needed`: nothing in our code references its symbols
//!   directly, so the linker would otherwise drop it and CUDA would be invisible at run time.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "linux" {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
