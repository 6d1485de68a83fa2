//! Real Sendmail (FEATURE(greet_pause)) beside spamdelay in the lab: both name
//! the same early talkers, patient clients pass, and spamdelay reads the
//! pause from sendmail.cf.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use spamdelay_tests::{
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    mta::{
        self,
        sendmail::{self, Sendmail},
    },
    nft,
    scenario::{QUIET_WAIT, VERDICT_WAIT},
    smtp,
};

const GREET_PAUSE: Duration = Duration::from_secs(2);
/// Sendmail refuses pre-greeting traffic as soon as it sees it.
const SENDMAIL_WAIT: Duration = Duration::from_secs(3);

fn ban_set(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() {
        "early_talkers_v6"
    } else {
        "early_talkers_v4"
    }
}

fn verdict(daemon: &Daemon, client: SocketAddr) -> String {
    daemon
        .verdict_for(client, VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no verdict for {client}: {:#?}", daemon.lines()))
}

#[test]
fn sendmail_and_spamdelay_agree() {
    if !mta::ready(
        "sendmail_and_spamdelay_agree",
        "Sendmail",
        sendmail::installed(),
    ) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let sendmail = Sendmail::start(&lab.server, GREET_PAUSE).expect("starting Sendmail");
    let daemon = Daemon::start(&lab.server, &["--iface", SERVER_IF]).expect("starting spamdelay");

    for v6 in [false, true] {
        let blind = lab.run_client(1, v6, 25, smtp::blind);
        // Sendmail logs no client port: the lab address names the client.
        let refused = sendmail
            .wait_pregreet(blind.ip(), SENDMAIL_WAIT)
            .unwrap_or_else(|| panic!("Sendmail did not refuse {blind}:\n{}", sendmail.log()));
        assert_eq!(refused.after_secs, 0, "{refused:?}");
        let v = verdict(&daemon, blind);
        assert!(v.starts_with("EARLY-TALK "), "{v}");
        let ip = blind.ip();
        daemon
            .wait_for(|l| l.starts_with(&format!("ban [{ip}]")), VERDICT_WAIT)
            .unwrap_or_else(|| panic!("no ban of {ip}: {:#?}", daemon.lines()));
        assert!(nft::element(&lab.server, ban_set(ip), &ip.to_string()).is_some());
    }

    let patient = lab.run_client(2, false, 25, smtp::patient);
    let v = verdict(&daemon, patient);
    assert!(v.starts_with("PASS "), "{v}");
    let ip = patient.ip();
    // Sendmail served it as an ordinary client (EHLO and QUIT, no mail).
    sendmail
        .wait_for(
            |l| l.contains(&format!("[{ip}] did not issue MAIL/EXPN/VRFY/ETRN")),
            SENDMAIL_WAIT,
        )
        .unwrap_or_else(|| panic!("Sendmail did not serve {ip}:\n{}", sendmail.log()));
    assert!(
        sendmail.pregreets().iter().all(|p| p.client != ip),
        "{}",
        sendmail.log()
    );
    assert!(
        daemon
            .wait_for(|l| l.starts_with(&format!("ban [{ip}]")), QUIET_WAIT)
            .is_none(),
        "{:#?}",
        daemon.lines()
    );
    assert_eq!(
        nft::element(&lab.server, ban_set(ip), &ip.to_string()),
        None
    );
}

#[test]
fn greet_pause_is_read_from_the_config() {
    if !mta::ready(
        "greet_pause_is_read_from_the_config",
        "Sendmail",
        sendmail::installed(),
    ) {
        return;
    }
    let lab = Lab::new().expect("building the namespace lab");
    let sendmail = Sendmail::start(&lab.server, GREET_PAUSE).expect("starting Sendmail");
    let cf = sendmail.cf_file().to_str().expect("a UTF-8 path");
    let daemon = Daemon::start(
        &lab.server,
        &[
            "--iface",
            SERVER_IF,
            "--mta",
            "sendmail",
            "--mta-config",
            cf,
        ],
    )
    .expect("starting spamdelay with --mta sendmail");
    let line = daemon
        .wait_for(|l| l.starts_with("sendmail on port 25: "), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no Sendmail line: {:#?}", daemon.lines()));
    assert!(line.contains("greet pause 2s"), "{line}");
}
