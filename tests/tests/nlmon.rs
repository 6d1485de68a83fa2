//! The in-process nf_tables watcher (`spamdelay_tests::nlmon`) against `nft`
//! in a namespace of its own: elements added by `nft add element` come back
//! with their table, set and key, addresses and networks, IPv4 and IPv6, in
//! the shapes fail2ban and CrowdSec give their sets, as `nft monitor` has them.

use std::{collections::HashSet, time::Duration};

use spamdelay_tests::{
    lab::Netns,
    nft::{Added, Monitor, nft},
    nlmon::Watcher,
    privileged,
};

/// Tables and sets like the ones the benchmark watches: spamdelay's
/// (addresses with timeouts, networks in interval sets), fail2ban's
/// (`nftables-multiport`: plain sets in table inet f2b-table) and the
/// CrowdSec bouncer's (ip6 table, timeouts).
const RULESET: &str = r#"
table inet sd {
    set v4 { type ipv4_addr; flags timeout; }
    set v6 { type ipv6_addr; flags timeout; }
    set nets4 { type ipv4_addr; flags interval; }
    set nets6 { type ipv6_addr; flags interval, timeout; }
}
table inet f2b-table {
    set addr-set-postfix { type ipv4_addr; }
    set addr6-set-postfix { type ipv6_addr; }
}
table ip6 crowdsec6 {
    set crowdsec6-blacklists-crowdsec { type ipv6_addr; flags timeout; }
}
"#;

/// (table, set, element) for each `nft` command below, in order.
const EXPECTED: [(&str, &str, &str); 9] = [
    ("sd", "v4", "198.51.100.7"),
    ("sd", "v6", "2001:db8::8000:5:0:1"),
    ("sd", "nets4", "198.51.100.0/24"),
    ("sd", "nets4", "192.0.2.9"),
    ("sd", "nets6", "2001:db8:1::/48"),
    ("sd", "nets6", "2001:db8::7"),
    ("f2b-table", "addr-set-postfix", "203.0.113.5"),
    ("f2b-table", "addr6-set-postfix", "2001:db8::f2b"),
    ("crowdsec6", "crowdsec6-blacklists-crowdsec", "2001:db8::c5"),
];

fn add_elements(ns: &Netns) {
    let file = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(file.path(), RULESET).expect("writing the ruleset");
    let path = file.path().to_str().expect("a UTF-8 path");
    nft(ns, &["-f", path]).expect("loading the ruleset");
    for cmd in [
        r#"add element inet sd v4 { 198.51.100.7 timeout 1h comment "early-talk" }"#,
        "add element inet sd v6 { 2001:db8::8000:5:0:1 timeout 1h }",
        "add element inet sd nets4 { 198.51.100.0/24, 192.0.2.9 }",
        "add element inet sd nets6 { 2001:db8:1::/48 timeout 1h, 2001:db8::7 }",
        "add element inet f2b-table addr-set-postfix { 203.0.113.5 }",
        "add element inet f2b-table addr6-set-postfix { 2001:db8::f2b }",
        "add element ip6 crowdsec6 crowdsec6-blacklists-crowdsec { 2001:db8::c5 timeout 4h }",
    ] {
        nft(ns, &[cmd]).expect(cmd);
    }
}

fn triples(added: &[Added]) -> HashSet<(String, String, String)> {
    added
        .iter()
        .map(|a| (a.table.clone(), a.set.clone(), a.element.clone()))
        .collect()
}

fn expected() -> HashSet<(String, String, String)> {
    EXPECTED
        .iter()
        .map(|(t, s, e)| (t.to_string(), s.to_string(), e.to_string()))
        .collect()
}

#[test]
fn elements_added_by_nft_are_seen_with_table_set_and_key() {
    if !privileged("elements_added_by_nft_are_seen_with_table_set_and_key") {
        return;
    }
    let ns = Netns::new("nlmon").expect("a network namespace");
    let watcher = Watcher::start(&ns).expect("watching nf_tables");
    add_elements(&ns);
    for (table, n) in [("sd", 6), ("f2b-table", 2), ("crowdsec6", 1)] {
        assert_eq!(
            watcher.additions().wait_added(
                table,
                n,
                Duration::from_secs(5),
                Duration::from_secs(5)
            ),
            n,
            "{table}: {:?}",
            watcher.additions().added()
        );
    }
    let added = watcher.additions().added();
    assert_eq!(added.len(), EXPECTED.len(), "{added:?}");
    assert_eq!(triples(&added), expected(), "{added:?}");
    // In the order nft added them, and stamped in that order.
    let order: Vec<&str> = added.iter().map(|a| a.element.as_str()).collect();
    let want: Vec<&str> = EXPECTED.iter().map(|(_, _, e)| *e).collect();
    assert_eq!(order[..2], want[..2]);
    assert_eq!(order[6..], want[6..]);
    assert!(added.windows(2).all(|w| w[0].at <= w[1].at));
    // One transaction per command.
    assert_eq!(watcher.additions().transactions_adding_to("sd"), 4);
    assert_eq!(watcher.additions().transactions_adding_to("f2b-table"), 2);
    assert_eq!(watcher.additions().transactions_adding_to("crowdsec6"), 1);
    assert_eq!(watcher.overruns(), 0);
    assert_eq!(watcher.unread(), 0);
    watcher.stop().expect("the watcher stops cleanly");
}

#[test]
fn the_watcher_reports_what_nft_monitor_reports() {
    if !privileged("the_watcher_reports_what_nft_monitor_reports") {
        return;
    }
    let ns = Netns::new("nlmon-vs").expect("a network namespace");
    let monitor = Monitor::start(&ns).expect("nft monitor");
    let watcher = Watcher::start(&ns).expect("watching nf_tables");
    add_elements(&ns);
    for table in ["sd", "f2b-table", "crowdsec6"] {
        let want = EXPECTED.iter().filter(|(t, _, _)| *t == table).count();
        let (limit, quiet) = (Duration::from_secs(5), Duration::from_secs(5));
        assert_eq!(
            monitor.additions().wait_added(table, want, limit, quiet),
            want
        );
        assert_eq!(
            watcher.additions().wait_added(table, want, limit, quiet),
            want
        );
    }
    assert_eq!(
        triples(&watcher.additions().added()),
        triples(&monitor.additions().added())
    );
    assert_eq!(
        watcher.additions().added().len(),
        monitor.additions().added().len()
    );
}

#[test]
fn many_elements_in_one_transaction_are_all_seen() {
    if !privileged("many_elements_in_one_transaction_are_all_seen") {
        return;
    }
    let ns = Netns::new("nlmon-many").expect("a network namespace");
    let watcher = Watcher::start(&ns).expect("watching nf_tables");
    nft(
        &ns,
        &["add table inet sd; add set inet sd v6 { type ipv6_addr; flags timeout; size 65536; }"],
    )
    .expect("a set");
    const N: usize = 5000;
    let elems: Vec<String> = (0..N).map(|i| format!("2001:db8::7:{i:x}")).collect();
    let file = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(
        file.path(),
        format!("add element inet sd v6 {{ {} }}\n", elems.join(", ")),
    )
    .expect("writing the batch");
    nft(&ns, &["-f", file.path().to_str().expect("a UTF-8 path")]).expect("adding 5000");
    assert_eq!(
        watcher
            .additions()
            .wait_added("sd", N, Duration::from_secs(10), Duration::from_secs(5)),
        N
    );
    let seen: HashSet<String> = watcher
        .additions()
        .added()
        .into_iter()
        .map(|a| a.element)
        .collect();
    assert_eq!(seen, elems.into_iter().collect::<HashSet<_>>());
    assert_eq!(watcher.additions().transactions_adding_to("sd"), 1);
    assert_eq!(watcher.overruns(), 0);
}
