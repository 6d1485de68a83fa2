//! Never stop watching (`run --pin-dir`): programs, links and kernel state
//! pinned in a BPF filesystem outlive the daemon, even a SIGKILL; verdicts
//! made while it is away wait in the ring buffer and the next run, which
//! adopts the pins, applies them; `spamdelay detach` removes everything.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use spamdelay_tests::{
    daemon::{Daemon, binary, pin_root},
    lab::{CLIENT_IF, Lab, SERVER_IF},
    privileged,
    scenario::{Scenario, VERDICT_WAIT},
    smtp::{self, Greeting},
    until,
};

/// A pin directory of the test's own.
fn pin_dir(test: &str) -> PathBuf {
    let dir = pin_root()
        .expect("the tests' BPF filesystem")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The programs attached to the server's interface by TCX, per hook.
fn tcx_programs(lab: &Lab) -> (usize, usize) {
    lab.server
        .run(|| {
            let count = |hook| {
                SchedClassifier::query_tcx(SERVER_IF, hook)
                    .map(|(_, progs)| progs.len())
                    .expect("querying TCX")
            };
            (count(TcAttachType::Ingress), count(TcAttachType::Egress))
        })
        .expect("entering the server namespace")
}

fn detach(lab: &Lab, dir: &Path) -> String {
    let out = lab
        .server
        .command(binary())
        .arg("detach")
        .arg("--pin-dir")
        .arg(dir)
        .output()
        .expect("running spamdelay detach");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn args(dir: &Path) -> Vec<String> {
    [
        "--iface",
        SERVER_IF,
        "--mta",
        "none",
        "--pin-dir",
        dir.to_str().expect("a UTF-8 path"),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn verdicts_made_while_the_daemon_is_dead_are_applied_when_it_returns() {
    if !privileged("verdicts_made_while_the_daemon_is_dead_are_applied_when_it_returns") {
        return;
    }
    let dir = pin_dir("sigkill");
    let mut s = Scenario::new(Greeting::pause(1500), &["--pin-dir", dir.to_str().unwrap()]);
    // 20 client addresses of their own.
    let clients: Vec<IpAddr> = (0..20u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200 + i)))
        .collect();
    for ip in &clients {
        s.lab
            .client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", CLIENT_IF])
            .expect("adding a client address");
    }
    let state = s.daemon.state();
    s.daemon.kill().expect("SIGKILL");
    assert_eq!(tcx_programs(&s.lab), (1, 1), "still watching after SIGKILL");
    let dst = SocketAddr::new(Lab::server_addr(false), 25);
    for ip in clients.clone() {
        s.lab
            .client
            .run(move || smtp::blind(ip, dst))
            .expect("entering the client namespace")
            .expect("a blind client");
    }
    let a = args(&dir);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    s.daemon = Daemon::start_with_state(&s.lab.server, &a, state).expect("restarting");
    assert!(
        s.daemon
            .wait_for(
                |l| l.contains("adopted the programs pinned in"),
                VERDICT_WAIT
            )
            .is_some(),
        "{:#?}",
        s.daemon.lines()
    );
    for ip in &clients {
        let tag = format!("ban [{ip}]");
        assert!(
            s.daemon
                .wait_for(|l| l.starts_with(&tag), VERDICT_WAIT)
                .is_some(),
            "no ban of {ip}: {:#?}",
            s.daemon.lines()
        );
    }
    assert_eq!(
        tcx_programs(&s.lab),
        (1, 1),
        "one program per hook: replaced, not added"
    );
    // `status` tells an adopted attachment from a fresh one.
    assert!(
        until(Duration::from_secs(3), || {
            let (_, out, _) = s
                .daemon
                .admin(&s.lab.server, &["status"])
                .expect("spamdelay status");
            out.contains("(tcx, pinned, adopted)")
        }),
        "status does not show the adoption"
    );
    let Scenario { lab, daemon, .. } = s;
    let (status, lines) = daemon.stop().expect("stopping");
    assert!(status.success(), "{lines:#?}");
    assert_eq!(tcx_programs(&lab), (1, 1), "still watching after SIGTERM");
    let out = detach(&lab, &dir);
    assert!(out.starts_with("detached: removed link-"), "{out}");
    assert_eq!(tcx_programs(&lab), (0, 0), "no program left");
    assert_eq!(
        detach(&lab, &dir).trim(),
        format!("nothing pinned in {}", dir.display())
    );
    assert!(!dir.exists());
}

#[test]
fn a_changed_map_definition_starts_afresh_and_the_rest_is_adopted() {
    if !privileged("a_changed_map_definition_starts_afresh_and_the_rest_is_adopted") {
        return;
    }
    let dir = pin_dir("maxflows");
    let d = dir.to_str().expect("a UTF-8 path");
    let mut s = Scenario::new(Greeting::pause(1500), &["--pin-dir", d]);
    let state = s.daemon.state();
    s.daemon.kill().expect("SIGKILL");
    s.daemon = Daemon::start_with_state(
        &s.lab.server,
        &[
            "--iface",
            SERVER_IF,
            "--mta",
            "none",
            "--pin-dir",
            d,
            "--max-flows",
            "2048",
        ],
        state,
    )
    .expect("restarting with --max-flows 2048");
    let warned = s.daemon.wait_for(
        |l| l.contains("FLOWS no longer matches its definition"),
        VERDICT_WAIT,
    );
    assert!(warned.is_some(), "{:#?}", s.daemon.lines());
    assert!(
        s.daemon
            .wait_for(
                |l| l.contains("adopted the programs pinned in"),
                VERDICT_WAIT
            )
            .is_some()
    );
    // It still judges.
    let blind = s.client(0, false, 25, smtp::blind);
    assert!(s.verdict(blind).starts_with("EARLY-TALK"));
    assert_eq!(tcx_programs(&s.lab), (1, 1));
    // Detaching under a running daemon would leave it watching nothing.
    let (ok, _, err) = s
        .daemon
        .admin(&s.lab.server, &["detach", "--pin-dir", d])
        .expect("spamdelay detach");
    assert!(!ok && err.contains("stop it first"), "{err}");
    assert_eq!(tcx_programs(&s.lab), (1, 1));
    let Scenario { lab, daemon, .. } = s;
    daemon.stop().expect("stopping");
    detach(&lab, &dir);
    assert_eq!(tcx_programs(&lab), (0, 0));
}

#[test]
fn a_pin_dir_off_any_bpf_filesystem_is_refused_clearly() {
    if !privileged("a_pin_dir_off_any_bpf_filesystem_is_refused_clearly") {
        return;
    }
    let lab = Lab::new().expect("a lab");
    let state = tempfile::tempdir().expect("a state directory");
    let out = lab
        .server
        .command(binary())
        .arg("--state-dir")
        .arg(state.path())
        .args(["run", "--iface", SERVER_IF, "--mta", "none", "--pin-dir"])
        .arg(state.path().join("pins"))
        .output()
        .expect("running spamdelay");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not on a BPF filesystem"), "{err}");
}

#[test]
fn a_missing_bpf_filesystem_is_mounted_on_sys_fs_bpf() {
    if !privileged("a_missing_bpf_filesystem_is_mounted_on_sys_fs_bpf") {
        return;
    }
    // `ip netns exec` gives the daemon a fresh /sys without one, as on a
    // machine where nothing mounted it; the mount dies with the daemon's
    // mount namespace, and the pins with it.
    let s = Scenario::new(
        Greeting::pause(1500),
        &["--pin-dir", "/sys/fs/bpf/spamdelay"],
    );
    assert!(
        s.daemon
            .lines()
            .iter()
            .any(|l| l == "mounted the BPF filesystem on /sys/fs/bpf"),
        "{:#?}",
        s.daemon.lines()
    );
    let blind = s.client(0, false, 25, smtp::blind);
    assert!(s.verdict(blind).starts_with("EARLY-TALK"));
    s.stop();
}

#[test]
fn unban_lifts_a_pinned_bridge_while_the_daemon_is_down() {
    if !privileged("unban_lifts_a_pinned_bridge_while_the_daemon_is_down") {
        return;
    }
    let dir = pin_dir("unban");
    let d = dir.to_str().expect("a UTF-8 path");
    let mut s = Scenario::new(
        Greeting::pause(1500),
        &["--pin-dir", d, "--bridge-time", "1h"],
    );
    let blind = s.client(4, false, 25, smtp::blind);
    let ip = blind.ip().to_string();
    assert!(
        s.daemon
            .wait_for(|l| l.starts_with(&format!("ban [{ip}]")), VERDICT_WAIT)
            .is_some(),
        "{:#?}",
        s.daemon.lines()
    );
    s.daemon.kill().expect("SIGKILL");
    let src = blind.ip();
    let dst = SocketAddr::new(Lab::server_addr(false), 25);
    // With no daemon, the pinned bridge still drops its SYNs (nft would
    // answer with a reset).
    let before = s
        .lab
        .client
        .run(move || smtp::connect(src, dst))
        .expect("entering the client namespace")
        .expect_err("held back before unban");
    assert!(format!("{before:#}").contains("timed out"), "{before:#}");
    let (ok, out, err) = s
        .daemon
        .admin(&s.lab.server, &["unban", &ip])
        .expect("spamdelay unban");
    assert!(ok, "{out} {err}");
    // Neither nft nor the pinned bridge, still attached, holds it back.
    s.lab
        .client
        .run(move || smtp::connect(src, dst))
        .expect("entering the client namespace")
        .expect("welcome again after unban");
    detach(&s.lab, &dir);
}
