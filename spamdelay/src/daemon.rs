//! `spamdelay run`: load, attach, fill the maps, then log every verdict until
//! SIGINT or SIGTERM, when the programs are detached and the daemon exits 0.

use anyhow::{Context, Result};
use log::{info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{allow, cli::RunArgs, events, loader, privilege};

pub async fn run(args: RunArgs) -> Result<()> {
    loader::check_ports(&args.ports)?;
    for iface in &args.ifaces {
        loader::check_interface(iface)?;
    }
    privilege::check_run()?;
    let allowlist = allow::effective(&args.allow).context("listing this host's addresses")?;

    let mut ebpf = loader::load(&args.ports, args.max_flows)?;
    loader::fill_allowlist(&mut ebpf, &allowlist)?;
    let ring = loader::take_events(&mut ebpf)?;
    let mut attached = Vec::new();
    for iface in &args.ifaces {
        let mode = loader::attach(&mut ebpf, iface)?;
        attached.push(format!("{iface} ({mode})"));
    }

    let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
    info!(
        "watching port {} on {}{}",
        ports.join(","),
        attached.join(", "),
        if args.dry_run {
            "; dry run: detect and log only"
        } else {
            ""
        }
    );
    let allowed: Vec<String> = allowlist.iter().map(ToString::to_string).collect();
    info!("allowlist: {}", allowed.join(" "));

    let (tx, mut rx) = mpsc::channel(4096);
    let reader = tokio::spawn(events::forward(ring, tx));
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            Some(report) = rx.recv() => info!("{report}"),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            else => {
                warn!("the verdict reader stopped");
                break;
            }
        }
    }
    reader.abort();
    // Reports already read are still worth logging.
    while let Ok(report) = rx.try_recv() {
        info!("{report}");
    }
    if let Ok(stats) = loader::read_stats(&ebpf) {
        let line: Vec<String> = stats
            .iter()
            .map(|(s, v)| format!("{}={v}", s.name()))
            .collect();
        info!("stopping: {}", line.join(" "));
    }
    // Dropping the object detaches every program.
    drop(ebpf);
    Ok(())
}
