//! Command line: `spamdelay run | list | ban | unban | status`. Values are
//! parsed into their types here, at the boundary, so the rest of the program
//! never sees a bad port, CIDR or duration.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    allow::Cidr, mta::MtaKind, nft::Action, passcache::Format as PassFormat, probes::Probe,
};

#[derive(Parser, Debug)]
#[command(
    args_override_self = true,
    name = "spamdelay",
    version,
    about = "Catch SMTP early talkers in the kernel and ban them in the firewall"
)]
pub struct Cli {
    /// Where bans and the daemon's status are kept.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/var/lib/spamdelay"
    )]
    pub state_dir: PathBuf,

    /// Settings for `run` (TOML, its flags as keys); /etc/spamdelay/spamdelay.toml
    /// is read when it exists. The command line wins over the file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to interfaces, report every SMTP client's verdict, ban early talkers.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Show the bans in force: address, time left, offences, reason.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Ban an address or network by hand.
    Ban {
        /// ADDRESS or ADDRESS/PREFIX.
        cidr: Cidr,
        /// How long.
        #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = duration)]
        time: Duration,
        /// Shown in `list` and in nft's element comment.
        #[arg(long, value_name = "TEXT", default_value = "manual ban")]
        reason: String,
    },
    /// Lift a ban (and forget the offences) of an address or network.
    Unban {
        /// ADDRESS or ADDRESS/PREFIX: lifts every ban inside it.
        cidr: Cidr,
    },
    /// The daemon's state, the kernel's counters and the ban counts.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `90s`, `15m`, `1h`, `7d`, `1h 30m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("bad duration '{s}' ({e}): use e.g. 90s, 15m, 1h, 7d"))
        .and_then(|d| {
            if d.as_secs() == 0 {
                Err(format!("bad duration '{s}': at least 1s"))
            } else {
                Ok(d)
            }
        })
}

/// `--greet-pause`: read from the MTA, or given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseSetting {
    Auto,
    Fixed(Duration),
}

fn pause_setting(s: &str) -> Result<PauseSetting, String> {
    if s == "auto" {
        return Ok(PauseSetting::Auto);
    }
    duration(s).map(PauseSetting::Fixed)
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

    /// Detect and log (`would ban`) only; never touch nftables.
    #[arg(long)]
    pub dry_run: bool,

    /// Ban time for a first offence.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
    pub ban_time: Duration,

    /// Ceiling for repeat offenders, whose ban time doubles per offence.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = duration)]
    pub max_ban_time: Duration,

    /// How long offences are remembered after a ban ends.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = duration)]
    pub remember: Duration,

    /// Also ban clients that hang up before the greeting (QUIT).
    #[arg(long)]
    pub ban_quitters: bool,

    /// Ban this IPv6 prefix around an offender (128: the address alone; 64: its /64).
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u8).range(16..=128))]
    pub ipv6_prefix: u8,

    /// What nftables does to a banned client's connection.
    #[arg(long, value_enum, default_value_t = Action::Reject)]
    pub action: Action,

    /// Capacity of each nft set (IPv4, IPv6).
    #[arg(long, value_name = "N", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub set_size: u32,

    /// The MTA whose greet pause and PIPECONNECT setting spamdelay follows.
    #[arg(long, value_enum, default_value_t = MtaKind::Auto)]
    pub mta: MtaKind,

    /// Its configuration: Postfix's config directory, Exim's config file,
    /// or sendmail.cf (default: where Debian puts them).
    #[arg(long, value_name = "PATH")]
    pub mta_config: Option<PathBuf>,

    /// The MTA's greet pause, or `auto` to read it from the MTA's configuration.
    #[arg(long, value_name = "DURATION|auto", default_value = "auto", value_parser = pause_setting)]
    pub greet_pause: PauseSetting,

    /// Write clients that waited for the greeting to this file, so an MTA
    /// without a pass cache of its own can skip their pause next time.
    #[arg(long, value_name = "FILE")]
    pub pass_cache: Option<PathBuf>,

    /// The pass cache's format.
    #[arg(long, value_enum, default_value_t = PassFormat::Plain)]
    pub pass_cache_format: PassFormat,

    /// How long a pass is remembered: for the pass cache, and for
    /// PIPECONNECT (early talk from a client that passed within this is
    /// forgiven where the MTA advertises PIPECONNECT).
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = duration)]
    pub pass_ttl: Duration,

    /// Early talk that is exactly this line (CRLF added; \r \n \xHH
    /// escapes) is a harmless probe: logged as PROBE, never banned. Repeat
    /// for several; Thunderbird's `EHLO we-guess.mozilla.org` is known.
    #[arg(long = "benign-probe", value_name = "TEXT")]
    pub benign_probes: Vec<Probe>,

    /// Forget the built-in benign probes (Thunderbird's account setup).
    #[arg(long)]
    pub no_default_probes: bool,

    /// Shell command run after the pass cache is rewritten (`makemap ...`, `postmap ...`).
    #[arg(long, value_name = "CMD")]
    pub pass_cache_reload: Option<String>,

    /// Flows followed at once; the oldest are forgotten beyond this.
    #[arg(long, value_name = "N", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_flows: u32,
}
