//! spamdelay's daemon and admin CLI as a library, so the end-to-end tests and
//! the demo drive exactly the code the binary runs.

pub mod allow;
pub mod cli;
pub mod daemon;
pub mod events;
pub mod loader;
pub mod privilege;
