//! `cargo xtask deb`: the Debian package, target/debian/spamdelay_VERSION_amd64.deb.
//! Release build, then man pages and completions, then cargo-deb packs what
//! `[package.metadata.deb]` in spamdelay/Cargo.toml lists.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{build, cargo, run, target_dir, workspace_root};

/// Installed when `cargo deb` is missing or older than 3.
const CARGO_DEB: &str = "cargo-deb@3.8.0";

/// Where the generated assets go: under `target/release/`, the prefix
/// cargo-deb maps to the real target directory (`CARGO_TARGET_DIR` too).
const ASSETS: &str = "release/deb-assets";

pub fn deb() -> Result<()> {
    let root = workspace_root();
    check_changelog(&root)?;
    ensure_cargo_deb()?;
    build(true)?;
    // A binary of its own, behind a feature: see xtask/Cargo.toml.
    run(cargo()
        .args(["run", "--quiet", "-p", "xtask", "--features", "docs"])
        .args(["--bin", "xtask-docs", "--"])
        .arg(target_dir().join(ASSETS)))
    .context("generating the man pages and completions")?;
    let out = target_dir().join("debian");
    remove_old_packages(&out)?;
    run(cargo().args(["deb", "-p", "spamdelay", "--no-build"]))
        .context("packing the .deb (cargo deb)")?;
    for deb in packages(&out) {
        eprintln!("xtask: built {}: install it with dpkg -i", deb.display());
    }
    Ok(())
}

/// The changelog's newest entry must be this version's, or dpkg and lintian
/// show a package whose history stops before it.
fn check_changelog(root: &Path) -> Result<()> {
    let path = root.join("dist/debian/changelog");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let version = env!("CARGO_PKG_VERSION");
    let head = text.lines().next().unwrap_or_default();
    if !head.starts_with(&format!("spamdelay ({version}-")) {
        bail!(
            "{} starts with `{head}`, not an entry for {version}: add one on top (dch -v {version}-1)",
            path.display()
        );
    }
    Ok(())
}

/// Earlier versions' packages go, so `target/debian/spamdelay_*.deb` is this one.
fn remove_old_packages(dir: &Path) -> Result<()> {
    for deb in packages(dir) {
        std::fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    }
    Ok(())
}

fn packages(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("spamdelay_") && n.ends_with(".deb"))
        })
        .collect()
}

fn ensure_cargo_deb() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    // `cargo-deb 3.8.0`
    let major = installed
        .as_deref()
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    if major.is_some_and(|m| m >= 3) {
        return Ok(());
    }
    eprintln!("xtask: installing {CARGO_DEB} (a minute or two)");
    run(Command::new("cargo").args(["install", CARGO_DEB, "--locked"]))
}
