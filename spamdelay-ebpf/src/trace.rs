//! Debug records (aya-log) for the rare paths where a flow is given up or a
//! verdict lost: the counters say how often, these say which client. Never
//! on the per-packet path; the daemon shows them with RUST_LOG=debug.

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use spamdelay_common::{FAMILY_V4, FlowKey};

/// Why a flow got no verdict.
#[derive(Clone, Copy)]
pub enum GiveUp {
    /// The server's stream had a gap or an over-long greeting segment.
    LostSync,
    /// The flow table refused the new flow.
    TableFull,
    /// The verdict could not be written: the ring buffer was full.
    RingFull,
}

#[inline(never)]
pub fn given_up(ctx: &TcContext, key: &FlowKey, why: GiveUp) {
    let why = match why {
        GiveUp::LostSync => "server stream lost",
        GiveUp::TableFull => "flow table full",
        GiveUp::RingFull => "ring buffer full, verdict lost",
    };
    if key.family == FAMILY_V4 {
        let addr = u32::from_be_bytes([key.client[0], key.client[1], key.client[2], key.client[3]]);
        debug!(
            ctx,
            "no verdict for [{:i}]:{}: {}", addr, key.client_port, why
        );
    } else {
        debug!(
            ctx,
            "no verdict for [{:i}]:{}: {}", key.client, key.client_port, why
        );
    }
}
