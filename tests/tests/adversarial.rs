//! Adversaries in the namespace lab, against the real daemon and the real
//! kernel TCP of the test server. Evasions: a raw client completes a real
//! handshake, then sends early bytes in shapes a naive parser misses but the
//! server's TCP takes (overlapping the first byte, fragments, extension
//! headers, after a stray RST or FIN, in a Fast Open SYN, urgent): each must
//! be an EARLY-TALK and a ban, and the test server proves the kernel took the
//! bytes before its greeting. Forgeries: segments spoofing a real patient
//! client without knowing its sequence numbers, which the server's TCP drops:
//! none may cost that client its PASS or ban anyone (DESIGN.md, "Only what
//! the server's TCP accepts counts").

use std::{
    io::BufReader,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use spamdelay_tests::{
    daemon::counter,
    flood,
    lab::{CLIENT_IF, Lab, SERVER_IF},
    nft::{self, element, elements},
    packet::{ACK, FIN, Ipv6Ext, PSH, RST, RawSender, SYN, Tcp, URG},
    privileged,
    raw::{self, RawConn, Sniffer},
    scenario::{QUIET_WAIT, Scenario, VERDICT_WAIT},
    smtp::{self, BANNER, Greeting, Listen},
    until,
};

/// The greet pause of the evasion scenarios: every evasion is sent within
/// the first few milliseconds of it.
const PAUSE_MS: u64 = 1500;
/// Bound on the wait for the test server's greeting moment.
const HEARD_WAIT: Duration = Duration::from_millis(PAUSE_MS + 2000);
/// What the evasions say, once the kernel has trimmed what it trims.
const TALK: &[u8] = b"EHLO evasive.example.test\r\n";

fn server(v6: bool) -> SocketAddr {
    SocketAddr::new(Lab::server_addr(v6), 25)
}

fn ban_set(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "early_talkers_v4"
    } else {
        "early_talkers_v6"
    }
}

/// Sends `syn` from the client namespace (its stack's RSTs silenced for
/// the address) and waits for the server's SYN-ACK.
fn raw_open(s: &Scenario, syn: Tcp) -> RawConn {
    raw::silence_resets(&s.lab.client, syn.src.ip()).expect("nft in the client namespace");
    s.lab
        .client
        .run(move || RawConn::open(&syn))
        .expect("entering the client namespace")
        .expect("raw handshake")
}

/// One evasion: who sent it, and the bytes the server's TCP must have taken
/// (and left unread) before it greeted.
struct Evasion {
    what: &'static str,
    client: SocketAddr,
    taken: Vec<u8>,
}

/// An evasion from the raw client that sends `syn`, once its handshake is
/// complete: `send` sends the early bytes and returns those the server's
/// TCP must take.
fn evade_after(
    s: &Scenario,
    syn: Tcp,
    what: &'static str,
    send: impl FnOnce(&RawConn) -> Vec<u8>,
) -> Evasion {
    let conn = raw_open(s, syn);
    conn.complete().expect("sending the handshake's ACK");
    Evasion {
        what,
        client: conn.local,
        taken: send(&conn),
    }
}

/// `evade_after` a plain handshake from lab address `i`, port 41000 + i.
fn evade(
    s: &Scenario,
    i: u8,
    v6: bool,
    what: &'static str,
    send: impl FnOnce(&RawConn) -> Vec<u8>,
) -> Evasion {
    let local = SocketAddr::new(Lab::client_addr(i, v6), 41_000 + u16::from(i));
    evade_after(s, RawConn::syn(local, server(v6)), what, send)
}

/// Every evasion's bytes reached the test server before its greeting (the
/// kernel took them: the premise, checked first), so each must be an
/// EARLY-TALK and a ban. All are judged before failing, and the failure
/// says what each got.
fn assert_caught(s: &Scenario, evasions: &[Evasion]) {
    for e in evasions {
        let heard = s.server().heard_before_greeting(e.client, HEARD_WAIT);
        assert_eq!(
            heard.as_deref().map(String::from_utf8_lossy),
            Some(String::from_utf8_lossy(&e.taken)),
            "{}: the server's TCP took these bytes before its greeting",
            e.what
        );
    }
    let deadline = Instant::now() + VERDICT_WAIT;
    let mut failures = Vec::new();
    for e in evasions {
        let left = deadline.saturating_duration_since(Instant::now());
        let verdict = s.daemon.verdict_for(e.client, left);
        let early = verdict
            .as_deref()
            .is_some_and(|l| l.starts_with("EARLY-TALK"));
        let ip = e.client.ip().to_string();
        let banned = early
            && until(Duration::from_secs(3), || {
                element(&s.lab.server, ban_set(e.client.ip()), &ip).is_some()
            });
        if !(early && banned) {
            failures.push(format!(
                "{} from {}: want EARLY-TALK and a ban, got {verdict:?}, banned: {banned}",
                e.what, e.client
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{failures:#?}\ndaemon log: {:#?}",
        s.daemon.lines()
    );
}

/// Data that starts before the client's first byte C (seq C-1 with 26
/// bytes, seq C-1000 with 1,025) overlaps the SYN's sequence number: the
/// server's TCP trims what it has (RFC 793 "partial segment") and takes the
/// last 25 bytes as new data. Expected: EARLY-TALK and a ban, IPv4 and IPv6.
#[test]
fn data_overlapping_the_first_byte_is_early_talk() {
    if !privileged("data_overlapping_the_first_byte_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(PAUSE_MS), &[]);
    let mut evasions = Vec::new();
    for v6 in [false, true] {
        for (i, before, what) in [(0, 1, "seq C-1"), (1, 1000, "seq C-1000")] {
            evasions.push(evade(&s, i, v6, what, |conn| {
                let mut payload = vec![b'#'; before];
                payload.extend_from_slice(TALK);
                conn.send(&conn.data(-(before as i32), &payload))
                    .expect("sending the overlapping segment");
                TALK.to_vec()
            }));
        }
    }
    assert_caught(&s, &evasions);
    s.stop();
}

/// Early data in IP fragments, the first carrying the TCP header: the
/// server's IP layer reassembles them before TCP sees one segment.
/// Expected: EARLY-TALK and a ban, IPv4 (3 fragments) and IPv6 (3).
#[test]
fn data_in_ip_fragments_is_early_talk() {
    if !privileged("data_in_ip_fragments_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(PAUSE_MS), &[]);
    let talk = b"EHLO fragments.example\r\nMAIL FROM:<f@example>\r\n";
    let evasions = [false, true].map(|v6| {
        evade(&s, 2, v6, "data in 3 fragments", |conn| {
            let sent = conn
                .send_fragments(&conn.data(0, talk), 24)
                .expect("sending fragments");
            assert_eq!(sent, 3, "20 header and 48 payload bytes, 24 a fragment");
            talk.to_vec()
        })
    });
    assert_caught(&s, &evasions);
    s.stop();
}

/// Early data behind five IPv6 destination-options headers (each with one
/// skippable option): Linux walks any number of them. Expected: EARLY-TALK
/// and a ban.
#[test]
fn data_behind_five_destination_options_headers_is_early_talk() {
    if !privileged("data_behind_five_destination_options_headers_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(PAUSE_MS), &[]);
    let evasion = evade(&s, 3, true, "5 destination-options headers", |conn| {
        let mut seg = conn.data(0, TALK);
        seg.ipv6_ext = vec![Ipv6Ext::DestOpts { units: 0 }; 5];
        conn.send(&seg).expect("sending the segment");
        TALK.to_vec()
    });
    assert_caught(&s, &[evasion]);
    s.stop();
}

/// An RST one byte past the client's next sequence number: Linux (RFC 5961
/// 3.2) answers it with a challenge ACK and keeps the connection, so the
/// data at C that follows is taken. Expected: EARLY-TALK and a ban, not a
/// QUIT, IPv4 and IPv6.
#[test]
fn inexact_reset_then_data_is_early_talk() {
    if !privileged("inexact_reset_then_data_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(PAUSE_MS), &[]);
    let evasions = [false, true].map(|v6| {
        evade(&s, 4, v6, "RST at C+1, then data", |conn| {
            conn.send(&conn.at(1).flags(RST | ACK))
                .expect("sending the RST");
            let first = conn.isn.wrapping_add(1);
            let challenge = conn
                .next(Duration::from_secs(1), |seg| {
                    seg.has(ACK) && seg.flags & RST == 0 && seg.ack == first
                })
                .expect("reading the server's answer");
            assert!(challenge.is_some(), "the server answers a challenge ACK");
            conn.send(&conn.data(0, TALK)).expect("sending the data");
            TALK.to_vec()
        })
    });
    assert_caught(&s, &evasions);
    s.stop();
}

/// A FIN 100 bytes ahead: the server's TCP queues it out of order (it
/// closes nothing until the gap is filled) and takes the data at C that
/// follows. Expected: EARLY-TALK and a ban, not a QUIT, IPv4 and IPv6.
#[test]
fn out_of_order_fin_then_data_is_early_talk() {
    if !privileged("out_of_order_fin_then_data_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(PAUSE_MS), &[]);
    let evasions = [false, true].map(|v6| {
        evade(&s, 5, v6, "FIN at C+100, then data", |conn| {
            conn.send(&conn.at(100).flags(FIN | ACK))
                .expect("sending the FIN");
            conn.send(&conn.data(0, TALK)).expect("sending the data");
            TALK.to_vec()
        })
    });
    assert_caught(&s, &evasions);
    s.stop();
}

/// TCP Fast Open: the server namespace takes SYN data without a cookie
/// (`net.ipv4.tcp_fastopen` = 0x202: server on, no cookie required; the
/// listener has TCP_FASTOPEN), and its SYN-ACK acknowledges the data. Once
/// the handshake completes, those bytes were delivered before the greeting.
/// Expected: EARLY-TALK and a ban, IPv4 and IPv6.
#[test]
fn fast_open_syn_data_is_early_talk() {
    if !privileged("fast_open_syn_data_is_early_talk") {
        return;
    }
    let s = Scenario::listening(
        Greeting::pause(PAUSE_MS),
        Listen {
            fast_open: Some(16),
        },
        &[],
    );
    flood::sysctl(&s.lab.server, "net.ipv4.tcp_fastopen", &0x202.to_string())
        .expect("enabling Fast Open in the server namespace");
    let evasions = [false, true].map(|v6| {
        let local = SocketAddr::new(Lab::client_addr(6, v6), 41_006);
        let mut syn = RawConn::syn(local, server(v6)).payload(TALK);
        // Fast Open option, empty: a cookie request (RFC 7413 4.1.1).
        syn.tcp_options = vec![34, 2];
        evade_after(&s, syn, "Fast Open SYN data", |conn| {
            assert_eq!(
                conn.syn_acked,
                conn.isn.wrapping_add(1 + TALK.len() as u32),
                "the SYN-ACK acknowledges the SYN's data"
            );
            TALK.to_vec()
        })
    });
    assert_caught(&s, &evasions);
    s.stop();
}

/// Urgent data (URG, the pointer at the last byte): the server's TCP takes
/// the segment, the urgent byte out of band and the rest in the stream.
/// Expected: EARLY-TALK and a ban.
#[test]
fn urgent_data_is_early_talk() {
    if !privileged("urgent_data_is_early_talk") {
        return;
    }
    let s = Scenario::new(Greeting::pause(PAUSE_MS), &[]);
    let evasion = evade(&s, 7, false, "urgent data", |conn| {
        let mut seg = conn.data(0, TALK).flags(ACK | PSH | URG);
        seg.urgent = TALK.len() as u16;
        conn.send(&seg).expect("sending urgent data");
        // Linux's urgent pointer points past the urgent byte (the last),
        // which is read apart from the stream.
        TALK[..TALK.len() - 1].to_vec()
    });
    assert_caught(&s, &[evasion]);
    s.stop();
}

/// A raw server on port 25 of the server namespace sends the greeting as
/// `pieces` (offset from its first byte, bytes), 5 ms apart, to a kernel
/// TCP client from lab address `i`, which reads the whole greeting and
/// then stays silent for a moment. Returns the client's address and what
/// it read.
fn raw_server_greets(
    s: &Scenario,
    i: u8,
    v6: bool,
    pieces: Vec<(i32, Vec<u8>)>,
) -> (SocketAddr, String) {
    raw::silence_resets(&s.lab.server, Lab::server_addr(v6)).expect("nft in the server namespace");
    let greeter = s.lab.server.spawn(move || -> anyhow::Result<RawConn> {
        let conn = RawConn::accept(server(v6), Duration::from_secs(5))?;
        for (offset, bytes) in pieces {
            conn.send(&conn.data(offset, &bytes))?;
            thread::sleep(Duration::from_millis(5));
        }
        Ok(conn)
    });
    let src = Lab::client_addr(i, v6);
    let (port, greeting) = s
        .lab
        .client
        .run(move || -> anyhow::Result<(u16, String)> {
            let stream = smtp::connect(src, server(v6))?;
            let port = stream.local_addr()?.port();
            let greeting = smtp::read_reply(&mut BufReader::new(&stream))?;
            thread::sleep(Duration::from_millis(300));
            Ok((port, greeting))
        })
        .expect("entering the client namespace")
        .expect("the client reads the greeting");
    match greeter.join() {
        Ok(r) => drop(
            r.expect("entering the server namespace")
                .expect("raw server"),
        ),
        Err(panic) => std::panic::resume_unwind(panic),
    }
    (SocketAddr::new(src, port), greeting)
}

/// Asserts PASS is the one verdict for `client`.
fn assert_only_pass(s: &Scenario, client: SocketAddr) {
    let line = s.verdict(client);
    assert!(line.starts_with("PASS after "), "{line}");
    thread::sleep(QUIET_WAIT);
    assert_eq!(
        s.daemon.verdicts_for_ip(client.ip()),
        vec![line],
        "nothing but PASS"
    );
}

/// The greeting in 33 one-byte segments, then a silent client: the scanner
/// must follow the line byte by byte. Expected: PASS (and nothing else).
#[test]
fn greeting_in_one_byte_segments_then_silence_passes() {
    if !privileged("greeting_in_one_byte_segments_then_silence_passes") {
        return;
    }
    let s = Scenario::with_ports(Greeting::pause(0), &[], &[]);
    let pieces = (0..BANNER.len())
        .map(|i| (i as i32, BANNER[i..=i].to_vec()))
        .collect();
    let (client, greeting) = raw_server_greets(&s, 0, false, pieces);
    assert_eq!(greeting.as_bytes(), BANNER);
    assert_only_pass(&s, client);
    s.stop();
}

/// A greeting whose segments overlap and repeat, as a server's
/// retransmissions (re-segmented, RFC 793 lets it) can: `220 mx`, then
/// `220 mx.exa` (old bytes and new), then `mx.example...\r\n` from byte 4
/// (overlapping again), then the whole line once more. The client's TCP
/// reads one clean greeting. Expected: PASS (and nothing else), IPv4 and
/// IPv6.
#[test]
fn greeting_with_overlapping_retransmissions_passes() {
    if !privileged("greeting_with_overlapping_retransmissions_passes") {
        return;
    }
    let s = Scenario::with_ports(Greeting::pause(0), &[], &[]);
    for v6 in [false, true] {
        let pieces = vec![
            (0, BANNER[..6].to_vec()),
            (0, BANNER[..10].to_vec()),
            (4, BANNER[4..].to_vec()),
            (0, BANNER.to_vec()),
        ];
        let (client, greeting) = raw_server_greets(&s, 1, v6, pieces);
        assert_eq!(greeting.as_bytes(), BANNER);
        assert_only_pass(&s, client);
    }
    s.stop();
}

/// The greet pause of the sweep scenarios: the sweep must end inside it.
const SWEEP_PAUSE_MS: u64 = 4000;

/// A forger sweeps the whole sequence space while a patient kernel TCP
/// client from lab address 2 waits through the greet pause: 65,536 copies
/// of a segment with `flags` and `payload` spoofing the client's address
/// and port, one every 64 KiB of sequence numbers, with an ACK number the
/// server never sent (its ISN + 2^30: outside what RFC 5961 5.2 lets it
/// take). The server's TCP drops every one, so: PASS for the client, no
/// other verdict, no ban. The sweep's duration is reported.
fn sweep_spares_patient_client(v6: bool, flags: u8, payload: &[u8], extra: &[&str]) {
    let s = Scenario::new(Greeting::pause(SWEEP_PAUSE_MS), extra);
    let (dst, src) = (server(v6), Lab::client_addr(2, v6));
    let (stream, seen) = s
        .lab
        .client
        .run(move || -> anyhow::Result<_> {
            let sniffer = Sniffer::open(v6)?;
            let stream = smtp::connect(src, dst)?;
            let seen = sniffer.syn_ack(dst, stream.local_addr()?.port())?;
            Ok((stream, seen))
        })
        .expect("entering the client namespace")
        .expect("the patient client connects");
    let connected = Instant::now();
    let client = SocketAddr::new(src, stream.local_addr().expect("local address").port());
    let template = Tcp::new(client, dst)
        .ack(seen.server_isn.wrapping_add(1 << 30))
        .flags(flags)
        .payload(payload);
    // An RST exactly at the client's next byte would be taken, and rightly
    // end the session: a forger's 1-in-65,536 luck the sweep leaves out.
    let skip = (flags & RST != 0).then_some(seen.client_first);
    let packets = raw::sweep(&template, 1 << 16, skip);
    let sender = s
        .lab
        .client
        .run(move || RawSender::new(v6))
        .expect("entering the client namespace")
        .expect("a raw socket");
    let started = Instant::now();
    sender.send_all(&packets).expect("sending the sweep");
    let took = started.elapsed();
    eprintln!(
        "sweep over IPv{}, flags {flags:#04x}, {} payload bytes: {} segments in {:.3} s",
        if v6 { 6 } else { 4 },
        payload.len(),
        packets.len(),
        took.as_secs_f64()
    );
    assert!(
        connected.elapsed() < Duration::from_millis(SWEEP_PAUSE_MS),
        "the sweep ended inside the greet pause ({:.3} s after the connect)",
        connected.elapsed().as_secs_f64()
    );
    // A forged ban would refuse the client's own packets (a reset): judged
    // below with the verdicts, so the failure says which verdict did it.
    let session = smtp::converse_patiently(&stream).map_err(|e| format!("{e:#}"));
    let line = s.daemon.verdict_for(client, VERDICT_WAIT);
    thread::sleep(QUIET_WAIT);
    let lines = s.daemon.verdicts_for_ip(client.ip());
    let bans: Vec<String> = s
        .daemon
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("ban ["))
        .collect();
    let banned = elements(&s.lab.server, ban_set(client.ip()));
    assert!(
        session.is_ok()
            && line
                .as_deref()
                .is_some_and(|l| l.starts_with("PASS after "))
            && lines.iter().all(|l| l.starts_with("PASS"))
            && bans.is_empty()
            && banned.is_empty(),
        "want a whole session, PASS alone and no ban; session {session:?}, \
         verdicts {lines:#?}, ban lines {bans:#?}, banned {banned:?}"
    );
    let log = s.stop();
    if let Some(seen) = counter(&log, "packets") {
        assert!(
            seen >= packets.len() as u64,
            "every forged segment reached the kernel program: {seen} packets"
        );
    }
}

/// Forged data from the whole sequence space (one segment lands inside the
/// client's first 64 KiB, with a wrong ACK): expected PASS, no EARLY-TALK,
/// no ban. IPv4.
#[test]
fn forged_data_sweep_spares_a_patient_client() {
    if !privileged("forged_data_sweep_spares_a_patient_client") {
        return;
    }
    sweep_spares_patient_client(false, ACK | PSH, b"EHLO forged.example\r\n", &[]);
}

/// As above, over IPv6.
#[test]
fn forged_ipv6_data_sweep_spares_a_patient_client() {
    if !privileged("forged_ipv6_data_sweep_spares_a_patient_client") {
        return;
    }
    sweep_spares_patient_client(true, ACK | PSH, b"EHLO forged.example\r\n", &[]);
}

/// Forged RSTs from the whole sequence space, none exactly at the client's
/// next byte (those the server answers with challenge ACKs), the daemon
/// banning quitters: expected PASS, no QUIT, no ban.
#[test]
fn forged_reset_sweep_is_no_quit() {
    if !privileged("forged_reset_sweep_is_no_quit") {
        return;
    }
    sweep_spares_patient_client(false, RST | ACK, b"", &["--ban-quitters"]);
}

/// Forged FINs from the whole sequence space with a wrong ACK (dropped
/// before the FIN is looked at), the daemon banning quitters: expected
/// PASS, no QUIT, no ban.
#[test]
fn forged_fin_sweep_is_no_quit() {
    if !privileged("forged_fin_sweep_is_no_quit") {
        return;
    }
    sweep_spares_patient_client(false, FIN | ACK, b"", &["--ban-quitters"]);
}

/// The flood's forged sources: documentation addresses that no lab client
/// uses (the lab's are 198.51.100.10.. and, here, .20..49). The server
/// routes them back through the client namespace, which drops them.
const FORGED_NETS: [&str; 2] = ["198.51.100.128/25", "203.0.113.0/24"];
const FLOOD_PORTS_PER_SOURCE: u16 = 48;

/// A SYN and then an RST at exactly the next sequence number (which makes
/// the server's TCP drop the half-open connection) from every port of
/// every forged source: each SYN costs the kernel program a new flow.
fn syn_rst_pairs() -> Vec<Vec<u8>> {
    let sources = (128..=254u8)
        .map(|h| Ipv4Addr::new(198, 51, 100, h))
        .chain((1..=254u8).map(|h| Ipv4Addr::new(203, 0, 113, h)));
    let dst = server(false);
    let mut packets = Vec::new();
    for ip in sources {
        for port in 0..FLOOD_PORTS_PER_SOURCE {
            let src = SocketAddr::new(ip.into(), 20_000 + port);
            let isn = 0x0f00_0000 | (u32::from(ip.octets()[3]) << 16) | u32::from(port);
            let syn = Tcp::new(src, dst).seq(isn).flags(SYN);
            let rst = Tcp::new(src, dst).seq(isn.wrapping_add(1)).flags(RST);
            packets.push(syn.ip_packet());
            packets.push(rst.ip_packet());
        }
    }
    packets
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it, and
    // sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `--max-flows 1024`, and a flood of forged SYN+RST pairs from hundreds of
/// addresses churning far more flows than that, all the while 20 patient
/// clients wait through a 1.5 s pause and 10 clients talk after 0.5 s. A
/// flood of handshakes that never complete must not cost verified flows
/// their verdicts. Expected: 20 PASS and 10 EARLY-TALK; counts reported.
#[test]
fn syn_rst_flood_costs_no_real_verdict() {
    if !privileged("syn_rst_flood_costs_no_real_verdict") {
        return;
    }
    let s = Scenario::new(Greeting::pause(PAUSE_MS), &["--max-flows", "1024"]);
    // Each real client has an address of its own, so a late talker's ban
    // never refuses a patient client's packets.
    let real: Vec<Ipv4Addr> = (20..50).map(|h| Ipv4Addr::new(198, 51, 100, h)).collect();
    flood::add_addresses(&s.lab.client, CLIENT_IF, &real, 24).expect("adding client addresses");
    let gateway = Lab::client_v4(0).to_string();
    for net in FORGED_NETS {
        s.lab
            .server
            .ip(&["route", "add", net, "via", &gateway, "dev", SERVER_IF])
            .expect("routing the forged sources");
    }
    // The SYN-ACKs to forged sources end here (the namespace does not
    // forward either; the rule says so out loud).
    let sink = format!(
        "add rule inet flood_sink pre ip daddr {{ {} }} drop",
        FORGED_NETS.join(", ")
    );
    for cmd in [
        "add table inet flood_sink",
        "add chain inet flood_sink pre { type filter hook prerouting priority -300; }",
        sink.as_str(),
    ] {
        nft::nft(&s.lab.client, &[cmd]).expect("nft in the client namespace");
    }

    // One flooder pinned to each CPU: the packets are processed on the
    // sender's CPU, and the kernel's LRU keeps each CPU's fresh entries on a
    // list of its own until that CPU needs more, so a flood from one CPU
    // would never reach the flows the other CPU inserted. A real flood
    // arrives on every CPU (RSS).
    let packets = Arc::new(syn_rst_pairs());
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = Arc::new(AtomicU64::new(0));
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let flooders: Vec<_> = (0..cpus)
        .map(|cpu| {
            let sender = s
                .lab
                .client
                .run(|| RawSender::new(false))
                .expect("entering the client namespace")
                .expect("a raw socket");
            let (packets, stop, pairs) = (packets.clone(), stop.clone(), pairs.clone());
            thread::spawn(move || {
                pin_to_cpu(cpu);
                while !stop.load(Ordering::Relaxed) {
                    for chunk in packets.chunks(512) {
                        sender.send_all(chunk).expect("sending the flood");
                        pairs.fetch_add(chunk.len() as u64 / 2, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let flood_start = Instant::now();
    thread::sleep(Duration::from_millis(300));

    let dst = server(false);
    let clients: Vec<_> = real
        .iter()
        .enumerate()
        .map(|(n, &ip)| {
            let patient = n < 20;
            let handle = s.lab.client.spawn(move || {
                if patient {
                    smtp::patient(ip.into(), dst)
                } else {
                    smtp::talk_after(
                        ip.into(),
                        dst,
                        Duration::from_millis(500),
                        b"EHLO late.example\r\n",
                    )
                }
            });
            (patient, ip, handle)
        })
        .collect();
    let mut joined = Vec::new();
    for (patient, ip, handle) in clients {
        let port = match handle.join() {
            Ok(r) => r
                .expect("entering the client namespace")
                .expect("a real client's session"),
            Err(panic) => std::panic::resume_unwind(panic),
        };
        joined.push((patient, SocketAddr::new(ip.into(), port)));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().expect("a flooder");
    }
    let flood_secs = flood_start.elapsed().as_secs_f64();
    let sent = pairs.load(Ordering::Relaxed);

    let deadline = Instant::now() + VERDICT_WAIT;
    let (mut passed, mut caught, mut wrong) = (0, 0, Vec::new());
    for &(patient, client) in &joined {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = s.daemon.verdict_for(client, left);
        match (&line, patient) {
            (Some(l), true) if l.starts_with("PASS") => passed += 1,
            (Some(l), false) if l.starts_with("EARLY-TALK") => caught += 1,
            _ => wrong.push(format!(
                "{} {client}: {line:?}",
                if patient { "patient" } else { "late talker" }
            )),
        }
    }
    eprintln!(
        "flood: {sent} SYN+RST pairs from {cpus} CPU(s) in {flood_secs:.2} s ({:.0} pairs/s); \
         patient clients PASS {passed}/20, late talkers EARLY-TALK {caught}/10",
        sent as f64 / flood_secs
    );
    let log = s.stop();
    assert!(
        sent > 16 * 1024,
        "the flood must outnumber the 1,024 flows many times over: {sent} pairs"
    );
    let stat = |name| counter(&log, name).unwrap_or(0);
    eprintln!(
        "flood counters: packets={} flows_tracked={} flow_insert_failed={} unverified_payload={}",
        stat("packets"),
        stat("flows_tracked"),
        stat("flow_insert_failed"),
        stat("unverified_payload")
    );
    assert!(
        wrong.is_empty(),
        "want PASS for 20 patient clients and EARLY-TALK for 10 late talkers; \
         {passed} PASS, {caught} EARLY-TALK, wrong: {wrong:#?}"
    );
}
