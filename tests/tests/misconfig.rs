//! Mistakes that would cost real mail are refused at start, in one line: a
//! port where the client speaks first, a second daemon on the same state
//! directory or interface. Programs a stopped daemon left pinned are no
//! second daemon; durations read the way the config writes them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use spamdelay_tests::{
    daemon::{Daemon, binary, pin_dir_for, pin_root},
    lab::{Lab, Netns, SERVER_IF},
    nft::{self, Element, elements},
    privileged,
    scenario::VERDICT_WAIT,
    smtp::{self, Greeting, TestServer},
};

const V4: &str = "early_talkers_v4";

/// Runs a command that must end by itself (a refused `run`): killed and
/// failed after 15 s, so a guard that lets a second daemon through fails the
/// test instead of hanging it.
fn briefly(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running spamdelay");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("waiting for spamdelay").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting its output");
            panic!(
                "spamdelay ran on instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting its output")
}

/// The `spamdelay: error:` line (or clap's `error:` line) of a failed run.
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "expected a refusal: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .find(|l| l.starts_with("spamdelay: error:") || l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
        .to_string()
}

/// `spamdelay --state-dir STATE run --iface sd-srv --mta none --pin-dir PIN
/// EXTRA` in `ns`, expected to stop by itself.
fn run_in(ns: &Netns, state: &Path, pin: &Path, extra: &[&str]) -> Output {
    let mut cmd = ns.command(binary());
    cmd.arg("--state-dir")
        .arg(state)
        .arg("run")
        .args(["--iface", SERVER_IF, "--mta", "none", "--pin-dir"])
        .arg(pin)
        .args(extra);
    briefly(cmd)
}

/// The ids of the programs attached to the server's interface by TCX:
/// (ingress, egress).
fn tcx_ids(lab: &Lab) -> (Vec<u32>, Vec<u32>) {
    lab.server
        .run(|| {
            let ids = |hook| {
                SchedClassifier::query_tcx(SERVER_IF, hook)
                    .map(|(_, progs)| progs.iter().map(|p| p.id()).collect::<Vec<_>>())
                    .expect("querying TCX")
            };
            (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
        })
        .expect("entering the server namespace")
}

/// Table `inet spamdelay` without set elements and counters (`-t -s`), and
/// the elements without their running `expires`.
fn table(lab: &Lab) -> (String, Vec<Element>) {
    let rules = nft::nft(
        &lab.server,
        &["-s", "-t", "list", "table", "inet", "spamdelay"],
    )
    .expect("nft list table");
    let elems = elements(&lab.server, V4)
        .into_iter()
        .map(|e| Element { expires: None, ..e })
        .collect();
    (rules, elems)
}

fn args() -> Vec<&'static str> {
    vec!["--iface", SERVER_IF, "--mta", "none"]
}

fn wait_ban(d: &Daemon, addr: &str) -> String {
    d.wait_for(|l| l.starts_with(&format!("ban [{addr}]")), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no ban of {addr}: {:#?}", d.lines()))
}

/// A pin directory of the test's own, absent.
fn pin_dir(test: &str) -> PathBuf {
    let dir = pin_root()
        .expect("the tests' BPF filesystem")
        .join(format!("{test}-{}", std::process::id()));
    let _ = spamdelay::loader::detach(&dir);
    dir
}

#[test]
fn ports_where_the_client_speaks_first_are_refused_in_one_line() {
    for (port, name, first) in [
        ("465", "submissions, implicit TLS", "TLS ClientHello"),
        ("993", "imaps, implicit TLS", "TLS ClientHello"),
        ("995", "pop3s, implicit TLS", "TLS ClientHello"),
        ("443", "https, implicit TLS", "TLS ClientHello"),
        ("636", "ldaps, implicit TLS", "TLS ClientHello"),
        ("80", "http", "its HTTP request"),
    ] {
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--iface", "lo", "--port", "25", "--port", port]);
        assert_eq!(
            error_line(&briefly(cmd)),
            format!(
                "error: invalid value '{port}' for '--port <PORT>': on {port} ({name}) the client speaks first ({first}), so every client would be flagged; watch 25 or 587 (STARTTLS) instead"
            )
        );
    }
    // 25, 587 and 2525 pass the port check (and fail on the interface).
    for port in ["25", "587", "2525"] {
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--iface", "nosuchif0", "--port", port]);
        assert!(
            error_line(&briefly(cmd)).contains("unknown interface 'nosuchif0'"),
            "{port}"
        );
    }
}

#[test]
fn port_465_is_refused_before_anything_is_attached() {
    if !privileged("port_465_is_refused_before_anything_is_attached") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let state = scratch.path().join("state");
    let pin = pin_dir("port465");
    let line = error_line(&run_in(&lab.server, &state, &pin, &["--port", "465"]));
    assert!(
        line.starts_with("error: invalid value '465' for '--port <PORT>': on 465 (submissions, implicit TLS) the client speaks first"),
        "{line}"
    );
    // The config file's ports go through the same check.
    let config = scratch.path().join("spamdelay.toml");
    std::fs::write(&config, "port = [25, 465]\n").expect("writing a config file");
    let line = error_line(&run_in(
        &lab.server,
        &state,
        &pin,
        &["--config", config.to_str().expect("a UTF-8 path")],
    ));
    assert!(
        line.starts_with("error: invalid value '465' for '--port <PORT>': on 465"),
        "{line}"
    );
    assert_eq!(tcx_ids(&lab), (vec![], vec![]), "nothing attached");
    assert!(!state.exists(), "no state directory written");
    assert!(!pin.exists(), "nothing pinned");
}

#[test]
fn a_second_daemon_is_refused_and_the_first_goes_on() {
    if !privileged("a_second_daemon_is_refused_and_the_first_goes_on") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let _server =
        TestServer::start(&lab.server, 25, Greeting::pause(1500)).expect("the test server");
    let first = Daemon::start(&lab.server, &args()).expect("starting the first daemon");
    let blind = lab.run_client(0, false, 25, smtp::blind);
    wait_ban(&first, &blind.ip().to_string());

    let state = first.state();
    let pid_file = state.path().join(spamdelay::guard::PID_FILE);
    let pid_text = std::fs::read_to_string(&pid_file).expect("the first daemon's pid file");
    assert_eq!(pid_text, format!("{}\n", first.pid()));
    let attached = tcx_ids(&lab);
    assert_eq!((attached.0.len(), attached.1.len()), (1, 1), "{attached:?}");
    let before = table(&lab);

    // The same state directory (and so the same pins).
    let out = run_in(&lab.server, state.path(), &pin_dir_for(state.path()), &[]);
    assert_eq!(
        error_line(&out),
        format!(
            "spamdelay: error: another spamdelay run (pid {}) uses the state directory {}: stop it first (systemctl stop spamdelay)",
            first.pid(),
            state.path().display()
        )
    );
    // Another state directory on the same interface, pinned or not.
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let other = scratch.path().join("state");
    let other_pins = pin_dir("second");
    for extra in [&[][..], &["--no-pin"], &["--dry-run"]] {
        let out = run_in(&lab.server, &other, &other_pins, extra);
        assert_eq!(
            error_line(&out),
            format!(
                "spamdelay: error: another spamdelay run (pid {}) watches {SERVER_IF}: stop it first (systemctl stop spamdelay)",
                first.pid()
            ),
            "{extra:?}"
        );
    }
    assert!(!other.exists(), "the refused daemon wrote no state");
    assert!(!other_pins.exists(), "the refused daemon pinned nothing");

    // The first daemon is untouched, and goes on.
    assert_eq!(tcx_ids(&lab), attached, "the same programs attached");
    assert_eq!(table(&lab), before, "the table and its bans untouched");
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("the pid file"),
        pid_text
    );
    let blind = lab.run_client(1, false, 25, smtp::blind);
    wait_ban(&first, &blind.ip().to_string());
    assert!(
        lab.refused(1, false),
        "the new offender's next connection is refused"
    );
    drop(state);
    let (status, lines) = first.stop().expect("stopping the first daemon");
    assert!(status.success(), "{lines:#?}");
}

#[test]
fn programs_a_stopped_daemon_left_pinned_are_adopted_not_refused() {
    if !privileged("programs_a_stopped_daemon_left_pinned_are_adopted_not_refused") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let _server =
        TestServer::start(&lab.server, 25, Greeting::pause(1500)).expect("the test server");
    let first = Daemon::start(&lab.server, &args()).expect("starting the first daemon");
    let state = first.state();
    let (status, lines) = first.stop().expect("SIGTERM");
    assert!(status.success(), "{lines:#?}");
    let left = tcx_ids(&lab);
    assert_eq!(
        (left.0.len(), left.1.len()),
        (1, 1),
        "still attached, pinned"
    );

    // The pid file names a daemon that is gone; the pins hold the programs.
    let mut second = Daemon::start_with_state(&lab.server, &args(), state.clone())
        .expect("a new daemon on the pinned leftovers");
    assert!(
        second
            .wait_for(
                |l| l.contains("adopted the programs pinned in"),
                VERDICT_WAIT
            )
            .is_some(),
        "{:#?}",
        second.lines()
    );
    let blind = lab.run_client(0, false, 25, smtp::blind);
    wait_ban(&second, &blind.ip().to_string());

    // A daemon killed outright leaves the same, and the lock goes with it.
    second.kill().expect("SIGKILL");
    drop(second);
    let third = Daemon::start_with_state(&lab.server, &args(), state.clone())
        .expect("a new daemon after a SIGKILL");
    let blind = lab.run_client(1, false, 25, smtp::blind);
    wait_ban(&third, &blind.ip().to_string());
    // The last holder of the state: its drop detaches the pins.
    drop(state);
    let (status, lines) = third.stop().expect("stopping");
    assert!(status.success(), "{lines:#?}");
}

#[test]
fn durations_read_as_the_config_writes_them() {
    if !privileged("durations_read_as_the_config_writes_them") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let d = Daemon::start(&lab.server, &args()).expect("starting spamdelay");
    let line = d
        .wait_for(|l| l.starts_with("banning early talkers"), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no ban settings line: {:#?}", d.lines()));
    assert!(
        line.starts_with(
            "banning early talkers in table inet spamdelay for 1h (doubling per repeat, up to 7d); bans kept in "
        ),
        "{line}"
    );
    let addr = Lab::client_v4(3).to_string();
    let (ok, out, err) = d
        .admin(&lab.server, &["ban", &addr, "--time", "36h"])
        .expect("spamdelay ban");
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!("banned [{addr}] for 1d 12h (offence 1)")
    );
    let (ok, out, err) = d.admin(&lab.server, &["list"]).expect("spamdelay list");
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with(&addr))
        .unwrap_or_else(|| panic!("{addr} not listed: {out}"));
    assert!(
        row.contains(" 1d 12h ") || row.contains(" 1d 11h 59m 5"),
        "{row}"
    );
    let (status, lines) = d.stop().expect("stopping");
    assert!(status.success(), "{lines:#?}");
}
