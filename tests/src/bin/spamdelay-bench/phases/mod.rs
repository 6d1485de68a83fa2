//! The eight measurements, each in a file of its own, in the order they run,
//! and the plan that sizes them (`--quick` or the full run).

mod backlog;
mod bridge;
mod connection_rate;
mod fail2ban;
mod fleet;
mod flood;
mod kernel_cost;
mod kernel_segments;
mod throughput;
mod time_to_ban;

use std::time::Duration;

use anyhow::Result;

use crate::report::Outcome;

/// How much of everything.
pub(crate) struct Plan {
    pub(crate) quick: bool,
    /// A/B rounds per comparison.
    rounds: usize,
    /// iperf3 run length per side and round.
    iperf_secs: u32,
    /// smtp-source sessions per side and round for the kernel cost.
    kernel_sessions: u32,
    /// Target length of one connection-rate measurement.
    rate_secs: f64,
    /// Time to ban: clients at a modest rate, then as many at once.
    ttb_clients: u32,
    ttb_rate: f64,
    /// Flood scale: distinct early talkers, and the longest wait for bans.
    flood_clients: u32,
    flood_wait: Duration,
    /// fail2ban side by side: clients and their rate.
    f2b_clients: u32,
    f2b_rate: f64,
    /// Bridge block: blind clients that reconnect at once, and their rate.
    bridge_clients: u32,
    bridge_rate: f64,
    /// Fleet propagation: blind clients at MX-A, and their rate.
    fleet_clients: u32,
    fleet_rate: f64,
}

impl Plan {
    pub(crate) fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 3,
                iperf_secs: 1,
                kernel_sessions: 300,
                rate_secs: 1.0,
                ttb_clients: 1000,
                ttb_rate: 100.0,
                flood_clients: 10_000,
                flood_wait: Duration::from_secs(60),
                f2b_clients: 30,
                f2b_rate: 10.0,
                bridge_clients: 1000,
                bridge_rate: 200.0,
                fleet_clients: 30,
                fleet_rate: 3.0,
            }
        } else {
            Plan {
                quick,
                rounds: 7,
                iperf_secs: 2,
                kernel_sessions: 1000,
                rate_secs: 3.0,
                ttb_clients: 1000,
                ttb_rate: 100.0,
                flood_clients: 100_000,
                flood_wait: Duration::from_secs(150),
                f2b_clients: 80,
                f2b_rate: 10.0,
                bridge_clients: 1000,
                bridge_rate: 100.0,
                fleet_clients: 100,
                fleet_rate: 5.0,
            }
        }
    }
}

type Phase = fn(&Plan) -> Result<Outcome>;

pub(crate) const PHASES: [(u8, &str, Phase); 8] = [
    (1, "kernel cost per packet", kernel_cost::kernel_cost),
    (2, "throughput", throughput::throughput),
    (3, "SMTP connection rate", connection_rate::connection_rate),
    (4, "time to ban", time_to_ban::time_to_ban),
    (5, "flood scale", flood::flood_scale),
    (6, "side by side with fail2ban", fail2ban::versus_fail2ban),
    (7, "bridge block", bridge::bridge_block),
    (8, "fleet propagation", fleet::fleet_propagation),
];
