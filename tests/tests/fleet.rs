//! The fleet through a real CrowdSec LAPI (Debian's `crowdsec`, run as LAPI
//! only in the lab): two MX namespaces, each guarded by its own spamdelay,
//! share their bans. A blind client caught by MX-A is refused by MX-B within
//! 2 s, an unban on MX-A lifts it on MX-B, a LAPI that is down loses nothing
//! (across a restart of MX-A too), MX-B's allowlist wins, and every
//! credential error is one line while local bans go on.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use spamdelay_tests::{
    crowdsec::{FleetLab, LAPI_ADDR, LAPI_URL, Lapi, Secrets, ban_alert},
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    privileged,
    scenario::VERDICT_WAIT,
    smtp::{self, Greeting, TestServer},
    until,
};

/// The fleet labs use fixed interface names: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How soon MX-B must refuse what MX-A banned (pulls every second).
const PROPAGATION: Duration = Duration::from_secs(2);

struct Fleet {
    lab: FleetLab,
    lapi: Lapi,
    secrets: Secrets,
    _servers: [TestServer; 2],
}

impl Fleet {
    fn new() -> Fleet {
        let lab = FleetLab::new().expect("building the fleet lab");
        let lapi = Lapi::start(&lab.lapi, LAPI_ADDR).expect("starting LAPI");
        let servers = [&lab.lab_a, &lab.lab_b]
            .map(|l| TestServer::start(&l.server, 25, Greeting::pause(1500)).expect("test server"));
        Fleet {
            lab,
            lapi,
            secrets: Secrets::new().expect("a secrets dir"),
            _servers: servers,
        }
    }

    /// A machine and a bouncer for `mx`: the flags that publish and take.
    fn credentials(&self, mx: &str) -> Vec<String> {
        let password = format!("pw-{mx}-0123456789");
        self.lapi
            .add_machine(mx, &password)
            .expect("cscli machines add");
        let key = self.lapi.add_bouncer(mx).expect("cscli bouncers add");
        let pw = self
            .secrets
            .password_file(mx, &password)
            .expect("password file");
        let key = self.secrets.key_file(mx, &key).expect("key file");
        flags(mx, Some(&pw), Some(&key))
    }
}

fn flags(mx: &str, password: Option<&PathBuf>, key: Option<&PathBuf>) -> Vec<String> {
    let mut f = vec!["--crowdsec-lapi".to_string(), LAPI_URL.to_string()];
    if let Some(pw) = password {
        f.extend([
            "--crowdsec-machine".into(),
            mx.into(),
            "--crowdsec-password-file".into(),
            pw.display().to_string(),
        ]);
    }
    if let Some(key) = key {
        f.extend([
            "--crowdsec-bouncer-key-file".into(),
            key.display().to_string(),
        ]);
    }
    f
}

fn start(lab: &Lab, extra: &[String]) -> Daemon {
    let mut args = vec!["--iface", SERVER_IF, "--mta", "none"];
    args.extend(extra.iter().map(String::as_str));
    Daemon::start(&lab.server, &args).expect("starting spamdelay")
}

/// A blind client from lab address `i` against `lab`'s MX: EARLY-TALK.
fn blind(lab: &Lab, d: &Daemon, i: u8) {
    let client = lab.run_client(i, false, 25, smtp::blind);
    let verdict = d.verdict_for(client, VERDICT_WAIT).unwrap_or_default();
    assert!(
        verdict.starts_with("EARLY-TALK"),
        "{verdict:?}: {:#?}",
        d.lines()
    );
}

fn admin(d: &Daemon, lab: &Lab, args: &[&str]) -> String {
    let (ok, out, err) = d
        .admin(&lab.server, args)
        .expect("running an admin command");
    assert!(ok, "spamdelay {args:?}: {out}{err}");
    out
}

#[test]
fn a_ban_on_one_mx_reaches_the_other_and_an_unban_lifts_it() {
    if !privileged("a_ban_on_one_mx_reaches_the_other_and_an_unban_lifts_it") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fleet::new();
    let (a_flags, mut b_flags) = (f.credentials("mx-a"), f.credentials("mx-b"));
    // MX-B's allowlist holds lab address 2; the fleet must not override it.
    b_flags.extend(["--allow".into(), Lab::client_v4(2).to_string()]);
    let a = start(&f.lab.lab_a, &a_flags);
    let b = start(&f.lab.lab_b, &b_flags);
    let (lab_a, lab_b) = (&f.lab.lab_a, &f.lab.lab_b);
    assert!(!lab_b.refused(0, false), "not banned anywhere yet");

    blind(lab_a, &a, 0);
    let caught = Instant::now();
    assert!(lab_a.refused(0, false), "MX-A bans at once");
    assert!(
        until(PROPAGATION, || lab_b.refused(0, false)),
        "MX-B does not refuse MX-A's early talker within 2 s: {:#?}",
        b.lines()
    );
    eprintln!(
        "fleet: MX-B refused the client {:?} after MX-A's verdict",
        caught.elapsed()
    );

    // LAPI holds it as spamdelay's decision, with the ban's duration.
    let decisions = f
        .lapi
        .decisions(Some("spamdelay"))
        .expect("cscli decisions list");
    let text = decisions.to_string();
    assert!(text.contains(&Lab::client_v4(0).to_string()), "{text}");
    assert!(text.contains("spamdelay/early-talk"), "{text}");
    let listed = admin(&b, lab_b, &["list"]);
    assert!(
        listed.contains("fleet: spamdelay/early-talk from mx-a via crowdsec"),
        "MX-B lists the ban with its origin:\n{listed}"
    );
    // MX-A's own decision comes back in its stream: not applied twice.
    let listed_a = admin(&a, lab_a, &["list"]);
    assert!(!listed_a.contains("fleet:"), "{listed_a}");
    assert!(
        !a.lines().iter().any(|l| l.contains("fleet: ")),
        "MX-A applied its own decision: {:#?}",
        a.lines()
    );

    // `spamdelay unban` on MX-A alone lifts it on MX-B.
    admin(&a, lab_a, &["unban", &Lab::client_v4(0).to_string()]);
    let unbanned = Instant::now();
    assert!(
        until(PROPAGATION, || !lab_b.refused(0, false)),
        "MX-B still refuses the client 2 s after MX-A's unban: {:#?}",
        b.lines()
    );
    eprintln!(
        "fleet: MX-B lifted it {:?} after MX-A's unban",
        unbanned.elapsed()
    );
    assert!(
        until(VERDICT_WAIT, || f
            .lapi
            .decision_values(Some("spamdelay"))
            .is_ok_and(|v| v.is_empty())),
        "the decision is deleted in LAPI"
    );

    // Decisions made elsewhere: one for MX-B's allowlisted address 2, one
    // for address 3 (the control). Only the second is applied.
    let token = f
        .lapi
        .token(&lab_a.server, "mx-a", "pw-mx-a-0123456789")
        .expect("login");
    let alerts = [2u8, 3].map(|i| {
        ban_alert(
            "Ip",
            &Lab::client_v4(i).to_string(),
            "1h",
            SystemTime::now(),
        )
    });
    let posted = f
        .lapi
        .post_alerts(&lab_a.server, &token, &alerts)
        .expect("posting alerts");
    assert!(posted.status < 300, "{posted:?}");
    assert!(
        until(PROPAGATION, || lab_b.refused(3, false)),
        "the control decision is applied: {:#?}",
        b.lines()
    );
    assert!(
        !lab_b.refused(2, false),
        "an allowlisted address is never banned"
    );
    assert!(
        b.lines()
            .iter()
            .any(|l| l.starts_with(&format!("not banning [{}]: allowlisted", Lab::client_v4(2)))),
        "{:#?}",
        b.lines()
    );
    // A decision of another scenario (an admin's `cscli decisions add`)
    // is not taken by default (`--crowdsec-scenarios spamdelay/`).
    f.lapi
        .cscli(&[
            "decisions",
            "add",
            "-i",
            &Lab::client_v4(5).to_string(),
            "-d",
            "1h",
        ])
        .expect("cscli decisions add");
    std::thread::sleep(PROPAGATION);
    assert!(
        !lab_b.refused(5, false),
        "another scenario's decision is not taken"
    );
    let status = admin(&b, lab_b, &["status"]);
    assert!(status.contains("fleet: CrowdSec LAPI"), "{status}");
    assert!(status.contains("reachable"), "{status}");
    let (sa, sb) = (a.stop().expect("stopping A"), b.stop().expect("stopping B"));
    assert!(sa.0.success() && sb.0.success(), "{sa:#?} {sb:#?}");
}

#[test]
fn lapi_down_bans_stay_local_and_nothing_is_lost_across_a_restart() {
    if !privileged("lapi_down_bans_stay_local_and_nothing_is_lost_across_a_restart") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = Fleet::new();
    let (a_flags, b_flags) = (f.credentials("mx-a"), f.credentials("mx-b"));
    let a = start(&f.lab.lab_a, &a_flags);
    let b = start(&f.lab.lab_b, &b_flags);
    let (lab_a, lab_b) = (&f.lab.lab_a, &f.lab.lab_b);
    // Both have talked to LAPI once.
    assert!(until(VERDICT_WAIT, || b
        .lines()
        .iter()
        .any(|l| l.contains("CrowdSec"))));

    f.lapi.stop().expect("stopping LAPI");
    blind(lab_a, &a, 1);
    assert!(lab_a.refused(1, false), "MX-A bans at once with LAPI down");
    assert!(
        until(VERDICT_WAIT, || a.lines().iter().any(|l| l
            .contains("CrowdSec publishing")
            && l.contains("unreachable"))),
        "one line says LAPI is unreachable: {:#?}",
        a.lines()
    );
    let spool = a.state().path().join("crowdsec-spool.jsonl");
    assert!(
        until(VERDICT_WAIT, || std::fs::read_to_string(&spool)
            .is_ok_and(|t| t.contains(&Lab::client_v4(1).to_string()))),
        "the alert waits in the spool"
    );
    let errors = a
        .lines()
        .iter()
        .filter(|l| l.contains("CrowdSec publishing") && l.contains("unreachable"))
        .count();
    assert_eq!(errors, 1, "one line, not one per try: {:#?}", a.lines());

    // MX-A restarts while LAPI is down: the spool survives.
    let state = a.state();
    let (status, _) = a.stop().expect("stopping MX-A");
    assert!(status.success());
    let mut args: Vec<&str> = vec!["--iface", SERVER_IF, "--mta", "none"];
    args.extend(a_flags.iter().map(String::as_str));
    let a = Daemon::start_with_state(&lab_a.server, &args, state).expect("restarting MX-A");
    assert!(
        a.lines()
            .iter()
            .any(|l| l.contains("1 waiting in the spool")),
        "{:#?}",
        a.lines()
    );

    f.lapi.restart().expect("restarting LAPI");
    let back = Instant::now();
    assert!(
        until(Duration::from_secs(5), || lab_b.refused(1, false)),
        "MX-B gets the spooled ban once LAPI is back: {:#?}\n{:#?}",
        a.lines(),
        b.lines()
    );
    eprintln!(
        "fleet: spooled ban at MX-B {:?} after LAPI came back",
        back.elapsed()
    );
    assert!(
        a.lines().iter().any(|l| l.contains("LAPI answers again")),
        "{:#?}",
        a.lines()
    );
    // The decision ends with the local ban (1h from the verdict), not 1h
    // from its late arrival: LAPI shows less than an hour left.
    let listed = admin(&b, lab_b, &["list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&listed).expect("list --json");
    let left = rows
        .as_array()
        .and_then(|r| {
            r.iter().find(|row| {
                row["address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&Lab::client_v4(1).to_string()))
            })
        })
        .and_then(|row| row["seconds_left"].as_u64())
        .expect("MX-B lists the ban");
    assert!((3500..3600).contains(&left), "{left} s left");
    // LAPI restarts again (a new JWT secret): MX-A's token gets 401, it
    // logs in again and its next ban still reaches MX-B.
    f.lapi.restart().expect("restarting LAPI");
    blind(lab_a, &a, 2);
    assert!(
        until(Duration::from_secs(4), || lab_b.refused(2, false)),
        "a ban after LAPI's restart reaches MX-B: {:#?}",
        a.lines()
    );
    assert!(
        !std::fs::read_to_string(a.state().path().join("crowdsec-spool.jsonl"))
            .is_ok_and(|t| !t.is_empty()),
        "the spool is empty once sent"
    );
    a.stop().expect("stopping A");
    b.stop().expect("stopping B");
}

#[test]
fn credential_errors_are_one_line_each_and_local_bans_go_on() {
    if !privileged("credential_errors_are_one_line_each_and_local_bans_go_on") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fleet::new();
    f.lapi
        .add_machine("mx-a", "right-password-0123")
        .expect("cscli machines add");
    f.lapi
        .register_unvalidated("mx-new", "new-password-0123")
        .expect("a machine not validated");
    let wrong = f
        .secrets
        .password_file("wrong", "wrong-password")
        .expect("file");
    let new = f
        .secrets
        .password_file("mx-new", "new-password-0123")
        .expect("file");
    let bad_key = f.secrets.key_file("bad", "0123456789abcdef").expect("file");
    let right = f
        .secrets
        .password_file("mx-a", "right-password-0123")
        .expect("file");
    let unreachable = {
        let mut f = flags("mx-a", Some(&right), None);
        f[1] = "http://203.0.113.1:8099".into();
        f
    };
    let cases: [(&str, Vec<String>, &str); 4] = [
        (
            "wrong password",
            flags("mx-a", Some(&wrong), None),
            "LAPI refused the login of machine 'mx-a': wrong password or unknown machine",
        ),
        (
            "unknown machine",
            flags("mx-nobody", Some(&right), None),
            "LAPI refused the login of machine 'mx-nobody'",
        ),
        (
            "not validated",
            flags("mx-new", Some(&new), None),
            "machine 'mx-new' is not validated: on the LAPI host run `cscli machines validate mx-new`",
        ),
        (
            "unreachable",
            unreachable,
            "LAPI http://203.0.113.1:8099/ unreachable",
        ),
    ];
    let lab = &f.lab.lab_a;
    for (i, (what, flags, line)) in cases.into_iter().enumerate() {
        let d = start(lab, &flags);
        let client = 4 + i as u8;
        blind(lab, &d, client);
        assert!(lab.refused(client, false), "{what}: the local ban is made");
        assert!(
            until(VERDICT_WAIT, || d.lines().iter().any(|l| l.contains(line))),
            "{what}: no line with {line:?}: {:#?}",
            d.lines()
        );
        assert!(
            until(VERDICT_WAIT, || {
                let status = admin(&d, lab, &["status"]);
                status.contains("fleet: CrowdSec LAPI") && status.contains("failing")
            }),
            "{what}: status shows the failure: {}",
            admin(&d, lab, &["status"])
        );
        let matching = d.lines().iter().filter(|l| l.contains(line)).count();
        assert_eq!(matching, 1, "{what}: one line: {:#?}", d.lines());
        let (status, lines) = d.stop().expect("stopping");
        assert!(status.success(), "{what}: {lines:#?}");
    }
    // A bouncer key LAPI does not know.
    let d = start(lab, &flags("x", None, Some(&bad_key)));
    assert!(
        until(VERDICT_WAIT, || d.lines().iter().any(|l| l.contains(
            "CrowdSec subscribing: LAPI refused the bouncer key"
        ))),
        "{:#?}",
        d.lines()
    );
    d.stop().expect("stopping");
}
