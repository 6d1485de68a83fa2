//! The pass cache end to end, read by the real MTAs it is written for: a
//! client that waited for the greeting is listed by spamdelay, then greeted
//! at once by postscreen (`postfix-cidr` in `postscreen_access_list`) or by
//! Exim (`exim-lsearch` in a connect-ACL `net-iplsearch` host list), while
//! clients not listed still sit out the pause. IPv4 and IPv6.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use spamdelay_tests::{
    daemon::Daemon,
    lab::{Lab, SERVER_IF},
    mta::{
        self,
        exim::{self, Exim, Pipeconnect},
        postfix::{self, Postfix},
    },
    scenario::VERDICT_WAIT,
    smtp, until,
};

/// postscreen_greet_wait. postscreen's timers tick in whole seconds: its
/// final `220 ` came 1.3 to 2.5 s after the connect here.
const GREET_WAIT: Duration = Duration::from_secs(2);
/// Exim's connect-ACL delay.
const EXIM_DELAY: Duration = Duration::from_secs(3);
/// Less than any pause here: a client that is not listed waits longer for
/// its greeting, and a listed one is done with its whole conversation sooner.
const SHORTEST_PAUSE: Duration = Duration::from_secs(1);
/// A greeting this soon came without a pause.
const PROMPT: Duration = Duration::from_millis(500);
/// How long a pass may take to reach the file: the daemon rewrites it on its
/// next one-second tick, then runs the reload command.
const LISTING_WAIT: Duration = Duration::from_secs(5);
/// How long the MTA's log may lag behind a client that is done.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// A directory for the pass cache that the MTAs' own users may read.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("spamdelay-passcache-")
        .tempdir()
        .expect("creating a directory for the pass cache");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .expect("opening the pass cache's directory");
    dir
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// One patient client's visit (`smtp::patient`).
struct Visit {
    client: SocketAddr,
    /// How long it waited for the greeting, as spamdelay measured it.
    waited: Duration,
    /// The whole conversation as the client lived it: connect, greeting,
    /// EHLO, QUIT.
    took: Duration,
}

impl Visit {
    fn new(lab: &Lab, daemon: &Daemon, i: u8, v6: bool, what: &str) -> Visit {
        let start = Instant::now();
        let client = lab.run_client(i, v6, 25, smtp::patient);
        let took = start.elapsed();
        let waited = greeting_delay(daemon, client);
        eprintln!("{client} {what}: greeting after {waited:?}, conversation {took:?}");
        Visit {
            client,
            waited,
            took,
        }
    }

    fn assert_paused(&self, pause: Duration) {
        assert!(
            self.waited >= pause,
            "{} got its greeting after {:?}, inside the pause",
            self.client,
            self.waited
        );
    }

    fn assert_prompt(&self) {
        assert!(
            self.waited < PROMPT && self.took < SHORTEST_PAUSE,
            "{}, listed, still waited {:?} for its greeting ({:?} in all)",
            self.client,
            self.waited,
            self.took
        );
    }
}

/// One address family's visits: client 0 waits out the pause and passes,
/// gets listed, and comes back; client 1, never listed, comes after it.
struct Round {
    first: Visit,
    /// The cache's line for client 0.
    listed_as: String,
    again: Visit,
    other: Visit,
}

impl Round {
    /// `listed` waits until the MTA has been given a cache that lists an
    /// address, and returns its line.
    fn run(lab: &Lab, daemon: &Daemon, v6: bool, listed: impl Fn(IpAddr) -> String) -> Round {
        let first = Visit::new(lab, daemon, 0, v6, "first visit");
        let listed_as = listed(first.client.ip());
        eprintln!("{} listed as {listed_as:?}", first.client.ip());
        let again = Visit::new(lab, daemon, 0, v6, "listed");
        let other = Visit::new(lab, daemon, 1, v6, "not listed");
        Round {
            first,
            listed_as,
            again,
            other,
        }
    }
}

/// How long `client` waited for the final greeting line, as spamdelay
/// measured it (`PASS after 2.010s from ...`). Panics unless it passed.
fn greeting_delay(daemon: &Daemon, client: SocketAddr) -> Duration {
    let line = daemon
        .verdict_for(client, VERDICT_WAIT)
        .unwrap_or_else(|| panic!("no verdict for {client}: {:#?}", daemon.lines()));
    line.strip_prefix("PASS after ")
        .and_then(|rest| rest.split_once("s from "))
        .and_then(|(secs, _)| secs.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or_else(|| panic!("{client} did not pass: {line}"))
}

/// The file's lines that name `ip` (whatever the format's punctuation).
fn lines_naming(text: &str, ip: IpAddr) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
                .any(|word| word.trim_end_matches(':').parse::<IpAddr>() == Ok(ip))
        })
        .map(str::to_string)
        .collect()
}

/// Waits until `file` lists `ip`; its line.
fn wait_listed(file: &Path, ip: IpAddr) -> String {
    let read = || fs::read_to_string(file).unwrap_or_default();
    assert!(
        until(LISTING_WAIT, || !lines_naming(&read(), ip).is_empty()),
        "{ip} is not in the pass cache {}:\n{}",
        file.display(),
        read()
    );
    lines_naming(&read(), ip).remove(0)
}

/// The lines of `log` that contain any of `words`.
fn lines_with<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| words.iter().any(|w| l.contains(w)))
        .collect()
}

/// The lab with an MTA that reads spamdelay's pass cache on its server side,
/// and spamdelay writing it. Drops in field order: the daemon, the MTA, then
/// the namespaces and the cache's directory.
struct Rig<M> {
    daemon: Daemon,
    mta: M,
    lab: Lab,
    cache: PathBuf,
    _dir: tempfile::TempDir,
}

impl<M> Rig<M> {
    /// `mta` starts the MTA in the lab, reading the cache at the path it is
    /// given; `args` are spamdelay's flags for that MTA and cache, after
    /// `--pass-cache CACHE --pass-cache-format FORMAT`.
    fn start(
        file: &str,
        format: &str,
        mta: impl FnOnce(&Lab, &Path) -> M,
        args: impl FnOnce(&M, &Path) -> Vec<String>,
    ) -> Rig<M> {
        let lab = Lab::new().expect("building the namespace lab");
        let dir = shared_dir();
        let cache = dir.path().join(file);
        let mta = mta(&lab, &cache);
        let own = [
            "--iface",
            SERVER_IF,
            "--pass-cache",
            utf8(&cache),
            "--pass-cache-format",
            format,
        ];
        let theirs = args(&mta, &cache);
        let all: Vec<&str> = own
            .into_iter()
            .chain(theirs.iter().map(String::as_str))
            .collect();
        let daemon = Daemon::start(&lab.server, &all).expect("starting spamdelay");
        // The first rewrite comes at start, so the MTA never looks for a
        // file that is not there yet.
        assert!(
            until(LISTING_WAIT, || cache.exists()),
            "no pass cache written at start: {:#?}",
            daemon.lines()
        );
        Rig {
            daemon,
            mta,
            lab,
            cache,
            _dir: dir,
        }
    }

    /// The three visits of one address family (see [`Round`]).
    fn round(&self, v6: bool, listed: impl Fn(IpAddr) -> String) -> Round {
        Round::run(&self.lab, &self.daemon, v6, listed)
    }
}

/// Where the Postfix rig's reload command leaves a `RELOAD` line per run,
/// each followed by the cache it told Postfix to read.
fn reloads(cache: &Path) -> PathBuf {
    cache.with_file_name("reloads")
}

impl Rig<Postfix> {
    /// Postfix with `postscreen_access_list = permit_mynetworks,
    /// cidr:CACHE`, and spamdelay reloading it after each rewrite.
    fn postfix() -> Rig<Postfix> {
        Rig::start(
            "spamdelay-pass.cidr",
            "postfix-cidr",
            |lab, cache| {
                let access_list = format!("permit_mynetworks, cidr:{}", cache.display());
                Postfix::start_with(
                    &lab.server,
                    GREET_WAIT,
                    &[
                        ("postscreen_access_list", &access_list),
                        // postscreen's own pass cache off: a client it greets
                        // at once was let through by the access list alone.
                        ("postscreen_cache_map", ""),
                    ],
                )
                .expect("starting Postfix")
            },
            |postfix, cache| {
                let reload = format!(
                    "{} && {{ echo RELOAD; cat '{}'; }} >> '{}'",
                    postfix.reload_command(),
                    cache.display(),
                    reloads(cache).display()
                );
                vec![
                    "--mta".into(),
                    "postfix".into(),
                    "--mta-config".into(),
                    utf8(postfix.config_dir()).into(),
                    "--pass-cache-reload".into(),
                    reload,
                ]
            },
        )
    }

    /// postscreen's first verdict on `client` (`PASS NEW`, `ALLOWLISTED`, ...).
    fn postscreen_verdict(&self, client: SocketAddr) -> String {
        let mut found = None;
        until(LOG_WAIT, || {
            found = postfix::postscreen_verdicts(&self.mta.log())
                .into_iter()
                .find(|(_, ip, port)| SocketAddr::new(*ip, *port) == client)
                .map(|(kind, _, _)| kind);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "postscreen logged no verdict on {client}:\n{}",
                self.mta.log()
            )
        })
    }

    /// Waits until a reload has followed a rewrite that lists `ip` and
    /// Postfix's master has taken every reload so far (`postfix reload` only
    /// signals it); the line that lists `ip`.
    fn wait_reloaded_with(&self, ip: IpAddr) -> String {
        let reloads = reloads(&self.cache);
        let line = wait_listed(&reloads, ip);
        let runs = fs::read_to_string(&reloads)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "RELOAD")
            .count();
        let taken = || {
            self.mta
                .log()
                .lines()
                .filter(|l| l.contains(" postfix/master[") && l.contains("]: reload -- "))
                .count()
        };
        assert!(
            until(LOG_WAIT, || taken() >= runs),
            "Postfix's master took {} of {runs} reloads:\n{}",
            taken(),
            self.mta.log()
        );
        line
    }
}

#[test]
fn postscreen_allowlists_the_clients_in_the_postfix_cidr_pass_cache() {
    if !mta::ready(
        "postscreen_allowlists_the_clients_in_the_postfix_cidr_pass_cache",
        "Postfix",
        postfix::installed(),
    ) {
        return;
    }
    let rig = Rig::postfix();
    for v6 in [false, true] {
        let round = rig.round(v6, |ip| rig.wait_reloaded_with(ip));
        assert_eq!(rig.postscreen_verdict(round.first.client), "PASS NEW");
        round.first.assert_paused(SHORTEST_PAUSE);
        assert_eq!(
            rig.postscreen_verdict(round.again.client),
            "ALLOWLISTED",
            "postscreen did not find {} in {:?}:\n{}",
            round.again.client,
            round.listed_as,
            rig.mta.log()
        );
        round.again.assert_prompt();
        assert_eq!(rig.postscreen_verdict(round.other.client), "PASS NEW");
        round.other.assert_paused(SHORTEST_PAUSE);
    }
    let log = rig.mta.log();
    let complaints = lines_with(&log, &["warning:", "error:", "fatal:", "panic:"]);
    assert!(
        complaints.is_empty(),
        "Postfix complained (about the cidr table {}?): {complaints:#?}",
        rig.cache.display()
    );
}

impl Rig<Exim> {
    /// Exim with a connect ACL that lets the clients in the cache skip its
    /// delay, and logs each it lets through. Exim reads the file afresh for
    /// every connection: no reload.
    fn exim() -> Rig<Exim> {
        Rig::start(
            "spamdelay-pass.lsearch",
            "exim-lsearch",
            |lab, cache| {
                let acl = format!(
                    "accept hosts = net-iplsearch;{}\n\
                     logwrite = pass cache lets [$sender_host_address]:$sender_host_port in",
                    cache.display()
                );
                Exim::start_with_acl(&lab.server, EXIM_DELAY, Pipeconnect::Off, &acl)
                    .expect("starting Exim")
            },
            |exim, _| {
                vec![
                    "--mta".into(),
                    "exim".into(),
                    "--mta-config".into(),
                    utf8(exim.config_file()).into(),
                ]
            },
        )
    }

    /// Whether the ACL let `client` in by the pass cache (its `logwrite`).
    fn let_in(&self, client: SocketAddr, wait: Duration) -> bool {
        let tag = format!("pass cache lets [{}]:{} in", client.ip(), client.port());
        self.mta.wait_for(|l| l.ends_with(&tag), wait).is_some()
    }
}

#[test]
fn exim_skips_its_delay_for_the_clients_in_the_exim_lsearch_pass_cache() {
    if !mta::ready(
        "exim_skips_its_delay_for_the_clients_in_the_exim_lsearch_pass_cache",
        "Exim",
        exim::installed(),
    ) {
        return;
    }
    let rig = Rig::exim();
    // spamdelay's times are rounded to the millisecond.
    let full_delay = EXIM_DELAY - Duration::from_millis(5);
    for v6 in [false, true] {
        let round = rig.round(v6, |ip| wait_listed(&rig.cache, ip));
        round.first.assert_paused(full_delay);
        assert!(
            !rig.let_in(round.first.client, Duration::ZERO),
            "let in before it was listed"
        );
        assert!(
            rig.let_in(round.again.client, LOG_WAIT),
            "the ACL did not find {} in {:?}:\n{}",
            round.again.client,
            round.listed_as,
            rig.mta.log()
        );
        round.again.assert_prompt();
        round.other.assert_paused(full_delay);
        assert!(
            !rig.let_in(round.other.client, Duration::ZERO),
            "let in, never listed"
        );
    }
    assert_eq!(rig.mta.paniclog(), "", "Exim's panic log");
    let log = rig.mta.log();
    let lookup_trouble = lines_with(&log, &["lookup", "defer", "temporarily"]);
    assert!(
        lookup_trouble.is_empty(),
        "Exim had trouble with {}: {lookup_trouble:#?}",
        rig.cache.display()
    );
}
