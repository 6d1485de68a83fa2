//! One MX host's verdicts protect the others, through CrowdSec's Local API
//! (LAPI), the decision store the fleet already runs.
//!
//! - Publish: every ban the ban path makes (the daemon's, and an admin's,
//!   which `spamdelay ban` leaves in the spool for the daemon) goes to LAPI
//!   as an alert carrying its decision, batched, off the ban path. What LAPI
//!   cannot take waits in the spool (spool.rs) and is sent when it is back,
//!   with its end unchanged (`stop_at` is the ban's start). An unban deletes
//!   the decisions on the address.
//! - Subscribe: the bouncer's decision stream, pulled every
//!   `--crowdsec-pull-every`; new bans (of the scenarios taken) are handed
//!   to the enforcer as foreign bans with their remaining time, deleted ones
//!   lifted. The enforcer never bans an allowlisted address, whoever asks.

pub mod lapi;
pub mod spool;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use log::{error, info, warn};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};

use self::{
    lapi::{Decision, Lapi, LapiError, Machine},
    spool::{Entry, Spool},
};
use crate::{
    allow::Cidr,
    banpath::{Foreign, Observer, Term, Wanted},
    bans::{self, Ban},
    exporter::Cause,
};

/// The origin of spamdelay's decisions in LAPI.
pub const ORIGIN: &str = "spamdelay";
/// The reason of a ban that came from the fleet starts so (`list` shows
/// it; `Cause::of_reason` counts it as `fleet`).
pub const REASON_PREFIX: &str = "fleet";
/// Alerts per `POST /v1/alerts`.
const ALERTS_PER_POST: usize = 100;
/// The spool is looked at this often for what `spamdelay ban`/`unban` left.
const SPOOL_EVERY: Duration = Duration::from_millis(250);
/// After a failure, LAPI is tried again after 1 s, doubling up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// `run`'s CrowdSec flags (also config keys).
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetArgs {
    /// CrowdSec Local API to share bans through, e.g. http://10.0.0.5:8080
    /// (off by default).
    #[arg(long, value_name = "URL", value_parser = lapi_url)]
    pub crowdsec_lapi: Option<Url>,

    /// Publish bans as this CrowdSec machine (`cscli machines add ID`).
    #[arg(long, value_name = "ID", requires = "crowdsec_password_file")]
    pub crowdsec_machine: Option<String>,

    /// The machine's password, alone in FILE.
    #[arg(long, value_name = "FILE", requires = "crowdsec_machine")]
    pub crowdsec_password_file: Option<PathBuf>,

    /// Take the fleet's bans with this bouncer key (`cscli bouncers add
    /// NAME`), alone in FILE.
    #[arg(long, value_name = "FILE")]
    pub crowdsec_bouncer_key_file: Option<PathBuf>,

    /// How often the fleet's decisions are pulled.
    #[arg(long, value_name = "D", default_value = "1s", value_parser = crate::cli::duration_or_off)]
    pub crowdsec_pull_every: Duration,

    /// Scenarios of the fleet's decisions that are applied: a prefix
    /// (`spamdelay/`), an exact name, or `*` for all (comma-separated or
    /// repeated).
    #[arg(
        long = "crowdsec-scenarios",
        alias = "crowdsec-scenario",
        value_name = "PREFIX[,PREFIX...]",
        value_delimiter = ',',
        default_value = "spamdelay/"
    )]
    pub crowdsec_scenarios: Vec<String>,
}

/// `--crowdsec-lapi`'s value.
fn lapi_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s)
        .map_err(|e| format!("bad URL '{s}' ({e}): expected e.g. http://127.0.0.1:8080"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "bad URL '{s}': expected http://HOST:PORT or https://HOST:PORT"
        ));
    }
    Ok(url)
}

impl FleetArgs {
    pub fn enabled(&self) -> bool {
        self.crowdsec_lapi.is_some()
    }

    /// The settings' own consistency: every flag needs the URL, the URL
    /// needs something to do.
    pub fn check(&self) -> Result<()> {
        let publish = self.crowdsec_machine.is_some();
        let subscribe = self.crowdsec_bouncer_key_file.is_some();
        match (&self.crowdsec_lapi, publish || subscribe) {
            (None, true) => {
                bail!("--crowdsec-machine and --crowdsec-bouncer-key-file need --crowdsec-lapi URL")
            }
            (Some(_), false) => bail!(
                "--crowdsec-lapi needs --crowdsec-machine ID with --crowdsec-password-file FILE (to publish bans), --crowdsec-bouncer-key-file FILE (to take the fleet's), or both"
            ),
            _ => {}
        }
        if self.crowdsec_pull_every.is_zero() && subscribe {
            bail!("--crowdsec-pull-every must be at least 1ms");
        }
        Ok(())
    }
}

/// A secret alone in a file (the trailing newline dropped).
fn secret(path: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the CrowdSec {what} from {}", path.display()))?;
    let s = text.trim();
    if s.is_empty() || s.contains('\n') {
        bail!(
            "{}: expected the CrowdSec {what} alone on one line",
            path.display()
        );
    }
    Ok(s.to_string())
}

/// What `spamdelay status` shows of the fleet (in the status file).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetStatus {
    pub lapi: String,
    /// Bans are published (a machine is set).
    pub publish: bool,
    /// The fleet's bans are taken (a bouncer key is set).
    pub subscribe: bool,
    /// The last call to LAPI worked.
    pub reachable: bool,
    /// The last failure, as logged, while it lasts.
    pub last_error: Option<String>,
    /// The last good pull of the decision stream (unix seconds).
    pub last_pull: Option<u64>,
    /// Entries waiting in the spool.
    pub spool: usize,
    /// alerts_sent, unbans_sent, decisions_applied, decisions_lifted,
    /// allowlisted, own, spool_dropped, and one per error kind
    /// (`error_unreachable`, ...).
    pub counters: BTreeMap<String, u64>,
}

pub type SharedStatus = Arc<Mutex<FleetStatus>>;

fn count(status: &SharedStatus, key: &str, n: u64) {
    if n == 0 {
        return;
    }
    if let Ok(mut s) = status.lock() {
        *s.counters.entry(key.to_string()).or_default() += n;
    }
}

/// Errors are logged once per change (a LAPI down for an hour is one line,
/// its return another), and each counted.
struct Health {
    status: SharedStatus,
    role: &'static str,
    failing: Option<String>,
}

impl Health {
    fn ok(&mut self) {
        if let Some(was) = self.failing.take() {
            info!("CrowdSec {}: LAPI answers again (was: {was})", self.role);
        }
        if let Ok(mut s) = self.status.lock() {
            s.reachable = true;
            s.last_error = None;
        }
    }

    fn failed(&mut self, e: &LapiError) {
        count(&self.status, &format!("error_{}", e.kind()), 1);
        let line = e.to_string();
        if self.failing.as_deref() != Some(line.as_str()) {
            error!("CrowdSec {}: {line}", self.role);
            self.failing = Some(line.clone());
        }
        if let Ok(mut s) = self.status.lock() {
            s.reachable = matches!(e, LapiError::Http { .. });
            s.last_error = Some(line);
        }
    }
}

/// The addresses this host published, so their decisions coming back in
/// the stream are not applied twice.
type Published = Arc<Mutex<HashMap<Cidr, u64>>>;

/// The running fleet link: its tasks and what they report.
pub struct Fleet {
    pub status: SharedStatus,
    observer: Option<Arc<dyn Observer>>,
    publisher: Option<JoinHandle<()>>,
    subscriber: Option<JoinHandle<()>>,
}

impl Fleet {
    /// Reads the secrets and starts publishing and subscribing as set.
    /// `foreign` takes the fleet's bans to the enforcer.
    pub fn start(
        args: &FleetArgs,
        state_dir: &Path,
        foreign: mpsc::Sender<Foreign>,
    ) -> Result<Option<Fleet>> {
        args.check()?;
        let Some(url) = args.crowdsec_lapi.clone() else {
            return Ok(None);
        };
        let lapi = Lapi::new(url.clone())?;
        let spool = Spool::new(state_dir);
        let waiting = spool.waiting();
        let status: SharedStatus = Arc::new(Mutex::new(FleetStatus {
            lapi: url.to_string(),
            publish: args.crowdsec_machine.is_some(),
            subscribe: args.crowdsec_bouncer_key_file.is_some(),
            spool: waiting,
            ..Default::default()
        }));
        let published: Published = Arc::default();
        // Said before the tasks start (the publisher takes the spool at once).
        info!(
            "CrowdSec LAPI {url}: {}{}{}",
            match &args.crowdsec_machine {
                Some(id) => format!("publishing bans as machine {id}"),
                None => "not publishing (no --crowdsec-machine)".into(),
            },
            if args.crowdsec_bouncer_key_file.is_some() {
                format!(
                    ", taking the fleet's bans every {} (scenarios {})",
                    crate::duration::show(args.crowdsec_pull_every),
                    args.crowdsec_scenarios.join(" ")
                )
            } else {
                ", not taking the fleet's bans (no --crowdsec-bouncer-key-file)".into()
            },
            match waiting {
                0 => String::new(),
                n => format!("; {n} waiting in the spool"),
            }
        );
        let (mut publisher_task, mut subscriber_task) = (None, None);
        let mut observer: Option<Arc<dyn Observer>> = None;
        let mut machine_id = None;
        if let (Some(id), Some(file)) = (&args.crowdsec_machine, &args.crowdsec_password_file) {
            let password = secret(file, "machine password")?;
            let machine = Machine::new(lapi.clone(), id.clone(), password);
            let (tx, rx) = mpsc::unbounded_channel();
            observer = Some(Arc::new(Outbox { tx }));
            machine_id = Some(id.clone());
            let publisher = Publisher {
                machine,
                spool: spool.clone(),
                host: hostname(),
                published: published.clone(),
                health: Health {
                    status: status.clone(),
                    role: "publishing",
                    failing: None,
                },
            };
            publisher_task = Some(tokio::spawn(publisher.run(rx)));
        }
        if let Some(file) = &args.crowdsec_bouncer_key_file {
            let key = secret(file, "bouncer key")?;
            let lookup = match (&args.crowdsec_machine, &args.crowdsec_password_file) {
                (Some(id), Some(file)) => Some(Machine::new(
                    lapi.clone(),
                    id.clone(),
                    secret(file, "machine password")?,
                )),
                _ => None,
            };
            let subscriber = Subscriber {
                lapi: lapi.clone(),
                key,
                every: args.crowdsec_pull_every,
                scenarios: args.crowdsec_scenarios.clone(),
                published: published.clone(),
                machine_id,
                lookup,
                foreign,
                health: Health {
                    status: status.clone(),
                    role: "subscribing",
                    failing: None,
                },
            };
            subscriber_task = Some(tokio::spawn(subscriber.run()));
        }
        Ok(Some(Fleet {
            status,
            observer,
            publisher: publisher_task,
            subscriber: subscriber_task,
        }))
    }

    /// What the ban path tells of every ban and unban (publishing only).
    pub fn observer(&self) -> Option<Arc<dyn Observer>> {
        self.observer.clone()
    }

    /// Waits for the first task to end: none should. Cancel-safe.
    pub async fn ended(&mut self) -> String {
        let (name, result) = tokio::select! {
            r = optional(&mut self.publisher) => ("the CrowdSec publisher", r),
            r = optional(&mut self.subscriber) => ("the CrowdSec subscriber", r),
        };
        match result {
            Ok(()) => format!("{name} stopped"),
            Err(e) if e.is_panic() => format!("{name} panicked"),
            Err(e) => format!("{name} was cancelled: {e}"),
        }
    }

    pub fn stop(self) {
        for t in [self.publisher, self.subscriber].into_iter().flatten() {
            t.abort();
        }
    }
}

async fn optional(task: &mut Option<JoinHandle<()>>) -> Result<(), tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// The scenario a ban is published under.
fn scenario(reason: &str) -> &'static str {
    match Cause::of_reason(reason) {
        Cause::Quit => "spamdelay/quit",
        Cause::Manual => "spamdelay/manual",
        _ => "spamdelay/early-talk",
    }
}

/// The entry for a ban that took, unless it came from the fleet.
fn ban_entry(cidr: &Cidr, ban: &Ban, now: u64) -> Option<Entry> {
    if ban.reason.starts_with(REASON_PREFIX) {
        return None;
    }
    Some(Entry::Ban {
        cidr: *cidr,
        scenario: scenario(&ban.reason).into(),
        reason: ban.reason.clone(),
        at: now,
        expires: ban.expires,
    })
}

/// The daemon's observer: entries to the publisher's queue.
struct Outbox {
    tx: mpsc::UnboundedSender<Entry>,
}

impl Observer for Outbox {
    fn banned(&self, cidr: &Cidr, ban: &Ban, now: u64) {
        if let Some(e) = ban_entry(cidr, ban, now) {
            let _ = self.tx.send(e);
        }
    }

    fn unbanned(&self, cidr: &Cidr, now: u64) {
        let _ = self.tx.send(Entry::Unban {
            cidr: *cidr,
            at: now,
        });
    }
}

/// An admin command's observer: entries to the spool, for the daemon.
struct AdminSpool {
    spool: Spool,
}

impl AdminSpool {
    fn put(&self, e: Entry) {
        if let Err(e) = self.spool.append(&[e], bans::now()) {
            warn!("leaving the change for the CrowdSec fleet: {e:#}");
        }
    }
}

impl Observer for AdminSpool {
    fn banned(&self, cidr: &Cidr, ban: &Ban, now: u64) {
        if let Some(e) = ban_entry(cidr, ban, now) {
            self.put(e);
        }
    }

    fn unbanned(&self, cidr: &Cidr, now: u64) {
        self.put(Entry::Unban {
            cidr: *cidr,
            at: now,
        });
    }
}

/// For `spamdelay ban`/`unban`: when the daemon of `state_dir` publishes to
/// a fleet (its status says so, running or not), their changes go to its
/// spool, which it sends within a second.
pub fn admin_observer(state_dir: &Path) -> Option<Arc<dyn Observer>> {
    let status = crate::metrics::Status::read(state_dir).ok().flatten()?;
    if !status.fleet.as_ref().is_some_and(|f| f.publish) {
        return None;
    }
    Some(Arc::new(AdminSpool {
        spool: Spool::new(state_dir),
    }))
}

/// A Go duration (`1h`, `90m`, `3600s`): what LAPI parses.
pub fn go_duration(secs: u64) -> String {
    let secs = secs.max(1);
    if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// A Go duration as LAPI writes them (`3h59m58.92s`, `1.5ms`, `-2s`);
/// `None` for a negative or unreadable one.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.starts_with('-') || s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Some(Duration::from_secs_f64(total))
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A ban as a LAPI alert with its decision. Its `stop_at` is the ban's
/// start: LAPI ends the decision at `stop_at` + duration, the ban's end,
/// however late it is sent.
fn alert(
    cidr: &Cidr,
    scenario: &str,
    reason: &str,
    at: u64,
    expires: u64,
    host: &str,
    machine: &str,
) -> Value {
    let (scope, value) = if cidr.is_host() {
        ("Ip", cidr.addr().to_string())
    } else {
        ("Range", cidr.to_string())
    };
    let time = rfc3339(at);
    let mut source = json!({ "scope": scope, "value": value });
    if cidr.is_host() {
        source["ip"] = json!(value);
    } else {
        source["range"] = json!(value);
    }
    json!({
        "scenario": scenario,
        "scenario_hash": "",
        "scenario_version": env!("CARGO_PKG_VERSION"),
        "message": format!("{value} banned by spamdelay on {host} ({machine}): {reason}"),
        "events_count": 1,
        "start_at": time,
        "stop_at": time,
        "capacity": 0,
        "leakspeed": "0",
        "simulated": false,
        "events": [],
        "source": source,
        "meta": [
            { "key": "host", "value": host },
            { "key": "machine", "value": machine },
            { "key": "reason", "value": reason },
        ],
        "labels": null,
        "decisions": [{
            "type": "ban",
            "duration": go_duration(expires.saturating_sub(at)),
            "scope": scope,
            "value": value,
            "origin": ORIGIN,
            "scenario": scenario,
        }],
    })
}

/// Sends what the ban path reports, in batches; spools what LAPI does not
/// take, and sends the spool when LAPI is back.
struct Publisher {
    machine: Machine,
    spool: Spool,
    host: String,
    published: Published,
    health: Health,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Entry>) {
        let mut tick = tokio::time::interval(SPOOL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Duration::from_secs(1);
        loop {
            let mut queue = Vec::new();
            tokio::select! {
                e = rx.recv() => {
                    let Some(e) = e else { return };
                    queue.push(e);
                    while let Ok(e) = rx.try_recv() {
                        queue.push(e);
                    }
                }
                _ = tick.tick() => {}
            }
            let now = bans::now();
            let down = retry_at.is_some_and(|t| Instant::now() < t);
            if down {
                // LAPI failed a moment ago: new entries wait on disk (a
                // crash or restart loses none), tried again at retry time.
                self.spool_all(&queue, now);
                continue;
            }
            // The spool first: it holds the older entries.
            match self.spool.take(now) {
                Ok(mut waiting) if !waiting.is_empty() => {
                    waiting.append(&mut queue);
                    queue = waiting;
                }
                Ok(_) => {}
                Err(e) => warn!("CrowdSec publishing: reading the spool: {e:#}"),
            }
            if queue.is_empty() {
                continue;
            }
            match self.send(&queue, now).await {
                Ok(()) => {
                    self.health.ok();
                    retry_at = None;
                    backoff = Duration::from_secs(1);
                }
                Err((sent, e)) => {
                    self.health.failed(&e);
                    self.spool_all(&queue[sent..], now);
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
            self.show_spool();
        }
    }

    fn spool_all(&self, entries: &[Entry], now: u64) {
        if entries.is_empty() {
            return;
        }
        match self.spool.append(entries, now) {
            Ok(dropped) => {
                if dropped > 0 {
                    warn!(
                        "CrowdSec publishing: the spool is full ({} entries): dropped the {dropped} oldest",
                        spool::MAX
                    );
                    count(&self.health.status, "spool_dropped", dropped as u64);
                }
            }
            Err(e) => error!(
                "CrowdSec publishing: {} changes lost, the spool cannot be written: {e:#}",
                entries.len()
            ),
        }
        self.show_spool();
    }

    fn show_spool(&self) {
        let n = self.spool.waiting();
        if let Ok(mut s) = self.health.status.lock() {
            s.spool = n;
        }
    }

    /// Sends in order, bans batched; on failure, how many were sent.
    async fn send(&mut self, queue: &[Entry], now: u64) -> Result<(), (usize, LapiError)> {
        let mut i = 0;
        while i < queue.len() {
            match &queue[i] {
                Entry::Unban { cidr, .. } => {
                    self.machine
                        .delete_decisions(cidr)
                        .await
                        .map_err(|e| (i, e))?;
                    if let Ok(mut p) = self.published.lock() {
                        p.remove(cidr);
                    }
                    count(&self.health.status, "unbans_sent", 1);
                    info!(
                        "CrowdSec: decisions on {} deleted (unban)",
                        crate::banpath::show(cidr)
                    );
                    i += 1;
                }
                Entry::Ban { .. } => {
                    let end = queue[i..]
                        .iter()
                        .position(|e| !matches!(e, Entry::Ban { .. }))
                        .map_or(queue.len(), |p| i + p)
                        .min(i + ALERTS_PER_POST);
                    let alerts: Vec<Value> = queue[i..end]
                        .iter()
                        .filter_map(|e| match e {
                            Entry::Ban {
                                cidr,
                                scenario,
                                reason,
                                at,
                                expires,
                            } if *expires > now => Some(alert(
                                cidr,
                                scenario,
                                reason,
                                *at,
                                *expires,
                                &self.host,
                                self.machine.id(),
                            )),
                            _ => None,
                        })
                        .collect();
                    if !alerts.is_empty() {
                        self.machine
                            .post_alerts(&alerts)
                            .await
                            .map_err(|e| (i, e))?;
                        if let Ok(mut p) = self.published.lock() {
                            for e in &queue[i..end] {
                                if let Entry::Ban { cidr, expires, .. } = e {
                                    p.insert(*cidr, *expires);
                                }
                            }
                            // Ended bans go now and then, not at every
                            // batch: a flood publishes thousands of batches.
                            if p.len() > 1024 && p.len().is_power_of_two() {
                                p.retain(|_, expires| *expires > now);
                            }
                        }
                        count(&self.health.status, "alerts_sent", alerts.len() as u64);
                    }
                    i = end;
                }
            }
        }
        Ok(())
    }
}

/// Pulls the fleet's decisions and hands them to the enforcer.
struct Subscriber {
    lapi: Lapi,
    key: String,
    every: Duration,
    scenarios: Vec<String>,
    published: Published,
    /// This host's machine: its decisions are its own.
    machine_id: Option<String>,
    /// With a machine: who made each new decision (`GET /v1/alerts`).
    lookup: Option<Machine>,
    foreign: mpsc::Sender<Foreign>,
    health: Health,
}

impl Subscriber {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut startup = true;
        loop {
            tick.tick().await;
            match self.lapi.stream(&self.key, startup).await {
                Ok(stream) => {
                    startup = false;
                    self.health.ok();
                    if let Ok(mut s) = self.health.status.lock() {
                        s.last_pull = Some(bans::now());
                    }
                    let foreign = self.take(stream.new, stream.deleted).await;
                    if (!foreign.bans.is_empty() || !foreign.lifts.is_empty())
                        && self.foreign.send(foreign).await.is_err()
                    {
                        return; // the enforcer is gone: the daemon stops
                    }
                }
                Err(e) => self.health.failed(&e),
            }
        }
    }

    fn wanted_scenario(&self, scenario: &str) -> bool {
        self.scenarios
            .iter()
            .any(|s| s == "*" || scenario == s || (s.ends_with('/') && scenario.starts_with(s)))
    }

    /// The bans and lifts a pull brings.
    async fn take(&mut self, new: Vec<Decision>, deleted: Vec<Decision>) -> Foreign {
        let now = bans::now();
        let mut chosen = Vec::new();
        for d in new {
            if !d.kind.eq_ignore_ascii_case("ban") || !self.wanted_scenario(&d.scenario) {
                continue;
            }
            let Some(cidr) = decision_cidr(&d) else {
                continue;
            };
            let Some(left) = parse_go_duration(&d.duration).filter(|l| l.as_secs() >= 1) else {
                continue;
            };
            let own = d.origin == ORIGIN
                && self
                    .published
                    .lock()
                    .is_ok_and(|p| p.get(&cidr).is_some_and(|e| *e > now));
            if own {
                count(&self.health.status, "own", 1);
                continue;
            }
            chosen.push((d, cidr, left));
        }
        let makers = if chosen.iter().any(|(d, ..)| d.origin == ORIGIN) {
            self.makers().await
        } else {
            HashMap::new()
        };
        let mut bans = Vec::new();
        for (d, cidr, left) in chosen {
            let maker = makers.get(&d.id).cloned();
            if maker.is_some() && maker == self.machine_id {
                count(&self.health.status, "own", 1);
                continue;
            }
            let from =
                maker.map_or_else(|| format!("origin {}", d.origin), |m| format!("from {m}"));
            bans.push(Wanted {
                cidr,
                reason: format!("{REASON_PREFIX}: {} {from} via crowdsec", d.scenario),
                term: Term::Foreign(left),
            });
        }
        let lifts: Vec<Cidr> = deleted
            .iter()
            .filter(|d| d.kind.eq_ignore_ascii_case("ban"))
            .filter_map(decision_cidr)
            .collect();
        Foreign {
            bans,
            lifts,
            lift_prefix: REASON_PREFIX,
        }
    }

    /// Which machine made each recent spamdelay decision, by decision id.
    async fn makers(&mut self) -> HashMap<i64, String> {
        let Some(machine) = &mut self.lookup else {
            return HashMap::new();
        };
        let since = self.every * 10 + Duration::from_secs(60);
        let alerts = match machine.recent_alerts(since).await {
            Ok(a) => a,
            Err(e) => {
                warn!("CrowdSec subscribing: looking up who made the new decisions: {e}");
                return HashMap::new();
            }
        };
        let mut makers = HashMap::new();
        for a in alerts {
            let who = a
                .get("meta")
                .and_then(Value::as_array)
                .and_then(|m| {
                    m.iter().find_map(|kv| {
                        (kv.get("key")?.as_str()? == "machine")
                            .then(|| kv.get("value")?.as_str())?
                    })
                })
                .or_else(|| a.get("machine_id").and_then(Value::as_str))
                .map(String::from);
            let Some(who) = who else { continue };
            for d in a
                .get("decisions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(id) = d.get("id").and_then(Value::as_i64) {
                    makers.insert(id, who.clone());
                }
            }
        }
        makers
    }
}

/// A decision's address or network, for the scopes spamdelay bans.
fn decision_cidr(d: &Decision) -> Option<Cidr> {
    let scope = d.scope.to_ascii_lowercase();
    if scope != "ip" && scope != "range" {
        return None;
    }
    d.value.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_go_the_way_go_writes_them() {
        assert_eq!(go_duration(3600), "1h");
        assert_eq!(go_duration(7 * 86400), "168h");
        assert_eq!(go_duration(5400), "90m");
        assert_eq!(go_duration(61), "61s");
        assert_eq!(go_duration(0), "1s");
        assert_eq!(
            parse_go_duration("3h59m58.5s"),
            Some(Duration::from_secs_f64(4.0 * 3600.0 - 1.5))
        );
        assert_eq!(
            parse_go_duration("1.5ms"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(
            parse_go_duration("168h"),
            Some(Duration::from_secs(168 * 3600))
        );
        assert_eq!(parse_go_duration("-2s"), None);
        assert_eq!(parse_go_duration("1d"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn an_alert_carries_its_decision_and_ends_with_the_ban() {
        let cidr: Cidr = "198.51.100.10".parse().unwrap();
        let a = alert(
            &cidr,
            "spamdelay/early-talk",
            "early-talk 5B after 0.00s: x",
            1_800_000_000,
            1_800_003_600,
            "mx1.example",
            "mx-a",
        );
        assert_eq!(a["source"]["scope"], "Ip");
        assert_eq!(a["source"]["value"], "198.51.100.10");
        assert_eq!(a["stop_at"], "2027-01-15T08:00:00Z");
        let d = &a["decisions"][0];
        assert_eq!(d["duration"], "1h");
        assert_eq!(d["origin"], "spamdelay");
        assert_eq!(d["scenario"], "spamdelay/early-talk");
        let net: Cidr = "2001:db8::/64".parse().unwrap();
        let a = alert(
            &net,
            "spamdelay/early-talk",
            "aggregate: x",
            10,
            70,
            "h",
            "m",
        );
        assert_eq!(a["source"]["scope"], "Range");
        assert_eq!(a["decisions"][0]["value"], "2001:db8::/64");
        assert_eq!(a["decisions"][0]["duration"], "1m");
    }

    #[test]
    fn scenarios_follow_the_reason() {
        assert_eq!(
            scenario("early-talk 5B after 0.00s: x"),
            "spamdelay/early-talk"
        );
        assert_eq!(scenario("quit after 1.00s"), "spamdelay/quit");
        assert_eq!(scenario("manual: spam run"), "spamdelay/manual");
        assert_eq!(scenario("aggregate: 4 addresses"), "spamdelay/early-talk");
        let fleet = Ban {
            expires: 10,
            reason: "fleet: spamdelay/early-talk from mx-b via crowdsec".into(),
            offences: 1,
            remember_until: 10,
        };
        assert_eq!(ban_entry(&"192.0.2.1".parse().unwrap(), &fleet, 1), None);
    }

    #[test]
    fn flags_need_each_other() {
        let mut a = FleetArgs {
            crowdsec_pull_every: Duration::from_secs(1),
            ..Default::default()
        };
        assert!(a.check().is_ok(), "off");
        a.crowdsec_lapi = Some(lapi_url("http://192.0.2.1:8080").unwrap());
        assert!(
            a.check()
                .unwrap_err()
                .to_string()
                .contains("needs --crowdsec-machine")
        );
        a.crowdsec_bouncer_key_file = Some("/k".into());
        assert!(a.check().is_ok());
        assert!(lapi_url("ftp://x").is_err());
        assert!(lapi_url("192.0.2.1:8080").is_err());
    }
}
