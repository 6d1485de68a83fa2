//! End to end: the real daemon attached in a server namespace, real TCP
//! clients in a client namespace, verdicts read from the daemon's log.

use std::{net::SocketAddr, time::Duration};

use spamdelay_tests::{
    daemon::counter,
    lab::{Lab, SERVER_V4},
    packet::{self, Tcp},
    privileged, raw,
    scenario::{QUIET_WAIT, Scenario, VERDICT_WAIT},
    smtp::{self, Greeting},
};

#[test]
fn blind_sender_is_an_early_talker() {
    if !privileged("blind_sender_is_an_early_talker") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &[]);
    let client = s.client(0, false, 25, smtp::blind);
    let line = s.verdict(client);
    assert!(line.starts_with("EARLY-TALK 50 bytes after "), "{line}");
    assert!(
        line.ends_with(&format!(
            "from [{}]:{} to [192.0.2.25]:25: EHLO blind.example\\r\\nMAIL FROM:<spam@example.com>\\r\\n",
            client.ip(),
            client.port()
        )),
        "{line}"
    );
    let lines = s.stop();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(&format!(":{} ", client.port())))
            .count(),
        1,
        "one verdict per flow"
    );
    assert_eq!(counter(&lines, "early_talk"), Some(1));
}

#[test]
fn talking_after_the_teaser_is_early_talk() {
    if !privileged("talking_after_the_teaser_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500).with_teaser(), &[]);
    let client = s.client(1, false, 25, smtp::teaser_talker);
    let line = s.verdict(client);
    assert!(line.starts_with("EARLY-TALK 20 bytes after "), "{line}");
    assert!(line.ends_with(": EHLO eager.example\\r\\n"), "{line}");
    s.stop();
}

#[test]
fn patient_client_passes_only() {
    if !privileged("patient_client_passes_only") {
        return;
    }
    let s = Scenario::new(Greeting::pause(400).with_teaser(), &[]);
    let client = s.client(2, false, 25, smtp::patient);
    let line = s.verdict(client);
    assert!(line.starts_with("PASS after 0."), "{line}");
    let after: f64 = line["PASS after ".len()..]
        .split('s')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a duration");
    assert!(
        (0.35..2.0).contains(&after),
        "waited the 0.4 s pause: {line}"
    );
    std::thread::sleep(QUIET_WAIT);
    assert_eq!(
        s.daemon.verdicts_for_ip(client.ip()),
        vec![line],
        "nothing but PASS"
    );
    s.stop();
}

#[test]
fn hang_up_during_the_pause_is_a_quit() {
    if !privileged("hang_up_during_the_pause_is_a_quit") {
        return;
    }
    let s = Scenario::new(Greeting::pause(3000), &[]);
    let client = s.client(3, false, 25, |src, dst| {
        smtp::hang_up(src, dst, Duration::from_millis(300))
    });
    let line = s.verdict(client);
    assert!(line.starts_with("QUIT after 0.3"), "{line}");
    s.stop();
}

#[test]
fn ipv6_blind_sender_is_an_early_talker() {
    if !privileged("ipv6_blind_sender_is_an_early_talker") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &[]);
    let client = s.client(4, true, 25, smtp::blind);
    let line = s.verdict(client);
    assert!(line.starts_with("EARLY-TALK 50 bytes"), "{line}");
    assert!(
        line.contains(&format!(
            "from [{}]:{} to [2001:db8::25]:25",
            client.ip(),
            client.port()
        )),
        "{line}"
    );
    s.stop();
}

#[test]
fn allowlisted_blind_sender_is_never_flagged() {
    if !privileged("allowlisted_blind_sender_is_never_flagged") {
        return;
    }
    let allowed = Lab::client_v4(5);
    let cidr_v6 = format!("{}/128", Lab::client_v6(5));
    let s = Scenario::new(
        Greeting::pause(1500),
        &["--allow", &format!("{allowed}/32"), "--allow", &cidr_v6],
    );
    let quiet_v4 = s.client(5, false, 25, smtp::blind);
    let quiet_v6 = s.client(5, true, 25, smtp::blind);
    // A sender that is not allowlisted, to prove the daemon is watching.
    let flagged = s.client(6, false, 25, smtp::blind);
    assert!(s.verdict(flagged).starts_with("EARLY-TALK"));
    s.no_verdict(quiet_v4);
    s.no_verdict(quiet_v6);
    let lines = s.stop();
    assert_eq!(counter(&lines, "allowlisted"), Some(2));
}

#[test]
fn other_ports_are_not_watched() {
    if !privileged("other_ports_are_not_watched") {
        return;
    }
    let s = Scenario::with_ports(Greeting::pause(1500), &[25, 2525], &[]);
    let elsewhere = s.client(0, false, 2525, smtp::blind);
    let watched = s.client(1, false, 25, smtp::blind);
    assert!(s.verdict(watched).starts_with("EARLY-TALK"));
    s.no_verdict(elsewhere);
    s.stop();
}

#[test]
fn extra_watched_port_is_followed() {
    if !privileged("extra_watched_port_is_followed") {
        return;
    }
    let s = Scenario::with_ports(
        Greeting::pause(1500),
        &[25, 2525],
        &["--port", "25", "--port", "2525"],
    );
    let client = s.client(0, true, 2525, smtp::blind);
    assert!(s.verdict(client).contains("to [2001:db8::25]:2525: EHLO"));
    s.stop();
}

#[test]
fn greeting_split_across_segments_passes_patient_client() {
    if !privileged("greeting_split_across_segments_passes_patient_client") {
        return;
    }
    let s = Scenario::new(Greeting::pause(200).split(), &[]);
    let client = s.client(7, false, 25, smtp::patient);
    assert!(s.verdict(client).starts_with("PASS after "));
    std::thread::sleep(QUIET_WAIT);
    assert_eq!(s.daemon.verdicts_for_ip(client.ip()).len(), 1);
    s.stop();
}

#[test]
fn swaks_delivering_patiently_passes() {
    if !privileged("swaks_delivering_patiently_passes") {
        return;
    }
    let s = Scenario::new(Greeting::pause(300).with_teaser(), &[]);
    let src = Lab::client_v4(2);
    let out = s
        .lab
        .client
        .command("swaks")
        .args([
            "--server",
            "192.0.2.25",
            "--port",
            "25",
            "--local-interface",
            &src.to_string(),
        ])
        .args([
            "--from",
            "sender@example.com",
            "--to",
            "rcpt@example.net",
            "--helo",
            "client.example",
        ])
        .args(["--timeout", "10"])
        .output()
        .expect("running swaks (apt-get install swaks)");
    assert!(
        out.status.success(),
        "swaks failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        transcript.contains("250 2.0.0 queued"),
        "message delivered: {transcript}"
    );
    let line = s
        .daemon
        .wait_for(|l| l.contains(&format!("from [{src}]:")), VERDICT_WAIT)
        .expect("a verdict for swaks");
    assert!(line.starts_with("PASS after "), "{line}");
    std::thread::sleep(QUIET_WAIT);
    assert_eq!(s.daemon.verdicts_for_ip(src.into()).len(), 1);
    s.stop();
}

#[test]
fn payload_on_the_handshake_ack_is_early_talk() {
    if !privileged("payload_on_the_handshake_ack_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &[]);
    let src = std::net::SocketAddrV4::new(Lab::client_v4(7), 41_007);
    raw::silence_resets(&s.lab.client, *src.ip()).expect("nft in the client namespace");
    let dst = std::net::SocketAddrV4::new(SERVER_V4, 25);
    s.lab
        .client
        .run(move || raw::handshake_ack_with_payload(src, dst, b"EHLO piggyback.example\r\n"))
        .expect("entering the client namespace")
        .expect("raw handshake");
    let line = s.verdict(src.into());
    assert!(
        line.starts_with("EARLY-TALK 24 bytes after 0.000s"),
        "{line}"
    );
    assert!(line.ends_with(": EHLO piggyback.example\\r\\n"), "{line}");
    s.stop();
}

#[test]
fn forged_segment_without_handshake_is_ignored() {
    if !privileged("forged_segment_without_handshake_is_ignored") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &[]);
    // Forged from an address nobody in the lab owns, and from a real client's
    // address too: neither has a handshake, so neither may get a verdict.
    let forged: Vec<SocketAddr> = vec![
        "203.0.113.99:40099".parse().unwrap(),
        SocketAddr::new(Lab::client_addr(0, false), 40_100),
    ];
    for &src in &forged {
        let seg = Tcp::new(src, SocketAddr::new(SERVER_V4.into(), 25))
            .seq(1000)
            .ack(2000)
            .flags(packet::ACK | packet::PSH)
            .payload(b"EHLO forged.example\r\n".to_vec());
        s.lab
            .client
            .run(move || packet::send_raw_ipv4(&seg.ip_packet()))
            .expect("entering the client namespace")
            .expect("sending a forged segment");
    }
    // A real blind sender afterwards: its verdict shows the daemon was
    // reading the ring buffer all along.
    let real = s.client(1, false, 25, smtp::blind);
    assert!(s.verdict(real).starts_with("EARLY-TALK"));
    for src in &forged {
        s.no_verdict(*src);
    }
    let lines = s.stop();
    assert_eq!(counter(&lines, "unverified_payload"), Some(2), "{lines:#?}");
}

/// Thunderbird's account setup: `EHLO we-guess.mozilla.org` the moment it
/// connects, then QUIT once the first reply is in.
fn thunderbird_probe(src: std::net::IpAddr, dst: SocketAddr) -> anyhow::Result<u16> {
    use std::io::{BufReader, Write};
    let mut s = smtp::connect(src, dst)?;
    let port = s.local_addr()?.port();
    s.write_all(b"EHLO we-guess.mozilla.org\r\n")?;
    smtp::read_reply(&mut BufReader::new(s.try_clone()?))?;
    s.write_all(b"QUIT\r\n")?;
    Ok(port)
}

/// The probe, and a moment later MAIL, before the greeting.
fn probe_then_mail(src: std::net::IpAddr, dst: SocketAddr) -> anyhow::Result<u16> {
    use std::io::Write;
    let mut s = smtp::connect(src, dst)?;
    let port = s.local_addr()?.port();
    s.write_all(b"EHLO we-guess.mozilla.org\r\n")?;
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"MAIL FROM:<spam@example.com>\r\n")?;
    Ok(port)
}

#[test]
fn thunderbird_probe_is_a_probe_on_25_and_587_and_more_is_banned() {
    if !privileged("thunderbird_probe_is_a_probe_on_25_and_587_and_more_is_banned") {
        return;
    }
    let s = Scenario::with_ports(
        Greeting::pause(1000),
        &[25, 587],
        &["--port", "25", "--port", "587"],
    );
    for (i, port) in [(0u8, 25u16), (1, 587)] {
        let client = s.client(i, false, port, thunderbird_probe);
        let line = s.verdict(client);
        assert!(line.starts_with("PROBE 27 bytes after "), "{line}");
        assert!(
            line.ends_with(": EHLO we-guess.mozilla.org\\r\\n"),
            "{line}"
        );
    }
    let sneaky = s.client(2, false, 25, probe_then_mail);
    assert!(s.verdict(sneaky).starts_with("PROBE "));
    let talk = s
        .daemon
        .wait_for(
            |l| l.starts_with("EARLY-TALK") && l.contains(&format!(":{} ", sneaky.port())),
            VERDICT_WAIT,
        )
        .expect("the MAIL after the probe is early talk");
    assert!(
        talk.ends_with(": MAIL FROM:<spam@example.com>\\r\\n"),
        "{talk}"
    );
    s.daemon
        .wait_for(
            |l| l.starts_with(&format!("ban [{}] ", sneaky.ip())),
            VERDICT_WAIT,
        )
        .expect("the sneaky client is banned");
    std::thread::sleep(QUIET_WAIT);
    let lines = s.stop();
    for i in [0u8, 1] {
        let ip = Lab::client_v4(i);
        assert!(
            !lines.iter().any(|l| l.starts_with(&format!("ban [{ip}]"))),
            "a probe is never banned: {lines:?}"
        );
    }
    assert_eq!(counter(&lines, "probe"), Some(3));
}
