//! Coordination with the MTA's greet pause, whatever the MTA: QUIT verdicts
//! weighed by the pause, and the pass cache for MTAs that keep none.

use std::{thread::sleep, time::Duration};

use spamdelay_tests::{
    lab::Lab,
    nft::element,
    privileged,
    scenario::{Scenario, VERDICT_WAIT},
    smtp::{self, Greeting},
    until,
};

#[test]
fn quits_are_weighed_by_the_greet_pause() {
    if !privileged("quits_are_weighed_by_the_greet_pause") {
        return;
    }
    let s = Scenario::new(
        Greeting::pause(3000),
        &["--greet-pause", "1s", "--ban-quitters"],
    );
    assert!(
        s.daemon
            .lines()
            .iter()
            .any(|l| l == "greet pause 1s (--greet-pause)")
    );
    let early = s.client(0, false, 25, |src, dst| {
        smtp::hang_up(src, dst, Duration::from_millis(300))
    });
    let line = s.verdict(early);
    assert!(
        line.starts_with("QUIT after 0.3") && line.contains("s of a 1s greet pause from "),
        "{line}"
    );
    let ban = s
        .daemon
        .wait_for(
            |l| l.starts_with(&format!("ban [{}]", early.ip())),
            VERDICT_WAIT,
        )
        .expect("a quitter that gave up during the pause is banned");
    assert!(ban.ends_with("s of a 1s greet pause"), "{ban}");
    let patient = s.client(1, false, 25, |src, dst| {
        smtp::hang_up(src, dst, Duration::from_millis(1300))
    });
    let line = s.verdict(patient);
    assert!(line.starts_with("QUIT after 1.3"), "{line}");
    sleep(Duration::from_millis(300));
    assert!(
        element(&s.lab.server, "early_talkers_v4", &patient.ip().to_string()).is_none(),
        "waited out the pause"
    );
    s.stop();
}

#[test]
fn pass_cache_lists_patient_clients_in_the_mtas_format() {
    if !privileged("pass_cache_lists_patient_clients_in_the_mtas_format") {
        return;
    }
    let dir = tempfile::tempdir().expect("a directory");
    let cache = dir.path().join("access.spamdelay");
    let reloaded = dir.path().join("reloaded");
    let reload = format!("touch {}", reloaded.display());
    let args = [
        "--pass-cache",
        cache.to_str().expect("utf-8"),
        "--pass-cache-format",
        "sendmail-access",
        "--pass-cache-reload",
        &reload,
        "--pass-ttl",
        "2s",
    ];
    let s = Scenario::new(Greeting::pause(200), &args);
    let patient = s.client(0, false, 25, smtp::patient);
    assert!(s.verdict(patient).starts_with("PASS"));
    let patient_v6 = s.client(0, true, 25, smtp::patient);
    assert!(s.verdict(patient_v6).starts_with("PASS"));
    let blind = s.client(1, false, 25, smtp::blind);
    assert!(s.verdict(blind).starts_with("EARLY-TALK"));
    let read = || std::fs::read_to_string(&cache).unwrap_or_default();
    let want_v4 = format!("GreetPause:{}\t0", Lab::client_v4(0));
    let want_v6 = format!("GreetPause:IPv6:{}\t0", Lab::client_v6(0));
    assert!(
        until(Duration::from_secs(3), || read().contains(&want_v4)
            && read().contains(&want_v6)),
        "{}",
        read()
    );
    assert!(
        !read().contains(&Lab::client_v4(1).to_string()),
        "an early talker never passes: {}",
        read()
    );
    assert!(reloaded.exists(), "the reload command ran");
    assert!(
        until(Duration::from_secs(4), || !read().contains(&want_v4)),
        "expired after --pass-ttl: {}",
        read()
    );
    s.stop();
}
