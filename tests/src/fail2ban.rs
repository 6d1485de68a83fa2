//! fail2ban run for real in a lab's server namespace, for side-by-side
//! comparisons: Debian's stock configuration copied into a private directory,
//! one jail on a Postfix log, its bans in the namespace's own nftables.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::lab::Netns;

const SERVER: &str = "/usr/bin/fail2ban-server";
const CLIENT: &str = "/usr/bin/fail2ban-client";
/// Debian's configuration, copied so the stock filters and actions are used
/// exactly as shipped.
const STOCK: &str = "/etc/fail2ban";
/// The jail name; the stock nftables action names its sets after it.
pub const JAIL: &str = "postfix";
/// The table the stock nftables action bans into.
pub const TABLE: &str = "f2b-table";
/// Its set for IPv6 clients (`addr6-set-<jail>`; IPv4: `addr-set-<jail>`).
pub const SET_V6: &str = "addr6-set-postfix";

/// True when fail2ban and its inotify backend are installed
/// (`apt-get install fail2ban python3-pyinotify`).
pub fn installed() -> bool {
    Path::new(SERVER).is_file()
        && Path::new(CLIENT).is_file()
        && Command::new("/usr/bin/python3")
            .args(["-c", "import pyinotify"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A fail2ban server with one jail, `postfix`: Debian's stock `postfix`
/// filter in `aggressive` mode (the only modes that match postscreen's
/// `PREGREET` lines are `ddos` and `aggressive`), `maxretry = 1`, the
/// `pyinotify` backend following `log`, and the stock `nftables-multiport`
/// action on port 25. Stopped on drop.
pub struct Fail2ban {
    child: Child,
    dir: tempfile::TempDir,
}

impl Fail2ban {
    /// Starts `fail2ban-server` in `ns` (its nft commands must change that
    /// namespace's ruleset) and waits until the jail runs.
    pub fn start_postfix_jail(ns: &Netns, log: &Path) -> Result<Fail2ban> {
        let dir = tempfile::Builder::new()
            .prefix("spamdelay-fail2ban-")
            .tempdir()
            .context("creating fail2ban's private directory")?;
        let etc = dir.path().join("etc");
        let out = Command::new("cp")
            .args(["-R", STOCK])
            .arg(&etc)
            .output()
            .context("running cp")?;
        if !out.status.success() {
            bail!(
                "copying {STOCK}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Debian's jail.d enables sshd, which fails without an auth.log.
        let jail_d = etc.join("jail.d");
        if jail_d.is_dir() {
            fs::remove_dir_all(&jail_d)
                .with_context(|| format!("emptying {}", jail_d.display()))?;
        }
        fs::create_dir(&jail_d).with_context(|| format!("creating {}", jail_d.display()))?;
        let root = dir.path().display();
        let files = [
            (
                "fail2ban.local",
                format!(
                    "[Definition]\nloglevel = INFO\nlogtarget = {root}/fail2ban.log\n\
                     socket = {root}/fail2ban.sock\npidfile = {root}/fail2ban.pid\n\
                     dbfile = :memory:\n"
                ),
            ),
            ("jail.local", jail_local(log)),
        ];
        for (name, text) in files {
            let path = etc.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let child = ns
            .command(SERVER)
            .arg("-c")
            .arg(&etc)
            .arg("-s")
            .arg(dir.path().join("fail2ban.sock"))
            .arg("-p")
            .arg(dir.path().join("fail2ban.pid"))
            // -x: start even if a stale socket is there; -f: stay in the
            // foreground, so the child is the server and can be waited on.
            .args(["-x", "-f", "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {SERVER}"))?;
        let mut f2b = Fail2ban { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if f2b.client(&["status", JAIL]).is_ok() {
                return Ok(f2b);
            }
            if let Some(status) = f2b.child.try_wait()? {
                bail!(
                    "fail2ban-server exited ({status}) before its jail ran; its log:\n{}",
                    f2b.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "fail2ban's jail {JAIL} did not start within 30 s; its log:\n{}",
                    f2b.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// fail2ban's own log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("fail2ban.log")).unwrap_or_default()
    }

    /// `fail2ban-client ARGS` against this server; its stdout.
    pub fn client(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(CLIENT)
            .arg("-c")
            .arg(self.dir.path().join("etc"))
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .with_context(|| format!("running {CLIENT}"))?;
        if !out.status.success() {
            bail!(
                "fail2ban-client {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("fail2ban.sock")
    }

    /// `fail2ban-client stop` (the action's `actionstop` removes its sets),
    /// then waits for the server; killed if it lingers.
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let asked = self.client(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return asked.map(drop);
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("fail2ban-server outlived `fail2ban-client stop` by 10 s; killed")
    }
}

impl Drop for Fail2ban {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping fail2ban ({}): {e:#}", self.dir.path().display());
        }
    }
}

/// The jail: Debian's `[postfix]` section overridden where the comparison
/// needs it. jail.conf's `[postfix]` sets its own `backend` and `logpath`,
/// so those go in the section, not in `[DEFAULT]`.
fn jail_local(log: &Path) -> String {
    format!(
        "\
[DEFAULT]
banaction = nftables-multiport
banaction_allports = nftables-allports
ignoreip = 127.0.0.1/8 ::1

[{JAIL}]
enabled = true
mode = aggressive
filter = postfix[mode=aggressive]
port = 25
protocol = tcp
logpath = {}
backend = pyinotify
maxretry = 1
findtime = 10m
bantime = 1h
",
        log.display()
    )
}
