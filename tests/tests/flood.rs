//! Load: 5,000 IPv6 early talkers at once against a silent server; every one
//! must be banned in nftables, none lost between the kernel and the firewall.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use spamdelay_tests::{
    daemon::{Daemon, ban_batches, counter},
    flood::{self, SilentServer},
    lab::{CLIENT_IF, Lab, SERVER_IF, SERVER_V6},
    nft, privileged,
};

const CLIENTS: u16 = 5000;
/// The flood's sources, 2001:db8::1:N:0:1: inside the lab's 2001:db8::/64
/// but clear of its clients (::10..) and server (::25).
const FLOOD_NET: &str = "2001:db8:0:0:1::/80";
/// A handful of client threads: a connect over a veth takes microseconds, so
/// the whole flood is over in well under a second; more only add contention.
const CONNECT_THREADS: usize = 4;
const ACCEPT_BACKLOG: i32 = 8192;
/// Bound on the wait for all bans, counted from the first connect.
const BAN_WAIT: Duration = Duration::from_secs(60);

/// Source `i` varies in the sixth group and keeps the low 24 bits fixed, so
/// all of them share one solicited-node multicast group. Numbered in the
/// last group instead (`::1:0:0:N`), each joins a group of its own, and the
/// 5,000 MLD joins make adding them take ~7 s instead of ~0.3 s.
fn flood_addr(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 1, i, 0, 1)
}

/// What the log says so far, for failure messages.
fn log_summary(lines: &[String]) -> String {
    let count = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count();
    let odd: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("warning:") || l.starts_with("error:") || l.contains("refused"))
        .take(10)
        .collect();
    format!(
        "{} EARLY-TALK lines, {} ban lines, first warnings/errors: {odd:#?}",
        count("EARLY-TALK"),
        count("ban [")
    )
}

#[test]
fn flood_of_5000_ipv6_early_talkers_bans_every_one() {
    if !privileged("flood_of_5000_ipv6_early_talkers_bans_every_one") {
        return;
    }
    // Both ends of every connection live in this process.
    flood::raise_fd_limit(2 * u64::from(CLIENTS) + 1024).expect("raising the open-file limit");
    let lab = Lab::new().expect("building the namespace lab");

    let addrs: Vec<Ipv6Addr> = (1..=CLIENTS).map(flood_addr).collect();
    let started = Instant::now();
    flood::add_addresses(&lab.client, CLIENT_IF, &addrs, 64).expect("adding the flood addresses");
    let added_in = started.elapsed();
    // Reach the flood through one neighbour, the client veth's ::10, rather
    // than on-link: 5,000 neighbour entries would overflow the kernel's
    // IPv6 neighbour table (gc_thresh3, 1,024 by default, host-wide and not
    // settable from a namespace): SYN-ACKs are dropped, connects time out.
    let gateway = Lab::client_v6(0).to_string();
    lab.server
        .ip(&[
            "-6", "route", "add", FLOOD_NET, "via", &gateway, "dev", SERVER_IF,
        ])
        .expect("routing the flood network");
    // A burst of 5,000 handshakes: let the listener queue them all rather
    // than lean on SYN cookies (both sysctls are the namespace's own).
    let backlog = ACCEPT_BACKLOG.to_string();
    flood::sysctl(&lab.server, "net.core.somaxconn", &backlog).expect("somaxconn");
    flood::sysctl(&lab.server, "net.ipv4.tcp_max_syn_backlog", &backlog)
        .expect("tcp_max_syn_backlog");
    let server =
        SilentServer::start(&lab.server, 25, ACCEPT_BACKLOG).expect("starting the silent server");
    let daemon = Daemon::start(&lab.server, &["--iface", SERVER_IF, "--set-size", "65536"])
        .expect("starting spamdelay");

    let srcs: Vec<IpAddr> = addrs.iter().map(|&a| a.into()).collect();
    let flood_start = Instant::now();
    // Kept open until the bans are counted: each verdict came with the first
    // payload, so closing would change nothing but add packets to inspect.
    let streams = flood::connect_all(
        &lab.client,
        &srcs,
        SocketAddr::new(SERVER_V6.into(), 25),
        b"EHLO flood.example\r\n",
        CONNECT_THREADS,
    )
    .expect("flooding the server");
    let connected_in = flood_start.elapsed();
    assert_eq!(streams.len(), usize::from(CLIENTS));

    let elements = loop {
        let els = nft::elements(&lab.server, "early_talkers_v6");
        if els.len() >= usize::from(CLIENTS) || flood_start.elapsed() > BAN_WAIT {
            break els;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let banned_in = flood_start.elapsed();
    eprintln!(
        "flood: {CLIENTS} addresses added in {:.1}s, connections in {:.1}s, all bans in {:.1}s",
        added_in.as_secs_f64(),
        connected_in.as_secs_f64(),
        banned_in.as_secs_f64()
    );
    assert_eq!(
        elements.len(),
        usize::from(CLIENTS),
        "elements in early_talkers_v6 after {:.1}s; daemon log: {}",
        banned_in.as_secs_f64(),
        log_summary(&daemon.lines())
    );
    let expected: HashSet<Ipv6Addr> = addrs.iter().copied().collect();
    let mut seen = HashSet::new();
    for e in &elements {
        let addr: Ipv6Addr = e
            .addr
            .parse()
            .unwrap_or_else(|_| panic!("{e:?} is not a single address (/128)"));
        assert!(expected.contains(&addr), "{e:?} is not a flood client");
        assert!(seen.insert(addr), "{addr} is in the set twice");
        assert!(e.timeout.is_some_and(|t| t > 0), "{e:?} has no timeout");
        assert!(
            e.comment
                .as_deref()
                .is_some_and(|c| c.starts_with("early-talk")),
            "{e:?} has no early-talk comment"
        );
    }

    // The register follows nft within spamdelay's save interval (200 ms).
    let list = || {
        let (ok, out, err) = daemon
            .admin(&lab.server, &["list", "--json"])
            .expect("running spamdelay list");
        assert!(ok, "spamdelay list --json failed: {err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .expect("spamdelay list --json prints a JSON array")
    };
    let mut rows = list();
    let deadline = Instant::now() + Duration::from_secs(2);
    while rows.len() < usize::from(CLIENTS) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        rows = list();
    }
    let listed: HashSet<String> = rows
        .iter()
        .filter_map(|r| r["address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(rows.len(), usize::from(CLIENTS), "bans in spamdelay list");
    assert_eq!(
        listed,
        addrs.iter().map(|a| format!("{a}/128")).collect(),
        "spamdelay list names every flood client once"
    );

    let (status, lines) = daemon.stop().expect("stopping spamdelay");
    assert!(
        status.success(),
        "spamdelay exited with {status}; {}",
        log_summary(&lines)
    );
    assert_eq!(
        counter(&lines, "early_talk"),
        Some(u64::from(CLIENTS)),
        "{}",
        log_summary(&lines)
    );
    assert_eq!(counter(&lines, "ringbuf_full"), Some(0));
    let bans = lines.iter().filter(|l| l.starts_with("ban [")).count();
    assert_eq!(bans, usize::from(CLIENTS), "ban lines in the log");
    // Every batch went in as one transaction: no fallback to one by one.
    assert!(
        !lines.iter().any(|l| l.contains("nft refused")),
        "{}",
        log_summary(&lines)
    );
    drop(streams);
    let accepted = server.stop().expect("stopping the silent server");
    eprintln!(
        "flood: {bans} bans in {} nft transactions; the server accepted {accepted} connections",
        ban_batches(&lines)
    );
}
