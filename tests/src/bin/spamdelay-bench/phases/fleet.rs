//! Measurement 8, fleet propagation: blind clients caught by spamdelay on
//! MX-A, published to a real CrowdSec LAPI; the time from each client's
//! first payload at MX-A to its element at MX-B, for spamdelay pulling every
//! second (A) and for CrowdSec's stock firewall bouncer at its default 10 s
//! (B), both on MX-B side by side, watched by one `nft monitor`.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::json;
use spamdelay_tests::{
    bench::{percentile, sorted},
    crowdsec::{FleetLab, LAPI_ADDR, LAPI_URL, Lapi, Secrets},
    flood::SilentServer,
    lab::{Netns, SERVER_V6},
};

use crate::{
    load::{
        ACCEPT_BACKLOG, ban_delays, delay_cell, delay_json, paced_blind, prepare_many_clients,
        start_daemon, stop_daemon,
    },
    phases::Plan,
    plot::Cdf,
    report::{Outcome, Ratio, Row, Verdict},
};

const BOUNCER: &str = "/usr/bin/crowdsec-firewall-bouncer";
/// The stock bouncer's IPv6 table (its default config).
const BOUNCER_TABLE: &str = "crowdsec6";
/// p99 target, payload at MX-A → element at MX-B, at a 1 s pull.
const TARGET_MS: f64 = 1500.0;

/// CrowdSec's nftables bouncer in `ns`, as Debian ships it but pulling
/// `LAPI_URL` with `key`, in the foreground, logging to `dir`.
struct StockBouncer {
    child: Child,
}

impl StockBouncer {
    fn start(ns: &Netns, dir: &Path, key: &str) -> Result<StockBouncer> {
        let config = dir.join("bouncer.yaml");
        std::fs::write(
            &config,
            format!(
                "mode: nftables\npid_dir: {d}\nupdate_frequency: 10s\ndaemonize: false\nlog_mode: file\nlog_dir: {d}\nlog_level: info\napi_url: {LAPI_URL}/\napi_key: {key}\ndisable_ipv6: false\ndeny_action: DROP\ndeny_log: false\nsupported_decisions_types:\n  - ban\nnftables:\n  ipv4:\n    enabled: true\n    set-only: false\n    table: crowdsec\n    chain: crowdsec-chain\n  ipv6:\n    enabled: true\n    set-only: false\n    table: {BOUNCER_TABLE}\n    chain: crowdsec6-chain\nprometheus:\n  enabled: false\n",
                d = dir.display()
            ),
        )
        .context("writing the bouncer's config")?;
        let child = ns
            .command(BOUNCER)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting crowdsec-firewall-bouncer")?;
        Ok(StockBouncer { child })
    }
}

impl Drop for StockBouncer {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

pub(crate) fn fleet_propagation(plan: &Plan) -> Result<Outcome> {
    let fleet = FleetLab::new().context("building the fleet lab")?;
    prepare_many_clients(&fleet.lab_a)?;
    let lapi = Lapi::start(&fleet.lapi, LAPI_ADDR)?;
    let secrets = Secrets::new()?;
    lapi.add_machine("mx-a", "bench-password-mx-a")?;
    let password = secrets.password_file("mx-a", "bench-password-mx-a")?;
    let key = lapi.add_bouncer("mx-b")?;
    let key_file = secrets.key_file("mx-b", &key)?;
    let stock_key = lapi.add_bouncer("stock-mx-b")?;

    let _server = SilentServer::start(&fleet.lab_a.server, 25, ACCEPT_BACKLOG)?;
    let (pw, kf) = (
        password.display().to_string(),
        key_file.display().to_string(),
    );
    let a = start_daemon(
        &fleet.lab_a,
        &[
            "--mta",
            "none",
            "--crowdsec-lapi",
            LAPI_URL,
            "--crowdsec-machine",
            "mx-a",
            "--crowdsec-password-file",
            &pw,
        ],
    )?;
    let b = start_daemon(
        &fleet.lab_b,
        &[
            "--mta",
            "none",
            "--crowdsec-lapi",
            LAPI_URL,
            "--crowdsec-bouncer-key-file",
            &kf,
            "--crowdsec-pull-every",
            "1s",
        ],
    )?;
    let monitor = spamdelay_tests::nft::Monitor::start(&fleet.lab_b.server)?;
    let stock = if Path::new(BOUNCER).exists() {
        Some(StockBouncer::start(
            &fleet.lab_b.server,
            secrets.dir(),
            &stock_key,
        )?)
    } else {
        None
    };
    // The bouncer's first pull (its start-up) before the clients.
    std::thread::sleep(Duration::from_secs(2));

    let n = plan.fleet_clients;
    eprintln!(
        "bench: 8. {n} blind clients at {:.0}/s against MX-A, bans watched at MX-B",
        plan.fleet_rate
    );
    let dst = SocketAddr::new(SERVER_V6.into(), 25);
    let sent = paced_blind(&fleet.lab_a, 0..n, plan.fleet_rate, dst)?;
    monitor.additions().wait_added(
        "spamdelay",
        sent.at.len(),
        Duration::from_secs(15),
        Duration::from_secs(5),
    );
    if stock.is_some() {
        monitor.additions().wait_added(
            BOUNCER_TABLE,
            sent.at.len(),
            Duration::from_secs(25),
            Duration::from_secs(12),
        );
    }
    let added = monitor.additions().added();
    let (sd_ms, sd_missing) = ban_delays(&added, "spamdelay", &sent);
    let (stock_ms, stock_missing) = ban_delays(&added, BOUNCER_TABLE, &sent);
    drop(stock);
    drop(monitor);
    let _ = stop_daemon(&fleet.lab_b, b)?;
    let _ = stop_daemon(&fleet.lab_a, a)?;
    // The stock bouncer's tables stay after SIGTERM (daemonize: false).
    for table in [["ip", "crowdsec"], ["ip6", "crowdsec6"]] {
        let _ = spamdelay_tests::nft::nft(
            &fleet.lab_b.server,
            &["delete", "table", table[0], table[1]],
        );
    }

    let p99 = percentile(&sorted(&sd_ms), 99.0);
    let met = !sd_ms.is_empty() && sd_missing == 0 && p99 <= TARGET_MS;
    let mut out = Outcome::default();
    out.rows.push(Row {
        metric: format!(
            "fleet propagation through CrowdSec LAPI, first payload at MX-A → element at MX-B, {} clients at {:.0}/s: spamdelay pulling every 1 s (A) vs crowdsec-firewall-bouncer at its default 10 s (B)",
            sent.at.len(),
            plan.fleet_rate
        ),
        a: delay_cell(&sd_ms),
        b: if stock_ms.is_empty() {
            "not run (no crowdsec-firewall-bouncer)".into()
        } else {
            delay_cell(&stock_ms)
        },
        ratio: if sd_ms.is_empty() || stock_ms.is_empty() {
            Ratio::None
        } else {
            Ratio::Single(
                percentile(&sorted(&sd_ms), 50.0) / percentile(&sorted(&stock_ms), 50.0),
            )
        },
        target: "A: p99 ≤ 1.5 s".into(),
        verdict: Verdict::of(met),
    });
    out.notes.push(format!(
        "fleet: not at MX-B when measured: spamdelay {sd_missing}, stock bouncer {stock_missing} of {}; each ban is one alert from MX-A's publisher (batched when several wait), MX-B pulls /v1/decisions/stream every second",
        sent.at.len()
    ));
    out.detail.insert(
        "fleet".into(),
        json!({
            "clients": sent.at.len(), "rate": plan.fleet_rate,
            "spamdelay": delay_json(&sd_ms, sd_missing),
            "stock_bouncer": delay_json(&stock_ms, stock_missing),
            "connect_errors": sent.errors,
        }),
    );
    out.samples.time_to_ban.push(Cdf {
        label: format!(
            "fleet: MX-A → LAPI → MX-B (spamdelay, 1 s pull), {} clients",
            sent.at.len()
        ),
        ms: sd_ms,
    });
    if !stock_ms.is_empty() {
        out.samples.time_to_ban.push(Cdf {
            label: "fleet: MX-A → LAPI → MX-B (crowdsec-firewall-bouncer, 10 s)".into(),
            ms: stock_ms,
        });
    }
    drop(lapi);
    Ok(out)
}
