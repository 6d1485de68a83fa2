//! Loading the kernel object, attaching it to interfaces (TCX where the kernel
//! has it, clsact otherwise) and filling its configuration and allowlist maps.

use std::{fmt, net::IpAddr, path::Path};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, tc,
        tc::{NlOptions, TcAttachOptions},
    },
};
use spamdelay_common::{MAX_PORTS, Stat};

use crate::allow::Cidr;

/// The kernel object from `cargo xtask build-ebpf`, embedded by build.rs.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spamdelay.bpf.o"));

pub const INGRESS: &str = "spamdelay_ingress";
pub const EGRESS: &str = "spamdelay_egress";

/// How a program is hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// fd-based tc links (Linux >= 6.6): detached when the daemon exits.
    Tcx,
    /// A filter on the clsact qdisc (older kernels).
    Clsact,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        })
    }
}

/// What the kernel program is loaded with.
#[derive(Clone, Debug)]
pub struct KernelConfig {
    pub ports: Vec<u16>,
    pub max_flows: u32,
    /// The MTA advertises PIPECONNECT: one early `EHLO` line is allowed.
    pub pipeconnect: bool,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            ports: vec![25],
            max_flows: 65536,
            pipeconnect: false,
        }
    }
}

/// Loads the object configured by `config`; the programs are loaded
/// (verified) but not attached.
pub fn load(config: &KernelConfig) -> Result<Ebpf> {
    let ports = &config.ports;
    let max_flows = config.max_flows;
    check_ports(ports)?;
    let first = ports.first().copied().unwrap_or(25);
    // Unused slots repeat the first port, so they can never match anything else.
    let mut slots = [first; MAX_PORTS];
    slots[..ports.len()].copy_from_slice(ports);
    let mut ebpf = EbpfLoader::new()
        .override_global("PORTS", &slots, true)
        .override_global("PIPECONNECT", &u8::from(config.pipeconnect), true)
        .map_max_entries("FLOWS", max_flows)
        .load(OBJECT)
        .map_err(|e| {
            anyhow!(
                "loading the eBPF object: {e}: spamdelay needs Linux >= 5.8 with BPF ring buffers"
            )
        })?;
    for name in [INGRESS, EGRESS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the kernel object has no program {name}: rebuild it with `cargo xtask build-ebpf`"))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("the kernel refused program {name}: {}", describe(&e)))?;
    }
    Ok(ebpf)
}

/// Between one and `MAX_PORTS` ports.
pub fn check_ports(ports: &[u16]) -> Result<()> {
    if ports.is_empty() {
        bail!("no port to watch: give at least one --port");
    }
    if ports.len() > MAX_PORTS {
        bail!(
            "{} ports given, at most {MAX_PORTS} can be watched: drop some --port values",
            ports.len()
        );
    }
    Ok(())
}

/// Checks that `iface` exists and carries Ethernet frames (the classifier's
/// parser starts at an Ethernet header; loopback has one too).
pub fn check_interface(iface: &str) -> Result<()> {
    let sys = Path::new("/sys/class/net").join(iface);
    if nix::net::if_::if_nametoindex(iface).is_err() {
        bail!("unknown interface '{iface}': `ip link` lists this host's interfaces");
    }
    if let Ok(kind) = std::fs::read_to_string(sys.join("type")) {
        let kind = kind.trim();
        // ARPHRD_ETHER and ARPHRD_LOOPBACK.
        if kind != "1" && kind != "772" {
            bail!(
                "interface '{iface}' has no Ethernet header (link type {kind}): spamdelay attaches to Ethernet interfaces; pick the one the SMTP traffic arrives on"
            );
        }
    }
    Ok(())
}

/// Attaches ingress and egress programs to `iface`.
pub fn attach(ebpf: &mut Ebpf, iface: &str) -> Result<AttachMode> {
    let mut mode = AttachMode::Tcx;
    for (name, hook) in [
        (INGRESS, TcAttachType::Ingress),
        (EGRESS, TcAttachType::Egress),
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the kernel object has no program {name}"))?
            .try_into()?;
        let tcx =
            prog.attach_with_options(iface, hook, TcAttachOptions::TcxOrder(LinkOrder::default()));
        if tcx.is_ok() {
            continue;
        }
        // No TCX (Linux < 6.6): a classic clsact filter.
        mode = AttachMode::Clsact;
        // Already there (EEXIST) is fine; a real failure shows in the attach below.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            log::debug!("adding clsact to {iface}: {e}");
        }
        prog.attach_with_options(iface, hook, TcAttachOptions::Netlink(NlOptions::default()))
            .map_err(|e| {
                anyhow!(
                    "attaching {name} to {iface}: {}: the kernel needs tc BPF support (TCX, Linux >= 6.6, or the clsact qdisc)",
                    describe(&e)
                )
            })?;
    }
    Ok(mode)
}

/// Writes the allowlist into the kernel's LPM tries.
pub fn fill_allowlist(ebpf: &mut Ebpf, cidrs: &[Cidr]) -> Result<()> {
    let v4 = cidrs.iter().filter_map(|c| match c.addr() {
        IpAddr::V4(a) => Some((c, a.octets())),
        IpAddr::V6(_) => None,
    });
    insert_prefixes(ebpf, "ALLOW_V4", v4)?;
    let v6 = cidrs.iter().filter_map(|c| match c.addr() {
        IpAddr::V6(a) => Some((c, a.octets())),
        IpAddr::V4(_) => None,
    });
    insert_prefixes(ebpf, "ALLOW_V6", v6)
}

fn insert_prefixes<'c, const N: usize>(
    ebpf: &mut Ebpf,
    map: &str,
    entries: impl Iterator<Item = (&'c Cidr, [u8; N])>,
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, [u8; N], u8> = LpmTrie::try_from(
        ebpf.map_mut(map)
            .with_context(|| format!("map {map} missing"))?,
    )?;
    for (cidr, addr) in entries {
        trie.insert(&Key::new(cidr.prefix_len().into(), addr), 1, 0)
            .with_context(|| format!("adding {cidr} to the allowlist"))?;
    }
    Ok(())
}

/// Takes the verdict ring buffer out of the object.
pub fn take_events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>> {
    let map = ebpf.take_map("EVENTS").context("map EVENTS missing")?;
    Ok(RingBuf::try_from(map)?)
}

/// The kernel's counters, summed over CPUs, in `Stat` order.
pub fn read_stats(ebpf: &Ebpf) -> Result<Vec<(Stat, u64)>> {
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map("STATS").context("map STATS missing")?)?;
    crate::metrics::sum(&stats)
}

/// Takes the counters out of the object, for a task of their own.
pub fn take_stats(ebpf: &mut Ebpf) -> Result<PerCpuArray<MapData, u64>> {
    let map = ebpf.take_map("STATS").context("map STATS missing")?;
    Ok(PerCpuArray::try_from(map)?)
}

/// The error and its causes on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
