//! The sets under pressure, end to end: `--ipv6-aggregate` turns an
//! address-rotating offender's /128s into one /64 ban, a full set is warned
//! about once and counted while the register keeps agreeing with nft, and
//! bans by hand count offences through the same policy as the daemon's.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    thread::sleep,
    time::Duration,
};

use serde_json::Value;
use spamdelay_tests::{
    lab::{CLIENT_IF, Lab, SERVER_IF},
    nft::{element, elements},
    privileged,
    scenario::{Scenario, VERDICT_WAIT},
    smtp::{self, Greeting},
    until,
};

const V6: &str = "early_talkers_v6";
const V6_64: &str = "early_talkers_v6_64";

/// Addresses of a /64 of their own: the lab's 2001:db8::/64 holds the
/// server, and a /64 holding a local address is never banned whole.
fn rotating(net: u16, i: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, net, 0, 0, 0, 0x10 + i))
}

/// Gives the client `n` addresses in 2001:db8:0:NET::/64 and the server a
/// route back to them.
fn add_net(lab: &Lab, net: u16, n: u16) {
    for i in 0..n {
        lab.client
            .ip(&[
                "addr",
                "add",
                &format!("{}/128", rotating(net, i)),
                "dev",
                CLIENT_IF,
                "nodad",
            ])
            .expect("adding a client address");
    }
    lab.server
        .ip(&[
            "route",
            "add",
            &format!("2001:db8:0:{net:x}::/64"),
            "dev",
            SERVER_IF,
        ])
        .expect("a route to the client's /64");
}

/// The lab's server, a daemon with `extra`, and `n` client addresses in
/// 2001:db8:0:NET::/64.
fn with_net(extra: &[&str], net: u16, n: u16) -> Scenario {
    Scenario::prepared(Greeting::pause(1500), &[25], extra, |lab| {
        add_net(lab, net, n)
    })
}

/// Waits for the daemon's log line that starts with `prefix`.
fn wait_line(s: &Scenario, prefix: &str) -> String {
    s.daemon
        .wait_for(|l| l.starts_with(prefix), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no line {prefix:?}: {:#?}", s.daemon.lines()))
}

fn blind_from(s: &Scenario, src: IpAddr) {
    let dst = SocketAddr::new(Lab::server_addr(true), 25);
    s.lab
        .client
        .run(move || smtp::blind(src, dst))
        .expect("entering the client namespace")
        .expect("a blind client");
}

fn status_json(s: &Scenario) -> Value {
    let (ok, out, err) = s
        .daemon
        .admin(&s.lab.server, &["status", "--json"])
        .expect("spamdelay status");
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("status --json")
}

fn listed(s: &Scenario) -> Vec<String> {
    let (ok, out, err) = s
        .daemon
        .admin(&s.lab.server, &["list", "--json"])
        .expect("spamdelay list");
    assert!(ok, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).expect("list --json");
    rows.iter()
        .filter_map(|r| r["address"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn the_fifth_address_of_a_64_is_refused_by_the_aggregate_ban() {
    if !privileged("the_fifth_address_of_a_64_is_refused_by_the_aggregate_ban") {
        return;
    }
    let s = with_net(&["--ipv6-aggregate", "4"], 0xa, 5);
    for i in 0..3 {
        let src = rotating(0xa, i);
        blind_from(&s, src);
        wait_line(&s, &format!("ban [{src}] for 1h"));
    }
    assert_eq!(elements(&s.lab.server, V6).len(), 3);
    assert!(s.lab.refused_from(rotating(0xa, 0)));
    assert!(!s.lab.refused_from(rotating(0xa, 4)), "not yet the /64");
    // The fourth address of the /64: the /64 is banned in its place.
    blind_from(&s, rotating(0xa, 3));
    let line = wait_line(&s, "ban [2001:db8:0:a::]/64");
    assert!(
        line.contains("instead of [2001:db8:0:a::13]: 4 addresses of it banned (--ipv6-aggregate)"),
        "{line}"
    );
    let e = element(&s.lab.server, V6_64, "2001:db8:0:a::").expect("the /64 in its set");
    let comment = e.comment.expect("a reason");
    assert!(
        comment
            .starts_with("aggregate: 4 addresses of [2001:db8:0:a::]/64 banned; last: early-talk"),
        "{comment}"
    );
    assert!(
        elements(&s.lab.server, V6).is_empty(),
        "the /128s inside the /64 are dropped: {:?}",
        elements(&s.lab.server, V6)
    );
    assert!(
        s.lab.refused_from(rotating(0xa, 4)),
        "the fifth address is refused by the /64 ban"
    );
    // The register follows within the daemon's save interval (200 ms).
    assert!(
        until(Duration::from_secs(2), || listed(&s)
            == ["2001:db8:0:a::/64"]),
        "{:?}",
        listed(&s)
    );
    sleep(Duration::from_millis(1200)); // the status file is refreshed each second
    assert_eq!(
        status_json(&s)["daemon"]["daemon_counters"]["aggregated"],
        1
    );
    // Lifting the /64 lifts the aggregate.
    let (ok, out, err) = s
        .daemon
        .admin(&s.lab.server, &["unban", "2001:db8:0:a::/64"])
        .expect("spamdelay unban");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "unbanned [2001:db8:0:a::]/64");
    assert!(elements(&s.lab.server, V6_64).is_empty());
    assert!(!s.lab.refused_from(rotating(0xa, 4)));
    s.stop();
}

#[test]
fn a_full_set_is_warned_about_once_counted_and_the_register_agrees_with_nft() {
    if !privileged("a_full_set_is_warned_about_once_counted_and_the_register_agrees_with_nft") {
        return;
    }
    const SIZE: usize = 16;
    const CLIENTS: u16 = 20;
    let s = with_net(&["--set-size", "16"], 0xb, CLIENTS);
    for i in 0..CLIENTS {
        blind_from(&s, rotating(0xb, i));
    }
    let early = |s: &Scenario| {
        s.daemon
            .lines()
            .iter()
            .filter(|l| l.starts_with("EARLY-TALK"))
            .count()
    };
    assert!(
        until(VERDICT_WAIT, || early(&s) == usize::from(CLIENTS)),
        "{:#?}",
        s.daemon.lines()
    );
    assert!(
        until(
            Duration::from_secs(5),
            || status_json(&s)["daemon"]["daemon_counters"]["set_full"]
                == u64::from(CLIENTS) - SIZE as u64
        ),
        "set_full counter: {}",
        status_json(&s)["daemon"]["daemon_counters"]
    );
    let lines = s.daemon.lines();
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("warning: set early_talkers_v6 is full"))
        .collect();
    assert_eq!(warnings.len(), 1, "{lines:#?}");
    assert!(warnings[0].contains("raise --set-size"), "{}", warnings[0]);
    let in_nft = elements(&s.lab.server, V6);
    assert_eq!(in_nft.len(), SIZE);
    let mut held: Vec<String> = in_nft.iter().map(|e| format!("{}/128", e.addr)).collect();
    held.sort();
    let registered = || {
        let mut r = listed(&s);
        r.sort();
        r
    };
    assert!(
        until(Duration::from_secs(2), || registered() == held),
        "the register claims only what nft holds: {:?} vs {held:?}",
        registered()
    );
    s.stop();
}

#[test]
fn bans_by_hand_count_offences_through_the_policy() {
    if !privileged("bans_by_hand_count_offences_through_the_policy") {
        return;
    }
    let s = with_net(&["--ban-time", "1s", "--remember", "3s"], 0xc, 2);
    let ban = |addr: IpAddr| {
        let (ok, out, err) = s
            .daemon
            .admin(&s.lab.server, &["ban", &addr.to_string(), "--time", "1h"])
            .expect("spamdelay ban");
        assert!(ok, "{err}");
        out
    };
    let (a, b) = (rotating(0xc, 0), rotating(0xc, 1));
    for src in [a, b] {
        blind_from(&s, src);
        wait_line(&s, &format!("ban [{src}] for 1s (offence 1)"));
    }
    // Expired, still remembered: a ban by hand is the second offence.
    sleep(Duration::from_millis(1500));
    assert_eq!(ban(a).trim(), format!("banned [{a}] for 1h (offence 2)"));
    // Expired and forgotten (1 s ban + 3 s remembered): the first again.
    sleep(Duration::from_secs(3));
    assert_eq!(ban(b).trim(), format!("banned [{b}] for 1h (offence 1)"));
    assert!(s.lab.refused_from(a) && s.lab.refused_from(b));
    s.stop();
}
