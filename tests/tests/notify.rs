//! systemd's notify protocol, against a datagram socket the test owns as
//! systemd would: READY=1 comes only once the programs are attached and
//! `table inet spamdelay` exists, STATUS= carries the counts, WATCHDOG=1
//! comes when a watchdog is set, RELOADING=1 then READY=1 on SIGHUP, and
//! STOPPING=1 on SIGTERM.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use spamdelay_tests::{
    bench::tcx_programs,
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    nft, privileged,
    scenario::VERDICT_WAIT,
    smtp::{self, Greeting, TestServer},
};

/// What systemd would have received: each datagram's lines, in order.
struct Notified {
    socket: UnixDatagram,
    got: Vec<String>,
}

impl Notified {
    fn bind(path: &std::path::Path) -> Notified {
        let socket = UnixDatagram::bind(path).expect("binding the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        Notified {
            socket,
            got: Vec::new(),
        }
    }

    /// Reads datagrams until one has a line `pred` accepts, or `limit`.
    fn wait(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            self.got.extend(lines.iter().cloned());
            if let Some(hit) = lines.into_iter().find(|l| pred(l)) {
                return Some(hit);
            }
        }
        None
    }
}

#[test]
fn systemd_hears_ready_status_watchdog_reload_and_stopping() {
    if !privileged("systemd_hears_ready_status_watchdog_reload_and_stopping") {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let _server = TestServer::start(&lab.server, 25, Greeting::pause(1500)).expect("test server");
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("notify.sock");
    let mut notified = Notified::bind(&path);
    let socket = path.to_str().expect("a UTF-8 path").to_string();

    let daemon = std::thread::scope(|scope| {
        let starting = scope.spawn(|| {
            Daemon::start_with_env(
                &lab.server,
                &["--iface", SERVER_IF, "--mta", "none"],
                &[
                    ("NOTIFY_SOCKET", socket.as_str()),
                    ("WATCHDOG_USEC", "1000000"),
                ],
            )
        });
        let ready = notified.wait(Duration::from_secs(30), |l| l == "READY=1");
        // Checked the moment READY=1 arrives: both must already be there.
        let table = nft::nft(&lab.server, &["list", "table", "inet", "spamdelay"]);
        let programs = tcx_programs(&lab.server, SERVER_IF).expect("querying TCX");
        assert!(ready.is_some(), "no READY=1: {:?}", notified.got);
        assert!(
            table.is_ok(),
            "READY=1 before table inet spamdelay existed: {table:?}"
        );
        let names: Vec<&str> = programs.iter().map(|p| p.name.as_str()).collect();
        assert!(
            names.iter().any(|n| n.starts_with("spamdelay"))
                && programs.iter().any(|p| p.hook == "ingress")
                && programs.iter().any(|p| p.hook == "egress"),
            "READY=1 before the programs were attached: {names:?}"
        );
        starting
            .join()
            .expect("the starting thread")
            .expect("starting spamdelay")
    });
    let got = notified.got.clone();
    assert!(
        got.iter().any(|l| l.starts_with("STATUS=0 verdicts")),
        "a STATUS line with READY: {got:?}"
    );

    // A verdict and a ban show in the next STATUS line.
    let blind = lab.run_client(0, false, 25, smtp::blind);
    daemon
        .verdict_for(blind, VERDICT_WAIT)
        .expect("the blind sender's verdict");
    let status = notified.wait(Duration::from_secs(5), |l| {
        l.starts_with("STATUS=1 verdicts (1 early-talk); 1 bans made")
    });
    assert!(
        status.is_some(),
        "STATUS with the counts: {:?}",
        notified.got
    );

    // WATCHDOG_USEC=1s: a ping at least every half second.
    let pings_before = notified.got.iter().filter(|l| *l == "WATCHDOG=1").count();
    notified.wait(Duration::from_millis(1600), |_| false);
    let pings = notified.got.iter().filter(|l| *l == "WATCHDOG=1").count() - pings_before;
    assert!(pings >= 2, "{pings} watchdog pings in 1.6 s");

    // SIGHUP: RELOADING=1, then READY=1 again.
    let pid = Pid::from_raw(daemon.pid() as i32);
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    assert!(
        notified
            .wait(Duration::from_secs(5), |l| l == "RELOADING=1")
            .is_some(),
        "RELOADING=1: {:?}",
        notified.got
    );
    assert!(
        notified
            .wait(Duration::from_secs(5), |l| l == "READY=1")
            .is_some(),
        "READY=1 after the reload: {:?}",
        notified.got
    );

    let (status, lines) = daemon.stop().expect("stopping spamdelay");
    assert!(status.success(), "{lines:#?}");
    assert!(
        notified.got.iter().any(|l| l == "STOPPING=1")
            || notified
                .wait(Duration::from_secs(1), |l| l == "STOPPING=1")
                .is_some(),
        "STOPPING=1 on SIGTERM: {:?}",
        notified.got
    );
}
