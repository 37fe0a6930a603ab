//! Bundles the policy into the worker at build time: edit `policy.json`, rebuild, redeploy.
//! `GATEWAY_POLICY=path/to/other.json` bundles another file (the local stack and the
//! end-to-end tests use this). The file is copied as it is; an invalid policy still builds, and
//! the worker then refuses every request with a 500 that says so. Check it before deploying
//! with `policy check`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=GATEWAY_POLICY");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let source = std::env::var_os("GATEWAY_POLICY")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("policy.json"));
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("policy.json");
    if let Err(e) = std::fs::copy(&source, &out) {
        panic!(
            "cannot bundle the policy {}: {e} (set GATEWAY_POLICY to a readable file)",
            source.display()
        );
    }
}
