//! Following the server's greeting through its segments. Reads go through
//! `bpf_skb_load_bytes` (parse.rs) because TCP payload usually sits in the
//! skb's page fragments, not its linear head.

use aya_ebpf::{cty::c_void, helpers::bpf_loop, programs::TcContext};
use spamdelay_common::{Flow, GreetingScanner, greeting::seq_after};

use crate::parse::{Segment, skb_bytes_upto};

/// Server bytes scanned per segment; a greeting segment longer than this
/// without a final line makes the flow untrackable (never a false verdict).
const MAX_SCAN: u32 = 4096;

/// Bytes read per `bpf_skb_load_bytes` call into the loop's buffer: one
/// helper call for a whole greeting line instead of one per byte, which is
/// what the scan used to cost.
const CHUNK: usize = 64;

/// Bytes scanned per `bpf_loop` callback (a divisor of `CHUNK`). The
/// verifier walks every byte's branches in a callback: a whole chunk per
/// call takes it past its complexity limit, a byte per call pays a call per
/// byte.
const RUN: usize = 8;

pub enum Scan {
    Complete,
    Incomplete,
    /// The server's stream cannot be followed: give the flow up, no verdict.
    LostSync,
}

/// State shared with the `bpf_loop` callback, which scans `RUN` bytes per
/// call and refills `buf` at each chunk boundary: a plain loop over the
/// segment would multiply the verifier's states beyond its limit.
#[repr(C)]
struct ScanLoop {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    start: u32,
    /// Bytes to scan from `start`, at most `MAX_SCAN`.
    len: u32,
    scanner: GreetingScanner,
    result: u8,
    _pad: [u8; 5],
    buf: [u8; CHUNK],
}

const RESULT_INCOMPLETE: u8 = 0;
const RESULT_COMPLETE: u8 = 1;
const RESULT_UNREADABLE: u8 = 2;

/// Scans bytes `index * RUN ..` of the new data, reading the next chunk
/// first when they start one.
extern "C" fn scan_run(index: u64, data: *mut c_void) -> i64 {
    let state = unsafe { &mut *(data as *mut ScanLoop) };
    let first = index.wrapping_mul(RUN as u64);
    let at = (first % CHUNK as u64) as usize;
    // 64-bit throughout: a bound checked on a 32-bit copy is lost to the
    // verifier when LLVM passes on the 64-bit register.
    let left = (state.len as u64).wrapping_sub(first);
    if at == 0 {
        let n = left.min(CHUNK as u64);
        let off = state.start.wrapping_add(first as u32);
        if !skb_bytes_upto(state.skb, off, &mut state.buf, n) {
            state.result = RESULT_UNREADABLE;
            return 1;
        }
    }
    let mut scanner = state.scanner;
    for j in 0..RUN {
        if j as u64 >= left {
            break;
        }
        if scanner.feed(state.buf[at + j]) {
            state.result = RESULT_COMPLETE;
            return 1;
        }
    }
    state.scanner = scanner;
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
    let n = if len < MAX_SCAN { len } else { MAX_SCAN };
    let mut state = ScanLoop {
        skb: ctx.skb.skb,
        start: (seg.payload_off as u32).wrapping_add(skip),
        len: n,
        scanner: flow.scanner,
        result: RESULT_INCOMPLETE,
        _pad: [0; 5],
        buf: [0; CHUNK],
    };
    let ret = unsafe {
        bpf_loop(
            n.div_ceil(RUN as u32),
            scan_run as *mut c_void,
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
