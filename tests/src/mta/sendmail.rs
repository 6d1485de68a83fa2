//! Sendmail 8 for real in a lab's server namespace (unpacked by tests/mta/install-sendmail.sh):
//! a .cf built with m4 and FEATURE(greet_pause), its syslog caught on a private /dev/log.

use std::{
    fs,
    net::{IpAddr, Ipv6Addr},
    os::unix::{fs::PermissionsExt, net::UnixDatagram, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::{
    lab::{Netns, SERVER_V4, SERVER_V6},
    mta::{
        exim::{private_mounts, stop, wait_for_line},
        unpack_dir,
    },
};

/// How long the daemon may take to listen.
const START_WAIT: Duration = Duration::from_secs(10);
/// Its name inside its own UTS namespace: with a dot, so Sendmail never
/// sleeps a minute trying to qualify the machine's short hostname.
const HOSTNAME: &str = "mx.example.test";
/// Device nodes Sendmail uses, bound into the private /dev.
const DEVICES: [&str; 4] = ["null", "zero", "random", "urandom"];

/// The unpacked daemon binary.
pub fn binary() -> PathBuf {
    unpack_dir().join("sendmail/usr/libexec/sendmail/sendmail")
}

/// sendmail-cf's m4 kit (`m4/cf.m4`, `feature/`, `ostype/`, ...).
pub fn cf_dir() -> PathBuf {
    unpack_dir().join("sendmail/usr/share/sendmail/cf")
}

/// The unpacked binary, the m4 kit and m4 itself.
pub fn installed() -> bool {
    binary().is_file()
        && cf_dir().join("m4/cf.m4").is_file()
        && Command::new("m4")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Sendmail's syslog messages, caught as they come.
#[derive(Default)]
struct Syslog {
    lines: Mutex<Vec<String>>,
}

/// A Sendmail daemon listening on 192.0.2.25:25 and [2001:db8::25]:25 in a
/// lab namespace. Killed (with its connection children) on drop.
pub struct Sendmail {
    child: Child,
    cf: PathBuf,
    syslog: Arc<Syslog>,
    dir: TempDir,
}

impl Sendmail {
    /// Builds a .cf with `FEATURE(greet_pause, ms)` and starts Sendmail in
    /// `ns` with it.
    pub fn start(ns: &Netns, greet_pause: Duration) -> Result<Self> {
        let pause_ms = greet_pause.as_millis();
        if pause_ms == 0 {
            bail!("greet_pause of 0 ms turns the pause off");
        }
        let dir = tempfile::Builder::new()
            .prefix("spamdelay-sendmail-")
            .tempdir()
            .context("creating Sendmail's directory")?;
        let path = |name: &str| dir.path().join(name);
        for sub in ["mqueue", "dev"] {
            fs::create_dir(path(sub)).with_context(|| format!("creating {sub}"))?;
        }
        // Sendmail refuses a queue others could write to.
        fs::set_permissions(path("mqueue"), fs::Permissions::from_mode(0o700))
            .context("closing the queue directory")?;
        write(&path("hosts"), &hosts_text())?;
        write(&path("nsswitch.conf"), &nsswitch_text())?;
        write(&path("service.switch"), "hosts files\naliases files\n")?;
        write(&path("aliases"), "")?;
        write(&path("sendmail.mc"), &mc_text(dir.path(), pause_ms))?;
        let cf = path("sendmail.cf");
        build_cf(&path("sendmail.mc"), &cf)?;

        // The private /dev: the few device nodes Sendmail opens, and `log`,
        // the socket our listener reads, where syslog(3) looks for it.
        let dev = path("dev");
        for name in DEVICES {
            write(&dev.join(name), "")?;
        }
        let syslog = listen(&dev.join("log"))?;

        let devices: Vec<(PathBuf, PathBuf)> = DEVICES
            .iter()
            .map(|name| (Path::new("/dev").join(name), dev.join(name)))
            .collect();
        let (hosts, nsswitch) = (path("hosts"), path("nsswitch.conf"));
        let mut binds: Vec<(&Path, &Path)> = devices
            .iter()
            .map(|(node, file)| (node.as_path(), file.as_path()))
            .collect();
        binds.extend([
            (dev.as_path(), Path::new("/dev")),
            // Hosts from files only: glibc must not ask a resolver either.
            (hosts.as_path(), Path::new("/etc/hosts")),
            (nsswitch.as_path(), Path::new("/etc/nsswitch.conf")),
        ]);
        let stderr = fs::File::create(path("stderr")).context("creating Sendmail's stderr")?;
        let mut cmd = private_mounts(ns, &binds, Some(HOSTNAME));
        // -bD: the daemon in the foreground, so our child is the daemon.
        cmd.arg(binary())
            .arg("-C")
            .arg(&cf)
            .arg("-bD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary().display()))?;
        let mut sendmail = Sendmail {
            child,
            cf,
            syslog,
            dir,
        };
        sendmail.wait_listening(ns)?;
        Ok(sendmail)
    }

    /// Sendmail logs `starting daemon` before it binds, so ask the kernel.
    fn wait_listening(&mut self, ns: &Netns) -> Result<()> {
        let deadline = Instant::now() + START_WAIT;
        let wanted = [format!("{SERVER_V4}:25 "), format!("[{SERVER_V6}]:25 ")];
        loop {
            let out = ns
                .command("ss")
                .args(["-Hltn"])
                .output()
                .context("running ss (iproute2)")?;
            let listening = String::from_utf8_lossy(&out.stdout);
            if wanted.iter().all(|w| listening.contains(w.as_str())) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("waiting for Sendmail")? {
                let stderr = fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default();
                bail!(
                    "Sendmail exited ({status}) at start: {stderr}{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Sendmail did not listen within {START_WAIT:?}: {}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cf_file(&self) -> &Path {
        &self.cf
    }

    /// Sendmail's syslog so far, one message a line
    /// (`sendmail[PID]: QUEUEID: text`, without priority and timestamp).
    pub fn log(&self) -> String {
        let lines = self.syslog.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Waits up to `timeout` for a log line matching `pred`.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        wait_for_line(|| self.log(), pred, timeout)
    }

    /// Every client Sendmail refused for talking before its greeting.
    pub fn pregreets(&self) -> Vec<Pregreet> {
        self.log().lines().filter_map(parse_pregreet).collect()
    }

    /// Waits for Sendmail's pre-greeting refusal of `client`.
    pub fn wait_pregreet(&self, client: IpAddr, timeout: Duration) -> Option<Pregreet> {
        self.wait_for(
            |l| parse_pregreet(l).is_some_and(|p| p.client == client),
            timeout,
        )
        .as_deref()
        .and_then(parse_pregreet)
    }
}

impl Drop for Sendmail {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The server's own names; clients are deliberately absent, so Sendmail
/// logs them by address.
fn hosts_text() -> String {
    format!(
        "127.0.0.1 localhost\n::1 localhost\n{SERVER_V4} {HOSTNAME} mx\n{SERVER_V6} {HOSTNAME} mx\n"
    )
}

/// The host's nsswitch.conf with `hosts: files`.
fn nsswitch_text() -> String {
    let host = fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    let mut text: String = host
        .lines()
        .filter(|l| !l.trim_start().starts_with("hosts:"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str("hosts: files\n");
    text
}

/// The .mc: every path in our directory (MAIL_SETTINGS_DIR and the rest),
/// no ident, no interface probing, listeners on the lab addresses only, and
/// every recipient accepted and discarded (Local_check_rcpt) so a test
/// message needs no delivery.
fn mc_text(dir: &Path, pause_ms: u128) -> String {
    let dir = dir.display();
    format!(
        "\
divert(-1)
# spamdelay test Sendmail: see tests/src/mta/sendmail.rs.
divert(0)dnl
define(`MAIL_SETTINGS_DIR', `{dir}/')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{HOSTNAME}')dnl
define(`QUEUE_DIR', `{dir}/mqueue')dnl
define(`STATUS_FILE', `{dir}/statistics')dnl
define(`confPID_FILE', `{dir}/sendmail.pid')dnl
define(`confSERVICE_SWITCH_FILE', `{dir}/service.switch')dnl
define(`confHOSTS_FILE', `{dir}/hosts')dnl
define(`ALIAS_FILE', `{dir}/aliases')dnl
define(`confTO_IDENT', `0')dnl
define(`confDONT_PROBE_INTERFACES', `true')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`access_db', `hash -T<TMPF> -o {dir}/access')dnl
FEATURE(`greet_pause', `{pause_ms}')dnl
DAEMON_OPTIONS(`Family=inet, Addr={SERVER_V4}, Port=25, Name=MTA-v4')dnl
DAEMON_OPTIONS(`Family=inet6, Addr={SERVER_V6}, Port=25, Name=MTA-v6')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
LOCAL_RULESETS
SLocal_check_rcpt
R$*\t$#discard $: discard
"
    )
}

/// `m4 cf.m4 MC > CF`, as sendmail-cf's README says.
fn build_cf(mc: &Path, cf: &Path) -> Result<()> {
    let kit = cf_dir();
    let out = Command::new("m4")
        .arg(format!("-D_CF_DIR_={}/", kit.display()))
        .arg(kit.join("m4/cf.m4"))
        .arg(mc)
        .output()
        .context("running m4 (apt-get install m4)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // cf.m4 reports its errors with errprint and still exits 0.
    if !out.status.success() || stderr.contains("ERROR") {
        bail!("m4 could not build {}: {stderr}", cf.display());
    }
    fs::write(cf, &out.stdout).with_context(|| format!("writing {}", cf.display()))
}

/// Binds the syslog socket at `path` and collects each datagram as a line
/// until the returned log is dropped.
fn listen(path: &Path) -> Result<Arc<Syslog>> {
    let sock = UnixDatagram::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Sendmail's children may log after giving up root.
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))
        .context("opening the syslog socket")?;
    // The timeout lets the reader notice that nobody listens any more.
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .context("setting the syslog socket's timeout")?;
    let syslog = Arc::new(Syslog::default());
    let weak = Arc::downgrade(&syslog);
    thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let got = sock.recv(&mut buf);
            let Some(syslog) = weak.upgrade() else { return };
            match got {
                Ok(n) => {
                    let line = syslog_message(&String::from_utf8_lossy(&buf[..n]));
                    syslog
                        .lines
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    });
    Ok(syslog)
}

/// `<22>Nov 23 21:31:20 sendmail[15815]: text` -> `sendmail[15815]: text`.
fn syslog_message(datagram: &str) -> String {
    let text = datagram.trim_end_matches(['\n', '\0']);
    let text = match text.strip_prefix('<').and_then(|t| t.split_once('>')) {
        Some((_, rest)) => rest,
        None => text,
    };
    // The RFC 3164 timestamp is always 15 characters and a space.
    let text = match text.get(15..16) {
        Some(" ") if text.as_bytes()[..3].iter().all(u8::is_ascii_alphabetic) => &text[16..],
        _ => text,
    };
    text.to_string()
}

/// Sendmail's refusal of an early talker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pregreet {
    /// The client's address (Sendmail logs no port).
    pub client: IpAddr,
    /// Whole seconds into the greet pause when the client talked.
    pub after_secs: u64,
}

/// Parses `rejecting commands from [198.51.100.10] [198.51.100.10] due to
/// pre-greeting traffic after 0 seconds` (host name, then address; IPv6 as
/// `[IPv6:2001:db8:0:0:0:0:0:10]`).
pub fn parse_pregreet(line: &str) -> Option<Pregreet> {
    let rest = line.split_once("rejecting commands from ")?.1;
    let (who, after) = rest.split_once(" due to pre-greeting traffic after ")?;
    let addr = who.rsplit_once('[')?.1.strip_suffix(']')?;
    let client = match addr.strip_prefix("IPv6:") {
        Some(v6) => IpAddr::V6(v6.parse::<Ipv6Addr>().ok()?),
        None => addr.parse().ok()?,
    };
    let after_secs = after.strip_suffix(" seconds")?.parse().ok()?;
    Some(Pregreet { client, after_secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pregreet_lines_parse() {
        let v4 = "sendmail[15851]: 6ANLVQS3015851: rejecting commands from [198.51.100.10] \
                  [198.51.100.10] due to pre-greeting traffic after 0 seconds";
        assert_eq!(
            parse_pregreet(v4),
            Some(Pregreet {
                client: "198.51.100.10".parse().expect("address"),
                after_secs: 0
            })
        );
        let v6 = "sendmail[15859]: 6ANLVSaI015859: rejecting commands from \
                  [IPv6:2001:db8:0:0:0:0:0:10] [IPv6:2001:db8:0:0:0:0:0:10] due to \
                  pre-greeting traffic after 1 seconds";
        assert_eq!(
            parse_pregreet(v6),
            Some(Pregreet {
                client: "2001:db8::10".parse().expect("address"),
                after_secs: 1
            })
        );
        let named = "sendmail[1]: x: rejecting commands from client.example [198.51.100.11] \
                     due to pre-greeting traffic after 2 seconds";
        assert_eq!(
            parse_pregreet(named).map(|p| p.client),
            Some("198.51.100.11".parse().expect("address"))
        );
        assert_eq!(
            parse_pregreet("sendmail[1]: x: rejecting server EHLO from [198.51.100.10]"),
            None
        );
    }

    #[test]
    fn syslog_datagrams_lose_priority_and_timestamp() {
        assert_eq!(
            syslog_message("<22>Nov 23 21:31:20 sendmail[15815]: starting daemon\n"),
            "sendmail[15815]: starting daemon"
        );
        assert_eq!(syslog_message("no header"), "no header");
    }
}
