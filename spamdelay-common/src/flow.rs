//! The key of a watched TCP flow: client and server address and port. IPv4
//! addresses occupy the first four bytes of the address fields, the rest zero.

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Aligned to 8 (same size and offsets as with its natural 2): the kernel
/// reads it as five 64-bit words to fingerprint it (spamdelay-ebpf's
/// `done.rs`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowKey {
    /// Client address, network byte order.
    pub client: [u8; 16],
    /// Server address, network byte order.
    pub server: [u8; 16],
    /// Client port, host byte order.
    pub client_port: u16,
    /// Server port, host byte order.
    pub server_port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    unsafe impl aya::Pod for FlowKey {}

    fn addr(family: u8, raw: &[u8; 16]) -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw))
        }
    }

    impl FlowKey {
        pub fn client_addr(&self) -> SocketAddr {
            SocketAddr::new(addr(self.family, &self.client), self.client_port)
        }

        pub fn server_addr(&self) -> SocketAddr {
            SocketAddr::new(addr(self.family, &self.server), self.server_port)
        }
    }
}

/// Verified; waiting for the greeting with the client silent so far (or
/// having sent only a benign probe).
pub const STATE_GREETING: u8 = 2;
/// Verdict given (or client allowlisted): nothing more to follow until close.
pub const STATE_DONE: u8 = 3;

/// The client's early bytes were a benign probe: more talk is still judged,
/// but the greeting is no PASS.
pub const FLAG_PROBED: u8 = 1;

/// A handshake in progress (`HALF_OPEN` map): the server's SYN-ACK left, the
/// client's ACK not seen yet. Kept apart from verified flows so that a flood
/// of forged SYNs can never evict a flow that is waiting for its greeting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HalfOpen {
    /// The server's initial sequence number.
    pub server_isn: u32,
    /// The client's next sequence number as the SYN-ACK acknowledged it.
    pub client_next: u32,
    /// The receive window the SYN-ACK offered (never scaled in a SYN).
    pub window: u32,
    /// Bytes of the client's SYN that the SYN-ACK acknowledged (Fast Open).
    pub syn_data: u32,
    /// The client is allowlisted: follow nothing, but keep the flow known.
    pub allowlisted: u8,
    pub _pad: [u8; 7],
}

/// The first bytes of a client's SYN that carried data (TCP Fast Open), kept
/// from the SYN until the handshake tells whether the server took them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SynData {
    /// The SYN's sequence number (the client's ISN).
    pub isn: u32,
    /// Its payload length.
    pub len: u32,
    /// Valid bytes in `payload`.
    pub captured: u8,
    pub _pad: [u8; 7],
    pub payload: [u8; crate::PAYLOAD_CAPTURE],
}

/// Per-flow state of a verified flow in the kernel's LRU flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Flow {
    /// CLOCK_BOOTTIME (`bpf_ktime_get_boot_ns()`) when the handshake was
    /// verified: the clock of the passes and the bridge block too, so that a
    /// verdict reads one clock, once.
    pub verified_ns: u64,
    /// The server's initial sequence number (from its SYN-ACK).
    pub server_isn: u32,
    /// The server's `rcv_nxt`: the client's next in-order sequence number.
    pub client_next: u32,
    /// The server's `snd_nxt`: the next server stream byte, also what the
    /// greeting scanner expects next.
    pub server_next: u32,
    pub state: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub scanner: crate::GreetingScanner,
}

/// A client address, key of the passers map (`PASSERS`), of the bridge
/// block (`BRIDGE`) and of the PIPECONNECT host lists: IPv4 in the first
/// four bytes, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClientAddr {
    pub addr: [u8; 16],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A benign probe (`PROBES` map key): its exact bytes, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeKey {
    pub len: u32,
    pub bytes: [u8; crate::PAYLOAD_CAPTURE],
}

/// `PIPECONNECT` global: the MTA advertises PIPECONNECT to nobody, to
/// everyone, or to the hosts in the `PIPE_V4`/`PIPE_V6` tries.
pub const PIPECONNECT_OFF: u8 = 0;
pub const PIPECONNECT_ALL: u8 = 1;
pub const PIPECONNECT_LISTED: u8 = 2;

/// Passers remembered at once (LRU beyond).
pub const PASSERS_MAX: u32 = 65536;
/// Bridge-blocked early talkers remembered at once (LRU beyond).
pub const BRIDGE_MAX: u32 = 16384;
/// Benign probes at most.
pub const PROBES_MAX: u32 = 64;

#[cfg(feature = "user")]
mod user_pod {
    use super::*;
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for HalfOpen {}
    unsafe impl aya::Pod for SynData {}
    unsafe impl aya::Pod for ClientAddr {}
    unsafe impl aya::Pod for ProbeKey {}
}
