//! Types shared by the kernel program and the daemon: the flow key, the verdict
//! event, the counters and the pure protocol logic both sides can test.
#![no_std]

pub mod event;
pub mod flow;
pub mod greeting;
pub mod stats;

#[cfg(feature = "user")]
extern crate std;

pub use event::{Event, Verdict};
pub use flow::{ClientAddr, FAMILY_V4, FAMILY_V6, Flow, FlowKey};
pub use greeting::GreetingScanner;
pub use stats::Stat;

/// At most this many server ports are watched (`--port`).
pub const MAX_PORTS: usize = 8;
/// The first payload bytes an EARLY-TALK event carries.
pub const PAYLOAD_CAPTURE: usize = 64;
