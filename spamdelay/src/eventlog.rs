//! The JSON event log (`run --event-log FILE`): one JSON object per line for
//! every verdict, ban and unban, for a SIEM or log pipeline to read.
//!
//! Every line has `time` (RFC 3339, UTC, microseconds) and `event`
//! (`verdict`, `ban` or `unban`). A field that does not apply to an event is
//! left out, never written as `null`.
//!
//! - `verdict`: `client`, `client_port`, `server`, `server_port`, `verdict`
//!   (`EARLY-TALK`, `QUIT`, `PASS`, `PIPECONNECT`, `PROBE`, as the log lines
//!   say), `waited` (seconds from the handshake to the verdict), `action`,
//!   and where known `greet_pause` (seconds). Verdicts on client payload
//!   (EARLY-TALK, PIPECONNECT, PROBE) add `bytes`, `payload` (escaped as in
//!   the log line, `...` when only its start was captured) and, for payload
//!   in a Fast Open SYN or a fragment, `via` (`syn`, `fragment`); a
//!   PIPECONNECT adds `passed_at`. `action` is what spamdelay did:
//!   `ban` (the `ban` event follows), `would-ban` (a dry run),
//!   `already-banned` (a ban in force covers the client), `ban-failed`
//!   (nftables refused it, or the ban could not be made), `none` (not an
//!   offence: a pass, a forgiven PIPECONNECT, a probe, a quit that is not
//!   banned). With the first three and `ban-failed`, `cidr` names the ban.
//!   Allowlisted clients are never followed, so they have no verdicts.
//! - `ban`: `cidr`, `ban_time` (seconds), `expires` (RFC 3339), `offence`
//!   (this address's offence count), `reason` (as in nft's comment), `by`
//!   (`daemon`, or `admin` for `spamdelay ban`) and, for an `--ipv6-aggregate`
//!   /64, `instead_of` (the addresses it was banned for). A dry run writes no
//!   ban events: its verdicts say `would-ban`.
//! - `unban`: `cidr` and `by` (`admin`: `spamdelay unban`, one event per ban
//!   lifted). Bans that simply time out in nftables are not reported.
//!
//! The daemon writes each batch of events with one `write` to a file opened
//! with `O_APPEND`, and so does an admin command (which finds the file named
//! in the daemon's status file), so lines from the two processes never
//! interleave. SIGHUP reopens the file by its name, for logrotate.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use spamdelay_common::{
    Verdict,
    event::{HOW_FRAGMENT, HOW_SYN},
};

use crate::{
    allow::Cidr,
    banpath::{Done, Lifted},
    bans::Ban,
    events::Report,
    metrics::Status,
    policy::Policy,
};

/// The mode of a new event log: verdicts name clients, not for everyone.
const MODE: u32 = 0o640;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Verdict,
    Ban,
    Unban,
}

/// What spamdelay did about a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Ban,
    WouldBan,
    AlreadyBanned,
    BanFailed,
    None,
}

/// Who banned or unbanned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum By {
    Daemon,
    Admin,
    /// Another host's ban, taken from the fleet (CrowdSec).
    Fleet,
}

/// One line of the event log (see the module's description).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time: String,
    pub event: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greet_pause: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ban_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offence: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instead_of: Option<Vec<Cidr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<By>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

fn unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

impl Event {
    fn new(event: Kind) -> Self {
        Event {
            time: rfc3339(SystemTime::now()),
            event,
            client: None,
            client_port: None,
            server: None,
            server_port: None,
            verdict: None,
            waited: None,
            greet_pause: None,
            bytes: None,
            payload: None,
            via: None,
            passed_at: None,
            action: None,
            cidr: None,
            ban_time: None,
            expires: None,
            offence: None,
            reason: None,
            instead_of: None,
            by: None,
        }
    }

    /// A verdict, what was done about it, and the ban concerned, if any.
    pub fn verdict(r: &Report, action: Action, cidr: Option<Cidr>) -> Self {
        let on_payload = matches!(
            r.verdict,
            Verdict::EarlyTalk | Verdict::Pipeconnect | Verdict::Probe
        );
        let via = if r.how & HOW_FRAGMENT != 0 {
            Some("fragment")
        } else if r.how & HOW_SYN != 0 {
            Some("syn")
        } else {
            None
        };
        Event {
            client: Some(r.client.ip()),
            client_port: Some(r.client.port()),
            server: Some(r.server.ip()),
            server_port: Some(r.server.port()),
            verdict: Some(r.word().to_string()),
            waited: Some(r.after.as_secs_f64()),
            greet_pause: r.pause.map(|p| p.as_secs_f64()),
            bytes: on_payload.then_some(r.bytes),
            payload: on_payload.then(|| r.shown_payload()),
            via: via.filter(|_| on_payload).map(str::to_string),
            passed_at: r.passed_at.map(rfc3339),
            action: Some(action),
            cidr,
            ..Event::new(Kind::Verdict)
        }
    }

    /// A ban made at `now` (unix seconds): `instead_of` for an aggregate.
    pub fn ban(cidr: Cidr, ban: &Ban, by: By, now: u64, instead_of: Option<Vec<Cidr>>) -> Self {
        Event {
            cidr: Some(cidr),
            ban_time: Some(ban.expires.saturating_sub(now)),
            expires: Some(rfc3339(unix(ban.expires))),
            offence: Some(ban.offences),
            reason: Some(ban.reason.clone()),
            by: Some(by),
            instead_of,
            ..Event::new(Kind::Ban)
        }
    }

    /// A ban lifted.
    pub fn unban(cidr: Cidr, by: By) -> Self {
        Event {
            cidr: Some(cidr),
            by: Some(by),
            ..Event::new(Kind::Unban)
        }
    }

    /// The event as one line, newline included.
    fn line(&self) -> Vec<u8> {
        // Plain data (strings, numbers, enums): serializing cannot fail.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// The events of one batch of verdicts the daemon handled: a verdict event
/// each, then the bans made. `done` is what the ban path did with the
/// batch's offences, `None` when it failed as a whole.
pub fn batch_events(
    batch: &[Report],
    policy: &Policy,
    done: Option<&[Done]>,
    dry_run: bool,
    now: u64,
) -> Vec<Event> {
    // Several verdicts of one batch may call for the same ban: the first
    // made it, the others found it made.
    let mut claimed: HashSet<Cidr> = HashSet::new();
    let mut out = Vec::with_capacity(batch.len());
    for r in batch {
        let (action, cidr) = match (policy.offence(r), done) {
            (None, _) => (Action::None, None),
            (Some(o), None) => (Action::BanFailed, Some(o.cidr)),
            (Some(o), Some(done)) => outcome(done, o.cidr, &mut claimed, dry_run),
        };
        out.push(Event::verdict(r, action, cidr));
    }
    if dry_run {
        return out;
    }
    for d in done.unwrap_or_default() {
        match d {
            Done::Banned { cidr, ban } => out.push(Event::ban(*cidr, ban, By::Daemon, now, None)),
            Done::Aggregated {
                cidrs, net, ban, ..
            } => out.push(Event::ban(*net, ban, By::Daemon, now, Some(cidrs.clone()))),
            Done::Covered { .. } | Done::Refused { .. } => {}
        }
    }
    out
}

/// What became of the offence of `cidr`, and the ban concerned.
fn outcome(
    done: &[Done],
    cidr: Cidr,
    claimed: &mut HashSet<Cidr>,
    dry_run: bool,
) -> (Action, Option<Cidr>) {
    let made = if dry_run {
        Action::WouldBan
    } else {
        Action::Ban
    };
    for d in done {
        match d {
            Done::Banned { cidr: c, .. } if *c == cidr => {
                let first = claimed.insert(cidr);
                return (if first { made } else { Action::AlreadyBanned }, Some(cidr));
            }
            Done::Aggregated { cidrs, net, .. } if cidrs.contains(&cidr) => {
                let first = claimed.insert(cidr);
                return (if first { made } else { Action::AlreadyBanned }, Some(*net));
            }
            Done::Covered { cidr: c, by } if *c == cidr => {
                return (Action::AlreadyBanned, Some(*by));
            }
            Done::Refused { cidr: c } if *c == cidr => return (Action::BanFailed, Some(cidr)),
            _ => {}
        }
    }
    // The ban path answers every offence it is given; should that change,
    // say nothing rather than something false.
    (Action::None, None)
}

/// The daemon's event log: a cheap handle to one file (or to none, when
/// `--event-log` is not given), shared by the enforcer and the signal
/// handler that reopens it.
#[derive(Clone, Default)]
pub struct EventLog(Arc<Mutex<Option<Sink>>>);

struct Sink {
    path: PathBuf,
    file: File,
    /// Whether the last write failed (warned about once, not per batch).
    failing: bool,
}

/// Opens (creating it with mode 0640) `path` for appending. The path is made
/// absolute, so the admin commands find it from any directory.
fn open_file(path: &Path) -> Result<(PathBuf, File)> {
    let path = std::path::absolute(path)
        .with_context(|| format!("the event log {}: not a usable path", path.display()))?;
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        bail!(
            "the event log {}: directory {} does not exist: create it first",
            path.display(),
            dir.display()
        );
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(MODE)
        .open(&path)
        .with_context(|| format!("opening the event log {}", path.display()))?;
    Ok((path, file))
}

impl EventLog {
    /// A log that writes nothing (no `--event-log`); `reopen` can start it.
    pub fn off() -> Self {
        Self::default()
    }

    pub fn open(path: &Path) -> Result<Self> {
        let log = Self::off();
        log.reopen(Some(path))?;
        Ok(log)
    }

    fn sink(&self) -> MutexGuard<'_, Option<Sink>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file written to, absolute; `None` when off.
    pub fn path(&self) -> Option<PathBuf> {
        self.sink().as_ref().map(|s| s.path.clone())
    }

    /// Opens the file anew: by the same name (`None`; after logrotate renamed
    /// it), or at `path` (a reload that moved it, or turned the log on). On
    /// failure the old file is kept.
    pub fn reopen(&self, path: Option<&Path>) -> Result<()> {
        let mut sink = self.sink();
        let Some(path) = path.or(sink.as_ref().map(|s| s.path.as_path())) else {
            return Ok(());
        };
        let (path, file) = open_file(path)?;
        *sink = Some(Sink {
            path,
            file,
            failing: false,
        });
        Ok(())
    }

    /// Stops writing (a reload that dropped `--event-log`).
    pub fn close(&self) {
        *self.sink() = None;
    }

    /// SIGHUP, first thing, whatever the reload finds: reopens the file by
    /// its name (logrotate renamed it). A failure keeps the old file.
    pub fn reopen_or_warn(&self) {
        if let Err(e) = self.reopen(None) {
            error!("{e:#}: still writing to the file it had open");
        }
    }

    /// A reload's `--event-log`: moves the log there, starts it, or stops
    /// it. A failure keeps the old file.
    pub fn follow(&self, configured: Option<&Path>) {
        let was = self.path();
        let wanted = configured.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        if wanted == was {
            return;
        }
        let Some(path) = wanted else {
            self.close();
            info!("event log off (no event-log setting any more)");
            return;
        };
        match self.reopen(Some(&path)) {
            Ok(()) => info!("event log now {}", path.display()),
            Err(e) => error!(
                "{e:#}: the event log stays {}",
                was.map_or("off".to_string(), |p| p.display().to_string())
            ),
        }
    }

    /// Writes `events` with one `write`, so a `tail -f` sees a batch whole
    /// and an admin command's line never lands inside one. A failure is
    /// warned about once, until writing works again: the daemon goes on.
    pub fn record(&self, events: &[Event]) {
        self.record_with(|| events.to_vec());
    }

    /// As `record`, the events made only when the log is on.
    pub fn record_with(&self, events: impl FnOnce() -> Vec<Event>) {
        let mut guard = self.sink();
        let Some(sink) = guard.as_mut() else {
            return;
        };
        let events = events();
        if events.is_empty() {
            return;
        }
        let buf: Vec<u8> = events.iter().flat_map(Event::line).collect();
        // A short append to the page cache, never a sync: cheap enough to
        // make on the enforcer's task.
        match sink.file.write_all(&buf) {
            Ok(()) if sink.failing => {
                sink.failing = false;
                info!("writing the event log {} again", sink.path.display());
            }
            Ok(()) => {}
            Err(e) if !sink.failing => {
                sink.failing = true;
                warn!(
                    "writing the event log {}: {e}: events are lost until it works again",
                    sink.path.display()
                );
            }
            Err(_) => {}
        }
    }

    /// Writes one verdict event.
    pub fn verdict(&self, r: &Report, action: Action, cidr: Option<Cidr>) {
        self.record(&[Event::verdict(r, action, cidr)]);
    }

    /// Writes one ban event.
    pub fn ban(&self, cidr: Cidr, ban: &Ban, by: By, now: u64) {
        self.record(&[Event::ban(cidr, ban, by, now, None)]);
    }

    /// Writes one unban event.
    pub fn unban(&self, cidr: Cidr, by: By) {
        self.record(&[Event::unban(cidr, by)]);
    }
}

/// Appends `events` to the event log of the daemon whose state is in
/// `state_dir` (named in its status file), if it keeps one: how `spamdelay
/// ban` and `unban`, other processes, reach it. One `write` with
/// `O_APPEND`, so their lines never interleave with the daemon's.
pub fn append_for_daemon(state_dir: &Path, events: &[Event]) -> Result<()> {
    let Some(path) = Status::read(state_dir)?.and_then(|s| s.event_log) else {
        return Ok(());
    };
    let (path, mut file) = open_file(&path)?;
    let buf: Vec<u8> = events.iter().flat_map(Event::line).collect();
    file.write_all(&buf)
        .with_context(|| format!("writing the event log {}", path.display()))
}

/// `spamdelay ban`: its ban in the daemon's event log, if it keeps one. A
/// failure is a warning: the ban is made.
pub fn admin_banned(state_dir: &Path, done: &[Done], now: u64) {
    let events: Vec<Event> = done
        .iter()
        .filter_map(|d| match d {
            Done::Banned { cidr, ban } => Some(Event::ban(*cidr, ban, By::Admin, now, None)),
            Done::Aggregated {
                cidrs, net, ban, ..
            } => Some(Event::ban(*net, ban, By::Admin, now, Some(cidrs.clone()))),
            Done::Covered { .. } | Done::Refused { .. } => None,
        })
        .collect();
    append_or_warn(state_dir, &events);
}

/// `spamdelay unban`: an event per ban it lifted (what it prints), in the
/// daemon's event log, if it keeps one. A failure is a warning.
pub fn admin_unbanned(state_dir: &Path, lifted: &Lifted, unbridged: &[IpAddr]) {
    let mut cidrs = lifted.register.clone();
    cidrs.extend(
        lifted
            .elements
            .iter()
            .filter(|c| !lifted.register.contains(c)),
    );
    if cidrs.is_empty() {
        cidrs = unbridged.iter().map(|ip| Cidr::host(*ip)).collect();
    }
    let events: Vec<Event> = cidrs
        .into_iter()
        .map(|c| Event::unban(c, By::Admin))
        .collect();
    append_or_warn(state_dir, &events);
}

fn append_or_warn(state_dir: &Path, events: &[Event]) {
    if events.is_empty() {
        return;
    }
    if let Err(e) = append_for_daemon(state_dir, events) {
        warn!("{e:#}: the change is made, but not in the event log");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn policy() -> Policy {
        Policy {
            ban_time: Duration::from_secs(3600),
            max_ban_time: Duration::from_secs(7 * 86400),
            ban_quitters: false,
            ipv6_prefix: 128,
            remember: Duration::from_secs(86400),
            greet_pause: Some(Duration::from_secs(6)),
        }
    }

    fn report(verdict: Verdict, client: &str) -> Report {
        Report {
            verdict,
            pause: Some(Duration::from_secs(6)),
            client: client.parse().unwrap(),
            server: "192.0.2.25:25".parse().unwrap(),
            after: Duration::from_millis(213),
            bytes: 8,
            payload: b"EHLO x\r\n".to_vec(),
            how: 0,
            passed_at: None,
        }
    }

    fn ban(offences: u32) -> Ban {
        Ban {
            expires: 1_796_003_600,
            reason: "early-talk 8B after 0.21s: EHLO x\\r\\n".into(),
            offences,
            remember_until: 1_796_090_000,
        }
    }

    const NOW: u64 = 1_796_000_000;

    fn json(e: &Event) -> serde_json::Value {
        serde_json::from_slice(&e.line()).unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("spamdelay-eventlog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn early_talk_line_has_every_verdict_field() {
        let r = report(Verdict::EarlyTalk, "198.51.100.11:40123");
        let cidr: Cidr = "198.51.100.11".parse().unwrap();
        let v = json(&Event::verdict(&r, Action::Ban, Some(cidr)));
        assert_eq!(v["event"], "verdict");
        assert_eq!(v["client"], "198.51.100.11");
        assert_eq!(v["client_port"], 40123);
        assert_eq!(v["server"], "192.0.2.25");
        assert_eq!(v["server_port"], 25);
        assert_eq!(v["verdict"], "EARLY-TALK");
        assert_eq!(v["waited"], 0.213);
        assert_eq!(v["greet_pause"], 6.0);
        assert_eq!(v["bytes"], 8);
        assert_eq!(v["payload"], "EHLO x\\r\\n");
        assert_eq!(v["action"], "ban");
        assert_eq!(v["cidr"], "198.51.100.11/32");
        let time = v["time"].as_str().unwrap();
        assert!(
            humantime::parse_rfc3339(time).is_ok() && time.ends_with('Z'),
            "{time}"
        );
        assert!(v.get("via").is_none() && v.get("passed_at").is_none());
    }

    #[test]
    fn fields_that_do_not_apply_are_left_out() {
        let r = Report {
            bytes: 0,
            payload: vec![],
            ..report(Verdict::Pass, "[2001:db8::10]:5000")
        };
        let v = json(&Event::verdict(&r, Action::None, None));
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "action",
                "client",
                "client_port",
                "event",
                "greet_pause",
                "server",
                "server_port",
                "time",
                "verdict",
                "waited"
            ]
        );
        assert_eq!(v["client"], "2001:db8::10");
        let line = Event::unban("2001:db8::/64".parse().unwrap(), By::Admin).line();
        assert!(!String::from_utf8(line).unwrap().contains("null"));
    }

    #[test]
    fn fast_open_pipeconnect_says_how_and_when() {
        let r = Report {
            how: HOW_SYN,
            passed_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)),
            ..report(Verdict::Pipeconnect, "198.51.100.11:40123")
        };
        let v = json(&Event::verdict(&r, Action::None, None));
        assert_eq!(v["via"], "syn");
        assert_eq!(v["passed_at"], "2026-11-30T00:53:20.000000Z");
    }

    #[test]
    fn ban_and_unban_lines() {
        let cidr: Cidr = "198.51.100.11".parse().unwrap();
        let v = json(&Event::ban(cidr, &ban(2), By::Daemon, NOW, None));
        assert_eq!(v["event"], "ban");
        assert_eq!(v["cidr"], "198.51.100.11/32");
        assert_eq!(v["ban_time"], 3600);
        assert_eq!(v["expires"], "2026-11-30T01:53:20.000000Z");
        assert_eq!(v["offence"], 2);
        assert_eq!(v["reason"], "early-talk 8B after 0.21s: EHLO x\\r\\n");
        assert_eq!(v["by"], "daemon");
        let v = json(&Event::unban(cidr, By::Admin));
        assert_eq!(
            (&v["event"], &v["cidr"], &v["by"]),
            (&"unban".into(), &"198.51.100.11/32".into(), &"admin".into())
        );
    }

    #[test]
    fn batch_events_say_what_was_done_and_list_the_bans() {
        let talker = report(Verdict::EarlyTalk, "198.51.100.11:40000");
        let again = report(Verdict::EarlyTalk, "198.51.100.11:40001");
        let covered = report(Verdict::EarlyTalk, "198.51.100.12:40000");
        let refused = report(Verdict::EarlyTalk, "198.51.100.13:40000");
        let pass = report(Verdict::Pass, "198.51.100.14:40000");
        let quit = report(Verdict::Quit, "198.51.100.15:40000");
        let batch = [talker, again, covered, refused, pass, quit];
        let c = |s: &str| -> Cidr { s.parse().unwrap() };
        let done = [
            Done::Banned {
                cidr: c("198.51.100.11"),
                ban: ban(1),
            },
            Done::Covered {
                cidr: c("198.51.100.12"),
                by: c("198.51.100.0/24"),
            },
            Done::Refused {
                cidr: c("198.51.100.13"),
            },
        ];
        let events = batch_events(&batch, &policy(), Some(&done), false, NOW);
        let got: Vec<(Kind, Option<Action>, Option<Cidr>)> =
            events.iter().map(|e| (e.event, e.action, e.cidr)).collect();
        assert_eq!(
            got,
            [
                (Kind::Verdict, Some(Action::Ban), Some(c("198.51.100.11"))),
                (
                    Kind::Verdict,
                    Some(Action::AlreadyBanned),
                    Some(c("198.51.100.11"))
                ),
                (
                    Kind::Verdict,
                    Some(Action::AlreadyBanned),
                    Some(c("198.51.100.0/24"))
                ),
                (
                    Kind::Verdict,
                    Some(Action::BanFailed),
                    Some(c("198.51.100.13"))
                ),
                (Kind::Verdict, Some(Action::None), None),
                (Kind::Verdict, Some(Action::None), None),
                (Kind::Ban, None, Some(c("198.51.100.11"))),
            ]
        );
        // A dry run: would-ban, and no ban events.
        let events = batch_events(&batch[..1], &policy(), Some(&done), true, NOW);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].action, Some(Action::WouldBan));
        // The ban path failed as a whole: the offences were not banned.
        let events = batch_events(&batch[..1], &policy(), None, false, NOW);
        assert_eq!(events[0].action, Some(Action::BanFailed));
    }

    #[test]
    fn aggregate_ban_names_the_addresses_it_stands_for() {
        let r = report(Verdict::EarlyTalk, "[2001:db8::11]:40000");
        let c = |s: &str| -> Cidr { s.parse().unwrap() };
        let done = [Done::Aggregated {
            cidrs: vec![c("2001:db8::11")],
            net: c("2001:db8::/64"),
            members: 4,
            ban: ban(1),
        }];
        let events = batch_events(&[r], &policy(), Some(&done), false, NOW);
        assert_eq!(events[0].action, Some(Action::Ban));
        assert_eq!(events[0].cidr, Some(c("2001:db8::/64")));
        let v = json(&events[1]);
        assert_eq!(v["cidr"], "2001:db8::/64");
        assert_eq!(v["instead_of"], serde_json::json!(["2001:db8::11/128"]));
    }

    #[test]
    fn file_is_created_0640_appended_to_and_reopened_after_a_rename() {
        let d = dir("rotate");
        let path = d.join("events.json");
        let log = EventLog::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "{mode:o}");
        let cidr: Cidr = "198.51.100.11".parse().unwrap();
        log.clone().unban(cidr, By::Admin);
        let rotated = d.join("events.json.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.ban(cidr, &ban(1), By::Daemon, NOW);
        log.reopen(None).unwrap();
        log.verdict(
            &report(Verdict::Pass, "198.51.100.11:1"),
            Action::None,
            None,
        );
        let old: Vec<_> = lines(&rotated).iter().map(|v| v["event"].clone()).collect();
        assert_eq!(old, ["unban", "ban"], "written before the reopen");
        let new: Vec<_> = lines(&path).iter().map(|v| v["event"].clone()).collect();
        assert_eq!(new, ["verdict"]);
        // An existing file is appended to, never truncated.
        let again = EventLog::open(&path).unwrap();
        again.unban(cidr, By::Admin);
        assert_eq!(lines(&path).len(), 2);
        assert_eq!(log.path(), Some(path));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn reopen_moves_turns_on_and_keeps_the_old_file_on_failure() {
        let d = dir("move");
        let log = EventLog::off();
        log.reopen(None).unwrap();
        assert_eq!(log.path(), None, "off stays off");
        log.unban("198.51.100.1".parse().unwrap(), By::Admin);
        let first = d.join("a.json");
        log.reopen(Some(&first)).unwrap();
        let err = log.reopen(Some(&d.join("missing/b.json"))).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!(
                "the event log {}: directory {} does not exist: create it first",
                d.join("missing/b.json").display(),
                d.join("missing").display()
            )
        );
        assert_eq!(log.path(), Some(first.clone()), "the old file is kept");
        log.follow(Some(&d.join("missing/b.json")));
        assert_eq!(log.path(), Some(first.clone()), "a reload's bad path too");
        let second = d.join("b.json");
        log.follow(Some(&second));
        assert_eq!(log.path(), Some(second));
        log.follow(None);
        assert_eq!(log.path(), None, "a reload without the setting stops it");
        log.reopen_or_warn();
        assert_eq!(log.path(), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn admin_commands_append_to_the_file_the_status_names() {
        let d = dir("admin");
        let cidr: Cidr = "198.51.100.11".parse().unwrap();
        // No status file, or one without an event log: nothing to do.
        append_for_daemon(&d, &[Event::unban(cidr, By::Admin)]).unwrap();
        let path = d.join("events.json");
        let status = format!(
            r#"{{"pid":1,"started":0,"updated":0,"running":true,"attached":[],"ports":[25],"dry_run":false,"counters":{{}},"event_log":{}}}"#,
            serde_json::to_string(&path).unwrap()
        );
        std::fs::write(d.join(crate::metrics::STATUS_FILE), status).unwrap();
        let log = EventLog::open(&path).unwrap();
        log.verdict(
            &report(Verdict::Pass, "198.51.100.11:1"),
            Action::None,
            None,
        );
        append_for_daemon(&d, &[Event::unban(cidr, By::Admin)]).unwrap();
        log.ban(cidr, &ban(1), By::Daemon, NOW);
        let got: Vec<_> = lines(&path).iter().map(|v| v["event"].clone()).collect();
        assert_eq!(got, ["verdict", "unban", "ban"]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
