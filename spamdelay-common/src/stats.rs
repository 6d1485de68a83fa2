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
    /// Client payload the server's TCP would not deliver now: on no verified
    /// flow (forged, or older than the daemon), with a bad ACK, out of
    /// window or out of order. Never a verdict.
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
    /// Early talk forgiven to a PIPECONNECT client that passed before.
    Pipeconnect,
    /// Early talk that was exactly a known harmless probe.
    Probe,
    /// Early bytes judged from the first fragment of a fragmented segment.
    Fragments,
    /// Packets to a watched port that could not be parsed far enough to
    /// judge (over-long IPv6 extension header chains, an IPv4 first fragment
    /// too short for the TCP header's ack and flags).
    Unparsed,
    /// New SYNs dropped by the bridge block: from a client flagged as an
    /// early talker moments ago, before (or while) its nft ban takes hold.
    BridgeBlocked,
}

pub const STAT_COUNT: u32 = Stat::BridgeBlocked as u32 + 1;

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
        Stat::Pipeconnect,
        Stat::Probe,
        Stat::Fragments,
        Stat::Unparsed,
        Stat::BridgeBlocked,
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
            Stat::Pipeconnect => "pipeconnect",
            Stat::Probe => "probe",
            Stat::Fragments => "fragments",
            Stat::Unparsed => "unparsed",
            Stat::BridgeBlocked => "bridge_blocked",
        }
    }
}
