//! spamdelay beside the rest of the host: it only watches, so the tc
//! programs after it (a later TCX link, a legacy `tc filter ... bpf`) keep
//! running; and it never goes on half-alive when one of its tasks dies.

use std::time::Duration;

use spamdelay_tests::{
    bench::{BpfStats, EmptyClassifier, Hook, tcx_programs},
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    privileged,
    scenario::Scenario,
    smtp::{self, Greeting},
};

#[test]
fn programs_after_spamdelay_keep_running() {
    if !privileged("programs_after_spamdelay_keep_running") {
        return;
    }
    // Run counts need the kernel's program statistics for a moment.
    let _stats = BpfStats::enable().expect("enabling kernel.bpf_stats_enabled");
    let s = Scenario::new(Greeting::pause(200), &[]);
    let ns = &s.lab.server;
    let tcx = EmptyClassifier::attach_as(ns, SERVER_IF, Hook::Tcx).expect("a second TCX program");
    let legacy =
        EmptyClassifier::attach_as(ns, SERVER_IF, Hook::Clsact).expect("a legacy tc filter");
    let order: Vec<String> = tcx_programs(ns, SERVER_IF)
        .expect("querying TCX")
        .into_iter()
        .filter(|p| p.hook == "ingress")
        .map(|p| p.name)
        .collect();
    assert_eq!(order, ["spamdelay_ingre", "spamdelay_empty"], "TCX order");
    let before = (tcx.runs().expect("runs"), legacy.runs().expect("runs"));
    // A whole SMTP session, and a blind sender that spamdelay judges.
    let patient = s.client(0, false, 25, smtp::patient);
    assert!(s.verdict(patient).starts_with("PASS "));
    let blind = s.client(1, false, 25, smtp::blind);
    assert!(s.verdict(blind).starts_with("EARLY-TALK "));
    let after = (tcx.runs().expect("runs"), legacy.runs().expect("runs"));
    // Each session is at least a handshake and a few segments each way.
    assert!(
        after.0 >= before.0 + 10,
        "the later TCX program ran: {before:?} -> {after:?}"
    );
    assert!(
        after.1 >= before.1 + 10,
        "the legacy filter ran: {before:?} -> {after:?}"
    );
    s.stop();
}

#[test]
fn a_daemon_whose_reader_dies_exits_non_zero_with_the_reason() {
    if !privileged("a_daemon_whose_reader_dies_exits_non_zero_with_the_reason") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let daemon = Daemon::start_with_env(
        &lab.server,
        &["--iface", SERVER_IF, "--mta", "none"],
        &[("SPAMDELAY_TEST_FAULT", "reader")],
    )
    .expect("starting spamdelay");
    let (status, lines) = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon stops by itself");
    assert!(!status.success(), "{status:?}: {lines:#?}");
    assert!(
        lines.iter().any(|l| l
            == "spamdelay: error: the ring-buffer reader failed: stopped by SPAMDELAY_TEST_FAULT=reader (a test switch)"),
        "{lines:#?}"
    );
    // It detached on the way out: nothing is left on the interface.
    let left = tcx_programs(&lab.server, SERVER_IF).expect("querying TCX");
    assert!(left.is_empty(), "{left:?}");
}
