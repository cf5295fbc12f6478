//! Records the target triple for `dlsm version`.
fn main() {
    println!(
        "cargo:rustc-env=DLSM_TARGET={}",
        std::env::var("TARGET").unwrap_or_else(|_| "unknown".into())
    );
    println!("cargo:rerun-if-changed=build.rs");
}
