//! Measurement 7, the bridge block: blind clients that reconnect 100 µs after
//! their payload, long before any nft ban; how many of those SYNs the kernel
//! drops by itself, and how soon after the payload its block stood.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde_json::json;
use spamdelay::loader::{BRIDGE, client_addr};
use spamdelay_common::ClientAddr;
use spamdelay_tests::{
    bench::{percentile, sorted},
    daemon::{Daemon, pin_dir_for},
    flood::SilentServer,
    lab::{Lab, SERVER_V6},
    nft::Monitor,
};

use crate::{
    load::{
        ACCEPT_BACKLOG, Reconnect, Reconnected, ban_delays, delay_cell, delay_json,
        paced_blind_reconnect, prepare_many_clients, start_daemon, stop_counter, stop_daemon,
    },
    phases::Plan,
    plot::Cdf,
    report::{Outcome, Ratio, Row, Verdict},
};

/// The daemon's default, given explicitly: the lab's daemons start with
/// the bridge off.
const BRIDGE_TIME: Duration = Duration::from_secs(10);
/// From the payload's write to the second connect.
const RECONNECT_AFTER: Duration = Duration::from_micros(100);
/// A SYN-ACK over the veth takes microseconds; the SYN's first
/// retransmission leaves after 1 s.
const SYN_WAIT: Duration = Duration::from_millis(250);
/// Target: reconnects refused, in percent of the clients.
const MIN_REFUSED_PERCENT: f64 = 99.0;

pub(crate) fn bridge_block(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    prepare_many_clients(&lab)?;
    let _server = SilentServer::start(&lab.server, 25, ACCEPT_BACKLOG)?;
    let bridge_time = format!("{}s", BRIDGE_TIME.as_secs());
    let daemon = start_daemon(
        &lab,
        &[
            "--mta",
            "none",
            "--set-size",
            "65536",
            "--action",
            "reject",
            "--bridge-time",
            &bridge_time,
        ],
    )?;
    if daemon
        .wait_for(|l| l.starts_with("bridge block:"), Duration::from_secs(5))
        .is_none()
    {
        bail!(
            "the daemon did not say the bridge block is on: {:?}",
            daemon.lines()
        );
    }
    let monitor = Monitor::start(&lab.server)?;
    let dst = SocketAddr::new(SERVER_V6.into(), 25);
    let n = plan.bridge_clients;

    eprintln!(
        "bench: 7. {n} blind clients at {:.0}/s, each reconnecting {} µs after its payload",
        plan.bridge_rate,
        RECONNECT_AFTER.as_micros()
    );
    let (sent, reconnects) =
        paced_blind_reconnect(&lab, 0..n, plan.bridge_rate, dst, RECONNECT_AFTER, SYN_WAIT)?;
    // While the daemon runs: its pins go with it.
    let stamps = bridge_stamps(&daemon, &reconnects);
    monitor.additions().wait_added(
        "spamdelay",
        sent.at.len(),
        Duration::from_secs(30),
        Duration::from_secs(5),
    );
    let added = monitor.additions().added();
    drop(monitor);
    let lines = stop_daemon(&lab, daemon)?;
    let (nft_ms, nft_missing) = ban_delays(&added, "spamdelay", &sent);
    let mut nft_at: HashMap<Ipv6Addr, Instant> = HashMap::new();
    for a in added.iter().filter(|a| a.table == "spamdelay") {
        if let Ok(addr) = a.element.parse() {
            nft_at.entry(addr).or_insert(a.at);
        }
    }

    let count = |o: &Reconnect| reconnects.iter().filter(|r| r.outcome == *o).count();
    let refused = count(&Reconnect::NoAnswer);
    let connected = count(&Reconnect::Connected);
    let reset = count(&Reconnect::Reset);
    let failed: Vec<&str> = reconnects
        .iter()
        .filter_map(|r| match &r.outcome {
            Reconnect::Failed(e) => Some(e.as_str()),
            _ => None,
        })
        .collect();
    // Seen by `nft monitor` before the reconnect left: the ban certainly
    // stood then (the monitor's line comes after the commit).
    let nft_first = reconnects
        .iter()
        .filter(|r| nft_at.get(&r.addr).is_some_and(|t| *t < r.reconnect_at))
        .count();
    let blocked = stop_counter(&lines, "bridge_blocked");
    // How late the reconnects really left: the client thread may still lose
    // its core between payload and reconnect (two cores, a busy host).
    let gaps_us = sorted(
        &reconnects
            .iter()
            .map(|r| (r.reconnect_at - r.payload_at).as_secs_f64() * 1e6)
            .collect::<Vec<_>>(),
    );
    let gap_p50 = percentile(&gaps_us, 50.0);
    let gap_p99 = percentile(&gaps_us, 99.0);
    let (bridge_ms, unstamped) = match &stamps {
        Ok(stamps) => block_delays(&reconnects, stamps),
        Err(_) => (Vec::new(), reconnects.len()),
    };

    let mut out = Outcome::default();
    let percent = 100.0 * refused as f64 / f64::from(n);
    out.rows.push(Row {
        metric: format!(
            "bridge block: blind clients reconnecting {} µs after their payload ({} at {:.0}/s, server never greets, --bridge-time {bridge_time}): reconnects refused (no SYN-ACK within {} ms)",
            RECONNECT_AFTER.as_micros(),
            n,
            plan.bridge_rate,
            SYN_WAIT.as_millis()
        ),
        a: format!(
            "{refused} of {n} ({percent:.1} %), kernel bridge_blocked={}; {connected} connected, {reset} reset by nft; reconnect after the payload: p50 {gap_p50:.0} µs, p99 {gap_p99:.0} µs; nft ban already in place at the reconnect: {nft_first}",
            blocked.map_or("?".into(), |b| b.to_string())
        ),
        b: "—".into(),
        ratio: Ratio::None,
        target: format!("≥ {MIN_REFUSED_PERCENT:.0} % of {n}"),
        verdict: if reconnects.is_empty() {
            Verdict::Failed
        } else {
            Verdict::of(percent >= MIN_REFUSED_PERCENT)
        },
    });
    let bridge_med = percentile(&sorted(&bridge_ms), 50.0);
    let nft_med = percentile(&sorted(&nft_ms), 50.0);
    out.rows.push(Row {
        metric: "bridge block: first payload → blocked, the kernel's bridge (A, its BRIDGE map stamp) vs the nft ban (B, `nft monitor`), same clients".into(),
        a: delay_cell(&bridge_ms),
        b: delay_cell(&nft_ms),
        ratio: if bridge_ms.is_empty() || nft_ms.is_empty() {
            Ratio::None
        } else {
            Ratio::Single(bridge_med / nft_med)
        },
        target: "—".into(),
        verdict: if bridge_ms.is_empty() {
            Verdict::Failed
        } else {
            Verdict::Info
        },
    });
    out.samples.time_to_ban.push(Cdf {
        label: format!(
            "spamdelay's kernel bridge, {n} clients at {:.0}/s",
            plan.bridge_rate
        ),
        ms: bridge_ms.clone(),
    });
    if let Err(e) = &stamps {
        out.notes
            .push(format!("bridge block: no kernel stamps: {e:#}"));
    }
    if blocked.is_some_and(|b| b != refused as u64) {
        out.notes.push(format!(
            "bridge block: the kernel counted {} dropped SYNs, the clients {refused} unanswered reconnects",
            blocked.unwrap_or(0)
        ));
    }
    if !failed.is_empty() || sent.errors > 0 || unstamped > 0 {
        out.notes.push(format!(
            "bridge block: {} reconnects failed otherwise (first: {}), {} clients could not connect ({}), {unstamped} without a BRIDGE entry",
            failed.len(),
            failed.first().unwrap_or(&"-"),
            sent.errors,
            sent.first_error.as_deref().unwrap_or("-")
        ));
    }
    out.notes.push(format!(
        "bridge block: a reconnect is refused when its SYN got no answer within {} ms (nft's ban answers with a reset: `--action reject`); the block time is the kernel's own CLOCK_BOOTTIME stamp of the verdict (the BRIDGE entry's expiry less --bridge-time) less the payload's write, read on the same clock",
        SYN_WAIT.as_millis()
    ));
    out.detail.insert(
        "bridge".into(),
        json!({
            "clients": n, "rate": plan.bridge_rate,
            "reconnect_after_us": RECONNECT_AFTER.as_micros(),
            "syn_wait_ms": SYN_WAIT.as_millis(),
            "bridge_time_s": BRIDGE_TIME.as_secs(),
            "refused": refused, "connected": connected, "reset": reset,
            "failed": failed.len(), "connect_errors": sent.errors,
            "nft_ban_before_reconnect": nft_first,
            "reconnect_after_payload_us": {"p50": gap_p50, "p99": gap_p99, "max": gaps_us.last()},
            "kernel_bridge_blocked": blocked,
            "block_delays": delay_json(&bridge_ms, unstamped),
            "nft_delays": delay_json(&nft_ms, nft_missing),
        }),
    );
    Ok(out)
}

/// The running daemon's bridge entries for the clients: CLOCK_BOOTTIME ns
/// until which each one's SYNs are dropped. Read from the pinned map.
fn bridge_stamps(daemon: &Daemon, clients: &[Reconnected]) -> Result<HashMap<Ipv6Addr, u64>> {
    let pin = pin_dir_for(daemon.state().path()).join(BRIDGE);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let map: BpfHashMap<MapData, ClientAddr, u64> = BpfHashMap::try_from(Map::LruHashMap(data))
        .with_context(|| format!("{} as a hash map", pin.display()))?;
    Ok(clients
        .iter()
        .filter_map(|c| {
            let until = map.get(&client_addr(IpAddr::V6(c.addr)), 0).ok()?;
            Some((c.addr, until))
        })
        .collect())
}

/// Milliseconds from each client's payload to its bridge entry (the
/// verdict, stamped in the kernel), and how many clients have none.
fn block_delays(clients: &[Reconnected], stamps: &HashMap<Ipv6Addr, u64>) -> (Vec<f64>, usize) {
    let bridge_ns = u64::try_from(BRIDGE_TIME.as_nanos()).unwrap_or(u64::MAX);
    let mut ms = Vec::with_capacity(clients.len());
    let mut missing = 0;
    for c in clients {
        match stamps.get(&c.addr) {
            Some(until) => {
                let verdict = until.saturating_sub(bridge_ns);
                ms.push(verdict.saturating_sub(c.payload_boot_ns) as f64 / 1e6);
            }
            None => missing += 1,
        }
    }
    (ms, missing)
}
