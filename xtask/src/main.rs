//! Developer workflows: `cargo xtask build-ebpf | build | run | test | lint | setup | demo | bench | fuzz | deb`.
//! The kernel object needs nightly, rust-src and bpf-linker; this installs them
//! when they are missing so a fresh machine needs nothing but rustup.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod deb;
mod fuzz;
mod setup;

/// The bpf-linker that works with the nightly toolchain's own LLVM here.
const BPF_LINKER: &str = "bpf-linker@0.10.3";

#[derive(Parser)]
#[command(about = "spamdelay developer workflows")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel object (nightly, -Z build-std=core, BTF).
    BuildEbpf {
        /// Fail instead of installing rust-src or bpf-linker when missing.
        #[arg(long)]
        no_install: bool,
    },
    /// Build the kernel object and all userspace crates.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build everything and run the daemon: `cargo xtask run -- run --iface eth0`.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build everything and run every test, unit and privileged.
    Test {
        /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// cargo fmt --check and clippy -D warnings on the userspace crates.
    Lint,
    /// Install what the tests and the demo use (Debian packages, the MTAs);
    /// `test` and `demo` run it first.
    Setup,
    /// A throwaway namespace lab: a pausing SMTP server, a patient client and
    /// a blind sender, with the daemon attached and its verdicts shown.
    Demo,
    /// Build everything in release mode and benchmark it in a namespace lab:
    /// a markdown table on stdout, JSON in target/bench/.
    Bench {
        /// Fewer rounds and clients (about a minute instead of 10).
        #[arg(long)]
        quick: bool,
    },
    /// Run the cargo-fuzz targets (fuzz/) for a bounded time each, with the
    /// nightly toolchain; installs cargo-fuzz when missing. Not part of `test`.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        time: u64,
        /// Targets to run (default: all of them).
        targets: Vec<String>,
    },
    /// Build the Debian package, target/debian/spamdelay_VERSION_amd64.deb
    /// (release build, man pages, completions; installs cargo-deb when missing).
    Deb,
}

fn main() -> std::process::ExitCode {
    match xtask(Cli::parse().cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn xtask(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::BuildEbpf { no_install } => build_ebpf(!no_install),
        Cmd::Build { release } => build(release),
        Cmd::Run { release, args } => {
            build(release)?;
            let bin = target_dir().join(profile(release)).join("spamdelay");
            run(Command::new(bin).args(args))
        }
        Cmd::Setup => setup::setup(&workspace_root()),
        Cmd::Test { args } => {
            setup::setup(&workspace_root())?;
            build(false)?;
            run(cargo()
                .args(["test", "--no-fail-fast"])
                .args(args)
                .env("SPAMDELAY_BIN", target_dir().join("debug/spamdelay")))
        }
        Cmd::Lint => {
            build_ebpf(true)?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // xtask-docs builds only with its feature (see xtask/Cargo.toml).
            run(cargo()
                .args([
                    "clippy",
                    "-p",
                    "xtask",
                    "--features",
                    "docs",
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"]))
        }
        Cmd::Demo => {
            setup::setup(&workspace_root())?;
            build(false)?;
            run(cargo()
                .args([
                    "run",
                    "--quiet",
                    "-p",
                    "spamdelay-tests",
                    "--bin",
                    "spamdelay-demo",
                ])
                .env("SPAMDELAY_BIN", target_dir().join("debug/spamdelay")))
        }
        Cmd::Bench { quick } => {
            setup::setup_bench(&workspace_root())?;
            // Release throughout: the kernel object always is, and a debug
            // daemon would measure the wrong thing.
            build(true)?;
            let mut cmd = cargo();
            cmd.args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "spamdelay-tests",
                "--bin",
                "spamdelay-bench",
                "--",
            ]);
            if quick {
                cmd.arg("--quick");
            }
            run(cmd
                .env("SPAMDELAY_BIN", target_dir().join("release/spamdelay"))
                .env("SPAMDELAY_BENCH_DIR", target_dir().join("bench")))
        }
        Cmd::Fuzz { time, targets } => {
            // The spamdelay crate embeds the kernel object.
            build_ebpf(true)?;
            fuzz::fuzz(&workspace_root(), time, &targets)
        }
        Cmd::Deb => deb::deb(),
    }
}

fn profile(release: bool) -> &'static str {
    if release { "release" } else { "debug" }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed ({status})", cmd.get_program());
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    build_ebpf(true)?;
    let mut cmd = cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn build_ebpf(install: bool) -> Result<()> {
    ensure_rust_src(install)?;
    ensure_bpf_linker(install)?;
    let root = workspace_root();
    let mut cmd = nightly_cargo(&root.join("spamdelay-ebpf"));
    cmd.args(["build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    run(&mut cmd).context("building the kernel object (spamdelay-ebpf)")
}

/// `cargo` of the nightly toolchain, run in `dir`.
fn nightly_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    // The outer cargo's toolchain choice must not leak into the nightly build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(dir).args(["run", "nightly", "cargo"]);
    cmd
}

fn ensure_rust_src(install: bool) -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup: install rustup and the nightly toolchain (rustup toolchain install nightly)")?;
    if !out.status.success() {
        bail!("no nightly toolchain: run `rustup toolchain install nightly`");
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    if !install {
        bail!("rust-src is missing: run `rustup component add rust-src --toolchain nightly`");
    }
    eprintln!("xtask: installing rust-src for nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker(install: bool) -> Result<()> {
    if Command::new("bpf-linker").arg("--version").output().is_ok() {
        return Ok(());
    }
    if !install {
        bail!("bpf-linker is missing: run `cargo install {BPF_LINKER} --locked`");
    }
    eprintln!("xtask: installing {BPF_LINKER} (about a minute)");
    run(Command::new("cargo").args(["install", BPF_LINKER, "--locked"]))
}
