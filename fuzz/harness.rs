//! One entry per fuzz target, shared by `fuzz/fuzz_targets/*.rs` and the
//! regression tests (`spamdelay/tests/fuzz_regressions.rs`), so a stored
//! input replays exactly what the fuzzer ran. Each feeds outside input to the
//! library's own parser, then uses what came out as the daemon would.

// Each fuzz target includes this file and calls one entry.
#![allow(dead_code)]

use std::{collections::HashMap, net::IpAddr, time::Duration};

use clap::Parser;
use spamdelay::{
    bans::Register,
    cli::Cli,
    config,
    events::{self, Report},
    mta::{self, Mta},
    nft,
    passcache::{self, Format, PassCache},
};

/// Splits a `postfix` input into main.cf and master.cf. Without it the whole
/// input is both, so every input reaches both parsers.
pub const MASTER_CF: &str = "\n--- master.cf ---\n";
/// Splits a `sendmail` input into sendmail.cf and the access map's source.
pub const ACCESS: &str = "\n--- access ---\n";

/// The config file (TOML), turned into `run`'s flags and parsed by clap.
pub fn config(data: &[u8]) -> Result<Cli, String> {
    let text = std::str::from_utf8(data).map_err(|e| e.to_string())?;
    let args = config::to_args(text).map_err(|e| format!("{e:#}"))?;
    let argv = ["spamdelay", "run"]
        .into_iter()
        .map(String::from)
        .chain(args);
    Cli::try_parse_from(argv).map_err(|e| e.to_string())
}

/// The ban register (`bans.json`), then what the daemon and the admin
/// commands do with it: look up covering bans, build nft comments, expire.
pub fn register(data: &[u8]) -> Option<Register> {
    let register = Register::from_json(data).ok()?;
    let json = serde_json::to_vec(&register).expect("a register serializes");
    let again = Register::from_json(&json).expect("a written register reads back");
    assert_eq!(again, register, "the register changed on a round trip");
    let lengths = register.lengths();
    for (cidr, ban) in &register.bans {
        for now in [0, ban.expires, ban.remember_until, u64::MAX] {
            if let Some((by, b)) = register.covering_in(&lengths, cidr, now) {
                assert!(by.covers(cidr), "{by} does not cover {cidr}");
                assert!(b.active(now));
            }
            let _ = ban.time_left(now);
        }
        let _ = nft::set_for(cidr);
        let inside = register.inside(cidr).count();
        assert!(inside >= 1, "{cidr} is not inside itself");
        let comment = nft::comment(&ban.reason);
        assert!(
            comment.len() <= 120 && comment.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
            "comment nft cannot hold: {comment:?}"
        );
        assert!(!comment.contains('"'));
    }
    let mut kept = register.clone();
    let now = register.bans.values().map(|b| b.expires).max().unwrap_or(0);
    kept.forget_expired(now);
    assert!(
        kept.bans
            .values()
            .all(|b| b.active(now) || b.remember_until > now)
    );
    Some(register)
}

/// The pass cache's state file (`pass-cache.json`), opened as the daemon
/// opens it, then its live passes and every format's line.
pub fn pass_cache(data: &[u8]) -> Option<HashMap<IpAddr, u64>> {
    let passes = passcache::parse_state(data).ok()?;
    // Threads of one test process each get their own directory.
    let dir = std::env::temp_dir().join(format!(
        "spamdelay-fuzz-pass-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("creating a state directory");
    std::fs::write(dir.join(passcache::STATE_FILE), data).expect("writing the state");
    let ttl = Duration::from_secs(86400);
    let cache = PassCache::open(None, ttl, &dir);
    let latest = passes.values().copied().max().unwrap_or(0);
    for now in [0, latest, u64::MAX] {
        for (ip, at) in cache.live(now) {
            assert!(cache.contains(&ip));
            // The daemon adds the TTL to it.
            assert!(at <= now, "a pass at {at} is later than now ({now})");
        }
    }
    for ip in passes.keys() {
        for format in [
            Format::SendmailAccess,
            Format::PostfixCidr,
            Format::EximLsearch,
            Format::Plain,
        ] {
            let line = format.line(ip);
            assert!(!line.contains('\n'), "{line:?}");
        }
    }
    Some(passes)
}

/// Postfix's main.cf and master.cf (split at `MASTER_CF`), and the log line.
pub fn postfix(data: &[u8]) -> Option<Mta> {
    let text = std::str::from_utf8(data).ok()?;
    let (main_cf, master_cf) = text.split_once(MASTER_CF).unwrap_or((text, text));
    let mta = mta::postfix::from_text(main_cf, master_cf)?;
    let _ = mta.to_string();
    Some(mta)
}

/// Exim's configuration file, and the log line.
pub fn exim(data: &[u8]) -> Option<Mta> {
    let text = std::str::from_utf8(data).ok()?;
    let mta = mta::exim::from_text(text);
    let _ = mta.to_string();
    Some(mta)
}

/// sendmail.cf and the access map's text source (split at `ACCESS`), and
/// the log line.
pub fn sendmail(data: &[u8]) -> Option<Mta> {
    let text = std::str::from_utf8(data).ok()?;
    let (cf, access) = match text.split_once(ACCESS) {
        Some((cf, access)) => (cf, Some(access)),
        None => (text, None),
    };
    let mta = mta::sendmail::from_text(cf, |_| access.map(str::to_string));
    let _ = mta.to_string();
    Some(mta)
}

/// A ring-buffer record, and its log line: printable ASCII on one line,
/// whatever the client sent.
pub fn event(data: &[u8]) -> Option<Report> {
    let report = events::decode(data)?;
    let line = report.to_string();
    assert!(
        line.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
        "a payload forged the log line: {line:?}"
    );
    Some(report)
}
