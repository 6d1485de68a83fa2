//! The per-flow state machine: handshake verification on the server's SYN-ACK
//! and the client's ACK, then one verdict (EARLY-TALK, QUIT, PASS) per flow.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use spamdelay_common::{
    Event, FAMILY_V4, Flow, FlowKey, PAYLOAD_CAPTURE, Stat, Verdict,
    flow::{FLAG_EARLY_EHLO, STATE_DONE, STATE_GREETING, STATE_HANDSHAKE},
};

use crate::{
    greeting::is_one_ehlo_line,
    greeting::{Scan, scan_greeting},
    maps::{ALLOW_V4, ALLOW_V6, EVENTS, FLOWS, count, pipeconnect},
    parse::{Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    trace::{GiveUp, given_up},
};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// How far past the client's first byte a segment may start and still be
/// believed. Before the greeting an honest client has sent next to nothing,
/// so an off-path forger must guess the sequence number to within this.
const CLIENT_SEQ_WINDOW: u32 = 1 << 16;

fn key(client: &[u8; 16], server: &[u8; 16], cport: u16, sport: u16, family: u8) -> FlowKey {
    FlowKey {
        client: *client,
        server: *server,
        client_port: cport,
        server_port: sport,
        family,
        _pad: [0; 3],
    }
}

/// A segment leaving the server (tc egress).
#[inline(always)]
pub fn from_server(ctx: &TcContext, seg: &Segment) {
    count(Stat::Packets);
    let key = key(&seg.dst, &seg.src, seg.dport, seg.sport, seg.family);
    if seg.has(TCP_SYN) {
        if seg.has(TCP_ACK) {
            syn_ack(ctx, &key, seg);
        }
        return;
    }
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        return;
    };
    let flow = unsafe { &mut *flow };
    let closing = seg.has(TCP_FIN) || seg.has(TCP_RST);
    if flow.state == STATE_GREETING && seg.payload_len > 0 {
        match scan_greeting(ctx, seg, flow) {
            Scan::Complete => {
                emit(ctx, &key, flow, Verdict::Pass, None);
                flow.state = STATE_DONE;
            }
            Scan::Incomplete => {}
            Scan::LostSync => {
                count(Stat::LostSync);
                given_up(ctx, &key, GiveUp::LostSync);
                flow.state = STATE_DONE;
            }
        }
    }
    if closing {
        if flow.state != STATE_DONE {
            count(Stat::ServerClosed);
        }
        let _ = FLOWS.remove(&key);
    }
}

/// The server answers a SYN: a flow starts (or a retransmitted SYN-ACK repeats).
#[inline(always)]
fn syn_ack(ctx: &TcContext, key: &FlowKey, seg: &Segment) {
    if let Some(old) = FLOWS.get_ptr(key) {
        let old = unsafe { &*old };
        if old.server_isn == seg.seq && old.state != STATE_HANDSHAKE {
            return;
        }
    }
    let state = if allowlisted(key) {
        count(Stat::Allowlisted);
        STATE_DONE
    } else {
        STATE_HANDSHAKE
    };
    let flow = Flow {
        verified_ns: 0,
        server_isn: seg.seq,
        client_next: seg.ack,
        server_next: seg.seq.wrapping_add(1),
        state,
        flags: 0,
        scanner: Default::default(),
    };
    if FLOWS.insert(key, &flow, 0).is_err() {
        count(Stat::FlowInsertFailed);
        given_up(ctx, key, GiveUp::TableFull);
    }
}

#[inline(always)]
fn allowlisted(key: &FlowKey) -> bool {
    if key.family == FAMILY_V4 {
        let addr = [key.client[0], key.client[1], key.client[2], key.client[3]];
        ALLOW_V4
            .get(aya_ebpf::maps::lpm_trie::Key::new(32, addr))
            .is_some()
    } else {
        ALLOW_V6
            .get(aya_ebpf::maps::lpm_trie::Key::new(128, key.client))
            .is_some()
    }
}

/// A segment arriving from the client (tc ingress).
#[inline(always)]
pub fn from_client(ctx: &TcContext, seg: &Segment) {
    count(Stat::Packets);
    let key = key(&seg.src, &seg.dst, seg.sport, seg.dport, seg.family);
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        if seg.payload_len > 0 {
            count(Stat::UnverifiedPayload);
        }
        return;
    };
    let flow = unsafe { &mut *flow };
    let closing = seg.has(TCP_FIN) || seg.has(TCP_RST);

    if flow.state == STATE_HANDSHAKE {
        // Verified only by the ACK that completes this very handshake: it
        // acknowledges the server's ISN and continues the client's sequence.
        let verifies = seg.has(TCP_ACK)
            && !seg.has(TCP_SYN)
            && !seg.has(TCP_RST)
            && seg.ack == flow.server_isn.wrapping_add(1)
            && seg.seq == flow.client_next;
        if !verifies {
            if seg.payload_len > 0 {
                count(Stat::UnverifiedPayload);
            }
            return;
        }
        flow.state = STATE_GREETING;
        flow.verified_ns = unsafe { bpf_ktime_get_ns() };
        count(Stat::FlowsTracked);
    }

    if flow.state == STATE_GREETING {
        // Offset of this segment from the client's first byte: in [0, window).
        let believable = seg.seq.wrapping_sub(flow.client_next) < CLIENT_SEQ_WINDOW;
        if !believable {
            if seg.payload_len > 0 {
                count(Stat::UnverifiedPayload);
            }
            return;
        }
        if seg.payload_len > 0 && !seg.has(TCP_RST) {
            let first_bytes = seg.seq == flow.client_next && flow.flags & FLAG_EARLY_EHLO == 0;
            if pipeconnect() && first_bytes && is_one_ehlo_line(ctx, seg) {
                // Exim's PIPECONNECT: the EHLO may go ahead of the banner.
                // Later client bytes are measured from its end, so its
                // retransmission is never taken for more talk.
                flow.flags |= FLAG_EARLY_EHLO;
                flow.client_next = seg.seq.wrapping_add(seg.payload_len);
                emit(ctx, &key, flow, Verdict::EarlyEhlo, Some(seg));
            } else {
                emit(ctx, &key, flow, Verdict::EarlyTalk, Some(seg));
                flow.state = STATE_DONE;
            }
        }
        if flow.state == STATE_GREETING && closing {
            emit(ctx, &key, flow, Verdict::Quit, None);
            flow.state = STATE_DONE;
        }
    }

    if closing && flow.state == STATE_DONE {
        let _ = FLOWS.remove(&key);
    }
}

/// Writes a verdict to the ring buffer, with the client's first payload bytes.
#[inline(always)]
fn emit(ctx: &TcContext, key: &FlowKey, flow: &Flow, verdict: Verdict, payload: Option<&Segment>) {
    count(match verdict {
        Verdict::EarlyTalk => Stat::EarlyTalk,
        Verdict::Quit => Stat::Quit,
        Verdict::Pass => Stat::Pass,
        Verdict::EarlyEhlo => Stat::EarlyEhlo,
    });
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(Stat::RingbufFull);
        given_up(ctx, key, GiveUp::RingFull);
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).key = *key;
        (*ev).since_handshake_ns = now.wrapping_sub(flow.verified_ns);
        (*ev).verdict = verdict as u8;
        (*ev)._pad = [0; 2];
        (*ev).bytes = 0;
        (*ev).captured = 0;
        (*ev).payload = [0; PAYLOAD_CAPTURE];
        if let Some(seg) = payload {
            (*ev).bytes = seg.payload_len;
            (*ev).captured = crate::greeting::capture(ctx, seg, &mut (*ev).payload);
        }
    }
    // Only an early talker needs the daemon at once; waking it for every
    // PASS costs a context switch per SMTP session, so those wait for its
    // next drain (BPF_RB_NO_WAKEUP), and a ban is never delayed behind them
    // (BPF_RB_FORCE_WAKEUP: the adaptive default would not wake a reader
    // that has unread records).
    let flags = if verdict == Verdict::EarlyTalk {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags);
}
