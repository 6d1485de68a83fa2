//! End to end with nftables: early talkers are banned in `inet spamdelay`
//! with a timeout and a reason, refused on their next connection, and the
//! bans expire, double, survive restarts and self-heal; admins manage them.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use spamdelay_tests::{
    daemon::{Daemon, counter},
    lab::{Lab, SERVER_IF},
    nft::{self, add_unrelated_table, element, elements},
    privileged,
    scenario::{Scenario, VERDICT_WAIT},
    smtp::{self, Greeting},
    until,
};

const V4: &str = "early_talkers_v4";
const V6: &str = "early_talkers_v6";
const V6_64: &str = "early_talkers_v6_64";

fn wait_ban(s: &Scenario, addr: &str) -> String {
    s.daemon
        .wait_for(|l| l.starts_with(&format!("ban [{addr}]")), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no ban of {addr}: {:#?}", s.daemon.lines()))
}

fn ruleset(s: &Scenario) -> String {
    nft::nft(&s.lab.server, &["list", "ruleset"]).expect("nft list ruleset")
}

fn with_unrelated_table(extra: &[&str]) -> Scenario {
    Scenario::prepared(Greeting::pause(1500), &[25], extra, |lab| {
        add_unrelated_table(&lab.server).expect("an admin's own table")
    })
}

fn filter_table(s: &Scenario) -> String {
    nft::nft(&s.lab.server, &["list", "table", "inet", "filter"]).expect("the admin's table")
}

#[test]
fn blind_sender_is_banned_and_refused_while_others_still_deliver() {
    if !privileged("blind_sender_is_banned_and_refused_while_others_still_deliver") {
        return;
    }
    let s = with_unrelated_table(&[]);
    let theirs = filter_table(&s);
    let blind = s.client(0, false, 25, smtp::blind);
    let line = wait_ban(&s, &blind.ip().to_string());
    assert!(
        line.contains("for 1h (offence 1): early-talk 50B after 0.00s: EHLO blind.example\\r\\n"),
        "{line}"
    );
    let e = element(&s.lab.server, V4, &blind.ip().to_string())
        .expect("the blind sender in early_talkers_v4");
    assert_eq!(e.timeout, Some(3600));
    let comment = e.comment.expect("a reason");
    assert!(
        comment.starts_with("early-talk 50B after 0.00s: EHLO blind.example\\r\\nMAIL FROM:"),
        "{comment}"
    );
    assert!(
        s.lab.refused(0, false),
        "the banned client's next connection is refused"
    );
    let patient = s.client(1, false, 25, smtp::patient);
    assert!(s.verdict(patient).starts_with("PASS"));
    assert_eq!(elements(&s.lab.server, V4).len(), 1, "only the offender");
    assert_eq!(filter_table(&s), theirs, "the admin's table is untouched");
    s.stop();
}

#[test]
fn ipv6_blind_sender_is_banned() {
    if !privileged("ipv6_blind_sender_is_banned") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &[]);
    let blind = s.client(0, true, 25, smtp::blind);
    wait_ban(&s, &blind.ip().to_string());
    assert!(element(&s.lab.server, V6, &blind.ip().to_string()).is_some());
    assert!(s.lab.refused(0, true));
    assert!(
        !s.lab.refused(1, true),
        "its /64 neighbour is not banned by default"
    );
    s.stop();
}

#[test]
fn ipv6_prefix_mode_bans_the_whole_64() {
    if !privileged("ipv6_prefix_mode_bans_the_whole_64") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &["--ipv6-prefix", "64"]);
    s.client(1, true, 25, smtp::blind);
    s.daemon
        .wait_for(|l| l.starts_with("ban [2001:db8::]/64"), VERDICT_WAIT)
        .expect("a /64 ban");
    // A hash set of /64 network addresses, matched by `ip6 saddr & mask`.
    assert!(
        element(&s.lab.server, V6_64, "2001:db8::").is_some(),
        "{:?}",
        elements(&s.lab.server, V6_64)
    );
    assert!(elements(&s.lab.server, V6).is_empty());
    assert!(
        s.lab.refused(2, true),
        "another address in the /64 is refused"
    );
    assert!(!s.lab.refused(2, false), "IPv4 is not affected");
    s.stop();
}

#[test]
fn ban_expires_on_time() {
    if !privileged("ban_expires_on_time") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &["--ban-time", "2s"]);
    let blind = s.client(2, false, 25, smtp::blind);
    let addr = blind.ip().to_string();
    wait_ban(&s, &addr);
    assert!(s.lab.refused(2, false));
    assert!(
        until(Duration::from_secs(4), || element(&s.lab.server, V4, &addr)
            .is_none()),
        "nft expired the ban"
    );
    assert!(!s.lab.refused(2, false), "welcome again after the ban");
    s.stop();
}

#[test]
fn repeat_offence_doubles_the_ban() {
    if !privileged("repeat_offence_doubles_the_ban") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &["--ban-time", "2s"]);
    let addr = Lab::client_v4(3).to_string();
    s.client(3, false, 25, smtp::blind);
    assert!(wait_ban(&s, &addr).contains("for 2s (offence 1)"));
    assert!(until(Duration::from_secs(4), || element(
        &s.lab.server,
        V4,
        &addr
    )
    .is_none()));
    s.client(3, false, 25, smtp::blind);
    let second = s
        .daemon
        .wait_for(|l| l.contains("(offence 2)"), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no second ban: {:#?}", s.daemon.lines()));
    assert!(
        second.starts_with(&format!("ban [{addr}] for 4s (offence 2)")),
        "{second}"
    );
    assert_eq!(
        element(&s.lab.server, V4, &addr).and_then(|e| e.timeout),
        Some(4)
    );
    s.stop();
}

#[test]
fn dry_run_leaves_nftables_untouched() {
    if !privileged("dry_run_leaves_nftables_untouched") {
        return;
    }
    let s = with_unrelated_table(&["--dry-run"]);
    let before = ruleset(&s);
    let blind = s.client(4, false, 25, smtp::blind);
    let line = s
        .daemon
        .wait_for(|l| l.starts_with("would ban"), VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no would-ban line: {:#?}", s.daemon.lines()));
    assert!(
        line.starts_with(&format!(
            "would ban [{}] for 1h (offence 1): early-talk",
            blind.ip()
        )),
        "{line}"
    );
    assert!(!s.lab.refused(4, false), "nothing is enforced");
    let lines = s.daemon.lines();
    assert!(!lines.iter().any(|l| l.starts_with("ban [")), "{lines:#?}");
    // Give the (disabled) self-healing a chance to misbehave.
    sleep(Duration::from_millis(1200));
    assert_eq!(ruleset(&s), before, "nft list ruleset is byte-identical");
    s.stop();
}

#[test]
fn unban_lets_the_client_back_in() {
    if !privileged("unban_lets_the_client_back_in") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &[]);
    let addr = Lab::client_v4(5).to_string();
    s.client(5, false, 25, smtp::blind);
    wait_ban(&s, &addr);
    let (ok, out, err) = s
        .daemon
        .admin(&s.lab.server, &["unban", &addr])
        .expect("spamdelay unban");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("unbanned [{addr}]"));
    assert!(element(&s.lab.server, V4, &addr).is_none());
    assert!(!s.lab.refused(5, false), "back in");
    let (_, list, _) = s
        .daemon
        .admin(&s.lab.server, &["list"])
        .expect("spamdelay list");
    assert_eq!(list.trim(), "no bans in force");
    let (ok, _, err) = s
        .daemon
        .admin(&s.lab.server, &["unban", &addr])
        .expect("spamdelay unban");
    assert!(!ok && err.contains("is not banned"), "{err}");
    s.stop();
}

#[test]
fn sigkill_and_restart_keep_the_bans() {
    if !privileged("sigkill_and_restart_keep_the_bans") {
        return;
    }
    let mut s = Scenario::new(Greeting::pause(1500), &[]);
    let addr = Lab::client_v4(6).to_string();
    s.client(6, false, 25, smtp::blind);
    wait_ban(&s, &addr);
    let state = s.daemon.state();
    s.daemon.kill().expect("SIGKILL");
    assert!(
        element(&s.lab.server, V4, &addr).is_some(),
        "nft keeps the ban meanwhile"
    );
    // As after a reboot: the kernel's ruleset is gone, only the register is left.
    nft::nft(&s.lab.server, &["delete", "table", "inet", "spamdelay"]).expect("deleting the table");
    s.daemon =
        Daemon::start_with_state(&s.lab.server, &["--iface", SERVER_IF], state).expect("restart");
    let e = element(&s.lab.server, V4, &addr).expect("the ban is back");
    let left = e.timeout.expect("a timeout");
    assert!(
        (3500..=3600).contains(&left),
        "restored with its remaining time: {left}"
    );
    assert!(e.comment.is_some_and(|c| c.starts_with("early-talk")));
    assert!(s.daemon.lines().iter().any(|l| l
        == &format!(
            "restored 1 bans from {}/bans.json",
            s.daemon.state().path().display()
        )));
    assert!(s.lab.refused(6, false));
    s.stop();
}

#[test]
fn flushed_ruleset_is_rebuilt_within_two_seconds() {
    if !privileged("flushed_ruleset_is_rebuilt_within_two_seconds") {
        return;
    }
    let s = Scenario::new(Greeting::pause(1500), &[]);
    let addr = Lab::client_v4(7).to_string();
    s.client(7, false, 25, smtp::blind);
    wait_ban(&s, &addr);
    nft::nft(&s.lab.server, &["flush", "ruleset"]).expect("nft flush ruleset");
    let flushed = Instant::now();
    assert!(
        until(Duration::from_secs(2), || element(&s.lab.server, V4, &addr)
            .is_some()),
        "table and ban back within 2 s"
    );
    eprintln!("rebuilt after {:?}", flushed.elapsed());
    assert!(s.lab.refused(7, false));
    s.stop();
}

#[test]
fn manual_ban_list_and_status() {
    if !privileged("manual_ban_list_and_status") {
        return;
    }
    let s = with_unrelated_table(&[]);
    let theirs = filter_table(&s);
    let addr = Lab::client_v4(1).to_string();
    let (ok, out, err) = s
        .daemon
        .admin(
            &s.lab.server,
            &["ban", &addr, "--time", "1d", "--reason", "spam run \"x\""],
        )
        .expect("spamdelay ban");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("banned [{addr}] for 1d (offence 1)"));
    let e = element(&s.lab.server, V4, &addr).expect("manual ban in nft");
    assert_eq!(
        (e.timeout, e.comment.as_deref()),
        (Some(86400), Some("manual: spam run 'x'"))
    );
    assert!(s.lab.refused(1, false));
    let (_, list, _) = s
        .daemon
        .admin(&s.lab.server, &["list", "--json"])
        .expect("spamdelay list");
    let rows: serde_json::Value = serde_json::from_str(&list).expect("list --json");
    assert_eq!(rows[0]["address"], format!("{addr}/32"));
    assert_eq!(rows[0]["offences"], 1);
    assert!(rows[0]["seconds_left"].as_u64().is_some_and(|l| l > 86_000));
    s.client(2, false, 25, smtp::blind);
    wait_ban(&s, &Lab::client_v4(2).to_string());
    sleep(Duration::from_millis(1200)); // the status file is refreshed each second
    let (ok, status, err) = s
        .daemon
        .admin(&s.lab.server, &["status", "--json"])
        .expect("spamdelay status");
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&status).expect("status --json");
    assert_eq!(st["daemon_running"], true);
    assert_eq!(st["bans_v4"], 2);
    assert_eq!(st["table_present"], true);
    assert_eq!(st["daemon"]["counters"]["early_talk"], 1);
    assert_eq!(st["daemon"]["attached"][0]["iface"], SERVER_IF);
    let (_, text, _) = s
        .daemon
        .admin(&s.lab.server, &["status"])
        .expect("spamdelay status");
    assert!(text.starts_with("daemon: running, pid "), "{text}");
    assert_eq!(filter_table(&s), theirs);
    let lines = s.stop();
    assert_eq!(counter(&lines, "early_talk"), Some(1));
}

#[test]
fn admin_commands_work_without_the_daemon() {
    if !privileged("admin_commands_work_without_the_daemon") {
        return;
    }
    let lab = Lab::new().expect("lab");
    let state = tempfile::tempdir().expect("state dir");
    let dir = state.path().to_str().expect("utf-8 path").to_string();
    let run = |args: &[&str]| {
        lab.server
            .command(spamdelay_tests::daemon::binary())
            .args(["--state-dir", &dir])
            .args(args)
            .output()
            .expect("spamdelay")
    };
    let out = run(&["ban", "2001:db8::/48", "--time", "2h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        element(&lab.server, "early_talkers_v6_nets", "2001:db8::/48").is_some(),
        "table created and ban applied"
    );
    // A /64 goes to the hash set of masked addresses, over netlink.
    let out = run(&["ban", "2001:db8:1:2::/64", "--time", "2h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(element(&lab.server, V6_64, "2001:db8:1:2::").is_some());
    let out = run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("daemon: not running"), "{text}");
    assert!(text.contains("0 IPv4, 2 IPv6 in force"), "{text}");
    for net in ["2001:db8::/48", "2001:db8:1:2::/64"] {
        let out = run(&["unban", net]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(elements(&lab.server, "early_talkers_v6_nets").is_empty());
    assert!(elements(&lab.server, V6_64).is_empty());
}

#[test]
fn config_file_settings_apply_and_the_command_line_wins() {
    if !privileged("config_file_settings_apply_and_the_command_line_wins") {
        return;
    }
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("spamdelay.toml");
    std::fs::write(
        &file,
        "ban-time = \"2s\"\nipv6-prefix = 64\nallow = [\"198.51.100.13\"]\n",
    )
    .expect("config file");
    let file = file.to_str().expect("utf-8 path");
    let s = Scenario::new(
        Greeting::pause(1500),
        &["--config", file, "--ipv6-prefix", "128"],
    );
    s.client(0, false, 25, smtp::blind);
    assert!(
        wait_ban(&s, &Lab::client_v4(0).to_string()).contains(" for 2s "),
        "ban-time from the file"
    );
    s.client(1, true, 25, smtp::blind);
    wait_ban(&s, &Lab::client_v6(1).to_string());
    assert!(
        element(&s.lab.server, V6, &Lab::client_v6(1).to_string()).is_some(),
        "/128 from the command line"
    );
    let quiet = s.client(3, false, 25, smtp::blind);
    s.no_verdict(quiet);
    s.stop();
}

#[test]
fn quitters_are_banned_only_on_request() {
    if !privileged("quitters_are_banned_only_on_request") {
        return;
    }
    let hang_up = |src, dst| smtp::hang_up(src, dst, Duration::from_millis(200));
    let s = Scenario::new(Greeting::pause(3000), &[]);
    let quitter = s.client(0, false, 25, hang_up);
    assert!(s.verdict(quitter).starts_with("QUIT"));
    sleep(Duration::from_millis(300));
    assert!(
        elements(&s.lab.server, V4).is_empty(),
        "a QUIT alone is not banned"
    );
    s.stop();

    let s = Scenario::new(
        Greeting::pause(3000),
        &["--ban-quitters", "--action", "drop"],
    );
    s.client(0, false, 25, hang_up);
    let line = wait_ban(&s, &Lab::client_v4(0).to_string());
    assert!(line.contains("(offence 1): quit after 0.2"), "{line}");
    let table = nft::nft(
        &s.lab.server,
        &["list", "chain", "inet", "spamdelay", "input"],
    )
    .expect("the chain");
    assert!(
        table.contains("counter packets") && table.contains(" drop"),
        "--action drop: {table}"
    );
    assert!(!table.contains("reject"), "{table}");
    s.stop();
}
