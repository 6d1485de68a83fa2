//! Real Exim beside spamdelay in the lab: both name the same early talkers,
//! real mail still gets through, and PIPECONNECT's one early EHLO is forgiven
//! only when Exim advertises it.

use std::{
    net::{IpAddr, SocketAddr},
    thread::JoinHandle,
    time::Duration,
};

use spamdelay_tests::{
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    mta::{
        self,
        exim::{self, Conversation, Exim, Pipeconnect},
    },
    nft,
    scenario::{QUIET_WAIT, VERDICT_WAIT},
    smtp,
};

/// Exim's connect-ACL delay: the pause before its greeting.
const DELAY: Duration = Duration::from_secs(2);
/// Exim judges early input once its delay is over.
const EXIM_WAIT: Duration = Duration::from_secs(5);

fn server() -> SocketAddr {
    SocketAddr::new(Lab::server_addr(false), 25)
}

/// A client still talking on its thread in the client namespace.
type Pending = JoinHandle<anyhow::Result<anyhow::Result<Conversation>>>;

/// Starts the early-EHLO client from lab address `i` on its own thread, so
/// several can sit out Exim's delay at once.
fn early_ehlo(lab: &Lab, i: u8, with_mail: bool) -> Pending {
    let src = Lab::client_addr(i, false);
    lab.client
        .spawn(move || exim::early_ehlo(src, server(), with_mail))
}

fn finish(handle: Pending) -> Conversation {
    handle
        .join()
        .expect("client thread")
        .expect("entering the client namespace")
        .expect("early-EHLO client")
}

fn ban_set(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() {
        "early_talkers_v6"
    } else {
        "early_talkers_v4"
    }
}

/// Waits for spamdelay's ban of `ip` and checks nftables holds it.
fn assert_banned(daemon: &Daemon, lab: &Lab, ip: IpAddr) {
    daemon
        .wait_for(|l| l.starts_with(&format!("ban [{ip}]")), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no ban of {ip}: {:#?}", daemon.lines()));
    assert!(
        nft::element(&lab.server, ban_set(ip), &ip.to_string()).is_some(),
        "{ip} not in {}: {:?}",
        ban_set(ip),
        nft::elements(&lab.server, ban_set(ip))
    );
}

fn assert_not_banned(daemon: &Daemon, lab: &Lab, ip: IpAddr) {
    assert!(
        daemon
            .wait_for(|l| l.starts_with(&format!("ban [{ip}]")), QUIET_WAIT)
            .is_none(),
        "{ip} banned: {:#?}",
        daemon.lines()
    );
    assert_eq!(
        nft::element(&lab.server, ban_set(ip), &ip.to_string()),
        None
    );
}

/// spamdelay's verdict about `client`, which must come.
fn verdict(daemon: &Daemon, client: SocketAddr) -> String {
    daemon
        .verdict_for(client, VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no verdict for {client}: {:#?}", daemon.lines()))
}

fn start_exim(lab: &Lab, pipeconnect: bool) -> Exim {
    Exim::start(&lab.server, DELAY, pipeconnect).expect("starting Exim")
}

/// spamdelay told which MTA it guards and where its config is.
fn start_daemon_for(lab: &Lab, exim: &Exim) -> Daemon {
    let config = exim.config_file().to_str().expect("a UTF-8 path");
    Daemon::start(
        &lab.server,
        &[
            "--iface",
            SERVER_IF,
            "--mta",
            "exim",
            "--mta-config",
            config,
        ],
    )
    .expect("starting spamdelay with --mta exim")
}

#[test]
fn exim_and_spamdelay_agree() {
    if !mta::ready("exim_and_spamdelay_agree", "Exim", exim::installed()) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let exim = start_exim(&lab, false);
    let daemon = Daemon::start(&lab.server, &["--iface", SERVER_IF]).expect("starting spamdelay");

    let blind = [
        lab.run_client(1, false, 25, smtp::blind),
        lab.run_client(1, true, 25, smtp::blind),
    ];
    // A real client sends a real message while Exim sits out the blind ones.
    let sent = exim::swaks(&lab.client, Lab::client_addr(2, false), server()).expect("swaks");
    assert!(sent.status.success(), "swaks failed:\n{}", sent.transcript);

    for b in blind {
        let refused = exim
            .wait_sync_error(b, EXIM_WAIT)
            .unwrap_or_else(|| panic!("Exim did not refuse {b}:\n{}", exim.log()));
        assert!(
            refused.input.starts_with("EHLO blind.example\\r\\n"),
            "{refused:?}"
        );
        let v = verdict(&daemon, b);
        assert!(v.starts_with("EARLY-TALK "), "{v}");
        assert_banned(&daemon, &lab, b.ip());
    }

    let v = verdict(&daemon, sent.client);
    assert!(v.starts_with("PASS "), "{v}");
    assert!(
        exim.received().iter().any(|r| r.client == sent.client),
        "Exim took no message from {}:\n{}",
        sent.client,
        exim.log()
    );
    assert!(exim.sync_errors().iter().all(|e| e.client != sent.client));
    assert_not_banned(&daemon, &lab, sent.client.ip());
}

#[test]
fn one_early_ehlo_is_allowed_when_exim_advertises_pipeconnect() {
    if !mta::ready(
        "one_early_ehlo_is_allowed_when_exim_advertises_pipeconnect",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let exim = start_exim(&lab, true);
    let daemon = start_daemon_for(&lab, &exim);

    let polite = early_ehlo(&lab, 1, false);
    let greedy = early_ehlo(&lab, 2, true);
    let (polite, greedy) = (finish(polite), finish(greedy));
    let polite_client = SocketAddr::new(Lab::client_addr(1, false), polite.port);
    let greedy_client = SocketAddr::new(Lab::client_addr(2, false), greedy.port);

    // Exim took the early EHLO as PIPECONNECT and the session ran through.
    assert_eq!(polite.cut_short, None, "{polite:?}");
    assert!(polite.replies[1].contains("PIPECONNECT"), "{polite:?}");
    let v = verdict(&daemon, polite_client);
    assert!(!v.starts_with("EARLY-TALK"), "{v}");
    assert!(
        daemon
            .verdicts_for_ip(polite_client.ip())
            .iter()
            .all(|l| !l.starts_with("EARLY-TALK")),
        "{:#?}",
        daemon.lines()
    );
    assert_not_banned(&daemon, &lab, polite_client.ip());

    // More than an EHLO ahead of the greeting is early talk even so. Exim
    // itself no longer checks anything once it advertises PIPECONNECT.
    let v = verdict(&daemon, greedy_client);
    assert!(v.starts_with("EARLY-TALK "), "{v}");
    assert_banned(&daemon, &lab, greedy_client.ip());
    assert_eq!(exim.sync_errors(), Vec::new(), "{}", exim.log());
}

#[test]
fn one_early_ehlo_is_an_offence_without_pipeconnect() {
    if !mta::ready(
        "one_early_ehlo_is_an_offence_without_pipeconnect",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let exim = start_exim(&lab, false);
    let daemon = start_daemon_for(&lab, &exim);

    let talk = finish(early_ehlo(&lab, 1, false));
    let client = SocketAddr::new(Lab::client_addr(1, false), talk.port);
    // Exim refuses it (554, unless the ban's reset came first): never a 220.
    assert!(
        talk.replies.iter().all(|r| !r.starts_with("220")),
        "{talk:?}"
    );
    let refused = exim
        .wait_sync_error(client, EXIM_WAIT)
        .unwrap_or_else(|| panic!("Exim did not refuse {client}:\n{}", exim.log()));
    assert_eq!(refused.input, "EHLO client.example\\r\\n");
    let v = verdict(&daemon, client);
    assert!(v.starts_with("EARLY-TALK "), "{v}");
    assert_banned(&daemon, &lab, client.ip());
}

#[test]
fn greet_pause_is_read_from_the_config() {
    if !mta::ready(
        "greet_pause_is_read_from_the_config",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let exim = start_exim(&lab, false);
    let daemon = start_daemon_for(&lab, &exim);
    let line = daemon
        .wait_for(|l| l.starts_with("exim on port 25: "), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no Exim line: {:#?}", daemon.lines()));
    assert!(line.contains("connect delay 2s"), "{line}");
}

#[test]
fn pipeconnect_left_unset_is_exims_default() {
    if !mta::ready(
        "pipeconnect_left_unset_is_exims_default",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let exim = Exim::start_with(&lab.server, DELAY, Pipeconnect::Unset).expect("starting Exim");
    // Exim 4.96 advertises PIPECONNECT to everyone unless told otherwise.
    assert_eq!(
        exim.setting(&lab.server, "pipelining_connect_advertise_hosts")
            .expect("exim -bP"),
        "*"
    );
    let daemon = start_daemon_for(&lab, &exim);
    let line = daemon
        .wait_for(|l| l.starts_with("exim on port 25: "), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no Exim line: {:#?}", daemon.lines()));
    assert!(
        line.contains("PIPECONNECT advertised"),
        "spamdelay misses Exim's default PIPECONNECT: {line}"
    );
    let talk = finish(early_ehlo(&lab, 1, false));
    assert_eq!(talk.cut_short, None, "{talk:?}");
    assert_not_banned(&daemon, &lab, Lab::client_addr(1, false));
}
