//! The real `spamdelay` binary run as a child inside a lab namespace, with its
//! log lines collected for assertions. Killed on drop if still running.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Watched, lab::Netns};

/// The daemon binary: `SPAMDELAY_BIN` (set by `cargo xtask test`) or the
/// workspace's debug build.
pub fn binary() -> PathBuf {
    std::env::var_os("SPAMDELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/spamdelay")
        })
}

/// The tests' own BPF filesystem, in the host's mount namespace. `ip netns
/// exec` gives every daemon a fresh /sys, so a bpffs the daemon mounted on
/// /sys/fs/bpf there would die with it; pins here outlive a daemon, as
/// /sys/fs/bpf's do on a real host.
pub const PIN_ROOT: &str = "/run/spamdelay-tests-bpf";

/// Mounts the tests' BPF filesystem on `PIN_ROOT` unless it is there.
pub fn pin_root() -> Result<PathBuf> {
    let root = PathBuf::from(PIN_ROOT);
    std::fs::create_dir_all(&root).context("creating the pin root")?;
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", PIN_ROOT])
        .output()
        .context("stat -f")?;
    if String::from_utf8_lossy(&fs.stdout).trim() != "bpf_fs" {
        let ok = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", PIN_ROOT])
            .status()
            .context("mount -t bpf")?;
        if !ok.success() {
            bail!("mounting a BPF filesystem on {PIN_ROOT}");
        }
    }
    Ok(root)
}

/// The `--pin-dir` of the daemons that share the state directory `state`
/// (a restart adopts what the one before left).
pub fn pin_dir_for(state: &Path) -> PathBuf {
    // bpffs refuses names with a dot: `.tmpXXXX` pins as `tmpXXXX`.
    let name = state
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("state");
    Path::new(PIN_ROOT).join(name.trim_start_matches('.'))
}

/// Detaches what daemons of finished tests left pinned (a test that panicked,
/// or kept a clone of the state to the end): their state directory is gone.
fn collect_stale_pins(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let tmp = std::env::temp_dir();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("tmp")) else {
            continue;
        };
        if !tmp.join(format!(".{name}")).exists() {
            let _ = spamdelay::loader::detach(&entry.path());
        }
    }
}

pub struct Daemon {
    child: Child,
    log: Arc<Watched<Vec<String>>>,
    /// The daemon's private `--state-dir`.
    state: Arc<tempfile::TempDir>,
}

impl Daemon {
    /// Starts `spamdelay run ARGS` in `ns` with a state directory of its own
    /// and waits until it watches.
    pub fn start(ns: &Netns, args: &[&str]) -> Result<Self> {
        let state = Arc::new(tempfile::tempdir().context("creating a state directory")?);
        Self::start_with_state(ns, args, state)
    }

    /// Starts `spamdelay run ARGS` on an existing state directory (a restart).
    pub fn start_with_state(
        ns: &Netns,
        args: &[&str],
        state: Arc<tempfile::TempDir>,
    ) -> Result<Self> {
        Self::spawn(ns, args, state, &[])
    }

    /// Starts `spamdelay run ARGS` with extra environment variables.
    pub fn start_with_env(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let state = Arc::new(tempfile::tempdir().context("creating a state directory")?);
        Self::spawn(ns, args, state, env)
    }

    fn spawn(
        ns: &Netns,
        args: &[&str],
        state: Arc<tempfile::TempDir>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let root = pin_root()?;
        collect_stale_pins(&root);
        let mut child = ns
            .command(binary())
            .envs(env.iter().copied())
            .arg("--state-dir")
            .arg(state.path())
            .arg("run")
            // The bridge block answers an offender's next connections for
            // its first seconds in place of nft: tests of nft's enforcement
            // would see drops where they look for resets. Off unless a test
            // asks for it (tests/tests/bridge.rs); a later flag wins.
            .args(["--bridge-time", "0"])
            // The lab's clients, server and floods all share 2001:db8::/64
            // (which, holding the server, is never aggregated anyway).
            // Off unless a test asks for it; a later flag wins.
            .args(["--ipv6-aggregate", "0"])
            .arg("--pin-dir")
            .arg(pin_dir_for(state.path()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary().display()))?;
        let log: Arc<Watched<Vec<String>>> = Arc::default();
        let sink = log.clone();
        crate::read_lines(&mut child, move |line, _| {
            sink.update(|lines| lines.push(line))
        });
        let mut d = Daemon { child, log, state };
        if d.wait_for(|l| l.starts_with("watching port"), Duration::from_secs(30))
            .is_none()
        {
            let status = d.child.try_wait().ok().flatten();
            bail!("spamdelay did not start (exit {status:?}): {:?}", d.lines());
        }
        Ok(d)
    }

    /// The daemon's process id: `ip netns exec` execs the daemon, so the
    /// child is the daemon itself (for /proc/PID/status and stat).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn state(&self) -> Arc<tempfile::TempDir> {
        self.state.clone()
    }

    /// Runs an admin command (`list`, `ban`, ...) against this daemon's state,
    /// in `ns`; returns (success, stdout, stderr).
    pub fn admin(&self, ns: &Netns, args: &[&str]) -> Result<(bool, String, String)> {
        let out = ns
            .command(binary())
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .output()
            .context("running spamdelay")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// SIGKILL: no clean shutdown at all.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.read(Vec::clone)
    }

    /// Waits up to `timeout` for a log line matching `pred`.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        self.log
            .wait_for(timeout, |lines| lines.iter().find(|l| pred(l)).cloned())
    }

    /// Waits for the verdict line about `client` (`WORD ... from [ip]:port`).
    pub fn verdict_for(&self, client: SocketAddr, timeout: Duration) -> Option<String> {
        let tag = format!("from [{}]:{} ", client.ip(), client.port());
        self.wait_for(|l| l.contains(&tag), timeout)
    }

    /// Every verdict line about `client`'s address, any port.
    pub fn verdicts_for_ip(&self, ip: std::net::IpAddr) -> Vec<String> {
        let tag = format!("from [{ip}]:");
        self.lines()
            .into_iter()
            .filter(|l| l.contains(&tag))
            .collect()
    }

    /// SIGTERM, then the exit status and the whole log.
    pub fn stop(self) -> Result<(ExitStatus, Vec<String>)> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the pipe readers catch up with the last lines.
                thread::sleep(Duration::from_millis(100));
                return Ok((status, self.lines()));
            }
            if Instant::now() > deadline {
                bail!("spamdelay still ran after {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The last daemon of its state: what it pinned goes too (as
        // `spamdelay detach`). A test that keeps the state may restart it.
        if Arc::strong_count(&self.state) == 1 {
            let _ = spamdelay::loader::detach(&pin_dir_for(self.state.path()));
        }
    }
}

/// The value of counter `name` in the daemon's `stopping:` line.
pub fn counter(lines: &[String], name: &str) -> Option<u64> {
    let line = lines.iter().rev().find(|l| l.starts_with("stopping:"))?;
    counter_in(line, name)
}

/// The value of `name=N` in a line of counters (`stopping:`, or the
/// `kernel:` line of `spamdelay status`).
pub fn counter_in(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Batches the daemon applied: each logs its verdicts, then its `ban` lines,
/// then makes one nft transaction, so every run of `ban` lines is one.
pub fn ban_batches(lines: &[String]) -> usize {
    let mut runs = 0;
    let mut in_run = false;
    for l in lines {
        let ban = l.starts_with("ban [");
        if ban && !in_run {
            runs += 1;
        }
        if ban || l.starts_with("EARLY-TALK") {
            in_run = ban;
        }
    }
    runs
}
