//! Loading the kernel object, attaching it to interfaces (TCX where the kernel
//! has it, clsact otherwise) and filling its configuration and allowlist maps.

use std::{fmt, net::IpAddr, path::Path, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, tc,
        tc::{NlOptions, TcAttachOptions},
    },
};
use spamdelay_common::{
    ClientAddr, FAMILY_V4, FAMILY_V6, MAX_PORTS, PAYLOAD_CAPTURE, Stat,
    flow::{PIPECONNECT_ALL, PIPECONNECT_LISTED, PIPECONNECT_OFF, ProbeKey},
};

use crate::{allow::Cidr, mta::Pipeconnect};

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
    /// Verified flows followed at once, and handshakes in progress.
    pub max_flows: u32,
    /// To whom the MTA advertises PIPECONNECT: those who passed before may
    /// talk ahead of the banner.
    pub pipeconnect: Pipeconnect,
    /// How long a pass counts for that.
    pub pass_ttl: Duration,
    /// Benign probes: early talk that is exactly one of these is a PROBE.
    pub probes: Vec<Vec<u8>>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            ports: vec![25],
            max_flows: 65536,
            pipeconnect: Pipeconnect::Off,
            pass_ttl: Duration::from_secs(86400),
            probes: Vec::new(),
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
    let mode = match config.pipeconnect {
        Pipeconnect::Off => PIPECONNECT_OFF,
        Pipeconnect::All => PIPECONNECT_ALL,
        Pipeconnect::Hosts(_) => PIPECONNECT_LISTED,
    };
    let ttl_ns = u64::try_from(config.pass_ttl.as_nanos()).unwrap_or(u64::MAX);
    let mut ebpf = EbpfLoader::new()
        .override_global("PORTS", &slots, true)
        .override_global("PIPECONNECT", &mode, true)
        .override_global("PASS_TTL_NS", &ttl_ns, true)
        .map_max_entries("FLOWS", max_flows)
        .map_max_entries("HALF_OPEN", max_flows)
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
    if let Pipeconnect::Hosts(nets) = &config.pipeconnect {
        fill_tries(
            &mut ebpf,
            ("PIPE_V4", "PIPE_V6"),
            nets,
            "the PIPECONNECT hosts",
        )?;
    }
    fill_probes(&mut ebpf, &config.probes)?;
    Ok(ebpf)
}

/// Writes the benign probes into the kernel's `PROBES` map.
fn fill_probes(ebpf: &mut Ebpf, probes: &[Vec<u8>]) -> Result<()> {
    let mut map: HashMap<&mut MapData, ProbeKey, u8> =
        HashMap::try_from(ebpf.map_mut("PROBES").context("map PROBES missing")?)?;
    for probe in probes {
        let mut key = ProbeKey {
            len: probe.len() as u32,
            bytes: [0; PAYLOAD_CAPTURE],
        };
        key.bytes
            .get_mut(..probe.len())
            .with_context(|| format!("a benign probe is at most {PAYLOAD_CAPTURE} bytes"))?
            .copy_from_slice(probe);
        map.insert(key, 1, 0).context("adding a benign probe")?;
    }
    Ok(())
}

/// The kernel's key for a client address.
pub fn client_addr(ip: IpAddr) -> ClientAddr {
    let (addr, family) = match ip {
        IpAddr::V4(a) => {
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&a.octets());
            (raw, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    };
    ClientAddr {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// Gives the kernel back the clients that passed before a restart, each
/// with the CLOCK_BOOTTIME ns its pass expires at. Returns how many.
pub fn restore_passers(
    ebpf: &mut Ebpf,
    passers: impl Iterator<Item = (IpAddr, u64)>,
) -> Result<usize> {
    // aya's HashMap handles LRU hash maps too.
    let mut map: HashMap<&mut MapData, ClientAddr, u64> =
        HashMap::try_from(ebpf.map_mut("PASSERS").context("map PASSERS missing")?)?;
    let mut n = 0;
    for (ip, expires) in passers {
        map.insert(client_addr(ip), expires, 0)
            .with_context(|| format!("restoring the pass of {ip}"))?;
        n += 1;
    }
    Ok(n)
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
    let on: Vec<(Cidr, bool)> = cidrs.iter().map(|c| (*c, true)).collect();
    fill_tries(ebpf, ("ALLOW_V4", "ALLOW_V6"), &on, "the allowlist")
}

/// Writes networks into a pair of LPM tries (IPv4, IPv6), each with the
/// value 1 (in) or 0 (excluded).
fn fill_tries(
    ebpf: &mut Ebpf,
    (v4, v6): (&str, &str),
    nets: &[(Cidr, bool)],
    what: &str,
) -> Result<()> {
    let four = nets.iter().filter_map(|(c, on)| match c.addr() {
        IpAddr::V4(a) => Some((c, *on, a.octets())),
        IpAddr::V6(_) => None,
    });
    insert_prefixes(ebpf, v4, four, what)?;
    let six = nets.iter().filter_map(|(c, on)| match c.addr() {
        IpAddr::V6(a) => Some((c, *on, a.octets())),
        IpAddr::V4(_) => None,
    });
    insert_prefixes(ebpf, v6, six, what)
}

fn insert_prefixes<'c, const N: usize>(
    ebpf: &mut Ebpf,
    map: &str,
    entries: impl Iterator<Item = (&'c Cidr, bool, [u8; N])>,
    what: &str,
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, [u8; N], u8> = LpmTrie::try_from(
        ebpf.map_mut(map)
            .with_context(|| format!("map {map} missing"))?,
    )?;
    for (cidr, on, addr) in entries {
        trie.insert(&Key::new(cidr.prefix_len().into(), addr), u8::from(on), 0)
            .with_context(|| format!("adding {cidr} to {what}"))?;
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
