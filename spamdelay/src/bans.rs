//! The ban register: every ban with its expiry, reason and offence count, and
//! the offences remembered after a ban expires. Kept in `bans.json` under the
//! state directory, read and written under a lock by the daemon and the admin
//! commands alike, replaced atomically so a crash never leaves half a file.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::allow::Cidr;

pub const STATE_FILE: &str = "bans.json";
const LOCK_FILE: &str = "bans.lock";

/// Seconds since the epoch: what the state file stores.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One banned (or remembered) address or network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// When the ban ends (unix seconds); in the past for a remembered offender.
    pub expires: u64,
    /// Why, as shown in nft's element comment and `spamdelay list`.
    pub reason: String,
    /// Offences counted for this address (manual bans count one).
    pub offences: u32,
    /// Until when the offences are remembered (unix seconds).
    pub remember_until: u64,
}

impl Ban {
    pub fn active(&self, now: u64) -> bool {
        self.expires > now
    }

    pub fn time_left(&self, now: u64) -> Duration {
        Duration::from_secs(self.expires.saturating_sub(now))
    }
}

/// What the table was last set up with, so admin commands run without the
/// daemon recreate the same table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSettings {
    pub ports: Vec<u16>,
    pub action: crate::nft::Action,
    pub set_size: u32,
}

impl TableSettings {
    /// Creates or updates the table for these settings.
    pub fn ensure(
        &self,
    ) -> impl std::future::Future<Output = Result<(), crate::nft::NftError>> + Send + 'static {
        crate::nft::ensure_table(&self.ports, self.action, self.set_size)
    }
}

/// How the daemon counts offences, kept in the register so that the admin
/// commands' bans count and aggregate as the daemon's do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanSettings {
    /// `--remember`, in seconds.
    pub remember_secs: u64,
    /// `--ipv6-aggregate` (0: off).
    pub ipv6_aggregate: u32,
    /// The daemon's allowlist (its `--allow`, loopback, the host's own
    /// addresses): no aggregate may cover any of it.
    #[serde(default)]
    pub allow: Vec<Cidr>,
}

impl Default for BanSettings {
    fn default() -> Self {
        BanSettings {
            remember_secs: 7 * 86400,
            ipv6_aggregate: 4,
            allow: Vec::new(),
        }
    }
}

impl Default for TableSettings {
    fn default() -> Self {
        TableSettings {
            ports: vec![25],
            action: crate::nft::Action::Reject,
            set_size: 262_144,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    #[serde(default)]
    pub table: TableSettings,
    #[serde(default)]
    pub settings: BanSettings,
    /// Keyed by the CIDR (`198.51.100.7/32`, `2001:db8::/64`).
    #[serde(default)]
    pub bans: BTreeMap<Cidr, Ban>,
}

impl Register {
    /// The register file's contents (`bans.json`), as `Store::lock` reads them.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }

    /// Bans still in force.
    pub fn active(&self, now: u64) -> impl Iterator<Item = (&Cidr, &Ban)> {
        self.bans.iter().filter(move |(_, b)| b.active(now))
    }

    /// The prefix lengths in use, per family: all `covering_in` looks up.
    pub fn lengths(&self) -> Lengths {
        let mut l = Lengths::default();
        for c in self.bans.keys() {
            let v = if c.is_ipv4() { &mut l.v4 } else { &mut l.v6 };
            if !v.contains(&c.prefix_len()) {
                v.push(c.prefix_len());
            }
        }
        l
    }

    /// The active ban covering `cidr`, if any (itself or a wider network).
    pub fn covering(&self, cidr: &Cidr, now: u64) -> Option<(&Cidr, &Ban)> {
        self.covering_in(&self.lengths(), cidr, now)
    }

    /// `covering` with the lengths computed once for a whole batch: one map
    /// lookup per prefix length in use, not a scan of every ban.
    pub fn covering_in(&self, lengths: &Lengths, cidr: &Cidr, now: u64) -> Option<(&Cidr, &Ban)> {
        let family = if cidr.is_ipv4() {
            &lengths.v4
        } else {
            &lengths.v6
        };
        family
            .iter()
            .filter(|&&len| len <= cidr.prefix_len())
            .find_map(|&len| {
                let wider = Cidr::around(cidr.addr(), len);
                self.bans
                    .get_key_value(&wider)
                    .filter(|(_, b)| b.active(now))
            })
    }

    /// Every entry (banned or remembered) inside `net`, itself included.
    pub fn inside<'a>(&'a self, net: &'a Cidr) -> impl Iterator<Item = (&'a Cidr, &'a Ban)> + 'a {
        self.bans
            .range(net.span())
            .filter(move |(c, _)| net.covers(c))
    }

    /// Drops entries neither banned nor remembered any more.
    pub fn forget_expired(&mut self, now: u64) {
        self.bans
            .retain(|_, b| b.active(now) || b.remember_until > now);
    }
}

/// Prefix lengths present in a register, per family.
#[derive(Clone, Debug, Default)]
pub struct Lengths {
    v4: Vec<u8>,
    v6: Vec<u8>,
}

impl Lengths {
    /// Notes the length of a ban added since (a length no longer in use
    /// costs a lookup, never a wrong answer).
    pub fn add(&mut self, cidr: &Cidr) {
        let v = if cidr.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if !v.contains(&cidr.prefix_len()) {
            v.push(cidr.prefix_len());
        }
    }
}

/// The state directory and its lock. Keeps the register it last read or
/// wrote: while the file is unchanged (nobody else wrote it), locking it
/// again costs no parse, which matters with 100,000 bans and a batch every
/// few milliseconds.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
    cache: std::sync::Arc<std::sync::Mutex<Option<(Stamp, Register)>>>,
}

/// What tells the file changed: its modification time and length.
type Stamp = (std::time::SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The register, read under the lock; `save` writes it back before the lock
/// is released (on drop).
pub struct Locked {
    _lock: Flock<File>,
    path: PathBuf,
    pub register: Register,
    /// Whether the file was read (changed by another process, or never
    /// cached), not the copy this store last wrote or read.
    pub reread: bool,
    cache: std::sync::Arc<std::sync::Mutex<Option<(Stamp, Register)>>>,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store {
            dir: dir.into(),
            cache: Default::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Locks the register and reads it. A corrupt file is moved aside (never
    /// silently discarded) and reported in `aside`; the register starts empty.
    pub fn lock(&self) -> Result<(Locked, Option<PathBuf>)> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the state directory {}", self.dir.display()))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let path = self.path();
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((was, register)) = cached
            && stamp(&path) == Some(was)
        {
            let locked = Locked {
                _lock: lock,
                path,
                register,
                reread: false,
                cache: self.cache.clone(),
            };
            return Ok((locked, None));
        }
        let (register, aside) = match fs::read(&path) {
            Ok(bytes) => match Register::from_json(&bytes) {
                Ok(r) => (r, None),
                Err(e) => {
                    let aside = path.with_extension(format!("json.corrupt-{}", now()));
                    fs::rename(&path, &aside)
                        .with_context(|| format!("moving the corrupt {} aside", path.display()))?;
                    log::error!(
                        "state file {} is corrupt ({e}): kept as {} and starting with no remembered bans; repair it and restore with `spamdelay ban`",
                        path.display(),
                        aside.display()
                    );
                    (Register::default(), Some(aside))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Register::default(), None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok((
            Locked {
                _lock: lock,
                path,
                register,
                reread: true,
                cache: self.cache.clone(),
            },
            aside,
        ))
    }
}

impl Locked {
    /// Writes the register atomically: a temporary file, fsync, rename.
    /// Streamed and compact: no second copy of a big register in memory.
    pub fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        let mut out = std::io::BufWriter::new(f);
        serde_json::to_writer(&mut out, &self.register)?;
        out.write_all(b"\n")?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        Ok(())
    }
}

impl Locked {
    /// Replaces the register atomically without waiting for the disk:
    /// `sync` the returned path afterwards (off the hot path).
    pub fn save_unsynced(&self) -> Result<PathBuf> {
        let tmp = self.path.with_extension("json.tmp");
        let f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        let mut out = std::io::BufWriter::new(f);
        serde_json::to_writer(&mut out, &self.register)?;
        out.write_all(b"\n")?;
        out.flush()?;
        drop(out);
        fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        Ok(self.path.clone())
    }
}

/// Waits for a file written by `save_unsynced` and its directory to reach
/// the disk.
pub fn sync(path: &Path) -> Result<()> {
    File::open(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Drop for Locked {
    /// Hands the register back to the store, stamped with the file as it is
    /// now (as written, or as read): the next lock reuses it if untouched.
    fn drop(&mut self) {
        if let Some(now) = stamp(&self.path) {
            let register = std::mem::take(&mut self.register);
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, register));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(expires: u64) -> Ban {
        Ban {
            expires,
            reason: "early-talk".into(),
            offences: 1,
            remember_until: expires + 100,
        }
    }

    #[test]
    fn register_survives_a_round_trip() {
        let dir = std::env::temp_dir().join(format!("spamdelay-bans-{}", std::process::id()));
        let store = Store::new(&dir);
        {
            let (mut l, aside) = store.lock().unwrap();
            assert!(aside.is_none());
            l.register
                .bans
                .insert("198.51.100.7".parse().unwrap(), ban(now() + 60));
            l.save().unwrap();
        }
        let (l, _) = store.lock().unwrap();
        assert_eq!(l.register.bans.len(), 1);
        drop(l);
        fs::write(store.path(), b"{ not json").unwrap();
        let (l, aside) = store.lock().unwrap();
        assert!(l.register.bans.is_empty());
        let aside = aside.expect("corrupt file kept aside");
        assert_eq!(fs::read(&aside).unwrap(), b"{ not json");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_register_changed_by_another_process_is_read_again() {
        let dir = std::env::temp_dir().join(format!("spamdelay-cache-{}", std::process::id()));
        let (daemon, admin) = (Store::new(&dir), Store::new(&dir));
        let a: Cidr = "198.51.100.7".parse().unwrap();
        let b: Cidr = "198.51.100.8".parse().unwrap();
        {
            let (mut l, _) = daemon.lock().unwrap();
            l.register.bans.insert(a, ban(now() + 60));
            l.save().unwrap();
        }
        {
            let (mut l, _) = admin.lock().unwrap();
            assert!(l.register.bans.contains_key(&a));
            l.register.bans.insert(b, ban(now() + 60));
            l.save().unwrap();
        }
        let (l, _) = daemon.lock().unwrap();
        assert!(
            l.register.bans.contains_key(&b),
            "the cached copy was stale"
        );
        drop(l);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn wider_ban_covers_an_address() {
        let mut r = Register::default();
        let t = now();
        r.bans.insert("2001:db8::/64".parse().unwrap(), ban(t + 60));
        r.bans
            .insert("198.51.100.0/24".parse().unwrap(), ban(t - 1));
        assert!(r.covering(&"2001:db8::5".parse().unwrap(), t).is_some());
        assert!(
            r.covering(&"198.51.100.7".parse().unwrap(), t).is_none(),
            "expired"
        );
        r.forget_expired(t + 200);
        assert!(r.bans.is_empty());
    }
}
