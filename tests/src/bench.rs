//! Measuring instruments for `cargo xtask bench`: the kernel's per-program
//! run statistics, the empty baseline classifier, a process's cost from
//! /proc, background helpers (iperf3, smtp-sink), and summaries.

use std::{
    fs,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};

use crate::lab::Netns;

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled = 1` while it lives: the kernel then counts
/// each program's runs and run time (two clock reads per run, on every
/// program of the host). The previous value comes back on drop, also when
/// the benchmark fails or unwinds.
pub struct BpfStats {
    previous: String,
}

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let previous = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        fs::write(BPF_STATS, "1").with_context(|| format!("writing 1 to {BPF_STATS}"))?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS, &self.previous) {
            eprintln!(
                "restoring kernel.bpf_stats_enabled = {}: {e} (set it by hand: sysctl kernel.bpf_stats_enabled={})",
                self.previous, self.previous
            );
        }
    }
}

/// Runs and run time of programs, as the kernel counts them with
/// `bpf_stats_enabled`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub run_time_ns: u64,
    pub runs: u64,
}

impl RunStats {
    /// Average nanoseconds per run (per packet, for a tc program).
    pub fn ns_per_run(&self) -> f64 {
        if self.runs == 0 {
            return f64::NAN;
        }
        self.run_time_ns as f64 / self.runs as f64
    }

    pub fn since(&self, earlier: &RunStats) -> RunStats {
        RunStats {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            runs: self.runs.saturating_sub(earlier.runs),
        }
    }
}

/// A program attached with TCX, and what the kernel counted of it.
#[derive(Clone, Debug)]
pub struct Attached {
    /// As the kernel keeps it: cut to 15 bytes (`spamdelay_ingre`).
    pub name: String,
    /// `ingress` or `egress`.
    pub hook: &'static str,
    pub stats: RunStats,
}

/// The programs attached with TCX to `iface`'s ingress and egress in `ns`.
/// Found through the interface, so programs of other spamdelay instances on
/// the host never mix in.
pub fn tcx_programs(ns: &Netns, iface: &str) -> Result<Vec<Attached>> {
    let iface = iface.to_string();
    ns.run(move || -> Result<Vec<Attached>> {
        let mut found = Vec::new();
        for (hook, name) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            let (_, progs) = SchedClassifier::query_tcx(&iface, hook)
                .with_context(|| format!("querying the TCX programs on {iface}"))?;
            found.extend(progs.into_iter().map(|p| Attached {
                name: p.name_as_str().unwrap_or("?").to_string(),
                hook: name,
                stats: RunStats {
                    run_time_ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                    runs: p.run_count(),
                },
            }));
        }
        Ok(found)
    })?
}

/// The run statistics of `programs` summed, optionally of one hook only.
pub fn total(programs: &[Attached], hook: Option<&str>) -> RunStats {
    programs
        .iter()
        .filter(|p| hook.is_none_or(|h| p.hook == h))
        .fold(RunStats::default(), |sum, p| RunStats {
            run_time_ns: sum.run_time_ns + p.stats.run_time_ns,
            runs: sum.runs + p.stats.runs,
        })
}

/// The kernel object's name for the baseline program (`spamdelay-ebpf`).
pub const EMPTY_PROGRAM: &str = "spamdelay_empty";

/// How a program is hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A TCX link, appended after whatever is attached already.
    Tcx,
    /// A legacy filter on the clsact qdisc (`tc filter ... bpf`), which
    /// runs after every TCX program has said TCX_NEXT.
    Clsact,
}

/// The empty classifier (`TC_ACT_UNSPEC` and nothing else) attached to an
/// interface's ingress and egress: with TCX, as `spamdelay::loader::attach`
/// attaches spamdelay's own, it is the baseline that tells the cost of
/// spamdelay's code from the cost of running any program at all; attached
/// after spamdelay, it is the other program that must keep running.
/// Detached on drop.
pub struct EmptyClassifier {
    ebpf: Ebpf,
}

impl EmptyClassifier {
    pub fn attach(ns: &Netns, iface: &str) -> Result<EmptyClassifier> {
        Self::attach_as(ns, iface, Hook::Tcx)
    }

    pub fn attach_as(ns: &Netns, iface: &str, how: Hook) -> Result<EmptyClassifier> {
        let iface = iface.to_string();
        // The same embedded object the daemon loads; its maps come along
        // unused.
        let ebpf = spamdelay::loader::load(&Default::default())?;
        let ebpf = ns.run(move || -> Result<Ebpf> {
            let mut ebpf = ebpf;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(EMPTY_PROGRAM)
                .ok_or_else(|| {
                    anyhow!(
                        "the kernel object has no program {EMPTY_PROGRAM}: rebuild it with `cargo xtask build-ebpf`"
                    )
                })?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading {EMPTY_PROGRAM}"))?;
            if how == Hook::Clsact {
                // Already there (EEXIST) is fine; a real failure shows below.
                let _ = aya::programs::tc::qdisc_add_clsact(&iface);
            }
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                let options = match how {
                    Hook::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
                    Hook::Clsact => {
                        TcAttachOptions::Netlink(aya::programs::tc::NlOptions::default())
                    }
                };
                prog.attach_with_options(&iface, hook, options)
                    .with_context(|| format!("attaching {EMPTY_PROGRAM} to {iface} ({how:?})"))?;
            }
            Ok(ebpf)
        })??;
        Ok(EmptyClassifier { ebpf })
    }

    /// How often the kernel has run it (counted while `BpfStats` lives).
    pub fn runs(&self) -> Result<u64> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(EMPTY_PROGRAM)
            .ok_or_else(|| anyhow!("no program {EMPTY_PROGRAM}"))?
            .try_into()?;
        Ok(prog.info()?.run_count())
    }
}

/// What a process has cost so far, from /proc/PID/status and stat.
#[derive(Clone, Copy, Debug)]
pub struct ProcCost {
    /// Peak resident set size (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// Its own CPU time, user + system, seconds.
    pub cpu_s: f64,
    /// CPU time of its children it has waited for (the daemon's `nft`
    /// runs), seconds.
    pub children_cpu_s: f64,
}

pub fn proc_cost(pid: u32) -> Result<ProcCost> {
    let status_path = format!("/proc/{pid}/status");
    let status =
        fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmHWM in {status_path}"))?;
    let stat_path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
    // The command name (field 2) may hold spaces and parentheses: count the
    // fields from after its closing parenthesis, where field 3 starts.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> Result<f64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .with_context(|| format!("field {n} of {stat_path}"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    let ticks = ticks as f64;
    Ok(ProcCost {
        peak_rss_kib,
        cpu_s: (field(14)? + field(15)?) / ticks,
        children_cpu_s: (field(16)? + field(17)?) / ticks,
    })
}

/// A helper program running in the background (a server), killed on drop.
pub struct Background {
    child: Child,
    what: String,
}

impl Background {
    /// Starts `program ARGS` in `ns`, its output discarded.
    pub fn start(ns: &Netns, program: &str, args: &[&str]) -> Result<Background> {
        let child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut bg = Background {
            child,
            what: format!("{program} {}", args.join(" ")),
        };
        // Servers here bind at once; one that fails does so at once too.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = bg.child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = bg.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("{} exited at once ({status}): {}", bg.what, err.trim());
        }
        Ok(bg)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Minimum, median and maximum of some values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// None for no values (NaNs are left out).
    pub fn of(values: &[f64]) -> Option<Spread> {
        let sorted = sorted(values);
        Some(Spread {
            min: *sorted.first()?,
            median: percentile(&sorted, 50.0),
            max: *sorted.last()?,
        })
    }
}

/// `values` without NaNs, in ascending order.
pub fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The `p`th percentile (0..=100) of ascending `sorted` values, by linear
/// interpolation between the closest ranks; NaN for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = sorted(&[4.0, 1.0, 3.0, 2.0, f64::NAN]);
        assert_eq!(v, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(
            Spread::of(&[3.0, 1.0, 2.0]),
            Some(Spread {
                min: 1.0,
                median: 2.0,
                max: 3.0
            })
        );
        assert_eq!(Spread::of(&[]), None);
    }
}
