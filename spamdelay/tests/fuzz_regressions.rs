//! Every input kept under `fuzz/regressions/TARGET/`, replayed through the
//! fuzz target's own entry (`fuzz/harness.rs`): inputs that once crashed or
//! hung a parser, and edge cases checked by hand. New ones found by
//! `cargo xtask fuzz` are replayed by just being stored there.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use spamdelay::mta::Pipeconnect;
use spamdelay_common::Verdict;

/// `(file name, bytes)` of every stored input of a target, in name order.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a UTF-8 file name")
                .to_string();
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (name, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no regression inputs in {}", dir.display());
    out
}

#[test]
fn config_inputs_are_refused_with_a_reason() {
    for (name, bytes) in inputs("config") {
        let result = harness::config(&bytes);
        let expected = match name.as_str() {
            // Read as `--iface --dry-run`: clap refuses it rather than
            // turning a value into a flag.
            "flag-as-a-value.toml" => "a value is required for '--iface <IFACE>'",
            "float-value.toml" => "setting 'ban-time': 1.5 is not a string, number or true/false",
            "probe-bad-escape.toml" => "bad escape",
            // `\x+f` was taken as 0x0f: from_str_radix allows a sign.
            "probe-sign-in-hex.toml" => "bad escape",
            "port-beyond-u16.toml" => "invalid value '9223372036854775807' for '--port <PORT>'",
            _ => continue,
        };
        let err = result.expect_err(&name);
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn register_inputs_read_as_the_daemon_reads_them() {
    for (name, bytes) in inputs("register") {
        let register = harness::register(&bytes);
        match name.as_str() {
            "everything-at-its-maximum.json" => {
                let r = register.expect(&name);
                let ban = &r.bans[&"198.51.100.7/32".parse().unwrap()];
                assert_eq!(ban.offences, u32::MAX);
                assert!(ban.active(u64::MAX - 1));
            }
            // Host bits cleared and whitespace trimmed: one key per network,
            // the later entry winning.
            "host-bits-and-duplicates.json" => {
                let r = register.expect(&name);
                let keys: Vec<String> = r.bans.keys().map(|c| c.to_string()).collect();
                assert_eq!(keys, ["10.0.0.0/8", "2001:db8::1/128"]);
                assert_eq!(r.bans[&"10.0.0.0/8".parse().unwrap()].reason, "b");
            }
            "odd-table-settings.json" => {
                let r = register.expect(&name);
                assert!(r.table.ports.is_empty());
                assert!(r.covering(&"192.0.2.1".parse().unwrap(), 1).is_some());
            }
            _ => {}
        }
    }
}

#[test]
fn pass_cache_inputs_never_pass_in_the_future() {
    for (name, bytes) in inputs("pass_cache") {
        let passes = harness::pass_cache(&bytes);
        if name == "pass-from-the-future.json" {
            assert_eq!(passes.expect(&name).len(), 4);
        }
    }
}

#[test]
fn postfix_inputs_end_quickly_with_a_sensible_pause() {
    for (name, bytes) in inputs("postfix") {
        let mta = harness::postfix(&bytes);
        match name.as_str() {
            // Hung (4^16 expansions) before references had a budget.
            "exponential-references.txt" => {
                let m = mta.expect(&name);
                assert_eq!(m.greet_pause, Some(Duration::from_secs(6)));
                assert!(m.details.contains(&"teaser banner off".to_string()));
            }
            // Overflowed u64 seconds.
            "greet-wait-overflows-u64.txt" => {
                assert_eq!(mta.expect(&name).greet_pause, None);
            }
            _ => {}
        }
    }
}

#[test]
fn exim_inputs_read_without_overflow() {
    for (name, bytes) in inputs("exim") {
        let mta = harness::exim(&bytes);
        match name.as_str() {
            // `delay = 2222222222222222d` overflowed u64 seconds.
            "delay-overflows-u64.conf" => assert_eq!(mta.expect(&name).greet_pause, None),
            "host-list-multibyte-separator.conf" => {
                let m = mta.expect(&name);
                assert_eq!(
                    m.greet_pause,
                    Some(Duration::from_secs(
                        7 * 86400 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5
                    ))
                );
                let Pipeconnect::Hosts(nets) = m.pipeconnect else {
                    panic!("{name}: {:?}", m.pipeconnect);
                };
                assert_eq!(nets[0], ("192.0.2.1".parse().unwrap(), true));
            }
            _ => {}
        }
    }
}

#[test]
fn sendmail_inputs_read_whole() {
    for (name, bytes) in inputs("sendmail") {
        let mta = harness::sendmail(&bytes);
        if name == "odd-pause-and-access.cf" {
            let m = mta.expect(&name);
            assert_eq!(m.greet_pause, Some(Duration::from_millis(u64::MAX)));
            assert_eq!(m.listen, "port ");
        }
    }
}

#[test]
fn event_inputs_decode_to_one_line_or_nothing() {
    for (name, bytes) in inputs("event") {
        let report = harness::event(&bytes);
        match name.as_str() {
            "shorter-than-an-event.bin" | "every-byte-ff.bin" => {
                assert!(report.is_none(), "{name}");
            }
            // Verdict 1 and one captured byte in any layout of `Event`.
            "every-byte-one.bin" => {
                let r = report.expect(&name);
                assert_eq!(r.verdict, Verdict::EarlyTalk);
                assert_eq!(r.payload, [1]);
                assert!(r.to_string().contains(": \\x01..."), "{r}");
            }
            _ => {}
        }
    }
}
