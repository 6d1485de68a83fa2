//! `run --metrics-listen` scraped by a real Prometheus in the lab: verdicts,
//! bans (the daemon's and an admin's) and the kernel's counters arrive, the
//! exposition passes `promtool check metrics`, and every query of the
//! shipped Grafana dashboard reads only metrics the daemon exports and runs.

use std::{net::SocketAddr, time::Duration};

use spamdelay_tests::{
    daemon::binary,
    lab::{Lab, SERVER_IF},
    privileged,
    prometheus::{
        Prometheus, as_sent, dashboard_exprs, dashboard_path, exported, families, get,
        metric_names, promtool_check,
    },
    scenario::Scenario,
    smtp::{self, Greeting},
    until,
};

/// The daemon's metrics address, in the lab's server namespace (a
/// namespace of its own: the port is free there).
const METRICS: &str = "127.0.0.1:9469";

fn metrics_addr() -> SocketAddr {
    METRICS.parse().expect("a socket address")
}

/// The value of the sample `series` (name and labels as exposed).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn scrape(s: &Scenario) -> String {
    let (status, body) = get(&s.lab.server, metrics_addr(), "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn prometheus_scrapes_verdicts_bans_and_every_dashboard_query() {
    if !privileged("prometheus_scrapes_verdicts_bans_and_every_dashboard_query") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &["--metrics-listen", METRICS]);
    let prom = Prometheus::start(&s.lab.server, metrics_addr()).expect("starting prometheus");

    for i in 0..3 {
        let blind = s.client(i, false, 25, smtp::blind);
        assert!(s.verdict(blind).starts_with("EARLY-TALK"));
    }
    let early = r#"spamdelay_verdicts_total{verdict="early_talk"}"#;
    let mut seen = None;
    let got = until(Duration::from_secs(20), || {
        seen = prom.value(&s.lab.server, early).ok().flatten();
        seen == Some(3.0)
    });
    assert!(
        got,
        "Prometheus's {early} is {seen:?}, not 3; prometheus: {:#?}",
        prom.lines()
    );

    let (ok, _, err) = s
        .daemon
        .admin(
            &s.lab.server,
            &["ban", "198.51.100.17", "--reason", "by hand"],
        )
        .expect("spamdelay ban");
    assert!(ok, "{err}");
    let text = scrape(&s);
    for (series, want) in [
        (r#"spamdelay_bans_total{cause="early_talk"}"#, 3.0),
        (r#"spamdelay_bans_total{cause="manual"}"#, 1.0),
        (r#"spamdelay_bans_active{cause="early_talk"}"#, 3.0),
        (r#"spamdelay_bans_active{cause="manual"}"#, 1.0),
        (r#"spamdelay_set_elements{set="early_talkers_v4"}"#, 4.0),
        ("spamdelay_kernel_early_talk_total", 3.0),
        ("spamdelay_ringbuf_lost_total", 0.0),
        ("spamdelay_up", 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series}:\n{text}");
    }
    let applies = sample(&text, "spamdelay_apply_duration_seconds_count").unwrap_or(0.0);
    assert!(applies >= 3.0, "each ban batch is timed: {applies}\n{text}");
    promtool_check(&text).expect("the exposition passes promtool");

    let dashboard: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dashboard_path()).expect("reading dist/grafana/spamdelay.json"),
    )
    .expect("the dashboard is JSON");
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 10, "a dashboard with its queries: {exprs:?}");
    let exposed = families(&text);
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in &names {
            assert!(
                exported(&exposed, name),
                "the dashboard reads {name}, which spamdelay does not export ({expr})"
            );
        }
        let answer = prom
            .query(&s.lab.server, &as_sent(expr))
            .expect("querying Prometheus");
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
    }
    prom.stop().expect("stopping prometheus");
    s.stop();
}

#[test]
fn metrics_are_served_on_metrics_only() {
    if !privileged("metrics_are_served_on_metrics_only") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &["--metrics-listen", METRICS]);
    let (status, _) = get(&s.lab.server, metrics_addr(), "/").expect("GET /");
    assert_eq!(status, 404);
    let text = scrape(&s);
    assert!(
        text.contains("# TYPE spamdelay_verdicts_total counter"),
        "{text}"
    );
    s.stop();
}

#[test]
fn a_taken_metrics_port_stops_the_start_with_one_line() {
    if !privileged("a_taken_metrics_port_stops_the_start_with_one_line") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    // Someone else listens there: the socket stays in the namespace while
    // the test holds it.
    let _taken = lab
        .server
        .run(|| std::net::TcpListener::bind(METRICS))
        .expect("entering the namespace")
        .expect("taking the port");
    let state = tempfile::tempdir().expect("a state directory");
    let out = lab
        .server
        .command(binary())
        .arg("--state-dir")
        .arg(state.path())
        .args(["run", "--iface", SERVER_IF, "--mta", "none", "--no-pin"])
        .args(["--metrics-listen", METRICS])
        .output()
        .expect("running spamdelay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "spamdelay: error: --metrics-listen {METRICS}: address in use: "
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("watching port"),
        "detection was never announced: {stderr}"
    );
}
