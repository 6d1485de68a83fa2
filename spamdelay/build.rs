//! Embeds the kernel object built by `cargo xtask build-ebpf`.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let object = env::var_os("SPAMDELAY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../target/ebpf/bpfel-unknown-none/release/spamdelay-ebpf")
        });
    println!("cargo::rerun-if-env-changed=SPAMDELAY_EBPF_OBJECT");
    println!("cargo::rerun-if-changed={}", object.display());
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("spamdelay.bpf.o");
    if let Err(e) = fs::copy(&object, &out) {
        println!(
            "cargo::error=the kernel object {} is missing ({e}): run `cargo xtask build-ebpf` first (or `cargo xtask build`)",
            object.display()
        );
    }
}
