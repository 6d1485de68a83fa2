//! `cargo xtask bench [--quick]`: spamdelay measured against baselines in a
//! namespace lab, each comparison alternated A/B in rounds within one run so
//! a noisy machine shows up as spread rather than as a fake result. Prints a
//! markdown table, writes JSON to target/bench/, and exits non-zero only when
//! a measurement could not run, never because of a number.

use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    ops::Range,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use serde_json::{Value, json};
use spamdelay_tests::{
    bench::{
        Attached, Background, BpfStats, EmptyClassifier, Spread, percentile, proc_cost, sorted,
        tcx_programs, total,
    },
    daemon::{self, Daemon, counter},
    fail2ban::{self, Fail2ban},
    flood::{self, ANYIP_NET, SilentServer, anyip_addr},
    lab::{Lab, SERVER_IF, SERVER_V4, SERVER_V6},
    mta::postfix::{self, Postfix},
    nft::{self, Monitor},
};

const USAGE: &str = "\
usage: spamdelay-bench [--quick] [--only N[,N...]]
  --quick   fewer rounds and clients (about a minute instead of 10)
  --only    run only these measurements (1 kernel cost, 2 throughput,
            3 SMTP connection rate, 4 time to ban, 5 flood scale, 6 fail2ban)
Run it through `cargo xtask bench`, which builds everything in release mode
and points SPAMDELAY_BIN at the release daemon.";

const IPERF_PORT: &str = "5201";
const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
/// What a blind client sends before any greeting.
const BLIND_PAYLOAD: &[u8] = b"EHLO blind.example\r\nMAIL FROM:<spam@example.com>\r\n";
/// Connections queued at the lab's server during a burst (its namespace's
/// somaxconn and SYN backlog are raised to match).
const ACCEPT_BACKLOG: i32 = 8192;
/// Client threads for a burst: a connect over the veth takes microseconds;
/// more threads than cores only add contention.
const BURST_THREADS: usize = 4;
/// SMTP sessions smtp-source keeps open at once.
const SMTP_PARALLEL: &str = "8";

/// Raised by the SIGINT/SIGTERM/SIGHUP handler; every phase looks at it
/// between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// How much of everything.
struct Plan {
    quick: bool,
    /// A/B rounds per comparison.
    rounds: usize,
    /// iperf3 run length per side and round.
    iperf_secs: u32,
    /// smtp-source sessions per side and round for the kernel cost.
    kernel_sessions: u32,
    /// Target length of one connection-rate measurement.
    rate_secs: f64,
    /// Time to ban: clients at a modest rate, then as many at once.
    ttb_clients: u32,
    ttb_rate: f64,
    /// Flood scale: distinct early talkers, and the longest wait for bans.
    flood_clients: u32,
    flood_wait: Duration,
    /// fail2ban side by side: clients and their rate.
    f2b_clients: u32,
    f2b_rate: f64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 3,
                iperf_secs: 1,
                kernel_sessions: 300,
                rate_secs: 1.0,
                ttb_clients: 1000,
                ttb_rate: 250.0,
                flood_clients: 10_000,
                flood_wait: Duration::from_secs(60),
                f2b_clients: 30,
                f2b_rate: 10.0,
            }
        } else {
            Plan {
                quick,
                rounds: 7,
                iperf_secs: 2,
                kernel_sessions: 1000,
                rate_secs: 3.0,
                ttb_clients: 1000,
                ttb_rate: 100.0,
                flood_clients: 100_000,
                flood_wait: Duration::from_secs(150),
                f2b_clients: 80,
                f2b_rate: 10.0,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    /// Reported without a target.
    Info,
    /// Something happened that must not (a patient client banned).
    Bug,
    /// The measurement could not run.
    Failed,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Info => "—",
            Verdict::Bug => "**BUG**",
            Verdict::Failed => "**could not run**",
        }
    }

    fn of(met: bool) -> Verdict {
        if met { Verdict::Met } else { Verdict::Missed }
    }
}

/// The ratio cell: A/B per round, or one ratio of two distributions.
enum Ratio {
    None,
    Rounds(Spread),
    Single(f64),
}

struct Row {
    metric: String,
    a: String,
    b: String,
    ratio: Ratio,
    target: String,
    verdict: Verdict,
}

impl Row {
    fn info(metric: impl Into<String>, a: impl Into<String>) -> Row {
        Row {
            metric: metric.into(),
            a: a.into(),
            b: "—".into(),
            ratio: Ratio::None,
            target: "—".into(),
            verdict: Verdict::Info,
        }
    }

    fn json(&self) -> Value {
        let ratio = match self.ratio {
            Ratio::None => Value::Null,
            Ratio::Rounds(s) => json!({"min": s.min, "median": s.median, "max": s.max}),
            Ratio::Single(r) => json!({"single": r}),
        };
        json!({
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
            "ratio": ratio,
            "target": self.target,
            "verdict": format!("{:?}", self.verdict).to_lowercase(),
        })
    }
}

/// What one measurement produced: table rows, its raw figures, notes.
#[derive(Default)]
struct Outcome {
    rows: Vec<Row>,
    detail: serde_json::Map<String, Value>,
    notes: Vec<String>,
}

/// Per-round values of side A and side B.
#[derive(Default)]
struct Rounds {
    a: Vec<f64>,
    b: Vec<f64>,
}

impl Rounds {
    fn push(&mut self, side: Side, v: f64) {
        match side {
            Side::A => self.a.push(v),
            Side::B => self.b.push(v),
        }
    }

    fn ratios(&self) -> Vec<f64> {
        self.a.iter().zip(&self.b).map(|(a, b)| a / b).collect()
    }

    fn ratio(&self) -> Option<Spread> {
        Spread::of(&self.ratios())
    }

    fn median_a(&self) -> f64 {
        percentile(&sorted(&self.a), 50.0)
    }

    fn median_b(&self) -> f64 {
        percentile(&sorted(&self.b), 50.0)
    }

    fn json(&self) -> Value {
        json!({"a": self.a, "b": self.b, "ratios": self.ratios()})
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// A first in even rounds, B first in odd ones, so drift over the run
/// (thermal, a neighbour's load) falls on both sides alike.
fn sides(round: usize) -> [Side; 2] {
    if round.is_multiple_of(2) {
        [Side::A, Side::B]
    } else {
        [Side::B, Side::A]
    }
}

type Phase = fn(&Plan) -> Result<Outcome>;

const PHASES: [(u8, &str, Phase); 6] = [
    (1, "kernel cost per packet", kernel_cost),
    (2, "throughput", throughput),
    (3, "SMTP connection rate", connection_rate),
    (4, "time to ban", time_to_ban),
    (5, "flood scale", flood_scale),
    (6, "side by side with fail2ban", versus_fail2ban),
];

fn main() -> ExitCode {
    let mut quick = false;
    let mut only: Option<Vec<u8>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--only" => match args.next().map(|v| {
                v.split(',')
                    .map(|n| n.trim().parse::<u8>())
                    .collect::<Result<Vec<_>, _>>()
            }) {
                Some(Ok(v)) => only = Some(v),
                _ => {
                    eprintln!("--only takes measurement numbers, e.g. --only 1,4\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match run(quick, only) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: cannot run: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(quick: bool, only: Option<Vec<u8>>) -> Result<ExitCode> {
    // A handler that only raises a flag: a Ctrl-C then unwinds the phase
    // that runs at its next step, and its guards remove namespaces, servers
    // and the sysctl. (Blocking the signals instead would pass the mask on
    // to every child: the daemon would ignore the SIGTERM that stops it.)
    let on_signal = SigAction::new(
        SigHandler::Handler(note_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(s, &on_signal) }.with_context(|| format!("handling {s}"))?;
    }

    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF: run it as root");
    }
    check_tools()?;
    let bin = daemon::binary();
    if !bin.components().any(|c| c.as_os_str() == "release") {
        eprintln!(
            "bench: warning: the daemon is {} (not a release build): run `cargo xtask bench`",
            bin.display()
        );
    }
    let plan = Plan::new(quick);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut phases = serde_json::Map::new();
    let mut failed = false;
    for (n, name, phase) in PHASES {
        if only.as_ref().is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        eprintln!("bench: == {n}. {name}");
        let t = Instant::now();
        let result = phase(&plan);
        check_interrupted()?;
        match result {
            Ok(out) => {
                eprintln!("bench: {n}. done in {:.0}s", t.elapsed().as_secs_f64());
                rows.extend(out.rows.into_iter().map(|mut r| {
                    r.metric = format!("{n}. {}", r.metric);
                    r
                }));
                notes.extend(out.notes.into_iter().map(|s| format!("{n}. {s}")));
                let mut detail = out.detail;
                detail.insert("seconds".into(), json!(t.elapsed().as_secs_f64()));
                phases.insert(format!("{n}"), Value::Object(detail));
            }
            Err(e) => {
                failed = true;
                eprintln!("bench: {n}. {name} could not run: {e:#}");
                let mut row = Row::info(format!("{n}. {name}"), format!("{e:#}"));
                row.verdict = Verdict::Failed;
                rows.push(row);
                phases.insert(format!("{n}"), json!({"error": format!("{e:#}")}));
            }
        }
    }

    let table = markdown(&rows);
    println!(
        "\n## spamdelay bench{} (kernel {}, {} CPUs)\n",
        if plan.quick { " --quick" } else { "" },
        kernel_release(),
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{table}");
    if !notes.is_empty() {
        println!();
        for n in &notes {
            println!("- {n}");
        }
    }
    let doc = json!({
        "unix_time": started,
        "commit": commit(),
        "quick": plan.quick,
        "kernel": kernel_release(),
        "cpus": thread::available_parallelism().map_or(0, |n| n.get()),
        "daemon": bin.display().to_string(),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "notes": notes,
        "phases": phases,
    });
    let path = write_json(&doc, started)?;
    println!("\nJSON: {}", path.display());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Everything the measurements drive; a missing one stops the run before
/// anything is set up, with the command that installs it.
fn check_tools() -> Result<()> {
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

/// The workspace's commit, `+dirty` with uncommitted changes: what was
/// measured.
fn commit() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match (git(&["rev-parse", "HEAD"]), git(&["status", "--porcelain"])) {
        (Some(head), Some(status)) if !status.is_empty() => format!("{head}+dirty"),
        (Some(head), _) => head,
        _ => "?".into(),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn write_json(doc: &Value, started: u64) -> Result<PathBuf> {
    let dir = std::env::var_os("SPAMDELAY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(doc)?;
    let path = dir.join(format!("bench-{started}.json"));
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let latest = dir.join("latest.json");
    std::fs::write(&latest, &text).with_context(|| format!("writing {}", latest.display()))?;
    Ok(path)
}

fn markdown(rows: &[Row]) -> String {
    let mut cells: Vec<[String; 6]> = vec![[
        "metric".into(),
        "A".into(),
        "B".into(),
        "ratio A/B min / median / max".into(),
        "target".into(),
        "verdict".into(),
    ]];
    for r in rows {
        let ratio = match r.ratio {
            Ratio::None => "—".to_string(),
            Ratio::Rounds(s) => format!("{:.3} / {:.3} / {:.3}", s.min, s.median, s.max),
            Ratio::Single(v) => format!("{v:.3} (of medians)"),
        };
        cells.push([
            r.metric.clone(),
            r.a.clone(),
            r.b.clone(),
            ratio,
            r.target.clone(),
            r.verdict.word().into(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |c: &[String; 6]| {
        let padded: Vec<String> = c
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s}{}", " ".repeat(w - s.chars().count())))
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    let mut out = vec![line(&cells[0])];
    out.push(format!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    ));
    out.extend(cells[1..].iter().map(line));
    out.join("\n")
}

// ---------------------------------------------------------------------------
// The lab's tools.

/// The release daemon on the server's veth with `args` after `--iface`;
/// checked to be attached with TCX, as the empty baseline is.
fn start_daemon(lab: &Lab, args: &[&str]) -> Result<Daemon> {
    let mut all = vec!["--iface", SERVER_IF];
    all.extend_from_slice(args);
    let d = Daemon::start(&lab.server, &all)?;
    let watching = d
        .lines()
        .into_iter()
        .find(|l| l.starts_with("watching port"))
        .unwrap_or_default();
    if !watching.contains("(tcx)") {
        bail!("spamdelay did not attach with TCX ({watching:?}): the baseline would not compare");
    }
    Ok(d)
}

/// Stops the daemon and removes its table, so "without spamdelay" has no
/// nft rules of spamdelay's either. Returns its log.
fn stop_daemon(lab: &Lab, d: Daemon) -> Result<Vec<String>> {
    let (status, lines) = d.stop()?;
    if !status.success() {
        bail!("spamdelay exited with {status}");
    }
    let _ = nft::nft(&lab.server, &["delete", "table", "inet", "spamdelay"]);
    Ok(lines)
}

fn iperf3_server(lab: &Lab) -> Result<Background> {
    Background::start(
        &lab.server,
        "iperf3",
        &["-s", "-B", &SERVER_V4.to_string(), "-p", IPERF_PORT],
    )
}

/// One iperf3 run from the client namespace; received bits per second.
fn iperf3(lab: &Lab, secs: u32) -> Result<f64> {
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
fn smtp_sink(lab: &Lab) -> Result<Background> {
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
fn smtp_source(lab: &Lab, sessions: u32) -> Result<Duration> {
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
fn tune_for_sessions(lab: &Lab) -> Result<()> {
    flood::sysctl(&lab.client, "net.ipv4.tcp_tw_reuse", "1")?;
    flood::sysctl(&lab.client, "net.ipv4.ip_local_port_range", "1024 65535")?;
    flood::sysctl(&lab.server, "net.core.somaxconn", "4096")
}

/// Clients from `ANYIP_NET`: every address of it local to the client
/// namespace, routed there from the server through one neighbour (the
/// client veth's ::10; thousands of on-link neighbours would overflow the
/// kernel's neighbour table), and a server namespace ready for bursts.
fn prepare_many_clients(lab: &Lab) -> Result<()> {
    flood::route_local(&lab.client, ANYIP_NET)?;
    let gateway = Lab::client_v6(0).to_string();
    lab.server.ip(&[
        "-6", "route", "add", ANYIP_NET, "via", &gateway, "dev", SERVER_IF,
    ])?;
    let backlog = ACCEPT_BACKLOG.to_string();
    flood::sysctl(&lab.server, "net.core.somaxconn", &backlog)?;
    flood::sysctl(&lab.server, "net.ipv4.tcp_max_syn_backlog", &backlog)
}

/// Blind clients, one per address: each address and the moment just before
/// its first payload was written.
#[derive(Default)]
struct Sent {
    at: Vec<(Ipv6Addr, Instant)>,
    /// Open connections, held so that closing them adds no packets while
    /// bans are timed.
    streams: Vec<TcpStream>,
    errors: usize,
    first_error: Option<String>,
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
fn paced_blind(lab: &Lab, ids: Range<u32>, rate: f64, dst: SocketAddr) -> Result<Sent> {
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
fn burst_blind(lab: &Lab, ids: Range<u32>, dst: SocketAddr, reset: bool) -> Result<Sent> {
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

/// Milliseconds from each client's first payload to its address's first
/// element in `table`, and how many clients were never banned there.
fn ban_delays(added: &[nft::Added], table: &str, sent: &Sent) -> (Vec<f64>, usize) {
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
fn delay_cell(ms: &[f64]) -> String {
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
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn delay_json(ms: &[f64], missing: usize) -> Value {
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

// ---------------------------------------------------------------------------
// 1. Kernel cost per packet.

fn kernel_cost(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    tune_for_sessions(&lab)?;
    let _iperf = iperf3_server(&lab)?;
    let _sink = smtp_sink(&lab)?;
    // Warm-up, unmeasured: first connections, page cache, CPU frequency.
    iperf3(&lab, 1)?;
    smtp_source(&lab, 100)?;
    let _stats = BpfStats::enable()?;
    // Per workload: both hooks together, then ingress and egress alone.
    let mut bulk: [Rounds; 3] = Default::default();
    let mut smtp: [Rounds; 3] = Default::default();
    let mut runs = Vec::new();
    for round in 0..plan.rounds {
        for side in sides(round) {
            check_interrupted()?;
            let (daemon, empty) = match side {
                Side::A => (Some(start_daemon(&lab, &["--mta", "none"])?), None),
                Side::B => (None, Some(EmptyClassifier::attach(&lab.server, SERVER_IF)?)),
            };
            let before = tcx_programs(&lab.server, SERVER_IF)?;
            check_programs(side, &before)?;
            iperf3(&lab, plan.iperf_secs)?;
            let mid = tcx_programs(&lab.server, SERVER_IF)?;
            smtp_source(&lab, plan.kernel_sessions)?;
            let after = tcx_programs(&lab.server, SERVER_IF)?;
            for (rounds, from, to, what) in [
                (&mut bulk, &before, &mid, "bulk"),
                (&mut smtp, &mid, &after, "smtp"),
            ] {
                for (slot, hook) in [None, Some("ingress"), Some("egress")]
                    .into_iter()
                    .enumerate()
                {
                    let d = total(to, hook).since(&total(from, hook));
                    rounds[slot].push(side, d.ns_per_run());
                    if let Some(hook) = hook {
                        runs.push(json!({"round": round, "side": format!("{side:?}"),
                            "workload": what, "hook": hook,
                            "runs": d.runs, "run_time_ns": d.run_time_ns}));
                    }
                }
            }
            if let Some(d) = daemon {
                stop_daemon(&lab, d)?;
            }
            drop(empty);
        }
    }
    let mut out = Outcome::default();
    let ns = |v: f64| format!("{v:.1} ns/pkt");
    let bulk_ratio = bulk[0].ratio();
    out.rows.push(Row {
        metric: "kernel cost, bulk TCP (iperf3, port 5201): spamdelay (A) vs empty program (B)"
            .into(),
        a: ns(bulk[0].median_a()),
        b: ns(bulk[0].median_b()),
        ratio: bulk_ratio.map_or(Ratio::None, Ratio::Rounds),
        target: "≤ 1.2".into(),
        verdict: bulk_ratio.map_or(Verdict::Failed, |r| Verdict::of(r.median <= 1.2)),
    });
    out.rows.push(Row {
        metric: format!(
            "kernel cost, SMTP sessions ({} per round, smtp-source → smtp-sink): spamdelay (A) vs empty (B)",
            plan.kernel_sessions
        ),
        a: ns(smtp[0].median_a()),
        b: ns(smtp[0].median_b()),
        ratio: smtp[0].ratio().map_or(Ratio::None, Ratio::Rounds),
        target: "—".into(),
        verdict: Verdict::Info,
    });
    // Packets per session, from the baseline's counts: what a session costs.
    let smtp_runs: Vec<f64> = runs
        .iter()
        .filter(|r| r["workload"] == "smtp" && r["side"] == "A")
        .filter_map(|r| r["runs"].as_f64())
        .collect();
    let per_session =
        smtp_runs.iter().sum::<f64>() / (f64::from(plan.kernel_sessions) * plan.rounds as f64);
    out.notes.push(format!(
        "kernel cost: run_time_ns / run_cnt of the TCX programs on the server veth (ingress + egress together), kernel.bpf_stats_enabled=1 only during this measurement; {} rounds, iperf3 {} s per side. Medians by hook, spamdelay vs empty: bulk ingress {:.0} vs {:.0} ns, egress {:.0} vs {:.0} ns; SMTP ingress {:.0} vs {:.0} ns, egress {:.0} vs {:.0} ns. An SMTP session is {per_session:.1} packets through the programs: {:.1} µs of spamdelay per session",
        plan.rounds,
        plan.iperf_secs,
        bulk[1].median_a(),
        bulk[1].median_b(),
        bulk[2].median_a(),
        bulk[2].median_b(),
        smtp[1].median_a(),
        smtp[1].median_b(),
        smtp[2].median_a(),
        smtp[2].median_b(),
        per_session * smtp[0].median_a() / 1e3,
    ));
    for (name, r) in [
        ("bulk_ns_per_packet", &bulk[0]),
        ("bulk_ingress_ns_per_packet", &bulk[1]),
        ("bulk_egress_ns_per_packet", &bulk[2]),
        ("smtp_ns_per_packet", &smtp[0]),
        ("smtp_ingress_ns_per_packet", &smtp[1]),
        ("smtp_egress_ns_per_packet", &smtp[2]),
    ] {
        out.detail.insert(name.into(), r.json());
    }
    out.detail.insert("runs".into(), Value::Array(runs));
    Ok(out)
}

/// The right programs are on the interface: spamdelay's two, or the empty
/// one on both hooks. Anything else would measure the wrong thing.
fn check_programs(side: Side, programs: &[Attached]) -> Result<()> {
    let names: Vec<&str> = programs.iter().map(|p| p.name.as_str()).collect();
    let ok = names.len() == 2
        && names.iter().all(|n| match side {
            Side::A => n.starts_with("spamdelay_") && !n.starts_with("spamdelay_empty"),
            Side::B => *n == spamdelay_tests::bench::EMPTY_PROGRAM,
        });
    if !ok {
        bail!("unexpected programs on {SERVER_IF} for side {side:?}: {names:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Throughput.

fn throughput(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    let _iperf = iperf3_server(&lab)?;
    iperf3(&lab, 1)?;
    let secs = plan.iperf_secs + 1;
    let mut bps = Rounds::default();
    for round in 0..plan.rounds {
        for side in sides(round) {
            check_interrupted()?;
            let daemon = match side {
                Side::A => Some(start_daemon(&lab, &["--mta", "none"])?),
                Side::B => None,
            };
            bps.push(side, iperf3(&lab, secs)?);
            if let Some(d) = daemon {
                stop_daemon(&lab, d)?;
            }
        }
    }
    let mut out = Outcome::default();
    let ratio = bps.ratio();
    out.rows.push(Row {
        metric: format!(
            "throughput, bulk TCP over the veth (iperf3, {secs} s): spamdelay attached (A) vs not (B)"
        ),
        a: format!("{:.2} Gbit/s", bps.median_a() / 1e9),
        b: format!("{:.2} Gbit/s", bps.median_b() / 1e9),
        ratio: ratio.map_or(Ratio::None, Ratio::Rounds),
        target: "≥ 0.97".into(),
        verdict: ratio.map_or(Verdict::Failed, |r| Verdict::of(r.median >= 0.97)),
    });
    out.detail.insert("bits_per_second".into(), bps.json());
    Ok(out)
}

// ---------------------------------------------------------------------------
// 3. SMTP connection rate.

fn connection_rate(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    tune_for_sessions(&lab)?;
    let _sink = smtp_sink(&lab)?;
    // Calibrate: as many sessions as take about `rate_secs` here, the same
    // count for every run.
    let probe = 400;
    let took = smtp_source(&lab, probe)?;
    let rate = f64::from(probe) / took.as_secs_f64();
    let sessions = ((rate * plan.rate_secs) as u32).clamp(200, 50_000);
    eprintln!("bench: 3. about {rate:.0} sessions/s here: {sessions} sessions per run");
    let mut per_s = Rounds::default();
    let mut daemon_us = Vec::new();
    let mut banned = 0;
    let mut bad_verdicts = Vec::new();
    let mut passes = 0;
    for round in 0..plan.rounds {
        for side in sides(round) {
            check_interrupted()?;
            let daemon = match side {
                Side::A => Some(start_daemon(&lab, &["--mta", "none"])?),
                Side::B => None,
            };
            let cpu_before = match &daemon {
                Some(d) => proc_cost(d.pid())?.cpu_s,
                None => 0.0,
            };
            let took = smtp_source(&lab, sessions)?;
            per_s.push(side, f64::from(sessions) / took.as_secs_f64());
            if let Some(d) = daemon {
                let cpu = proc_cost(d.pid())?.cpu_s - cpu_before;
                daemon_us.push(cpu * 1e6 / f64::from(sessions));
                // Whatever the daemon will apply is in nft by now or never.
                thread::sleep(Duration::from_millis(100));
                banned += nft::elements(&lab.server, "early_talkers_v4").len()
                    + nft::elements(&lab.server, "early_talkers_v6").len();
                let lines = stop_daemon(&lab, d)?;
                passes += lines.iter().filter(|l| l.starts_with("PASS")).count();
                bad_verdicts.extend(
                    lines
                        .into_iter()
                        .filter(|l| {
                            l.starts_with("EARLY-TALK")
                                || l.starts_with("QUIT")
                                || l.starts_with("ban [")
                        })
                        .take(5),
                );
            }
        }
    }
    let mut out = Outcome::default();
    let ratio = per_s.ratio();
    out.rows.push(Row {
        metric: format!(
            "SMTP sessions/s, smtp-source ({SMTP_PARALLEL} parallel) → smtp-sink, no greet pause: spamdelay (A) vs none (B)"
        ),
        a: format!("{:.0}/s", per_s.median_a()),
        b: format!("{:.0}/s", per_s.median_b()),
        ratio: ratio.map_or(Ratio::None, Ratio::Rounds),
        target: "≥ 0.97".into(),
        verdict: ratio.map_or(Verdict::Failed, |r| Verdict::of(r.median >= 0.97)),
    });
    let us = percentile(&sorted(&daemon_us), 50.0);
    out.rows.push(Row::info(
        "daemon CPU per patient session (its PASS verdict read, logged, batched)",
        format!(
            "{us:.1} µs: {:.0}% of a core at {:.0} sessions/s",
            us * per_s.median_a() / 1e4,
            per_s.median_a()
        ),
    ));
    let patient = sessions as usize * per_s.a.len();
    out.rows.push(Row {
        metric: "patient clients banned during the connection-rate runs".into(),
        a: format!("{banned} of {patient} sessions ({passes} PASS verdicts)"),
        b: "—".into(),
        ratio: Ratio::None,
        target: "0".into(),
        verdict: if banned == 0 && bad_verdicts.is_empty() {
            Verdict::Met
        } else {
            Verdict::Bug
        },
    });
    if !bad_verdicts.is_empty() || banned > 0 {
        eprintln!(
            "\nbench: !!!!! BUG: spamdelay judged patient smtp-source clients: {banned} bans; {bad_verdicts:#?}\n"
        );
        out.notes.push(format!(
            "BUG: patient clients got verdicts other than PASS: {bad_verdicts:?}"
        ));
    }
    out.detail
        .insert("sessions_per_run".into(), json!(sessions));
    out.detail
        .insert("sessions_per_second".into(), per_s.json());
    out.detail.insert("pass_verdicts".into(), json!(passes));
    out.detail
        .insert("daemon_cpu_us_per_session".into(), json!(daemon_us));
    out.detail.insert("bans".into(), json!(banned));
    Ok(out)
}

// ---------------------------------------------------------------------------
// 4. Time to ban.

fn time_to_ban(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    prepare_many_clients(&lab)?;
    let _server = SilentServer::start(&lab.server, 25, ACCEPT_BACKLOG)?;
    let daemon = start_daemon(&lab, &["--mta", "none", "--set-size", "65536"])?;
    let monitor = Monitor::start(&lab.server)?;
    let dst = SocketAddr::new(SERVER_V6.into(), 25);
    let n = plan.ttb_clients;

    eprintln!("bench: 4. {n} blind clients at {:.0}/s", plan.ttb_rate);
    let modest = paced_blind(&lab, 0..n, plan.ttb_rate, dst)?;
    monitor.wait_added(
        "spamdelay",
        modest.at.len(),
        Duration::from_secs(30),
        Duration::from_secs(5),
    );
    let (modest_ms, modest_missing) = ban_delays(&monitor.added(), "spamdelay", &modest);

    check_interrupted()?;
    eprintln!("bench: 4. {n} blind clients at once");
    let burst = burst_blind(&lab, n..2 * n, dst, false)?;
    monitor.wait_added(
        "spamdelay",
        modest.at.len() + burst.at.len(),
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    let (burst_ms, burst_missing) = ban_delays(&monitor.added(), "spamdelay", &burst);
    let transactions = monitor.transactions_adding_to("spamdelay");
    let lines = stop_daemon(&lab, daemon)?;
    drop(monitor);
    let nft_ms = nft_run_ms(&lab)?;

    let mut out = Outcome::default();
    let p99 = percentile(&sorted(&modest_ms), 99.0);
    out.rows.push(Row {
        metric: format!(
            "time to ban, first payload → element seen by `nft monitor`, {} clients at {:.0}/s",
            modest.at.len(),
            plan.ttb_rate
        ),
        a: delay_cell(&modest_ms),
        b: "—".into(),
        ratio: Ratio::None,
        target: "p99 ≤ 5 ms".into(),
        verdict: if modest_ms.is_empty() {
            Verdict::Failed
        } else {
            Verdict::of(p99 <= 5.0 && modest_missing == 0)
        },
    });
    out.rows.push(Row::info(
        format!(
            "time to ban, {} clients at once ({} connections/s)",
            burst.at.len(),
            rate_of(&burst)
        ),
        delay_cell(&burst_ms),
    ));
    for (what, missing, sent) in [
        ("at the modest rate", modest_missing, &modest),
        ("in the burst", burst_missing, &burst),
    ] {
        if missing > 0 || sent.errors > 0 {
            out.notes.push(format!(
                "time to ban {what}: {missing} clients never banned, {} could not connect ({})",
                sent.errors,
                sent.first_error.as_deref().unwrap_or("-")
            ));
        }
    }
    out.notes.push(format!(
        "time to ban: {transactions} nft transactions for {} bans; a lone verdict goes to nft at once, and the verdicts that arrive during one transaction make up the next batch (at most {}); one `nft -j -f -` run adding one element to a small set takes {nft_ms:.1} ms here (median of {NFT_PROBE_RUNS}), the floor of every ban's latency",
        modest_ms.len() + burst_ms.len(),
        spamdelay::enforcer::BATCH_MAX
    ));
    out.detail.insert(
        "modest".into(),
        json!({"clients": n, "rate": plan.ttb_rate, "delays": delay_json(&modest_ms, modest_missing), "connect_errors": modest.errors}),
    );
    out.detail.insert(
        "burst".into(),
        json!({"clients": n, "delays": delay_json(&burst_ms, burst_missing), "connect_errors": burst.errors}),
    );
    out.detail
        .insert("nft_transactions".into(), json!(transactions));
    out.detail.insert("nft_run_ms".into(), json!(nft_ms));
    out.detail.insert(
        "ban_batches_in_log".into(),
        json!(daemon::ban_batches(&lines)),
    );
    Ok(out)
}

const NFT_PROBE_RUNS: usize = 10;

/// How long one `nft -j -f -` run takes here to add one element (with a
/// timeout and a comment, as spamdelay's bans have) to a small set in a
/// scratch table of the server namespace: the fixed part of every ban's
/// latency (a process, its JSON, one netlink transaction). Milliseconds,
/// median.
fn nft_run_ms(lab: &Lab) -> Result<f64> {
    const TABLE: &str = "spamdelay_bench_probe";
    nft::nft(
        &lab.server,
        &[&format!(
            "add table inet {TABLE}; add set inet {TABLE} s {{ type ipv6_addr; flags timeout; size 65536; }}"
        )],
    )?;
    // Spawned from a thread inside the namespace, as the daemon spawns its
    // own: `ip netns exec` would add a fork and exec of its own.
    let ms = lab.server.run(|| -> Result<Vec<f64>> {
        let mut ms = Vec::new();
        for i in 0..NFT_PROBE_RUNS {
            let doc = json!({"nftables": [{"add": {"element": {
                "family": "inet", "table": TABLE, "name": "s",
                "elem": [{"elem": {"val": format!("2001:db8::7:{i:x}"), "timeout": 3600, "comment": "probe"}}]
            }}}]});
            let t = Instant::now();
            let mut child = Command::new("nft")
                .args(["-j", "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("running nft")?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(doc.to_string().as_bytes())
                    .context("writing to nft")?;
            }
            let out = child.wait_with_output().context("waiting for nft")?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            if !out.status.success() {
                bail!(
                    "nft -j -f -: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(ms)
    })??;
    nft::nft(&lab.server, &["delete", "table", "inet", TABLE])?;
    Ok(percentile(&sorted(&ms), 50.0))
}

/// Connections per second over a burst, from its first to its last payload.
fn rate_of(sent: &Sent) -> String {
    let first = sent.at.iter().map(|(_, t)| *t).min();
    let last = sent.at.iter().map(|(_, t)| *t).max();
    match (first, last) {
        (Some(f), Some(l)) if l > f => {
            format!("{:.0}", sent.at.len() as f64 / (l - f).as_secs_f64())
        }
        _ => "?".into(),
    }
}

// ---------------------------------------------------------------------------
// 5. Flood scale.

fn flood_scale(plan: &Plan) -> Result<Outcome> {
    let n = plan.flood_clients;
    let lab = Lab::new().context("building the namespace lab")?;
    prepare_many_clients(&lab)?;
    let server = SilentServer::start_releasing(&lab.server, 25, ACCEPT_BACKLOG)?;
    // Room for every ban, with the headroom an admin would give.
    let set_size = (2 * n).next_power_of_two().max(65536).to_string();
    let daemon = start_daemon(&lab, &["--mta", "none", "--set-size", &set_size])?;
    let pid = daemon.pid();
    let monitor = Monitor::start(&lab.server)?;
    let dst = SocketAddr::new(SERVER_V6.into(), 25);

    eprintln!("bench: 5. {n} distinct IPv6 early talkers, as fast as the lab connects");
    let t0 = Instant::now();
    let sent = burst_blind(&lab, 0..n, dst, true)?;
    let connected_in = t0.elapsed();
    eprintln!(
        "bench: 5. {} connected in {:.1} s ({} errors); waiting for the bans",
        sent.at.len(),
        connected_in.as_secs_f64(),
        sent.errors
    );
    // Until every client is in nft, or nothing new came for 20 s, or the
    // plan's bound: a slow daemon is a result, not a hang.
    let deadline = t0 + plan.flood_wait;
    let target = sent.at.len();
    let seen = loop {
        check_interrupted()?;
        let step = Duration::from_secs(5);
        let seen = monitor.wait_added("spamdelay", target, step, step);
        if seen >= target
            || Instant::now() >= deadline
            || monitor_quiet_for(&monitor, Duration::from_secs(20))
        {
            break seen;
        }
        eprintln!(
            "bench: 5. {seen} bans so far after {:.0} s",
            t0.elapsed().as_secs_f64()
        );
    };
    // When the k-th ban reached nft: shows whether the pace holds as the
    // set grows.
    let banned_at: Vec<f64> = monitor
        .added()
        .iter()
        .filter(|a| a.table == "spamdelay")
        .map(|a| a.at.saturating_duration_since(t0).as_secs_f64())
        .collect();
    let milestones: Vec<(usize, f64)> = [1, 1_000, 10_000, 25_000, 50_000, 75_000, 100_000]
        .into_iter()
        .filter_map(|k| Some((k, *banned_at.get(k - 1)?)))
        .collect();
    let cost = proc_cost(pid)?;
    let transactions = monitor.transactions_adding_to("spamdelay");
    drop(monitor);
    let in_nft = nft::elements(&lab.server, "early_talkers_v6").len();
    let (ok, listed, err) = daemon.admin(&lab.server, &["list", "--json"])?;
    let listed = if ok {
        serde_json::from_str::<Vec<Value>>(&listed)
            .map(|v| v.len())
            .unwrap_or(0)
    } else {
        eprintln!("bench: 5. spamdelay list --json failed: {err}");
        0
    };
    let lines = stop_daemon(&lab, daemon)?;
    let accepted = server.stop()?;

    let count = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count();
    let early_talk = counter(&lines, "early_talk").unwrap_or(0);
    let ringbuf_full = counter(&lines, "ringbuf_full").unwrap_or(0);
    let refused = lines.iter().filter(|l| l.contains("nft refused")).count();
    let errors = count("error") + count("ERROR");
    let unbanned = sent.at.len().saturating_sub(in_nft);
    let elapsed = banned_at.last().copied();
    let mut out = Outcome::default();
    let mut pace: Vec<String> = milestones
        .iter()
        .map(|(k, t)| format!("{k} in {t:.1} s"))
        .collect();
    if let Some(t) = elapsed
        && milestones.last().is_none_or(|(k, _)| *k != seen)
    {
        pace.push(format!("{seen} in {t:.1} s"));
    }
    if seen < target {
        pace.push(format!(
            "then no more within the {} s bound",
            plan.flood_wait.as_secs()
        ));
    }
    out.rows.push(Row::info(
        format!(
            "flood: {} distinct IPv6 early talkers ({} connections/s)",
            sent.at.len(),
            rate_of(&sent)
        ),
        match elapsed {
            Some(s) => format!("{:.0} bans/s: {}", seen as f64 / s, pace.join(" · ")),
            None => "no bans".into(),
        },
    ));
    out.rows.push(Row {
        metric: "flood: verdicts lost (ring buffer full, nft refused)".into(),
        a: format!(
            "ringbuf_full={ringbuf_full}, nft refused {refused} (kernel early_talk={early_talk})"
        ),
        b: "—".into(),
        ratio: Ratio::None,
        target: "0".into(),
        verdict: Verdict::of(ringbuf_full == 0 && refused == 0),
    });
    out.rows.push(Row {
        metric: "flood: clients not banned when measured (clients − elements in nft)".into(),
        a: format!("{unbanned} (in nft {in_nft}, in `spamdelay list` {listed})"),
        b: "—".into(),
        ratio: Ratio::None,
        target: "0".into(),
        verdict: Verdict::of(unbanned == 0),
    });
    let mib = cost.peak_rss_kib as f64 / 1024.0;
    out.rows.push(Row {
        metric: "flood: daemon peak RSS (VmHWM)".into(),
        a: format!("{mib:.1} MiB"),
        b: "—".into(),
        ratio: Ratio::None,
        target: "≤ 64 MiB".into(),
        verdict: Verdict::of(mib <= 64.0),
    });
    out.rows.push(Row::info(
        "flood: daemon CPU (user + system)",
        format!(
            "{:.1} s, plus {:.1} s in its nft runs",
            cost.cpu_s, cost.children_cpu_s
        ),
    ));
    out.rows.push(Row::info(
        "flood: nft transactions",
        format!(
            "{transactions} seen by nft monitor, {} ban batches in the log ({:.0} bans each)",
            daemon::ban_batches(&lines),
            in_nft as f64 / transactions.max(1) as f64
        ),
    ));
    if sent.errors > 0 {
        out.notes.push(format!(
            "flood: {} clients could not connect ({})",
            sent.errors,
            sent.first_error.as_deref().unwrap_or("-")
        ));
    }
    if errors > 0 {
        out.notes.push(format!(
            "flood: the daemon logged {errors} error lines, first: {:?}",
            lines.iter().find(|l| l.to_lowercase().starts_with("error"))
        ));
    }
    out.notes.push(
        "flood: sources are addresses of one AnyIP route in the client namespace (IPV6_FREEBIND sockets, each reset right after its payload); adding 100,000 addresses to an interface takes tens of minutes (quadratic). While the lab connects, its clients and server use every core: `nft monitor` (and so each ban's timestamp) may lag then".into(),
    );
    out.detail.insert(
        "flood".into(),
        json!({
            "clients": n, "connected": sent.at.len(), "connect_errors": sent.errors,
            "connect_seconds": connected_in.as_secs_f64(),
            "ban_seconds": elapsed, "bans_seen_by_monitor": seen, "in_nft": in_nft,
            "milestones_seconds": milestones.iter().map(|(k, t)| json!({"bans": k, "seconds": t})).collect::<Vec<_>>(),
            "listed": listed, "early_talk": early_talk, "ringbuf_full": ringbuf_full,
            "flows_tracked": counter(&lines, "flows_tracked"),
            "flow_insert_failed": counter(&lines, "flow_insert_failed"),
            "lost_sync": counter(&lines, "lost_sync"),
            "ban_lines": count("ban ["), "nft_refused": refused,
            "nft_transactions": transactions, "ban_batches": daemon::ban_batches(&lines),
            "peak_rss_kib": cost.peak_rss_kib, "cpu_seconds": cost.cpu_s,
            "nft_children_cpu_seconds": cost.children_cpu_s,
            "server_accepted": accepted, "set_size": set_size,
        }),
    );
    Ok(out)
}

/// True when the monitor saw no element for `quiet`.
fn monitor_quiet_for(monitor: &Monitor, quiet: Duration) -> bool {
    monitor
        .added()
        .last()
        .is_none_or(|a| a.at.elapsed() >= quiet)
}

// ---------------------------------------------------------------------------
// 6. Side by side with fail2ban.

fn versus_fail2ban(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    prepare_many_clients(&lab)?;
    // Postfix's default greet wait; postscreen logs PREGREET as soon as it
    // reads the early bytes, not at the end of the wait.
    let postfix = Postfix::start(&lab.server, Duration::from_secs(6))?;
    let config = postfix
        .config_dir()
        .to_str()
        .context("a UTF-8 config path")?
        .to_string();
    let daemon = start_daemon(&lab, &["--mta", "postfix", "--mta-config", &config])?;
    let f2b = Fail2ban::start_postfix_jail(&lab.server, &postfix.log_path())?;
    let monitor = Monitor::start(&lab.server)?;
    let dst = SocketAddr::new(SERVER_V6.into(), 25);

    // One unmeasured client first: fail2ban creates its IPv6 set on its
    // first IPv6 ban, a one-time cost that is not its ban latency.
    let warm = paced_blind(&lab, 0..1, 1.0, dst)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ban_delays(&monitor.added(), fail2ban::TABLE, &warm).1 > 0
        || ban_delays(&monitor.added(), "spamdelay", &warm).1 > 0
    {
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "the warm-up client was not banned by both tools within 30 s; fail2ban's log:\n{}",
                f2b.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }

    let n = plan.f2b_clients;
    eprintln!(
        "bench: 6. {n} blind clients at {:.0}/s against postscreen",
        plan.f2b_rate
    );
    let sent = paced_blind(&lab, 1..n + 1, plan.f2b_rate, dst)?;
    monitor.wait_added(
        "spamdelay",
        sent.at.len() + 1,
        Duration::from_secs(10),
        Duration::from_secs(5),
    );
    monitor.wait_added(
        fail2ban::TABLE,
        sent.at.len() + 1,
        Duration::from_secs(60),
        Duration::from_secs(15),
    );
    let added = monitor.added();
    let (sd_ms, sd_missing) = ban_delays(&added, "spamdelay", &sent);
    let (f2b_ms, f2b_missing) = ban_delays(&added, fail2ban::TABLE, &sent);
    let clients: std::collections::HashSet<IpAddr> =
        sent.at.iter().map(|(a, _)| IpAddr::V6(*a)).collect();
    let pregreets = postfix::postscreen_verdicts(&postfix.log())
        .into_iter()
        .filter(|(kind, ip, _)| kind == "PREGREET" && clients.contains(ip))
        .count();
    drop(monitor);
    drop(f2b);
    let lines = stop_daemon(&lab, daemon)?;
    let early = lines.iter().filter(|l| l.starts_with("EARLY-TALK")).count();

    let mut out = Outcome::default();
    let sd_med = percentile(&sorted(&sd_ms), 50.0);
    let f2b_med = percentile(&sorted(&f2b_ms), 50.0);
    out.rows.push(Row {
        metric: format!(
            "time to ban vs fail2ban: {} blind clients at {:.0}/s against real postscreen: spamdelay (A) vs fail2ban 1.0 pyinotify + nftables (B)",
            sent.at.len(),
            plan.f2b_rate
        ),
        a: delay_cell(&sd_ms),
        b: delay_cell(&f2b_ms),
        ratio: if sd_ms.is_empty() || f2b_ms.is_empty() {
            Ratio::None
        } else {
            Ratio::Single(sd_med / f2b_med)
        },
        target: "—".into(),
        verdict: if sd_ms.is_empty() || f2b_ms.is_empty() {
            Verdict::Failed
        } else {
            Verdict::Info
        },
    });
    out.notes.push(format!(
        "vs fail2ban: postscreen logged PREGREET for {pregreets} of {} clients, spamdelay EARLY-TALK for {early} (the warm-up client included); not banned: spamdelay {sd_missing}, fail2ban {f2b_missing}; fail2ban's median is {:.0}x spamdelay's",
        sent.at.len(),
        f2b_med / sd_med
    ));
    out.detail.insert(
        "fail2ban".into(),
        json!({
            "clients": sent.at.len(), "rate": plan.f2b_rate,
            "spamdelay": delay_json(&sd_ms, sd_missing),
            "fail2ban": delay_json(&f2b_ms, f2b_missing),
            "postscreen_pregreet": pregreets, "spamdelay_early_talk": early,
            "connect_errors": sent.errors,
        }),
    );
    drop(postfix);
    Ok(out)
}
