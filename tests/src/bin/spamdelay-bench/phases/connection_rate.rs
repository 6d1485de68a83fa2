//! Measurement 3, SMTP connection rate: patient sessions per second with and
//! without spamdelay, its CPU per session, and no patient client banned.

use std::{thread, time::Duration};

use anyhow::{Context, Result};
use serde_json::json;
use spamdelay_tests::{
    bench::{percentile, proc_cost, sorted},
    lab::Lab,
    nft,
};

use crate::{
    check_interrupted,
    load::{SMTP_PARALLEL, smtp_sink, smtp_source, start_daemon, stop_daemon, tune_for_sessions},
    phases::Plan,
    report::{Outcome, Ratio, Row, Verdict},
    rounds::{Rounds, Side, sides},
};

pub(crate) fn connection_rate(plan: &Plan) -> Result<Outcome> {
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
