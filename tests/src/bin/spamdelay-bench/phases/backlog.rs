//! Measurement 5's second half, the daemon's own ban rate: with the daemon
//! stopped (SIGSTOP), a round of early talkers fills the kernel's ring buffer
//! with verdicts; then SIGCONT, and the watcher times the bans of that
//! backlog. The verdicts all wait there: the load generator cannot set the pace.

use std::{
    net::SocketAddr,
    ops::Range,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData, MapInfo, PerCpuArray};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};
use spamdelay_common::{Event, Stat};
use spamdelay_tests::{
    bench::{Spread, percentile, sorted},
    daemon::pin_dir_for,
    lab::{Lab, SERVER_V6},
    nlmon::Watcher,
};

use crate::{
    check_interrupted,
    load::{burst_blind, start_daemon, stop_counter, stop_daemon},
    phases::flood::MIN_BANS_PER_S,
    report::{Outcome, Ratio, Row, Verdict},
};

/// A round fills at most this share of the ring buffer: the rest is room
/// for anything else the kernel reports meanwhile.
const FILL: f64 = 0.9;
/// How long the kernel may take to write a round's verdicts once the last
/// payload is sent.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// One round: verdicts queued while the daemon was stopped, and their bans.
struct Round {
    clients: usize,
    /// Verdicts the kernel wrote in the round (its early_talk counter).
    queued: u64,
    banned: usize,
    /// SIGCONT → first ban, SIGCONT → last ban, first → last ban.
    to_first_s: f64,
    to_last_s: f64,
    first_to_last_s: f64,
}

impl Round {
    fn rate(&self) -> f64 {
        self.banned as f64 / self.to_last_s
    }
}

/// What the rounds showed, and the daemon's word on what was lost.
pub(crate) struct Backlog {
    ring_bytes: u32,
    /// Verdicts the ring buffer holds, and the most a round queues.
    capacity: usize,
    per_round_max: usize,
    rounds: Vec<Round>,
    ringbuf_full: Option<u64>,
    connect_errors: usize,
    watched: String,
}

/// Ring-buffer rounds over clients `ids` (their early talk queued while the
/// daemon is stopped), against a fresh daemon with sets of `set_size`.
pub(crate) fn drain(lab: &Lab, ids: Range<u32>, set_size: &str) -> Result<Backlog> {
    let daemon = start_daemon(lab, &["--mta", "none", "--set-size", set_size])?;
    let pins = pin_dir_for(daemon.state().path());
    let ring_bytes = MapInfo::from_pin(pins.join("EVENTS"))
        .context("reading the pinned ring buffer's size")?
        .max_entries();
    let stats = Counters::open(&pins)?;
    // A ring buffer record: an 8-byte header, then the event, 8-byte aligned.
    let record = (size_of::<Event>() + 8).next_multiple_of(8);
    let capacity = ring_bytes as usize / record;
    let per_round_max = (capacity as f64 * FILL) as usize;
    let total = ids.len();
    let rounds = total.div_ceil(per_round_max).max(1);
    let per_round = total.div_ceil(rounds);
    let watcher = Watcher::start(&lab.server)?;
    let dst = SocketAddr::new(SERVER_V6.into(), 25);
    let pid = Pid::from_raw(i32::try_from(daemon.pid()).context("a pid")?);

    eprintln!(
        "bench: 5. {rounds} rounds of {per_round} verdicts queued in the {} KiB ring buffer ({record}-byte records)",
        ring_bytes / 1024
    );
    let mut done = Vec::with_capacity(rounds);
    let mut connect_errors = 0;
    let mut next = ids.start;
    while next < ids.end {
        check_interrupted()?;
        let round = next..(next + per_round as u32).min(ids.end);
        next = round.end;
        let seen_before = watcher.additions().added_to("spamdelay");
        let early_before = stats.sum(Stat::EarlyTalk)?;
        let stopped = Stopped::new(pid)?;
        let sent = burst_blind(lab, round, dst, true)?;
        connect_errors += sent.errors;
        let queued =
            stats.wait_for(Stat::EarlyTalk, early_before + sent.at.len() as u64)? - early_before;
        let cont = Instant::now();
        drop(stopped);
        let want = seen_before + sent.at.len();
        watcher.additions().wait_added(
            "spamdelay",
            want,
            Duration::from_secs(30),
            Duration::from_secs(5),
        );
        let added = watcher.additions().added();
        let bans: Vec<Instant> = added
            .iter()
            .filter(|a| a.table == "spamdelay")
            .skip(seen_before)
            .map(|a| a.at)
            .collect();
        let (Some(&first), Some(&last)) = (bans.first(), bans.last()) else {
            bail!("no ban after SIGCONT (round of {} verdicts)", sent.at.len());
        };
        let r = Round {
            clients: sent.at.len(),
            queued,
            banned: bans.len(),
            to_first_s: first.saturating_duration_since(cont).as_secs_f64(),
            to_last_s: last.saturating_duration_since(cont).as_secs_f64(),
            first_to_last_s: last.saturating_duration_since(first).as_secs_f64(),
        };
        eprintln!(
            "bench: 5. round {}: {} queued, {} banned, SIGCONT → last ban {:.1} ms ({:.0} bans/s)",
            done.len() + 1,
            r.queued,
            r.banned,
            r.to_last_s * 1e3,
            r.rate()
        );
        done.push(r);
    }
    let watched = watcher.describe();
    watcher.stop()?;
    let lines = stop_daemon(lab, daemon)?;
    Ok(Backlog {
        ring_bytes,
        capacity,
        per_round_max,
        rounds: done,
        ringbuf_full: stop_counter(&lines, "ringbuf_full"),
        connect_errors,
        watched,
    })
}

impl Backlog {
    fn clients(&self) -> usize {
        self.rounds.iter().map(|r| r.clients).sum()
    }

    fn banned(&self) -> usize {
        self.rounds.iter().map(|r| r.banned).sum()
    }

    /// Every ban of every round over the time from each SIGCONT to the
    /// round's last ban: the daemon's pace, wake-up and first batch included.
    fn rate(&self) -> f64 {
        let s: f64 = self.rounds.iter().map(|r| r.to_last_s).sum();
        self.banned() as f64 / s
    }

    /// The same from each round's first ban to its last (the end-to-end
    /// row's definition).
    fn rate_between_bans(&self) -> f64 {
        let s: f64 = self.rounds.iter().map(|r| r.first_to_last_s).sum();
        self.banned() as f64 / s
    }

    fn lost(&self) -> Option<u64> {
        let unbanned = self.clients().saturating_sub(self.banned()) as u64;
        Some(self.ringbuf_full? + unbanned)
    }

    pub(crate) fn report(&self, out: &mut Outcome) {
        let rates: Vec<f64> = self.rounds.iter().map(Round::rate).collect();
        let spread = Spread::of(&rates);
        let to_first: Vec<f64> = self.rounds.iter().map(|r| r.to_first_s * 1e3).collect();
        out.rows.push(Row {
            metric: format!(
                "flood: the daemon's ban rate, {} rounds of ≤ {} verdicts queued in the ring buffer while it was stopped (SIGSTOP), {} in all: bans ÷ SIGCONT → last ban",
                self.rounds.len(),
                self.rounds.iter().map(|r| r.clients).max().unwrap_or(0),
                self.clients()
            ),
            a: format!(
                "{:.0} bans/s (rounds {}; first → last ban {:.0}/s; SIGCONT → first ban p50 {:.1} ms); lost {} (ringbuf_full {}, not banned {})",
                self.rate(),
                spread.map_or("-".into(), |s| format!(
                    "{:.0} / {:.0} / {:.0}",
                    s.min, s.median, s.max
                )),
                self.rate_between_bans(),
                percentile(&sorted(&to_first), 50.0),
                self.lost().map_or("?".into(), |l| l.to_string()),
                self.ringbuf_full.map_or("?".into(), |v| v.to_string()),
                self.clients().saturating_sub(self.banned()),
            ),
            b: "—".into(),
            ratio: Ratio::None,
            target: format!("≥ {MIN_BANS_PER_S} bans/s, 0 lost"),
            verdict: match self.lost() {
                None => Verdict::Failed,
                Some(lost) => {
                    Verdict::of(lost == 0 && self.rate() >= f64::from(MIN_BANS_PER_S))
                }
            },
        });
        out.notes.push(format!(
            "flood backlog: the ring buffer holds {} KiB, {} verdicts; a round queues at most {} while the daemon is stopped, all of them written (the kernel's early_talk counter, read from the pinned map) before SIGCONT; rates per round as min / median / max; stamps by the {}{}",
            self.ring_bytes / 1024,
            self.capacity,
            self.per_round_max,
            self.watched,
            if self.connect_errors > 0 {
                format!("; {} clients could not connect", self.connect_errors)
            } else {
                String::new()
            }
        ));
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "ring_bytes": self.ring_bytes,
            "capacity": self.capacity,
            "per_round_max": self.per_round_max,
            "clients": self.clients(),
            "banned": self.banned(),
            "ringbuf_full": self.ringbuf_full,
            "connect_errors": self.connect_errors,
            "bans_per_second_sigcont_to_last": self.rate(),
            "bans_per_second_first_to_last": self.rate_between_bans(),
            "rounds": self.rounds.iter().map(|r| json!({
                "clients": r.clients, "queued": r.queued, "banned": r.banned,
                "sigcont_to_first_s": r.to_first_s, "sigcont_to_last_s": r.to_last_s,
                "first_to_last_s": r.first_to_last_s, "bans_per_second": r.rate(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The daemon stopped (SIGSTOP, every thread of it) until dropped (SIGCONT).
struct Stopped(Pid);

impl Stopped {
    fn new(pid: Pid) -> Result<Stopped> {
        kill(pid, Signal::SIGSTOP).context("SIGSTOP to the daemon")?;
        let stopped = Stopped(pid);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !all_threads_stopped(pid)? {
            if Instant::now() > deadline {
                bail!("the daemon did not stop within 2 s of SIGSTOP");
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(stopped)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Err(e) = kill(self.0, Signal::SIGCONT) {
            eprintln!("bench: SIGCONT to the daemon ({}): {e}", self.0);
        }
    }
}

/// Whether every thread of `pid` is in state T (stopped).
fn all_threads_stopped(pid: Pid) -> Result<bool> {
    let dir = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let stat = task
            .with_context(|| format!("reading {dir}"))?
            .path()
            .join("stat");
        let text = std::fs::read_to_string(&stat)
            .with_context(|| format!("reading {}", stat.display()))?;
        // `PID (COMM) STATE ...`: COMM may hold spaces and parentheses.
        let state = text
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if state != Some("T") {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The kernel's counters, read from the daemon's pinned STATS map: they go
/// on while the daemon is stopped.
struct Counters(PerCpuArray<MapData, u64>);

impl Counters {
    fn open(pins: &Path) -> Result<Counters> {
        let pin = pins.join("STATS");
        let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let map = PerCpuArray::try_from(Map::PerCpuArray(data))
            .with_context(|| format!("{} as a per-CPU array", pin.display()))?;
        Ok(Counters(map))
    }

    fn sum(&self, stat: Stat) -> Result<u64> {
        Ok(self
            .0
            .get(&(stat as u32), 0)
            .with_context(|| format!("reading counter {}", stat.name()))?
            .iter()
            .sum())
    }

    /// Waits up to QUEUE_WAIT for counter `stat` to reach `value`; what it
    /// reached.
    fn wait_for(&self, stat: Stat, value: u64) -> Result<u64> {
        let deadline = Instant::now() + QUEUE_WAIT;
        loop {
            let now = self.sum(stat)?;
            if now >= value || Instant::now() > deadline {
                return Ok(now);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}
