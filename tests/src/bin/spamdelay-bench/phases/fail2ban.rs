//! Measurement 6, side by side with fail2ban: the same blind clients against
//! real postscreen, banned by spamdelay and by fail2ban's postfix jail.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use spamdelay_tests::{
    bench::{percentile, sorted},
    fail2ban::{self, Fail2ban},
    lab::{Lab, SERVER_V6},
    mta::postfix::{self, Postfix},
    nft::Monitor,
};

use crate::{
    check_interrupted,
    load::{
        ban_delays, delay_cell, delay_json, paced_blind, prepare_many_clients, start_daemon,
        stop_daemon,
    },
    phases::Plan,
    plot::Cdf,
    report::{Outcome, Ratio, Row, Verdict},
};

pub(crate) fn versus_fail2ban(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    prepare_many_clients(&lab)?;
    // Postfix's default greet wait; postscreen logs PREGREET as soon as it
    // reads the early bytes, not at the end of the wait.
    let postfix = Postfix::start(&lab.server, Duration::from_secs(6))?;
    let config = postfix
        .config_dir()
        .to_str()
        .context("a UTF-8 config path")?
        .to_string();
    let daemon = start_daemon(&lab, &["--mta", "postfix", "--mta-config", &config])?;
    let f2b = Fail2ban::start_postfix_jail(&lab.server, &postfix.log_path())?;
    let monitor = Monitor::start(&lab.server)?;
    let dst = SocketAddr::new(SERVER_V6.into(), 25);

    // One unmeasured client first: fail2ban creates its IPv6 set on its
    // first IPv6 ban, a one-time cost that is not its ban latency.
    let warm = paced_blind(&lab, 0..1, 1.0, dst)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ban_delays(&monitor.additions().added(), fail2ban::TABLE, &warm).1 > 0
        || ban_delays(&monitor.additions().added(), "spamdelay", &warm).1 > 0
    {
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "the warm-up client was not banned by both tools within 30 s; fail2ban's log:\n{}",
                f2b.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }

    let n = plan.f2b_clients;
    eprintln!(
        "bench: 6. {n} blind clients at {:.0}/s against postscreen",
        plan.f2b_rate
    );
    let sent = paced_blind(&lab, 1..n + 1, plan.f2b_rate, dst)?;
    monitor.additions().wait_added(
        "spamdelay",
        sent.at.len() + 1,
        Duration::from_secs(10),
        Duration::from_secs(5),
    );
    monitor.additions().wait_added(
        fail2ban::TABLE,
        sent.at.len() + 1,
        Duration::from_secs(60),
        Duration::from_secs(15),
    );
    let added = monitor.additions().added();
    let (sd_ms, sd_missing) = ban_delays(&added, "spamdelay", &sent);
    let (f2b_ms, f2b_missing) = ban_delays(&added, fail2ban::TABLE, &sent);
    let clients: std::collections::HashSet<IpAddr> =
        sent.at.iter().map(|(a, _)| IpAddr::V6(*a)).collect();
    let pregreets = postfix::postscreen_verdicts(&postfix.log())
        .into_iter()
        .filter(|(kind, ip, _)| kind == "PREGREET" && clients.contains(ip))
        .count();
    drop(monitor);
    drop(f2b);
    let lines = stop_daemon(&lab, daemon)?;
    let early = lines.iter().filter(|l| l.starts_with("EARLY-TALK")).count();

    let mut out = Outcome::default();
    let sd_med = percentile(&sorted(&sd_ms), 50.0);
    let f2b_med = percentile(&sorted(&f2b_ms), 50.0);
    out.rows.push(Row {
        metric: format!(
            "time to ban vs fail2ban: {} blind clients at {:.0}/s against real postscreen: spamdelay (A) vs fail2ban 1.0 pyinotify + nftables (B)",
            sent.at.len(),
            plan.f2b_rate
        ),
        a: delay_cell(&sd_ms),
        b: delay_cell(&f2b_ms),
        ratio: if sd_ms.is_empty() || f2b_ms.is_empty() {
            Ratio::None
        } else {
            Ratio::Single(sd_med / f2b_med)
        },
        target: "—".into(),
        verdict: if sd_ms.is_empty() || f2b_ms.is_empty() {
            Verdict::Failed
        } else {
            Verdict::Info
        },
    });
    out.notes.push(format!(
        "vs fail2ban: postscreen logged PREGREET for {pregreets} of {} clients, spamdelay EARLY-TALK for {early} (the warm-up client included); not banned: spamdelay {sd_missing}, fail2ban {f2b_missing}; fail2ban's median is {:.0}x spamdelay's",
        sent.at.len(),
        f2b_med / sd_med
    ));
    out.detail.insert(
        "fail2ban".into(),
        json!({
            "clients": sent.at.len(), "rate": plan.f2b_rate,
            "spamdelay": delay_json(&sd_ms, sd_missing),
            "fail2ban": delay_json(&f2b_ms, f2b_missing),
            "postscreen_pregreet": pregreets, "spamdelay_early_talk": early,
            "connect_errors": sent.errors,
        }),
    );
    out.samples.time_to_ban.push(Cdf {
        label: format!(
            "fail2ban (postscreen log → nft), {} clients at {:.0}/s",
            sent.at.len(),
            plan.f2b_rate
        ),
        ms: f2b_ms,
    });
    drop(postfix);
    Ok(out)
}
