//! spamdelay's kernel side: two tc classifiers on the gateway's interface.
//! Ingress follows what clients send to a watched port, egress what the server
//! answers; verdicts go to the daemon through the `EVENTS` ring buffer.
#![no_std]
#![no_main]

mod done;
mod flow;
mod greeting;
mod handshakes;
mod maps;
mod parse;
mod trace;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use flow::{Fate, Settled};
use parse::{Dir, Look, Packet};

/// Client to server. Watches: `TC_ACT_UNSPEC` (TCX_NEXT) lets every program
/// after it run, the next TCX link and legacy clsact filters alike; any
/// other code would end the chain for them. Enforcement is nftables' job,
/// with one exception: the bridge block drops (`TC_ACT_SHOT`) a flagged
/// early talker's new SYNs until its ban is in place (`--bridge-time`).
#[classifier]
pub fn spamdelay_ingress(ctx: TcContext) -> i32 {
    // Most traffic leaves at the first look, most of an SMTP session's on
    // the fast path; both before the call into the (large, so not inlined)
    // rest and its stack frame.
    let undecided = match parse::look(&ctx, Dir::FromClient) {
        Look::Ignore => return TC_ACT_UNSPEC,
        Look::Plain => match flow::settled::<true>(&ctx) {
            Settled::Yes => return TC_ACT_UNSPEC,
            s => s == Settled::Undecided,
        },
        Look::Parse => false,
    };
    ingress(&ctx, undecided)
}

#[inline(never)]
fn ingress(ctx: &TcContext, undecided: bool) -> i32 {
    match parse::packet(ctx, Dir::FromClient) {
        Some(Packet::Segment(seg)) => {
            if flow::from_client(ctx, &seg, undecided) == Fate::Drop {
                return TC_ACT_SHOT;
            }
        }
        Some(Packet::Tail(tail)) => flow::tcp_tail(ctx, &tail),
        None => {}
    }
    TC_ACT_UNSPEC
}

/// Server to client.
#[classifier]
pub fn spamdelay_egress(ctx: TcContext) -> i32 {
    // The same first look and fast path as ingress's.
    let undecided = match parse::look(&ctx, Dir::FromServer) {
        Look::Ignore => return TC_ACT_UNSPEC,
        Look::Plain => match flow::settled::<false>(&ctx) {
            Settled::Yes => return TC_ACT_UNSPEC,
            s => s == Settled::Undecided,
        },
        Look::Parse => false,
    };
    egress(&ctx, undecided)
}

#[inline(never)]
fn egress(ctx: &TcContext, undecided: bool) -> i32 {
    if let Some(Packet::Segment(seg)) = parse::packet(ctx, Dir::FromServer) {
        flow::from_server(ctx, &seg, undecided);
    }
    TC_ACT_UNSPEC
}

/// Benchmark baseline (`cargo xtask bench`): does nothing, so the cost of
/// being attached and run at all can be told apart from spamdelay's own.
/// Never attached by the daemon; it watches like the others.
#[classifier]
pub fn spamdelay_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
