//! Following the server's greeting through its segments, and capturing the
//! client's first payload bytes. Reads go through `bpf_skb_load_bytes` because
//! TCP payload usually sits in the skb's page fragments, not its linear head.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_loop, bpf_skb_load_bytes},
    programs::TcContext,
};
use spamdelay_common::{Flow, GreetingScanner, PAYLOAD_CAPTURE, greeting::seq_after};

use crate::parse::Segment;

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

/// Byte `index` from `start` in the packet, for the `bpf_loop` callbacks
/// (which get the skb through their context, not a `TcContext`).
#[inline(always)]
fn byte_at(skb: *mut aya_ebpf::bindings::__sk_buff, start: u32, index: u64) -> Option<u8> {
    let mut byte = 0u8;
    let off = start.wrapping_add(index as u32);
    let ret =
        unsafe { bpf_skb_load_bytes(skb as *const c_void, off, (&mut byte as *mut u8).cast(), 1) };
    (ret == 0).then_some(byte)
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

/// Copies up to `PAYLOAD_CAPTURE` payload bytes into `out`; returns how many.
#[inline(always)]
pub fn capture(ctx: &TcContext, seg: &Segment, out: &mut [u8; PAYLOAD_CAPTURE]) -> u8 {
    let want = if (seg.payload_len as usize) < PAYLOAD_CAPTURE {
        seg.payload_len as usize
    } else {
        PAYLOAD_CAPTURE
    };
    if want == PAYLOAD_CAPTURE {
        if let Ok(buf) = ctx.load::<[u8; PAYLOAD_CAPTURE]>(seg.payload_off) {
            *out = buf;
            return PAYLOAD_CAPTURE as u8;
        }
    }
    let mut n = 0u8;
    for (i, slot) in out.iter_mut().enumerate() {
        if i >= want {
            break;
        }
        let Ok(b) = ctx.load::<u8>(seg.payload_off + i) else {
            break;
        };
        *slot = b;
        n += 1;
    }
    n
}

/// Longest EHLO line believed (RFC 5321's command line limit).
const MAX_EHLO: u32 = 512;

struct NewlineLoop {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    start: u32,
    found: u8,
}

extern "C" fn find_newline(index: u64, data: *mut c_void) -> i64 {
    let state = unsafe { &mut *(data as *mut NewlineLoop) };
    match byte_at(state.skb, state.start, index) {
        Some(b) if b != b'\n' => 0,
        // A newline, or a byte that cannot be read: not one clean line.
        _ => {
            state.found = 1;
            1
        }
    }
}

/// Is the segment's payload exactly one `EHLO ...` line ending in CRLF?
#[inline(always)]
pub fn is_one_ehlo_line(ctx: &TcContext, seg: &Segment) -> bool {
    let len = seg.payload_len;
    if !(7..=MAX_EHLO).contains(&len) {
        return false;
    }
    let Ok(verb) = ctx.load::<[u8; 5]>(seg.payload_off) else {
        return false;
    };
    if verb[0] | 0x20 != b'e'
        || verb[1] | 0x20 != b'h'
        || verb[2] | 0x20 != b'l'
        || verb[3] | 0x20 != b'o'
        || verb[4] != b' '
    {
        return false;
    }
    let end = seg.payload_off + len as usize - 2;
    if ctx.load::<[u8; 2]>(end).ok() != Some([b'\r', b'\n']) {
        return false;
    }
    // No other line before that CRLF.
    let mut state = NewlineLoop {
        skb: ctx.skb.skb,
        start: seg.payload_off as u32,
        found: 0,
    };
    let ret = unsafe {
        bpf_loop(
            len - 1,
            find_newline as *mut c_void,
            (&mut state as *mut NewlineLoop).cast(),
            0,
        )
    };
    ret >= 0 && state.found == 0
}
