//! `cargo xtask setup`: the machine-level things the tests and the demo use
//! (Debian packages, CrowdSec installed offline, and the MTAs the end-to-end
//! tests run). Idempotent and quick when all is there; `test`, `demo` and
//! `bench` run it first, so a fresh machine needs nothing but the README's
//! commands.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

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
        if dpkg_status("crowdsec")? != Status::Installed {
            eprintln!("xtask: missing crowdsec (as root: cargo xtask setup installs it offline)");
        }
        return Ok(());
    }
    crowdsec()?;
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
    setup(root)?;
    firewall_bouncer()
}

/// CrowdSec's Local API for the fleet tests (tests/src/crowdsec.rs runs a
/// private one per test in a namespace; the system's service is never used).
/// Debian's `crowdsec` postinst registers with the central API unless
/// /etc/crowdsec/online_api_credentials.yaml has content, and fails without
/// the internet: write a comment there first. A package left unconfigured
/// (by a failed postinst) is configured again.
fn crowdsec() -> Result<()> {
    let before = dpkg_status("crowdsec")?;
    if before == Status::Installed {
        return Ok(());
    }
    offline_credentials()?;
    match before {
        Status::Unconfigured => {
            eprintln!("xtask: configuring crowdsec (left unconfigured)");
            run(Command::new("dpkg")
                .args(["--configure", "-a"])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
        _ => {
            eprintln!("xtask: installing crowdsec (offline: no central API)");
            apt_install_one("crowdsec")?;
        }
    }
    let after = dpkg_status("crowdsec")?;
    if after != Status::Installed {
        bail!("crowdsec is still not installed ({after:?}): see dpkg's output above");
    }
    stop_system_service("crowdsec.service");
    Ok(())
}

/// `apt-get install` of one package, after refreshing the lists.
fn apt_install_one(package: &str) -> Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `crowdsec-firewall-bouncer`, the stock nftables bouncer the benchmark
/// compares with, after `crowdsec`: its postinst then registers it with
/// `cscli bouncers add` straight into the local database (no network, no
/// running LAPI; checked with 0.0.25-4~deb12u1). Without systemd nothing
/// starts; the benchmark runs its own, against a private LAPI.
fn firewall_bouncer() -> Result<()> {
    if !is_root() || dpkg_status("crowdsec-firewall-bouncer")? == Status::Installed {
        return Ok(());
    }
    eprintln!("xtask: installing crowdsec-firewall-bouncer");
    apt_install_one("crowdsec-firewall-bouncer")?;
    stop_system_service("crowdsec-firewall-bouncer.service");
    Ok(())
}

/// A comment line in /etc/crowdsec/online_api_credentials.yaml, unless it
/// has content already (real credentials are left alone).
fn offline_credentials() -> Result<()> {
    let path = Path::new("/etc/crowdsec/online_api_credentials.yaml");
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    std::fs::create_dir_all("/etc/crowdsec").context("creating /etc/crowdsec")?;
    std::fs::write(
        path,
        "# offline: no central API (written by spamdelay's cargo xtask setup)\n",
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// Under systemd the postinst starts (and enables) the package's service:
/// stop and disable it, the tests run their own. Nothing without systemd.
fn stop_system_service(unit: &str) {
    if !Path::new("/run/systemd/system").exists() {
        return;
    }
    if run(Command::new("systemctl").args(["disable", "--now", unit])).is_err() {
        eprintln!("xtask: warning: could not stop {unit}; the tests do not use it");
    }
}

/// What dpkg knows of a package.
#[derive(Debug, PartialEq, Eq)]
enum Status {
    Installed,
    /// Unpacked, or its postinst failed: `dpkg --configure -a` finishes it.
    Unconfigured,
    /// Unknown, removed, or half installed: apt-get installs it.
    Missing,
}

fn dpkg_status(package: &str) -> Result<Status> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("running dpkg-query")?;
    // An unknown package: exit 1, "no packages found matching".
    let status = String::from_utf8_lossy(&out.stdout);
    Ok(match status.split_whitespace().last() {
        Some("installed") => Status::Installed,
        Some("unpacked" | "half-configured" | "triggers-awaited" | "triggers-pending") => {
            Status::Unconfigured
        }
        _ => Status::Missing,
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Installs the missing packages as root; false when not root (and then
/// only says what is missing).
fn install(packages: &[(&str, &str)]) -> Result<bool> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if !is_root() {
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
