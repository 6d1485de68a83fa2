//! spamdelay's daemon and admin CLI as a library, so the end-to-end tests and
//! the demo drive exactly the code the binary runs.

pub mod admin;
pub mod allow;
pub mod banpath;
pub mod bans;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod duration;
pub mod enforcer;
pub mod eventlog;
pub mod events;
pub mod exporter;
pub mod fleet;
pub mod guard;
pub mod loader;
pub mod metrics;
pub mod mta;
pub mod netlink;
pub mod nft;
pub mod notify;
pub mod passcache;
pub mod policy;
pub mod privilege;
pub mod probes;
