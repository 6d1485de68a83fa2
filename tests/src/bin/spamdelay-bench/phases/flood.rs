//! Measurement 5, flood scale: many distinct IPv6 early talkers at once; the
//! ban pace as the set grows, verdicts lost, the daemon's memory and CPU;
//! then the daemon's own pace on a backlog the load generator cannot limit
//! (`backlog`).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use spamdelay_tests::{
    bench::proc_cost,
    daemon,
    flood::SilentServer,
    lab::{Lab, SERVER_V6},
    nft,
    nlmon::Watcher,
};

use crate::{
    check_interrupted,
    load::{
        ACCEPT_BACKLOG, burst_blind, prepare_many_clients, rate_of, start_daemon, stop_counter,
        stop_daemon,
    },
    phases::{Plan, backlog},
    report::{Outcome, Ratio, Row, Verdict},
};

pub(crate) fn flood_scale(plan: &Plan) -> Result<Outcome> {
    let n = plan.flood_clients;
    let lab = Lab::new().context("building the namespace lab")?;
    prepare_many_clients(&lab)?;
    let server = SilentServer::start_releasing(&lab.server, 25, ACCEPT_BACKLOG)?;
    // Room for every ban, with the headroom an admin would give.
    let set_size = (2 * n).next_power_of_two().max(65536).to_string();
    let daemon = start_daemon(&lab, &["--mta", "none", "--set-size", &set_size])?;
    let pid = daemon.pid();
    let watcher = Watcher::start(&lab.server)?;
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
        let seen = watcher
            .additions()
            .wait_added("spamdelay", target, step, step);
        if seen >= target
            || Instant::now() >= deadline
            || quiet_for(&watcher, Duration::from_secs(20))
        {
            break seen;
        }
        eprintln!(
            "bench: 5. {seen} bans so far after {:.0} s",
            t0.elapsed().as_secs_f64()
        );
    };
    // When the k-th ban reached nft, from the first payload: shows whether
    // the pace holds as the set grows.
    let first_payload = sent.at.iter().map(|(_, t)| *t).min().unwrap_or(t0);
    let banned_at: Vec<f64> = watcher
        .additions()
        .added()
        .iter()
        .filter(|a| a.table == "spamdelay")
        .map(|a| a.at.saturating_duration_since(first_payload).as_secs_f64())
        .collect();
    let milestones: Vec<(usize, f64)> = [1, 1_000, 10_000, 25_000, 50_000, 75_000, 100_000]
        .into_iter()
        .filter_map(|k| Some((k, *banned_at.get(k - 1)?)))
        .collect();
    let cost = proc_cost(pid)?;
    let transactions = watcher.additions().transactions_adding_to("spamdelay");
    let watched = watcher.describe();
    let overruns = watcher.overruns();
    watcher.stop()?;
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
    check_interrupted()?;
    eprintln!("bench: 5. the daemon's own pace: backlogs queued while it is stopped");
    let drained = backlog::drain(&lab, n..2 * n, &set_size)?;
    let accepted = server.stop()?;

    let count = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count();
    let early_talk = stop_counter(&lines, "early_talk");
    let ringbuf_full = stop_counter(&lines, "ringbuf_full");
    let shown = |c: Option<u64>| c.map_or("?".to_string(), |v| v.to_string());
    // Bans nft did not take: the daemon's own counters, and its log's word
    // for it.
    let refused = stop_counter(&lines, "set_full").unwrap_or(0)
        + stop_counter(&lines, "apply_errors").unwrap_or(0)
        + lines.iter().filter(|l| l.contains("nft refused")).count() as u64;
    let errors = count("error") + count("ERROR");
    let unbanned = sent.at.len().saturating_sub(in_nft);
    let elapsed = banned_at.last().copied();
    let rates = BanRates::of(&banned_at);
    let mut out = Outcome::default();
    let mut pace: Vec<String> = milestones
        .iter()
        .map(|(k, t)| format!("{k} in {t:.2} s"))
        .collect();
    if let Some(t) = elapsed
        && milestones.last().is_none_or(|(k, _)| *k != seen)
    {
        pace.push(format!("{seen} in {t:.2} s"));
    }
    if seen < target {
        pace.push(format!(
            "then no more within the {} s bound",
            plan.flood_wait.as_secs()
        ));
    }
    out.rows.push(Row {
        metric: format!(
            "flood: ban rate, {} distinct IPv6 early talkers ({} connections/s), bans ÷ first → last ban",
            sent.at.len(),
            rate_of(&sent)
        ),
        a: match rates {
            Some(r) => format!(
                "{:.0} bans/s ({:.0}/s from the first payload): {}",
                r.between_bans,
                r.from_first_payload,
                pace.join(" · ")
            ),
            None => "no bans".into(),
        },
        b: "—".into(),
        ratio: Ratio::None,
        target: format!("≥ {MIN_BANS_PER_S} bans/s"),
        verdict: match rates {
            Some(r) => Verdict::of(r.between_bans >= MIN_BANS_PER_S as f64),
            None => Verdict::Failed,
        },
    });
    out.samples.flood_bans_at = banned_at;
    let mut payloads_at: Vec<f64> = sent
        .at
        .iter()
        .map(|(_, t)| t.saturating_duration_since(first_payload).as_secs_f64())
        .collect();
    payloads_at.sort_by(f64::total_cmp);
    out.samples.flood_payloads_at = payloads_at;
    out.rows.push(Row {
        metric: "flood: verdicts lost (ring buffer full; nft refused: set_full + apply_errors)"
            .into(),
        a: format!(
            "ringbuf_full={}, nft refused {refused} (kernel early_talk={})",
            shown(ringbuf_full),
            shown(early_talk)
        ),
        b: "—".into(),
        ratio: Ratio::None,
        target: "0".into(),
        // A missing counter is no proof of nothing lost.
        verdict: match ringbuf_full {
            Some(full) => Verdict::of(full == 0 && refused == 0),
            None => Verdict::Failed,
        },
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
            "{transactions} seen by the watcher, {} ban batches in the log ({:.0} bans each)",
            daemon::ban_batches(&lines),
            in_nft as f64 / transactions.max(1) as f64
        ),
    ));
    drained.report(&mut out);
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
        "flood: sources are addresses of one AnyIP route in the client namespace (IPV6_FREEBIND sockets, each reset right after its payload); adding 100,000 addresses to an interface takes tens of minutes (quadratic). While the lab connects, its clients and server use every core: the end-to-end rate is the lab's connect rate as much as the daemon's (the backlog row is the daemon's alone)".into(),
    );
    out.notes
        .push(format!("flood: ban stamps by the {watched}"));
    out.detail.insert(
        "flood".into(),
        json!({
            "clients": n, "connected": sent.at.len(), "connect_errors": sent.errors,
            "connect_seconds": connected_in.as_secs_f64(),
            "ban_seconds": elapsed, "bans_seen_by_watcher": seen, "in_nft": in_nft,
            "bans_per_second_first_to_last_ban": rates.map(|r| r.between_bans),
            "bans_per_second_from_first_payload": rates.map(|r| r.from_first_payload),
            "milestones_seconds": milestones.iter().map(|(k, t)| json!({"bans": k, "seconds": t})).collect::<Vec<_>>(),
            "listed": listed, "early_talk": early_talk, "ringbuf_full": ringbuf_full,
            "flows_tracked": stop_counter(&lines, "flows_tracked"),
            "flow_insert_failed": stop_counter(&lines, "flow_insert_failed"),
            "lost_sync": stop_counter(&lines, "lost_sync"),
            "ban_lines": count("ban ["), "nft_refused": refused,
            "nft_transactions": transactions, "ban_batches": daemon::ban_batches(&lines),
            "peak_rss_kib": cost.peak_rss_kib, "cpu_seconds": cost.cpu_s,
            "nft_children_cpu_seconds": cost.children_cpu_s,
            "server_accepted": accepted, "set_size": set_size,
            "watcher": {"kind": "nlmon", "description": watched, "overruns": overruns},
        }),
    );
    out.detail.insert("backlog".into(), drained.json());
    Ok(out)
}

/// Target: bans per second from the first ban to the last.
pub(crate) const MIN_BANS_PER_S: u32 = 20_000;

/// Bans per second over a flood.
#[derive(Clone, Copy)]
struct BanRates {
    /// Bans divided by the time from the first ban to the last: the
    /// daemon's and nft's pace once the flood is on.
    between_bans: f64,
    /// Bans divided by the time from the first payload to the last ban:
    /// also counts the wait for the first ban.
    from_first_payload: f64,
}

impl BanRates {
    /// From when each ban landed (seconds from the first payload, in order);
    /// none for fewer than two bans.
    fn of(banned_at: &[f64]) -> Option<BanRates> {
        let (&first, &last) = (banned_at.first()?, banned_at.last()?);
        let n = banned_at.len() as f64;
        (last > first).then(|| BanRates {
            between_bans: n / (last - first),
            from_first_payload: n / last,
        })
    }
}

/// True when the watcher saw no element for `quiet`.
fn quiet_for(watcher: &Watcher, quiet: Duration) -> bool {
    watcher
        .additions()
        .last_added_at()
        .is_none_or(|at| at.elapsed() >= quiet)
}
