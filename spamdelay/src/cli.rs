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
    /// Check a config file (`--config FILE`, or /etc/spamdelay/spamdelay.toml)
    /// and print the settings `run` would start with; unknown keys and bad
    /// values are errors that name them.
    CheckConfig,
    /// Detach the programs a daemon left attached (pinned in its
    /// `--pin-dir`) and remove their pins, for good.
    Detach {
        /// The daemon's `--pin-dir`.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Where `--pin-dir` usually points (systemd mounts the BPF filesystem there).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/spamdelay";

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

/// A duration that may be `0` (off): `--bridge-time`.
pub fn duration_or_off(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("bad duration '{s}' ({e}): use e.g. 10s, 1m, or 0 for off"))
}

/// `--greet-pause`: read from the MTA, or given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseSetting {
    Auto,
    Fixed(Duration),
}

/// Well-known ports where the client speaks first. spamdelay flags a
/// client that talks before the server's greeting, so there it would flag
/// (and ban) every client. Implicit TLS (RFC 8314 for 465) opens with the
/// client's ClientHello; HTTP with the client's request.
const CLIENT_FIRST: [(u16, &str, &str); 6] = [
    (80, "http", "its HTTP request"),
    (443, "https, implicit TLS", "TLS ClientHello"),
    (465, "submissions, implicit TLS", "TLS ClientHello"),
    (636, "ldaps, implicit TLS", "TLS ClientHello"),
    (993, "imaps, implicit TLS", "TLS ClientHello"),
    (995, "pop3s, implicit TLS", "TLS ClientHello"),
];

/// `--port`: 1 to 65535, and not a port where the client speaks first.
pub fn port(s: &str) -> Result<u16, String> {
    let port = s
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| "not a port number (1-65535): SMTP is on 25, 587 or 2525".to_string())?;
    match CLIENT_FIRST.iter().find(|(p, ..)| *p == port) {
        Some((_, name, first)) => Err(format!(
            "on {port} ({name}) the client speaks first ({first}), so every client would be flagged; watch 25 or 587 (STARTTLS) instead"
        )),
        None => Ok(port),
    }
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
        value_parser = port
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

    /// From an early talk on, drop the talker's new SYNs in the kernel for
    /// this long, bridging the moment until its nftables ban is in place
    /// (`0`: off; always off in a dry run).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration_or_off)]
    pub bridge_time: Duration,

    /// Pin the TCX links and the kernel state here (on a BPF filesystem;
    /// one is mounted on /sys/fs/bpf when missing): the programs stay
    /// attached when the daemon exits or dies, verdicts wait for the next
    /// `run`, which adopts them; `spamdelay detach` removes them.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// Pin nothing: the programs are detached when the daemon exits.
    #[arg(long)]
    pub no_pin: bool,

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

    /// Ban this IPv6 prefix around an offender (128: the address alone; 64:
    /// its /64, as cheap as an address; other lengths go to an interval
    /// set, slower to add to as it grows).
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u8).range(16..=128))]
    pub ipv6_prefix: u8,

    /// Once this many addresses of one IPv6 /64 are banned, ban the /64
    /// instead (an attacker who owns it cannot fill the set; 0: off).
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub ipv6_aggregate: u32,

    /// What nftables does to a banned client's connection.
    #[arg(long, value_enum, default_value_t = Action::Reject)]
    pub action: Action,

    /// Capacity of each nft set (IPv4, IPv6): the default holds a flood of
    /// 100,000 distinct offenders and more (an element costs some 100 bytes
    /// of kernel memory only while it exists).
    #[arg(long, value_name = "N", default_value_t = 262_144,
          value_parser = clap::value_parser!(u32).range(16..))]
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

    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (e.g.
    /// 127.0.0.1:9469; off by default).
    #[arg(long, value_name = "ADDR:PORT", value_parser = crate::exporter::listen_addr)]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Also write every verdict, ban and unban to FILE, one JSON object per
    /// line (created with mode 0640; reopened on SIGHUP, for logrotate).
    #[arg(long, value_name = "FILE")]
    pub event_log: Option<PathBuf>,

    #[command(flatten)]
    pub fleet: crate::fleet::FleetArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> RunArgs {
        let argv = ["spamdelay", "run", "--iface", "eth0"]
            .iter()
            .chain(extra)
            .copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => *args,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn bridge_time_defaults_to_ten_seconds_and_zero_is_off() {
        assert_eq!(run_args(&[]).bridge_time, Duration::from_secs(10));
        assert_eq!(
            run_args(&["--bridge-time", "0"]).bridge_time,
            Duration::ZERO
        );
        assert_eq!(
            run_args(&["--bridge-time", "2m"]).bridge_time,
            Duration::from_secs(120)
        );
        let config = crate::config::to_args("bridge-time = \"30s\"").unwrap();
        assert_eq!(config, ["--bridge-time", "30s"]);
        assert!(
            Cli::try_parse_from(["spamdelay", "run", "--iface", "e", "--bridge-time", "x"])
                .is_err()
        );
    }

    #[test]
    fn ports_where_the_client_speaks_first_are_refused() {
        for p in [80, 443, 465, 636, 993, 995] {
            let err = port(&p.to_string()).expect_err("a client-first port");
            assert!(err.starts_with(&format!("on {p} (")), "{err}");
            assert!(err.contains("the client speaks first"), "{err}");
        }
        assert_eq!(
            port("465"),
            Err("on 465 (submissions, implicit TLS) the client speaks first (TLS ClientHello), so every client would be flagged; watch 25 or 587 (STARTTLS) instead".to_string())
        );
        for p in [25, 587, 2525, 1, 65535] {
            assert_eq!(port(&p.to_string()), Ok(p));
        }
        for bad in ["0", "65536", "smtp", ""] {
            assert!(port(bad).is_err(), "{bad}");
        }
        // The config file goes through the same parser.
        let mut argv = vec!["spamdelay".to_string(), "run".to_string()];
        argv.extend(crate::config::to_args("iface = [\"eth0\"]\nport = [25, 465]").unwrap());
        let err = Cli::try_parse_from(argv).expect_err("465 from the config file");
        assert!(
            err.to_string()
                .contains("invalid value '465' for '--port <PORT>': on 465 (submissions"),
            "{err}"
        );
    }

    #[test]
    fn state_is_pinned_by_default_and_no_pin_turns_it_off() {
        let args = run_args(&[]);
        assert_eq!(args.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(!args.no_pin);
        assert!(run_args(&["--no-pin"]).no_pin);
        match Cli::try_parse_from(["spamdelay", "detach"])
            .unwrap()
            .command
        {
            Command::Detach { pin_dir } => assert_eq!(pin_dir, PathBuf::from(DEFAULT_PIN_DIR)),
            other => panic!("not detach: {other:?}"),
        }
    }
}
