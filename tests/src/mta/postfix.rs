//! Postfix postscreen run for real in a lab's server namespace: a private
//! config, queue, data and log directory per instance, and its log parsed.

use std::{
    fs::{self, File},
    net::IpAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::lab::{Netns, SERVER_V4, SERVER_V6};

/// The Postfix command (Debian's `postfix` package).
const POSTFIX: &str = "/usr/sbin/postfix";
/// Where Debian keeps Postfix's daemons; every process of an instance runs
/// one of these.
const DAEMON_DIR: &str = "/usr/lib/postfix/sbin";

/// True when Postfix with postscreen is installed (`tests/mta/install-postfix.sh`).
pub fn installed() -> bool {
    Path::new(POSTFIX).is_file() && Path::new(DAEMON_DIR).join("postscreen").is_file()
}

/// One Postfix instance with postscreen on 192.0.2.25:25 and
/// [2001:db8::25]:25 inside a lab namespace. Everything it writes lives in a
/// temporary directory: `etc/` (config), `spool/` (queue), `lib/` (data,
/// postscreen's cache) and `log/maillog`. Stopped on drop.
pub struct Postfix {
    root: tempfile::TempDir,
    /// `root/etc`.
    config: PathBuf,
    /// The namespace it listens in: `postfix stop` must run there too, as the
    /// command checks that `inet_interfaces` exist before it does anything.
    netns: String,
    /// That namespace's identity, to find every process of this instance.
    netns_id: NetnsId,
    master: Pid,
}

impl Postfix {
    /// Starts a fresh instance in `ns` (fresh, so postscreen's cache is empty
    /// and every client is tested) with `postscreen_greet_wait` = `greet_wait`
    /// (whole seconds: Postfix has no finer time unit), the `220-` teaser
    /// banner on and `postscreen_greet_action = enforce`.
    pub fn start(ns: &Netns, greet_wait: Duration) -> Result<Postfix> {
        Self::start_with(ns, greet_wait, &[])
    }

    /// [`Postfix::start`] with main.cf `settings` (name, value) replacing the
    /// fixture's own or added to them: `("postscreen_access_list",
    /// "permit_mynetworks, cidr:FILE")`, say.
    pub fn start_with(
        ns: &Netns,
        greet_wait: Duration,
        settings: &[(&str, &str)],
    ) -> Result<Postfix> {
        if greet_wait.is_zero() || greet_wait.subsec_nanos() != 0 {
            bail!("postscreen_greet_wait takes whole seconds, not {greet_wait:?}");
        }
        let netns_id = netns_id(&format!("/run/netns/{}", ns.name()))?;
        let root = tempfile::Builder::new()
            .prefix("spamdelay-postfix-")
            .tempdir()
            .context("creating Postfix's private directory")?;
        // Postfix's unprivileged daemons (user postfix) must reach the spool
        // and data directories below it.
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))
            .context("opening up Postfix's private directory")?;
        let etc = root.path().join("etc");
        for dir in [&etc, &root.path().join("log")] {
            fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // `postfix` chdirs into the queue directory before anything else, so
        // it must exist; `post-install create-missing` (run by `postfix
        // start`) fills it in and creates the data directory.
        let spool = root.path().join("spool");
        fs::create_dir(&spool).with_context(|| format!("creating {}", spool.display()))?;
        fs::set_permissions(&spool, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("opening up {}", spool.display()))?;
        let files = [
            (
                "main.cf",
                with_settings(&main_cf(root.path(), greet_wait), settings),
            ),
            ("master.cf", MASTER_CF.to_string()),
        ];
        for (name, text) in files {
            let path = etc.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            // Postfix sleeps and re-reads a main.cf changed in the last few
            // seconds (it may still be being edited); backdating skips that.
            File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(60)))
                .with_context(|| format!("backdating {}", path.display()))?;
        }

        let out = ns
            .command(POSTFIX)
            .arg("-c")
            .arg(&etc)
            .arg("start")
            .output()
            .context("running postfix start")?;
        if !out.status.success() {
            let log = fs::read_to_string(root.path().join("log/maillog")).unwrap_or_default();
            bail!(
                "postfix -c {} start failed ({}): {}\nmaillog:\n{log}",
                etc.display(),
                out.status,
                output_text(&out)
            );
        }
        // `postfix start` returns once the master has initialised (`master
        // -w`), listening sockets open and its pid file written.
        let pid_file = spool.join("pid/master.pid");
        let master = fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))
            .and_then(|pid| {
                pid.trim()
                    .parse()
                    .with_context(|| format!("parsing {}", pid_file.display()))
            });
        let master = match master {
            Ok(pid) => Pid::from_raw(pid),
            Err(e) => {
                // Without its pid there is no Postfix to drop: stop it now.
                let _ = ns.command(POSTFIX).arg("-c").arg(&etc).arg("stop").output();
                return Err(e);
            }
        };
        Ok(Postfix {
            root,
            config: etc,
            netns: ns.name().to_string(),
            netns_id,
            master,
        })
    }

    /// Postfix's config directory (main.cf, master.cf): what `postfix -c`,
    /// `postconf -c` and spamdelay's `--mta-config` take.
    pub fn config_dir(&self) -> &Path {
        &self.config
    }

    /// A shell command that makes this instance re-read its configuration
    /// and tables (`postfix -c DIR reload`), to be run in its namespace: a
    /// `--pass-cache-reload` for spamdelay running beside it.
    pub fn reload_command(&self) -> String {
        format!("{POSTFIX} -c '{}' reload", self.config.display())
    }

    /// The log file (`maillog_file`), for tools that follow it (fail2ban).
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("log/maillog")
    }

    /// Everything logged so far (`maillog_file`, written by postlogd).
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.path().join("log/maillog")).unwrap_or_default()
    }

    /// `postfix -c DIR stop` in the namespace (or, if the namespace is already
    /// gone, the SIGTERM to the master that it sends), then waits until no
    /// process of this instance is left.
    fn stop(&mut self) -> Result<()> {
        let stopped = Command::new("ip")
            .args(["netns", "exec", &self.netns, POSTFIX, "-c"])
            .arg(&self.config)
            .arg("stop")
            .output()
            .is_ok_and(|o| o.status.success());
        if !stopped {
            kill(self.master, Signal::SIGTERM).context("signalling Postfix's master")?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = postfix_processes_in(self.netns_id);
            if left.is_empty() {
                return Ok(());
            }
            if !left.contains(&self.master) {
                // postscreen leaves its master's process group (setsid) and,
                // once the master is gone, forks a drain process that
                // finishes the connections it holds. Banned clients' FINs
                // now meet nft's reject, so those would take minutes; there
                // is nothing left worth finishing.
                for &p in &left {
                    let _ = kill(p, Signal::SIGTERM);
                }
            }
            if Instant::now() > deadline {
                for &p in &left {
                    let _ = kill(p, Signal::SIGKILL);
                }
                bail!("Postfix processes {left:?} outlived postfix stop by 10 s; killed");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping Postfix ({}): {e:#}", self.root.path().display());
        }
    }
}

/// main.cf: postscreen in front of smtpd, nothing that needs DNS or the
/// host's own Postfix files, and every local recipient discarded (so a test
/// message gets its 250 and goes nowhere).
fn main_cf(root: &Path, greet_wait: Duration) -> String {
    let root = root.display();
    let wait = greet_wait.as_secs();
    format!(
        "\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/lib
maillog_file = {root}/log/maillog
maillog_file_prefixes = {root}/log
myhostname = mx.example.test
mydomain = example.test
myorigin = $myhostname
mydestination = $myhostname
inet_interfaces = {SERVER_V4}, [{SERVER_V6}]
inet_protocols = ipv4, ipv6
# Loopback only: the lab's clients share 2001:db8::/64 with the server, and
# the default (the server's own subnets) would let postscreen's
# permit_mynetworks wave them through untested.
mynetworks = 127.0.0.0/8 [::1]/128
# A namespace has no resolver: nothing may wait on one.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
postscreen_dnsbl_sites =
postscreen_greet_wait = {wait}s
# The `220-` teaser line at once, the final line after the wait.
postscreen_greet_banner = $smtpd_banner
postscreen_greet_action = enforce
postscreen_access_list = permit_mynetworks
postscreen_cache_map = btree:$data_directory/postscreen_cache
local_recipient_maps =
local_transport = discard
alias_maps =
alias_database =
biff = no
"
    )
}

/// `main_cf` with each of `settings` replacing the line that sets the same
/// parameter, or appended when none does (Postfix warns about a parameter
/// set twice, so an override must replace, not follow).
fn with_settings(main_cf: &str, settings: &[(&str, &str)]) -> String {
    let mut unused: Vec<&(&str, &str)> = settings.iter().collect();
    let mut out = String::new();
    for line in main_cf.lines() {
        let name = line.split_once('=').map(|(n, _)| n.trim());
        match unused.iter().position(|(n, _)| Some(*n) == name) {
            Some(i) => {
                let (n, v) = unused.remove(i);
                out.push_str(&format!("{n} = {v}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (n, v) in unused {
        out.push_str(&format!("{n} = {v}\n"));
    }
    out
}

/// master.cf: postscreen on port 25 handing passed clients to smtpd, the
/// queue's own services, and postlogd for `maillog_file`. No chroot: the
/// private directories are not laid out for one.
const MASTER_CF: &str = "\
25        inet  n       -       n       -       1       postscreen
smtpd     pass  -       -       n       -       -       smtpd
dnsblog   unix  -       -       n       -       0       dnsblog
tlsproxy  unix  -       -       n       -       0       tlsproxy
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string()
}

/// A network namespace's identity: the (device, inode) of its nsfs file.
type NetnsId = (u64, u64);

fn netns_id(path: &str) -> Result<NetnsId> {
    let meta = fs::metadata(path).with_context(|| format!("looking at {path}"))?;
    Ok((meta.dev(), meta.ino()))
}

/// The live Postfix processes in the network namespace `ns`. Every lab has
/// a namespace of its own, so these are exactly this instance's processes,
/// including postscreen's drain process, which no longer descends from the
/// master. PID 1 reaps slowly here, so an exited process lingers as a zombie:
/// a live one is told by its executable link, which a zombie no longer has.
fn postfix_processes_in(ns: NetnsId) -> Vec<Pid> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(DAEMON_DIR))
                && netns_id(&format!("/proc/{pid}/ns/net")).is_ok_and(|id| id == ns)
        })
        .map(Pid::from_raw)
        .collect()
}

/// postscreen's verdict about one client connection: its kind (`PREGREET`,
/// `PASS NEW`, `PASS OLD`, `HANGUP`, `COMMAND PIPELINING`, `NOQUEUE`, ...),
/// the client's address and its port.
pub type PostscreenVerdict = (String, IpAddr, u16);

/// postscreen's findings about clients, in log order. A line's kind is its
/// leading capitalised words; the client is the first `[ip]:port` in it:
///
/// ```text
/// postfix/postscreen[12206]: PREGREET 50 after 0 from [198.51.100.10]:53933: EHLO blind.example\r\n...
/// postfix/postscreen[12206]: HANGUP after 0.5 from [198.51.100.10]:51339 in tests before SMTP handshake
/// postfix/postscreen[12206]: PASS NEW [2001:db8::10]:38935
/// ```
///
/// `CONNECT` and `DISCONNECT` lines only mark a connection's ends and are
/// left out, so a client's first entry is postscreen's first judgement of it.
pub fn postscreen_verdicts(log: &str) -> Vec<PostscreenVerdict> {
    log.lines().filter_map(parse_postscreen_line).collect()
}

fn parse_postscreen_line(line: &str) -> Option<PostscreenVerdict> {
    let (_, rest) = line.split_once(" postfix/postscreen[")?;
    let (_, message) = rest.split_once("]: ")?;
    let mut kind = Vec::new();
    for word in message.split(' ') {
        let (word, last) = match word.strip_suffix(':') {
            Some(w) => (w, true),
            None => (word, false),
        };
        if !word.bytes().any(|b| b.is_ascii_uppercase())
            || !word.bytes().all(|b| b.is_ascii_uppercase() || b == b'-')
        {
            break;
        }
        kind.push(word);
        if last {
            break;
        }
    }
    let kind = kind.join(" ");
    if kind.is_empty() || kind == "CONNECT" || kind == "DISCONNECT" {
        return None;
    }
    let (_, addr) = message.split_once('[')?;
    let (ip, rest) = addr.split_once("]:")?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .map_or(rest, |end| &rest[..end]);
    Some((kind, ip.parse().ok()?, digits.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as Postfix 3.7.11's postscreen wrote them in the lab.
    const LOG: &str = r"Nov 23 21:28:58 mx postfix/master[12077]: daemon started -- version 3.7.11, configuration /tmp/x/etc
Nov 23 21:29:03 mx postfix/postscreen[12206]: cache btree:/tmp/x/lib/postscreen_cache full cleanup: retained=0 dropped=0 entries
Nov 23 21:29:03 mx postfix/postscreen[12206]: CONNECT from [198.51.100.10]:57983 to [192.0.2.25]:25
Nov 23 21:29:03 mx postfix/postscreen[12206]: PREGREET 20 after 0 from [198.51.100.10]:57983: EHLO eager.example\r\n
Nov 23 21:29:03 mx postfix/postscreen[12206]: COMMAND PIPELINING from [198.51.100.10]:53933 after EHLO: MAIL FROM:<spam@example.com>\r\n
Nov 23 21:29:03 mx postfix/postscreen[12206]: HANGUP after 0.1 from [198.51.100.10]:57983 in tests after SMTP handshake
Nov 23 21:29:03 mx postfix/postscreen[12206]: DISCONNECT [198.51.100.10]:57983
Nov 23 21:29:04 mx postfix/postscreen[12206]: NOQUEUE: reject: RCPT from [198.51.100.11]:4000: 550 5.5.1 Protocol error; from=<a@b>, to=<c@d>, proto=ESMTP, helo=<x>
Nov 23 21:29:07 mx postfix/postscreen[12206]: PASS NEW [2001:db8::10]:38935
Nov 23 21:29:07 mx postfix/smtpd[12242]: connect from unknown[2001:db8::10]
";

    #[test]
    fn settings_replace_the_fixtures_own_or_are_added() {
        let text = "a = 1\npostscreen_access_list = permit_mynetworks\nb = 2\n";
        let got = with_settings(
            text,
            &[
                ("postscreen_access_list", "permit_mynetworks, cidr:/x"),
                ("c", "3"),
            ],
        );
        assert_eq!(
            got,
            "a = 1\npostscreen_access_list = permit_mynetworks, cidr:/x\nb = 2\nc = 3\n"
        );
        assert_eq!(with_settings(text, &[]), text);
    }

    #[test]
    fn parses_postscreen_lines() {
        let v4 = |d| IpAddr::from([198, 51, 100, d]);
        let got = postscreen_verdicts(LOG);
        let want: Vec<PostscreenVerdict> = vec![
            ("PREGREET".into(), v4(10), 57983),
            ("COMMAND PIPELINING".into(), v4(10), 53933),
            ("HANGUP".into(), v4(10), 57983),
            ("NOQUEUE".into(), v4(11), 4000),
            (
                "PASS NEW".into(),
                "2001:db8::10".parse().expect("an address"),
                38935,
            ),
        ];
        assert_eq!(got, want);
    }
}
