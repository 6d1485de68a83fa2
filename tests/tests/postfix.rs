//! Real Postfix postscreen and spamdelay side by side in the lab: both judge
//! the same clients and must agree on each; spamdelay reads postscreen's config.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use spamdelay_tests::{
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    mta::{
        self,
        postfix::{self, Postfix},
    },
    nft::element,
    scenario::VERDICT_WAIT,
    smtp,
};

/// postscreen_greet_wait. postscreen's timers run on a whole-second clock:
/// the final `220 ` came 1.4 to 2.5 s after the connect here.
const GREET_WAIT: Duration = Duration::from_secs(2);
/// How long postscreen may take to log its verdict once a client is done
/// (postlogd writes each line within milliseconds; this is slack).
const LOG_WAIT: Duration = Duration::from_secs(5);
/// swaks's source port, fixed so its connection can be found in both logs.
const SWAKS_PORT: u16 = 42525;

/// The lab with Postfix and spamdelay on its server side. Fields drop in
/// order: the daemon and Postfix stop before the namespaces go.
struct Rig {
    daemon: Daemon,
    postfix: Postfix,
    lab: Lab,
}

impl Rig {
    /// Postfix (greet wait 2 s, teaser banner, enforce) and spamdelay set up
    /// as an admin would run it in front of that postscreen: `--mta postfix`
    /// with its config directory.
    fn start() -> Rig {
        let lab = Lab::new().expect("building the namespace lab");
        let postfix = Postfix::start(&lab.server, GREET_WAIT).expect("starting Postfix");
        let config = postfix.config_dir().to_str().expect("a UTF-8 path");
        let daemon = Daemon::start(
            &lab.server,
            &[
                "--iface",
                SERVER_IF,
                "--mta",
                "postfix",
                "--mta-config",
                config,
            ],
        )
        .expect("starting spamdelay");
        Rig {
            daemon,
            postfix,
            lab,
        }
    }

    /// Runs `f` as a client from lab address `i` on a thread of its own in
    /// the client namespace, so clients overlap as they would in real life.
    fn spawn_client(
        &self,
        i: u8,
        v6: bool,
        f: impl FnOnce(IpAddr, SocketAddr) -> anyhow::Result<u16> + Send + 'static,
    ) -> JoinHandle<anyhow::Result<anyhow::Result<u16>>> {
        let src = Lab::client_addr(i, v6);
        let dst = SocketAddr::new(Lab::server_addr(v6), 25);
        self.lab.client.spawn(move || f(src, dst))
    }

    /// swaks delivering one message from lab address `i` (IPv4), started now
    /// and collected with `wait_with_output`.
    fn spawn_swaks(&self, i: u8) -> Child {
        self.lab
            .client
            .command("swaks")
            .args(["--server", &Lab::server_addr(false).to_string()])
            .args(["--port", "25"])
            .args(["--local-interface", &Lab::client_v4(i).to_string()])
            .args(["--local-port", &SWAKS_PORT.to_string()])
            .args(["--helo", "swaks.example"])
            .args(["--from", "sender@example.org"])
            .args(["--to", "user@mx.example.test"])
            .args(["--timeout", "15"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting swaks (tests/mta/install-postfix.sh)")
    }

    /// postscreen's first verdict on `client`, polled from its log.
    fn postscreen_verdict(&self, client: SocketAddr) -> Option<String> {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let found = postfix::postscreen_verdicts(&self.postfix.log())
                .into_iter()
                .find(|(_, ip, port)| SocketAddr::new(*ip, *port) == client);
            if let Some((kind, _, _)) = found {
                return Some(kind);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The spamdelay verdict that means what postscreen's `kind` means.
fn spamdelay_equivalent(kind: &str) -> Option<&'static str> {
    match kind {
        "PREGREET" => Some("EARLY-TALK"),
        "PASS NEW" | "PASS OLD" => Some("PASS"),
        "HANGUP" => Some("QUIT"),
        _ => None,
    }
}

/// A client: connects from the first address to the second and returns its
/// local port.
type Client = fn(IpAddr, SocketAddr) -> anyhow::Result<u16>;

/// One client of the agreement test and what it is expected to provoke.
struct Case {
    what: &'static str,
    /// Its lab address index (`Lab::client_addr`).
    index: u8,
    v6: bool,
    /// postscreen's verdict on it.
    postscreen: &'static str,
    /// Whether spamdelay bans it.
    banned: bool,
}

impl Case {
    const fn new(
        what: &'static str,
        index: u8,
        v6: bool,
        postscreen: &'static str,
        banned: bool,
    ) -> Self {
        Case {
            what,
            index,
            v6,
            postscreen,
            banned,
        }
    }
}

/// Hangs up well inside postscreen's greet wait, which never ends before 1 s.
fn hang_up_after_half_a_second(src: IpAddr, dst: SocketAddr) -> anyhow::Result<u16> {
    smtp::hang_up(src, dst, Duration::from_millis(500))
}

#[test]
fn postscreen_and_spamdelay_agree_on_every_client() {
    if !mta::ready(
        "postscreen_and_spamdelay_agree_on_every_client",
        "Postfix",
        postfix::installed(),
    ) {
        return;
    }
    let rig = Rig::start();
    let started = Instant::now();

    // All at once: swaks takes the greet wait, the others a moment.
    let swaks_case = Case::new("swaks", 2, false, "PASS NEW", false);
    let swaks = rig.spawn_swaks(swaks_case.index);
    let running: Vec<(Case, JoinHandle<_>)> = [
        (
            Case::new("blind sender", 0, false, "PREGREET", true),
            smtp::blind as Client,
        ),
        (
            Case::new("teaser talker", 1, false, "PREGREET", true),
            smtp::teaser_talker,
        ),
        (
            Case::new("hang-up after 0.5 s", 3, false, "HANGUP", false),
            hang_up_after_half_a_second,
        ),
        (
            Case::new("IPv6 blind sender", 4, true, "PREGREET", true),
            smtp::blind,
        ),
    ]
    .into_iter()
    .map(|(case, client)| {
        let handle = rig.spawn_client(case.index, case.v6, client);
        (case, handle)
    })
    .collect();
    let mut cases: Vec<(Case, SocketAddr)> = running
        .into_iter()
        .map(|(case, handle)| {
            let port = handle
                .join()
                .expect("client thread")
                .expect("entering the client namespace")
                .unwrap_or_else(|e| panic!("{}: {e:#}", case.what));
            let client = SocketAddr::new(Lab::client_addr(case.index, case.v6), port);
            (case, client)
        })
        .collect();

    let out = swaks.wait_with_output().expect("waiting for swaks");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks failed ({}): {transcript}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        transcript.contains("<-  250 2.0.0 Ok: queued as "),
        "the message was not accepted: {transcript}"
    );
    let swaks_addr = SocketAddr::new(Lab::client_v4(swaks_case.index).into(), SWAKS_PORT);
    cases.push((swaks_case, swaks_addr));
    eprintln!("all clients done after {:?}", started.elapsed());

    let mut problems = Vec::new();
    for (c, client) in &cases {
        let postscreen = rig.postscreen_verdict(*client);
        let spamdelay = rig.daemon.verdict_for(*client, VERDICT_WAIT);
        eprintln!(
            "{} {client}: postscreen {postscreen:?}, spamdelay {spamdelay:?}",
            c.what
        );
        let (Some(postscreen), Some(spamdelay)) = (postscreen, spamdelay) else {
            problems.push(format!("{} {client}: a verdict is missing", c.what));
            continue;
        };
        let word = spamdelay.split(' ').next().unwrap_or_default();
        if spamdelay_equivalent(&postscreen) != Some(word) {
            problems.push(format!(
                "{} {client}: postscreen says {postscreen}, spamdelay says {spamdelay}",
                c.what
            ));
        }
        if postscreen != c.postscreen {
            problems.push(format!(
                "{} {client}: expected postscreen {}, got {postscreen}",
                c.what, c.postscreen
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\npostscreen's log:\n{}\nspamdelay's log: {:#?}",
        rig.postfix.log(),
        rig.daemon.lines()
    );
    eprintln!("verdicts compared after {:?}", started.elapsed());

    for (c, client) in &cases {
        let ip = client.ip().to_string();
        let set = if c.v6 {
            "early_talkers_v6"
        } else {
            "early_talkers_v4"
        };
        if c.banned {
            rig.daemon
                .wait_for(|l| l.starts_with(&format!("ban [{ip}]")), VERDICT_WAIT)
                .unwrap_or_else(|| panic!("{}: no ban: {:#?}", c.what, rig.daemon.lines()));
            assert!(
                element(&rig.lab.server, set, &ip).is_some(),
                "{}: {ip} not in {set}",
                c.what
            );
            assert!(
                rig.lab.refused(c.index, c.v6),
                "{}: its next connection is refused",
                c.what
            );
        } else {
            assert!(
                element(&rig.lab.server, set, &ip).is_none(),
                "{}: {ip} must not be banned",
                c.what
            );
        }
    }
    assert!(
        rig.postfix.log().contains("status=sent"),
        "Postfix took the message to its discard transport: {}",
        rig.postfix.log()
    );
    eprintln!("done after {:?}", started.elapsed());
}

#[test]
fn greet_wait_is_read_from_the_config_directory() {
    if !mta::ready(
        "greet_wait_is_read_from_the_config_directory",
        "Postfix",
        postfix::installed(),
    ) {
        return;
    }
    let rig = Rig::start();
    let lines = rig.daemon.lines();
    let line = lines
        .iter()
        .find(|l| l.starts_with("postfix postscreen on "))
        .unwrap_or_else(|| panic!("no postfix postscreen line: {lines:#?}"));
    for part in ["greet wait 2s", "teaser banner on", "greet action enforce"] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
}
