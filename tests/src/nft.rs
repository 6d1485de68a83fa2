//! Looking at nftables inside a lab namespace the way an admin would: `nft
//! list` text for byte-for-byte comparisons, `nft -j` for the ban sets.

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::lab::Netns;

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
