//! Indexes of the kernel's per-CPU counters (`STATS` array map).

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Packets to or from a watched port that the program inspected.
    Packets = 0,
    /// Verified handshakes: flows followed until a verdict.
    FlowsTracked,
    EarlyTalk,
    Quit,
    Pass,
    /// Client payload that arrived on no verified flow (forged, out of
    /// window, or on a flow older than the daemon): never a verdict.
    UnverifiedPayload,
    /// Flows of allowlisted clients, never followed.
    Allowlisted,
    /// A verdict that could not be written: the ring buffer was full.
    RingbufFull,
    /// A new flow that could not be stored in the flow table.
    FlowInsertFailed,
    /// Flows given up without a verdict because the server's stream could not
    /// be followed (a gap, or a greeting segment too long to scan).
    LostSync,
    /// Flows the server closed before its greeting completed.
    ServerClosed,
    /// PIPECONNECT `EHLO` lines let through ahead of the greeting.
    EarlyEhlo,
}

pub const STAT_COUNT: u32 = Stat::EarlyEhlo as u32 + 1;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Packets,
        Stat::FlowsTracked,
        Stat::EarlyTalk,
        Stat::Quit,
        Stat::Pass,
        Stat::UnverifiedPayload,
        Stat::Allowlisted,
        Stat::RingbufFull,
        Stat::FlowInsertFailed,
        Stat::LostSync,
        Stat::ServerClosed,
        Stat::EarlyEhlo,
    ];

    /// The counter's name in `status` output and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Packets => "packets",
            Stat::FlowsTracked => "flows_tracked",
            Stat::EarlyTalk => "early_talk",
            Stat::Quit => "quit",
            Stat::Pass => "pass",
            Stat::UnverifiedPayload => "unverified_payload",
            Stat::Allowlisted => "allowlisted",
            Stat::RingbufFull => "ringbuf_full",
            Stat::FlowInsertFailed => "flow_insert_failed",
            Stat::LostSync => "lost_sync",
            Stat::ServerClosed => "server_closed",
            Stat::EarlyEhlo => "early_ehlo",
        }
    }
}
