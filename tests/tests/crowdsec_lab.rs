//! The CrowdSec fleet fixture itself: two labs and a private LAPI joined on
//! 203.0.113.0/24. Machines log in from one server namespace, bans posted
//! there reach a bouncer's stream in the other, lifting one shows under
//! `deleted`, and a LAPI restart keeps machines and bouncers but not tokens.

use std::{os::unix::fs::PermissionsExt, time::SystemTime};

use spamdelay_tests::{
    crowdsec::{
        FLEET_A_V4, FLEET_B_V4, FleetLab, LAPI_ADDR, LAPI_URL, Lapi, ORIGIN, SCENARIO, Secrets,
        ban_alert, go_duration, stream_list,
    },
    lab::Lab,
    privileged,
};

const CLIENT: &str = "198.51.100.10";

#[test]
fn fleet_lab_runs_a_private_lapi_both_servers_reach() {
    if !privileged("fleet_lab_runs_a_private_lapi_both_servers_reach") {
        return;
    }
    let fleet = FleetLab::new().expect("fleet lab");
    assert_eq!(LAPI_URL, format!("http://{LAPI_ADDR}"));
    // The same client address in both labs.
    assert_eq!(Lab::client_v4(0).to_string(), CLIENT);
    let mut lapi = Lapi::start(&fleet.lapi, LAPI_ADDR).expect("starting LAPI");
    assert_eq!(lapi.url(), LAPI_URL);
    let (a, b) = (&fleet.lab_a.server, &fleet.lab_b.server);
    for (ns, addr) in [(a, FLEET_A_V4), (b, FLEET_B_V4)] {
        assert!(
            lapi.health(ns).expect("GET /health"),
            "LAPI from {addr}: {:#?}",
            lapi.lines()
        );
    }

    lapi.add_machine("mx-a", "pw-a")
        .expect("cscli machines add");
    let key = lapi.add_bouncer("mx-b").expect("cscli bouncers add");
    assert!(
        key.len() >= 32 && !key.contains(char::is_whitespace),
        "{key:?}"
    );

    // A machine that registered itself logs in once validated.
    lapi.register_unvalidated("mx-c", "pw-c")
        .expect("POST /v1/watchers");
    let r = lapi.login(a, "mx-c", "pw-c").expect("login");
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("not validated"), "{}", r.body);
    lapi.validate_machine("mx-c")
        .expect("cscli machines validate");
    lapi.token(a, "mx-c", "pw-c").expect("login once validated");

    // A ban from A...
    let token = lapi.token(a, "mx-a", "pw-a").expect("login as mx-a");
    let r = lapi
        .post_alerts(
            a,
            &token,
            &[ban_alert("Ip", CLIENT, "1h", SystemTime::now())],
        )
        .expect("POST /v1/alerts");
    assert_eq!(r.status, 201, "{}", r.body);
    let ids = r.json().expect("alert ids");
    assert_eq!(ids.as_array().map(Vec::len), Some(1), "{ids}");

    // ...reaches B's bouncer stream,
    let r = lapi.stream(b, &key, true).expect("stream");
    assert_eq!(r.status, 200, "{}", r.body);
    let stream = r.json().expect("stream JSON");
    let new = stream_list(&stream, "new");
    let [d] = new.as_slice() else {
        panic!("one new decision expected: {stream}");
    };
    assert_eq!(d["value"], CLIENT, "{d}");
    assert_eq!(d["scope"], "Ip", "{d}");
    assert_eq!(d["type"], "ban", "{d}");
    assert_eq!(d["origin"], ORIGIN, "{d}");
    assert_eq!(d["scenario"], SCENARIO, "{d}");
    let left = d["duration"]
        .as_str()
        .and_then(go_duration)
        .expect("a duration");
    assert!((3500.0..=3600.0).contains(&left), "{d}");
    let id = d["id"].as_i64().expect("a decision id");

    // ...and cscli sees it (with --origin: by default only crowdsec/cscli).
    assert_eq!(
        lapi.decision_values(Some(ORIGIN))
            .expect("cscli decisions list"),
        [CLIENT]
    );
    assert!(
        lapi.decision_values(None)
            .expect("-a")
            .contains(&CLIENT.to_string())
    );

    // Lifting it shows under `deleted` in B's next pull.
    let r = lapi
        .delete_decisions(a, &token, &format!("ip={CLIENT}"))
        .expect("DELETE /v1/decisions");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json().expect("JSON")["nbDeleted"], "1", "{}", r.body);
    let r = lapi.stream(b, &key, false).expect("stream");
    assert_eq!(r.status, 200, "{}", r.body);
    let stream = r.json().expect("stream JSON");
    assert!(
        stream_list(&stream, "deleted")
            .iter()
            .any(|d| d["id"].as_i64() == Some(id) && d["value"] == CLIENT),
        "decision {id} not deleted: {stream}"
    );
    assert!(stream_list(&stream, "new").is_empty(), "{stream}");
    assert!(
        lapi.decision_values(Some(ORIGIN))
            .expect("cscli")
            .is_empty(),
        "cscli still lists a lifted decision"
    );

    // A restart keeps machines and bouncers, not tokens.
    let before = lapi.pid();
    lapi.stop().expect("stopping LAPI");
    assert!(lapi.pid().is_none());
    assert!(lapi.health(a).is_err(), "LAPI still answers after stop");
    lapi.restart().expect("restarting LAPI");
    assert_ne!(lapi.pid(), before);
    let r = lapi
        .get_with_token(a, &token, "/v1/alerts?origin=spamdelay")
        .expect("GET /v1/alerts");
    assert_eq!(r.status, 401, "an old token: {}", r.body);
    let token = lapi.token(a, "mx-a", "pw-a").expect("a new login");
    let r = lapi
        .get_with_token(a, &token, "/v1/alerts?origin=spamdelay")
        .expect("GET /v1/alerts");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = lapi.stream(b, &key, true).expect("stream");
    assert_eq!(r.status, 200, "the bouncer after a restart: {}", r.body);
    assert!(
        stream_list(&r.json().unwrap(), "new").is_empty(),
        "{}",
        r.body
    );
    let machines = lapi.cscli(&["machines", "list", "-o", "json"]).unwrap();
    assert!(machines.contains("\"mx-a\""), "{machines}");

    // The files a daemon reads.
    let secrets = Secrets::new().expect("secrets");
    for path in [
        secrets.password_file("mx-a", "pw-a").unwrap(),
        secrets.key_file("mx-b", &key).unwrap(),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }

    lapi.stop().expect("stopping LAPI");
}
