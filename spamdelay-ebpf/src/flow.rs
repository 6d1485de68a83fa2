//! The per-flow state machine: a handshake verified from the server's SYN-ACK
//! and the client's ACK, then one verdict (EARLY-TALK, QUIT, PASS, or a
//! forgiven PIPECONNECT) per flow, judged on what the server's TCP accepts.
//! An EARLY-TALK also opens the bridge block (`bridged`): the talker's new
//! SYNs are dropped here for `--bridge-time`, before they make a flow.
//!
//! # What the server's TCP accepts (Linux 6.x, RFC 793/5961)
//!
//! Let C be the server's `rcv_nxt` (the client's next in-order byte: its ISN
//! plus one, plus any SYN data the SYN-ACK acknowledged), I the server's ISN
//! and S the server's `snd_nxt` (I+1 plus the greeting bytes it has sent).
//! Until the greeting is complete the client has sent nothing, so C is also
//! the server's `rcv_wup`. Then:
//!
//! - **Handshake** (`tcp_check_req`): the ACK completing it must carry the
//!   ACK flag, no SYN and no RST, ack = I+1 exactly, and lie in the window
//!   the SYN-ACK offered (`tcp_in_window`: seq = C, or it ends after C and
//!   starts before C+window). An RST in that window resets the embryonic
//!   connection instead.
//! - **Data** after it (`tcp_validate_incoming`, `tcp_ack`,
//!   `tcp_data_queue`): a segment without the ACK flag is dropped
//!   (`TCP_FLAGS`); one whose ack is after S acknowledges unsent data and is
//!   dropped; one whose ack is before `snd_una - min(max_window,
//!   bytes_acked)` is dropped (RFC 5961 5.2) - before the greeting has been
//!   acknowledged that bound is `snd_una` itself, so together: ack in
//!   [I+1, S]. Any SYN is answered with a challenge ACK and dropped. Of what
//!   is left, bytes up to C are old (trimmed or dropped as duplicates) and
//!   bytes from C on are new: a segment with seq <= C < seq+len delivers
//!   seq+len-C bytes to the MTA now, at once. A segment starting after C is
//!   held out of order and delivered only when the gap is filled - by an
//!   in-order segment, which is judged then. So **early talk is in-order new
//!   data with an acceptable ACK**, counted from C.
//! - **RST**: only at seq = C exactly resets the connection (RFC 5961 3.2);
//!   anywhere else in the window it draws a challenge ACK, outside it is
//!   dropped. The ACK flag and number do not matter. So a QUIT by RST needs
//!   seq = C.
//! - **FIN**: processed only in order, once every byte before it arrived:
//!   at seq+len = C, with an acceptable ACK. An out-of-order FIN is queued
//!   and never ends the connection while the gap stays.
//! - **Fragments**: the IP layer joins them before TCP. The first fragment
//!   carries the TCP header, so the same rules apply to it, and in-order
//!   data (seq <= C) in a fragmented segment is early talk: the fragments
//!   after the first are TCP payload. An IPv4 first fragment too short for
//!   the ack and flags (a "tiny fragment", RFC 1858) counts at once at
//!   seq = C exactly (as hard to guess as an ack); starting before C, it is
//!   joined with the fragment at byte 8, which holds its ack and flags,
//!   whichever comes first. IPv6 first fragments must hold the whole TCP
//!   header (RFC 8200 4.5; Linux drops others).
//! - **Fast Open**: SYN data that the SYN-ACK acknowledges (ack = client
//!   ISN+1+len) was queued to the MTA with the SYN itself; it is early talk
//!   once the handshake is verified.
//!
//! An off-path forger who knows the client's address and port but not the
//! sequence numbers must therefore guess a 32-bit ack exactly (and a seq at
//! or below C within the segment's length) to forge talk, and a 32-bit seq
//! exactly to forge a quit. The TCP checksum is not verified here: a forger
//! computes it anyway, and a client that sends itself a bad one is only
//! ever judged on bytes its own ACK vouches for.

use aya_ebpf::{helpers::bpf_ktime_get_boot_ns, maps::lpm_trie::Key, programs::TcContext};
use spamdelay_common::{
    ClientAddr, Event, FAMILY_V4, Flow, FlowKey, PAYLOAD_CAPTURE, Stat, Verdict,
    event::{HOW_FRAGMENT, HOW_SYN},
    flow::{
        FLAG_PROBED, HalfOpen, PIPECONNECT_ALL, PIPECONNECT_LISTED, PIPECONNECT_OFF, ProbeKey,
        STATE_DONE, STATE_GREETING, SynData,
    },
    greeting::seq_after,
};

use crate::{
    done,
    greeting::{Scan, scan_greeting},
    handshakes,
    maps::{
        ALLOW_V4, ALLOW_V6, BRIDGE, EVENTS, FLOWS, FragKey, HALF_OPEN, PASSERS, PIPE_V4, PIPE_V6,
        PROBES, SYN_DATA, TCP_TAILS, TINY_FIRSTS, TailPart, TinyFirst, bridge_ns, count,
        pass_ttl_ns, pipeconnect_mode, syn_data_recent, syn_data_seen,
    },
    parse::{self, Dir, Part, Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpTail, payload_bytes},
    trace::{GiveUp, given_up},
};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

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

/// `a` is at or before `b` in sequence space.
#[inline(always)]
fn not_after(a: u32, b: u32) -> bool {
    !seq_after(a, b)
}

/// Linux's `tcp_in_window`: does [seq, end) fall in the window [s, e]?
#[inline(always)]
fn in_window(seq: u32, end: u32, s: u32, e: u32) -> bool {
    seq == s || (seq_after(end, s) && seq_after(e, seq)) || (seq == e && seq == end)
}

/// What the fast path made of a segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Counted and done with: nothing to follow.
    Yes,
    /// To follow, and not a decided flow (`done` was asked).
    Undecided,
    /// To follow; `done` was not asked.
    Unknown,
}

/// The fast path, for a segment in the usual frame (`Look::Plain`): one
/// that needs no following is counted and done with here, before the full
/// parse and its stack frame. Most segments of an SMTP session are: those
/// of a decided flow (its close drops it from `FLOWS`), the client's SYN,
/// the server's empty ACKs.
#[inline(never)]
pub fn settled<const FROM_CLIENT: bool>(ctx: &TcContext) -> Settled {
    let dir = if FROM_CLIENT {
        Dir::FromClient
    } else {
        Dir::FromServer
    };
    let Some(seg) = parse::plain(ctx, dir) else {
        return Settled::Unknown;
    };
    if seg.has(TCP_SYN) {
        // A SYN-ACK starts a handshake; a client's SYN needs more than
        // counting only for Fast Open data or the bridge block.
        let idle = if FROM_CLIENT {
            seg.payload_len == 0 && (seg.has(TCP_ACK) || bridge_ns() == 0)
        } else {
            !seg.has(TCP_ACK)
        };
        if !idle {
            return Settled::Unknown;
        }
        count(Stat::Packets);
        return Settled::Yes;
    }
    let closing = seg.has(TCP_FIN) || seg.has(TCP_RST);
    // From the server, neither greeting bytes nor a close (`from_server`);
    // from the client an empty ACK may complete a handshake.
    if (!FROM_CLIENT && seg.payload_len == 0 && !closing) || decided(&seg.key, closing) {
        count(Stat::Packets);
        return Settled::Yes;
    }
    Settled::Undecided
}

/// Is `key` a decided flow? Nothing to follow then, at most its entry in
/// `FLOWS` to drop at its close.
#[inline(always)]
fn decided(key: &FlowKey, closing: bool) -> bool {
    let Some(done) = done::find(key) else {
        return false;
    };
    if closing && done.in_flows {
        let _ = FLOWS.remove(key);
        done.left_flows();
    }
    true
}

/// A segment leaving the server (tc egress). `undecided`: the fast path
/// found it is not a decided flow's.
#[inline(always)]
pub fn from_server(ctx: &TcContext, seg: &Segment, undecided: bool) {
    count(Stat::Packets);
    let closing = seg.has(TCP_FIN) || seg.has(TCP_RST);
    if seg.has(TCP_SYN) {
        if seg.has(TCP_ACK) && !seg.fragment() {
            let key = key(&seg.dst, &seg.src, seg.dport, seg.sport, seg.family);
            syn_ack(ctx, &key, seg);
        }
        return;
    }
    // Neither greeting bytes nor a close: whatever the flow's state, this
    // segment changes nothing, so it costs no lookup.
    if seg.payload_len == 0 && !seg.fragment() && !closing {
        return;
    }
    let key = key(&seg.dst, &seg.src, seg.dport, seg.sport, seg.family);
    // A decided flow (most segments of a session).
    if !undecided && decided(&key, closing) {
        return;
    }
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        return;
    };
    let flow = unsafe { &mut *flow };
    if flow.state == STATE_GREETING && (seg.payload_len > 0 || seg.fragment()) {
        // The server's own segments are never fragmented in practice (it
        // sizes them by path MTU); one that is cannot be followed byte by byte.
        let scan = if seg.fragment() {
            Scan::LostSync
        } else {
            scan_greeting(ctx, seg, flow)
        };
        match scan {
            Scan::Complete => {
                if flow.flags & FLAG_PROBED == 0 {
                    // One clock read for the event and the pass.
                    let now = boot_ns();
                    emit(ctx, &key, flow, Verdict::Pass, None, 0, now);
                    remember_pass(&key, now);
                }
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
    let decided = flow.state == STATE_DONE;
    if closing {
        if !decided {
            count(Stat::ServerClosed);
        }
        let _ = FLOWS.remove(&key);
    }
    if decided {
        done::mark(&key, !closing);
    }
}

/// The server answers a SYN: a handshake starts (or its SYN-ACK is resent).
#[inline(always)]
fn syn_ack(ctx: &TcContext, key: &FlowKey, seg: &Segment) {
    // Whatever was decided under this key is over, resent SYN-ACK or not.
    done::forget(key);
    let mut half = HalfOpen {
        server_isn: seg.seq,
        client_next: seg.ack,
        window: seg.window as u32,
        syn_data: 0,
        allowlisted: 0,
        _pad: [0; 7],
    };
    if allowlisted(key) {
        count(Stat::Allowlisted);
        half.allowlisted = 1;
    } else if syn_data_recent()
        && let Some(syn) = SYN_DATA.get_ptr(key)
    {
        let syn = unsafe { &*syn };
        // Fast Open data taken with the SYN: the SYN-ACK acknowledges it.
        if syn.len > 0 && seg.ack == syn.isn.wrapping_add(1).wrapping_add(syn.len) {
            half.syn_data = syn.len;
        } else {
            let _ = SYN_DATA.remove(key);
        }
    }
    if handshakes::put(key, &half) {
        // The client's segments look in the slot first, before `FLOWS`: an
        // old flow under this key is over and replaced at the ACK. A copy
        // in `HALF_OPEN` (an earlier SYN-ACK found the slot taken) must go.
        if handshakes::find_mapped(key).is_some() {
            let _ = HALF_OPEN.remove(key);
        }
        return;
    }
    // The server answers a SYN on a connection it has with a challenge ACK,
    // never a SYN-ACK: whatever was followed under this key is over. (A
    // lookup first: a delete takes the bucket lock even for nothing.)
    if FLOWS.get_ptr(key).is_some() {
        let _ = FLOWS.remove(key);
    }
    handshakes::mapped();
    if HALF_OPEN.insert(key, &half, 0).is_err() {
        count(Stat::FlowInsertFailed);
        given_up(ctx, key, GiveUp::TableFull);
    }
}

#[inline(always)]
fn allowlisted(key: &FlowKey) -> bool {
    if key.family == FAMILY_V4 {
        let addr = [key.client[0], key.client[1], key.client[2], key.client[3]];
        ALLOW_V4.get(Key::new(32, addr)).is_some()
    } else {
        ALLOW_V6.get(Key::new(128, key.client)).is_some()
    }
}

/// What ingress does with a client's packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Let it through (and every program after this one run).
    Pass,
    /// Drop it: a new SYN from an early talker under the bridge block.
    Drop,
}

/// A segment arriving from the client (tc ingress). `undecided`: the fast
/// path found it is not a decided flow's.
#[inline(always)]
pub fn from_client(ctx: &TcContext, seg: &Segment, undecided: bool) -> Fate {
    count(Stat::Packets);
    let key = key(&seg.src, &seg.dst, seg.sport, seg.dport, seg.family);
    if seg.has(TCP_SYN) {
        if !seg.has(TCP_ACK) && bridged(&key) {
            count(Stat::BridgeBlocked);
            return Fate::Drop;
        }
        // A SYN opening a connection may carry Fast Open data; on a known
        // connection any SYN draws a challenge ACK and is dropped.
        if !seg.has(TCP_ACK) && seg.payload_len > 0 && seg.part == Part::Whole {
            syn_with_data(ctx, &key, seg);
        }
        return Fate::Pass;
    }
    if !undecided && decided(&key, seg.has(TCP_FIN) || seg.has(TCP_RST)) {
        return Fate::Pass;
    }
    // A handshake in its slot is the newest thing under this key (an old
    // flow's entry in `FLOWS` may still be there).
    if let Some(slot) = handshakes::find(&key) {
        handshake(ctx, &key, &slot.half, seg, Pending::Slot(&slot));
        return Fate::Pass;
    }
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        established(ctx, &key, unsafe { &mut *flow }, seg);
        return Fate::Pass;
    }
    if let Some(half) = handshakes::find_mapped(&key) {
        handshake(ctx, &key, &half, seg, Pending::Mapped);
        return Fate::Pass;
    }
    if seg.payload_len > 0 || seg.fragment() {
        count(Stat::UnverifiedPayload);
    }
    Fate::Pass
}

/// The bridge block: is this client an early talker flagged here less than
/// the bridge time ago? Its new connections are refused in the kernel from
/// the verdict on, so none reaches the MTA while the daemon's nft ban is on
/// its way. Only new SYNs are dropped: no handshake, no flow, nothing
/// judged, so the acceptance rules above never see a dropped packet.
#[inline(always)]
fn bridged(key: &FlowKey) -> bool {
    if bridge_ns() == 0 {
        return false;
    }
    let addr = client_addr(key);
    let Some(until) = (unsafe { BRIDGE.get(&addr) }).copied() else {
        return false;
    };
    if unsafe { bpf_ktime_get_boot_ns() } < until {
        return true;
    }
    let _ = BRIDGE.remove(&addr);
    false
}

/// An early talker was flagged: bridge until its ban is in place.
#[inline(always)]
fn bridge(key: &FlowKey, now: u64) {
    let time = bridge_ns();
    if time == 0 {
        return;
    }
    let until = now.wrapping_add(time);
    let _ = BRIDGE.insert(&client_addr(key), &until, 0);
}

/// Keeps a data-carrying SYN's first bytes until its SYN-ACK says whether
/// the server took them.
#[inline(always)]
fn syn_with_data(ctx: &TcContext, key: &FlowKey, seg: &Segment) {
    let mut syn = SynData {
        isn: seg.seq,
        len: seg.payload_len,
        captured: 0,
        _pad: [0; 7],
        payload: [0; PAYLOAD_CAPTURE],
    };
    syn.captured = payload_bytes(ctx, seg.payload_off, seg.payload_len, &mut syn.payload);
    // Before the insert: a SYN-ACK that finds the entry finds the mark too.
    syn_data_seen();
    let _ = SYN_DATA.insert(key, &syn, 0);
}

/// Where a handshake in progress is kept.
#[derive(Clone, Copy)]
enum Pending<'a> {
    Slot(&'a handshakes::Slot),
    Mapped,
}

impl Pending<'_> {
    /// The handshake is over: verified, or reset.
    #[inline(always)]
    fn end(self, key: &FlowKey) {
        match self {
            Pending::Slot(slot) => slot.clear(),
            Pending::Mapped => {
                let _ = HALF_OPEN.remove(key);
            }
        }
    }
}

/// A client segment on a handshake in progress: is it the ACK that
/// completes it, as `tcp_check_req` would take it?
#[inline(always)]
fn handshake(ctx: &TcContext, key: &FlowKey, half: &HalfOpen, seg: &Segment, pending: Pending<'_>) {
    let c = half.client_next;
    let window_end = c.wrapping_add(half.window);
    if seg.part == Part::TinyFragment {
        count(Stat::Unparsed);
        return;
    }
    if seg.has(TCP_RST) {
        // An RST in the window resets the embryonic connection.
        if (!seg.has(TCP_ACK) || seg.ack == half.server_isn.wrapping_add(1))
            && in_window(seg.seq, seg.seq, c, window_end)
        {
            pending.end(key);
            let _ = SYN_DATA.remove(key);
        }
        return;
    }
    let mut end = seg.seq.wrapping_add(seg.payload_len);
    if seg.has(TCP_FIN) || seg.fragment() {
        // A FIN takes a sequence number; a fragment has more bytes to come.
        end = end.wrapping_add(1);
    }
    let verifies = seg.has(TCP_ACK)
        && seg.ack == half.server_isn.wrapping_add(1)
        && in_window(seg.seq, end, c, window_end);
    if !verifies {
        if seg.payload_len > 0 || seg.fragment() {
            count(Stat::UnverifiedPayload);
        }
        return;
    }
    let flow = Flow {
        verified_ns: boot_ns(),
        server_isn: half.server_isn,
        client_next: c,
        server_next: half.server_isn.wrapping_add(1),
        state: if half.allowlisted != 0 {
            STATE_DONE
        } else {
            STATE_GREETING
        },
        flags: 0,
        scanner: Default::default(),
    };
    pending.end(key);
    if FLOWS.insert(key, &flow, 0).is_err() {
        count(Stat::FlowInsertFailed);
        given_up(ctx, key, GiveUp::TableFull);
        return;
    }
    if half.allowlisted != 0 {
        done::mark(key, true);
        return;
    }
    count(Stat::FlowsTracked);
    // The usual handshake ACK (no data, no close) changes nothing in the new
    // flow: no second lookup for it.
    if half.syn_data == 0
        && seg.payload_len == 0
        && !seg.fragment()
        && !seg.has(TCP_FIN)
        && !seg.has(TCP_RST)
    {
        return;
    }
    let Some(flow) = FLOWS.get_ptr_mut(key) else {
        return;
    };
    let flow = unsafe { &mut *flow };
    if half.syn_data > 0 {
        let mut talk = Talk {
            bytes: half.syn_data,
            how: HOW_SYN,
            captured: 0,
            payload: [0; PAYLOAD_CAPTURE],
        };
        if let Some(syn) = SYN_DATA.get_ptr(key) {
            let syn = unsafe { &*syn };
            talk.captured = syn.captured;
            talk.payload = syn.payload;
        }
        let _ = SYN_DATA.remove(key);
        judge_talk(ctx, key, flow, &talk);
        if flow.state == STATE_DONE {
            done::mark(key, true);
        }
        return;
    }
    // The handshake's own ACK may carry data: judged like any later segment.
    established(ctx, key, flow, seg);
}

/// A client segment on a verified flow.
#[inline(always)]
fn established(ctx: &TcContext, key: &FlowKey, flow: &mut Flow, seg: &Segment) {
    let closing = seg.has(TCP_FIN) || seg.has(TCP_RST);
    if flow.state == STATE_GREETING {
        greeting_wait(ctx, key, flow, seg);
    }
    if flow.state == STATE_DONE {
        if closing {
            let _ = FLOWS.remove(key);
        }
        done::mark(key, !closing);
    }
}

/// A client segment while the server's greeting is pending: the acceptance
/// rules of the module comment, then the verdict.
#[inline(always)]
fn greeting_wait(ctx: &TcContext, key: &FlowKey, flow: &mut Flow, seg: &Segment) {
    let c = flow.client_next;
    if seg.has(TCP_RST) {
        if seg.seq == c && seg.part != Part::TinyFragment {
            quit(ctx, key, flow);
        }
        return;
    }
    let mut seg = *seg;
    if seg.part == Part::TinyFragment {
        if seg.seq == c {
            let talk = Talk::fragment(0);
            judge_talk(ctx, key, flow, &talk);
            return;
        }
        // Starting before C, it may still carry new bytes: its ack and
        // flags are in the fragment at byte 8, come before or after it.
        let frag = frag_key(key, seg.ip_id);
        let Some(tail) = TCP_TAILS.get_ptr(&frag) else {
            if seq_after(c, seg.seq) {
                let first = TinyFirst {
                    key: *key,
                    seq: seg.seq,
                    _pad: 0,
                };
                let _ = TINY_FIRSTS.insert(&frag, &first, 0);
            } else {
                count(Stat::Unparsed);
            }
            return;
        };
        let tail = unsafe { *tail };
        let _ = TCP_TAILS.remove(&frag);
        seg.ack = tail.ack;
        seg.flags = tail.flags;
        seg.part = Part::FirstFragment;
    }
    let seg = &seg;
    let ack_ok = seg.has(TCP_ACK)
        && not_after(flow.server_isn.wrapping_add(1), seg.ack)
        && not_after(seg.ack, flow.server_next);
    if !ack_ok {
        if seg.payload_len > 0 || seg.fragment() {
            count(Stat::UnverifiedPayload);
        }
        return;
    }
    let end = seg.seq.wrapping_add(seg.payload_len);
    let in_order = not_after(seg.seq, c);
    if in_order && (seq_after(end, c) || seg.fragment()) {
        // New bytes from C on (the part before C is old and trimmed).
        let skip = c.wrapping_sub(seg.seq);
        let mut talk = if seg.fragment() {
            Talk::fragment(if seq_after(end, c) {
                end.wrapping_sub(c)
            } else {
                0
            })
        } else {
            Talk::bytes(end.wrapping_sub(c))
        };
        if talk.bytes > 0 {
            talk.captured = payload_bytes(
                ctx,
                seg.payload_off + skip as usize,
                talk.bytes,
                &mut talk.payload,
            );
        }
        if seg.fragment() {
            count(Stat::Fragments);
        }
        judge_talk(ctx, key, flow, &talk);
    } else if seg.has(TCP_FIN) && end == c && !seg.fragment() {
        quit(ctx, key, flow);
    } else if seg.payload_len > 0 || seg.fragment() {
        // Old bytes only, or out of order: nothing reached the MTA yet.
        count(Stat::UnverifiedPayload);
    }
}

#[inline(always)]
fn frag_key(key: &FlowKey, ip_id: u16) -> FragKey {
    FragKey {
        src: [key.client[0], key.client[1], key.client[2], key.client[3]],
        dst: [key.server[0], key.server[1], key.server[2], key.server[3]],
        id: ip_id,
        _pad: [0; 2],
    }
}

/// The IPv4 fragment at byte 8 of a client's TCP segment: the ack and
/// flags a tiny first fragment lacked. Judged with it if it came first;
/// kept for it otherwise.
#[inline(always)]
pub fn tcp_tail(ctx: &TcContext, tail: &TcpTail) {
    let frag = FragKey {
        src: tail.src,
        dst: tail.dst,
        id: tail.ip_id,
        _pad: [0; 2],
    };
    let Some(first) = TINY_FIRSTS.get_ptr(&frag) else {
        let part = TailPart {
            ack: tail.ack,
            flags: tail.flags,
            _pad: [0; 3],
        };
        let _ = TCP_TAILS.insert(&frag, &part, 0);
        return;
    };
    let first = unsafe { *first };
    let _ = TINY_FIRSTS.remove(&frag);
    let Some(flow) = FLOWS.get_ptr_mut(&first.key) else {
        return;
    };
    let flow = unsafe { &mut *flow };
    if flow.state != STATE_GREETING {
        return;
    }
    let seg = Segment {
        family: FAMILY_V4,
        src: first.key.client,
        dst: first.key.server,
        sport: first.key.client_port,
        dport: first.key.server_port,
        seq: first.seq,
        ack: tail.ack,
        flags: tail.flags,
        window: 0,
        part: Part::FirstFragment,
        payload_off: 0,
        payload_len: 0,
        ip_id: tail.ip_id,
    };
    greeting_wait(ctx, &first.key, flow, &seg);
    if flow.state == STATE_DONE {
        done::mark(&first.key, true);
    }
}

/// The client closed before the greeting.
#[inline(always)]
fn quit(ctx: &TcContext, key: &FlowKey, flow: &mut Flow) {
    // A client that probed has spoken already: its hang-up says nothing.
    if flow.flags & FLAG_PROBED == 0 {
        emit(ctx, key, flow, Verdict::Quit, None, 0, boot_ns());
    }
    flow.state = STATE_DONE;
}

/// Early bytes the server accepted.
struct Talk {
    /// How many (for a fragment: the first fragment's share).
    bytes: u32,
    /// `HOW_*` bits.
    how: u8,
    captured: u8,
    payload: [u8; PAYLOAD_CAPTURE],
}

impl Talk {
    #[inline(always)]
    fn bytes(bytes: u32) -> Self {
        Talk {
            bytes,
            how: 0,
            captured: 0,
            payload: [0; PAYLOAD_CAPTURE],
        }
    }

    #[inline(always)]
    fn fragment(bytes: u32) -> Self {
        Talk {
            how: HOW_FRAGMENT,
            ..Talk::bytes(bytes)
        }
    }
}

/// Early talk: a benign probe, forgiven PIPECONNECT, or EARLY-TALK.
#[inline(always)]
fn judge_talk(ctx: &TcContext, key: &FlowKey, flow: &mut Flow, talk: &Talk) {
    if talk.how == 0 && flow.flags & FLAG_PROBED == 0 && is_probe(talk) {
        // Followed on: anything more before the greeting is judged as usual.
        flow.flags |= FLAG_PROBED;
        flow.client_next = flow.client_next.wrapping_add(talk.bytes);
        emit(ctx, key, flow, Verdict::Probe, Some(talk), 0, boot_ns());
        return;
    }
    // One clock read for the event, the pass and the bridge block.
    let now = boot_ns();
    match passed_before(key, now) {
        Some(passed) => {
            emit(
                ctx,
                key,
                flow,
                Verdict::Pipeconnect,
                Some(talk),
                passed,
                now,
            );
            // A client that keeps piping from the cache it built by waiting
            // here keeps its standing: Exim's cache may outlive the TTL,
            // and a real sender must not be banned for using it.
            remember_pass(key, now);
        }
        None => {
            emit(ctx, key, flow, Verdict::EarlyTalk, Some(talk), 0, now);
            bridge(key, now);
        }
    }
    flow.state = STATE_DONE;
}

/// Is the talk exactly one of the benign probes?
#[inline(always)]
fn is_probe(talk: &Talk) -> bool {
    if talk.bytes == 0 || talk.bytes > PAYLOAD_CAPTURE as u32 || talk.captured as u32 != talk.bytes
    {
        return false;
    }
    let probe = ProbeKey {
        len: talk.bytes,
        bytes: talk.payload,
    };
    unsafe { PROBES.get(&probe) }.is_some()
}

#[inline(always)]
fn client_addr(key: &FlowKey) -> ClientAddr {
    ClientAddr {
        addr: key.client,
        family: key.family,
        _pad: [0; 3],
    }
}

/// CLOCK_BOOTTIME in ns: the clock of the passes and the bridge block, and
/// of a flow's handshake time, so that a verdict reads the clock once.
#[inline(always)]
fn boot_ns() -> u64 {
    unsafe { bpf_ktime_get_boot_ns() }
}

/// A client that waited for a greeting: remembered for PIPECONNECT.
#[inline(always)]
fn remember_pass(key: &FlowKey, now: u64) {
    // Only PIPECONNECT asks who passed (`passed_before`); the mode is fixed
    // at load, and the daemon restores passes from its own cache at start.
    if pipeconnect_mode() == PIPECONNECT_OFF {
        return;
    }
    let expires = now.wrapping_add(pass_ttl_ns());
    let addr = client_addr(key);
    // A client that passed before (any regular sender) is renewed in place:
    // an LRU insert takes a fresh element and frees the old one, several
    // times the cost of the lookup.
    if let Some(old) = PASSERS.get_ptr_mut(&addr) {
        unsafe { *old = expires };
        return;
    }
    let _ = PASSERS.insert(&addr, &expires, 0);
}

/// When the client passed before (CLOCK_BOOTTIME ns), if the MTA advertises
/// PIPECONNECT to it and that pass is within the TTL.
#[inline(always)]
fn passed_before(key: &FlowKey, now: u64) -> Option<u64> {
    let advertised = match pipeconnect_mode() {
        PIPECONNECT_ALL => true,
        PIPECONNECT_LISTED => {
            let listed = if key.family == FAMILY_V4 {
                let addr = [key.client[0], key.client[1], key.client[2], key.client[3]];
                PIPE_V4.get(Key::new(32, addr))
            } else {
                PIPE_V6.get(Key::new(128, key.client))
            };
            listed.is_some_and(|v| *v != 0)
        }
        _ => false,
    };
    if !advertised {
        return None;
    }
    let expires = unsafe { PASSERS.get(&client_addr(key)) }.copied()?;
    if now < expires {
        Some(expires.wrapping_sub(pass_ttl_ns()))
    } else {
        None
    }
}

/// Writes a verdict to the ring buffer, with the client's first new bytes.
#[inline(always)]
fn emit(
    ctx: &TcContext,
    key: &FlowKey,
    flow: &Flow,
    verdict: Verdict,
    talk: Option<&Talk>,
    passed_boot_ns: u64,
    now: u64,
) {
    count(match verdict {
        Verdict::EarlyTalk => Stat::EarlyTalk,
        Verdict::Quit => Stat::Quit,
        Verdict::Pass => Stat::Pass,
        Verdict::Pipeconnect => Stat::Pipeconnect,
        Verdict::Probe => Stat::Probe,
    });
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(Stat::RingbufFull);
        given_up(ctx, key, GiveUp::RingFull);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).key = *key;
        (*ev).since_handshake_ns = now.wrapping_sub(flow.verified_ns);
        (*ev).passed_boot_ns = passed_boot_ns;
        (*ev).verdict = verdict as u8;
        (*ev)._pad = 0;
        match talk {
            Some(t) => {
                (*ev).bytes = t.bytes;
                (*ev).captured = t.captured;
                (*ev).how = t.how;
                (*ev).payload = t.payload;
            }
            None => {
                (*ev).bytes = 0;
                (*ev).captured = 0;
                (*ev).how = 0;
                (*ev).payload = [0; PAYLOAD_CAPTURE];
            }
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
