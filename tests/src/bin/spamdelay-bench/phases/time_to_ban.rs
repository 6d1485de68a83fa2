//! Measurement 4, time to ban: blind clients at a modest rate, then all at
//! once, from first payload to the element nf_tables announces (read in
//! process, `nlmon::Watcher`); nft's floor.

use std::{
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use spamdelay_tests::{
    bench::{percentile, sorted},
    daemon,
    flood::SilentServer,
    lab::{Lab, SERVER_V6},
    nft,
    nlmon::Watcher,
};

use crate::{
    check_interrupted,
    load::{
        ACCEPT_BACKLOG, Priority, Sent, ban_delays, burst_blind, delay_cell, delay_json,
        paced_blind, prepare_many_clients, rate_of, start_daemon_at, stop_daemon,
    },
    phases::Plan,
    plot::Cdf,
    report::{Outcome, Ratio, Row, Verdict},
};

/// One daemon's figures: clients at the modest rate and in the burst.
struct Measured {
    modest: Sent,
    modest_ms: Vec<f64>,
    modest_missing: usize,
    burst: Sent,
    burst_ms: Vec<f64>,
    burst_missing: usize,
    transactions: usize,
    lines: Vec<String>,
}

/// A fresh daemon at `priority`, clients `first..first + 2n` (distinct
/// addresses for each daemon).
fn measure(
    lab: &Lab,
    watcher: &Watcher,
    plan: &Plan,
    first: u32,
    priority: Priority,
) -> Result<Measured> {
    let daemon = start_daemon_at(lab, &["--mta", "none", "--set-size", "65536"], priority)?;
    let dst = SocketAddr::new(SERVER_V6.into(), 25);
    let n = plan.ttb_clients;
    let before = watcher.additions().transactions_adding_to("spamdelay");
    let already = watcher.additions().added().len();

    eprintln!(
        "bench: 4. {n} blind clients at {:.0}/s ({})",
        plan.ttb_rate,
        priority.label()
    );
    let modest = paced_blind(lab, first..first + n, plan.ttb_rate, dst)?;
    watcher.additions().wait_added(
        "spamdelay",
        already + modest.at.len(),
        Duration::from_secs(30),
        Duration::from_secs(5),
    );
    let (modest_ms, modest_missing) =
        ban_delays(&watcher.additions().added(), "spamdelay", &modest);

    check_interrupted()?;
    eprintln!("bench: 4. {n} blind clients at once ({})", priority.label());
    let burst = burst_blind(lab, first + n..first + 2 * n, dst, false)?;
    watcher.additions().wait_added(
        "spamdelay",
        already + modest.at.len() + burst.at.len(),
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    let (burst_ms, burst_missing) = ban_delays(&watcher.additions().added(), "spamdelay", &burst);
    let transactions = watcher.additions().transactions_adding_to("spamdelay") - before;
    let lines = stop_daemon(lab, daemon)?;
    Ok(Measured {
        modest,
        modest_ms,
        modest_missing,
        burst,
        burst_ms,
        burst_missing,
        transactions,
        lines,
    })
}

pub(crate) fn time_to_ban(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    prepare_many_clients(&lab)?;
    let _server = SilentServer::start(&lab.server, 25, ACCEPT_BACKLOG)?;
    let watcher = Watcher::start(&lab.server)?;
    let n = plan.ttb_clients;
    let unit = measure(&lab, &watcher, plan, 0, Priority::Unit)?;
    check_interrupted()?;
    let normal = measure(&lab, &watcher, plan, 2 * n, Priority::Normal)?;
    let watched = watcher.describe();
    let overruns = watcher.overruns();
    watcher.stop()?;
    let nft_ms = nft_run_ms(&lab)?;

    let mut out = Outcome::default();
    for (m, priority) in [(&unit, Priority::Unit), (&normal, Priority::Normal)] {
        let targets = priority == Priority::Unit;
        out.rows.push(Row {
            metric: format!(
                "time to ban, first payload → element announced by nf_tables (in-process watcher), {} clients at {:.0}/s, daemon at {}",
                m.modest.at.len(),
                plan.ttb_rate,
                priority.label()
            ),
            a: delay_cell(&m.modest_ms),
            b: "—".into(),
            ratio: Ratio::None,
            target: if targets {
                format!("p99 ≤ {MODEST_P99_MS} ms, none missed")
            } else {
                "—".into()
            },
            verdict: if targets {
                p99_verdict(&m.modest_ms, m.modest_missing, MODEST_P99_MS)
            } else {
                Verdict::Info
            },
        });
        out.rows.push(Row {
            metric: format!(
                "time to ban, {} clients at once ({} connections/s), daemon at {}",
                m.burst.at.len(),
                rate_of(&m.burst),
                priority.label()
            ),
            a: delay_cell(&m.burst_ms),
            b: "—".into(),
            ratio: Ratio::None,
            target: if targets {
                format!("p99 ≤ {BURST_P99_MS} ms, none missed")
            } else {
                "—".into()
            },
            verdict: if targets {
                p99_verdict(&m.burst_ms, m.burst_missing, BURST_P99_MS)
            } else {
                Verdict::Info
            },
        });
        for (what, missing, sent) in [
            ("at the modest rate", m.modest_missing, &m.modest),
            ("in the burst", m.burst_missing, &m.burst),
        ] {
            if missing > 0 || sent.errors > 0 {
                out.notes.push(format!(
                    "time to ban {what} ({}): {missing} clients never banned, {} could not connect ({})",
                    priority.label(),
                    sent.errors,
                    sent.first_error.as_deref().unwrap_or("-")
                ));
            }
        }
    }
    out.samples.time_to_ban.extend([
        Cdf {
            label: format!("spamdelay → nft, {n} clients at {:.0}/s", plan.ttb_rate),
            ms: unit.modest_ms.clone(),
        },
        Cdf {
            label: format!("spamdelay → nft, {n} clients at once"),
            ms: unit.burst_ms.clone(),
        },
    ]);
    out.notes.push(format!(
        "time to ban: stamps by the {watched}; each stamp is taken as the notification's datagram is received, after the transaction committed"
    ));
    out.notes.push(
        "time to ban: the packaged unit runs the daemon at SCHED_FIFO 1 (CPUSchedulingPolicy=fifo); the rows at normal priority show what the daemon pays for waiting for a core on this 2-core machine, where the clients, the server and the daemon share both".into(),
    );
    out.notes.push(format!(
        "time to ban: {} nft transactions for {} bans (unit priority); a lone verdict goes to nft at once, and the verdicts that arrive during one transaction make up the next batch (at most {}); the daemon writes its elements over netlink in process; for comparison, one `nft -j -f -` run adding one element to a small set takes {nft_ms:.1} ms here (median of {NFT_PROBE_RUNS}), what a ban would cost through an `nft` child",
        unit.transactions,
        unit.modest_ms.len() + unit.burst_ms.len(),
        spamdelay::enforcer::BATCH_MAX
    ));
    for (key, m) in [("unit", &unit), ("normal", &normal)] {
        out.detail.insert(
            key.into(),
            json!({
                "modest": {"clients": n, "rate": plan.ttb_rate, "delays": delay_json(&m.modest_ms, m.modest_missing), "connect_errors": m.modest.errors},
                "burst": {"clients": n, "delays": delay_json(&m.burst_ms, m.burst_missing), "connect_errors": m.burst.errors},
                "nft_transactions": m.transactions,
                "ban_batches_in_log": daemon::ban_batches(&m.lines),
            }),
        );
    }
    out.detail.insert(
        "watcher".into(),
        json!({"kind": "nlmon", "description": watched, "overruns": overruns}),
    );
    out.detail.insert("nft_run_ms".into(), json!(nft_ms));
    Ok(out)
}

/// Targets: p99 of the time to ban at a modest rate, and in a burst.
const MODEST_P99_MS: f64 = 1.0;
const BURST_P99_MS: f64 = 10.0;

/// Met when every client was banned and the p99 is within `max_ms`.
fn p99_verdict(ms: &[f64], missing: usize, max_ms: f64) -> Verdict {
    if ms.is_empty() {
        return Verdict::Failed;
    }
    Verdict::of(missing == 0 && percentile(&sorted(ms), 99.0) <= max_ms)
}

const NFT_PROBE_RUNS: usize = 10;

/// How long one `nft -j -f -` run takes here to add one element (with a
/// timeout and a comment, as spamdelay's bans have) to a small set in a
/// scratch table of the server namespace: what a ban costs through an `nft`
/// child (a process, its JSON, one netlink transaction), against the
/// daemon's own netlink batches. Milliseconds, median.
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
