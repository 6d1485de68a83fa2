//! The kernel program run on crafted frames with BPF_PROG_TEST_RUN: the
//! detection contract of DESIGN.md, and robustness against malformed input.
//! Every test loads its own object, so flow tables and counters are private.

use std::net::SocketAddr;

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
};
use spamdelay::{
    allow::Cidr,
    events::{Report, drain},
    loader::{self, EGRESS, INGRESS},
    mta::Pipeconnect,
};
use spamdelay_common::{Flow, FlowKey, PAYLOAD_CAPTURE, Stat, Verdict};
use spamdelay_tests::{
    packet::{
        ACK, ETH_HLEN, FIN, Fragment, IPV4_HLEN, IPV6_HLEN, Ipv6Ext, PSH, RST, SYN, Tcp, URG,
    },
    privileged,
};

/// What a program that only watches returns (TCX_NEXT): the next program
/// in the chain still runs.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
/// What the bridge block returns for an early talker's new SYN.
const TC_ACT_SHOT: u32 = 2;
const SERVER_V4: &str = "192.0.2.25:25";
const SERVER_V6: &str = "[2001:db8::25]:25";
const EHLO: &[u8] = b"EHLO spam.example\r\n";
const GREETING: &[u8] = b"220 mx.example ESMTP\r\n";

/// One loaded object and its ring buffer.
struct Kernel {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
}

impl Kernel {
    fn load() -> Self {
        Self::load_with(loader::KernelConfig::default())
    }

    fn load_with(config: loader::KernelConfig) -> Self {
        let mut ebpf = loader::load(&config).expect("loading the kernel object");
        let events = loader::take_events(&mut ebpf).expect("taking the ring buffer");
        Kernel { ebpf, events }
    }

    fn allow(&mut self, cidr: &str) {
        let cidr: Cidr = cidr.parse().expect("a test CIDR");
        loader::fill_allowlist(&mut self.ebpf, &[cidr]).expect("filling the allowlist");
    }

    fn run(&self, program: &str, frame: &[u8]) -> Result<u32, ProgramError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .expect("program in the object")
            .try_into()
            .expect("a tc classifier");
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        prog.test_run(opts).map(|r| r.return_value)
    }

    /// Runs a frame that the kernel accepts for a test run; the program must
    /// let it through, whatever it is: detection never drops.
    fn pass(&self, program: &str, frame: &[u8]) {
        let ret = self
            .run(program, frame)
            .unwrap_or_else(|e| panic!("test run of {program} on {} bytes: {e:?}", frame.len()));
        assert_eq!(ret, TC_ACT_UNSPEC, "{program} must never drop");
    }

    /// Runs a frame the program must drop (TC_ACT_SHOT): the bridge block.
    fn dropped(&self, program: &str, frame: &[u8]) {
        let ret = self
            .run(program, frame)
            .unwrap_or_else(|e| panic!("test run of {program} on {} bytes: {e:?}", frame.len()));
        assert_eq!(ret, TC_ACT_SHOT, "{program} must drop this frame");
    }

    fn client_sends(&self, seg: &Tcp) {
        self.pass(INGRESS, &seg.frame());
    }

    fn server_sends(&self, seg: &Tcp) {
        self.pass(EGRESS, &seg.frame());
    }

    fn reports(&mut self) -> Vec<Report> {
        drain(&mut self.events)
    }

    fn expect_none(&mut self, why: &str) {
        let reports = self.reports();
        assert!(
            reports.is_empty(),
            "{why}: expected no verdict, got {reports:?}"
        );
    }

    /// Exactly one verdict, about `conv`, with `verdict`.
    fn expect(&mut self, conv: &Conversation, verdict: Verdict) -> Report {
        let mut reports = self.reports();
        assert_eq!(
            reports.len(),
            1,
            "expected one {verdict:?}, got {reports:?}"
        );
        let r = reports.remove(0);
        assert_eq!(r.verdict, verdict, "{r:?}");
        assert_eq!((r.client, r.server), (conv.client, conv.server), "{r:?}");
        r
    }

    /// Exactly one EARLY-TALK about `conv`, reporting `payload` exactly.
    fn expect_early_talk(&mut self, conv: &Conversation, payload: &[u8]) {
        let r = self.expect(conv, Verdict::EarlyTalk);
        assert_eq!(r.bytes as usize, payload.len(), "byte count of {r:?}");
        let captured = &payload[..payload.len().min(PAYLOAD_CAPTURE)];
        assert_eq!(r.payload, captured, "captured payload of {r:?}");
    }

    fn stat(&self, stat: Stat) -> u64 {
        loader::read_stats(&self.ebpf)
            .expect("reading the counters")
            .into_iter()
            .find_map(|(s, n)| (s == stat).then_some(n))
            .expect("every Stat is read")
    }
}

/// One TCP connection's addresses and sequence numbers, making its segments.
struct Conversation {
    client: SocketAddr,
    server: SocketAddr,
    /// The client's first data sequence number (its ISN + 1).
    client_next: u32,
    /// The server's ISN.
    server_isn: u32,
}

impl Conversation {
    fn new(client: &str, server: &str) -> Self {
        Conversation {
            client: client.parse().expect("a test client address"),
            server: server.parse().expect("a test server address"),
            client_next: 0x1000_0001,
            server_isn: 0xdead_0000,
        }
    }

    fn v4(client: &str) -> Self {
        Self::new(client, SERVER_V4)
    }

    fn v6(client: &str) -> Self {
        Self::new(client, SERVER_V6)
    }

    fn syn_ack(&self) -> Tcp {
        Tcp::new(self.server, self.client)
            .seq(self.server_isn)
            .ack(self.client_next)
            .flags(SYN | ACK)
    }

    /// The client's ACK completing the handshake (a template for its other
    /// segments: same numbers until it sends data).
    fn ack(&self) -> Tcp {
        Tcp::new(self.client, self.server)
            .seq(self.client_next)
            .ack(self.server_isn.wrapping_add(1))
            .flags(ACK)
    }

    /// Client data starting `offset` bytes into its stream.
    fn client_data(&self, offset: u32, payload: &[u8]) -> Tcp {
        let mut seg = self.ack().flags(ACK | PSH).payload(payload);
        seg.seq = self.client_next.wrapping_add(offset);
        seg
    }

    /// Server data starting `offset` bytes into its stream.
    fn server_data(&self, offset: u32, payload: &[u8]) -> Tcp {
        Tcp::new(self.server, self.client)
            .seq(self.server_isn.wrapping_add(1).wrapping_add(offset))
            .ack(self.client_next)
            .flags(ACK | PSH)
            .payload(payload)
    }

    /// SYN-ACK out, ACK in: the flow is verified.
    fn handshake(&self, k: &Kernel) {
        k.server_sends(&self.syn_ack());
        k.client_sends(&self.ack());
    }
}

/// `frame`, sent by the client of a verified flow, must pass without a
/// verdict and without disturbing the flow: a valid EHLO is flagged after it.
fn assert_ignored_then_flag(k: &mut Kernel, conv: &Conversation, frame: &[u8]) {
    k.pass(INGRESS, frame);
    k.expect_none("a malformed or unfollowable segment");
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(conv, EHLO);
}

/// Runs a frame shorter than the kernel builds test skbs from. 6.18 answers
/// EINVAL without running the program below ETH_HLEN bytes (bpf_test_init),
/// and for IPv4 or IPv6 frames shorter than their fixed IP header; a kernel
/// that does run it must see the program pass it.
fn run_runt(k: &Kernel, program: &str, frame: &[u8]) {
    match k.run(program, frame) {
        Ok(ret) => assert_eq!(ret, TC_ACT_UNSPEC, "{program} must never drop"),
        Err(ProgramError::SyscallError(e)) => {
            assert_eq!(e.io_error.raw_os_error(), Some(libc::EINVAL), "{e:?}");
        }
        Err(e) => panic!("test run of {program} on {} bytes: {e:?}", frame.len()),
    }
}

/// Distinct, recognisable bytes, so a capture from the wrong offset shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'A' + (i % 26) as u8).collect()
}

// The contract.

#[test]
fn payload_after_handshake_is_early_talk() {
    if !privileged("payload_after_handshake_is_early_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.1:40001");
    conv.handshake(&k);
    k.expect_none("handshake alone");
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(&conv, EHLO);
    assert_eq!(k.stat(Stat::FlowsTracked), 1);
    assert_eq!(k.stat(Stat::EarlyTalk), 1);
    // One verdict per flow: more talk and the late greeting add nothing.
    k.client_sends(&conv.client_data(EHLO.len() as u32, b"MAIL FROM:<>\r\n"));
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect_none("a flow already flagged");
}

#[test]
fn payload_on_the_handshake_ack_is_early_talk() {
    if !privileged("payload_on_the_handshake_ack_is_early_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.2:40002");
    k.server_sends(&conv.syn_ack());
    k.client_sends(&conv.ack().flags(ACK | PSH).payload(EHLO));
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn talk_after_a_teaser_line_is_early_talk() {
    if !privileged("talk_after_a_teaser_line_is_early_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.3:40003");
    conv.handshake(&k);
    k.server_sends(&conv.server_data(0, b"220-x\r\n"));
    k.expect_none("a 220- teaser is not a greeting");
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn greeting_split_across_segments_then_silence_is_pass() {
    if !privileged("greeting_split_across_segments_then_silence_is_pass") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.4:40004");
    conv.handshake(&k);
    k.server_sends(&conv.server_data(0, b"22"));
    k.expect_none("half a reply code");
    k.server_sends(&conv.server_data(2, b"0 ready\r\n"));
    k.expect(&conv, Verdict::Pass);
    // A client that waited talks freely afterwards.
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_none("talk after the greeting");
}

/// The kernel reads the server's stream in 64-byte chunks: a greeting whose
/// final line (or its CR LF) lands on every offset around the chunk
/// boundaries is still recognised, and teaser lines as long are not taken
/// for it.
#[test]
fn long_greetings_are_followed_across_read_chunks() {
    if !privileged("long_greetings_are_followed_across_read_chunks") {
        return;
    }
    let mut k = Kernel::load();
    for (n, pad) in (50..80).chain(110..140).chain(1000..1010).enumerate() {
        // "220-aaa...\r\n" then "220 ok\r\n": the final line starts at pad + 6.
        let mut greeting = b"220-".to_vec();
        greeting.extend(std::iter::repeat_n(b'a', pad));
        greeting.extend_from_slice(b"\r\n");
        let teaser_len = greeting.len();
        greeting.extend_from_slice(b"220 ok\r\n");
        let port = 41000 + n;
        let conv = Conversation::v4(&format!("198.51.100.5:{port}"));
        conv.handshake(&k);
        k.server_sends(&conv.server_data(0, &greeting[..teaser_len]));
        k.expect_none(&format!("a {teaser_len}-byte teaser is not a greeting"));
        k.server_sends(&conv.server_data(teaser_len as u32, &greeting[teaser_len..]));
        k.expect(&conv, Verdict::Pass);
        // The same greeting in one segment.
        let conv = Conversation::v4(&format!("198.51.100.6:{port}"));
        conv.handshake(&k);
        k.server_sends(&conv.server_data(0, &greeting));
        k.expect(&conv, Verdict::Pass);
        // Only the teaser, then talk: early.
        let conv = Conversation::v4(&format!("198.51.100.7:{port}"));
        conv.handshake(&k);
        k.server_sends(&conv.server_data(0, &greeting[..teaser_len]));
        k.expect_none("a teaser alone");
        k.client_sends(&conv.client_data(0, EHLO));
        k.expect_early_talk(&conv, EHLO);
    }
}

#[test]
fn client_fin_or_rst_before_greeting_is_quit() {
    if !privileged("client_fin_or_rst_before_greeting_is_quit") {
        return;
    }
    let mut k = Kernel::load();
    for (client, flags) in [
        ("198.51.100.5:40005", ACK | FIN),
        ("198.51.100.5:40006", RST),
    ] {
        let conv = Conversation::v4(client);
        conv.handshake(&k);
        k.client_sends(&conv.ack().flags(flags));
        k.expect(&conv, Verdict::Quit);
    }
    assert_eq!(k.stat(Stat::Quit), 2);
}

#[test]
fn payload_with_wrong_handshake_ack_is_unverified() {
    if !privileged("payload_with_wrong_handshake_ack_is_unverified") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.6:40007");
    k.server_sends(&conv.syn_ack());
    // An off-path forger knows the client's numbers but not the server's ISN.
    let wrong_ack = conv.server_isn.wrapping_add(2);
    k.client_sends(&conv.ack().ack(wrong_ack));
    k.client_sends(&conv.client_data(0, EHLO).ack(wrong_ack));
    k.expect_none("payload on an unverified flow");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 1);
    assert_eq!(k.stat(Stat::FlowsTracked), 0);
}

#[test]
fn out_of_order_data_on_the_handshake_ack_verifies_but_is_not_talk() {
    if !privileged("out_of_order_data_on_the_handshake_ack_verifies_but_is_not_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.6:40008");
    k.server_sends(&conv.syn_ack());
    // In the SYN-ACK's window (tcp_in_window), so Linux completes the
    // handshake, but one byte past C: held out of order, not delivered.
    k.client_sends(&conv.client_data(1, EHLO));
    k.expect_none("payload not continuing the client's sequence");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 1);
    assert_eq!(k.stat(Stat::FlowsTracked), 1);
    // Outside the window: not even the handshake.
    let far = Conversation::v4("198.51.100.6:40036");
    k.server_sends(&far.syn_ack());
    k.client_sends(&far.client_data(70_000, EHLO));
    k.expect_none("outside the SYN-ACK's window");
    assert_eq!(k.stat(Stat::FlowsTracked), 1);
}

#[test]
fn payload_without_handshake_is_unverified() {
    if !privileged("payload_without_handshake_is_unverified") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.7:40009");
    k.client_sends(&conv.ack());
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_none("no SYN-ACK was seen");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 1);
    assert_eq!(k.stat(Stat::Packets), 2);
}

#[test]
fn data_starting_past_the_first_byte_is_held_back_not_talk() {
    if !privileged("data_starting_past_the_first_byte_is_held_back_not_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.8:40010");
    conv.handshake(&k);
    // Out of order (Linux queues it until the gap fills) or out of the
    // window (dropped): nothing reaches the MTA.
    for offset in [1, 1 << 16, 1 << 20, 1 << 31] {
        k.client_sends(&conv.client_data(offset, EHLO));
    }
    k.expect_none("segments after C");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 4);
    // Whatever fills the gap from C is delivered, with what it counts.
    k.client_sends(&conv.client_data(0, b"E"));
    k.expect_early_talk(&conv, b"E");
}

#[test]
fn data_overlapping_the_first_byte_counts_the_part_past_it() {
    if !privileged("data_overlapping_the_first_byte_counts_the_part_past_it") {
        return;
    }
    let mut k = Kernel::load();
    let payload = pattern(1100);
    for (port, before) in [(40034u16, 1usize), (40037, 1000), (40038, 1024)] {
        let conv = Conversation::v4(&format!("198.51.100.8:{port}"));
        conv.handshake(&k);
        // Linux trims the bytes before C and delivers the 25 after it.
        let seg = conv.client_data((before as u32).wrapping_neg(), &payload[..before + 25]);
        k.client_sends(&seg);
        k.expect_early_talk(&conv, &payload[before..before + 25]);
    }
    // Old bytes only (a segment ending at C): a duplicate, dropped.
    let conv = Conversation::v4("198.51.100.8:40039");
    conv.handshake(&k);
    k.client_sends(&conv.client_data(100u32.wrapping_neg(), &payload[..100]));
    k.expect_none("bytes before C only");
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect(&conv, Verdict::Pass);
}

#[test]
fn sequence_numbers_wrapping_past_zero_are_followed() {
    if !privileged("sequence_numbers_wrapping_past_zero_are_followed") {
        return;
    }
    let mut k = Kernel::load();
    let mut patient = Conversation::v4("198.51.100.9:40011");
    patient.server_isn = u32::MAX - 1;
    patient.handshake(&k);
    k.server_sends(&patient.server_data(0, b"22"));
    k.server_sends(&patient.server_data(2, b"0 ready\r\n"));
    k.expect(&patient, Verdict::Pass);

    let mut blind = Conversation::v4("198.51.100.9:40012");
    blind.client_next = u32::MAX - 3;
    blind.handshake(&k);
    // Starting 10 bytes before C, ending after the wrap.
    let mut seg = blind.client_data(0, EHLO);
    seg.seq = blind.client_next.wrapping_sub(10);
    k.client_sends(&seg);
    k.expect_early_talk(&blind, &EHLO[10..]);
}

#[test]
fn allowlisted_client_is_never_flagged() {
    if !privileged("allowlisted_client_is_never_flagged") {
        return;
    }
    let mut k = Kernel::load();
    k.allow("203.0.113.0/24");
    let friend = Conversation::v4("203.0.113.10:40013");
    friend.handshake(&k);
    k.client_sends(&friend.client_data(0, EHLO));
    k.expect_none("an allowlisted client");
    assert_eq!(k.stat(Stat::Allowlisted), 1);
    // The allowlist is a /24, not everything.
    let stranger = Conversation::v4("198.51.100.10:40014");
    stranger.handshake(&k);
    k.client_sends(&stranger.client_data(0, EHLO));
    k.expect_early_talk(&stranger, EHLO);
}

#[test]
fn unwatched_port_is_not_inspected() {
    if !privileged("unwatched_port_is_not_inspected") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::new("198.51.100.11:40015", "192.0.2.25:587");
    conv.handshake(&k);
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_none("port 587 is not watched");
    assert_eq!(k.stat(Stat::Packets), 0);
}

#[test]
fn every_watched_port_slot_is_inspected_and_no_other_port() {
    if !privileged("every_watched_port_slot_is_inspected_and_no_other_port") {
        return;
    }
    // Eight ports fill every slot the kernel compares (four per word).
    let ports = [25, 587, 2525, 10025, 465, 26, 257, 65535];
    let mut k = Kernel::load_with(loader::KernelConfig {
        ports: ports.to_vec(),
        ..Default::default()
    });
    for (i, port) in ports.into_iter().enumerate() {
        let conv = Conversation::new(
            &format!("198.51.100.12:{}", 40100 + i),
            &format!("192.0.2.25:{port}"),
        );
        conv.handshake(&k);
        k.client_sends(&conv.client_data(0, EHLO));
        k.expect_early_talk(&conv, EHLO);
    }
    let inspected = k.stat(Stat::Packets);
    // Neighbours of the watched ports, and ports sharing their bytes.
    for (i, port) in [24, 27, 588, 2524, 256, 1, 65534, 6400]
        .into_iter()
        .enumerate()
    {
        let conv = Conversation::new(
            &format!("198.51.100.12:{}", 40200 + i),
            &format!("192.0.2.25:{port}"),
        );
        conv.handshake(&k);
        k.client_sends(&conv.client_data(0, EHLO));
        k.expect_none("a port not watched");
    }
    assert_eq!(k.stat(Stat::Packets), inspected);
}

#[test]
fn ipv6_payload_after_handshake_is_early_talk() {
    if !privileged("ipv6_payload_after_handshake_is_early_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v6("[2001:db8::1:12]:40016");
    conv.handshake(&k);
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn ipv6_greeting_then_silence_is_pass() {
    if !privileged("ipv6_greeting_then_silence_is_pass") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v6("[2001:db8::1:13]:40017");
    conv.handshake(&k);
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect(&conv, Verdict::Pass);
}

#[test]
fn zero_length_segments_are_not_talk() {
    if !privileged("zero_length_segments_are_not_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.14:40018");
    conv.handshake(&k);
    // Duplicate ACKs and a window update: no payload at all.
    k.client_sends(&conv.ack());
    k.client_sends(&conv.ack().flags(ACK | PSH));
    let mut update = conv.ack();
    update.window = 1024;
    k.client_sends(&update);
    k.expect_none("empty segments");
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect(&conv, Verdict::Pass);
}

#[test]
fn ethernet_padding_is_not_payload() {
    if !privileged("ethernet_padding_is_not_payload") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.15:40019");
    conv.handshake(&k);
    // A bare ACK is 54 bytes; the wire pads it to the 60-byte minimum.
    let mut frame = conv.ack().frame();
    frame.resize(60, 0);
    k.pass(INGRESS, &frame);
    k.expect_none("padding after the IP packet");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 0);
}

#[test]
fn tcp_options_are_not_captured_as_payload() {
    if !privileged("tcp_options_are_not_captured_as_payload") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.16:40020");
    conv.handshake(&k);
    let mut seg = conv.client_data(0, EHLO);
    // NOP, NOP, timestamps: what Linux puts on every segment.
    seg.tcp_options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    k.client_sends(&seg);
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn full_size_payload_is_counted_and_capture_is_capped() {
    if !privileged("full_size_payload_is_counted_and_capture_is_capped") {
        return;
    }
    let mut k = Kernel::load();
    // A full segment at MTU 1500, and the most a linear test skb holds
    // (about 3.7 KB: one page less headroom and skb_shared_info).
    for (client, len) in [("198.51.100.17:40021", 1460), ("198.51.100.17:40022", 3600)] {
        let conv = Conversation::v4(client);
        conv.handshake(&k);
        let payload = pattern(len);
        k.client_sends(&conv.client_data(0, &payload));
        k.expect_early_talk(&conv, &payload);
    }
}

#[test]
fn jumbo_payload_is_counted_where_test_runs_allow_it() {
    if !privileged("jumbo_payload_is_counted_where_test_runs_allow_it") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.17:40035");
    conv.handshake(&k);
    // 8960 bytes: a full segment at MTU 9000. Kernels that only build linear
    // test skbs (6.18 does) refuse a frame over a page with EINVAL.
    let payload = pattern(8960);
    match k.run(INGRESS, &conv.client_data(0, &payload).frame()) {
        Ok(ret) => {
            assert_eq!(ret, TC_ACT_UNSPEC);
            k.expect_early_talk(&conv, &payload);
        }
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("jumbo frame not testable here: this kernel refuses test skbs over a page");
            k.expect_none("a frame the kernel refused");
        }
        Err(e) => panic!("test run of a jumbo frame: {e:?}"),
    }
}

#[test]
fn syn_data_the_server_did_not_take_is_not_talk() {
    if !privileged("syn_data_the_server_did_not_take_is_not_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.18:40023");
    // Fast Open data the SYN-ACK does not acknowledge (no cookie, or TFO
    // off): the server dropped it, and the client must send it again.
    let syn = Tcp::new(conv.client, conv.server)
        .seq(conv.client_next.wrapping_sub(1))
        .flags(SYN)
        .payload(EHLO);
    k.client_sends(&syn);
    k.server_sends(&conv.syn_ack());
    k.client_sends(&syn);
    k.expect_none("data on a SYN");
    // The flow is still waiting for its real handshake ACK.
    k.client_sends(&conv.ack());
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect(&conv, Verdict::Pass);
}

#[test]
fn fast_open_syn_data_the_server_took_is_early_talk_once_verified() {
    if !privileged("fast_open_syn_data_the_server_took_is_early_talk_once_verified") {
        return;
    }
    let mut k = Kernel::load();
    let mut conv = Conversation::v4("198.51.100.18:40040");
    let isn = conv.client_next.wrapping_sub(1);
    let syn = Tcp::new(conv.client, conv.server)
        .seq(isn)
        .flags(SYN)
        .payload(EHLO);
    k.client_sends(&syn);
    // The SYN-ACK acknowledges the data: C = ISN + 1 + len.
    conv.client_next = conv.client_next.wrapping_add(EHLO.len() as u32);
    k.server_sends(&conv.syn_ack());
    k.expect_none("not before the handshake is verified");
    k.client_sends(&conv.ack());
    let r = k.expect(&conv, Verdict::EarlyTalk);
    assert_eq!((r.bytes as usize, &r.payload[..]), (EHLO.len(), EHLO));
    assert_eq!(r.how, spamdelay_common::event::HOW_SYN);
    // A forged SYN with data and no handshake: never a verdict.
    let forged = Conversation::v4("198.51.100.18:40041");
    k.client_sends(
        &Tcp::new(forged.client, forged.server)
            .seq(forged.client_next.wrapping_sub(1))
            .flags(SYN)
            .payload(EHLO),
    );
    let mut acked = forged.syn_ack();
    acked.ack = forged.client_next.wrapping_add(EHLO.len() as u32);
    k.server_sends(&acked);
    k.client_sends(&acked_by_guess(&forged));
    k.expect_none("Fast Open data without a verified handshake");
}

/// An ACK from a forger who guessed the server's ISN wrong.
fn acked_by_guess(conv: &Conversation) -> Tcp {
    conv.ack().ack(conv.server_isn.wrapping_add(12345))
}

// Malformed and adversarial input: never a drop, never a verdict.

#[test]
fn truncated_ethernet_frame_is_harmless() {
    if !privileged("truncated_ethernet_frame_is_harmless") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.19:40024");
    conv.handshake(&k);
    let frame = conv.client_data(0, EHLO).frame();
    for program in [INGRESS, EGRESS] {
        run_runt(&k, program, &frame[..10]);
        run_runt(&k, program, &frame[..ETH_HLEN]);
    }
    k.expect_none("runt frames");
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn truncated_ipv4_header_is_ignored() {
    if !privileged("truncated_ipv4_header_is_ignored") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.20:40025");
    conv.handshake(&k);
    let frame = conv.client_data(0, EHLO).frame();
    run_runt(&k, INGRESS, &frame[..ETH_HLEN + 10]);
    k.expect_none("a frame ending inside the fixed IPv4 header");
    // What the program can be handed: the fixed header whole, but its
    // options (IHL 15: 40 bytes) cut off after 20 bytes.
    let mut seg = conv.client_data(0, EHLO);
    seg.ipv4_options = vec![1; 40];
    let frame = seg.frame();
    assert_ignored_then_flag(&mut k, &conv, &frame[..ETH_HLEN + IPV4_HLEN + 20]);
}

#[test]
fn truncated_tcp_header_is_ignored() {
    if !privileged("truncated_tcp_header_is_ignored") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.21:40026");
    conv.handshake(&k);
    // The IP header still claims the whole segment.
    let frame = conv.client_data(0, EHLO).frame();
    assert_ignored_then_flag(&mut k, &conv, &frame[..ETH_HLEN + IPV4_HLEN + 10]);
}

#[test]
fn ipv4_options_shift_the_tcp_header() {
    if !privileged("ipv4_options_shift_the_tcp_header") {
        return;
    }
    let mut k = Kernel::load();
    for ihl in 6u8..=15 {
        let conv = Conversation::v4(&format!("198.51.100.22:{}", 41000 + u16::from(ihl)));
        // NOPs, so each packet's header is exactly `ihl` words long.
        let options = vec![1; (usize::from(ihl) - 5) * 4];
        let with_options = |mut seg: Tcp| {
            seg.ipv4_options = options.clone();
            seg
        };
        k.server_sends(&with_options(conv.syn_ack()));
        k.client_sends(&with_options(conv.ack()));
        let seg = with_options(conv.client_data(0, EHLO));
        assert_eq!(seg.ip_packet()[0] & 0x0f, ihl);
        k.client_sends(&seg);
        k.expect_early_talk(&conv, EHLO);
    }
}

#[test]
fn ipv4_first_fragment_of_early_data_is_early_talk() {
    if !privileged("ipv4_first_fragment_of_early_data_is_early_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.23:40027");
    conv.handshake(&k);
    // Later fragments hold no TCP header: nothing to judge.
    for (offset, more) in [(185, false), (185, true)] {
        let mut seg = conv.client_data(0, EHLO);
        seg.fragment = Some(Fragment { offset, more });
        k.client_sends(&seg);
    }
    k.expect_none("later fragments");
    // The first one carries the header: in-order data, more to come.
    let mut seg = conv.client_data(0, EHLO);
    seg.fragment = Some(Fragment {
        offset: 0,
        more: true,
    });
    k.client_sends(&seg);
    let r = k.expect(&conv, Verdict::EarlyTalk);
    assert_eq!(r.how, spamdelay_common::event::HOW_FRAGMENT);
    assert_eq!(r.payload, EHLO);
    assert_eq!(k.stat(Stat::Fragments), 1);
}

#[test]
fn ipv6_extension_headers_before_tcp_are_walked() {
    if !privileged("ipv6_extension_headers_before_tcp_are_walked") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v6("[2001:db8::1:24]:40028");
    let with_ext = |mut seg: Tcp| {
        seg.ipv6_ext = vec![
            Ipv6Ext::HopByHop { units: 0 },
            Ipv6Ext::DestOpts { units: 2 },
        ];
        seg
    };
    k.server_sends(&with_ext(conv.syn_ack()));
    k.client_sends(&with_ext(conv.ack()));
    k.client_sends(&with_ext(conv.client_data(0, EHLO)));
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn ipv6_first_fragment_is_judged_and_later_ones_ignored() {
    if !privileged("ipv6_first_fragment_is_judged_and_later_ones_ignored") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v6("[2001:db8::1:25]:40029");
    conv.handshake(&k);
    let fragment = |offset, more| {
        let mut seg = conv.client_data(0, EHLO);
        seg.ipv6_ext = vec![Ipv6Ext::Fragment(Fragment { offset, more })];
        seg
    };
    k.client_sends(&fragment(8, false));
    k.expect_none("a later fragment");
    k.client_sends(&fragment(0, true));
    let r = k.expect(&conv, Verdict::EarlyTalk);
    assert_eq!(r.how, spamdelay_common::event::HOW_FRAGMENT);
}

// The IP layer drops a packet shorter than its header says (ip_rcv_core,
// ip6_rcv_core), so the server never receives such bytes: they must not make
// a verdict, and the length they claim must not reach a report.

#[test]
fn ipv4_total_length_beyond_the_frame_is_ignored() {
    if !privileged("ipv4_total_length_beyond_the_frame_is_ignored") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.26:40030");
    conv.handshake(&k);
    let mut frame = conv.client_data(0, EHLO).frame();
    let total_length = ETH_HLEN + 2;
    frame[total_length..total_length + 2].copy_from_slice(&1500u16.to_be_bytes());
    assert_ignored_then_flag(&mut k, &conv, &frame);
}

#[test]
fn ipv6_payload_length_beyond_the_frame_is_ignored() {
    if !privileged("ipv6_payload_length_beyond_the_frame_is_ignored") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v6("[2001:db8::1:26]:40031");
    conv.handshake(&k);
    let mut frame = conv.client_data(0, EHLO).frame();
    let payload_length = ETH_HLEN + 4;
    frame[payload_length..payload_length + 2].copy_from_slice(&1460u16.to_be_bytes());
    assert_ignored_then_flag(&mut k, &conv, &frame);
}

#[test]
fn tcp_data_offset_below_five_or_past_the_segment_is_ignored() {
    if !privileged("tcp_data_offset_below_five_or_past_the_segment_is_ignored") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.27:40032");
    conv.handshake(&k);
    let doff_at = ETH_HLEN + IPV4_HLEN + 12;
    // 15 words is 60 bytes, past the 20-byte header and 4-byte payload.
    for words in [0u8, 4, 15] {
        let mut frame = conv.client_data(0, b"EHLO").frame();
        frame[doff_at] = words << 4;
        k.pass(INGRESS, &frame);
    }
    k.expect_none("impossible data offsets");
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn ipv6_truncated_extension_header_is_ignored() {
    if !privileged("ipv6_truncated_extension_header_is_ignored") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v6("[2001:db8::1:28]:40033");
    conv.handshake(&k);
    let mut seg = conv.client_data(0, EHLO);
    seg.ipv6_ext = vec![Ipv6Ext::DestOpts { units: 0 }];
    // The frame ends inside the options header.
    let frame = seg.frame();
    assert_ignored_then_flag(&mut k, &conv, &frame[..ETH_HLEN + IPV6_HLEN + 1]);
}

// Following the server's stream, and saying why when it cannot.

/// Collects the kernel's debug records (aya-log) in memory.
#[derive(Default)]
struct Records(std::sync::Mutex<Vec<String>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn gap_in_the_servers_stream_gives_the_flow_up_with_a_debug_record() {
    if !privileged("gap_in_the_servers_stream_gives_the_flow_up_with_a_debug_record") {
        return;
    }
    let mut k = Kernel::load();
    let records: &'static Records = Box::leak(Box::default());
    let mut logger = aya_log::EbpfLogger::init_with_logger(&mut k.ebpf, records as &dyn log::Log)
        .expect("the object has debug records");
    let conv = Conversation::v4("198.51.100.50:40200");
    conv.handshake(&k);
    // The first greeting segment never went by: the scanner cannot know
    // whether what follows completes a greeting, so no verdict at all.
    k.server_sends(&conv.server_data(10, GREETING));
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_none("a flow given up");
    assert_eq!(k.stat(Stat::LostSync), 1);
    logger.flush();
    let got = records.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(
        got,
        ["no verdict for [198.51.100.50]:40200: server stream lost"]
    );
}

// The adversarial corpus: what the server's TCP takes is judged, what it
// drops never is (the acceptance rules are written down in the kernel's
// flow.rs). Each test names the verdict it expects and why.

/// Sends `seg` and expects no verdict; then the flow must still be judged:
/// in-order data from C is EARLY-TALK.
fn dropped_then_talk_is_caught(k: &mut Kernel, conv: &Conversation, seg: &Tcp, why: &str) {
    k.client_sends(seg);
    k.expect_none(why);
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(conv, EHLO);
}

#[test]
fn data_without_the_ack_flag_is_dropped_not_talk() {
    if !privileged("data_without_the_ack_flag_is_dropped_not_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.60:40300");
    conv.handshake(&k);
    // tcp_rcv_established drops a segment with neither ACK, RST nor SYN.
    let seg = conv.client_data(0, EHLO).flags(PSH);
    dropped_then_talk_is_caught(&mut k, &conv, &seg, "no ACK flag");
}

#[test]
fn data_acking_what_the_server_never_sent_is_dropped_not_talk() {
    if !privileged("data_acking_what_the_server_never_sent_is_dropped_not_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.61:40301");
    conv.handshake(&k);
    // Before the greeting the server has sent its SYN only: snd_nxt = ISN+1.
    for ack in [
        conv.server_isn.wrapping_add(2),
        conv.server_isn,
        conv.server_isn.wrapping_add(1 << 30),
    ] {
        k.client_sends(&conv.client_data(0, EHLO).ack(ack));
    }
    k.expect_none("acks outside [ISN+1, snd_nxt]");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 3);
    // Once the server sent a teaser, acking it is fine, past it is not.
    let teaser = b"220-mx.example ESMTP\r\n";
    k.server_sends(&conv.server_data(0, teaser));
    let sent = conv.server_isn.wrapping_add(1 + teaser.len() as u32);
    k.client_sends(&conv.client_data(0, EHLO).ack(sent.wrapping_add(1)));
    k.expect_none("an ack one past the teaser");
    k.client_sends(&conv.client_data(0, EHLO).ack(sent));
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn rst_counts_only_at_exactly_the_next_sequence_number() {
    if !privileged("rst_counts_only_at_exactly_the_next_sequence_number") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.62:40302");
    conv.handshake(&k);
    // In the window but not exact: Linux sends a challenge ACK (RFC 5961).
    for offset in [1u32, 1000, u32::MAX] {
        k.client_sends(
            &conv
                .ack()
                .flags(RST | ACK)
                .seq(conv.client_next.wrapping_add(offset)),
        );
    }
    k.expect_none("inexact RSTs");
    // The connection lives on, and talk on it is caught.
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(&conv, EHLO);
    // Exact, even with a wrong ack or none: the connection is reset.
    let exact = Conversation::v4("198.51.100.62:40303");
    exact.handshake(&k);
    k.client_sends(&exact.ack().ack(12345).flags(RST | ACK));
    k.expect(&exact, Verdict::Quit);
}

#[test]
fn out_of_order_fin_is_no_quit_and_later_talk_is_caught() {
    if !privileged("out_of_order_fin_is_no_quit_and_later_talk_is_caught") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.63:40304");
    conv.handshake(&k);
    // Queued out of order: the connection stays open.
    let fin = conv
        .ack()
        .flags(FIN | ACK)
        .seq(conv.client_next.wrapping_add(100));
    dropped_then_talk_is_caught(&mut k, &conv, &fin, "an out-of-order FIN");
    // In order but with an ack the server never sent: dropped.
    let bad = Conversation::v4("198.51.100.63:40305");
    bad.handshake(&k);
    k.client_sends(
        &bad.ack()
            .flags(FIN | ACK)
            .ack(bad.server_isn.wrapping_add(9)),
    );
    k.expect_none("a FIN with a bad ack");
    k.server_sends(&bad.server_data(0, GREETING));
    k.expect(&bad, Verdict::Pass);
}

#[test]
fn syn_on_a_verified_flow_is_dropped_not_talk() {
    if !privileged("syn_on_a_verified_flow_is_dropped_not_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.64:40306");
    conv.handshake(&k);
    // Any SYN on an established connection draws a challenge ACK.
    let seg = conv.client_data(0, EHLO).flags(SYN | ACK);
    dropped_then_talk_is_caught(&mut k, &conv, &seg, "a SYN with data");
}

#[test]
fn urgent_data_before_the_greeting_is_early_talk() {
    if !privileged("urgent_data_before_the_greeting_is_early_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.65:40307");
    conv.handshake(&k);
    // Out-of-band or inline, the server's TCP took the bytes.
    let mut seg = conv.client_data(0, EHLO).flags(ACK | PSH | URG);
    seg.urgent = 1;
    k.client_sends(&seg);
    k.expect_early_talk(&conv, EHLO);
}

#[test]
fn forged_sweeps_of_the_sequence_space_frame_nobody() {
    if !privileged("forged_sweeps_of_the_sequence_space_frame_nobody") {
        return;
    }
    let mut k = Kernel::load();
    for conv in [
        Conversation::v4("198.51.100.66:40308"),
        Conversation::v6("[2001:db8::66]:40309"),
    ] {
        conv.handshake(&k);
        // An off-path forger knows the client's address and port, not its
        // numbers: one segment per 64 KiB of sequence space covers every
        // window. Data carries a guessed ack; RSTs and FINs need none.
        let guess = conv.server_isn.wrapping_add(0x1234_5678);
        for i in 0..=u16::MAX {
            let seq = u32::from(i) << 16;
            let forged = conv.ack().seq(seq).ack(guess);
            k.client_sends(
                &forged
                    .clone()
                    .flags(ACK | PSH)
                    .payload(&b"MAIL FROM:<>\r\n"[..]),
            );
            k.client_sends(&forged.clone().flags(RST));
            k.client_sends(&forged.flags(FIN | ACK));
        }
        k.expect_none("a forged sweep");
        k.server_sends(&conv.server_data(0, GREETING));
        k.expect(&conv, Verdict::Pass);
    }
}

#[test]
fn overlapping_data_on_the_handshake_ack_verifies_and_is_early_talk() {
    if !privileged("overlapping_data_on_the_handshake_ack_verifies_and_is_early_talk") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.67:40310");
    k.server_sends(&conv.syn_ack());
    let payload = pattern(40);
    let mut seg = conv.ack().flags(ACK | PSH).payload(payload.clone());
    seg.seq = conv.client_next.wrapping_sub(15);
    k.client_sends(&seg);
    k.expect_early_talk(&conv, &payload[15..]);
}

/// A segment split after 8 bytes of TCP header (RFC 1858's tiny fragment):
/// the first fragment has the ports and seq, the one at byte 8 the ack,
/// flags and payload. Linux joins them before TCP sees the segment.
fn tiny_fragments(seg: &Tcp) -> (Vec<u8>, Vec<u8>) {
    let mut seg = seg.clone();
    seg.fragment = Some(Fragment {
        offset: 0,
        more: true,
    });
    let whole = seg.frame();
    let ip = ETH_HLEN;
    let tcp = ip + IPV4_HLEN;
    let mut first = whole[..tcp + 8].to_vec();
    first[ip + 2..ip + 4].copy_from_slice(&((IPV4_HLEN + 8) as u16).to_be_bytes());
    first.resize(60, 0);
    let mut tail = whole[..tcp].to_vec();
    tail.extend_from_slice(&whole[tcp + 8..]);
    let total = (tail.len() - ETH_HLEN) as u16;
    tail[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    // Offset 1 (8 bytes), no more fragments.
    tail[ip + 6..ip + 8].copy_from_slice(&1u16.to_be_bytes());
    (first, tail)
}

#[test]
fn tiny_ipv4_fragments_are_joined_like_the_kernel_joins_them() {
    if !privileged("tiny_ipv4_fragments_are_joined_like_the_kernel_joins_them") {
        return;
    }
    let mut k = Kernel::load();
    // At exactly C the first fragment alone is proof enough (a 32-bit guess).
    let exact = Conversation::v4("198.51.100.68:40311");
    exact.handshake(&k);
    let (first, _) = tiny_fragments(&exact.client_data(0, EHLO));
    k.pass(INGRESS, &first);
    let r = k.expect(&exact, Verdict::EarlyTalk);
    assert_eq!(r.how, spamdelay_common::event::HOW_FRAGMENT);
    // Overlapping C, tail after or before the first: its ack decides.
    let overlap = pattern(40);
    for (port, tail_first) in [(40321u16, false), (40322, true)] {
        let conv = Conversation::v4(&format!("198.51.100.68:{port}"));
        conv.handshake(&k);
        let mut seg = conv.client_data(0, &overlap[..]);
        seg.seq = conv.client_next.wrapping_sub(10);
        let (first, tail) = tiny_fragments(&seg);
        if tail_first {
            k.pass(INGRESS, &tail);
            k.pass(INGRESS, &first);
        } else {
            k.pass(INGRESS, &first);
            k.expect_none("the first half alone, before C");
            k.pass(INGRESS, &tail);
        }
        let r = k.expect(&conv, Verdict::EarlyTalk);
        assert_eq!(r.how, spamdelay_common::event::HOW_FRAGMENT);
    }
    // A forger's halves: a wrong ack in the tail frames nobody.
    let forged = Conversation::v4("198.51.100.68:40323");
    forged.handshake(&k);
    let mut seg = forged
        .client_data(0, &overlap[..])
        .ack(forged.server_isn.wrapping_add(99));
    seg.seq = forged.client_next.wrapping_sub(10);
    let (first, tail) = tiny_fragments(&seg);
    k.pass(INGRESS, &first);
    k.pass(INGRESS, &tail);
    k.expect_none("tiny fragments with a bad ack");
    k.server_sends(&forged.server_data(0, GREETING));
    k.expect(&forged, Verdict::Pass);
    // After C (out of order): not judged, counted.
    let after = Conversation::v4("198.51.100.68:40324");
    after.handshake(&k);
    let (first, _) = tiny_fragments(&after.client_data(8, EHLO));
    k.pass(INGRESS, &first);
    k.expect_none("a tiny fragment after C");
    assert_eq!(k.stat(Stat::Unparsed), 1);
}

#[test]
fn long_ipv6_extension_header_chains_are_walked_to_tcp() {
    if !privileged("long_ipv6_extension_header_chains_are_walked_to_tcp") {
        return;
    }
    let mut k = Kernel::load();
    for (port, n) in [(40312u16, 5usize), (40313, 64)] {
        let conv = Conversation::v6(&format!("[2001:db8::68]:{port}"));
        conv.handshake(&k);
        let mut seg = conv.client_data(0, EHLO);
        seg.ipv6_ext = vec![Ipv6Ext::DestOpts { units: 0 }; n];
        k.client_sends(&seg);
        k.expect_early_talk(&conv, EHLO);
    }
    // Hop-by-hop anywhere but first is not taken by Linux.
    let conv = Conversation::v6("[2001:db8::68]:40314");
    conv.handshake(&k);
    let mut seg = conv.client_data(0, EHLO);
    seg.ipv6_ext = vec![
        Ipv6Ext::DestOpts { units: 0 },
        Ipv6Ext::HopByHop { units: 0 },
    ];
    dropped_then_talk_is_caught(&mut k, &conv, &seg, "a misplaced hop-by-hop header");
}

#[test]
fn vlan_tagged_frames_are_followed() {
    if !privileged("vlan_tagged_frames_are_followed") {
        return;
    }
    let mut k = Kernel::load();
    // 802.1Q, and QinQ (802.1ad outer, 802.1Q inner), left in the frame.
    let tag = |frame: Vec<u8>, tags: &[[u8; 4]]| {
        let mut out = frame[..12].to_vec();
        for t in tags {
            out.extend_from_slice(t);
        }
        out.extend_from_slice(&frame[12..]);
        out
    };
    let dot1q = [0x81, 0x00, 0x00, 0x64];
    let qinq = [[0x88, 0xa8, 0x00, 0x0a], dot1q];
    for (client, tags, v6) in [
        ("198.51.100.69:40315", &[dot1q][..], false),
        ("198.51.100.69:40316", &qinq[..], false),
        ("[2001:db8::69]:40317", &[dot1q][..], true),
    ] {
        let conv = if v6 {
            Conversation::v6(client)
        } else {
            Conversation::v4(client)
        };
        k.pass(EGRESS, &tag(conv.syn_ack().frame(), tags));
        k.pass(INGRESS, &tag(conv.ack().frame(), tags));
        k.pass(INGRESS, &tag(conv.client_data(0, EHLO).frame(), tags));
        k.expect_early_talk(&conv, EHLO);
    }
    let patient = Conversation::v4("198.51.100.69:40318");
    k.pass(EGRESS, &tag(patient.syn_ack().frame(), &[dot1q]));
    k.pass(INGRESS, &tag(patient.ack().frame(), &[dot1q]));
    k.pass(
        EGRESS,
        &tag(patient.server_data(0, GREETING).frame(), &[dot1q]),
    );
    k.expect(&patient, Verdict::Pass);
}

#[test]
fn greeting_in_one_byte_segments_with_retransmissions_is_pass() {
    if !privileged("greeting_in_one_byte_segments_with_retransmissions_is_pass") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.70:40319");
    conv.handshake(&k);
    let greeting = b"220-mx.example\r\n220 ready\r\n";
    for i in 0..greeting.len() - 1 {
        k.server_sends(&conv.server_data(i as u32, &greeting[i..=i]));
        // Each byte again, and an overlapping resend of the last three.
        k.server_sends(&conv.server_data(i as u32, &greeting[i..=i]));
        let from = i.saturating_sub(2);
        k.server_sends(&conv.server_data(from as u32, &greeting[from..=i]));
    }
    k.expect_none("the final line is not complete yet");
    // The last byte rides on an overlapping retransmission.
    let n = greeting.len();
    k.server_sends(&conv.server_data((n - 4) as u32, &greeting[n - 4..]));
    k.expect(&conv, Verdict::Pass);
}

#[test]
fn half_open_floods_never_evict_verified_flows() {
    if !privileged("half_open_floods_never_evict_verified_flows") {
        return;
    }
    let mut k = Kernel::load_with(loader::KernelConfig {
        max_flows: 1024,
        ..Default::default()
    });
    let waiting: Vec<Conversation> = (0..20)
        .map(|i| Conversation::v4(&format!("198.51.100.71:{}", 41000 + i)))
        .collect();
    for conv in &waiting {
        conv.handshake(&k);
    }
    // Forged SYNs answered by the server, and forged RSTs: 5x the table.
    for i in 0..5120u32 {
        let forged = Conversation::v4(&format!("203.0.113.{}:{}", i % 250, 20000 + i / 250));
        k.server_sends(&forged.syn_ack());
        k.client_sends(
            &forged
                .ack()
                .flags(RST)
                .seq(forged.client_next.wrapping_add(7)),
        );
    }
    for conv in &waiting {
        k.server_sends(&conv.server_data(0, GREETING));
    }
    let passes = k
        .reports()
        .iter()
        .filter(|r| r.verdict == Verdict::Pass)
        .count();
    assert_eq!(passes, 20, "every verified flow kept its verdict");
}

#[test]
fn a_new_handshake_on_the_same_ports_starts_afresh() {
    if !privileged("a_new_handshake_on_the_same_ports_starts_afresh") {
        return;
    }
    let mut k = Kernel::load();
    let old = Conversation::v4("198.51.100.72:40320");
    old.handshake(&k);
    k.server_sends(&old.server_data(0, GREETING));
    k.expect(&old, Verdict::Pass);
    // The port is reused for a new connection with new numbers.
    let mut new = Conversation::v4("198.51.100.72:40320");
    new.client_next = 0x7000_0001;
    new.server_isn = 0x4000_0000;
    new.handshake(&k);
    k.client_sends(&new.client_data(0, EHLO));
    k.expect_early_talk(&new, EHLO);
}

/// Flows in the kernel's flow table.
fn flows_followed(k: &Kernel) -> usize {
    let map: aya::maps::HashMap<&MapData, FlowKey, Flow> =
        aya::maps::HashMap::try_from(k.ebpf.map("FLOWS").expect("map FLOWS"))
            .expect("FLOWS is a hash map");
    map.keys().count()
}

/// A passed flow's whole session, then its close: nothing more is judged or
/// counted as unverified (the kernel's fast path for decided flows), every
/// segment is counted once, and the close empties the flow table.
fn decided_flow_then_close(k: &mut Kernel, conv: &Conversation) {
    conv.handshake(k);
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect(conv, Verdict::Pass);
    let g = GREETING.len() as u32;
    let mail = b"MAIL FROM:<a@example.org>\r\n";
    let reply = b"250 2.1.0 Ok\r\n";
    let (mut c, mut s) = (0, g);
    k.client_sends(
        &conv
            .client_data(c, EHLO)
            .ack(conv.server_isn.wrapping_add(1 + s)),
    );
    c += EHLO.len() as u32;
    k.server_sends(
        &conv
            .server_data(s, reply)
            .ack(conv.client_next.wrapping_add(c)),
    );
    s += reply.len() as u32;
    k.client_sends(
        &conv
            .client_data(c, mail)
            .ack(conv.server_isn.wrapping_add(1 + s)),
    );
    c += mail.len() as u32;
    // Empty ACKs both ways.
    let server_ack = Tcp::new(conv.server, conv.client)
        .seq(conv.server_isn.wrapping_add(1 + s))
        .ack(conv.client_next.wrapping_add(c))
        .flags(ACK);
    k.server_sends(&server_ack);
    let client_ack = conv
        .ack()
        .seq(conv.client_next.wrapping_add(c))
        .ack(conv.server_isn.wrapping_add(1 + s));
    k.client_sends(&client_ack);
    k.expect_none("segments of a decided flow");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 0);
    assert_eq!(flows_followed(k), 1, "kept until its close");
    // The server closes; the client's FIN and last ACK come after.
    k.server_sends(&server_ack.clone().flags(ACK | FIN));
    assert_eq!(flows_followed(k), 0, "the close drops the flow");
    k.client_sends(&client_ack.clone().flags(ACK | FIN));
    k.client_sends(&client_ack.ack(conv.server_isn.wrapping_add(2 + s)));
    k.expect_none("the close of a decided flow");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 0);
    assert_eq!(k.stat(Stat::ServerClosed), 0);
    assert_eq!(k.stat(Stat::Packets), 11, "every segment counted once");
}

#[test]
fn a_passed_flows_session_and_close_change_nothing() {
    if !privileged("a_passed_flows_session_and_close_change_nothing") {
        return;
    }
    let mut k = Kernel::load();
    decided_flow_then_close(&mut k, &Conversation::v4("198.51.100.73:40330"));
    let mut k = Kernel::load();
    decided_flow_then_close(&mut k, &Conversation::v6("[2001:db8::73]:40331"));
}

#[test]
fn an_early_talkers_later_segments_change_nothing_and_its_rst_drops_it() {
    if !privileged("an_early_talkers_later_segments_change_nothing_and_its_rst_drops_it") {
        return;
    }
    let mut k = Kernel::load();
    let conv = Conversation::v4("198.51.100.74:40332");
    conv.handshake(&k);
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(&conv, EHLO);
    let c = EHLO.len() as u32;
    k.client_sends(&conv.client_data(c, b"MAIL FROM:<>\r\n"));
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect_none("a flagged flow");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 0);
    assert_eq!(flows_followed(&k), 1);
    k.client_sends(
        &conv
            .ack()
            .flags(RST)
            .seq(conv.client_next.wrapping_add(c + 14)),
    );
    assert_eq!(flows_followed(&k), 0, "the client's RST drops the flow");
    // A new connection on the same ports is followed afresh.
    let mut again = Conversation::v4("198.51.100.74:40332");
    again.client_next = 0x7000_0001;
    again.server_isn = 0x4000_0000;
    again.handshake(&k);
    k.client_sends(&again.client_data(0, EHLO));
    k.expect_early_talk(&again, EHLO);
}

#[test]
fn a_new_handshake_while_the_old_flow_is_still_followed_starts_afresh() {
    if !privileged("a_new_handshake_while_the_old_flow_is_still_followed_starts_afresh") {
        return;
    }
    // A decided flow whose close was never seen: the new connection's
    // SYN-ACK must end it, or its segments would be taken for the old one's.
    let mut k = Kernel::load();
    let old = Conversation::v6("[2001:db8::75]:40333");
    old.handshake(&k);
    k.server_sends(&old.server_data(0, GREETING));
    k.expect(&old, Verdict::Pass);
    let mut new = Conversation::v6("[2001:db8::75]:40333");
    new.client_next = 0x7000_0001;
    new.server_isn = 0x4000_0000;
    new.handshake(&k);
    k.client_sends(&new.client_data(0, EHLO));
    k.expect_early_talk(&new, EHLO);
    assert_eq!(flows_followed(&k), 1, "the old flow made room for the new");
}

/// Handshakes waiting in `HALF_OPEN` (those whose slot was taken).
fn handshakes_mapped(k: &Kernel) -> usize {
    let map: aya::maps::HashMap<&MapData, FlowKey, spamdelay_common::flow::HalfOpen> =
        aya::maps::HashMap::try_from(k.ebpf.map("HALF_OPEN").expect("map HALF_OPEN"))
            .expect("HALF_OPEN is a hash map");
    map.keys().count()
}

#[test]
fn more_handshakes_than_slots_all_verify() {
    if !privileged("more_handshakes_than_slots_all_verify") {
        return;
    }
    // 3,000 handshakes in progress at once, three times the slots: most
    // find a slot, those whose slot is taken wait in HALF_OPEN. Each is
    // verified with its own numbers, wherever it waited.
    let mut k = Kernel::load();
    let convs: Vec<Conversation> = (0..3000u32)
        .map(|i| {
            let mut c = if i % 2 == 0 {
                Conversation::v4(&format!("198.51.100.{}:{}", 80 + i % 20, 30000 + i))
            } else {
                Conversation::v6(&format!("[2001:db8::7:{:x}]:{}", i % 20, 30000 + i))
            };
            c.client_next = 0x1000_0001u32.wrapping_add(i.wrapping_mul(0x9e37_79b9));
            c.server_isn = 0xdead_0000u32.wrapping_add(i.wrapping_mul(0x85eb_ca6b));
            c
        })
        .collect();
    for conv in &convs {
        k.server_sends(&conv.syn_ack());
    }
    let mapped = handshakes_mapped(&k);
    assert!(
        mapped > 0 && mapped < convs.len(),
        "both places in use: {mapped} of {} in HALF_OPEN",
        convs.len()
    );
    // A guessed ACK verifies none of them.
    for conv in &convs {
        let mut forged = conv.client_data(0, EHLO);
        forged.ack = conv.server_isn.wrapping_add(2);
        k.client_sends(&forged);
    }
    k.expect_none("forged handshake ACKs");
    for conv in &convs {
        k.client_sends(&conv.client_data(0, EHLO));
    }
    let reports = k.reports();
    let talkers = reports
        .iter()
        .filter(|r| r.verdict == Verdict::EarlyTalk)
        .count();
    assert_eq!(talkers, convs.len(), "every handshake was verified");
    assert_eq!(handshakes_mapped(&k), 0, "every handshake ended");
}

#[test]
fn a_resent_syn_ack_with_new_numbers_replaces_the_handshake() {
    if !privileged("a_resent_syn_ack_with_new_numbers_replaces_the_handshake") {
        return;
    }
    let mut k = Kernel::load();
    let old = Conversation::v4("198.51.100.76:40334");
    let mut new = Conversation::v4("198.51.100.76:40334");
    new.client_next = 0x7000_0001;
    new.server_isn = 0x4000_0000;
    k.server_sends(&old.syn_ack());
    k.server_sends(&new.syn_ack());
    // The first SYN-ACK's numbers verify nothing any more.
    k.client_sends(&old.client_data(0, EHLO));
    k.expect_none("an ACK of the replaced SYN-ACK");
    assert_eq!(k.stat(Stat::UnverifiedPayload), 1);
    k.client_sends(&new.client_data(0, EHLO));
    k.expect_early_talk(&new, EHLO);
}

/// A pin directory of this test process, removed when dropped.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_handshake_begun_under_one_program_is_verified_by_its_successor() {
    if !privileged("a_handshake_begun_under_one_program_is_verified_by_its_successor") {
        return;
    }
    // An upgrade between a SYN-ACK and its ACK: the handshake slots are
    // pinned with their seed, so the new program finds what the old wrote.
    let pins = Pins(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/spamdelay-test-handover-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&pins.0);
    let config = || loader::KernelConfig {
        pin_dir: Some(pins.0.clone()),
        ..Default::default()
    };
    let conv = Conversation::v4("198.51.100.77:40335");
    {
        let old = Kernel::load_with(config());
        old.server_sends(&conv.syn_ack());
    }
    let mut new = Kernel::load_with(config());
    assert_eq!(
        handshakes_mapped(&new),
        0,
        "the handshake waits in its slot"
    );
    new.client_sends(&conv.client_data(0, EHLO));
    new.expect_early_talk(&conv, EHLO);
}

// PIPECONNECT by history: early talk is forgiven only to a client that
// passed here before, and only where the MTA advertises PIPECONNECT.

const OPENING: &[u8] =
    b"EHLO c.example\r\nMAIL FROM:<a@c.example> SIZE=1359\r\nRCPT TO:<b@test.example>\r\nBDAT 336 LAST\r\n";

fn load_pipeconnect(pipeconnect: Pipeconnect) -> Kernel {
    Kernel::load_with(loader::KernelConfig {
        pipeconnect,
        ..Default::default()
    })
}

/// A client from `ip` that waits for the greeting: PASS.
fn passes(k: &mut Kernel, ip: &str, port: u16) {
    let conv = Conversation::v4(&format!("{ip}:{port}"));
    conv.handshake(k);
    k.server_sends(&conv.server_data(0, GREETING));
    k.expect(&conv, Verdict::Pass);
}

#[test]
fn early_talk_from_a_client_that_passed_before_is_pipeconnect() {
    if !privileged("early_talk_from_a_client_that_passed_before_is_pipeconnect") {
        return;
    }
    let mut k = load_pipeconnect(Pipeconnect::All);
    // First contact: a blind sender, byte for byte a PIPECONNECT opening.
    let first = Conversation::v4("198.51.100.80:40400");
    first.handshake(&k);
    k.client_sends(&first.client_data(0, OPENING));
    k.expect_early_talk(&first, OPENING);
    // A client that waited once may pipe its opening next time.
    passes(&mut k, "198.51.100.81", 40401);
    let again = Conversation::v4("198.51.100.81:40402");
    again.handshake(&k);
    k.client_sends(&again.client_data(0, OPENING));
    let r = k.expect(&again, Verdict::Pipeconnect);
    assert_eq!(r.bytes as usize, OPENING.len());
    let first_pass = r.passed_at.expect("when it passed");
    assert_eq!(k.stat(Stat::Pipeconnect), 1);
    // Piping again renews its standing: the pass now dates from the pipe.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let later = Conversation::v4("198.51.100.81:40404");
    later.handshake(&k);
    k.client_sends(&later.client_data(0, OPENING));
    let r = k.expect(&later, Verdict::Pipeconnect);
    assert!(r.passed_at.expect("when it passed") > first_pass, "{r:?}");
    // The same in a Fast Open SYN.
    let mut tfo = Conversation::v4("198.51.100.81:40403");
    let isn = tfo.client_next.wrapping_sub(1);
    k.client_sends(
        &Tcp::new(tfo.client, tfo.server)
            .seq(isn)
            .flags(SYN)
            .payload(OPENING),
    );
    tfo.client_next = tfo.client_next.wrapping_add(OPENING.len() as u32);
    tfo.handshake(&k);
    let r = k.expect(&tfo, Verdict::Pipeconnect);
    assert_eq!(r.how, spamdelay_common::event::HOW_SYN);
}

#[test]
fn passing_before_forgives_nothing_without_pipeconnect() {
    if !privileged("passing_before_forgives_nothing_without_pipeconnect") {
        return;
    }
    let mut k = Kernel::load();
    passes(&mut k, "198.51.100.82", 40410);
    let conv = Conversation::v4("198.51.100.82:40411");
    conv.handshake(&k);
    k.client_sends(&conv.client_data(0, OPENING));
    k.expect_early_talk(&conv, OPENING);
}

#[test]
fn pipeconnect_host_lists_limit_the_exemption() {
    if !privileged("pipeconnect_host_lists_limit_the_exemption") {
        return;
    }
    let net = |s: &str| s.parse::<Cidr>().expect("a test CIDR");
    let mut k = load_pipeconnect(Pipeconnect::Hosts(vec![
        (net("198.51.100.0/24"), true),
        (net("198.51.100.83"), false),
    ]));
    for (ip, verdict) in [
        ("198.51.100.84", Verdict::Pipeconnect),
        ("198.51.100.83", Verdict::EarlyTalk),
        ("203.0.113.84", Verdict::EarlyTalk),
    ] {
        passes(&mut k, ip, 40420);
        let conv = Conversation::v4(&format!("{ip}:40421"));
        conv.handshake(&k);
        k.client_sends(&conv.client_data(0, OPENING));
        k.expect(&conv, verdict);
    }
}

#[test]
fn passes_expire_after_the_ttl_and_restored_ones_count() {
    if !privileged("passes_expire_after_the_ttl_and_restored_ones_count") {
        return;
    }
    let mut k = Kernel::load_with(loader::KernelConfig {
        pipeconnect: Pipeconnect::All,
        pass_ttl: std::time::Duration::from_millis(300),
        ..Default::default()
    });
    passes(&mut k, "198.51.100.85", 40430);
    std::thread::sleep(std::time::Duration::from_millis(400));
    let late = Conversation::v4("198.51.100.85:40431");
    late.handshake(&k);
    k.client_sends(&late.client_data(0, OPENING));
    k.expect_early_talk(&late, OPENING);
    // A pass the daemon restores (from before a restart) counts at once.
    let expires = spamdelay::clock::boot_ns() + 60_000_000_000;
    let ip = "198.51.100.86".parse().expect("a test address");
    loader::restore_passers(&mut k.ebpf, [(ip, expires)].into_iter()).expect("restoring");
    let conv = Conversation::v4("198.51.100.86:40432");
    conv.handshake(&k);
    k.client_sends(&conv.client_data(0, OPENING));
    k.expect(&conv, Verdict::Pipeconnect);
}

// Benign probes: exactly the probe is a PROBE; anything more is an offence.

const PROBE: &[u8] = b"EHLO we-guess.mozilla.org\r\n";

#[test]
fn exact_benign_probe_is_probe_and_more_is_early_talk() {
    if !privileged("exact_benign_probe_is_probe_and_more_is_early_talk") {
        return;
    }
    let mut k = Kernel::load_with(loader::KernelConfig {
        probes: vec![PROBE.to_vec()],
        ..Default::default()
    });
    // Thunderbird: the probe, the greeting, QUIT. Not a pass either.
    let tb = Conversation::v4("198.51.100.90:40500");
    tb.handshake(&k);
    k.client_sends(&tb.client_data(0, PROBE));
    let r = k.expect(&tb, Verdict::Probe);
    assert_eq!(r.payload, PROBE);
    k.server_sends(&tb.server_data(0, GREETING));
    k.expect_none("a probed flow's greeting is no PASS");
    // The probe, then MAIL before the greeting.
    let sneaky = Conversation::v4("198.51.100.91:40501");
    sneaky.handshake(&k);
    k.client_sends(&sneaky.client_data(0, PROBE));
    k.expect(&sneaky, Verdict::Probe);
    let mail = b"MAIL FROM:<spam@example.com>\r\n";
    k.client_sends(&sneaky.client_data(PROBE.len() as u32, mail));
    k.expect_early_talk(&sneaky, mail);
    // The probe and MAIL in one segment, or a near miss.
    let mut both = PROBE.to_vec();
    both.extend_from_slice(mail);
    for (port, payload) in [(40502, &both[..]), (40503, b"EHLO we-guess.mozilla.org\n")] {
        let conv = Conversation::v4(&format!("198.51.100.92:{port}"));
        conv.handshake(&k);
        k.client_sends(&conv.client_data(0, payload));
        k.expect_early_talk(&conv, payload);
    }
    assert_eq!(k.stat(Stat::Probe), 2);
}

// The bridge block: from an EARLY-TALK verdict on, the talker's new SYNs
// are dropped in the kernel for the bridge time, and nothing else is.

fn load_bridge(bridge_time: std::time::Duration) -> Kernel {
    Kernel::load_with(loader::KernelConfig {
        bridge_time,
        pipeconnect: Pipeconnect::All,
        probes: vec![PROBE.to_vec()],
        ..Default::default()
    })
}

/// A new connection's SYN from `client`.
fn syn(client: &str) -> Vec<u8> {
    let conv = Conversation::v4(client);
    Tcp::new(conv.client, conv.server)
        .seq(conv.client_next.wrapping_sub(1))
        .flags(SYN)
        .frame()
}

/// `conv` talks before the greeting: EARLY-TALK.
fn talks_early(k: &mut Kernel, conv: &Conversation) {
    conv.handshake(k);
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_early_talk(conv, EHLO);
}

#[test]
fn an_early_talkers_next_syn_is_dropped_by_the_bridge() {
    if !privileged("an_early_talkers_next_syn_is_dropped_by_the_bridge") {
        return;
    }
    let mut k = load_bridge(std::time::Duration::from_secs(10));
    let conv = Conversation::v4("198.51.100.100:40600");
    // Before any offence its SYNs pass.
    k.pass(INGRESS, &syn("198.51.100.100:40599"));
    talks_early(&mut k, &conv);
    k.dropped(INGRESS, &syn("198.51.100.100:40601"));
    k.dropped(INGRESS, &syn("198.51.100.100:40602"));
    assert_eq!(k.stat(Stat::BridgeBlocked), 2);
    // Only new SYNs: the flagged flow's own segments still pass.
    k.client_sends(&conv.client_data(EHLO.len() as u32, b"MAIL FROM:<>\r\n"));
    k.client_sends(&conv.ack().flags(ACK | FIN).seq(conv.client_next + 100));
    // Another client, and the server's answers, pass.
    k.pass(INGRESS, &syn("198.51.100.101:40603"));
    let other = Conversation::v4("198.51.100.101:40603");
    k.server_sends(&other.syn_ack());
    k.expect_none("nothing else is judged");
    assert_eq!(k.stat(Stat::BridgeBlocked), 2);
    // IPv6 alike.
    let six = Conversation::v6("[2001:db8::100]:40604");
    talks_early(&mut k, &six);
    let next = Conversation::v6("[2001:db8::100]:40605");
    k.dropped(
        INGRESS,
        &Tcp::new(next.client, next.server)
            .seq(next.client_next.wrapping_sub(1))
            .flags(SYN)
            .frame(),
    );
    assert_eq!(k.stat(Stat::BridgeBlocked), 3);
}

#[test]
fn without_a_bridge_time_nothing_is_dropped() {
    if !privileged("without_a_bridge_time_nothing_is_dropped") {
        return;
    }
    let mut k = load_bridge(std::time::Duration::ZERO);
    talks_early(&mut k, &Conversation::v4("198.51.100.102:40610"));
    k.pass(INGRESS, &syn("198.51.100.102:40611"));
    assert_eq!(k.stat(Stat::BridgeBlocked), 0);
}

#[test]
fn the_bridge_expires_after_the_bridge_time() {
    if !privileged("the_bridge_expires_after_the_bridge_time") {
        return;
    }
    let mut k = load_bridge(std::time::Duration::from_millis(300));
    talks_early(&mut k, &Conversation::v4("198.51.100.103:40620"));
    k.dropped(INGRESS, &syn("198.51.100.103:40621"));
    std::thread::sleep(std::time::Duration::from_millis(400));
    k.pass(INGRESS, &syn("198.51.100.103:40622"));
    k.pass(INGRESS, &syn("198.51.100.103:40623"));
    assert_eq!(k.stat(Stat::BridgeBlocked), 1);
}

#[test]
fn pipeconnect_probe_and_quit_never_bridge() {
    if !privileged("pipeconnect_probe_and_quit_never_bridge") {
        return;
    }
    let mut k = load_bridge(std::time::Duration::from_secs(10));
    // PIPECONNECT: forgiven talk.
    passes(&mut k, "198.51.100.104", 40630);
    let pipe = Conversation::v4("198.51.100.104:40631");
    pipe.handshake(&k);
    k.client_sends(&pipe.client_data(0, OPENING));
    k.expect(&pipe, Verdict::Pipeconnect);
    k.pass(INGRESS, &syn("198.51.100.104:40632"));
    // PROBE: Thunderbird's account setup, then its QUIT.
    let probe = Conversation::v4("198.51.100.105:40633");
    probe.handshake(&k);
    k.client_sends(&probe.client_data(0, PROBE));
    k.expect(&probe, Verdict::Probe);
    k.pass(INGRESS, &syn("198.51.100.105:40634"));
    // QUIT: a hang-up before the greeting.
    let quit = Conversation::v4("198.51.100.106:40635");
    quit.handshake(&k);
    k.client_sends(&quit.ack().flags(ACK | FIN));
    k.expect(&quit, Verdict::Quit);
    k.pass(INGRESS, &syn("198.51.100.106:40636"));
    assert_eq!(k.stat(Stat::BridgeBlocked), 0);
}

#[test]
fn allowlisted_clients_are_never_bridged() {
    if !privileged("allowlisted_clients_are_never_bridged") {
        return;
    }
    let mut k = load_bridge(std::time::Duration::from_secs(10));
    k.allow("198.51.100.107/32");
    let conv = Conversation::v4("198.51.100.107:40640");
    conv.handshake(&k);
    k.client_sends(&conv.client_data(0, EHLO));
    k.expect_none("an allowlisted client is never judged");
    k.pass(INGRESS, &syn("198.51.100.107:40641"));
    assert_eq!(k.stat(Stat::BridgeBlocked), 0);
}

#[test]
fn the_bridge_entry_can_be_lifted_by_id() {
    if !privileged("the_bridge_entry_can_be_lifted_by_id") {
        return;
    }
    let mut k = load_bridge(std::time::Duration::from_secs(10));
    talks_early(&mut k, &Conversation::v4("198.51.100.108:40650"));
    talks_early(&mut k, &Conversation::v4("198.51.100.109:40651"));
    let id = loader::bridge_map_id(&k.ebpf).expect("the bridge map's id");
    let lifted = loader::unbridge(
        loader::BridgeMap::Id(id),
        &"198.51.100.108/32".parse().expect("a test CIDR"),
    )
    .expect("lifting the bridge");
    assert_eq!(
        lifted,
        vec!["198.51.100.108".parse::<std::net::IpAddr>().unwrap()]
    );
    k.pass(INGRESS, &syn("198.51.100.108:40652"));
    k.dropped(INGRESS, &syn("198.51.100.109:40653"));
}
