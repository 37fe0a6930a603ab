//! Compiles the policy into the worker at build time: read, validate and prepare `policy.json`
//! (or the file named by `GATEWAY_POLICY`) with the same code as `policy check`, and embed the
//! prepared form. An invalid policy fails the build with exactly what `policy check` prints,
//! so no worker with a policy its operator did not mean can be built, let alone deployed.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=GATEWAY_POLICY");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let source = std::env::var_os("GATEWAY_POLICY")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("policy.json"));
    println!("cargo:rerun-if-changed={}", source.display());
    let shown = std::env::var("GATEWAY_POLICY").unwrap_or_else(|_| "policy.json".to_owned());
    let text = match std::fs::read_to_string(&source) {
        Ok(text) => text,
        Err(e) => {
            eprintln!(
                "policy: cannot read {}: {e} (set GATEWAY_POLICY to a readable file)",
                source.display()
            );
            std::process::exit(1);
        }
    };
    let prepared = match aeg_core::policy::compile(&text) {
        Ok(prepared) => prepared,
        Err(errors) => {
            eprint!("{}", aeg_core::policy::report(&shown, &errors));
            eprintln!("The worker is not built from an invalid policy: fix these and build again (`policy check {shown}` prints the same).");
            std::process::exit(1);
        }
    };
    let bytes = match prepared.to_bytes() {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("policy: cannot serialise the compiled policy: {e}");
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("prepared.bin");
    if let Err(e) = std::fs::write(&out, bytes) {
        eprintln!("policy: cannot write {}: {e}", out.display());
        std::process::exit(1);
    }
}
