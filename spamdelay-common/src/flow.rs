//! The key of a watched TCP flow: client and server address and port. IPv4
//! addresses occupy the first four bytes of the address fields, the rest zero.

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

#[repr(C)]
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

/// Handshake half done: the server's SYN-ACK left, the client's ACK not seen.
pub const STATE_HANDSHAKE: u8 = 1;
/// Verified; waiting for the greeting with the client silent so far.
pub const STATE_GREETING: u8 = 2;
/// Verdict given (or client allowlisted): nothing more to follow until close.
pub const STATE_DONE: u8 = 3;

/// The client sent its one PIPECONNECT `EHLO` line ahead of the greeting.
pub const FLAG_EARLY_EHLO: u8 = 1;

/// Per-flow state in the kernel's LRU flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Flow {
    /// `bpf_ktime_get_ns()` when the handshake was verified.
    pub verified_ns: u64,
    /// The server's initial sequence number (from its SYN-ACK).
    pub server_isn: u32,
    /// The client's next sequence number, as the server's SYN-ACK acknowledged it.
    pub client_next: u32,
    /// The next server stream byte the greeting scanner expects.
    pub server_next: u32,
    pub state: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub scanner: crate::GreetingScanner,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Flow {}
