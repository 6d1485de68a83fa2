//! Measurement 1, broken down: what each segment of an SMTP session costs
//! the kernel program, side by side with the empty one. BPF_PROG_TEST_RUN
//! runs each program once per crafted frame; the medians of many sessions
//! (each its own flow) show where a session's cost goes, which the live
//! per-hook totals cannot.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use serde_json::{Value, json};
use spamdelay::loader::{self, EGRESS, INGRESS};
use spamdelay_tests::{
    bench::{EMPTY_PROGRAM, percentile, sorted},
    packet::{ACK, FIN, PSH, SYN, Tcp},
};

const GREETING: &[u8] = b"220 mx.example.test ESMTP\r\n";
const EHLO: &[u8] = b"EHLO client.example\r\n";
const REPLY: &[u8] = b"250 mx.example.test\r\n";

/// The segments of a short session, in order, and which hook sees each.
const SEGMENTS: [&str; 10] = [
    "client SYN",
    "server SYN-ACK",
    "client ACK (verifies)",
    "server greeting (PASS)",
    "client EHLO",
    "server reply",
    "client ACK",
    "server FIN",
    "client FIN",
    "server last ACK",
];

/// Session `i`: its own client port and sequence numbers.
fn session(i: u32) -> [(&'static str, Tcp); 10] {
    let client = SocketAddr::from((
        [198, 51, 100, 10 + (i % 50) as u8],
        20000 + (i % 40000) as u16,
    ));
    let server = SocketAddr::from(([192, 0, 2, 25], 25));
    let c = 0x1000_0001u32.wrapping_add(i.wrapping_mul(0x9e37_79b9));
    let s = 0xdead_0000u32.wrapping_add(i.wrapping_mul(0x85eb_ca6b));
    let (g, e, r) = (GREETING.len() as u32, EHLO.len() as u32, REPLY.len() as u32);
    let from_client = |seq: u32, ack: u32, flags: u8| {
        Tcp::new(client, server)
            .seq(c.wrapping_add(seq))
            .ack(s.wrapping_add(1 + ack))
            .flags(flags)
    };
    let from_server = |seq: u32, ack: u32, flags: u8| {
        Tcp::new(server, client)
            .seq(s.wrapping_add(1 + seq))
            .ack(c.wrapping_add(ack))
            .flags(flags)
    };
    [
        (
            INGRESS,
            Tcp::new(client, server).seq(c.wrapping_sub(1)).flags(SYN),
        ),
        (
            EGRESS,
            Tcp::new(server, client).seq(s).ack(c).flags(SYN | ACK),
        ),
        (INGRESS, from_client(0, 0, ACK)),
        (EGRESS, from_server(0, 0, ACK | PSH).payload(GREETING)),
        (INGRESS, from_client(0, g, ACK | PSH).payload(EHLO)),
        (EGRESS, from_server(g, e, ACK | PSH).payload(REPLY)),
        (INGRESS, from_client(e, g + r, ACK)),
        (EGRESS, from_server(g + r, e, ACK | FIN)),
        (INGRESS, from_client(e, g + r + 1, ACK | FIN)),
        (EGRESS, from_server(g + r + 1, e + 1, ACK)),
    ]
}

fn classifier<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a SchedClassifier> {
    ebpf.program(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()
        .with_context(|| format!("{name} is not a tc classifier"))
}

/// One run of `program` on `frame`, in ns as the kernel timed it.
fn run(program: &SchedClassifier, frame: &[u8]) -> Result<f64> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::new()
    };
    let out = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok(out.duration.as_nanos() as f64)
}

fn median(v: &[f64]) -> f64 {
    percentile(&sorted(v), 50.0)
}

/// Per segment, the median ns of spamdelay's program and of the empty one
/// over `sessions` sessions: a note for the report and its detail.
pub(crate) fn kernel_segments(sessions: u32) -> Result<(String, Value)> {
    let mut ebpf = loader::load(&loader::KernelConfig::default())?;
    {
        let empty: &mut SchedClassifier = ebpf
            .program_mut(EMPTY_PROGRAM)
            .with_context(|| format!("program {EMPTY_PROGRAM} missing"))?
            .try_into()
            .context("the empty program is not a tc classifier")?;
        empty.load().context("loading the empty program")?;
    }
    // PASS verdicts are drained every 1,000 sessions, long before the
    // 1 MiB ring buffer fills (about 7,700).
    let mut events = loader::take_events(&mut ebpf)?;
    let empty = classifier(&ebpf, EMPTY_PROGRAM)?;
    let mut samples = vec![(Vec::new(), Vec::new()); SEGMENTS.len()];
    for i in 0..sessions {
        for (j, (hook, seg)) in session(i).iter().enumerate() {
            let frame = seg.frame();
            samples[j].0.push(run(classifier(&ebpf, hook)?, &frame)?);
            samples[j].1.push(run(empty, &frame)?);
        }
        if i % 1000 == 999 {
            spamdelay::events::drain(&mut events);
        }
    }
    // Bulk TCP, not a watched port: the first look and out.
    let bulk = Tcp::new(
        SocketAddr::from(([198, 51, 100, 10], 40000)),
        SocketAddr::from(([192, 0, 2, 25], 5201)),
    )
    .seq(1)
    .ack(1)
    .flags(ACK)
    .payload(vec![0u8; 1400])
    .frame();
    let (mut bulk_a, mut bulk_b) = (Vec::new(), Vec::new());
    for _ in 0..sessions {
        bulk_a.push(run(classifier(&ebpf, INGRESS)?, &bulk)?);
        bulk_b.push(run(empty, &bulk)?);
    }
    let (bulk_a, bulk_b) = (median(&bulk_a), median(&bulk_b));
    let mut rows = Vec::new();
    let (mut a, mut b) = (0.0, 0.0);
    let mut parts = Vec::new();
    for (name, (sa, sb)) in SEGMENTS.iter().zip(&samples) {
        let (ma, mb) = (median(sa), median(sb));
        a += ma;
        b += mb;
        parts.push(format!("{name} {ma:.0}/{mb:.0}"));
        rows.push(json!({"segment": name, "spamdelay_ns": ma, "empty_ns": mb}));
    }
    let note = format!(
        "kernel cost by segment (BPF_PROG_TEST_RUN, packet data in cache, median ns of {sessions} sessions, spamdelay/empty): {}; a session {a:.0} vs {b:.0} ns ({:.2}×); a bulk TCP segment (port 5201) {bulk_a:.0}/{bulk_b:.0}",
        parts.join(", "),
        a / b
    );
    let detail = json!({"sessions": sessions, "segments": rows, "ratio": a / b,
        "bulk_ns": bulk_a, "bulk_empty_ns": bulk_b});
    Ok((note, detail))
}
