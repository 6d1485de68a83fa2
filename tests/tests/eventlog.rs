//! End to end: `--event-log` writes every verdict, ban and unban as one
//! JSON line (an admin's unban appended from another process), and
//! logrotate's rename plus SIGHUP loses none of them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;
use spamdelay_tests::{
    lab::Lab,
    privileged,
    scenario::{Scenario, VERDICT_WAIT},
    smtp::{self, Greeting},
    until,
};

const WORDS: [&str; 5] = ["EARLY-TALK", "QUIT", "PASS", "PIPECONNECT", "PROBE"];

/// Every line of the file, each of which must be a JSON object.
fn events(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a partial line: {text}"
    );
    parse(&text)
}

/// The whole lines of the file so far: a read may catch a write halfway.
fn events_so_far(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
    parse(whole)
}

fn parse(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.is_object(), "not an object: {l}");
            assert!(!l.contains("null"), "no nulls: {l}");
            v
        })
        .collect()
}

/// The verdict lines in the daemon's log: (word, client).
fn logged_verdicts(lines: &[String]) -> Vec<(String, SocketAddr)> {
    lines
        .iter()
        .filter_map(|l| {
            let word = WORDS.iter().find(|w| l.starts_with(&format!("{w} ")))?;
            let from = l.split(" from [").nth(1)?;
            let (ip, rest) = from.split_once("]:")?;
            let port = rest.split(' ').next()?;
            Some((
                word.to_string(),
                SocketAddr::new(ip.parse().ok()?, port.parse().ok()?),
            ))
        })
        .collect()
}

/// The bans in the daemon's log (`ban [ADDR] for ...`), as the event log
/// names them (`ADDR/32`, `ADDR/128`).
fn logged_bans(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            let addr = l.strip_prefix("ban [")?.split(']').next()?;
            let len = if addr.contains(':') { 128 } else { 32 };
            Some(format!("{addr}/{len}"))
        })
        .collect()
}

fn is_verdict_of(e: &Value, word: &str, client: SocketAddr) -> bool {
    e["event"] == "verdict"
        && e["verdict"] == word
        && e["client"] == client.ip().to_string()
        && e["client_port"] == client.port()
}

fn is_event(e: &Value, kind: &str, cidr: &str) -> bool {
    e["event"] == kind && e["cidr"] == cidr
}

fn host(ip: std::net::IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

/// Checks the fields every event of its kind must have.
fn check_fields(e: &Value) {
    let time = e["time"].as_str().unwrap_or_else(|| panic!("no time: {e}"));
    assert!(
        time.len() == "2026-12-01T05:00:00.000000Z".len() && time.ends_with('Z'),
        "RFC 3339 UTC: {e}"
    );
    match e["event"].as_str() {
        Some("verdict") => {
            for f in ["client", "server", "verdict", "action"] {
                assert!(e[f].is_string(), "{f}: {e}");
            }
            for f in ["client_port", "server_port"] {
                assert!(e[f].is_u64(), "{f}: {e}");
            }
            assert!(e["waited"].is_f64(), "waited: {e}");
            assert_eq!(e["server_port"], 25, "{e}");
            let payload = e["verdict"] == "EARLY-TALK";
            assert_eq!(e["bytes"].is_u64(), payload, "bytes: {e}");
            assert_eq!(e["payload"].is_string(), payload, "payload: {e}");
        }
        Some("ban") => {
            for f in ["cidr", "expires", "reason", "by"] {
                assert!(e[f].is_string(), "{f}: {e}");
            }
            for f in ["ban_time", "offence"] {
                assert!(e[f].is_u64(), "{f}: {e}");
            }
        }
        Some("unban") => {
            assert!(e["cidr"].is_string() && e["by"] == "admin", "{e}");
        }
        _ => panic!("unknown event: {e}"),
    }
}

/// Waits until the event log at `path` holds an event matching `pred`.
fn wait_event(path: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    until(VERDICT_WAIT, || {
        found = events_so_far(path).into_iter().find(|e| pred(e));
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {what} in {}: {:#?}",
            path.display(),
            events_so_far(path)
        )
    })
}

fn unban(s: &Scenario, addr: &str) {
    let (ok, out, err) = s
        .daemon
        .admin(&s.lab.server, &["unban", addr])
        .expect("spamdelay unban");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("unbanned [{addr}]"));
}

fn sighup(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).expect("SIGHUP");
}

#[test]
fn event_log_has_every_verdict_ban_and_unban_and_survives_rotation() {
    if !privileged("event_log_has_every_verdict_ban_and_unban_and_survives_rotation") {
        return;
    }
    let dir = tempfile::tempdir().expect("a directory for the event log");
    let path: PathBuf = dir.path().join("events.json");
    let arg = path.to_str().expect("utf-8 path");
    let s = Scenario::new(
        Greeting::pause(1500),
        &["--event-log", arg, "--greet-pause", "1500ms"],
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&path)
            .expect("the event log exists from the start")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o640, "{mode:o}");

    let patient_v4 = s.client(0, false, 25, smtp::patient);
    let patient_v6 = s.client(1, true, 25, smtp::patient);
    let blind_v4 = s.client(2, false, 25, smtp::blind);
    let blind_v6 = s.client(3, true, 25, smtp::blind);
    let quitter = s.client(4, false, 25, |src, dst| {
        smtp::hang_up(src, dst, Duration::from_millis(200))
    });
    for c in [patient_v4, patient_v6, blind_v4, blind_v6, quitter] {
        s.verdict(c);
    }
    for c in [blind_v4, blind_v6] {
        s.daemon
            .wait_for(
                |l| l.starts_with(&format!("ban [{}]", c.ip())),
                VERDICT_WAIT,
            )
            .unwrap_or_else(|| panic!("no ban of {c}: {:#?}", s.daemon.lines()));
    }
    let talk = wait_event(&path, "EARLY-TALK", |e| {
        is_verdict_of(e, "EARLY-TALK", blind_v4)
    });
    assert_eq!(talk["action"], "ban", "{talk}");
    assert_eq!(talk["cidr"], host(blind_v4.ip()), "{talk}");
    assert_eq!(talk["server"], "192.0.2.25", "{talk}");
    assert_eq!(talk["bytes"], 50, "{talk}");
    assert_eq!(
        talk["payload"],
        "EHLO blind.example\\r\\nMAIL FROM:<spam@example.com>\\r\\n"
    );
    assert_eq!(talk["greet_pause"], 1.5, "{talk}");
    let pass = wait_event(&path, "PASS", |e| is_verdict_of(e, "PASS", patient_v6));
    assert_eq!(pass["action"], "none", "{pass}");
    assert_eq!(pass["server"], "2001:db8::25", "{pass}");
    assert!(pass["waited"].as_f64().is_some_and(|w| w >= 1.4), "{pass}");
    let quit = wait_event(&path, "QUIT", |e| is_verdict_of(e, "QUIT", quitter));
    assert_eq!(quit["action"], "none", "{quit}");
    let ban = wait_event(&path, "ban", |e| is_event(e, "ban", &host(blind_v6.ip())));
    // The time left when the event was written: a second may have gone.
    assert!(
        ban["ban_time"]
            .as_u64()
            .is_some_and(|t| (3599..=3600).contains(&t)),
        "{ban}"
    );
    assert_eq!(ban["offence"], 1, "{ban}");
    assert_eq!(ban["by"], "daemon", "{ban}");
    assert!(
        ban["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("early-talk 50B after ")),
        "{ban}"
    );

    // `spamdelay unban` runs in another process: it finds the file in the
    // daemon's status file.
    unban(&s, &blind_v4.ip().to_string());
    wait_event(&path, "unban", |e| {
        is_event(e, "unban", &host(blind_v4.ip()))
    });

    // logrotate: rename, then SIGHUP. What comes in between still goes to
    // the renamed file, which the daemon holds open.
    let rotated = dir.path().join("events.json.1");
    std::fs::rename(&path, &rotated).expect("renaming the event log");
    let between = s.client(5, false, 25, smtp::patient);
    s.verdict(between);
    wait_event(&rotated, "PASS after the rename", |e| {
        is_verdict_of(e, "PASS", between)
    });
    let pid = s.daemon.pid();
    sighup(pid);
    s.daemon
        .wait_for(
            |l| l.starts_with("reloaded") || l.contains("reload refused"),
            VERDICT_WAIT,
        )
        .unwrap_or_else(|| panic!("no reload: {:#?}", s.daemon.lines()));
    assert!(
        until(Duration::from_secs(2), || path.exists()),
        "SIGHUP made {} anew",
        path.display()
    );
    let after_v4 = s.client(6, false, 25, smtp::blind);
    let after_pass = s.client(7, true, 25, smtp::patient);
    s.verdict(after_v4);
    s.verdict(after_pass);
    wait_event(&path, "a ban after SIGHUP", |e| {
        is_event(e, "ban", &host(after_v4.ip()))
    });
    wait_event(&path, "PASS after SIGHUP", |e| {
        is_verdict_of(e, "PASS", after_pass)
    });
    unban(&s, &after_v4.ip().to_string());
    wait_event(&path, "unban after SIGHUP", |e| {
        is_event(e, "unban", &host(after_v4.ip()))
    });

    // The same process, still running and reporting.
    let (ok, status, err) = s
        .daemon
        .admin(&s.lab.server, &["status", "--json"])
        .expect("spamdelay status");
    assert!(ok, "{err}");
    let st: Value = serde_json::from_str(&status).expect("status --json");
    assert_eq!(st["daemon_running"], true, "{st}");
    assert_eq!(st["daemon"]["pid"], pid, "the daemon's pid is unchanged");
    assert_eq!(st["daemon"]["event_log"], arg, "{st}");
    let lines = s.stop();

    let old = events(&rotated);
    let new = events(&path);
    for e in old.iter().chain(&new) {
        check_fields(e);
    }
    let verdicts = logged_verdicts(&lines);
    assert_eq!(verdicts.len(), 8, "{lines:#?}");
    for (word, client) in &verdicts {
        let n_old = old
            .iter()
            .filter(|e| is_verdict_of(e, word, *client))
            .count();
        let n_new = new
            .iter()
            .filter(|e| is_verdict_of(e, word, *client))
            .count();
        assert_eq!(
            n_old + n_new,
            1,
            "{word} from {client}: {n_old} in the renamed file, {n_new} in the new one"
        );
        let after = [after_v4, after_pass].contains(client);
        assert_eq!(n_new == 1, after, "{word} from {client} in the right file");
    }
    let n_verdicts = |events: &[Value]| events.iter().filter(|e| e["event"] == "verdict").count();
    assert_eq!(
        n_verdicts(&old) + n_verdicts(&new),
        verdicts.len(),
        "no extra verdicts"
    );
    let bans = logged_bans(&lines);
    assert_eq!(bans.len(), 3, "{lines:#?}");
    for cidr in &bans {
        let n = old
            .iter()
            .chain(&new)
            .filter(|e| is_event(e, "ban", cidr))
            .count();
        assert_eq!(n, 1, "ban of {cidr}");
    }
    let n_bans = |events: &[Value]| events.iter().filter(|e| e["event"] == "ban").count();
    assert_eq!(n_bans(&old) + n_bans(&new), bans.len(), "no extra bans");
    let unbans: Vec<&Value> = old
        .iter()
        .chain(&new)
        .filter(|e| e["event"] == "unban")
        .collect();
    assert_eq!(unbans.len(), 2, "{unbans:#?}");
    // The lab's addresses, for the reader of a failure.
    eprintln!(
        "clients {} .. {}: {} events before the rotation, {} after",
        Lab::client_v4(0),
        Lab::client_v4(7),
        old.len(),
        new.len()
    );
}

#[test]
fn event_log_in_a_missing_directory_stops_the_start() {
    if !privileged("event_log_in_a_missing_directory_stops_the_start") {
        return;
    }
    let lab = Lab::new().expect("lab");
    let state = tempfile::tempdir().expect("state dir");
    let missing = state.path().join("no-such-dir/events.json");
    let out = lab
        .server
        .command(spamdelay_tests::daemon::binary())
        .arg("--state-dir")
        .arg(state.path())
        .args([
            "run",
            "--no-pin",
            "--mta",
            "none",
            "--iface",
            "lo",
            "--event-log",
        ])
        .arg(&missing)
        .output()
        .expect("spamdelay run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "spamdelay: error: the event log {}: directory {} does not exist: create it first",
            missing.display(),
            missing.parent().expect("a parent").display()
        )
    );
}
