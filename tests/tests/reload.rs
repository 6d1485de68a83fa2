//! SIGHUP reloads the config file without detaching: a client allowlisted by
//! an edit is no longer flagged, a new ban time applies to the next ban,
//! clients that connect during reloads still get their verdicts, and a
//! broken file changes nothing. The pid never changes.

use std::{path::Path, time::Duration};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use spamdelay_tests::{
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    nft, privileged,
    scenario::{QUIET_WAIT, VERDICT_WAIT},
    smtp::{self, Greeting, TestServer},
    until,
};

fn hup(d: &Daemon) {
    kill(Pid::from_raw(d.pid() as i32), Signal::SIGHUP).expect("SIGHUP");
}

/// Sends SIGHUP and waits for one more line starting with `word` (the
/// reload's outcome); returns it.
fn reload(d: &Daemon, word: &str) -> String {
    let count = || d.lines().iter().filter(|l| l.starts_with(word)).count();
    let before = count();
    hup(d);
    assert!(
        until(VERDICT_WAIT, || count() > before),
        "no new `{word}` line: {:#?}",
        d.lines()
    );
    d.lines()
        .into_iter()
        .filter(|l| l.starts_with(word))
        .nth(before)
        .unwrap_or_default()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("writing the config file");
}

#[test]
fn sighup_applies_the_edited_config_without_a_gap() {
    if !privileged("sighup_applies_the_edited_config_without_a_gap") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let _server = TestServer::start(&lab.server, 25, Greeting::pause(1500)).expect("test server");
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("spamdelay.toml");
    write(&config, "ban-time = \"1h\"\n");
    let cfg = config.to_str().expect("a UTF-8 path");
    let daemon = Daemon::start(
        &lab.server,
        &["--config", cfg, "--iface", SERVER_IF, "--mta", "none"],
    )
    .expect("starting spamdelay");
    let pid = daemon.pid();

    // Client 0 talks blind: flagged and banned for 1h.
    let blind = lab.run_client(0, false, 25, smtp::blind);
    let v = daemon.verdict_for(blind, VERDICT_WAIT).expect("a verdict");
    assert!(v.starts_with("EARLY-TALK"), "{v}");
    assert!(
        daemon
            .wait_for(
                |l| l.starts_with(&format!("ban [{}] for 1h", blind.ip())),
                VERDICT_WAIT
            )
            .is_some(),
        "{:#?}",
        daemon.lines()
    );
    // The admin allowlists the client and doubles the ban time: config
    // edit plus SIGHUP. Its ban is lifted with it.
    write(
        &config,
        &format!("ban-time = \"2h\"\nallow = [\"{}/32\"]\n", blind.ip()),
    );
    let line = reload(&daemon, "reloaded:");
    assert!(
        line.contains(&format!("allowlist +{}/32", blind.ip())),
        "{line}"
    );
    assert!(line.contains("ban-time 1h -> 2h"), "{line}");
    assert!(
        daemon
            .wait_for(
                |l| l == format!("unban [{}]: now allowlisted", blind.ip()),
                VERDICT_WAIT
            )
            .is_some(),
        "{:#?}",
        daemon.lines()
    );
    assert!(
        nft::element(&lab.server, "early_talkers_v4", &blind.ip().to_string()).is_none(),
        "the allowlisted client's ban is lifted in nftables"
    );
    let (ok, listed, _) = daemon
        .admin(&lab.server, &["list"])
        .expect("spamdelay list");
    assert!(ok && !listed.contains(&blind.ip().to_string()), "{listed}");

    // Its next early talk is not flagged; another client's is, for 2h.
    let again = lab.run_client(0, false, 25, smtp::blind);
    let got = daemon.verdict_for(again, QUIET_WAIT);
    assert!(got.is_none(), "an allowlisted client was judged: {got:?}");
    let other = lab.run_client(1, false, 25, smtp::blind);
    daemon.verdict_for(other, VERDICT_WAIT).expect("a verdict");
    assert!(
        daemon
            .wait_for(
                |l| l.starts_with(&format!("ban [{}] for 2h", other.ip())),
                VERDICT_WAIT
            )
            .is_some(),
        "the reloaded ban time: {:#?}",
        daemon.lines()
    );

    // Clients that connect while reloads happen still get their verdicts:
    // a patient one waits out the 1.5 s pause through ten reloads.
    let patient = std::thread::scope(|scope| {
        let client = scope.spawn(|| lab.run_client(2, false, 25, smtp::patient));
        for _ in 0..10 {
            hup(&daemon);
            std::thread::sleep(Duration::from_millis(100));
        }
        client.join().expect("the patient client")
    });
    let v = daemon
        .verdict_for(patient, VERDICT_WAIT)
        .expect("a verdict during reloads");
    assert!(v.starts_with("PASS"), "{v}");
    let blind = lab.run_client(3, false, 25, smtp::blind);
    // The last of the ten has been taken before the file changes again.
    std::thread::sleep(Duration::from_millis(300));
    reload(&daemon, "reloaded:");
    let v = daemon.verdict_for(blind, VERDICT_WAIT).expect("a verdict");
    assert!(v.starts_with("EARLY-TALK"), "{v}");

    // A broken file: refused with its error, the old settings stay.
    write(&config, "ban-time = \"2x\"\n");
    let refused = reload(&daemon, "error: reload refused");
    assert!(refused.contains("2x"), "{refused}");
    let late = lab.run_client(4, false, 25, smtp::blind);
    daemon.verdict_for(late, VERDICT_WAIT).expect("a verdict");
    assert!(
        daemon
            .wait_for(
                |l| l.starts_with(&format!("ban [{}] for 2h", late.ip())),
                VERDICT_WAIT
            )
            .is_some(),
        "the old settings after a broken file: {:#?}",
        daemon.lines()
    );
    // Unknown keys too, and a restart-only setting is named, not applied.
    write(&config, "ban-time = \"2h\"\nbantime = \"3h\"\n");
    let refused = reload(&daemon, "error: reload refused");
    assert!(refused.contains("unknown setting 'bantime'"), "{refused}");
    write(&config, "ban-time = \"2h\"\nset-size = 1024\n");
    let warned = reload(&daemon, "warning: reload: set-size changed");
    assert!(warned.contains("needs a restart"), "{warned}");

    assert_eq!(daemon.pid(), pid);
    let (status, lines) = daemon.stop().expect("stopping spamdelay");
    assert!(status.success(), "{lines:#?}");
}
