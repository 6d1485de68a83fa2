//! The pass cache, for MTAs that keep none of their own: clients that waited
//! politely for the greeting are written to a file the MTA reads (Sendmail's
//! access map `GreetPause:IP 0`, a Postfix cidr table, an Exim lsearch file),
//! so they skip the pause next time. Entries expire after `--pass-ttl`; the
//! file is bounded, rewritten atomically, and an optional command reloads it.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

/// Entries kept at most; the oldest passes go first.
pub const MAX_ENTRIES: usize = 100_000;
/// Kept in the state directory.
pub const STATE_FILE: &str = "pass-cache.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `GreetPause:198.51.100.7<TAB>0` lines for Sendmail's access map (makemap).
    SendmailAccess,
    /// `198.51.100.7/32 permit` lines: a cidr table for postscreen_access_list.
    PostfixCidr,
    /// `198.51.100.7: pass` lines for an Exim `net-iplsearch;FILE` host list.
    EximLsearch,
    /// One address per line.
    Plain,
}

impl Format {
    /// The file's line for one client.
    pub fn line(self, ip: &IpAddr) -> String {
        match (self, ip) {
            (Format::SendmailAccess, IpAddr::V4(a)) => format!("GreetPause:{a}\t0"),
            (Format::SendmailAccess, IpAddr::V6(a)) => format!("GreetPause:IPv6:{a}\t0"),
            (Format::PostfixCidr, IpAddr::V4(a)) => format!("{a}/32 permit"),
            (Format::PostfixCidr, IpAddr::V6(a)) => format!("[{a}]/128 permit"),
            (Format::EximLsearch, IpAddr::V4(a)) => format!("{a}: pass"),
            // Quoted: iplsearch ends a bare key at its first colon (`2001`),
            // which never matches.
            (Format::EximLsearch, IpAddr::V6(a)) => format!("\"{a}\": pass"),
            (Format::Plain, a) => a.to_string(),
        }
    }
}

/// The file an MTA reads, and how it is written.
#[derive(Clone, Debug)]
pub struct PassFile {
    pub path: PathBuf,
    pub format: Format,
    /// Run after each rewrite (`makemap ...`, `postfix reload`).
    pub reload: Option<String>,
}

/// Every client that passed within the TTL, kept in the state directory
/// whatever else is configured: the kernel's PIPECONNECT exemption is
/// restored from it at start. With a `PassFile`, also written for the MTA.
pub struct PassCache {
    pub file: Option<PassFile>,
    pub ttl: Duration,
    state: PathBuf,
    /// Client address to the time of its last pass (unix seconds).
    passes: HashMap<IpAddr, u64>,
    /// The set of clients changed: the MTA's file must be rewritten.
    dirty: bool,
    /// Only pass times changed: the state file alone is rewritten.
    times_dirty: bool,
}

impl PassCache {
    /// Opens the cache, with what was remembered across restarts in `state_dir`.
    pub fn open(file: Option<PassFile>, ttl: Duration, state_dir: &Path) -> Self {
        let state = state_dir.join(STATE_FILE);
        // A lost state only costs the clients one more pause: no reason to stop.
        let passes = match fs::read(&state).map(|b| parse_state(&b)) {
            Ok(Ok(passes)) => passes,
            Ok(Err(e)) => {
                log::warn!(
                    "pass cache state {} is corrupt ({e}): starting with no passes",
                    state.display()
                );
                HashMap::new()
            }
            Err(_) => HashMap::new(),
        };
        PassCache {
            file,
            ttl,
            state,
            passes,
            dirty: true,
            times_dirty: false,
        }
    }

    /// Passes still within the TTL: (client, unix seconds of the pass). A
    /// pass stamped later than `now` (the clock stepped back, or an edited
    /// state file) counts as passing now, so callers can add the TTL to it.
    pub fn live(&self, now: u64) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        let ttl = self.ttl.as_secs();
        self.passes
            .iter()
            .filter(move |(_, t)| now.saturating_sub(**t) < ttl)
            .map(move |(a, t)| (*a, (*t).min(now)))
    }

    /// A reload's MTA file: written on the next flush.
    pub fn set_file(&mut self, file: Option<PassFile>) {
        self.file = file;
        self.dirty = true;
    }

    pub fn record(&mut self, ip: IpAddr, now: u64) {
        // A client listed already keeps the MTA's file as it is: rewriting
        // it (and reloading the MTA, which restarts postscreen) per pass
        // would cost a reload a second on a busy MX.
        if self.passes.insert(ip, now).is_none() {
            self.dirty = true;
        } else {
            self.times_dirty = true;
        }
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.passes.contains_key(ip)
    }

    /// Drops expired passes, keeps the newest `MAX_ENTRIES`, and rewrites the
    /// state and the MTA's file (then runs its reload command) when anything
    /// changed. `to_mta` false (a dry run) leaves the MTA's file alone.
    pub fn flush(&mut self, now: u64, to_mta: bool) -> Result<bool> {
        let before = self.passes.len();
        let ttl = self.ttl.as_secs();
        self.passes.retain(|_, t| now.saturating_sub(*t) < ttl);
        if self.passes.len() > MAX_ENTRIES {
            let mut by_age: Vec<(IpAddr, u64)> =
                self.passes.iter().map(|(a, t)| (*a, *t)).collect();
            by_age.sort_by_key(|&(_, t)| std::cmp::Reverse(t));
            self.passes = by_age.into_iter().take(MAX_ENTRIES).collect();
        }
        let changed = self.dirty || self.passes.len() != before;
        if !changed && !self.times_dirty {
            return Ok(false);
        }
        atomic_write(&self.state, &serde_json::to_vec(&self.passes)?)?;
        self.dirty = false;
        self.times_dirty = false;
        if !changed {
            return Ok(true);
        }
        let Some(file) = self.file.as_ref().filter(|_| to_mta) else {
            return Ok(true);
        };
        let mut sorted: Vec<&IpAddr> = self.passes.keys().collect();
        sorted.sort();
        let mut text = format!(
            "# spamdelay pass cache: clients that waited for the greeting (kept {}); rewritten automatically\n",
            crate::duration::show(self.ttl)
        );
        for ip in sorted {
            let _ = writeln!(text, "{}", file.format.line(ip));
        }
        atomic_write(&file.path, text.as_bytes())?;
        if let Some(cmd) = &file.reload {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .with_context(|| format!("running the pass cache reload command `{cmd}`"))?;
            if !status.success() {
                anyhow::bail!("the pass cache reload command `{cmd}` failed ({status})");
            }
        }
        Ok(true)
    }
}

/// The state file's contents (`pass-cache.json`): each client's last pass.
pub fn parse_state(bytes: &[u8]) -> serde_json::Result<HashMap<IpAddr, u64>> {
    serde_json::from_slice(bytes)
}

fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_write_what_each_mta_reads() {
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(
            Format::SendmailAccess.line(&v4),
            "GreetPause:198.51.100.7\t0"
        );
        assert_eq!(
            Format::SendmailAccess.line(&v6),
            "GreetPause:IPv6:2001:db8::7\t0"
        );
        assert_eq!(Format::PostfixCidr.line(&v6), "[2001:db8::7]/128 permit");
        assert_eq!(Format::EximLsearch.line(&v4), "198.51.100.7: pass");
        assert_eq!(Format::EximLsearch.line(&v6), "\"2001:db8::7\": pass");
        assert_eq!(Format::Plain.line(&v6), "2001:db8::7");
    }

    #[test]
    fn expired_passes_are_dropped_and_the_file_rewritten() {
        let dir = std::env::temp_dir().join(format!("spamdelay-pass-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pass");
        let pass_file = PassFile {
            path: file.clone(),
            format: Format::Plain,
            reload: None,
        };
        let mut c = PassCache::open(Some(pass_file), Duration::from_secs(10), &dir);
        c.record("198.51.100.1".parse().unwrap(), 100);
        c.record("198.51.100.2".parse().unwrap(), 105);
        assert!(c.flush(106, true).unwrap());
        assert!(
            fs::read_to_string(&file)
                .unwrap()
                .ends_with("198.51.100.1\n198.51.100.2\n")
        );
        assert!(!c.flush(107, true).unwrap(), "nothing changed");
        assert!(c.flush(111, true).unwrap(), "the first expired");
        assert!(
            fs::read_to_string(&file)
                .unwrap()
                .ends_with("\n198.51.100.2\n")
        );
        let again = PassCache::open(None, Duration::from_secs(10), &dir);
        assert!(
            again.contains(&"198.51.100.2".parse().unwrap()),
            "remembered across restarts"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_passing_again_does_not_reload_the_mta() {
        let dir = std::env::temp_dir().join(format!("spamdelay-reload-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let reloads = dir.join("reloads");
        let file = PassFile {
            path: dir.join("pass"),
            format: Format::Plain,
            reload: Some(format!("echo x >> {}", reloads.display())),
        };
        let mut c = PassCache::open(Some(file), Duration::from_secs(100), &dir);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        c.record(ip, 10);
        assert!(c.flush(10, true).unwrap());
        c.record(ip, 20);
        assert!(c.flush(20, true).unwrap(), "the pass time is kept");
        assert_eq!(fs::read_to_string(&reloads).unwrap(), "x\n", "one reload");
        let again = PassCache::open(None, Duration::from_secs(100), &dir);
        assert_eq!(again.live(20).collect::<Vec<_>>(), vec![(ip, 20)]);
        let _ = fs::remove_dir_all(&dir);
    }
}
