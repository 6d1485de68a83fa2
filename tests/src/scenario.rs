//! A test scenario: the lab, test SMTP servers on chosen ports, and the real
//! daemon attached to the server side; clients run from lab addresses.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    smtp::{Greeting, Listen, TestServer},
};

pub const VERDICT_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for a verdict that must not come.
pub const QUIET_WAIT: Duration = Duration::from_millis(700);

pub struct Scenario {
    pub lab: Lab,
    pub daemon: Daemon,
    servers: Vec<TestServer>,
}

impl Scenario {
    pub fn new(greeting: Greeting, extra: &[&str]) -> Self {
        Self::with_ports(greeting, &[25], extra)
    }

    pub fn with_ports(greeting: Greeting, ports: &[u16], extra: &[&str]) -> Self {
        Self::prepared(greeting, ports, extra, |_| {})
    }

    /// Runs `before` on the lab before the daemon starts (an admin's own
    /// firewall table, say).
    pub fn prepared(
        greeting: Greeting,
        ports: &[u16],
        extra: &[&str],
        before: impl FnOnce(&Lab),
    ) -> Self {
        Self::build(greeting, Listen::default(), ports, extra, before)
    }

    /// A server on port 25 that listens with `listen` (Fast Open, say).
    pub fn listening(greeting: Greeting, listen: Listen, extra: &[&str]) -> Self {
        Self::build(greeting, listen, &[25], extra, |_| {})
    }

    fn build(
        greeting: Greeting,
        listen: Listen,
        ports: &[u16],
        extra: &[&str],
        before: impl FnOnce(&Lab),
    ) -> Self {
        let lab = Lab::new().expect("building the namespace lab");
        before(&lab);
        let servers = ports
            .iter()
            .map(|&p| {
                TestServer::start_with(&lab.server, p, greeting, listen)
                    .expect("starting the test server")
            })
            .collect();
        // No MTA configuration from the host: tests say what they want.
        let mut args = vec!["--iface", SERVER_IF, "--mta", "none"];
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&lab.server, &args).expect("starting spamdelay");
        Scenario {
            lab,
            daemon,
            servers,
        }
    }

    /// The test server on the first port.
    ///
    /// # Panics
    /// If the scenario has no server.
    pub fn server(&self) -> &TestServer {
        self.servers.first().expect("a scenario with a test server")
    }

    /// Runs a client from lab address `i` against `port` and returns the
    /// client's socket address as spamdelay logs it.
    pub fn client(
        &self,
        i: u8,
        v6: bool,
        port: u16,
        f: impl FnOnce(IpAddr, SocketAddr) -> anyhow::Result<u16> + Send + 'static,
    ) -> SocketAddr {
        self.lab.run_client(i, v6, port, f)
    }

    pub fn verdict(&self, client: SocketAddr) -> String {
        self.daemon
            .verdict_for(client, VERDICT_WAIT)
            .unwrap_or_else(|| panic!("no verdict for {client}; log: {:#?}", self.daemon.lines()))
    }

    pub fn no_verdict(&self, client: SocketAddr) {
        let got = self.daemon.verdict_for(client, QUIET_WAIT);
        assert!(got.is_none(), "unexpected verdict for {client}: {got:?}");
    }

    /// Stops the daemon (SIGTERM must exit 0) and returns its log.
    pub fn stop(self) -> Vec<String> {
        let (status, lines) = self.daemon.stop().expect("stopping spamdelay");
        assert!(
            status.success(),
            "spamdelay exited with {status}: {lines:#?}"
        );
        lines
    }
}
