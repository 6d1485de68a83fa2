//! Ban set elements over netlink (`spamdelay::netlink`), checked with `nft`
//! in a namespace of their own: timeouts and comments as nft shows them,
//! re-adding refreshes, deleting, a full set refusing only what does not fit,
//! and the sets netlink leaves to nft.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread::sleep,
    time::{Duration, Instant},
};

use spamdelay::{
    allow::Cidr,
    bans::TableSettings,
    netlink::{NetlinkError, NetlinkSets, Refusal},
    nft::{Change, SET_V4, SET_V4_NETS, SET_V6, SET_V6_64, SET_V6_NETS},
};
use spamdelay_tests::{
    lab::Netns,
    nft::{Element, elements},
    privileged,
};

/// A namespace with table inet spamdelay made by the daemon's own code, and
/// a netlink socket opened there (it stays there whoever uses it).
fn table(tag: &str, settings: TableSettings) -> (Netns, NetlinkSets) {
    let ns = Netns::new(tag).expect("a network namespace");
    let sets = ns
        .run(move || {
            runtime()
                .block_on(settings.ensure())
                .expect("creating table inet spamdelay");
            NetlinkSets::open()
        })
        .expect("entering the namespace")
        .expect("opening a netlink socket");
    (ns, sets)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn add(addr: IpAddr, secs: u64, comment: &str) -> Change {
    let cidr = Cidr::host(addr);
    Change::Add {
        set: spamdelay::nft::set_for(&cidr),
        cidr,
        timeout_secs: secs,
        comment: comment.to_string(),
    }
}

fn delete(addr: IpAddr) -> Change {
    let cidr = Cidr::host(addr);
    Change::Delete {
        set: spamdelay::nft::set_for(&cidr),
        cidr,
    }
}

/// 198.18.0.0/15 (RFC 2544, benchmarking): IPv4's documentation ranges hold
/// 768 addresses, fewer than the tests need. Never routed, never sent to.
fn v4(i: u32) -> IpAddr {
    Ipv4Addr::from(0xc612_0000 + i).into()
}

fn v6(i: u32) -> IpAddr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into()
}

fn element_of(ns: &Netns, set: &str, addr: IpAddr) -> Option<Element> {
    let addr = addr.to_string();
    elements(ns, set).into_iter().find(|e| e.addr == addr)
}

#[test]
fn one_address_of_each_family_goes_in_with_its_timeout_and_comment() {
    if !privileged("one_address_of_each_family_goes_in_with_its_timeout_and_comment") {
        return;
    }
    let (ns, mut sets) = table("nl1", TableSettings::default());
    let changes = [
        add(v4(1), 3600, "early-talk 11B after 0.21s: EHLO x\\r\\n"),
        add(v6(1), 7200, "manual: \"quoted\" reason"),
    ];
    let applied = sets.apply(&changes).expect("applying over netlink");
    assert!(applied.all_took(), "{applied:?}");
    let e = element_of(&ns, SET_V4, v4(1)).expect("the IPv4 ban in nft");
    assert_eq!(e.timeout, Some(3600));
    assert!(e.expires.is_some_and(|x| x > 3590), "{e:?}");
    assert_eq!(
        e.comment.as_deref(),
        Some("early-talk 11B after 0.21s: EHLO x\\r\\n")
    );
    let e = element_of(&ns, SET_V6, v6(1)).expect("the IPv6 ban in nft");
    assert_eq!(e.timeout, Some(7200));
    // Sanitised as the nft path does: no double quote reaches nft.
    assert_eq!(e.comment.as_deref(), Some("manual: 'quoted' reason"));
}

#[test]
fn five_thousand_addresses_of_each_family_go_in() {
    if !privileged("five_thousand_addresses_of_each_family_go_in") {
        return;
    }
    let (ns, mut sets) = table("nl5k", TableSettings::default());
    let changes: Vec<Change> = (0..5000)
        .flat_map(|i| {
            [
                add(v4(i), 600 + u64::from(i), &format!("ban {i}")),
                add(v6(i), 600 + u64::from(i), &format!("ban {i}")),
            ]
        })
        .collect();
    let applied = sets.apply(&changes).expect("applying over netlink");
    assert_eq!(
        applied.took().count(),
        10_000,
        "{:?}",
        applied.refused().next()
    );
    for (set, addr) in [(SET_V4, v4 as fn(u32) -> IpAddr), (SET_V6, v6)] {
        let listed = elements(&ns, set);
        assert_eq!(listed.len(), 5000, "{set}");
        for i in [0, 1, 2499, 4999] {
            let want = addr(i).to_string();
            let e = listed
                .iter()
                .find(|e| e.addr == want)
                .unwrap_or_else(|| panic!("{want} not in {set}"));
            assert_eq!(e.timeout, Some(600 + u64::from(i)), "{e:?}");
            assert_eq!(e.comment.as_deref(), Some(format!("ban {i}").as_str()));
        }
    }
}

#[test]
fn re_adding_refreshes_the_timeout_and_keeps_the_batch() {
    if !privileged("re_adding_refreshes_the_timeout_and_keeps_the_batch") {
        return;
    }
    let (ns, mut sets) = table("nlre", TableSettings::default());
    let first = sets.apply(&[add(v4(7), 60, "first")]).expect("adding");
    assert!(first.all_took(), "{first:?}");
    sleep(Duration::from_millis(2500));
    let before = element_of(&ns, SET_V4, v4(7)).expect("the ban");
    assert!(before.expires.is_some_and(|x| x <= 58), "{before:?}");
    // The same timeout again, with a new element in the same transaction.
    let again = sets
        .apply(&[add(v4(7), 60, "second"), add(v4(8), 60, "new")])
        .expect("re-adding");
    assert!(again.all_took(), "{again:?}");
    let after = element_of(&ns, SET_V4, v4(7)).expect("the ban");
    assert!(
        after.expires.is_some_and(|x| x >= 59),
        "not refreshed: {after:?}"
    );
    // The kernel keeps an element's userdata on update.
    assert_eq!(after.comment.as_deref(), Some("first"));
    assert!(element_of(&ns, SET_V4, v4(8)).is_some());
    // A longer timeout takes too.
    sets.apply(&[add(v4(7), 600, "third")]).expect("re-adding");
    let longer = element_of(&ns, SET_V4, v4(7)).expect("the ban");
    assert_eq!(longer.timeout, Some(600), "{longer:?}");
}

#[test]
fn deleting_lifts_the_ban_and_a_missing_element_is_no_error() {
    if !privileged("deleting_lifts_the_ban_and_a_missing_element_is_no_error") {
        return;
    }
    let (ns, mut sets) = table("nldel", TableSettings::default());
    let added = sets
        .apply(&[
            add(v4(1), 600, "a"),
            add(v4(2), 600, "b"),
            add(v6(1), 600, "c"),
        ])
        .expect("adding");
    assert!(added.all_took(), "{added:?}");
    let deleted = sets
        .apply(&[delete(v4(1)), delete(v6(1)), delete(v4(99))])
        .expect("deleting");
    assert!(deleted.all_took(), "{deleted:?}");
    let left: Vec<String> = elements(&ns, SET_V4).into_iter().map(|e| e.addr).collect();
    assert_eq!(left, [v4(2).to_string()]);
    assert!(elements(&ns, SET_V6).is_empty());
}

#[test]
fn a_full_set_refuses_the_rest_and_only_the_rest() {
    if !privileged("a_full_set_refuses_the_rest_and_only_the_rest") {
        return;
    }
    const SIZE: u32 = 1024;
    let settings = TableSettings {
        set_size: SIZE,
        ..TableSettings::default()
    };
    let (ns, mut sets) = table("nlfull", settings);
    // Some IPv6 in the same call: their set has room, they must all take.
    let mut changes: Vec<Change> = (0..SIZE + 300).map(|i| add(v4(i), 600, "x")).collect();
    changes.extend((0..10).map(|i| add(v6(i), 600, "y")));
    let applied = sets.apply(&changes).expect("applying over netlink");
    let full: Vec<usize> = applied.full().collect();
    let want: Vec<usize> = (SIZE as usize..SIZE as usize + 300).collect();
    assert_eq!(full, want);
    assert_eq!(applied.refused().count(), 300);
    assert!(
        applied.outcomes()[SIZE as usize..SIZE as usize + 300]
            .iter()
            .all(|o| *o == Err(Refusal::Full { set: SET_V4 }))
    );
    assert_eq!(elements(&ns, SET_V4).len(), SIZE as usize);
    assert_eq!(elements(&ns, SET_V6).len(), 10);
    // A full set still refreshes what it holds, and a deletion makes room
    // for one more in the same transaction.
    let more = sets
        .apply(&[
            add(v4(0), 600, "x"),
            delete(v4(1)),
            add(v4(SIZE + 1), 600, "x"),
            add(v4(SIZE + 2), 600, "x"),
        ])
        .expect("applying over netlink");
    assert_eq!(more.took().collect::<Vec<_>>(), [0, 1, 2], "{more:?}");
    assert_eq!(more.full().collect::<Vec<_>>(), [3]);
    assert!(element_of(&ns, SET_V4, v4(SIZE + 1)).is_some());
}

#[test]
fn interval_sets_and_networks_are_refused_and_the_rest_applied() {
    if !privileged("interval_sets_and_networks_are_refused_and_the_rest_applied") {
        return;
    }
    let (ns, mut sets) = table("nliv", TableSettings::default());
    let net: Cidr = "198.18.0.0/24".parse().expect("a CIDR");
    let net64: Cidr = "2001:db8:0:7::/64".parse().expect("a CIDR");
    assert_eq!(spamdelay::nft::set_for(&net64), SET_V6_64);
    let changes = [
        Change::Add {
            cidr: Cidr::host(v6(1)),
            set: SET_V6_NETS,
            timeout_secs: 600,
            comment: "into an interval set".into(),
        },
        Change::Add {
            cidr: net,
            set: SET_V4_NETS,
            timeout_secs: 600,
            comment: "a network".into(),
        },
        Change::Add {
            cidr: Cidr::host(v6(2)),
            set: SET_V4,
            timeout_secs: 600,
            comment: "wrong family".into(),
        },
        add(v4(1), 600, "fine"),
        // A /64 is a single (masked) address in its hash set.
        Change::Add {
            cidr: net64,
            set: SET_V6_64,
            timeout_secs: 600,
            comment: "a /64".into(),
        },
    ];
    let applied = sets.apply(&changes).expect("applying over netlink");
    assert_eq!(
        applied.outcomes(),
        [
            Err(Refusal::IntervalSet { set: SET_V6_NETS }),
            Err(Refusal::Network {
                cidr: "198.18.0.0/24".into(),
                set: SET_V4_NETS
            }),
            Err(Refusal::WrongFamily {
                cidr: v6(2).to_string() + "/128",
                set: SET_V4,
                key_len: 4
            }),
            Ok(()),
            Ok(()),
        ]
    );
    assert!(elements(&ns, SET_V6_NETS).is_empty());
    assert_eq!(elements(&ns, SET_V4).len(), 1);
    let held = elements(&ns, SET_V6_64);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].addr, "2001:db8:0:7::", "the /64's network address");
}

#[test]
fn a_missing_table_is_an_error_that_names_the_set() {
    if !privileged("a_missing_table_is_an_error_that_names_the_set") {
        return;
    }
    let ns = Netns::new("nlnone").expect("a network namespace");
    let mut sets = ns
        .run(NetlinkSets::open)
        .expect("entering the namespace")
        .expect("opening a netlink socket");
    let err = sets
        .apply(&[add(v6(1), 600, "x")])
        .expect_err("no table, no ban");
    assert!(
        matches!(&err, NetlinkError::NoSuchSet { set } if set == SET_V6),
        "{err}"
    );
    assert!(err.to_string().contains("early_talkers_v6"), "{err}");
    // Nothing to do is not an error, table or not.
    assert!(sets.apply(&[]).expect("nothing").all_took());
}

/// Not a test of behaviour: prints how long bans take over netlink and
/// through `nft` (spawned per batch), measured in the same run. Run with
/// `cargo test --release -p spamdelay-tests --test netlink -- --ignored
/// --nocapture` (as root).
#[test]
#[ignore = "a measurement, not a test: run by hand"]
fn measure_netlink_against_nft() {
    if !privileged("measure_netlink_against_nft") {
        return;
    }
    const SINGLES: u32 = 200;
    const BULK: u32 = 100_000;
    const BATCH: usize = 512;
    let settings = TableSettings {
        set_size: 2 * BULK,
        ..TableSettings::default()
    };
    for round in 0..2 {
        let netlink_first = round % 2 == 0;
        for netlink in [netlink_first, !netlink_first] {
            let ns = Netns::new("nlbench").expect("a network namespace");
            let settings = settings.clone();
            // Both sides run on one thread inside the namespace, nft's on a
            // runtime made once, as the daemon's would be.
            let (one, bulk) = ns
                .run(move || {
                    let rt = runtime();
                    rt.block_on(settings.ensure()).expect("creating the table");
                    let mut sets = NetlinkSets::open().expect("a netlink socket");
                    let mut apply = |changes: &[Change]| -> Duration {
                        let start = Instant::now();
                        if netlink {
                            assert!(sets.apply(changes).expect("netlink").all_took());
                        } else {
                            rt.block_on(spamdelay::nft::apply_changes(changes))
                                .expect("nft");
                        }
                        start.elapsed()
                    };
                    let mut one: Vec<Duration> = (0..SINGLES)
                        .map(|i| apply(&[add(v6(1_000_000 + i), 3600, "single")]))
                        .collect();
                    one.sort();
                    let changes: Vec<Change> = (0..BULK)
                        .map(|i| add(v6(i), 3600, &format!("bulk {i}")))
                        .collect();
                    let start = Instant::now();
                    for batch in changes.chunks(BATCH) {
                        apply(batch);
                    }
                    (one, start.elapsed())
                })
                .expect("entering the namespace");
            let held = elements(&ns, SET_V6).len();
            println!(
                "round {round} {}: 1 element p50 {:>9.1?} p90 {:>9.1?} | {BULK} IPv6 in batches of {BATCH}: {:>8.2?} ({:.0}/s), {held} in the set",
                if netlink { "netlink" } else { "nft    " },
                one[one.len() / 2],
                one[one.len() * 9 / 10],
                bulk,
                f64::from(BULK) / bulk.as_secs_f64(),
            );
        }
    }
}
