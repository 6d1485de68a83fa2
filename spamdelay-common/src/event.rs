//! The verdict event the kernel writes to the ring buffer, one per flow.

use crate::{FlowKey, PAYLOAD_CAPTURE};

/// What the kernel concluded about a verified flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The client sent payload before the greeting was complete.
    EarlyTalk = 1,
    /// The client closed (FIN or RST) before the greeting, having sent nothing.
    Quit = 2,
    /// The greeting completed and the client had stayed silent (but for one
    /// PIPECONNECT `EHLO`, where the MTA advertises it).
    Pass = 3,
    /// A single `EHLO` line ahead of the greeting, allowed because the MTA
    /// advertises PIPECONNECT; the flow stays followed.
    EarlyEhlo = 4,
}

impl Verdict {
    pub fn from_u8(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::EarlyTalk),
            2 => Some(Self::Quit),
            3 => Some(Self::Pass),
            4 => Some(Self::EarlyEhlo),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub key: FlowKey,
    /// Nanoseconds from the handshake's completion to the verdict.
    pub since_handshake_ns: u64,
    /// Payload bytes in the client's offending segment (EARLY-TALK only).
    pub bytes: u32,
    /// A `Verdict` as u8.
    pub verdict: u8,
    /// How many bytes of `payload` are valid.
    pub captured: u8,
    pub _pad: [u8; 2],
    pub payload: [u8; PAYLOAD_CAPTURE],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Event {}
