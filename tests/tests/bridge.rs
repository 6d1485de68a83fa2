//! The bridge block end to end: from an early talker's verdict on, the
//! kernel drops its new SYNs by itself, before the daemon's nft ban exists;
//! never in a dry run; `spamdelay unban` lifts it with the ban.

use std::{
    io::{ErrorKind, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use spamdelay_tests::{
    daemon::{counter, counter_in},
    lab::Lab,
    nft::element,
    privileged,
    scenario::{Scenario, VERDICT_WAIT},
    smtp::{self, Greeting},
    until,
};

/// How the blind client's immediate second connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Reconnect {
    /// It got its SYN-ACK.
    Connected,
    /// A TCP reset: nftables' `reject`.
    Refused,
    /// No answer at all: its SYN was dropped.
    TimedOut,
}

/// Within this the server answers a SYN that is not dropped (a veth away);
/// shorter than the SYN's first retransmission (1 s), so only the first
/// SYN, sent at once after the early talk, is judged.
const SYN_WAIT: Duration = Duration::from_millis(800);

/// A blind sender that reconnects at once, without reading or sleeping:
/// the second SYN leaves microseconds after the early talk, long before the
/// daemon can have read the verdict, let alone banned in nft.
fn blind_then_reconnect(src: IpAddr, dst: SocketAddr) -> anyhow::Result<(u16, Reconnect)> {
    let mut first = smtp::connect(src, dst)?;
    let port = first.local_addr()?.port();
    first.write_all(b"EHLO blind.example\r\nMAIL FROM:<spam@example.com>\r\n")?;
    acked(&first)?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    let outcome = match sock.connect_timeout(&dst.into(), SYN_WAIT) {
        Ok(()) => Reconnect::Connected,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Reconnect::Refused,
        Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
            Reconnect::TimedOut
        }
        Err(e) => return Err(e.into()),
    };
    Ok((port, outcome))
}

/// Spins (no sleep) until the server's TCP acknowledged everything sent on
/// `s`: the early talk went through the server's tc ingress before the next
/// SYN leaves, even if this thread moved to another CPU meanwhile.
fn acked(s: &std::net::TcpStream) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let end = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the pointer.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if queued == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < end,
            "the early talk was never acknowledged"
        );
        std::thread::yield_now();
    }
}

fn run_blind(s: &Scenario, i: u8, v6: bool) -> (SocketAddr, Reconnect) {
    let src = Lab::client_addr(i, v6);
    let dst = SocketAddr::new(Lab::server_addr(v6), 25);
    let (port, outcome) = s
        .lab
        .client
        .run(move || blind_then_reconnect(src, dst))
        .expect("entering the client namespace")
        .expect("the blind client");
    (SocketAddr::new(src, port), outcome)
}

fn kernel_counter(s: &Scenario, name: &str) -> Option<u64> {
    let (ok, out, err) = s.daemon.admin(&s.lab.server, &["status"]).expect("status");
    assert!(ok, "spamdelay status failed: {err}");
    counter_in(out.lines().find(|l| l.starts_with("kernel:"))?, name)
}

#[test]
fn a_blind_clients_immediate_reconnect_is_dropped_by_the_bridge() {
    if !privileged("a_blind_clients_immediate_reconnect_is_dropped_by_the_bridge") {
        return;
    }
    // nft's answer to a banned client is a reset (`--action reject`): a
    // reconnect that gets no answer at all was dropped by the bridge.
    let s = Scenario::new(
        Greeting::pause(1500),
        &["--action", "reject", "--bridge-time", "10s"],
    );
    let start = s
        .daemon
        .wait_for(|l| l.starts_with("bridge block"), VERDICT_WAIT);
    assert!(
        start.as_deref().is_some_and(|l| l.contains(" for 10s ")),
        "{start:?}"
    );
    for (i, v6) in [(0, false), (1, true)] {
        let (blind, reconnect) = run_blind(&s, i, v6);
        assert_eq!(
            reconnect,
            Reconnect::TimedOut,
            "{blind}: {:#?}",
            s.daemon.lines()
        );
        assert!(s.verdict(blind).starts_with("EARLY-TALK"));
        let set = if v6 {
            "early_talkers_v6"
        } else {
            "early_talkers_v4"
        };
        let ip = blind.ip().to_string();
        assert!(
            until(VERDICT_WAIT, || element(&s.lab.server, set, &ip).is_some()),
            "the ban follows in nft"
        );
    }
    assert!(
        until(Duration::from_secs(3), || kernel_counter(
            &s,
            "bridge_blocked"
        ) == Some(2)),
        "spamdelay status shows bridge_blocked=2: {:?}",
        s.daemon.admin(&s.lab.server, &["status"])
    );
    // Others are not touched.
    let patient = s.client(2, false, 25, smtp::patient);
    assert!(s.verdict(patient).starts_with("PASS"));
    let lines = s.stop();
    assert_eq!(counter(&lines, "bridge_blocked"), Some(2), "{lines:#?}");
}

#[test]
fn a_dry_run_never_drops() {
    if !privileged("a_dry_run_never_drops") {
        return;
    }
    let s = Scenario::new(
        Greeting::pause(1500),
        &["--dry-run", "--bridge-time", "10s"],
    );
    let start = s
        .daemon
        .wait_for(|l| l.starts_with("bridge block"), VERDICT_WAIT);
    assert_eq!(start.as_deref(), Some("bridge block off (dry run)"));
    let (blind, reconnect) = run_blind(&s, 0, false);
    assert_eq!(reconnect, Reconnect::Connected);
    assert!(s.verdict(blind).starts_with("EARLY-TALK"));
    let lines = s.stop();
    assert_eq!(counter(&lines, "bridge_blocked"), Some(0), "{lines:#?}");
}

#[test]
fn bridge_time_zero_turns_the_bridge_off() {
    if !privileged("bridge_time_zero_turns_the_bridge_off") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &["--bridge-time", "0"]);
    let (blind, reconnect) = run_blind(&s, 0, false);
    // Connected, or refused by nft had the ban been that quick; never dropped.
    assert_ne!(reconnect, Reconnect::TimedOut);
    assert!(s.verdict(blind).starts_with("EARLY-TALK"));
    let lines = s.stop();
    assert_eq!(counter(&lines, "bridge_blocked"), Some(0), "{lines:#?}");
}

#[test]
fn unban_lifts_the_bridge_too() {
    if !privileged("unban_lifts_the_bridge_too") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &["--bridge-time", "1h"]);
    let (blind, reconnect) = run_blind(&s, 3, false);
    assert_eq!(reconnect, Reconnect::TimedOut);
    let ip = blind.ip().to_string();
    assert!(
        until(VERDICT_WAIT, || element(
            &s.lab.server,
            "early_talkers_v4",
            &ip
        )
        .is_some()),
        "banned in nft"
    );
    let (ok, out, err) = s
        .daemon
        .admin(&s.lab.server, &["unban", &ip])
        .expect("spamdelay unban");
    assert!(ok, "{out} {err}");
    // Neither nft nor the bridge holds it back now.
    let src = blind.ip();
    let dst = SocketAddr::new(Lab::server_addr(false), 25);
    s.lab
        .client
        .run(move || smtp::connect(src, dst))
        .expect("entering the client namespace")
        .expect("welcome again after unban");
    s.stop();
}
