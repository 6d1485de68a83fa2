//! What waits to be sent to LAPI, on disk in the state directory: alerts
//! LAPI could not take yet, and the bans and unbans of `spamdelay ban` /
//! `unban` (another process) for the daemon to send. JSON lines, under a
//! lock file, bounded: beyond `MAX` entries the oldest go, counted.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::allow::Cidr;

pub const SPOOL_FILE: &str = "crowdsec-spool.jsonl";
const LOCK_FILE: &str = "crowdsec-spool.lock";
/// Entries kept at most; a day's bans of a busy gateway fit.
pub const MAX: usize = 10_000;

/// One change for the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    /// A ban made at `at` (unix seconds), ending at `expires`.
    Ban {
        cidr: Cidr,
        scenario: String,
        reason: String,
        at: u64,
        expires: u64,
    },
    /// A ban lifted by an admin.
    Unban { cidr: Cidr, at: u64 },
}

impl Entry {
    /// Whether it is still worth sending: a ban that ended is not.
    pub fn live(&self, now: u64) -> bool {
        match self {
            Entry::Ban { expires, .. } => *expires > now,
            Entry::Unban { .. } => true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn new(dir: &Path) -> Spool {
        Spool {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(SPOOL_FILE)
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
    }

    fn read(&self) -> Result<Vec<Entry>> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // A line cut by a crash is skipped, not fatal.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    fn write(&self, entries: &[Entry]) -> Result<()> {
        let path = self.path();
        if entries.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", path.display()))
                }
                _ => Ok(()),
            };
        }
        let tmp = self.dir.join(format!("{SPOOL_FILE}.tmp"));
        let mut out = String::new();
        for e in entries {
            out.push_str(&serde_json::to_string(e)?);
            out.push('\n');
        }
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(out.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
    }

    /// Adds `entries` after what waits, dropping ended bans and, beyond
    /// `MAX`, the oldest. Returns how many were dropped for room.
    pub fn append(&self, entries: &[Entry], now: u64) -> Result<usize> {
        let _lock = self.lock()?;
        let mut all = self.read()?;
        all.extend(entries.iter().cloned());
        all.retain(|e| e.live(now));
        let dropped = all.len().saturating_sub(MAX);
        all.drain(..dropped);
        self.write(&all)?;
        Ok(dropped)
    }

    /// Takes everything that waits (the file is emptied).
    pub fn take(&self, now: u64) -> Result<Vec<Entry>> {
        if !self.path().exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut all = self.read()?;
        self.write(&[])?;
        all.retain(|e| e.live(now));
        Ok(all)
    }

    /// How many entries wait.
    pub fn waiting(&self) -> usize {
        fs::read_to_string(self.path()).map_or(0, |t| t.lines().count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(i: u32, expires: u64) -> Entry {
        Entry::Ban {
            cidr: format!("198.51.100.{}", i % 250).parse().unwrap(),
            scenario: "spamdelay/early-talk".into(),
            reason: format!("n{i}"),
            at: 100,
            expires,
        }
    }

    #[test]
    fn entries_wait_in_order_and_ended_bans_go() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        assert_eq!(spool.take(0).unwrap(), vec![]);
        let unban = Entry::Unban {
            cidr: "2001:db8::/64".parse().unwrap(),
            at: 150,
        };
        assert_eq!(spool.append(&[ban(1, 1000), ban(2, 200)], 150).unwrap(), 0);
        assert_eq!(spool.append(std::slice::from_ref(&unban), 150).unwrap(), 0);
        assert_eq!(spool.waiting(), 3);
        assert_eq!(spool.take(300).unwrap(), vec![ban(1, 1000), unban]);
        assert_eq!(spool.waiting(), 0);
        assert!(!spool.path().exists());
    }

    #[test]
    fn the_oldest_go_beyond_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let many: Vec<Entry> = (0..MAX as u32 + 5).map(|i| ban(i, 1000)).collect();
        assert_eq!(spool.append(&many, 0).unwrap(), 5);
        let kept = spool.take(0).unwrap();
        assert_eq!(kept.len(), MAX);
        assert_eq!(kept[0], ban(5, 1000));
    }
}
