//! Real Exim beside spamdelay in the lab: both name the same early talkers,
//! real mail still gets through, and PIPECONNECT early talk is forgiven
//! only when Exim advertises it. A real client Exim that pipes its opening
//! ahead of the banner (PIPECONNECT, with and without TCP Fast Open) is let
//! through where it waited once before, and banned where it never did or
//! where the server stopped advertising PIPECONNECT.

use std::{
    net::{IpAddr, SocketAddr},
    thread::JoinHandle,
    time::Duration,
};

use spamdelay_tests::{
    daemon::Daemon,
    flood,
    lab::{Lab, SERVER_IF},
    mta::{
        self,
        exim::{
            self, Conversation, Exim, Pipeconnect,
            client::{Delivery, EximClient, HELO, SENDER},
        },
    },
    nft,
    scenario::{QUIET_WAIT, VERDICT_WAIT},
    smtp,
};

/// Exim's connect-ACL delay: the pause before its greeting.
const DELAY: Duration = Duration::from_secs(2);
/// Exim judges early input once its delay is over.
const EXIM_WAIT: Duration = Duration::from_secs(5);
/// The PIPECONNECT server's connect-ACL delay.
const PIPE_DELAY: Duration = Duration::from_secs(3);
/// Messages the client Exim sends in a row: the first learns PIPECONNECT
/// (and a TFO cookie) and waits for the banner, the others pipe ahead of it.
const MESSAGES: usize = 5;

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

/// spamdelay's arguments for guarding `exim`: which MTA, and its config.
fn daemon_args(exim: &Exim) -> [&str; 6] {
    let config = exim.config_file().to_str().expect("a UTF-8 path");
    [
        "--iface",
        SERVER_IF,
        "--mta",
        "exim",
        "--mta-config",
        config,
    ]
}

/// spamdelay told which MTA it guards and where its config is.
fn start_daemon_for(lab: &Lab, exim: &Exim) -> Daemon {
    Daemon::start(&lab.server, &daemon_args(exim)).expect("starting spamdelay with --mta exim")
}

/// A lab whose Exim advertises PIPECONNECT, spamdelay guarding it, and a
/// client Exim at lab address `i` that has sent nothing yet; TCP Fast Open
/// on in both namespaces, for clients and servers alike, when `tfo`.
fn pipeconnect_lab(i: u8, tfo: bool) -> (Lab, Exim, Daemon, EximClient) {
    let lab = Lab::new().expect("building the namespace lab");
    if tfo {
        for ns in [&lab.server, &lab.client] {
            flood::sysctl(ns, "net.ipv4.tcp_fastopen", "3").expect("turning TCP Fast Open on");
        }
    }
    let exim = Exim::start(&lab.server, PIPE_DELAY, true).expect("starting Exim");
    let daemon = start_daemon_for(&lab, &exim);
    let client =
        EximClient::new(Lab::client_addr(i, false), tfo).expect("setting up the client Exim");
    (lab, exim, daemon, client)
}

fn send(client: &mut EximClient, lab: &Lab) -> Delivery {
    client.send(&lab.client).expect("running the client Exim")
}

/// The client's first message: it waits for the banner and learns
/// PIPECONNECT from the server's EHLO reply.
fn first_message(client: &mut EximClient, lab: &Lab) {
    let first = send(client, lab);
    assert!(
        first.delivered().is_some() && !first.piped_early(),
        "{first:?}"
    );
}

/// spamdelay's verdict lines about `ip` that start with `word`.
fn verdicts(daemon: &Daemon, ip: IpAddr, word: &str) -> Vec<String> {
    daemon
        .verdicts_for_ip(ip)
        .into_iter()
        .filter(|l| l.starts_with(&format!("{word} ")))
        .collect()
}

/// What each side saw of the client Exim's deliveries, for the test output.
fn show(sent: &[Delivery], daemon: &Daemon, ip: IpAddr) {
    for (n, d) in sent.iter().enumerate() {
        let outcome = d
            .log
            .lines()
            .find(|l| [" => ", " == ", " ** "].iter().any(|m| l.contains(m)))
            .unwrap_or("no delivery line");
        eprintln!(
            "message {}: piped early {}, SYN data acked {}: {outcome}",
            n + 1,
            d.piped_early(),
            d.syn_data_acked()
        );
    }
    eprintln!("spamdelay about {ip}: {:#?}", daemon.verdicts_for_ip(ip));
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
fn early_ehlo_is_forgiven_after_a_pass_where_exim_advertises_pipeconnect() {
    if !mta::ready(
        "early_ehlo_is_forgiven_after_a_pass_where_exim_advertises_pipeconnect",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let exim = start_exim(&lab, true);
    let daemon = start_daemon_for(&lab, &exim);

    // Client 1 waits for the banner once, as a PIPECONNECT client must
    // have to learn of it; client 2 never did.
    let first = lab.run_client(1, false, 25, smtp::patient);
    assert!(verdict(&daemon, first).starts_with("PASS "));
    let polite = early_ehlo(&lab, 1, false);
    let greedy = early_ehlo(&lab, 2, true);
    let (polite, greedy) = (finish(polite), finish(greedy));
    let polite_client = SocketAddr::new(Lab::client_addr(1, false), polite.port);
    let greedy_client = SocketAddr::new(Lab::client_addr(2, false), greedy.port);

    // Exim took the early EHLO as PIPECONNECT and the session ran through.
    assert_eq!(polite.cut_short, None, "{polite:?}");
    assert!(polite.replies[1].contains("PIPECONNECT"), "{polite:?}");
    let v = verdict(&daemon, polite_client);
    assert!(v.starts_with("PIPECONNECT "), "{v}");
    assert!(
        daemon
            .verdicts_for_ip(polite_client.ip())
            .iter()
            .all(|l| !l.starts_with("EARLY-TALK")),
        "{:#?}",
        daemon.lines()
    );
    assert_not_banned(&daemon, &lab, polite_client.ip());

    // A first contact talking ahead of the greeting is early talk even
    // so. Exim itself no longer checks anything once it advertises
    // PIPECONNECT.
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
    let first = lab.run_client(1, false, 25, smtp::patient);
    assert!(verdict(&daemon, first).starts_with("PASS "));
    let talk = finish(early_ehlo(&lab, 1, false));
    assert_eq!(talk.cut_short, None, "{talk:?}");
    let v = verdict(
        &daemon,
        SocketAddr::new(Lab::client_addr(1, false), talk.port),
    );
    assert!(v.starts_with("PIPECONNECT "), "{v}");
    assert_not_banned(&daemon, &lab, Lab::client_addr(1, false));
}

/// The client Exim sends MESSAGES messages in a row to an Exim that
/// advertises PIPECONNECT, with spamdelay guarding it: the first waits for
/// the banner (a PASS), the others pipe EHLO, MAIL, RCPT and BDAT ahead of
/// it, in the SYN with `tfo`. None is an early talker, none is banned.
fn pipeconnect_client_delivers_without_a_ban(test: &str, tfo: bool) {
    if !mta::ready(test, "Exim", exim::installed()) {
        return;
    }
    let (lab, exim, daemon, mut client) = pipeconnect_lab(0, tfo);
    let ip = Lab::client_addr(0, false);

    let sent: Vec<Delivery> = (0..MESSAGES).map(|_| send(&mut client, &lab)).collect();
    spamdelay_tests::until(VERDICT_WAIT, || {
        daemon.verdicts_for_ip(ip).len() >= MESSAGES
    });
    show(&sent, &daemon, ip);

    let early = verdicts(&daemon, ip, "EARLY-TALK");
    assert!(
        early.is_empty(),
        "{} of {} PIPECONNECT openings called early talk: {early:#?}",
        early.len(),
        MESSAGES - 1
    );
    assert_not_banned(&daemon, &lab, ip);
    // The client's own account: it learnt PIPECONNECT on the first delivery
    // and trusted it on every later one.
    assert!(!sent[0].piped_early(), "{:?}", sent[0]);
    for d in &sent[1..] {
        assert!(d.piped_early(), "no early pipe: {d:?}");
    }

    // Every message reached Exim, the later ones piped (`L*`), in the SYN
    // with TFO (`TFO*`); spamdelay names each connection for what it was.
    for d in &sent {
        assert!(d.delivered().is_some(), "not delivered: {d:?}");
    }
    let got: Vec<_> = exim
        .received()
        .into_iter()
        .filter(|r| r.client.ip() == ip)
        .collect();
    assert_eq!(got.len(), MESSAGES, "{}", exim.log());
    assert!(!got[0].early_pipe, "{:?}", got[0]);
    let v = verdict(&daemon, got[0].client);
    assert!(v.starts_with("PASS "), "{v}");
    for (r, d) in got[1..].iter().zip(&sent[1..]) {
        assert!(r.early_pipe && d.delivered_with("L*"), "{r:?}\n{d:?}");
        assert_eq!(r.syn_data, tfo, "{r:?}");
        assert_eq!(d.syn_data_acked() && d.delivered_with("TFO*"), tfo, "{d:?}");
        let v = verdict(&daemon, r.client);
        assert!(v.starts_with("PIPECONNECT "), "{v}");
    }
    assert_eq!(
        verdicts(&daemon, ip, "PIPECONNECT").len(),
        MESSAGES - 1,
        "{:#?}",
        daemon.lines()
    );
    if tfo {
        // The server's kernel took data from a SYN once per piped opening.
        let passive = lab
            .server
            .net_counter("TcpExtTCPFastOpenPassive")
            .expect("reading the server's TFO counter");
        assert_eq!(passive, MESSAGES as u64 - 1);
    }
}

#[test]
fn exim_pipeconnect_client_delivers_five_without_a_ban() {
    pipeconnect_client_delivers_without_a_ban(
        "exim_pipeconnect_client_delivers_five_without_a_ban",
        false,
    );
}

#[test]
fn exim_pipeconnect_client_with_fast_open_delivers_five_without_a_ban() {
    pipeconnect_client_delivers_without_a_ban(
        "exim_pipeconnect_client_with_fast_open_delivers_five_without_a_ban",
        true,
    );
}

#[test]
fn first_contact_blind_sender_is_banned_even_with_pipeconnect() {
    if !mta::ready(
        "first_contact_blind_sender_is_banned_even_with_pipeconnect",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let (lab, exim, daemon, mut client) = pipeconnect_lab(0, false);
    let (known, moved) = (Lab::client_addr(0, false), Lab::client_addr(2, false));
    first_message(&mut client, &lab);
    let got = exim.received();
    let passed = got
        .iter()
        .find(|r| r.client.ip() == known)
        .expect("message 1");
    let v = verdict(&daemon, passed.client);
    assert!(v.starts_with("PASS "), "{v}");

    // From an address that never waited, its cached opening is as blind as
    // any spam tool's.
    client.send_from(moved).expect("moving the client Exim");
    let blind = send(&mut client, &lab);
    assert!(blind.piped_early(), "no early pipe: {blind:?}");
    let v = daemon
        .wait_for(|l| l.contains(&format!("from [{moved}]:")), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no verdict for {moved}: {:#?}", daemon.lines()));
    assert!(v.starts_with("EARLY-TALK "), "{v}");
    assert_banned(&daemon, &lab, moved);

    let spam = lab.run_client(3, false, 25, smtp::blind);
    let v = verdict(&daemon, spam);
    assert!(v.starts_with("EARLY-TALK "), "{v}");
    assert_banned(&daemon, &lab, spam.ip());

    assert_not_banned(&daemon, &lab, known);
}

#[test]
fn early_piping_to_a_server_without_pipeconnect_is_banned() {
    if !mta::ready(
        "early_piping_to_a_server_without_pipeconnect_is_banned",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let (lab, exim, daemon, mut client) = pipeconnect_lab(0, false);
    let ip = Lab::client_addr(0, false);
    first_message(&mut client, &lab);

    // The admin stops advertising PIPECONNECT: Exim restarted with it
    // empty, spamdelay restarted to read that. The client still trusts what
    // it cached.
    let state = daemon.state();
    let (status, _) = daemon.stop().expect("stopping spamdelay");
    assert!(status.success(), "{status}");
    drop(exim);
    let exim = Exim::start(&lab.server, PIPE_DELAY, false).expect("restarting Exim");
    let daemon = Daemon::start_with_state(&lab.server, &daemon_args(&exim), state)
        .expect("restarting spamdelay");
    let line = daemon
        .wait_for(|l| l.starts_with("exim on port 25: "), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no Exim line: {:#?}", daemon.lines()));
    assert!(!line.contains("PIPECONNECT"), "{line}");

    // The same address waits politely once more (swaks), so a recent pass
    // cannot be what decides: only the advertisement may.
    let polite = exim::swaks(&lab.client, ip, server()).expect("swaks");
    assert!(
        polite.status.success(),
        "swaks failed:\n{}",
        polite.transcript
    );
    let v = verdict(&daemon, polite.client);
    assert!(v.starts_with("PASS "), "{v}");

    let piped = send(&mut client, &lab);
    assert!(piped.piped_early(), "no early pipe: {piped:?}");
    let refused = exim
        .wait_for(
            |l| exim::parse_sync_error(l).is_some_and(|e| e.client.ip() == ip),
            EXIM_WAIT,
        )
        .and_then(|l| exim::parse_sync_error(&l))
        .unwrap_or_else(|| panic!("Exim did not refuse {ip}:\n{}", exim.log()));
    assert!(
        refused
            .input
            .starts_with(&format!("EHLO {HELO}\\r\\nMAIL FROM:<{SENDER}>")),
        "{refused:?}"
    );
    let v = verdict(&daemon, refused.client);
    assert!(v.starts_with("EARLY-TALK "), "{v}");
    assert_banned(&daemon, &lab, ip);
    assert!(piped.delivered().is_none(), "{piped:?}");
}
