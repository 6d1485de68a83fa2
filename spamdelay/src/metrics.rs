//! Counters for admins: the kernel's per-CPU counters summed, and the status
//! file the daemon refreshes each second so `spamdelay status` can show them
//! from another process.

use std::{collections::BTreeMap, fs, io::Write, path::Path};

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use spamdelay_common::Stat;

pub const STATUS_FILE: &str = "status.json";

/// The kernel's counters, summed over CPUs, in `Stat` order.
pub fn sum<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
) -> Result<Vec<(Stat, u64)>> {
    Stat::ALL
        .iter()
        .map(|&stat| Ok((stat, stats.get(&(stat as u32), 0)?.iter().sum())))
        .collect()
}

/// `name=value` pairs, as the daemon logs them.
pub fn line(stats: &[(Stat, u64)]) -> String {
    pairs(stats.iter().map(|(s, v)| (s.name(), *v)))
}

/// `name=value name=value ...`: every counter line the daemon and
/// `spamdelay status` print.
pub fn pairs<'a>(counters: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    counters
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    pub iface: String,
    pub mode: String,
}

/// What the running daemon reports about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub started: u64,
    pub updated: u64,
    /// False once the daemon has stopped cleanly.
    pub running: bool,
    pub attached: Vec<Attachment>,
    pub ports: Vec<u16>,
    pub dry_run: bool,
    pub counters: BTreeMap<String, u64>,
    /// The kernel id of the bridge block's map, for `spamdelay unban`.
    #[serde(default)]
    pub bridge_map_id: Option<u32>,
    /// Where the kernel state is pinned (`run --pin-dir`), if it is.
    #[serde(default)]
    pub pin_dir: Option<std::path::PathBuf>,
    /// The daemon's own counters: bans, set_full, aggregated, apply_errors.
    #[serde(default)]
    pub daemon_counters: BTreeMap<String, u64>,
    /// The JSON event log (`run --event-log`), for `spamdelay ban|unban`.
    #[serde(default)]
    pub event_log: Option<std::path::PathBuf>,
    /// The CrowdSec link (`run --crowdsec-lapi`), if on.
    #[serde(default)]
    pub fleet: Option<crate::fleet::FleetStatus>,
}

impl Status {
    pub fn set_counters(&mut self, stats: &[(Stat, u64)]) {
        self.counters = stats
            .iter()
            .map(|(s, v)| (s.name().to_string(), *v))
            .collect();
    }

    /// Whether the process that wrote this is still there.
    pub fn alive(&self) -> bool {
        self.running && Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATUS_FILE);
        let tmp = dir.join(format!("{STATUS_FILE}.tmp"));
        let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(())
    }

    pub fn read(dir: &Path) -> Result<Option<Status>> {
        let path = dir.join(STATUS_FILE);
        match fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}
