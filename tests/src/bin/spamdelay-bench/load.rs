//! The lab's tools and load generators: the daemon, iperf3, smtp-sink and
//! smtp-source, blind clients (paced or in a burst), and when each was banned.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv6Addr, SocketAddr, TcpStream},
    ops::Range,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use socket2::{Domain, Socket, Type};
use spamdelay::clock::boot_ns;
use spamdelay_tests::{
    bench::{Background, percentile, sorted},
    daemon::{self, Daemon},
    fail2ban,
    flood::{self, ANYIP_NET, anyip_addr},
    lab::{Lab, SERVER_IF, SERVER_V4},
    mta::postfix,
    nft,
};

use crate::check_interrupted;

const IPERF_PORT: &str = "5201";
const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
/// What a blind client sends before any greeting.
const BLIND_PAYLOAD: &[u8] = b"EHLO blind.example\r\nMAIL FROM:<spam@example.com>\r\n";
/// Connections queued at the lab's server during a burst (its namespace's
/// somaxconn and SYN backlog are raised to match).
pub(crate) const ACCEPT_BACKLOG: i32 = 8192;
/// Client threads for a burst: a connect over the veth takes microseconds;
/// more threads than cores only add contention.
const BURST_THREADS: usize = 4;
/// SMTP sessions smtp-source keeps open at once.
pub(crate) const SMTP_PARALLEL: &str = "8";

/// Everything the measurements drive; a missing one stops the run before
/// anything is set up, with the command that installs it.
pub(crate) fn check_tools() -> Result<()> {
    let on_path = |p: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
    };
    let mut apt = Vec::new();
    let mut scripts = Vec::new();
    if !on_path("ip") {
        apt.push("iproute2");
    }
    if !on_path("nft") {
        apt.push("nftables");
    }
    if !on_path("iperf3") {
        apt.push("iperf3");
    }
    if !fail2ban::installed() {
        apt.extend(["fail2ban", "python3-pyinotify"]);
    }
    if !postfix::installed()
        || !std::path::Path::new(SMTP_SINK).is_file()
        || !std::path::Path::new(SMTP_SOURCE).is_file()
    {
        scripts.push("bash tests/mta/install-postfix.sh");
    }
    if apt.is_empty() && scripts.is_empty() {
        return Ok(());
    }
    let mut how = Vec::new();
    if !apt.is_empty() {
        how.push(format!(
            "apt-get update && apt-get install -y --no-install-recommends {}",
            apt.join(" ")
        ));
    }
    how.extend(scripts.iter().map(|s| s.to_string()));
    bail!(
        "missing tools; install them as root with:\n  {}\n(postfix brings smtp-sink and smtp-source)",
        how.join("\n  ")
    )
}

/// How the daemon is scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Priority {
    /// As the packaged unit runs it (`CPUSchedulingPolicy=fifo`,
    /// `CPUSchedulingPriority=1` in dist/systemd/spamdelay.service).
    Unit,
    /// The default policy, as `spamdelay run` from a shell.
    Normal,
}

impl Priority {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Priority::Unit => "SCHED_FIFO 1, as the packaged unit runs it",
            Priority::Normal => "normal priority, as run from a shell",
        }
    }
}

/// Gives every thread of `pid` the unit's scheduling (`chrt -f -a -p 1`);
/// threads it starts later inherit it, as under systemd.
fn as_the_unit_runs_it(pid: u32) -> Result<()> {
    let out = Command::new("chrt")
        .args(["-f", "-a", "-p", "1", &pid.to_string()])
        .output()
        .context("running chrt (util-linux)")?;
    if !out.status.success() {
        bail!(
            "chrt -f -a -p 1 {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The release daemon on the server's veth with `args` after `--iface`,
/// scheduled as the packaged unit runs it; checked to be attached with TCX,
/// as the empty baseline is.
pub(crate) fn start_daemon(lab: &Lab, args: &[&str]) -> Result<Daemon> {
    start_daemon_at(lab, args, Priority::Unit)
}

/// `start_daemon` with the given scheduling.
pub(crate) fn start_daemon_at(lab: &Lab, args: &[&str], priority: Priority) -> Result<Daemon> {
    let mut all = vec!["--iface", SERVER_IF];
    all.extend_from_slice(args);
    let d = Daemon::start(&lab.server, &all)?;
    let watching = d
        .lines()
        .into_iter()
        .find(|l| l.starts_with("watching port"))
        .unwrap_or_default();
    // `watching port 25 on IFACE (tcx)`, or `(tcx, pinned)`.
    let tcx = watching
        .split_once('(')
        .is_some_and(|(_, how)| how.starts_with("tcx)") || how.starts_with("tcx,"));
    if !tcx {
        bail!("spamdelay did not attach with TCX ({watching:?}): the baseline would not compare");
    }
    if priority == Priority::Unit {
        as_the_unit_runs_it(d.pid())?;
    }
    Ok(d)
}

/// Stops the daemon and removes its table, so "without spamdelay" has no
/// nft rules of spamdelay's either. Returns its log.
pub(crate) fn stop_daemon(lab: &Lab, d: Daemon) -> Result<Vec<String>> {
    let (status, lines) = d.stop()?;
    if !status.success() {
        bail!("spamdelay exited with {status}");
    }
    let _ = nft::nft(&lab.server, &["delete", "table", "inet", "spamdelay"]);
    Ok(lines)
}

pub(crate) fn iperf3_server(lab: &Lab) -> Result<Background> {
    Background::start(
        &lab.server,
        "iperf3",
        &["-s", "-B", &SERVER_V4.to_string(), "-p", IPERF_PORT],
    )
}

/// One iperf3 run from the client namespace; received bits per second.
pub(crate) fn iperf3(lab: &Lab, secs: u32) -> Result<f64> {
    let out = lab
        .client
        .command("iperf3")
        .args(["-c", &SERVER_V4.to_string(), "-p", IPERF_PORT, "-J"])
        .args(["-t", &secs.to_string()])
        .output()
        .context("running iperf3")?;
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        bail!(
            "iperf3 failed ({}): {} {}",
            out.status,
            doc["error"].as_str().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    doc["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.bits_per_second")
}

/// Postfix's smtp-sink on 192.0.2.25:25: greets at once, takes every
/// message and throws it away.
pub(crate) fn smtp_sink(lab: &Lab) -> Result<Background> {
    Background::start(
        &lab.server,
        SMTP_SINK,
        &[
            "-u",
            "nobody",
            "-h",
            "mx.example.test",
            &format!("{SERVER_V4}:25"),
            "1024",
        ],
    )
}

/// `sessions` SMTP sessions, one message each, SMTP_PARALLEL at a time, by
/// smtp-source from the client namespace; how long they took. smtp-source
/// waits for the greeting: a patient client.
pub(crate) fn smtp_source(lab: &Lab, sessions: u32) -> Result<Duration> {
    let t = Instant::now();
    let out = lab
        .client
        .command(SMTP_SOURCE)
        .args(["-s", SMTP_PARALLEL, "-m", &sessions.to_string()])
        .args(["-M", "client.example", "-f", "sender@example.org"])
        .args(["-t", "user@mx.example.test", &format!("{SERVER_V4}:25")])
        .output()
        .context("running smtp-source")?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "smtp-source failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Many short sessions from one client address: let TIME_WAIT ports be
/// reused and widen the port range (the client namespace's own settings).
pub(crate) fn tune_for_sessions(lab: &Lab) -> Result<()> {
    flood::sysctl(&lab.client, "net.ipv4.tcp_tw_reuse", "1")?;
    flood::sysctl(&lab.client, "net.ipv4.ip_local_port_range", "1024 65535")?;
    flood::sysctl(&lab.server, "net.core.somaxconn", "4096")
}

/// Clients from `ANYIP_NET`: every address of it local to the client
/// namespace, routed there from the server through one neighbour (the
/// client veth's ::10; thousands of on-link neighbours would overflow the
/// kernel's neighbour table), and a server namespace ready for bursts.
pub(crate) fn prepare_many_clients(lab: &Lab) -> Result<()> {
    flood::route_local(&lab.client, ANYIP_NET)?;
    let gateway = Lab::client_v6(0).to_string();
    lab.server.ip(&[
        "-6", "route", "add", ANYIP_NET, "via", &gateway, "dev", SERVER_IF,
    ])?;
    let backlog = ACCEPT_BACKLOG.to_string();
    flood::sysctl(&lab.server, "net.core.somaxconn", &backlog)?;
    flood::sysctl(&lab.server, "net.ipv4.tcp_max_syn_backlog", &backlog)
}

/// Counter `name` from the daemon's `stopping:` lines (the kernel's
/// counters and the daemon's own are on lines of their own), the last
/// line that has it.
pub(crate) fn stop_counter(lines: &[String], name: &str) -> Option<u64> {
    lines
        .iter()
        .rev()
        .filter(|l| l.starts_with("stopping:"))
        .find_map(|l| daemon::counter_in(l, name))
}

/// Blind clients, one per address: each address and the moment just before
/// its first payload was written.
#[derive(Default)]
pub(crate) struct Sent {
    pub(crate) at: Vec<(Ipv6Addr, Instant)>,
    /// Open connections, held so that closing them adds no packets while
    /// bans are timed.
    streams: Vec<TcpStream>,
    pub(crate) errors: usize,
    pub(crate) first_error: Option<String>,
}

impl Sent {
    fn merge(&mut self, other: Sent) {
        self.at.extend(other.at);
        self.streams.extend(other.streams);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn failed(&mut self, e: anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{e:#}"));
    }
}

/// Blind clients `ids` (`anyip_addr`) to `dst` at `rate` per second, from one
/// thread in the client namespace.
pub(crate) fn paced_blind(lab: &Lab, ids: Range<u32>, rate: f64, dst: SocketAddr) -> Result<Sent> {
    lab.client.run(move || -> Result<Sent> {
        let mut sent = Sent::default();
        let start = Instant::now();
        for (k, i) in ids.enumerate() {
            if k % 64 == 0 {
                check_interrupted()?;
            }
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let src = anyip_addr(i);
            match flood::talk_first_freebind(src, dst, BLIND_PAYLOAD) {
                Ok((stream, at)) => {
                    sent.at.push((src, at));
                    sent.streams.push(stream);
                }
                Err(e) => sent.failed(e),
            }
        }
        Ok(sent)
    })?
}

/// Blind clients `ids` to `dst` all at once, BURST_THREADS in parallel.
/// With `reset`, each connection is reset right after its payload (no
/// stream kept: a flood of any size fits in the open-file limit).
pub(crate) fn burst_blind(
    lab: &Lab,
    ids: Range<u32>,
    dst: SocketAddr,
    reset: bool,
) -> Result<Sent> {
    let per = ids.len().div_ceil(BURST_THREADS).max(1) as u32;
    let workers: Vec<_> = (0..BURST_THREADS as u32)
        .map(|t| {
            let from = ids.start + t * per;
            let part = from..(from + per).min(ids.end);
            lab.client.spawn(move || -> Result<Sent> {
                let mut sent = Sent::default();
                for (k, i) in part.enumerate() {
                    if k % 1024 == 0 {
                        check_interrupted()?;
                    }
                    let src = anyip_addr(i);
                    match flood::talk_first_freebind(src, dst, BLIND_PAYLOAD) {
                        Ok((stream, at)) => {
                            sent.at.push((src, at));
                            if reset {
                                if let Err(e) = flood::reset(stream) {
                                    sent.failed(e);
                                }
                            } else {
                                sent.streams.push(stream);
                            }
                        }
                        Err(e) => sent.failed(e),
                    }
                }
                Ok(sent)
            })
        })
        .collect();
    let mut all = Sent::default();
    for w in workers {
        match w.join() {
            Ok(r) => all.merge(r??),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    Ok(all)
}

/// How a blind client's second connection, opened right after its early
/// talk, ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reconnect {
    /// Its SYN-ACK came: nothing refused it.
    Connected,
    /// A reset: nft's ban (`--action reject`).
    Reset,
    /// No answer within the wait: its SYN was dropped.
    NoAnswer,
    /// Any other error, as the kernel gave it.
    Failed(String),
}

/// One blind client's early talk and its reconnect.
pub(crate) struct Reconnected {
    pub(crate) addr: Ipv6Addr,
    /// Just before the payload was written.
    pub(crate) payload_at: Instant,
    /// Just before the payload was written, on CLOCK_BOOTTIME (the clock
    /// of the kernel's stamps), ns.
    pub(crate) payload_boot_ns: u64,
    /// Just before the second connect.
    pub(crate) reconnect_at: Instant,
    pub(crate) outcome: Reconnect,
}

/// Blind clients `ids` to `dst` at `rate` per second, from one thread in the
/// client namespace; each connects again from the same address `after` its
/// payload, and that connection is judged `wait` later, by then well past
/// its SYN-ACK if one came and before the SYN's first retransmission (1 s).
/// The waits overlap, so the pace holds.
pub(crate) fn paced_blind_reconnect(
    lab: &Lab,
    ids: Range<u32>,
    rate: f64,
    dst: SocketAddr,
    after: Duration,
    wait: Duration,
) -> Result<(Sent, Vec<Reconnected>)> {
    lab.client
        .run(move || blind_reconnects(ids, rate, dst, after, wait))?
}

/// `paced_blind_reconnect` on a thread inside the client namespace.
fn blind_reconnects(
    ids: Range<u32>,
    rate: f64,
    dst: SocketAddr,
    after: Duration,
    wait: Duration,
) -> Result<(Sent, Vec<Reconnected>)> {
    // The payload wakes the daemon, which would otherwise take this thread's
    // core (two cores) and push the reconnect back by a millisecond or more.
    // The thread spins at most `after` and sleeps otherwise, so a real-time
    // priority starves nobody. Best effort: without it the reconnects are
    // only later, and their gaps are reported.
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets this thread's own policy from a local struct.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    let mut sent = Sent::default();
    let mut probes = Probes::default();
    let start = Instant::now();
    for (k, i) in ids.enumerate() {
        if k % 64 == 0 {
            check_interrupted()?;
        }
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        probes.judge_until(Some(due));
        if let Some(left) = due.checked_duration_since(Instant::now()) {
            thread::sleep(left);
        }
        let src = anyip_addr(i);
        let (stream, at) = match flood::talk_first_freebind(src, dst, BLIND_PAYLOAD) {
            Ok(talked) => talked,
            Err(e) => {
                sent.failed(e);
                continue;
            }
        };
        let payload_boot_ns = boot_ns().saturating_sub(nanos(at.elapsed()));
        sent.at.push((src, at));
        sent.streams.push(stream);
        // A spin, not a sleep: a sleep this short overshoots by tens of
        // microseconds.
        let go = at + after;
        while Instant::now() < go {
            std::hint::spin_loop();
        }
        let reconnect_at = Instant::now();
        let probe = Reconnected {
            addr: src,
            payload_at: at,
            payload_boot_ns,
            reconnect_at,
            outcome: Reconnect::NoAnswer,
        };
        probes.start(probe, connect_nonblocking(src, dst), reconnect_at + wait);
    }
    probes.judge_until(None);
    Ok((sent, probes.done))
}

/// Reconnects in flight, each judged at its deadline.
#[derive(Default)]
struct Probes {
    /// In the order they were opened, so their deadlines are in order too.
    pending: VecDeque<(Socket, Instant, Reconnected)>,
    done: Vec<Reconnected>,
}

impl Probes {
    fn start(&mut self, mut probe: Reconnected, sock: Result<Socket>, deadline: Instant) {
        match sock {
            Ok(sock) => self.pending.push_back((sock, deadline, probe)),
            Err(e) => {
                probe.outcome = Reconnect::Failed(format!("{e:#}"));
                self.done.push(probe);
            }
        }
    }

    /// Judges every reconnect whose deadline is before `until` (all of them
    /// for none), sleeping to each deadline.
    fn judge_until(&mut self, until: Option<Instant>) {
        while let Some((_, deadline, _)) = self.pending.front() {
            if until.is_some_and(|u| *deadline > u) {
                break;
            }
            if let Some(left) = deadline.checked_duration_since(Instant::now()) {
                thread::sleep(left);
            }
            if let Some((sock, _, mut probe)) = self.pending.pop_front() {
                probe.outcome = reconnect_outcome(&sock);
                self.done.push(probe);
            }
        }
    }
}

/// Starts a connection from `src` (IPV6_FREEBIND) to `dst` without waiting
/// for it.
fn connect_nonblocking(src: Ipv6Addr, dst: SocketAddr) -> Result<Socket> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    sock.set_freebind_v6(true)
        .context("setting IPV6_FREEBIND")?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::new(src.into(), 0).into())
        .with_context(|| format!("binding {src}"))?;
    match sock.connect(&dst.into()) {
        Ok(()) => Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(sock),
        Err(e) => Err(e).with_context(|| format!("connecting {src} -> {dst}")),
    }
}

/// Where a non-blocking connect stands: a connected socket has a peer, a
/// reset one holds ECONNREFUSED, and one still waiting for its SYN-ACK has
/// neither.
fn reconnect_outcome(sock: &Socket) -> Reconnect {
    match sock.take_error() {
        Ok(None) if sock.peer_addr().is_ok() => Reconnect::Connected,
        Ok(None) => Reconnect::NoAnswer,
        Ok(Some(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reconnect::Reset,
        Ok(Some(e)) | Err(e) => Reconnect::Failed(e.to_string()),
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Milliseconds from each client's first payload to its address's first
/// element in `table`, and how many clients were never banned there.
pub(crate) fn ban_delays(added: &[nft::Added], table: &str, sent: &Sent) -> (Vec<f64>, usize) {
    let mut first: HashMap<Ipv6Addr, Instant> = HashMap::new();
    for a in added.iter().filter(|a| a.table == table) {
        if let Ok(addr) = a.element.parse::<Ipv6Addr>() {
            first.entry(addr).or_insert(a.at);
        }
    }
    let mut delays = Vec::with_capacity(sent.at.len());
    let mut missing = 0;
    for (addr, at) in &sent.at {
        match first.get(addr) {
            Some(banned) => delays.push(banned.saturating_duration_since(*at).as_secs_f64() * 1e3),
            None => missing += 1,
        }
    }
    (delays, missing)
}

/// p50 / p99 / max of millisecond delays, for a table cell.
pub(crate) fn delay_cell(ms: &[f64]) -> String {
    let s = sorted(ms);
    if s.is_empty() {
        return "no bans".into();
    }
    format!(
        "p50 {} · p99 {} · max {}",
        fmt_ms(percentile(&s, 50.0)),
        fmt_ms(percentile(&s, 99.0)),
        fmt_ms(percentile(&s, 100.0))
    )
}

fn fmt_ms(ms: f64) -> String {
    if ms < 0.1 {
        format!("{:.0} µs", ms * 1e3)
    } else if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

pub(crate) fn delay_json(ms: &[f64], missing: usize) -> Value {
    let s = sorted(ms);
    json!({
        "banned": s.len(),
        "missing": missing,
        "p50_ms": percentile(&s, 50.0),
        "p90_ms": percentile(&s, 90.0),
        "p99_ms": percentile(&s, 99.0),
        "max_ms": percentile(&s, 100.0),
        "min_ms": percentile(&s, 0.0),
    })
}

/// Connections per second over a burst, from its first to its last payload.
pub(crate) fn rate_of(sent: &Sent) -> String {
    let first = sent.at.iter().map(|(_, t)| *t).min();
    let last = sent.at.iter().map(|(_, t)| *t).max();
    match (first, last) {
        (Some(f), Some(l)) if l > f => {
            format!("{:.0}", sent.at.len() as f64 / (l - f).as_secs_f64())
        }
        _ => "?".into(),
    }
}
