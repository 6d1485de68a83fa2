//! Command line: `spamdelay run ...`. Values are parsed into their types here,
//! at the boundary, so the rest of the daemon never sees a bad port or CIDR.

use clap::{Args, Parser, Subcommand};

use crate::allow::Cidr;

#[derive(Parser, Debug)]
#[command(
    name = "spamdelay",
    version,
    about = "Catch SMTP early talkers in the kernel and ban them in the firewall"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to interfaces and report every SMTP client's verdict.
    Run(RunArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Interface whose inbound SMTP flows are watched (repeat for several).
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    pub ifaces: Vec<String>,

    /// SMTP server port to watch (repeat for several, at most 8).
    #[arg(
        long = "port",
        value_name = "PORT",
        default_value = "25",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub ports: Vec<u16>,

    /// Client address or network never to flag, e.g. 192.0.2.0/24 or
    /// 2001:db8::/32 (repeat for several). Loopback and this host's own
    /// addresses are always allowed.
    #[arg(long = "allow", value_name = "CIDR")]
    pub allow: Vec<Cidr>,

    /// Detect and log only; never ban.
    #[arg(long)]
    pub dry_run: bool,

    /// Flows followed at once; the oldest are forgotten beyond this.
    #[arg(long, value_name = "N", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_flows: u32,
}
