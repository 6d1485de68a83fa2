//! `run --metrics-listen`: the daemon's counters for Prometheus on `GET
//! /metrics`. A `Telemetry` handle the ban path and the enforcer update, and
//! a small HTTP server that renders it, reading the rest at scrape time.
//!
//! What is read at scrape time rather than counted: the kernel's counters
//! (summed over CPUs), the ban path's `Counters` (set full, apply errors),
//! and the ban register (`bans.json`), which gives the bans in force by
//! cause and the sets' fill. `spamdelay ban` runs in another process and
//! only writes the register, so manual bans are counted when a scrape finds
//! the register changed: each manual entry in force that is new, or has a
//! new expiry (a re-ban), counts one. The register is read without its lock
//! (it is always replaced whole by a rename), and parsed again only when its
//! modification time or length changed.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, anyhow};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, error, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        info::Info,
    },
    registry::{Registry, Unit},
};
use spamdelay_common::{Stat, Verdict};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    allow::Cidr,
    banpath::Counters,
    bans::{self, Register},
    nft,
};

/// Why a ban was added, as the `cause` label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    EarlyTalk,
    Quit,
    /// `spamdelay ban`, by an admin.
    Manual,
    /// An IPv6 /64 banned for `--ipv6-aggregate` addresses of it.
    Aggregate,
    /// Reported by other hosts (reserved for fleet sharing).
    Fleet,
}

impl Cause {
    pub const ALL: [Cause; 5] = [
        Cause::EarlyTalk,
        Cause::Quit,
        Cause::Manual,
        Cause::Aggregate,
        Cause::Fleet,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Cause::EarlyTalk => "early_talk",
            Cause::Quit => "quit",
            Cause::Manual => "manual",
            Cause::Aggregate => "aggregate",
            Cause::Fleet => "fleet",
        }
    }

    /// The cause of a ban, from the reason it was recorded with: the
    /// daemon's reasons start `early-talk `, `quit ` and `aggregate:`, a
    /// fleet ban's `fleet`; any other reason is an admin's.
    pub fn of_reason(reason: &str) -> Cause {
        if reason.starts_with("early-talk ") {
            Cause::EarlyTalk
        } else if reason.starts_with("quit ") {
            Cause::Quit
        } else if reason.starts_with("aggregate:") {
            Cause::Aggregate
        } else if reason.starts_with("fleet") {
            Cause::Fleet
        } else {
            Cause::Manual
        }
    }
}

/// Every verdict, in `spamdelay_verdicts_total`'s order.
const VERDICTS: [Verdict; 5] = [
    Verdict::EarlyTalk,
    Verdict::Quit,
    Verdict::Pass,
    Verdict::Pipeconnect,
    Verdict::Probe,
];

const fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::EarlyTalk => "early_talk",
        Verdict::Quit => "quit",
        Verdict::Pass => "pass",
        Verdict::Pipeconnect => "pipeconnect",
        Verdict::Probe => "probe",
    }
}

/// Upper bounds of the apply-latency buckets: a netlink batch takes tens of
/// microseconds, a fallback through `nft` milliseconds, a stalled one more.
const APPLY_BUCKETS: [f64; 16] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabel {
    set: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// Sums the kernel's per-CPU counters (`metrics::sum` over `STATS`).
pub type KernelCounters = Box<dyn Fn() -> Result<Vec<(Stat, u64)>> + Send + Sync>;

/// Where the exporter reads what it does not count itself.
pub struct Sources {
    pub kernel: KernelCounters,
    /// The ban register, `bans.json` (`Store::path`).
    pub register: PathBuf,
    /// The ban path's counters.
    pub counters: Arc<Counters>,
    /// `--set-size`: each set's capacity.
    pub set_size: u32,
    /// `--crowdsec-lapi`'s state, if on.
    pub fleet: Option<crate::fleet::SharedStatus>,
}

/// The daemon's metrics: cheap to clone, every update one atomic add.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// In `VERDICTS` order.
    verdicts: Vec<Counter>,
    /// In `Cause::ALL` order.
    bans: Vec<Counter>,
    apply: Histogram,
    scraped: Arc<Scraped>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Registers every metric, and reads the ban register once: the bans it
    /// holds now are not counted as added.
    pub fn new(sources: Sources) -> Self {
        let mut registry = Registry::with_prefix("spamdelay");
        let up: Gauge = Gauge::default();
        up.set(1);
        registry.register("up", "1 while spamdelay runs", up);
        registry.register(
            "build",
            "The running spamdelay's version",
            Info::new(VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        let verdict_family = Family::<VerdictLabel, Counter>::default();
        let verdicts = VERDICTS
            .iter()
            .map(|&v| {
                verdict_family.get_or_create_owned(&VerdictLabel {
                    verdict: verdict_label(v),
                })
            })
            .collect();
        registry.register(
            "verdicts",
            "Verdicts the daemon read from the kernel, by kind",
            verdict_family,
        );
        let ban_family = Family::<CauseLabel, Counter>::default();
        let bans = Cause::ALL
            .iter()
            .map(|c| ban_family.get_or_create_owned(&CauseLabel { cause: c.label() }))
            .collect();
        registry.register(
            "bans",
            "Bans added to nftables (refreshes included), by cause; manual ones counted when a scrape finds the register changed",
            ban_family,
        );
        let apply = Histogram::new(APPLY_BUCKETS);
        registry.register_with_unit(
            "apply_duration",
            "Time to apply one batch of set changes (netlink, or nft for interval sets)",
            Unit::Seconds,
            apply.clone(),
        );
        let scraped = Arc::new(Scraped {
            kernel: sources.kernel,
            register: sources.register,
            counters: sources.counters,
            set_size: sources.set_size,
            fleet: sources.fleet,
            state: Mutex::default(),
        });
        registry.register_collector(Box::new(scraped.clone()));
        let telemetry = Telemetry {
            inner: Arc::new(Inner {
                registry,
                verdicts,
                bans,
                apply,
                scraped,
            }),
        };
        // The baseline: what is in the register now was not added now.
        telemetry.refresh_register();
        telemetry
    }

    /// A verdict the daemon read.
    pub fn verdict(&self, v: Verdict) {
        if let Some(i) = VERDICTS.iter().position(|&k| k == v) {
            self.inner.verdicts[i].inc();
        }
    }

    /// A ban that reached nftables.
    pub fn ban_added(&self, cause: Cause) {
        self.inner.bans[cause as usize].inc();
    }

    /// One batch of set changes applied, in `took`.
    pub fn applied(&self, took: Duration) {
        self.inner.apply.observe(took.as_secs_f64());
    }

    /// The metrics in the Prometheus text format (0.0.4). Reads the kernel's
    /// counters and the register: blocking, call it off the runtime.
    pub fn render(&self) -> Result<String> {
        let kernel = match (self.inner.scraped.kernel)() {
            Ok(k) => Some(k),
            Err(e) => {
                warn!("reading the kernel's counters for /metrics: {e:#}");
                None
            }
        };
        self.refresh_register();
        self.inner.scraped.lock().kernel = kernel;
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.inner.registry)
            .map_err(|_| anyhow!("encoding the metrics"))?;
        Ok(out)
    }

    fn refresh_register(&self) {
        let manual = &self.inner.bans[Cause::Manual as usize];
        self.inner.scraped.reread(manual, bans::now());
    }
}

/// What is read at scrape time, and the collector that shows it.
struct Scraped {
    kernel: KernelCounters,
    register: PathBuf,
    counters: Arc<Counters>,
    set_size: u32,
    fleet: Option<crate::fleet::SharedStatus>,
    state: Mutex<ScrapeState>,
}

#[derive(Default)]
struct ScrapeState {
    kernel: Option<Vec<(Stat, u64)>>,
    /// The register as last read.
    register: Option<Seen>,
}

/// The register's contents, as far as the metrics go.
struct Seen {
    stamp: Option<Stamp>,
    /// Expiry, cause and set of every entry.
    entries: Vec<(u64, Cause, &'static str)>,
    /// Manual entries and their expiry: what a new manual ban changes.
    manual: BTreeMap<Cidr, u64>,
}

/// What tells the file changed: its modification time and length (`None`:
/// no file).
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Seen {
    fn of(register: &Register, stamp: Option<Stamp>) -> Self {
        let mut manual = BTreeMap::new();
        let entries = register
            .bans
            .iter()
            .map(|(cidr, ban)| {
                let cause = Cause::of_reason(&ban.reason);
                if cause == Cause::Manual {
                    manual.insert(*cidr, ban.expires);
                }
                (ban.expires, cause, nft::set_for(cidr))
            })
            .collect();
        Seen {
            stamp,
            entries,
            manual,
        }
    }
}

impl Scraped {
    fn lock(&self) -> std::sync::MutexGuard<'_, ScrapeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the register again if it changed, counting the manual bans it
    /// gained into `manual` (not on the first read: the baseline).
    fn reread(&self, manual: &Counter, now: u64) {
        let stamp = stamp(&self.register);
        let mut state = self.lock();
        if state.register.as_ref().is_some_and(|s| s.stamp == stamp) {
            return;
        }
        let register = match std::fs::read(&self.register) {
            Ok(bytes) => match Register::from_json(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    warn!(
                        "reading {} for /metrics: {e}: the ban gauges keep their last values",
                        self.register.display()
                    );
                    return;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Register::default(),
            Err(e) => {
                warn!(
                    "reading {} for /metrics: {e}: the ban gauges keep their last values",
                    self.register.display()
                );
                return;
            }
        };
        let seen = Seen::of(&register, stamp);
        if let Some(before) = &state.register {
            let added = seen
                .manual
                .iter()
                .filter(|(cidr, expires)| {
                    **expires > now && before.manual.get(cidr) != Some(expires)
                })
                .count();
            manual.inc_by(added as u64);
        }
        state.register = Some(seen);
    }
}

impl fmt::Debug for Scraped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scraped")
            .field("register", &self.register)
            .field("set_size", &self.set_size)
            .finish_non_exhaustive()
    }
}

/// A kernel counter's metric name (without the prefix and `_total`).
fn kernel_name(stat: Stat) -> String {
    match stat {
        Stat::RingbufFull => "ringbuf_lost".to_string(),
        s => format!("kernel_{}", s.name()),
    }
}

fn kernel_help(stat: Stat) -> &'static str {
    match stat {
        Stat::Packets => "Packets to or from a watched port the kernel program inspected",
        Stat::FlowsTracked => "Verified handshakes: flows followed until a verdict",
        Stat::EarlyTalk => "EARLY-TALK verdicts the kernel gave",
        Stat::Quit => "QUIT verdicts the kernel gave",
        Stat::Pass => "PASS verdicts the kernel gave",
        Stat::UnverifiedPayload => {
            "Client payload the server's TCP would not take now (forged, out of window): never a verdict"
        }
        Stat::Allowlisted => "Flows of allowlisted clients, not followed",
        Stat::RingbufFull => {
            "Verdicts lost because the ring buffer to the daemon was full (neither logged nor banned)"
        }
        Stat::FlowInsertFailed => "New flows the flow table could not store",
        Stat::LostSync => {
            "Flows given up without a verdict: the server's stream could not be followed"
        }
        Stat::ServerClosed => "Flows the server closed before its greeting completed",
        Stat::Pipeconnect => "Early talk forgiven to PIPECONNECT clients that passed before",
        Stat::Probe => "Early talk that was exactly a known harmless probe",
        Stat::Fragments => "Early bytes judged from the first fragment of a fragmented segment",
        Stat::Unparsed => "Packets to a watched port that could not be parsed far enough to judge",
        Stat::BridgeBlocked => {
            "New SYNs the kernel dropped from fresh early talkers before their nft ban took hold"
        }
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let state = self.lock();
        for &(stat, value) in state.kernel.iter().flatten() {
            counter(&mut encoder, &kernel_name(stat), kernel_help(stat), value)?;
        }
        counter(
            &mut encoder,
            "set_full",
            "Bans refused because their nft set was full (raise --set-size)",
            self.counters.set_full.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "apply_errors",
            "Set changes nftables refused for another reason than a full set, or that could not be sent",
            self.counters.apply_errors.load(Ordering::Relaxed),
        )?;

        let now = bans::now();
        let mut active = [0u64; Cause::ALL.len()];
        let mut elements = [0u64; nft::ALL_SETS.len()];
        let live = state
            .register
            .iter()
            .flat_map(|s| &s.entries)
            .filter(|(expires, _, _)| *expires > now);
        for (_, cause, set) in live {
            active[*cause as usize] += 1;
            if let Some(i) = nft::ALL_SETS.iter().position(|s| s == set) {
                elements[i] += 1;
            }
        }
        let mut family = encoder.encode_descriptor(
            "bans_active",
            "Bans in force, by cause (from the register)",
            None,
            MetricType::Gauge,
        )?;
        for (cause, n) in Cause::ALL.iter().zip(active) {
            ConstGauge::new(n as i64).encode(family.encode_family(&CauseLabel {
                cause: cause.label(),
            })?)?;
        }
        let mut family = encoder.encode_descriptor(
            "set_elements",
            "Bans in force in each nft set of table inet spamdelay (from the register)",
            None,
            MetricType::Gauge,
        )?;
        for (set, n) in nft::ALL_SETS.iter().zip(elements) {
            ConstGauge::new(n as i64).encode(family.encode_family(&SetLabel { set })?)?;
        }
        let capacity = ConstGauge::new(i64::from(self.set_size));
        capacity.encode(encoder.encode_descriptor(
            "set_capacity",
            "Capacity of each nft set (--set-size)",
            None,
            capacity.metric_type(),
        )?)?;
        drop(state);
        self.encode_fleet(&mut encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

impl Scraped {
    /// The CrowdSec link's metrics, when it is on.
    fn encode_fleet(&self, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let f = fleet.lock().map(|f| f.clone()).unwrap_or_default();
        let n = |k: &str| f.counters.get(k).copied().unwrap_or(0);
        let up = ConstGauge::new(i64::from(f.reachable && f.last_error.is_none()));
        up.encode(encoder.encode_descriptor(
            "fleet_lapi_up",
            "1 while the last call to CrowdSec's LAPI worked",
            None,
            up.metric_type(),
        )?)?;
        let spool = ConstGauge::new(f.spool as i64);
        spool.encode(encoder.encode_descriptor(
            "fleet_spool_entries",
            "Bans and unbans waiting in the spool for LAPI",
            None,
            spool.metric_type(),
        )?)?;
        counter(
            encoder,
            "fleet_alerts_sent",
            "Bans published to LAPI as alerts",
            n("alerts_sent"),
        )?;
        counter(
            encoder,
            "fleet_unbans_sent",
            "Unbans published to LAPI (decisions deleted)",
            n("unbans_sent"),
        )?;
        counter(
            encoder,
            "fleet_spool_dropped",
            "Spooled changes dropped, oldest first, for a full spool",
            n("spool_dropped"),
        )?;
        let mut family = encoder.encode_descriptor(
            "fleet_errors",
            "Failed calls to LAPI, by kind",
            None,
            MetricType::Counter,
        )?;
        for kind in [
            "unreachable",
            "bad_credentials",
            "not_validated",
            "bad_key",
            "http_error",
        ] {
            ConstCounter::new(n(&format!("error_{kind}")))
                .encode(family.encode_family(&KindLabel { kind })?)?;
        }
        Ok(())
    }
}

/// `--metrics-listen`'s value: an address and port to listen on.
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("bad address '{s}': expected ADDR:PORT, e.g. 127.0.0.1:9469 or [::1]:9469")
    })
}

/// Opens `--metrics-listen`'s socket. Done at start-up, so a taken port
/// stops the start rather than the daemon running without its metrics.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        use std::io::ErrorKind::*;
        match e.kind() {
            AddrInUse => anyhow!(
                "--metrics-listen {addr}: address in use: another program (another spamdelay?) listens there; stop it or choose another port"
            ),
            AddrNotAvailable => anyhow!(
                "--metrics-listen {addr}: address not available: no interface here has {}; use 127.0.0.1 or one of this host's addresses",
                addr.ip()
            ),
            PermissionDenied => anyhow!(
                "--metrics-listen {addr}: permission denied: ports below 1024 need CAP_NET_BIND_SERVICE; use a port such as 9469"
            ),
            _ => anyhow!("--metrics-listen {addr}: cannot listen: {e}"),
        }
    })?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("--metrics-listen {addr}: making the socket non-blocking"))?;
    TcpListener::from_std(listener)
        .with_context(|| format!("--metrics-listen {addr}: handing the socket to the runtime"))
}

/// Scrapers served at once; more wait in the listen queue's stead (closed).
const MAX_CONNECTIONS: usize = 16;
/// A client has this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (404 elsewhere) until the task is dropped.
pub async fn serve(listener: TcpListener, telemetry: Telemetry) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, a connection reset before it
                // was taken: none of them ends the server.
                warn!("/metrics: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("/metrics: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, telemetry.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!("/metrics: connection ended: {e}");
            }
            drop(slot);
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn respond(
    req: Request<Incoming>,
    telemetry: Telemetry,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: spamdelay serves /metrics\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "GET /metrics\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let rendered = tokio::task::spawn_blocking(move || telemetry.render())
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    Ok(match rendered {
        Ok(body) => reply(StatusCode::OK, prometheus_text::CONTENT_TYPE, body),
        Err(e) => {
            error!("/metrics: {e:#}");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN,
                format!("spamdelay: {e:#}\n"),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::bans::Ban;

    fn ban(expires: u64, reason: &str) -> Ban {
        Ban {
            expires,
            reason: reason.into(),
            offences: 1,
            remember_until: expires + 100,
        }
    }

    fn write_register(path: &Path, bans: &[(&str, Ban)]) {
        let mut r = Register::default();
        for (cidr, b) in bans {
            r.bans.insert(cidr.parse().unwrap(), b.clone());
        }
        std::fs::write(path, serde_json::to_vec(&r).unwrap()).unwrap();
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("spamdelay-exporter-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn telemetry(register: &Path, kernel: KernelCounters) -> (Telemetry, Arc<Counters>) {
        with_fleet(register, kernel, None)
    }

    fn with_fleet(
        register: &Path,
        kernel: KernelCounters,
        fleet: Option<crate::fleet::SharedStatus>,
    ) -> (Telemetry, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let t = Telemetry::new(Sources {
            kernel,
            register: register.to_path_buf(),
            counters: counters.clone(),
            set_size: 1024,
            fleet,
        });
        (t, counters)
    }

    fn kernel_ok() -> KernelCounters {
        Box::new(|| Ok(Stat::ALL.iter().map(|&s| (s, s as u64 * 10)).collect()))
    }

    /// The value of the sample `series` (name and labels as rendered).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_metric_is_rendered_from_the_start() {
        let dir = Dir::new("start");
        let (t, _) = telemetry(&dir.0.join("bans.json"), kernel_ok());
        let text = t.render().unwrap();
        for series in [
            "spamdelay_up",
            "spamdelay_verdicts_total{verdict=\"early_talk\"}",
            "spamdelay_verdicts_total{verdict=\"probe\"}",
            "spamdelay_bans_total{cause=\"fleet\"}",
            "spamdelay_bans_active{cause=\"manual\"}",
            "spamdelay_set_elements{set=\"early_talkers_v6_64\"}",
            "spamdelay_apply_duration_seconds_count",
            "spamdelay_set_full_total",
            "spamdelay_apply_errors_total",
            "spamdelay_kernel_packets_total",
            "spamdelay_kernel_bridge_blocked_total",
        ] {
            assert!(value(&text, series).is_some(), "{series} missing:\n{text}");
        }
        assert_eq!(value(&text, "spamdelay_up"), Some(1.0));
        assert_eq!(value(&text, "spamdelay_set_capacity"), Some(1024.0));
        assert_eq!(
            value(&text, "spamdelay_ringbuf_lost_total"),
            Some(Stat::RingbufFull as u64 as f64 * 10.0)
        );
        assert!(
            !text.contains("kernel_ringbuf_full"),
            "ring-buffer losses are named as such"
        );
        let version = format!(
            "spamdelay_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&text, &version), Some(1.0), "{text}");
        assert!(text.contains("# TYPE spamdelay_apply_duration_seconds histogram"));
    }

    #[test]
    fn updates_show_in_the_next_scrape() {
        let dir = Dir::new("updates");
        let (t, counters) = telemetry(&dir.0.join("bans.json"), kernel_ok());
        for _ in 0..3 {
            t.verdict(Verdict::EarlyTalk);
        }
        t.verdict(Verdict::Pass);
        t.clone().ban_added(Cause::Aggregate);
        t.applied(Duration::from_micros(40));
        t.applied(Duration::from_millis(3));
        counters.set_full.fetch_add(2, Ordering::Relaxed);
        counters.apply_errors.fetch_add(1, Ordering::Relaxed);
        let text = t.render().unwrap();
        let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("{s} missing:\n{text}"));
        assert_eq!(v("spamdelay_verdicts_total{verdict=\"early_talk\"}"), 3.0);
        assert_eq!(v("spamdelay_verdicts_total{verdict=\"pass\"}"), 1.0);
        assert_eq!(v("spamdelay_verdicts_total{verdict=\"quit\"}"), 0.0);
        assert_eq!(v("spamdelay_bans_total{cause=\"aggregate\"}"), 1.0);
        assert_eq!(v("spamdelay_apply_duration_seconds_count"), 2.0);
        assert_eq!(
            v("spamdelay_apply_duration_seconds_bucket{le=\"5e-05\"}"),
            1.0,
            "40 µs is under 50 µs"
        );
        assert_eq!(v("spamdelay_set_full_total"), 2.0);
        assert_eq!(v("spamdelay_apply_errors_total"), 1.0);
    }

    #[test]
    fn bans_in_force_come_from_the_register_and_new_manual_bans_count() {
        let dir = Dir::new("register");
        let path = dir.0.join("bans.json");
        let now = bans::now();
        write_register(
            &path,
            &[
                (
                    "198.51.100.7",
                    ban(now + 600, "early-talk 5B after 0.00s: x"),
                ),
                ("198.51.100.8", ban(now + 600, "manual ban")),
                ("198.51.100.9", ban(now - 5, "early-talk 5B after 0.00s: x")),
                ("2001:db8::/64", ban(now + 600, "aggregate: 4 addresses")),
            ],
        );
        let (t, _) = telemetry(&path, kernel_ok());
        let text = t.render().unwrap();
        let v = |text: &str, s: &str| value(text, s).unwrap_or_else(|| panic!("{s}:\n{text}"));
        assert_eq!(v(&text, "spamdelay_bans_active{cause=\"early_talk\"}"), 1.0);
        assert_eq!(v(&text, "spamdelay_bans_active{cause=\"manual\"}"), 1.0);
        assert_eq!(v(&text, "spamdelay_bans_active{cause=\"aggregate\"}"), 1.0);
        assert_eq!(
            v(&text, "spamdelay_set_elements{set=\"early_talkers_v4\"}"),
            2.0
        );
        assert_eq!(
            v(&text, "spamdelay_set_elements{set=\"early_talkers_v6_64\"}"),
            1.0
        );
        assert_eq!(
            v(&text, "spamdelay_bans_total{cause=\"manual\"}"),
            0.0,
            "bans there at start were not added now"
        );
        // An admin bans one more, and re-bans the first for longer.
        write_register(
            &path,
            &[
                (
                    "198.51.100.7",
                    ban(now + 600, "early-talk 5B after 0.00s: x"),
                ),
                ("198.51.100.8", ban(now + 7200, "manual ban")),
                ("198.51.100.10", ban(now + 600, "spam run seen in logs")),
                ("2001:db8::/64", ban(now + 600, "aggregate: 4 addresses")),
            ],
        );
        let text = t.render().unwrap();
        assert_eq!(v(&text, "spamdelay_bans_total{cause=\"manual\"}"), 2.0);
        assert_eq!(v(&text, "spamdelay_bans_active{cause=\"manual\"}"), 2.0);
        let again = t.render().unwrap();
        assert_eq!(
            v(&again, "spamdelay_bans_total{cause=\"manual\"}"),
            2.0,
            "an unchanged register counts nothing"
        );
    }

    #[test]
    fn a_kernel_read_failure_leaves_the_other_metrics() {
        let dir = Dir::new("kernel");
        let (t, _) = telemetry(
            &dir.0.join("bans.json"),
            Box::new(|| Err(anyhow!("map gone"))),
        );
        let text = t.render().unwrap();
        assert!(!text.contains("spamdelay_kernel_"), "{text}");
        assert_eq!(value(&text, "spamdelay_up"), Some(1.0));
    }

    #[test]
    fn causes_follow_the_reasons_the_daemon_writes() {
        assert_eq!(
            Cause::of_reason("early-talk 11B after 0.21s: EHLO x"),
            Cause::EarlyTalk
        );
        assert_eq!(
            Cause::of_reason("quit after 1.00s of a 6s greet pause"),
            Cause::Quit
        );
        assert_eq!(
            Cause::of_reason("aggregate: 4 addresses of [2001:db8::]/64 banned; last: x"),
            Cause::Aggregate
        );
        assert_eq!(Cause::of_reason("manual ban"), Cause::Manual);
        assert_eq!(Cause::of_reason("quitter by hand"), Cause::Manual);
        for (i, c) in Cause::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "Cause::ALL is in declaration order");
        }
    }

    #[test]
    fn promtool_accepts_the_metrics() {
        let promtool = Path::new("/usr/bin/promtool");
        if !promtool.exists() {
            eprintln!(
                "\n!!!!! SKIPPED promtool_accepts_the_metrics: no promtool (Debian package prometheus; `cargo xtask setup` installs it) !!!!!\n"
            );
            return;
        }
        let dir = Dir::new("promtool");
        let path = dir.0.join("bans.json");
        write_register(
            &path,
            &[("198.51.100.7", ban(bans::now() + 60, "manual ban"))],
        );
        let fleet = crate::fleet::FleetStatus {
            reachable: true,
            spool: 3,
            counters: [
                ("alerts_sent".to_string(), 7),
                ("error_unreachable".to_string(), 2),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let (t, _) = with_fleet(&path, kernel_ok(), Some(Arc::new(Mutex::new(fleet))));
        let text = t.render().unwrap();
        assert_eq!(value(&text, "spamdelay_fleet_alerts_sent_total"), Some(7.0));
        assert_eq!(
            value(&text, "spamdelay_fleet_errors_total{kind=\"unreachable\"}"),
            Some(2.0)
        );
        assert_eq!(value(&text, "spamdelay_fleet_spool_entries"), Some(3.0));
        assert_eq!(value(&text, "spamdelay_fleet_lapi_up"), Some(1.0));
        t.verdict(Verdict::Quit);
        t.applied(Duration::from_micros(70));
        let text = t.render().unwrap();
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_are_served_on_their_path_only() {
        let dir = Dir::new("serve");
        let (t, _) = telemetry(&dir.0.join("bans.json"), kernel_ok());
        t.verdict(Verdict::Probe);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, t));
        let (metrics, other) =
            tokio::task::spawn_blocking(move || (get(addr, "/metrics"), get(addr, "/")))
                .await
                .unwrap();
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("content-type: text/plain; version=0.0.4"),
            "{metrics}"
        );
        assert!(
            metrics.contains("spamdelay_verdicts_total{verdict=\"probe\"} 1"),
            "{metrics}"
        );
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        server.abort();
    }

    #[test]
    fn a_listen_address_needs_a_port() {
        assert_eq!(listen_addr("[::1]:9469"), Ok("[::1]:9469".parse().unwrap()));
        for bad in ["9469", "localhost:9469", "127.0.0.1"] {
            let err = listen_addr(bad).unwrap_err();
            assert!(err.starts_with(&format!("bad address '{bad}': expected ADDR:PORT")));
        }
    }

    #[tokio::test]
    async fn a_taken_port_is_one_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("--metrics-listen {addr}: address in use: ")),
            "{err}"
        );
    }
}
