//! `cargo xtask setup`: the machine-level things the tests and the demo use
//! (Debian packages, and the MTAs the end-to-end tests run). Idempotent and
//! quick when all is there; `test`, `demo` and `bench` run it first, so a
//! fresh machine needs nothing but the README's commands.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::run;

/// Debian packages, each with a file that shows it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("nftables", "/usr/sbin/nft"),
    ("iproute2", "/usr/sbin/ip"),
    ("swaks", "/usr/bin/swaks"),
    // swaks speaks IPv6 only with it.
    (
        "libio-socket-inet6-perl",
        "/usr/share/perl5/IO/Socket/INET6.pm",
    ),
    // setpriv, for the no-privilege test.
    ("util-linux", "/usr/bin/setpriv"),
    // prometheus and promtool, for tests/tests/prometheus.rs.
    ("prometheus", "/usr/bin/prometheus"),
];

/// What `cargo xtask bench` uses on top: iperf3, and fail2ban to compare with.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("iperf3", "/usr/bin/iperf3"),
    ("fail2ban", "/usr/bin/fail2ban-server"),
    (
        "python3-pyinotify",
        "/usr/lib/python3/dist-packages/pyinotify.py",
    ),
];

/// Installs what is missing. Without root it only says what is missing: the
/// privileged tests then skip loudly.
pub fn setup(root: &Path) -> Result<()> {
    if !install(PACKAGES)? {
        return Ok(());
    }
    let scripts = root.join("tests/mta");
    let mut installers: Vec<_> = std::fs::read_dir(&scripts)
        .with_context(|| format!("listing {}", scripts.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("install-") && n.ends_with(".sh"))
        })
        .collect();
    installers.sort();
    for script in installers {
        run(Command::new("bash").arg(&script))
            .with_context(|| format!("running {}", script.display()))?;
    }
    Ok(())
}

/// `setup`, plus what the benchmark needs.
pub fn setup_bench(root: &Path) -> Result<()> {
    install(BENCH_PACKAGES)?;
    setup(root)
}

/// Installs the missing packages as root; false when not root (and then
/// only says what is missing).
fn install(packages: &[(&str, &str)]) -> Result<bool> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root {
        if !missing.is_empty() {
            eprintln!(
                "xtask: missing {} (as root: apt-get install {})",
                missing.join(", "),
                missing.join(" ")
            );
        }
        return Ok(false);
    }
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(true)
}
