//! Measurement 1, kernel cost per packet: spamdelay's TCX programs against an
//! empty classifier, in ns per packet from the kernel's own BPF run-time stats.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use spamdelay_tests::{
    bench::{Attached, BpfStats, EmptyClassifier, tcx_programs, total},
    lab::{Lab, SERVER_IF},
};

use crate::{
    check_interrupted,
    load::{
        iperf3, iperf3_server, smtp_sink, smtp_source, start_daemon, stop_daemon, tune_for_sessions,
    },
    phases::{Plan, kernel_segments::kernel_segments},
    report::{Outcome, Ratio, Row, Verdict},
    rounds::{Rounds, Side, sides},
};

/// Targets, on the median of the per-round ratios: on bulk traffic (not
/// SMTP) the programs must leave after a few instructions; an SMTP session's
/// packets are followed, and may cost more.
const BULK_RATIO_MAX: f64 = 1.2;
const SMTP_RATIO_MAX: f64 = 2.5;

pub(crate) fn kernel_cost(plan: &Plan) -> Result<Outcome> {
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
        target: format!("≤ {BULK_RATIO_MAX}"),
        verdict: bulk_ratio.map_or(Verdict::Failed, |r| Verdict::of(r.median <= BULK_RATIO_MAX)),
    });
    let smtp_ratio = smtp[0].ratio();
    out.rows.push(Row {
        metric: format!(
            "kernel cost, SMTP sessions ({} per round, smtp-source → smtp-sink): spamdelay (A) vs empty (B)",
            plan.kernel_sessions
        ),
        a: ns(smtp[0].median_a()),
        b: ns(smtp[0].median_b()),
        ratio: smtp_ratio.map_or(Ratio::None, Ratio::Rounds),
        target: format!("≤ {SMTP_RATIO_MAX}"),
        verdict: smtp_ratio.map_or(Verdict::Failed, |r| Verdict::of(r.median <= SMTP_RATIO_MAX)),
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
    // A side that counted no runs at all: kernel.bpf_stats_enabled is one
    // switch for the whole host, and another process (a test suite running
    // beside this) may have turned it off meanwhile.
    let uncounted = [&bulk[0].a, &bulk[0].b, &smtp[0].a, &smtp[0].b]
        .into_iter()
        .flatten()
        .filter(|v| v.is_nan())
        .count();
    if uncounted > 0 {
        out.notes.push(format!(
            "kernel cost: {uncounted} side-rounds counted no program runs: another process on this host probably turned kernel.bpf_stats_enabled (one switch for the whole host) off meanwhile; run again on a quiet machine"
        ));
    }
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
    // Where a session's cost goes, segment by segment.
    let (note, detail) = kernel_segments(if plan.quick { 3000 } else { 10_000 })?;
    out.notes.push(note);
    out.detail.insert("segments".into(), detail);
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
