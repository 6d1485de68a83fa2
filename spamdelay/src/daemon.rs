//! `spamdelay run`: load, set up the nftables table and restore bans, attach,
//! then hand every verdict to the enforcer until SIGINT or SIGTERM, when the
//! programs are detached and the daemon exits 0. Bans stay in nftables with
//! their timeouts and in the register, for the next start.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use log::{info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    allow,
    banpath::{BanPath, Counters},
    bans::{self, BanSettings, Store, TableSettings},
    cli::{PauseSetting, RunArgs},
    enforcer::Enforcer,
    events, loader,
    metrics::{self, Attachment, Status},
    mta,
    passcache::{PassCache, PassFile},
    policy::Policy,
    privilege, probes,
};

pub async fn run(args: RunArgs, state_dir: PathBuf) -> Result<()> {
    // First: a SIGTERM that comes while the daemon starts (right after its
    // `watching` line, say) is kept for the serve loop, not fatal.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loader::check_ports(&args.ports)?;
    for iface in &args.ifaces {
        loader::check_interface(iface)?;
    }
    privilege::check_run()?;
    // The status file and the pass history are written from the first
    // second, in a dry run too.
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let allowlist = allow::effective(&args.allow).context("listing this host's addresses")?;
    let store = Store::new(&state_dir);

    let mta = mta::detect(args.mta, args.mta_config.as_deref())
        .context("reading the MTA's configuration")?;
    let greet_pause = match args.greet_pause {
        PauseSetting::Fixed(p) => Some(p),
        PauseSetting::Auto => mta.as_ref().and_then(|m| m.greet_pause),
    };
    match &mta {
        Some(m) => info!("{m}"),
        None if args.mta == mta::MtaKind::None => info!("MTA settings not read (--mta none)"),
        None => info!(
            "no MTA configuration found (/etc/postfix/main.cf, /etc/exim4/exim4.conf, /etc/mail/sendmail.cf): use --mta and --mta-config"
        ),
    }
    if let PauseSetting::Fixed(p) = args.greet_pause {
        info!(
            "greet pause {} (--greet-pause)",
            humantime::format_duration(p)
        );
    }
    if greet_pause.is_none() {
        let how = mta
            .as_ref()
            .map_or("configure your MTA's greet pause", |m| m.how_to_pause);
        warn!(
            "no greet pause: spamdelay still catches blind senders that talk at once, but not those that wait a moment before talking, and QUIT verdicts cannot be weighed; to add one: {how}"
        );
    }
    let pipeconnect = mta
        .as_ref()
        .map_or(mta::Pipeconnect::Off, |m| m.pipeconnect.clone());
    let probes = probes::effective(&args.benign_probes, args.no_default_probes);
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
        pipeconnect: pipeconnect.clone(),
        pass_ttl: args.pass_ttl,
        probes: probes.iter().map(|p| p.bytes().to_vec()).collect(),
        bridge_time,
        pin_dir: pin_dir.clone(),
    })?;
    let bridge_map_id = loader::bridge_map_id(&ebpf)?;
    loader::fill_allowlist(&mut ebpf, &allowlist)?;
    let pass_cache = PassCache::open(
        args.pass_cache.clone().map(|path| PassFile {
            path,
            format: args.pass_cache_format,
            reload: args.pass_cache_reload.clone(),
        }),
        args.pass_ttl,
        &state_dir,
    );
    restore_passes(&mut ebpf, &pass_cache, &pipeconnect)?;
    if !probes.is_empty() {
        let shown: Vec<String> = probes.iter().map(ToString::to_string).collect();
        info!(
            "benign probes (logged as PROBE, never banned): {}",
            shown.join(" | ")
        );
    }
    let ring = loader::take_events(&mut ebpf)?;
    let kernel_log = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(tokio::spawn(events::forward_kernel_log(logger))),
        Err(e) => {
            warn!("kernel debug records unavailable: {e}");
            None
        }
    };
    let stats = Arc::new(loader::take_stats(&mut ebpf)?);

    let counters = Arc::new(Counters::default());
    let path = BanPath::daemon(
        TableSettings {
            ports: args.ports.clone(),
            action: args.action,
            set_size: args.set_size,
        },
        BanSettings {
            remember_secs: args.remember.as_secs(),
            ipv6_aggregate: args.ipv6_aggregate,
            allow: allowlist.clone(),
        },
        args.dry_run,
        counters.clone(),
    );
    let policy = Policy {
        ban_time: args.ban_time,
        max_ban_time: args.max_ban_time.max(args.ban_time),
        ban_quitters: args.ban_quitters,
        ipv6_prefix: args.ipv6_prefix,
        remember: args.remember,
        greet_pause,
    };
    let mut enforcer = Enforcer::new(store.clone(), policy, path, pass_cache, args.dry_run);
    enforcer.start().await?;
    if let Some(f) = &enforcer.pass_cache().file {
        info!(
            "pass cache {} ({:?}, passes kept {})",
            f.path.display(),
            f.format,
            humantime::format_duration(args.pass_ttl)
        );
    }

    if let Some(dir) = &pin_dir {
        loader::prune_links(dir, &args.ifaces)?;
    }
    let mut attached = Vec::new();
    for iface in &args.ifaces {
        // What `status` shows: how detection is attached, and whether it was
        // running already (pinned by an earlier run, adopted by this one).
        let mode = match &pin_dir {
            Some(dir) => match loader::attach_pinned(&mut ebpf, iface, dir) {
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
                    loader::attach(&mut ebpf, iface)?.to_string()
                }
            },
            None => loader::attach(&mut ebpf, iface)?.to_string(),
        };
        attached.push(Attachment {
            iface: iface.clone(),
            mode,
        });
    }
    let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
    let on: Vec<String> = attached
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
    let allowed: Vec<String> = allowlist.iter().map(ToString::to_string).collect();
    info!("allowlist: {}", allowed.join(" "));
    if !args.dry_run {
        info!(
            "banning early talkers in table inet spamdelay for {} (doubling per repeat, up to {}); bans kept in {}",
            humantime::format_duration(args.ban_time),
            humantime::format_duration(args.max_ban_time),
            store.path().display()
        );
    }
    if args.dry_run {
        info!("bridge block off (dry run)");
    } else if bridge_time.is_zero() {
        info!("bridge block off (--bridge-time 0)");
    } else {
        info!(
            "bridge block: an early talker's new connections are dropped in the kernel for {} from its verdict",
            humantime::format_duration(bridge_time)
        );
    }

    let mut status = Status {
        pid: std::process::id(),
        started: bans::now(),
        updated: bans::now(),
        running: true,
        attached,
        ports: args.ports.clone(),
        dry_run: args.dry_run,
        counters: Default::default(),
        bridge_map_id: Some(bridge_map_id),
        pin_dir: pin_dir.clone(),
        daemon_counters: Default::default(),
    };
    let (tx, rx) = mpsc::channel(65536);
    let mut reader = tokio::spawn(read_events(ring, tx));
    let mut enforcing = tokio::spawn(enforcer.run(rx));
    let mut reporting = tokio::spawn(report_status(
        stats.clone(),
        counters.clone(),
        status.clone(),
        state_dir.clone(),
    ));

    // Serve until a signal, or until a task ends: none may end on its own,
    // and a daemon that no longer reads or bans must not look alive. It
    // exits non-zero with the reason, so a supervisor restarts it.
    let failure = tokio::select! {
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
        r = &mut reader => Some(ended("the ring-buffer reader", r.map(|r| r.map_err(anyhow::Error::from)))),
        r = &mut enforcing => {
            // The enforcer also ends when the reader went first and closed
            // its channel: then the reader's reason is the one to give.
            match tokio::time::timeout(Duration::from_secs(1), &mut reader).await {
                Ok(rr) => Some(ended("the ring-buffer reader", rr.map(|r| r.map_err(anyhow::Error::from)))),
                Err(_) => Some(ended("the enforcer", r.map(Ok))),
            }
        }
        r = &mut reporting => Some(ended("the status writer", r.map(Ok))),
    };
    if let Some(why) = &failure {
        log::error!("{why}: stopping so that a supervisor can restart spamdelay");
    }
    // Closing the channel lets the enforcer finish what it has, then stop.
    if !reader.is_finished() {
        reader.abort();
        let _ = (&mut reader).await;
    }
    if !enforcing.is_finished()
        && tokio::time::timeout(Duration::from_secs(5), &mut enforcing)
            .await
            .is_err()
    {
        warn!("the enforcer did not finish within 5 s");
    }
    if !reporting.is_finished() {
        reporting.abort();
        let _ = (&mut reporting).await;
    }
    if let Some(task) = kernel_log {
        task.abort();
    }
    if let Ok(counts) = metrics::sum(&*stats) {
        info!("stopping: {}", metrics::line(&counts));
        status.set_counters(&counts);
    }
    status.daemon_counters = counters.snapshot();
    info!(
        "bans made: {}",
        metrics::pairs(status.daemon_counters.iter().map(|(k, v)| (k.as_str(), *v)))
    );
    status.running = false;
    status.updated = bans::now();
    if let Err(e) = status.write(&state_dir) {
        warn!("writing the final status: {e:#}");
    }
    // Dropping the object detaches every program, but pinned links stay.
    drop(ebpf);
    if let Some(dir) = &pin_dir {
        info!(
            "detection stays attached (pinned in {}): the next run adopts it, `spamdelay detach` removes it",
            dir.display()
        );
    }
    match failure {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
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
    ring: aya::maps::RingBuf<MapData>,
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
    ebpf: &mut aya::Ebpf,
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
            humantime::format_duration(cache.ttl)
        );
    }
    Ok(())
}

/// Refreshes the status file each second with the kernel's counters and
/// the daemon's own.
async fn report_status(
    stats: Arc<PerCpuArray<MapData, u64>>,
    counters: Arc<Counters>,
    mut status: Status,
    dir: PathBuf,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Ok(s) = metrics::sum(&*stats) {
            status.set_counters(&s);
        }
        status.daemon_counters = counters.snapshot();
        status.updated = bans::now();
        if let Err(e) = status.write(&dir) {
            warn!("writing the status file: {e:#}");
        }
    }
}
