//! Exim 4 as a sending MTA in a lab's client namespace: the server fixture's
//! binary, private directory and base config, a manualroute to the lab's
//! server, and PIPECONNECT (with TCP Fast Open when asked) as real senders use it.

use std::{
    fmt, fs,
    net::IpAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use super::{base_config, exim_command, mainlog, private_dir, stop};
use crate::lab::{Netns, SERVER_V4};

/// Every test message's envelope.
pub const SENDER: &str = "sender@example.com";
pub const RECIPIENT: &str = "rcpt@example.test";
/// The name the client says EHLO with.
pub const HELO: &str = "c.example";

/// What Exim's transport debug says when it sends its opening ahead of the
/// banner because its hints database remembers a PIPECONNECT advertisement.
pub const EARLY_PIPE: &str = "Using cached cleartext PIPECONNECT";
/// ... and when the server's SYN-ACK acknowledged data carried in the SYN.
pub const SYN_DATA_ACKED: &str = "TFO: data was acked";

/// A delivery's limit: the server's delay and a margin (Exim's own timeouts
/// are minutes).
const DELIVERY_WAIT: Duration = Duration::from_secs(30);

/// An Exim that sends from one lab client address to the lab's server, one
/// message per [`EximClient::send`]. Like any Exim 4.96 with
/// `hosts_pipe_connect`, it caches what the server's EHLO advertised: after
/// one delivery to a server that advertises PIPECONNECT, it sends `EHLO`,
/// `MAIL`, `RCPT` and `BDAT` with the message ahead of the banner.
pub struct EximClient {
    dir: TempDir,
    config: PathBuf,
    fast_open: bool,
    sent: u32,
}

impl EximClient {
    /// A client sending from `interface` (a lab client address), trying TCP
    /// Fast Open when `fast_open` (which also needs `net.ipv4.tcp_fastopen`
    /// in both namespaces).
    pub fn new(interface: IpAddr, fast_open: bool) -> Result<Self> {
        let dir = private_dir("spamdelay-exim-client-")?;
        let config = dir.path().join("exim.conf");
        let client = EximClient {
            dir,
            config,
            fast_open,
            sent: 0,
        };
        client.send_from(interface)?;
        Ok(client)
    }

    /// Sends from `interface` from now on, as a sender with several
    /// addresses does. What it cached about the server comes along: Exim
    /// keys its hints by the server's address alone.
    pub fn send_from(&self, interface: IpAddr) -> Result<()> {
        fs::write(
            &self.config,
            config_text(self.dir.path(), interface, self.fast_open),
        )
        .with_context(|| format!("writing {}", self.config.display()))
    }

    /// Submits one message and waits until Exim has tried to deliver it
    /// (`-odf`: the delivery runs before the command returns).
    pub fn send(&mut self, ns: &Netns) -> Result<Delivery> {
        self.sent += 1;
        let n = self.sent;
        let message = self.dir.path().join(format!("message-{n}"));
        fs::write(
            &message,
            format!("Subject: spamdelay test {n}\n\nMessage {n} from the lab's client Exim.\n"),
        )
        .context("writing a test message")?;
        let debug = self.dir.path().join(format!("debug-{n}"));
        let before = self.log().len();
        // -d-all+transport: only the smtp transport's story (the cached
        // PIPECONNECT, the TFO outcome, the SMTP exchange), on stderr.
        let mut child = exim_command(ns, self.dir.path(), &self.config)
            .args(["-odf", "-d-all+transport", "-f", SENDER, RECIPIENT])
            .stdin(fs::File::open(&message).context("opening the test message")?)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&debug).context("creating the debug file")?)
            .process_group(0)
            .spawn()
            .context("starting the client Exim")?;
        let deadline = Instant::now() + DELIVERY_WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for the client Exim")? {
                break status;
            }
            if Instant::now() > deadline {
                stop(&mut child);
                bail!(
                    "the client Exim did not finish message {n} within {DELIVERY_WAIT:?}:\n{}",
                    fs::read_to_string(&debug).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Ok(Delivery {
            status,
            log: self.log().get(before..).unwrap_or_default().to_string(),
            debug: fs::read_to_string(&debug).unwrap_or_default(),
        })
    }

    /// The client's main log so far.
    pub fn log(&self) -> String {
        mainlog(self.dir.path())
    }
}

/// One message's delivery attempt, as the client saw it.
pub struct Delivery {
    pub status: ExitStatus,
    /// The lines the attempt added to the client's main log: `<=`, then
    /// `=>` when the server took the message, or the error.
    pub log: String,
    /// The smtp transport's debug output.
    pub debug: String,
}

impl Delivery {
    /// The `=>` line, when the server took the message.
    pub fn delivered(&self) -> Option<&str> {
        let to = format!(" => {RECIPIENT} ");
        self.log.lines().find(|l| l.contains(&to))
    }

    /// Whether the `=>` line carries `flag`: `L*` (the opening went ahead
    /// of the banner), `TFO*` (it rode in the SYN).
    pub fn delivered_with(&self, flag: &str) -> bool {
        self.delivered()
            .is_some_and(|l| l.split_whitespace().any(|w| w == flag))
    }

    /// Whether Exim sent its opening ahead of the banner, trusting its cache.
    pub fn piped_early(&self) -> bool {
        self.debug.contains(EARLY_PIPE)
    }

    /// Whether the server's SYN-ACK acknowledged data sent in the SYN.
    pub fn syn_data_acked(&self) -> bool {
        self.debug.contains(SYN_DATA_ACKED)
    }

    /// The debug lines of the smtp transport run, without the banners of
    /// every process Exim forked on the way.
    pub fn transport_debug(&self) -> &str {
        let start = self.debug.find(TRANSPORT_ENTERED).unwrap_or(0);
        let end = self.debug[start..]
            .find(TRANSPORT_LEFT)
            .map_or(self.debug.len(), |i| start + i + TRANSPORT_LEFT.len());
        &self.debug[start..end]
    }
}

/// Where the smtp transport's debug begins and ends.
const TRANSPORT_ENTERED: &str = "lab_smtp transport entered";
const TRANSPORT_LEFT: &str = "Leaving lab_smtp transport";

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Exim {}\nclient log:\n{}transport debug:\n{}",
            self.status,
            self.log,
            self.transport_debug()
        )
    }
}

/// The client's config: the shared base, one router that sends the
/// server's domain to 192.0.2.25, and an smtp transport bound to
/// `interface` that pipes ahead of the banner wherever PIPECONNECT was seen.
/// No retry rules: a temporary error fails the message at once (its bounce
/// has no route and is frozen), so every send is one connection attempt.
/// A short `command_timeout`: Exim 4.96 whose early-piped connect is refused
/// (a ban's reset) still waits that long for a banner.
fn config_text(dir: &Path, interface: IpAddr, fast_open: bool) -> String {
    let base = base_config(dir, HELO);
    let fast_open = if fast_open { "*" } else { "" };
    format!(
        "\
{base}# L* and TFO* on the => lines.
log_selector = +pipelining +outgoing_port

begin routers

lab_server:
  driver = manualroute
  domains = example.test
  route_list = * {SERVER_V4}
  transport = lab_smtp

begin transports

lab_smtp:
  driver = smtp
  interface = <; {interface}
  hosts_pipe_connect = *
  hosts_try_fastopen = {fast_open}
  command_timeout = 10s
"
    )
}
