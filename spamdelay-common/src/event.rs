//! The verdict event the kernel writes to the ring buffer, one per flow
//! (a PROBE may precede the flow's final verdict).

use crate::{FlowKey, PAYLOAD_CAPTURE};

/// What the kernel concluded about a verified flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The client sent payload the server's TCP accepted before the greeting
    /// was complete.
    EarlyTalk = 1,
    /// The client closed (an in-order FIN, or an RST at exactly the next
    /// sequence number) before the greeting, having sent nothing.
    Quit = 2,
    /// The greeting completed and the client had stayed silent.
    Pass = 3,
    /// Early talk forgiven: the MTA advertises PIPECONNECT to this client and
    /// it passed (waited for a greeting here) within the pass TTL.
    Pipeconnect = 4,
    /// Early talk that is exactly a known harmless probe (Thunderbird's
    /// account-setup `EHLO`); the flow stays followed, so more talk after it
    /// is still EARLY-TALK.
    Probe = 5,
}

impl Verdict {
    pub fn from_u8(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::EarlyTalk),
            2 => Some(Self::Quit),
            3 => Some(Self::Pass),
            4 => Some(Self::Pipeconnect),
            5 => Some(Self::Probe),
            _ => None,
        }
    }
}

/// `Event::how` bits: how the early bytes arrived.
/// In an IP fragment: `bytes` counts only the first fragment's share.
pub const HOW_FRAGMENT: u8 = 1;
/// In the client's SYN (TCP Fast Open), acknowledged by the server's SYN-ACK.
pub const HOW_SYN: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub key: FlowKey,
    /// Nanoseconds from the handshake's completion to the verdict.
    pub since_handshake_ns: u64,
    /// PIPECONNECT: when the client passed before (CLOCK_BOOTTIME ns).
    pub passed_boot_ns: u64,
    /// New payload bytes the server accepted from the offending segment
    /// (EARLY-TALK, PIPECONNECT, PROBE).
    pub bytes: u32,
    /// A `Verdict` as u8.
    pub verdict: u8,
    /// How many bytes of `payload` are valid.
    pub captured: u8,
    /// `HOW_*` bits.
    pub how: u8,
    pub _pad: u8,
    pub payload: [u8; PAYLOAD_CAPTURE],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Event {}
