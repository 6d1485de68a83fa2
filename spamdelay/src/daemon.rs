//! `spamdelay run`, in three parts: preparation (checks, the settings a
//! reload may change), the kernel handle (loaded, attached, updated in place
//! by a reload, detached when dropped unless pinned), and the serve loop,
//! which hands every verdict to the enforcer, reloads on SIGHUP, pings
//! systemd and watches its tasks until SIGINT or SIGTERM. Bans stay in
//! nftables with their timeouts and in the register, for the next start.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use clap::Parser;
use log::{error, info, warn};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    allow::{self, Cidr},
    banpath::{BanPath, Counters},
    bans::{self, BanSettings, Store, TableSettings},
    cli::{Cli, Command, PauseSetting, RunArgs},
    config,
    enforcer::{Enforcer, Update},
    eventlog::EventLog,
    events,
    exporter::{self, Sources, Telemetry},
    fleet::Fleet,
    loader,
    metrics::{self, Attachment, Status},
    mta, notify,
    passcache::{PassCache, PassFile},
    policy::Policy,
    privilege,
    probes::{self, Probe},
};

pub async fn run(args: RunArgs, state_dir: PathBuf) -> Result<()> {
    // First: a signal that comes while the daemon starts (right after its
    // `watching` line, say) is kept for the serve loop, not fatal.
    let mut signals = Signals::install()?;
    loader::check_ports(&args.ports)?;
    for iface in &args.ifaces {
        loader::check_interface(iface)?;
    }
    privilege::check_run()?;
    // Before anything is opened, loaded, attached or written: one daemon per
    // state directory and interface (guard.rs), locked until `run` returns.
    let _lock = crate::guard::acquire(&state_dir, &args.ifaces)?;
    // `--event-log`: a path that cannot be opened stops the start here.
    let event_log = match &args.event_log {
        Some(path) => EventLog::open(path)?,
        None => EventLog::off(),
    };
    if let Some(path) = event_log.path() {
        info!("event log {} (JSON lines)", path.display());
    }
    // `--metrics-listen`: a taken port stops the start, before anything is
    // attached, rather than the daemon running without its metrics.
    let listener = args.metrics_listen.map(exporter::bind).transpose()?;
    // The status file and the pass history are written from the first
    // second, in a dry run too.
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let live = Live::from_args(&args)?;
    live.log_mta(&args);
    let store = Store::new(&state_dir);
    let pass_cache = PassCache::open(live.pass_file.clone(), args.pass_ttl, &state_dir);
    let mut kernel = Kernel::load(&args, &live, &pass_cache)?;
    let stats = Arc::new(loader::take_stats(&mut kernel.ebpf)?);

    // `--crowdsec-lapi`: unreadable secrets stop the start here; LAPI
    // itself may be down (its bans wait in the spool).
    let (foreign_tx, foreign_rx) = mpsc::channel(64);
    let fleet = Fleet::start(&args.fleet, &state_dir, foreign_tx)?;

    let counters = Arc::new(Counters::default());
    let telemetry = listener.as_ref().map(|_| {
        let kernel_stats = stats.clone();
        Telemetry::new(Sources {
            kernel: Box::new(move || metrics::sum(&*kernel_stats)),
            register: store.path(),
            counters: counters.clone(),
            set_size: args.set_size,
            fleet: fleet.as_ref().map(|f| f.status.clone()),
        })
    });
    let path = BanPath::daemon(
        TableSettings {
            ports: args.ports.clone(),
            action: args.action,
            set_size: args.set_size,
        },
        live.settings.clone(),
        args.dry_run,
        counters.clone(),
    )
    .with_telemetry(telemetry.clone())
    .with_observer(fleet.as_ref().and_then(Fleet::observer));
    let mut enforcer = Enforcer::new(
        store.clone(),
        live.policy.clone(),
        path,
        pass_cache,
        args.dry_run,
    )
    .with_event_log(event_log.clone())
    .with_telemetry(telemetry.clone());
    enforcer.start().await?;
    if let Some(f) = &enforcer.pass_cache().file {
        info!(
            "pass cache {} ({:?}, passes kept {})",
            f.path.display(),
            f.format,
            crate::duration::show(args.pass_ttl)
        );
    }
    kernel.attach(&args.ifaces)?;
    announce(&args, &live, &kernel, &store);

    let status = Status {
        pid: std::process::id(),
        started: bans::now(),
        updated: bans::now(),
        running: true,
        attached: kernel.attached.clone(),
        ports: args.ports.clone(),
        dry_run: args.dry_run,
        counters: Default::default(),
        bridge_map_id: Some(kernel.bridge_map_id),
        pin_dir: kernel.pin_dir.clone(),
        daemon_counters: Default::default(),
        event_log: event_log.path(),
        fleet: fleet
            .as_ref()
            .and_then(|f| f.status.lock().ok().map(|s| s.clone())),
    };
    let exporter = match (listener, telemetry) {
        (Some(listener), Some(telemetry)) => {
            if let Ok(addr) = listener.local_addr() {
                info!("metrics on http://{addr}/metrics");
            }
            Some(tokio::spawn(exporter::serve(listener, telemetry)))
        }
        _ => None,
    };
    let mut tasks = Tasks::spawn(
        &mut kernel,
        enforcer,
        stats,
        counters,
        status,
        &state_dir,
        event_log,
        exporter,
        Fleeting {
            fleet,
            foreign: foreign_rx,
        },
    )?;
    // Attached, and the table exists (the enforcer made it): ready.
    notify::ready(&tasks.summary());

    let failure = serve(
        &args,
        &state_dir,
        &mut signals,
        &mut tasks,
        &mut kernel,
        live,
    )
    .await;
    notify::stopping();
    if let Some(why) = &failure {
        error!("{why}: stopping so that a supervisor can restart spamdelay");
    }
    tasks.finish(&state_dir).await;
    // Dropping the handle detaches every program, but pinned links stay.
    drop(kernel);
    match failure {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

/// The settings a reload (SIGHUP) may change, derived from `run`'s
/// arguments the same way at start and at every reload.
#[derive(Clone, Debug)]
struct Live {
    allowlist: Vec<Cidr>,
    probes: Vec<Probe>,
    mta: Option<mta::Mta>,
    pipeconnect: mta::Pipeconnect,
    policy: Policy,
    settings: BanSettings,
    pass_file: Option<PassFile>,
}

impl Live {
    fn from_args(args: &RunArgs) -> Result<Live> {
        let allowlist = allow::effective(&args.allow).context("listing this host's addresses")?;
        let mta = mta::detect(args.mta, args.mta_config.as_deref())
            .context("reading the MTA's configuration")?;
        let greet_pause = match args.greet_pause {
            PauseSetting::Fixed(p) => Some(p),
            PauseSetting::Auto => mta.as_ref().and_then(|m| m.greet_pause),
        };
        let pipeconnect = mta
            .as_ref()
            .map_or(mta::Pipeconnect::Off, |m| m.pipeconnect.clone());
        Ok(Live {
            probes: probes::effective(&args.benign_probes, args.no_default_probes),
            policy: Policy {
                ban_time: args.ban_time,
                max_ban_time: args.max_ban_time.max(args.ban_time),
                ban_quitters: args.ban_quitters,
                ipv6_prefix: args.ipv6_prefix,
                remember: args.remember,
                greet_pause,
            },
            settings: BanSettings {
                remember_secs: args.remember.as_secs(),
                ipv6_aggregate: args.ipv6_aggregate,
                allow: allowlist.clone(),
            },
            pass_file: args.pass_cache.clone().map(|path| PassFile {
                path,
                format: args.pass_cache_format,
                reload: args.pass_cache_reload.clone(),
            }),
            allowlist,
            mta,
            pipeconnect,
        })
    }

    fn probe_bytes(&self) -> Vec<Vec<u8>> {
        self.probes.iter().map(|p| p.bytes().to_vec()).collect()
    }

    /// What was read from the MTA, and what the greet pause means here.
    fn log_mta(&self, args: &RunArgs) {
        match &self.mta {
            Some(m) => info!("{m}"),
            None if args.mta == mta::MtaKind::None => info!("MTA settings not read (--mta none)"),
            None => info!(
                "no MTA configuration found (/etc/postfix/main.cf, /etc/exim4/exim4.conf, /etc/mail/sendmail.cf): use --mta and --mta-config"
            ),
        }
        if let PauseSetting::Fixed(p) = args.greet_pause {
            info!("greet pause {} (--greet-pause)", crate::duration::show(p));
        }
        if self.policy.greet_pause.is_none() {
            let how = self
                .mta
                .as_ref()
                .map_or("configure your MTA's greet pause", |m| m.how_to_pause);
            warn!(
                "no greet pause: spamdelay still catches blind senders that talk at once, but not those that wait a moment before talking, and QUIT verdicts cannot be weighed; to add one: {how}"
            );
        }
    }
}

/// The loaded kernel object. Dropping it detaches the programs, except
/// those pinned (`--pin-dir`), which stay attached for the next run.
struct Kernel {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: Vec<Attachment>,
    bridge_map_id: u32,
    bridge_time: Duration,
}

impl Kernel {
    /// Loads and verifies the programs and fills their maps: allowlist,
    /// probes, PIPECONNECT hosts, the passes remembered from before.
    fn load(args: &RunArgs, live: &Live, pass_cache: &PassCache) -> Result<Kernel> {
        let pin_dir = (!args.no_pin).then(|| args.pin_dir.clone());
        // A dry run never drops: nothing may refuse a client it only reports.
        let bridge_time = if args.dry_run {
            Duration::ZERO
        } else {
            args.bridge_time
        };
        let mut ebpf = loader::load(&loader::KernelConfig {
            ports: args.ports.clone(),
            max_flows: args.max_flows,
            pipeconnect: live.pipeconnect.clone(),
            pass_ttl: args.pass_ttl,
            probes: live.probe_bytes(),
            bridge_time,
            pin_dir: pin_dir.clone(),
        })?;
        let bridge_map_id = loader::bridge_map_id(&ebpf)?;
        loader::fill_allowlist(&mut ebpf, &live.allowlist)?;
        restore_passes(&mut ebpf, pass_cache, &live.pipeconnect)?;
        Ok(Kernel {
            ebpf,
            pin_dir,
            attached: Vec::new(),
            bridge_map_id,
            bridge_time,
        })
    }

    /// Attaches to every interface, adopting what an earlier run pinned.
    fn attach(&mut self, ifaces: &[String]) -> Result<()> {
        if let Some(dir) = &self.pin_dir {
            loader::prune_links(dir, ifaces)?;
        }
        for iface in ifaces {
            // What `status` shows: how detection is attached, and whether it
            // was running already (pinned by an earlier run, adopted now).
            let mode = match &self.pin_dir {
                Some(dir) => match loader::attach_pinned(&mut self.ebpf, iface, dir) {
                    Ok(true) => {
                        info!(
                            "{iface}: adopted the programs pinned in {} (replaced atomically)",
                            dir.display()
                        );
                        format!("{}, pinned, adopted", loader::AttachMode::Tcx)
                    }
                    Ok(false) => format!("{}, pinned", loader::AttachMode::Tcx),
                    Err(e) => {
                        warn!("{e:#}: attaching {iface} unpinned, detached when spamdelay exits");
                        loader::attach(&mut self.ebpf, iface)?.to_string()
                    }
                },
                None => loader::attach(&mut self.ebpf, iface)?.to_string(),
            };
            self.attached.push(Attachment {
                iface: iface.clone(),
                mode,
            });
        }
        Ok(())
    }

    /// A reload's allowlist, probes and PIPECONNECT hosts, changed in place
    /// while the programs run: detection never pauses.
    fn update(&mut self, old: &Live, new: &Live) -> Result<()> {
        if old.allowlist != new.allowlist {
            loader::replace_allowlist(&mut self.ebpf, &old.allowlist, &new.allowlist)?;
        }
        if old.probes != new.probes {
            loader::replace_probes(&mut self.ebpf, &old.probe_bytes(), &new.probe_bytes())?;
        }
        if let (mta::Pipeconnect::Hosts(was), mta::Pipeconnect::Hosts(now)) =
            (&old.pipeconnect, &new.pipeconnect)
            && was != now
        {
            loader::replace_pipeconnect_hosts(&mut self.ebpf, was, now)?;
        }
        Ok(())
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if let Some(dir) = &self.pin_dir {
            info!(
                "detection stays attached (pinned in {}): the next run adopts it, `spamdelay detach` removes it",
                dir.display()
            );
        }
    }
}

/// The start-up lines: where, what, and how bans are made.
fn announce(args: &RunArgs, live: &Live, kernel: &Kernel, store: &Store) {
    if !live.probes.is_empty() {
        let shown: Vec<String> = live.probes.iter().map(ToString::to_string).collect();
        info!(
            "benign probes (logged as PROBE, never banned): {}",
            shown.join(" | ")
        );
    }
    let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
    let on: Vec<String> = kernel
        .attached
        .iter()
        .map(|a| format!("{} ({})", a.iface, a.mode))
        .collect();
    info!(
        "watching port {} on {}{}",
        ports.join(","),
        on.join(", "),
        if args.dry_run {
            "; dry run: detect and log only, nftables untouched"
        } else {
            ""
        }
    );
    let allowed: Vec<String> = live.allowlist.iter().map(ToString::to_string).collect();
    info!("allowlist: {}", allowed.join(" "));
    if !args.dry_run {
        info!(
            "banning early talkers in table inet spamdelay for {} (doubling per repeat, up to {}); bans kept in {}",
            crate::duration::show(args.ban_time),
            crate::duration::show(args.max_ban_time),
            store.path().display()
        );
    }
    if args.dry_run {
        info!("bridge block off (dry run)");
    } else if kernel.bridge_time.is_zero() {
        info!("bridge block off (--bridge-time 0)");
    } else {
        info!(
            "bridge block: an early talker's new connections are dropped in the kernel for {} from its verdict",
            crate::duration::show(kernel.bridge_time)
        );
    }
}

/// The daemon's tasks: none may end on its own.
struct Tasks {
    reader: JoinHandle<std::io::Result<()>>,
    enforcing: JoinHandle<()>,
    reporting: JoinHandle<()>,
    kernel_log: Option<JoinHandle<std::io::Result<()>>>,
    /// `--metrics-listen`'s server, if on.
    exporter: Option<JoinHandle<Result<()>>>,
    /// `--crowdsec-lapi`'s publisher and subscriber, if on.
    fleet: Option<Fleet>,
    updates: mpsc::Sender<Update>,
    stats: Arc<PerCpuArray<MapData, u64>>,
    counters: Arc<Counters>,
    status: Status,
    /// `--event-log` (or off): SIGHUP reopens it, a reload may move it.
    event_log: EventLog,
}

impl Tasks {
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        kernel: &mut Kernel,
        enforcer: Enforcer,
        stats: Arc<PerCpuArray<MapData, u64>>,
        counters: Arc<Counters>,
        status: Status,
        state_dir: &Path,
        event_log: EventLog,
        exporter: Option<JoinHandle<Result<()>>>,
        fleeting: Fleeting,
    ) -> Result<Tasks> {
        let ring = loader::take_events(&mut kernel.ebpf)?;
        let kernel_log = match aya_log::EbpfLogger::init(&mut kernel.ebpf) {
            Ok(logger) => Some(tokio::spawn(events::forward_kernel_log(logger))),
            Err(e) => {
                warn!("kernel debug records unavailable: {e}");
                None
            }
        };
        let (tx, rx) = mpsc::channel(65536);
        let (updates, updates_rx) = mpsc::channel(4);
        Ok(Tasks {
            reader: tokio::spawn(read_events(ring, tx)),
            enforcing: tokio::spawn(enforcer.run(rx, updates_rx, fleeting.foreign)),
            reporting: tokio::spawn(report_status(
                stats.clone(),
                counters.clone(),
                status.clone(),
                state_dir.to_path_buf(),
                event_log.clone(),
                fleeting.fleet.as_ref().map(|f| f.status.clone()),
            )),
            kernel_log,
            exporter,
            fleet: fleeting.fleet,
            updates,
            stats,
            counters,
            status,
            event_log,
        })
    }

    /// systemd's STATUS line: the verdict and ban counts.
    fn summary(&self) -> String {
        let kernel = metrics::sum(&*self.stats).unwrap_or_default();
        summary(&kernel, &self.counters.snapshot())
    }

    /// Waits for the first task to end, and says why it did. Cancel-safe.
    async fn ended(&mut self) -> String {
        tokio::select! {
            r = &mut self.reader => ended("the ring-buffer reader", r.map(|r| r.map_err(anyhow::Error::from))),
            r = &mut self.enforcing => {
                // The enforcer also ends when the reader went first and
                // closed its channel: then the reader's reason is the one.
                match tokio::time::timeout(Duration::from_secs(1), &mut self.reader).await {
                    Ok(rr) => ended("the ring-buffer reader", rr.map(|r| r.map_err(anyhow::Error::from))),
                    Err(_) => ended("the enforcer", r.map(Ok)),
                }
            }
            r = &mut self.reporting => ended("the status writer", r.map(Ok)),
            r = optional(&mut self.exporter) => ended("the metrics server", r),
            why = fleet_ended(&mut self.fleet) => why,
        }
    }

    /// Stops reading, lets the enforcer finish what it has, and writes the
    /// final status and counters.
    async fn finish(mut self, state_dir: &Path) {
        // Closing the channel lets the enforcer finish what it has, then stop.
        if !self.reader.is_finished() {
            self.reader.abort();
            let _ = (&mut self.reader).await;
        }
        if !self.enforcing.is_finished()
            && tokio::time::timeout(Duration::from_secs(5), &mut self.enforcing)
                .await
                .is_err()
        {
            warn!("the enforcer did not finish within 5 s");
        }
        if !self.reporting.is_finished() {
            self.reporting.abort();
            let _ = (&mut self.reporting).await;
        }
        let fleet_status = self
            .fleet
            .as_ref()
            .and_then(|f| f.status.lock().ok().map(|s| s.clone()));
        if let Some(fleet) = self.fleet {
            fleet.stop();
        }
        for task in [
            self.kernel_log.map(|t| t.abort_handle()),
            self.exporter.map(|t| t.abort_handle()),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
        let mut status = self.status;
        status.event_log = self.event_log.path();
        status.fleet = fleet_status;
        if let Ok(counts) = metrics::sum(&*self.stats) {
            info!("stopping: {}", metrics::line(&counts));
            status.set_counters(&counts);
        }
        status.daemon_counters = self.counters.snapshot();
        info!(
            "bans made: {}",
            metrics::pairs(status.daemon_counters.iter().map(|(k, v)| (k.as_str(), *v)))
        );
        status.running = false;
        status.updated = bans::now();
        if let Err(e) = status.write(state_dir) {
            warn!("writing the final status: {e:#}");
        }
    }
}

/// Serves until a signal, or until a task ends: a daemon that no longer
/// reads or bans must not look alive. Returns why it stopped, if it failed,
/// so that it exits non-zero and a supervisor restarts it.
async fn serve(
    start: &RunArgs,
    state_dir: &Path,
    signals: &mut Signals,
    tasks: &mut Tasks,
    kernel: &mut Kernel,
    mut live: Live,
) -> Option<String> {
    let mut watchdog = notify::watchdog_every().map(tokio::time::interval);
    loop {
        tokio::select! {
            _ = signals.int.recv() => return None,
            _ = signals.term.recv() => return None,
            _ = signals.hup.recv() => {
                notify::reloading();
                // logrotate's signal reaches the event log whatever the reload finds.
                tasks.event_log.reopen_or_warn();
                let (updates, log) = (&tasks.updates, &tasks.event_log);
                match reload(start, state_dir, kernel, &live, updates, log).await {
                    Ok(new) => live = new,
                    Err(e) => error!("reload refused, the running settings stay: {e:#}"),
                }
                notify::ready(&tasks.summary());
            }
            _ = tick(&mut watchdog) => notify::watchdog(),
            why = tasks.ended() => return Some(why),
        }
    }
}

/// The fleet link and the enforcer's end of its channel.
struct Fleeting {
    fleet: Option<Fleet>,
    foreign: mpsc::Receiver<crate::banpath::Foreign>,
}

async fn fleet_ended(fleet: &mut Option<Fleet>) -> String {
    match fleet {
        Some(f) => f.ended().await,
        None => std::future::pending().await,
    }
}

/// An optional task's end; never, if there is none.
async fn optional<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// SIGHUP: reads the config file and the command line again, as at start,
/// and applies what can change while detection runs. A file that does not
/// parse changes nothing. Returns the settings now in force.
async fn reload(
    start: &RunArgs,
    state_dir: &Path,
    kernel: &mut Kernel,
    live: &Live,
    updates: &mpsc::Sender<Update>,
    event_log: &EventLog,
) -> Result<Live> {
    let (args, new_state_dir) = reread_args()?;
    let new = Live::from_args(&args)?;
    let mut fixed = restart_needed(start, &args);
    if new_state_dir != state_dir {
        fixed.push("state-dir");
    }
    if std::mem::discriminant(&live.pipeconnect) != std::mem::discriminant(&new.pipeconnect) {
        fixed.push("the MTA's PIPECONNECT setting");
    }
    if !fixed.is_empty() {
        warn!(
            "reload: {} changed, which needs a restart (systemctl restart spamdelay); running as before for these",
            fixed.join(", ")
        );
    }
    kernel.update(live, &new)?;
    let lift: Vec<Cidr> = new
        .allowlist
        .iter()
        .filter(|c| !live.allowlist.contains(c))
        .copied()
        .collect();
    for cidr in &lift {
        // The bridge lasts seconds: failing to lift it is no reason to stop.
        if let Err(e) = loader::unbridge(loader::BridgeMap::Id(kernel.bridge_map_id), cidr) {
            warn!("lifting the bridge block of newly allowlisted {cidr}: {e:#}");
        }
    }
    updates
        .send(Update {
            policy: new.policy.clone(),
            settings: new.settings.clone(),
            pass_file: new.pass_file.clone(),
            lift,
        })
        .await
        .context("the enforcer is gone")?;
    let changes = changes(live, &new);
    if new.mta != live.mta || new.policy.greet_pause != live.policy.greet_pause {
        new.log_mta(&args);
    }
    event_log.follow(args.event_log.as_deref());
    info!(
        "reloaded: {}",
        if changes.is_empty() {
            "nothing changed".to_string()
        } else {
            changes.join("; ")
        }
    );
    Ok(new)
}

/// `run`'s arguments as a fresh start would see them: the config file
/// spliced into this process's command line, parsed by clap.
fn reread_args() -> Result<(RunArgs, PathBuf)> {
    let argv = config::expand(std::env::args_os().collect())?;
    let cli = Cli::try_parse_from(argv).map_err(config::first_line)?;
    match cli.command {
        Command::Run(args) => Ok((*args, cli.state_dir)),
        _ => bail!("the command line is no longer `run`"),
    }
}

/// Settings fixed at start: the programs, maps, table and attachments
/// were made with them.
fn restart_needed(start: &RunArgs, now: &RunArgs) -> Vec<&'static str> {
    let mut fixed = Vec::new();
    let mut check = |same: bool, key: &'static str| {
        if !same {
            fixed.push(key);
        }
    };
    check(start.ifaces == now.ifaces, "iface");
    check(start.ports == now.ports, "port");
    check(start.dry_run == now.dry_run, "dry-run");
    check(start.bridge_time == now.bridge_time, "bridge-time");
    check(start.pin_dir == now.pin_dir, "pin-dir");
    check(start.no_pin == now.no_pin, "no-pin");
    check(start.action == now.action, "action");
    check(start.set_size == now.set_size, "set-size");
    check(start.pass_ttl == now.pass_ttl, "pass-ttl");
    check(start.max_flows == now.max_flows, "max-flows");
    check(start.metrics_listen == now.metrics_listen, "metrics-listen");
    check(start.fleet == now.fleet, "crowdsec-*");
    fixed
}

/// What a reload changed, for its log line.
fn changes(old: &Live, new: &Live) -> Vec<String> {
    let mut out = Vec::new();
    let added: Vec<String> = new
        .allowlist
        .iter()
        .filter(|c| !old.allowlist.contains(c))
        .map(ToString::to_string)
        .collect();
    let removed: Vec<String> = old
        .allowlist
        .iter()
        .filter(|c| !new.allowlist.contains(c))
        .map(ToString::to_string)
        .collect();
    if !added.is_empty() || !removed.is_empty() {
        let mut parts = Vec::new();
        if !added.is_empty() {
            parts.push(format!("+{}", added.join(" +")));
        }
        if !removed.is_empty() {
            parts.push(format!("-{}", removed.join(" -")));
        }
        out.push(format!("allowlist {}", parts.join(" ")));
    }
    let (a, b) = (&old.policy, &new.policy);
    let d = crate::duration::show;
    if a.ban_time != b.ban_time {
        out.push(format!("ban-time {} -> {}", d(a.ban_time), d(b.ban_time)));
    }
    if a.max_ban_time != b.max_ban_time {
        out.push(format!(
            "max-ban-time {} -> {}",
            d(a.max_ban_time),
            d(b.max_ban_time)
        ));
    }
    if a.remember != b.remember {
        out.push(format!("remember {} -> {}", d(a.remember), d(b.remember)));
    }
    if a.ban_quitters != b.ban_quitters {
        out.push(format!("ban-quitters {}", b.ban_quitters));
    }
    if a.ipv6_prefix != b.ipv6_prefix {
        out.push(format!(
            "ipv6-prefix {} -> {}",
            a.ipv6_prefix, b.ipv6_prefix
        ));
    }
    if a.greet_pause != b.greet_pause {
        let p = |p: Option<Duration>| p.map_or("none".to_string(), d);
        out.push(format!(
            "greet pause {} -> {}",
            p(a.greet_pause),
            p(b.greet_pause)
        ));
    }
    if old.settings.ipv6_aggregate != new.settings.ipv6_aggregate {
        out.push(format!(
            "ipv6-aggregate {} -> {}",
            old.settings.ipv6_aggregate, new.settings.ipv6_aggregate
        ));
    }
    if old.probes != new.probes {
        out.push(format!("{} benign probes", new.probes.len()));
    }
    let file = |f: &Option<PassFile>| {
        f.as_ref().map_or("none".to_string(), |f| {
            format!("{} ({:?})", f.path.display(), f.format)
        })
    };
    if file(&old.pass_file) != file(&new.pass_file)
        || old.pass_file.as_ref().map(|f| &f.reload) != new.pass_file.as_ref().map(|f| &f.reload)
    {
        out.push(format!("pass cache {}", file(&new.pass_file)));
    }
    if let (mta::Pipeconnect::Hosts(was), mta::Pipeconnect::Hosts(now)) =
        (&old.pipeconnect, &new.pipeconnect)
        && was != now
    {
        out.push(format!("{} PIPECONNECT hosts", now.len()));
    }
    out
}

/// `12 verdicts (3 early-talk, 1 quit, 8 pass); 3 bans made`.
fn summary(
    kernel: &[(spamdelay_common::Stat, u64)],
    daemon: &std::collections::BTreeMap<String, u64>,
) -> String {
    use spamdelay_common::Stat;
    let get = |s: Stat| kernel.iter().find(|(k, _)| *k == s).map_or(0, |(_, v)| *v);
    let kinds = [
        (Stat::EarlyTalk, "early-talk"),
        (Stat::Quit, "quit"),
        (Stat::Pass, "pass"),
        (Stat::Pipeconnect, "pipeconnect"),
        (Stat::Probe, "probe"),
    ];
    let total: u64 = kinds.iter().map(|(s, _)| get(*s)).sum();
    let shown: Vec<String> = kinds
        .iter()
        .filter(|(s, _)| get(*s) > 0)
        .map(|(s, name)| format!("{} {name}", get(*s)))
        .collect();
    let bans = daemon.get("bans").copied().unwrap_or(0);
    if shown.is_empty() {
        format!("{total} verdicts; {bans} bans made")
    } else {
        format!("{total} verdicts ({}); {bans} bans made", shown.join(", "))
    }
}

/// Why a task that should run for ever ended.
fn ended(task: &str, result: Result<Result<()>, tokio::task::JoinError>) -> String {
    match result {
        Ok(Ok(())) => format!("{task} stopped"),
        Ok(Err(e)) => format!("{task} failed: {e:#}"),
        Err(e) if e.is_panic() => format!("{task} panicked"),
        Err(e) => format!("{task} was cancelled: {e}"),
    }
}

/// Test switch: `SPAMDELAY_TEST_FAULT=reader` makes the ring-buffer reader
/// fail a moment after start, as a lost ring buffer would, so the tests can
/// prove the daemon does not go on without it.
const FAULT_SWITCH: &str = "SPAMDELAY_TEST_FAULT";

/// The ring-buffer reader's task.
async fn read_events(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<events::Report>,
) -> std::io::Result<()> {
    if std::env::var_os(FAULT_SWITCH).is_some_and(|v| v == "reader") {
        tokio::time::sleep(Duration::from_millis(500)).await;
        return Err(std::io::Error::other(format!(
            "stopped by {FAULT_SWITCH}=reader (a test switch)"
        )));
    }
    events::forward(ring, tx).await
}

/// Gives the kernel the passes remembered from before this start, so a
/// PIPECONNECT client is not taken for a blind sender after a restart.
fn restore_passes(
    ebpf: &mut Ebpf,
    cache: &PassCache,
    pipeconnect: &mta::Pipeconnect,
) -> Result<()> {
    let now = bans::now();
    let ttl = cache.ttl.as_secs();
    let boot = crate::clock::boot_ns();
    let live = cache.live(now).map(|(ip, at)| {
        let left = at.saturating_add(ttl).saturating_sub(now);
        (ip, boot.saturating_add(left.saturating_mul(1_000_000_000)))
    });
    let n = loader::restore_passers(ebpf, live)?;
    if *pipeconnect != mta::Pipeconnect::Off {
        info!(
            "PIPECONNECT: early talk is forgiven to clients that passed within {} ({n} remembered)",
            crate::duration::show(cache.ttl)
        );
    }
    Ok(())
}

/// Refreshes the status file each second with the kernel's counters and
/// the daemon's own, and systemd's STATUS line.
async fn report_status(
    stats: Arc<PerCpuArray<MapData, u64>>,
    counters: Arc<Counters>,
    mut status: Status,
    dir: PathBuf,
    event_log: EventLog,
    fleet: Option<crate::fleet::SharedStatus>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shown = String::new();
    loop {
        tick.tick().await;
        // A reload may have moved it: `spamdelay unban` follows.
        status.event_log = event_log.path();
        let kernel = metrics::sum(&*stats).unwrap_or_default();
        status.set_counters(&kernel);
        status.daemon_counters = counters.snapshot();
        status.updated = bans::now();
        if let Some(f) = &fleet {
            status.fleet = f.lock().ok().map(|s| s.clone());
        }
        let line = summary(&kernel, &status.daemon_counters);
        if line != shown {
            notify::status(&line);
            shown = line;
        }
        // The write and its rename are quick, but block: off the workers.
        let (s, d) = (status.clone(), dir.clone());
        match tokio::task::spawn_blocking(move || s.write(&d)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("writing the status file: {e:#}"),
            Err(e) => warn!("writing the status file: {e}"),
        }
    }
}
