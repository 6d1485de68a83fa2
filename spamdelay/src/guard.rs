//! One daemon per state directory and per interface: a second `spamdelay run`
//! is refused, naming the first one's pid, before it loads, attaches or writes.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions, TryLockError},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType};

use crate::loader::{EGRESS, INGRESS};

/// The lock file in the state directory, holding the running daemon's pid.
pub const PID_FILE: &str = "spamdelay.pid";

/// Held for the daemon's life: the lock goes with the file descriptor, when
/// the daemon exits, however it exits. The file itself stays (removing it
/// would race a daemon that has just opened it), its pid line only counts
/// while someone holds the lock.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the state directory's lock and checks that no other live daemon
/// watches any of `ifaces`; only then creates what is missing (the state
/// directory, the lock file) and writes this process's pid. Nothing at all
/// is written when it refuses.
pub fn acquire(state_dir: &Path, ifaces: &[String]) -> Result<RunLock> {
    let path = state_dir.join(PID_FILE);
    // An existing file is locked before anything else; a missing one is
    // held by nobody, and is only created once the interfaces are clear.
    let mut file = match open(&path, false) {
        Ok(file) => Some(lock(file, &path, state_dir)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("opening the lock file {}", path.display()));
        }
    };
    for iface in ifaces {
        if let Some(pid) = daemon_on(iface) {
            bail!(
                "another spamdelay run{} watches {iface}: stop it first (systemctl stop spamdelay)",
                pid_words(Some(pid))
            );
        }
    }
    let mut file = match file.take() {
        Some(file) => file,
        None => {
            std::fs::create_dir_all(state_dir)
                .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
            let file = open(&path, true)
                .with_context(|| format!("creating the lock file {}", path.display()))?;
            lock(file, &path, state_dir)?
        }
    };
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing the pid to {}", path.display()))?;
    Ok(RunLock { _file: file, path })
}

/// Opens the lock file for reading and writing, never truncating it: the
/// pid in it is the running daemon's until the lock is ours.
fn open(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

/// `flock(LOCK_EX | LOCK_NB)`: never waits, so fine on the runtime's thread.
fn lock(mut file: File, path: &Path, state_dir: &Path) -> Result<File> {
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            bail!(
                "another spamdelay run{} uses the state directory {}: stop it first (systemctl stop spamdelay)",
                pid_words(text.trim().parse().ok()),
                state_dir.display()
            );
        }
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

fn pid_words(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// The pid of a live process, other than this one, that holds spamdelay's
/// programs attached to `iface`.
///
/// What is attached is not enough to tell: a daemon run with `--pin-dir`
/// leaves its programs attached (pinned links) when it exits, and the next
/// run adopts them; that is no second daemon. A live daemon, unlike pins,
/// holds file descriptors to its programs (aya keeps one per program, and
/// one per link it did not pin). So: the TCX query (aya, no child process)
/// gives the ids of the programs on the interface, kept when their name is
/// one of spamdelay's; then every process's bpf descriptors
/// (`/proc/PID/fd` -> `anon_inode:bpf-prog` or `anon_inode:bpf_link`) are
/// matched on their `prog_id:` line in `/proc/PID/fdinfo/FD`.
///
/// Where the kernel has no TCX (clsact filters, Linux < 6.6) nothing can be
/// queried this way and only the state directory's lock guards; two daemons
/// starting at the very same moment on different state directories may
/// also both pass. Both are rare enough for a check that only saves an
/// admin from a mistake.
pub fn daemon_on(iface: &str) -> Option<u32> {
    let ids = spamdelay_programs_on(iface);
    if ids.is_empty() {
        return None;
    }
    holder_of(&ids)
}

/// The ids of spamdelay's programs attached to `iface` by TCX.
fn spamdelay_programs_on(iface: &str) -> HashSet<u32> {
    let mut ids = HashSet::new();
    for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
        let programs = match SchedClassifier::query_tcx(iface, hook) {
            Ok((_, programs)) => programs,
            Err(e) => {
                log::debug!("querying the TCX programs on {iface}: {e}");
                continue;
            }
        };
        for p in programs {
            if is_ours(p.name_as_str().unwrap_or_default()) {
                ids.insert(p.id());
            }
        }
    }
    ids
}

/// The kernel keeps 15 bytes of a program's name: `spamdelay_ingre`.
fn is_ours(kernel_name: &str) -> bool {
    !kernel_name.is_empty() && [INGRESS, EGRESS].iter().any(|n| n.starts_with(kernel_name))
}

/// The first live process, other than this one, with a bpf descriptor on one
/// of the programs `ids`. Processes and descriptors that vanish or cannot
/// be read while scanning are skipped.
fn holder_of(ids: &HashSet<u32>) -> Option<u32> {
    let me = std::process::id();
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_bpf = std::fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("anon_inode:bpf"));
            if !is_bpf {
                continue;
            }
            let info = entry.path().join("fdinfo").join(fd.file_name());
            if std::fs::read_to_string(info)
                .is_ok_and(|text| prog_id(&text).is_some_and(|id| ids.contains(&id)))
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The `prog_id:` of an fdinfo text (program and link descriptors have one).
fn prog_id(fdinfo: &str) -> Option<u32> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_state_directory_is_refused_with_the_pid() {
        let dir = tempfile_dir("second");
        let first = acquire(&dir, &[]).expect("the first lock");
        let text = std::fs::read_to_string(first.path()).expect("the pid file");
        assert_eq!(text, format!("{}\n", std::process::id()));
        let err = acquire(&dir, &[]).expect_err("a second lock").to_string();
        assert_eq!(
            err,
            format!(
                "another spamdelay run (pid {}) uses the state directory {}: stop it first (systemctl stop spamdelay)",
                std::process::id(),
                dir.display()
            )
        );
        drop(first);
        let again = acquire(&dir, &[]).expect("the lock is free once dropped");
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_refused_lock_writes_nothing() {
        let dir = tempfile_dir("nothing");
        let first = acquire(&dir, &[]).expect("the first lock");
        std::fs::write(first.path(), "12345\n").expect("a pid of our choosing");
        let err = acquire(&dir, &[]).expect_err("a second lock").to_string();
        assert!(err.contains("(pid 12345)"), "{err}");
        assert_eq!(
            std::fs::read_to_string(first.path()).expect("the pid file"),
            "12345\n"
        );
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_state_directory_is_created_with_the_lock() {
        let dir = tempfile_dir("missing").join("state");
        let lock = acquire(&dir, &[]).expect("a lock in a new directory");
        assert_eq!(lock.path(), dir.join(PID_FILE));
        assert!(lock.path().exists());
        drop(lock);
        let _ = std::fs::remove_dir_all(dir.parent().expect("the scratch directory"));
    }

    #[test]
    fn kernel_names_of_our_programs_are_recognised() {
        assert!(is_ours("spamdelay_ingre"));
        assert!(is_ours("spamdelay_egres"));
        assert!(is_ours(INGRESS));
        assert!(!is_ours(""));
        assert!(!is_ours("cil_from_netdev"));
    }

    #[test]
    fn prog_id_is_read_from_fdinfo() {
        let link = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nlink_type:\ttcx\nlink_id:\t7\nprog_tag:\tabcdef\nprog_id:\t42\nifindex:\t2\nattach_type:\t46\n";
        assert_eq!(prog_id(link), Some(42));
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t2\nmap_id:\t9\n";
        assert_eq!(prog_id(map), None);
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("spamdelay-guard-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    }
}
