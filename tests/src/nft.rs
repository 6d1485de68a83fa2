//! Looking at nftables inside a lab namespace the way an admin would: `nft
//! list` text for byte-for-byte comparisons, `nft -j` for the ban sets, and
//! `nft monitor` for when each element went in (`nlmon` reads the same
//! notifications in process).

use std::{
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Watched, lab::Netns};

/// `nft ARGS` in `ns`; its stdout.
pub fn nft(ns: &Netns, args: &[&str]) -> Result<String> {
    let out = ns
        .command("nft")
        .args(args)
        .output()
        .context("running nft (apt-get install nftables)")?;
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One element of a ban set, as `nft -j` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// `198.51.100.10`, `2001:db8::/64`.
    pub addr: String,
    pub timeout: Option<u64>,
    pub expires: Option<u64>,
    pub comment: Option<String>,
}

/// The elements of `inet spamdelay SET`; empty when the table or set is absent.
pub fn elements(ns: &Netns, set: &str) -> Vec<Element> {
    let Ok(json) = nft(ns, &["-j", "list", "set", "inet", "spamdelay", set]) else {
        return Vec::new();
    };
    let doc: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
    let mut out = Vec::new();
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        for e in obj["set"]["elem"].as_array().into_iter().flatten() {
            let (val, meta) = if e.get("elem").is_some() {
                (&e["elem"]["val"], &e["elem"])
            } else {
                (e, &Value::Null)
            };
            let addr = match val {
                Value::String(s) => s.clone(),
                v => format!(
                    "{}/{}",
                    v["prefix"]["addr"].as_str().unwrap_or("?"),
                    v["prefix"]["len"]
                ),
            };
            out.push(Element {
                addr,
                timeout: meta["timeout"].as_u64(),
                expires: meta["expires"].as_u64(),
                comment: meta["comment"].as_str().map(str::to_string),
            });
        }
    }
    out
}

/// The element for `addr` in `set`, if banned.
pub fn element(ns: &Netns, set: &str, addr: &str) -> Option<Element> {
    elements(ns, set).into_iter().find(|e| e.addr == addr)
}

/// An admin's own table, which spamdelay must never touch.
pub fn add_unrelated_table(ns: &Netns) -> Result<()> {
    nft(ns, &["add", "table", "inet", "filter"])?;
    nft(
        ns,
        &[
            "add",
            "chain",
            "inet",
            "filter",
            "input",
            "{ type filter hook input priority 0; policy accept; }",
        ],
    )?;
    nft(
        ns,
        &[
            "add", "rule", "inet", "filter", "input", "tcp", "dport", "22", "counter", "accept",
        ],
    )?;
    Ok(())
}

/// One element added to a set, as a watcher (`Monitor`, or
/// `nlmon::Watcher`) reported it.
#[derive(Clone, Debug)]
pub struct Added {
    /// When the watcher's report of it arrived here.
    pub at: Instant,
    pub table: String,
    pub set: String,
    /// The element's key as nft prints it (`2001:db8::1`, `198.51.100.0/24`).
    pub element: String,
}

#[derive(Default)]
struct Seen {
    added: Vec<Added>,
    /// Committed transactions, each with the number of elements added
    /// before it.
    generations: Vec<usize>,
    /// Anything else the watcher reported (the probe, tables, chains,
    /// stderr, messages it could not read).
    other: Vec<String>,
}

/// Elements added to sets, in the order a watcher saw them, and the
/// transactions that added them: what `Monitor` and `nlmon::Watcher` both
/// record, and how the measurements wait for bans.
#[derive(Clone, Default)]
pub struct Additions {
    seen: Arc<Watched<Seen>>,
}

impl Additions {
    /// Records `added`, then, with `commit`, the end of their transaction.
    pub(crate) fn record(&self, added: impl IntoIterator<Item = Added>, commit: bool) {
        self.seen.update(|s| {
            s.added.extend(added);
            if commit {
                let n = s.added.len();
                s.generations.push(n);
            }
        });
    }

    pub(crate) fn note(&self, line: String) {
        self.seen.update(|s| s.other.push(line));
    }

    /// Waits up to `timeout` for `done` to hold; whether it did.
    fn wait(&self, timeout: Duration, done: impl Fn(&Seen) -> bool) -> bool {
        self.seen
            .wait_for(timeout, |s| done(s).then_some(()))
            .is_some()
    }

    /// Waits up to `timeout` until `count` elements were added to `table`,
    /// or until none was for `quiet`; returns how many were.
    pub fn wait_added(
        &self,
        table: &str,
        count: usize,
        timeout: Duration,
        quiet: Duration,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let before = self.added_to(table);
            let left = deadline.saturating_duration_since(Instant::now());
            if before >= count || left.is_zero() {
                return before;
            }
            let grew = self.wait(quiet.min(left), |s| {
                s.added.iter().filter(|a| a.table == table).count() > before
            });
            if !grew {
                return self.added_to(table);
            }
        }
    }

    /// How many elements were added to `table` so far.
    pub fn added_to(&self, table: &str) -> usize {
        self.seen
            .read(|s| s.added.iter().filter(|a| a.table == table).count())
    }

    /// Every element added so far, in order.
    pub fn added(&self) -> Vec<Added> {
        self.seen.read(|s| s.added.clone())
    }

    /// When the last element (of any table) arrived, if any did.
    pub fn last_added_at(&self) -> Option<Instant> {
        self.seen.read(|s| s.added.last().map(|a| a.at))
    }

    /// Committed transactions that added at least one element to `table`.
    pub fn transactions_adding_to(&self, table: &str) -> usize {
        self.seen.read(|s| {
            let mut from = 0;
            let mut count = 0;
            for &to in &s.generations {
                if s.added[from..to].iter().any(|a| a.table == table) {
                    count += 1;
                }
                from = to;
            }
            count
        })
    }

    /// What was neither an element nor a transaction's end.
    pub fn other_lines(&self) -> Vec<String> {
        self.seen.read(|s| s.other.clone())
    }
}

/// `nft monitor` running in a namespace: every element added to any set,
/// stamped the moment nft prints it, so "banned" means "seen by nft" without
/// polling. Stopped on drop. A process of its own that formats text for a
/// pipe: under load its stamps may lag (`nlmon::Watcher` reads the same
/// notifications in process).
pub struct Monitor {
    child: Child,
    additions: Additions,
}

/// The table the monitor's readiness probe creates and deletes.
const PROBE_TABLE: &str = "spamdelay_monitor_probe";

impl Monitor {
    /// Starts `nft monitor` in `ns` and returns once it demonstrably listens
    /// (it has reported a probe table created after it started).
    pub fn start(ns: &Netns) -> Result<Monitor> {
        let mut child = ns
            .command("nft")
            .arg("monitor")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nft monitor (apt-get install nftables)")?;
        let additions = Additions::default();
        let sink = additions.clone();
        crate::read_lines(&mut child, move |line, at| {
            if let Some((table, set, element)) = parse_added(&line) {
                let added = Added {
                    at,
                    table,
                    set,
                    element,
                };
                sink.record([added], false);
            } else if line.starts_with("# new generation") {
                sink.record([], true);
            } else {
                sink.note(line);
            }
        });
        let monitor = Monitor { child, additions };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            nft(ns, &["add", "table", "inet", PROBE_TABLE])?;
            nft(ns, &["delete", "table", "inet", PROBE_TABLE])?;
            if monitor.additions.wait(Duration::from_millis(200), |s| {
                s.other.iter().any(|l| l.contains(PROBE_TABLE))
            }) {
                return Ok(monitor);
            }
            if Instant::now() > deadline {
                bail!("nft monitor reported nothing for 10 s");
            }
        }
    }

    /// What the monitor has seen.
    pub fn additions(&self) -> &Additions {
        &self.additions
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `add element inet spamdelay early_talkers_v6 { 2001:db8::1 timeout 1h ... }`
/// to (table, set, element); nft prints one line per element.
fn parse_added(line: &str) -> Option<(String, String, String)> {
    let rest = line.strip_prefix("add element ")?;
    let mut words = rest.split(' ');
    let _family = words.next()?;
    let table = words.next()?;
    let set = words.next()?;
    if words.next()? != "{" {
        return None;
    }
    let element = words.next()?.trim_end_matches(',');
    Some((table.to_string(), set.to_string(), element.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_name_table_set_and_element() {
        let line = r#"add element inet spamdelay early_talkers_v6 { 2001:db8::8000:5:0:1 timeout 1h expires 1h comment "early-talk 20B after 0.00s: EHLO x\r\n" }"#;
        assert_eq!(
            parse_added(line),
            Some((
                "spamdelay".into(),
                "early_talkers_v6".into(),
                "2001:db8::8000:5:0:1".into()
            ))
        );
        assert_eq!(
            parse_added("add element inet f2b-table addr6-set-postfix { 2001:db8::1 }"),
            Some((
                "f2b-table".into(),
                "addr6-set-postfix".into(),
                "2001:db8::1".into()
            ))
        );
        assert_eq!(parse_added("add table inet spamdelay"), None);
    }
}
