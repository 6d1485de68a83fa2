//! Exim 4 for real in a lab's server namespace (unpacked by tests/mta/install-exim.sh):
//! a private config, spool and log, a connect-ACL delay, PIPECONNECT on or off.

use std::{
    fs,
    io::{BufReader, Write},
    net::{IpAddr, SocketAddr},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::{Gid, Pid, Uid, chown},
};
use tempfile::TempDir;

pub mod client;

use crate::{
    lab::{Netns, SERVER_V4, SERVER_V6},
    mta::unpack_dir,
    smtp::{ClientPort, connect, read_reply},
};

/// The user Debian compiled into its Exim. Exim looks it up before it reads
/// `-C`, so it must resolve even though the config names its own user.
const EXIM_USER: &str = "Debian-exim";

/// How long the daemon may take to say it listens.
const START_WAIT: Duration = Duration::from_secs(10);

/// The unpacked daemon binary.
pub fn binary() -> PathBuf {
    unpack_dir().join("exim/usr/sbin/exim4")
}

pub fn installed() -> bool {
    binary().is_file()
}

/// How the config sets `pipelining_connect_advertise_hosts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipeconnect {
    /// Empty: never advertised, and Exim refuses early talkers itself.
    Off,
    /// `*`: advertised to every client; Exim then takes early input.
    All,
    /// Not in the file: Exim's built-in default applies (`*` in 4.96).
    Unset,
}

/// An Exim daemon listening on 192.0.2.25:25 and [2001:db8::25]:25 in a lab
/// namespace. Killed (with its connection children) on drop.
pub struct Exim {
    child: Child,
    config: PathBuf,
    dir: TempDir,
}

impl Exim {
    /// Starts Exim in `ns`, holding the greeting back for `delay` (whole
    /// seconds: Exim's `delay` modifier has no finer unit) and advertising
    /// PIPECONNECT to every client when `pipeconnect` is set.
    pub fn start(ns: &Netns, delay: Duration, pipeconnect: bool) -> Result<Self> {
        let advertise = if pipeconnect {
            Pipeconnect::All
        } else {
            Pipeconnect::Off
        };
        Self::start_with(ns, delay, advertise)
    }

    /// [`Exim::start`] with any PIPECONNECT setting, including none at all.
    pub fn start_with(ns: &Netns, delay: Duration, pipeconnect: Pipeconnect) -> Result<Self> {
        Self::start_with_acl(ns, delay, pipeconnect, "")
    }

    /// [`Exim::start_with`] with `before_delay`, connect-ACL statements
    /// placed ahead of `accept delay` (`accept hosts = net-iplsearch;FILE`:
    /// the clients listed in FILE get their greeting at once).
    pub fn start_with_acl(
        ns: &Netns,
        delay: Duration,
        pipeconnect: Pipeconnect,
        before_delay: &str,
    ) -> Result<Self> {
        if delay.subsec_nanos() != 0 {
            bail!("Exim delays in whole seconds only, not {delay:?}");
        }
        let dir = private_dir("spamdelay-exim-")?;
        let config = dir.path().join("exim.conf");
        fs::write(
            &config,
            config_text(dir.path(), delay, pipeconnect, before_delay),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let stderr =
            fs::File::create(dir.path().join("stderr")).context("creating Exim's stderr")?;

        // -bdf: the daemon in the foreground, so our child is the daemon.
        let mut cmd = exim_command(ns, dir.path(), &config);
        cmd.arg("-bdf")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: on drop the connection children go too.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary().display()))?;
        let mut exim = Exim { child, config, dir };
        exim.wait_listening()?;
        Ok(exim)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_WAIT;
        loop {
            if self
                .log()
                .lines()
                .any(|l| l.contains("daemon started") && l.contains("listening for SMTP on"))
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("waiting for Exim")? {
                bail!(
                    "Exim exited ({status}) at start: {}{}",
                    self.stderr(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!("Exim did not listen within {START_WAIT:?}: {}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// An option's value as Exim itself sees it (`exim -bP NAME`), defaults
    /// included.
    pub fn setting(&self, ns: &Netns, name: &str) -> Result<String> {
        let out = exim_command(ns, self.dir.path(), &self.config)
            .args(["-bP", name])
            .output()
            .context("running exim -bP")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("exim -bP {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        // `name = value`, or a bare `name` / `no_name` for booleans.
        Ok(text
            .trim()
            .split_once('=')
            .map_or(text.trim(), |(_, v)| v.trim())
            .to_string())
    }

    pub fn config_file(&self) -> &Path {
        &self.config
    }

    /// Exim's main log so far (`log_file_path`, one line per event).
    pub fn log(&self) -> String {
        mainlog(self.dir.path())
    }

    /// Exim's panic log: what it could not do at all (a lookup that failed
    /// to open its file, a config error found at run time). Empty when fine.
    pub fn paniclog(&self) -> String {
        fs::read_to_string(self.dir.path().join("log/paniclog")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Waits up to `timeout` for a main log line matching `pred`.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        wait_for_line(|| self.log(), pred, timeout)
    }

    /// Every connection Exim refused for talking before its greeting.
    pub fn sync_errors(&self) -> Vec<SyncError> {
        self.log().lines().filter_map(parse_sync_error).collect()
    }

    /// Waits for Exim's synchronization error about `client`.
    pub fn wait_sync_error(&self, client: SocketAddr, timeout: Duration) -> Option<SyncError> {
        self.wait_for(
            |l| parse_sync_error(l).is_some_and(|e| e.client == client),
            timeout,
        )
        .as_deref()
        .and_then(parse_sync_error)
    }

    /// Every message Exim took (`<=` lines).
    pub fn received(&self) -> Vec<Received> {
        self.log().lines().filter_map(parse_received).collect()
    }

    /// Every connection Exim accepted (`SMTP connection from`).
    pub fn connections(&self) -> Vec<SocketAddr> {
        self.log().lines().filter_map(parse_connection).collect()
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// The Exim binary with `config`, in `ns`, in a private mount namespace
/// where /etc/passwd and /etc/group are the copies in `dir` that know Exim's
/// user. Append the mode.
fn exim_command(ns: &Netns, dir: &Path, config: &Path) -> Command {
    let (passwd, group) = (dir.join("passwd"), dir.join("group"));
    let mut cmd = private_mounts(
        ns,
        &[
            (&passwd, Path::new("/etc/passwd")),
            (&group, Path::new("/etc/group")),
        ],
        None,
    );
    cmd.arg(binary()).arg("-C").arg(config);
    cmd
}

/// The server's config: the base, the lab server's addresses, a connect-ACL
/// delay, and every recipient accepted and thrown away so a test message
/// gets its 250 without any delivery.
fn config_text(
    dir: &Path,
    delay: Duration,
    pipeconnect: Pipeconnect,
    before_delay: &str,
) -> String {
    let delay = delay.as_secs();
    let before_delay: String = before_delay
        .lines()
        .map(|l| format!("  {}\n", l.trim()))
        .collect();
    let pipeconnect = match pipeconnect {
        Pipeconnect::Off => "pipelining_connect_advertise_hosts =\n",
        Pipeconnect::All => "pipelining_connect_advertise_hosts = *\n",
        Pipeconnect::Unset => "",
    };
    let base = base_config(dir, "mx.example.test");
    format!(
        "\
{base}local_interfaces = <; {SERVER_V4}.25 ; {SERVER_V6}.25
{pipeconnect}# Client ports in the log, to match spamdelay's verdicts per connection.
log_selector = +incoming_port +smtp_connection +pipelining
acl_smtp_connect = acl_connect
acl_smtp_rcpt = acl_rcpt

begin acl

acl_connect:
{before_delay}  accept delay = {delay}s

acl_rcpt:
  discard
"
    )
}

/// What every test Exim's config starts with, server or client: its own
/// paths under `dir` and its user, no DNS, no TLS, no ident.
fn base_config(dir: &Path, hostname: &str) -> String {
    let dir = dir.display();
    let exim = binary();
    let exim = exim.display();
    format!(
        "\
# spamdelay test Exim: see tests/src/mta/exim.rs.
exim_path = {exim}
exim_user = {EXIM_USER}
exim_group = {EXIM_USER}
primary_hostname = {hostname}
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
# No DNS or ident in a lab namespace: nothing may wait on a resolver.
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
keep_environment =
"
    )
}

/// A private directory for one Exim instance, server or client: open to
/// Exim's user (each connection and delivery drops to it), with `spool` and
/// `log` its own and the passwd/group copies [`exim_command`] mounts.
fn private_dir(prefix: &str) -> Result<TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating Exim's directory")?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .context("opening Exim's directory")?;
    let (uid, gid) = private_user_db(dir.path())?;
    for sub in ["spool", "log"] {
        let path = dir.path().join(sub);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        chown(&path, Some(uid), Some(gid))
            .with_context(|| format!("handing {} to {EXIM_USER}", path.display()))?;
    }
    Ok(dir)
}

/// The main log of the Exim instance in `dir` (`log_file_path`).
fn mainlog(dir: &Path) -> String {
    fs::read_to_string(dir.join("log/mainlog")).unwrap_or_default()
}

/// Copies of /etc/passwd and /etc/group for the private mount namespace,
/// with Exim's user added when the host lacks it; its uid and gid.
fn private_user_db(dir: &Path) -> Result<(Uid, Gid)> {
    let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let group = fs::read_to_string("/etc/group").context("reading /etc/group")?;
    let field = |line: &str, n: usize| -> Option<u32> { line.split(':').nth(n)?.parse().ok() };
    let existing = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{EXIM_USER}:")))
        .and_then(|l| Some((field(l, 2)?, field(l, 3)?)));
    let (uid, gid, passwd, group) = match existing {
        // A host with Exim installed already has it: change nothing.
        Some((uid, gid)) => (uid, gid, passwd, group),
        None => {
            let used: Vec<u32> = passwd
                .lines()
                .filter_map(|l| field(l, 2))
                .chain(group.lines().filter_map(|l| field(l, 2)))
                .collect();
            let id = (64_000..65_000)
                .find(|id| !used.contains(id))
                .context("no free uid for Exim's user")?;
            (
                id,
                id,
                ensure_newline(&passwd)
                    + &format!(
                        "{EXIM_USER}:x:{id}:{id}:spamdelay test Exim:/nonexistent:/usr/sbin/nologin\n"
                    ),
                ensure_newline(&group) + &format!("{EXIM_USER}:x:{id}:\n"),
            )
        }
    };
    for (name, text) in [("passwd", passwd), ("group", group)] {
        fs::write(dir.join(name), text).with_context(|| format!("writing the private {name}"))?;
    }
    Ok((Uid::from_raw(uid), Gid::from_raw(gid)))
}

fn ensure_newline(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

/// A command prefix that runs a program in `ns` inside a mount namespace of
/// its own (so nothing leaks to the host), with each `(source, target)`
/// bind mounted in order and, when given, a UTS namespace with its own
/// hostname. Append the program and its arguments. Shared with the Sendmail
/// fixture.
pub(crate) fn private_mounts(
    ns: &Netns,
    binds: &[(&Path, &Path)],
    hostname: Option<&str>,
) -> Command {
    // Paths and the name travel as arguments, never inside the script, so
    // nothing needs quoting.
    let mut script = String::from("set -e\n");
    let mut args: Vec<&std::ffi::OsStr> = Vec::new();
    for (source, target) in binds {
        args.extend([source.as_os_str(), target.as_os_str()]);
        // ${N}: a bare $10 would be $1 followed by a 0.
        let (s, t) = (args.len() - 1, args.len());
        script.push_str(&format!("mount --rbind \"${{{s}}}\" \"${{{t}}}\"\n"));
    }
    if let Some(name) = hostname {
        args.push(name.as_ref());
        script.push_str(&format!("hostname \"${{{}}}\"\n", args.len()));
    }
    script.push_str(&format!("shift {}\nexec \"$@\"\n", args.len()));
    let mut cmd = ns.command("unshare");
    cmd.args(["--mount", "--propagation", "private"]);
    if hostname.is_some() {
        cmd.arg("--uts");
    }
    cmd.args(["--", "sh", "-c", &script, "sh"]).args(args);
    cmd
}

/// SIGTERM to the process group, SIGKILL after a grace period, and wait:
/// PID 1 reaps slowly here, so only our own wait makes the stop certain.
pub(crate) fn stop(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let group = Pid::from_raw(child.id() as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            // Connection children may outlive the daemon by a moment.
            let _ = killpg(group, Signal::SIGKILL);
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(group, Signal::SIGKILL);
    child.wait().ok()
}

/// Polls `text` until a line matches `pred` or `timeout` passes.
pub(crate) fn wait_for_line(
    text: impl Fn() -> String,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = text().lines().find(|l| pred(l)) {
            return Some(line.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Exim's refusal of an early talker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncError {
    pub client: SocketAddr,
    /// What the client sent, as Exim quotes it (`EHLO x\r\n`, escaped).
    pub input: String,
}

/// Parses `SMTP protocol synchronization error (input sent without waiting
/// for greeting): rejected connection from H=[198.51.100.10]:60241
/// input="EHLO blind.example\r\n"` (after the timestamp). Other
/// synchronization errors (pipelining too soon) are not early talk.
pub fn parse_sync_error(line: &str) -> Option<SyncError> {
    let rest = line
        .split_once(
            "SMTP protocol synchronization error (input sent without waiting for greeting): \
             rejected connection from H=",
        )?
        .1;
    let client = bracketed_addr(rest)?;
    let input = rest
        .split_once(" input=\"")
        .map(|(_, i)| i.strip_suffix('"').unwrap_or(i).to_string())
        .unwrap_or_default();
    Some(SyncError { client, input })
}

/// A message Exim took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub id: String,
    pub sender: String,
    pub client: SocketAddr,
    /// `L*`: the client sent its opening ahead of the banner (PIPECONNECT).
    pub early_pipe: bool,
    /// `TFO*`: the client's first bytes came in its SYN (TCP Fast Open).
    pub syn_data: bool,
}

/// Parses `1xVbbj-0003TF-0C <= a@example.com H=(client.example)
/// [198.51.100.10]:42447 TFO* P=esmtp L* K S=440 id=...` (after the
/// timestamp; `L*` and `TFO*` only when they apply).
pub fn parse_received(line: &str) -> Option<Received> {
    let (head, rest) = line.split_once(" <= ")?;
    let id = head.split_whitespace().last()?.to_string();
    let (sender, rest) = rest.split_once(' ')?;
    let host = rest.split_once("H=")?.1;
    // The flags come before `S=`; the message id after it is the client's.
    let flags = rest.split_once(" S=").map_or(rest, |(f, _)| f);
    let has = |flag: &str| flags.split_whitespace().any(|w| w == flag);
    Some(Received {
        id,
        sender: sender.to_string(),
        client: bracketed_addr(host)?,
        early_pipe: has("L*"),
        syn_data: has("TFO*"),
    })
}

/// Parses `SMTP connection from [198.51.100.10]:42447 (TCP/IP connection
/// count = 1)`, Exim's note of a new connection (log_selector
/// `+smtp_connection`).
pub fn parse_connection(line: &str) -> Option<SocketAddr> {
    let rest = line.split_once("SMTP connection from ")?.1;
    rest.contains("(TCP/IP connection count")
        .then(|| bracketed_addr(rest))
        .flatten()
}

/// The first `[address]:port` in `text`, as Exim writes hosts with
/// `+incoming_port` (a host name or `(helo)` may come first).
fn bracketed_addr(text: &str) -> Option<SocketAddr> {
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let close = after.find(']')?;
        if let Ok(ip) = after[..close].parse::<IpAddr>() {
            let port: String = after[close + 1..]
                .strip_prefix(':')?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            return Some(SocketAddr::new(ip, port.parse().ok()?));
        }
        rest = &after[close + 1..];
    }
    None
}

/// What a scripted client saw.
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    pub port: ClientPort,
    /// The server's replies in order, greeting first.
    pub replies: Vec<String>,
    /// Why it ended before QUIT was answered (a reset after a ban, a
    /// refusal), or None when it ran to the end.
    pub cut_short: Option<String>,
}

impl Conversation {
    pub fn greeting(&self) -> &str {
        self.replies.first().map_or("", String::as_str)
    }
}

/// The PIPECONNECT client's opening: one EHLO before the greeting.
pub const EARLY_EHLO: &[u8] = b"EHLO client.example\r\n";
const MAIL: &[u8] = b"MAIL FROM:<sender@example.com>\r\n";
const RCPT: &[u8] = b"RCPT TO:<rcpt@example.test>\r\n";

/// Sends `EHLO client.example` before the greeting (and `MAIL FROM` with it
/// when `with_mail`: more than PIPECONNECT allows), then waits for the
/// greeting and carries on politely: MAIL, RCPT, QUIT. A refusal or a reset
/// ends it early; that is reported, not an error.
pub fn early_ehlo(src: IpAddr, dst: SocketAddr, with_mail: bool) -> Result<Conversation> {
    let stream = connect(src, dst)?;
    let mut talk = Conversation {
        port: stream.local_addr()?.port(),
        ..Conversation::default()
    };
    let mut early = EARLY_EHLO.to_vec();
    if with_mail {
        early.extend_from_slice(MAIL);
    }
    (&stream).write_all(&early)?;
    let mut replies = BufReader::new(stream.try_clone()?);
    // The replies expected in order (greeting, EHLO, MAIL, RCPT, QUIT), and
    // what to send on each.
    let after_ehlo: &[u8] = if with_mail { b"" } else { MAIL };
    let script: [(&str, &[u8]); 5] = [
        ("220", b""),
        ("250", after_ehlo),
        ("250", RCPT),
        ("250", b"QUIT\r\n"),
        ("221", b""),
    ];
    for (want, then) in script {
        let reply = match read_reply(&mut replies) {
            Ok(r) => r,
            Err(e) => {
                talk.cut_short = Some(format!("{e:#}"));
                return Ok(talk);
            }
        };
        let ok = reply.starts_with(want);
        talk.replies.push(reply);
        if !ok {
            talk.cut_short = Some(format!("expected {want}"));
            return Ok(talk);
        }
        if let Err(e) = (&stream).write_all(then) {
            talk.cut_short = Some(e.to_string());
            return Ok(talk);
        }
    }
    Ok(talk)
}

/// One swaks run: a real SMTP client sending a real message.
pub struct Swaks {
    /// The client's address and port, as spamdelay and the MTA log them.
    pub client: SocketAddr,
    pub status: ExitStatus,
    pub transcript: String,
}

/// Sends one test message from `src` to `dst` with swaks, run in `ns`.
/// swaks is told its local port, so the caller knows the connection.
pub fn swaks(ns: &Netns, src: IpAddr, dst: SocketAddr) -> Result<Swaks> {
    // Distinct ports per call: a lab is fresh, so a counter cannot collide.
    static NEXT_PORT: AtomicU16 = AtomicU16::new(41_000);
    let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    let out = ns
        .command("swaks")
        .args(["--server", &dst.ip().to_string()])
        .args(["--port", &dst.port().to_string()])
        .args(["--local-interface", &src.to_string()])
        .args(["--local-port", &port.to_string()])
        .args(["--from", "sender@example.com", "--to", "rcpt@example.test"])
        .args(["--helo", "client.example", "--timeout", "15s"])
        .arg(if src.is_ipv6() { "-6" } else { "-4" })
        .stdin(Stdio::null())
        .output()
        .context("running swaks (apt-get install swaks libio-socket-inet6-perl)")?;
    Ok(Swaks {
        client: SocketAddr::new(src, port),
        status: out.status,
        transcript: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_error_lines_parse() {
        let v4 = "2026-11-23 21:29:51 SMTP protocol synchronization error (input sent without \
                  waiting for greeting): rejected connection from H=[198.51.100.10]:60241 \
                  input=\"EHLO blind.example\\r\\nMAIL FROM:<x@y>\\r\\n\"";
        assert_eq!(
            parse_sync_error(v4),
            Some(SyncError {
                client: "198.51.100.10:60241".parse().expect("address"),
                input: "EHLO blind.example\\r\\nMAIL FROM:<x@y>\\r\\n".into(),
            })
        );
        let v6 = "2026-11-23 21:29:51 SMTP protocol synchronization error (input sent without \
                  waiting for greeting): rejected connection from H=mx.example [2001:db8::10]:50524 \
                  input=\"EHLO x\\r\\n\"";
        assert_eq!(
            parse_sync_error(v6).map(|e| e.client),
            Some("[2001:db8::10]:50524".parse().expect("address"))
        );
        let pipelining = "2026-11-23 21:29:51 SMTP protocol synchronization error (next input \
                          sent too soon: pipelining was not advertised): rejected \"MAIL FROM:<>\" \
                          H=[198.51.100.10]:60241 next input=\"RCPT TO:<x>\\r\\n\"";
        assert_eq!(parse_sync_error(pipelining), None);
    }

    #[test]
    fn received_and_connection_lines_parse() {
        let got = "2026-11-23 21:29:51 1xVbbj-0003TF-0C <= a@example.com H=(client.example) \
                   [198.51.100.10]:42447 P=esmtp S=440 id=20261123212948.013292@vm";
        assert_eq!(
            parse_received(got),
            Some(Received {
                id: "1xVbbj-0003TF-0C".into(),
                sender: "a@example.com".into(),
                client: "198.51.100.10:42447".parse().expect("address"),
                early_pipe: false,
                syn_data: false,
            })
        );
        let piped = "2026-12-01 04:26:03 1xYFRL-00030Y-1O <= sender@example.com \
                     H=(c.example) [198.51.100.11]:41493 TFO* P=esmtp L* K S=494 \
                     id=E1xYFRL-00030T-1M@c.example";
        let piped = parse_received(piped).expect("a <= line");
        assert!(piped.early_pipe && piped.syn_data, "{piped:?}");
        let plain = "2026-12-01 04:26:03 1xYFRL-00030H-1H <= sender@example.com \
                     H=(c.example) [198.51.100.11]:49839 P=esmtp L. K S=494 id=x@c.example";
        let plain = parse_received(plain).expect("a <= line");
        assert!(!plain.early_pipe && !plain.syn_data, "{plain:?}");
        let conn = "2026-11-23 21:29:49 SMTP connection from [2001:db8::10]:50524 (TCP/IP \
                    connection count = 1)";
        assert_eq!(
            parse_connection(conn),
            Some("[2001:db8::10]:50524".parse().expect("address"))
        );
        let closed = "2026-11-23 21:29:51 SMTP connection from (client.example) \
                      [198.51.100.10]:42447 closed by QUIT";
        assert_eq!(parse_connection(closed), None);
    }
}
