//! The admin commands: `list`, `ban`, `unban`, `status`. They work on the
//! register and the nftables table directly, under the register's lock, so
//! they behave the same whether the daemon runs or not.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    allow::Cidr,
    banpath::{BanPath, Done, Term, Wanted, show},
    bans::{self, Store},
    loader::BridgeMap,
    metrics::Status,
    nft,
    policy::Policy,
};

#[derive(Serialize)]
struct Row<'a> {
    address: String,
    seconds_left: u64,
    offences: u32,
    reason: &'a str,
}

/// Seconds as an admin writes them (`1d`, `1h 30m`).
fn human(secs: u64) -> String {
    crate::duration::show(Duration::from_secs(secs))
}

pub fn list(store: &Store, json: bool) -> Result<()> {
    let (locked, _) = store.lock()?;
    let now = bans::now();
    let rows: Vec<Row> = locked
        .register
        .active(now)
        .map(|(cidr, ban)| Row {
            address: cidr.to_string(),
            seconds_left: ban.time_left(now).as_secs(),
            offences: ban.offences,
            reason: &ban.reason,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no bans in force");
        return Ok(());
    }
    println!(
        "{:<42} {:>14} {:>8}  REASON",
        "ADDRESS", "TIME LEFT", "OFFENCES"
    );
    for r in &rows {
        println!(
            "{:<42} {:>14} {:>8}  {}",
            r.address,
            human(r.seconds_left),
            r.offences,
            r.reason
        );
    }
    Ok(())
}

pub async fn ban(store: &Store, cidr: Cidr, time: Duration, reason: &str) -> Result<()> {
    crate::privilege::check_nft()?;
    let (mut locked, _) = store.lock()?;
    let now = bans::now();
    let mut path =
        BanPath::admin(&locked.register).with_observer(crate::fleet::admin_observer(store.dir()));
    path.ensure_table().await?;
    let wanted = Wanted {
        cidr,
        reason: format!("manual: {reason}"),
        term: Term::Fixed(time),
    };
    let policy = Policy::manual(&locked.register.settings);
    let done = path.ban(&mut locked, &policy, vec![wanted], now).await?;
    crate::eventlog::admin_banned(store.dir(), &done, now);
    match done.first() {
        Some(Done::Banned { cidr, ban }) => println!(
            "banned {} for {} (offence {})",
            show(cidr),
            human(time.as_secs()),
            ban.offences
        ),
        Some(Done::Aggregated {
            net, members, ban, ..
        }) => println!(
            "banned {} for {} instead: {members} addresses of it are banned (--ipv6-aggregate)",
            show(net),
            human(ban.expires.saturating_sub(now))
        ),
        Some(Done::Covered { by, .. }) => bail!(
            "{} is already banned as {} for longer: nothing to do",
            show(&cidr),
            show(by)
        ),
        Some(Done::Refused { .. }) | None => {
            bail!("nftables refused the ban of {} (see above)", show(&cidr))
        }
    }
    Ok(())
}

pub async fn unban(store: &Store, dir: &Path, cidr: Cidr) -> Result<()> {
    crate::privilege::check_nft()?;
    // The bridge lasts seconds: failing to lift it must not keep the ban.
    let unbridged = unbridge(dir, &cidr).unwrap_or_else(|e| {
        log::warn!("{e:#}");
        Vec::new()
    });
    let (mut locked, _) = store.lock()?;
    let now = bans::now();
    let mut path =
        BanPath::admin(&locked.register).with_observer(crate::fleet::admin_observer(dir));
    let lifted = path
        .unban(&mut locked, &cidr, now)
        .await
        .with_context(|| format!("unbanning {}", show(&cidr)))?;
    let mut names: Vec<String> = lifted.register.iter().map(show).collect();
    for c in &lifted.elements {
        if !lifted.register.contains(c) {
            names.push(show(c));
        }
    }
    if names.is_empty() {
        names = unbridged.iter().map(|ip| show(&Cidr::host(*ip))).collect();
    }
    crate::eventlog::admin_unbanned(dir, &lifted, &unbridged);
    match (&lifted.still_covered_by, names.is_empty()) {
        (Some(by), true) => bail!(
            "{} is not banned itself but inside the ban of {}: unban that",
            show(&cidr),
            show(by)
        ),
        (None, true) => bail!(
            "{} is not banned: `spamdelay list` shows the bans",
            show(&cidr)
        ),
        (Some(by), false) => println!(
            "unbanned {}; still banned as part of {}",
            names.join(", "),
            show(by)
        ),
        (None, false) => println!("unbanned {}", names.join(", ")),
    }
    Ok(())
}

/// Lifts the running daemon's bridge block (the kernel's own short drop of
/// a fresh early talker's SYNs) for every client inside `cidr`; the daemon
/// names its map in the status file. Returns what was lifted.
fn unbridge(dir: &Path, cidr: &Cidr) -> Result<Vec<std::net::IpAddr>> {
    let Some(status) = Status::read(dir)? else {
        return Ok(Vec::new());
    };
    // A daemon that pinned its state left the bridge working when it went.
    let which = match (&status.bridge_map_id, &status.pin_dir) {
        (Some(id), _) if status.alive() => BridgeMap::Id(*id),
        (_, Some(dir)) if dir.join(crate::loader::BRIDGE).exists() => BridgeMap::Pinned(dir),
        _ => return Ok(Vec::new()),
    };
    crate::loader::unbridge(which, cidr)
        .with_context(|| format!("lifting the bridge block of {}", show(cidr)))
}

/// `spamdelay detach`: what a daemon run with `--pin-dir` left attached.
pub fn detach(state_dir: &Path, dir: &Path) -> Result<()> {
    // The running daemon's links live in the pins alone: it would go on
    // without watching anything.
    if let Some(d) = Status::read(state_dir)?
        && d.alive()
        && d.pin_dir.as_deref() == Some(dir)
    {
        bail!(
            "the daemon (pid {}) is running on {}: stop it first",
            d.pid,
            dir.display()
        );
    }
    let removed = crate::loader::detach(dir)?;
    if removed.is_empty() {
        println!("nothing pinned in {}", dir.display());
    } else {
        println!(
            "detached: removed {} from {}",
            removed.join(" "),
            dir.display()
        );
    }
    Ok(())
}

/// `spamdelay status`'s CrowdSec line.
fn fleet_line(f: &crate::fleet::FleetStatus, now: u64) -> String {
    let mut roles = Vec::new();
    if f.publish {
        roles.push("publishing");
    }
    if f.subscribe {
        roles.push("subscribing");
    }
    let state = match (&f.last_error, f.reachable) {
        (Some(e), _) => format!("failing: {e}"),
        (None, true) => "reachable".to_string(),
        (None, false) => "not contacted yet".to_string(),
    };
    let pull = match f.last_pull {
        Some(t) => format!(", last pull {} ago", human(now.saturating_sub(t))),
        None if f.subscribe => ", no pull yet".to_string(),
        None => String::new(),
    };
    let counters = crate::metrics::pairs(f.counters.iter().map(|(k, v)| (k.as_str(), *v)));
    format!(
        "fleet: CrowdSec LAPI {} ({}), {state}{pull}, {} in the spool{}{}",
        f.lapi,
        roles.join(" and "),
        f.spool,
        if counters.is_empty() { "" } else { "; " },
        counters
    )
}

#[derive(Serialize)]
struct StatusReport {
    daemon: Option<Status>,
    daemon_running: bool,
    bans_v4: usize,
    bans_v6: usize,
    remembered: usize,
    table_present: bool,
    refused_packets: u64,
}

pub async fn status(store: &Store, dir: &Path, json: bool) -> Result<()> {
    let daemon = Status::read(dir)?;
    let running = daemon.as_ref().is_some_and(Status::alive);
    let (locked, _) = store.lock()?;
    let now = bans::now();
    let (v4, v6) =
        locked.register.active(now).fold(
            (0, 0),
            |(a, b), (c, _)| {
                if c.is_ipv4() { (a + 1, b) } else { (a, b + 1) }
            },
        );
    let remembered = locked
        .register
        .bans
        .values()
        .filter(|b| !b.active(now))
        .count();
    drop(locked);
    let table_present = nft::table_exists().await.unwrap_or(false);
    let refused = nft::refused_packets().await.unwrap_or(0);
    let report = StatusReport {
        daemon,
        daemon_running: running,
        bans_v4: v4,
        bans_v6: v6,
        remembered,
        table_present,
        refused_packets: refused,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match (&report.daemon, running) {
        (Some(d), true) => {
            let on: Vec<String> = d
                .attached
                .iter()
                .map(|a| format!("{} ({})", a.iface, a.mode))
                .collect();
            let ports: Vec<String> = d.ports.iter().map(u16::to_string).collect();
            println!(
                "daemon: running, pid {}, up {}, attached to {}, port {}{}",
                d.pid,
                human(now.saturating_sub(d.started)),
                on.join(", "),
                ports.join(","),
                if d.dry_run { ", dry run" } else { "" }
            );
        }
        (Some(d), false) => println!(
            "daemon: not running (last seen {} ago, pid {})",
            human(now.saturating_sub(d.updated)),
            d.pid
        ),
        (None, _) => println!("daemon: not running (no status in {})", dir.display()),
    }
    println!(
        "bans: {} IPv4, {} IPv6 in force; {} offenders remembered; table inet spamdelay {}; {} packets refused",
        v4,
        v6,
        remembered,
        if table_present { "present" } else { "absent" },
        refused
    );
    if let Some(d) = &report.daemon {
        let of = |m: &BTreeMap<String, u64>| {
            crate::metrics::pairs(m.iter().map(|(k, v)| (k.as_str(), *v)))
        };
        println!("kernel: {}", of(&d.counters));
        if !d.daemon_counters.is_empty() {
            println!("bans made: {}", of(&d.daemon_counters));
        }
        if let Some(f) = &d.fleet {
            println!("{}", fleet_line(f, now));
        }
    }
    Ok(())
}
