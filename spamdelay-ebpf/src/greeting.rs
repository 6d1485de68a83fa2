//! Following the server's greeting through its segments. Reads go through
//! `bpf_skb_load_bytes` (parse.rs) because TCP payload usually sits in the
//! skb's page fragments, not its linear head.

use aya_ebpf::{cty::c_void, helpers::bpf_loop, programs::TcContext};
use spamdelay_common::{Flow, GreetingScanner, greeting::seq_after};

use crate::parse::{Segment, skb_bytes};

/// Server bytes scanned per segment; a greeting segment longer than this
/// without a final line makes the flow untrackable (never a false verdict).
const MAX_SCAN: u32 = 4096;

pub enum Scan {
    Complete,
    Incomplete,
    /// The server's stream cannot be followed: give the flow up, no verdict.
    LostSync,
}

/// State shared with the `bpf_loop` callback, which sees one byte per call:
/// a plain loop over data-dependent branches would multiply the verifier's
/// states beyond its limit.
#[repr(C)]
struct ScanLoop {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    start: u32,
    scanner: GreetingScanner,
    result: u8,
}

/// Byte `index` from `start` in the packet.
#[inline(always)]
fn byte_at(skb: *mut aya_ebpf::bindings::__sk_buff, start: u32, index: u64) -> Option<u8> {
    let mut byte = [0u8; 1];
    skb_bytes(skb, start.wrapping_add(index as u32), &mut byte).then_some(byte[0])
}

const RESULT_INCOMPLETE: u8 = 0;
const RESULT_COMPLETE: u8 = 1;
const RESULT_UNREADABLE: u8 = 2;

extern "C" fn scan_byte(index: u64, data: *mut c_void) -> i64 {
    let state = unsafe { &mut *(data as *mut ScanLoop) };
    let Some(byte) = byte_at(state.skb, state.start, index) else {
        state.result = RESULT_UNREADABLE;
        return 1;
    };
    if state.scanner.feed(byte) {
        state.result = RESULT_COMPLETE;
        return 1;
    }
    0
}

/// Feeds the new bytes of a server segment to the flow's greeting scanner.
/// Retransmitted bytes are skipped; a gap in the stream loses sync.
#[inline(always)]
pub fn scan_greeting(ctx: &TcContext, seg: &Segment, flow: &mut Flow) -> Scan {
    if seq_after(seg.seq, flow.server_next) {
        return Scan::LostSync;
    }
    let skip = flow.server_next.wrapping_sub(seg.seq);
    if skip >= seg.payload_len {
        return Scan::Incomplete;
    }
    let len = seg.payload_len - skip;
    flow.server_next = seg.seq.wrapping_add(seg.payload_len);
    let mut state = ScanLoop {
        skb: ctx.skb.skb,
        start: (seg.payload_off as u32).wrapping_add(skip),
        scanner: flow.scanner,
        result: RESULT_INCOMPLETE,
    };
    let n = if len < MAX_SCAN { len } else { MAX_SCAN };
    let ret = unsafe {
        bpf_loop(
            n,
            scan_byte as *mut c_void,
            (&mut state as *mut ScanLoop).cast(),
            0,
        )
    };
    match state.result {
        RESULT_COMPLETE => Scan::Complete,
        RESULT_INCOMPLETE if ret >= 0 && len <= MAX_SCAN => {
            flow.scanner = state.scanner;
            Scan::Incomplete
        }
        _ => Scan::LostSync,
    }
}
