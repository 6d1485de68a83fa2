//! Loading the kernel object, attaching it to interfaces (TCX where the kernel
//! has it, clsact otherwise) and filling its configuration and allowlist maps.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions},
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
/// The bridge block's map.
pub const BRIDGE: &str = "BRIDGE";

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
    /// How long an early talker's new SYNs are dropped in the kernel from
    /// its verdict on (the bridge block); zero: never (a dry run).
    pub bridge_time: Duration,
    /// Where the kernel state is pinned (bpffs), to outlive the daemon.
    pub pin_dir: Option<PathBuf>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            ports: vec![25],
            max_flows: 65536,
            pipeconnect: Pipeconnect::Off,
            pass_ttl: Duration::from_secs(86400),
            probes: Vec::new(),
            bridge_time: Duration::ZERO,
            pin_dir: None,
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
    let bridge_ns = u64::try_from(config.bridge_time.as_nanos()).unwrap_or(u64::MAX);
    let object = |pins: Option<&Path>| {
        let mut loader = EbpfLoader::new();
        loader
            .override_global("PORTS", &slots, true)
            .override_global("BRIDGE_NS", &bridge_ns, true)
            .override_global("PIPECONNECT", &mode, true)
            .override_global("PASS_TTL_NS", &ttl_ns, true)
            .map_max_entries("FLOWS", max_flows)
            .map_max_entries("HALF_OPEN", max_flows);
        if let Some(dir) = pins {
            for name in STATE_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        loader.load(OBJECT).map_err(|e| {
            anyhow!(
                "loading the eBPF object: {e}: spamdelay needs Linux >= 5.8 with BPF ring buffers"
            )
        })
    };
    let mut ebpf = match &config.pin_dir {
        Some(dir) => {
            ensure_bpffs(dir)?;
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "creating the pin directory {} (bpffs refuses names with a dot)",
                    dir.display()
                )
            })?;
            // aya reuses a pinned map as it is: one whose definition changed
            // (--max-flows, a new version) must go first. The maps of an
            // unpinned load (programs not loaded yet) are the reference.
            drop_stale_pins(&object(None)?, dir)?;
            object(Some(dir))?
        }
        None => object(None)?,
    };
    for (name, _) in HOOKS {
        let prog = classifier(&mut ebpf, name)?;
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

/// The kernel id of the bridge block's map, for `spamdelay unban` (another
/// process) to find it through the status file.
pub fn bridge_map_id(ebpf: &Ebpf) -> Result<u32> {
    let map = ebpf.map(BRIDGE).context("map BRIDGE missing")?;
    let data: &MapData = match map {
        aya::maps::Map::LruHashMap(m) => m,
        _ => bail!("map BRIDGE is not an LRU hash"),
    };
    Ok(data.info()?.id())
}

/// The bridge block's map: the running daemon's (by kernel id), or the one
/// pinned in a pin directory (which works while no daemon runs).
pub enum BridgeMap<'a> {
    Id(u32),
    Pinned(&'a Path),
}

/// Lifts the bridge block of every client inside `cidr`; returns the
/// addresses lifted.
pub fn unbridge(which: BridgeMap<'_>, cidr: &Cidr) -> Result<Vec<IpAddr>> {
    let data = match which {
        BridgeMap::Id(id) => {
            MapData::from_id(id).with_context(|| format!("opening map id {id}"))?
        }
        BridgeMap::Pinned(dir) => {
            let pin = dir.join(BRIDGE);
            MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?
        }
    };
    let name = data.info()?.name_as_str().map(str::to_owned);
    if name.as_deref() != Some(BRIDGE) {
        bail!("map {name:?} is not spamdelay's {BRIDGE}: the daemon is gone");
    }
    let mut map: HashMap<MapData, ClientAddr, u64> =
        HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
    let now = crate::clock::boot_ns();
    let inside: Vec<(ClientAddr, IpAddr, u64)> = map
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(k, until)| Some((k, client_ip(&k)?, until)))
        .filter(|(_, ip, _)| cidr.contains(ip))
        .collect();
    let mut lifted = Vec::new();
    for (key, ip, until) in inside {
        // Gone meanwhile (expired and deleted by the kernel): nothing to
        // lift; expired ones go without a word.
        if map.remove(&key).is_ok() && until > now {
            lifted.push(ip);
        }
    }
    Ok(lifted)
}

/// The address in a kernel client key.
fn client_ip(key: &ClientAddr) -> Option<IpAddr> {
    match key.family {
        FAMILY_V4 => Some(IpAddr::from([
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ])),
        FAMILY_V6 => Some(IpAddr::from(key.addr)),
        _ => None,
    }
}

/// Kernel state pinned with `--pin-dir`, so that detection outlives the
/// daemon: flows being followed, passes, the bridge block, the verdicts not
/// yet read and the counters. Configuration maps (allowlist, probes,
/// PIPECONNECT hosts) are not: each program gets its own, filled at start.
pub const STATE_MAPS: [&str; 10] = [
    "FLOWS",
    "HALF_OPEN",
    "HANDSHAKES",
    "SYN_DATA",
    "PASSERS",
    BRIDGE,
    "TINY_FIRSTS",
    "TCP_TAILS",
    "EVENTS",
    "STATS",
];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where systemd mounts the BPF filesystem.
const BPFFS: &str = "/sys/fs/bpf";

fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes one struct through the pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// The pin directory must be on a BPF filesystem; under /sys/fs/bpf one is
/// mounted there when missing, as systemd does.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
    if on_bpffs(existing) {
        return Ok(());
    }
    if dir.starts_with(BPFFS) && !on_bpffs(Path::new(BPFFS)) {
        let bpf = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: valid C strings; no data argument.
        let rc = unsafe {
            libc::mount(
                bpf.as_ptr(),
                target.as_ptr(),
                bpf.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting the BPF filesystem on {BPFFS}: {}: mount it (`mount -t bpf bpf {BPFFS}`) or give a --pin-dir on one",
                std::io::Error::last_os_error()
            );
        }
        log::info!("mounted the BPF filesystem on {BPFFS}");
        return Ok(());
    }
    bail!(
        "{} is not on a BPF filesystem: mount one (`mount -t bpf bpf DIR`) or give a --pin-dir under {BPFFS}",
        dir.display()
    )
}

/// The map behind a `Map`, for its definition.
fn map_data(map: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    match map {
        Map::LruHashMap(m)
        | Map::HashMap(m)
        | Map::Array(m)
        | Map::RingBuf(m)
        | Map::PerCpuArray(m) => Some(m),
        _ => None,
    }
}

/// Removes, with a warning, every pinned state map whose definition differs
/// from `fresh`'s: it starts afresh.
fn drop_stale_pins(fresh: &Ebpf, dir: &Path) -> Result<()> {
    for name in STATE_MAPS {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let want = fresh
            .map(name)
            .and_then(map_data)
            .with_context(|| format!("map {name} missing"))?
            .info()?;
        let same = aya::maps::MapInfo::from_pin(&pin).is_ok_and(|have| {
            have.map_type().ok() == want.map_type().ok()
                && have.key_size() == want.key_size()
                && have.value_size() == want.value_size()
                && have.max_entries() == want.max_entries()
                && have.map_flags() == want.map_flags()
        });
        if !same {
            log::warn!(
                "pinned map {} no longer matches its definition (--max-flows, or a new version): it starts afresh",
                pin.display()
            );
            std::fs::remove_file(&pin)
                .with_context(|| format!("removing the stale pin {}", pin.display()))?;
        }
    }
    Ok(())
}

fn link_pin(dir: &Path, iface: &str, hook: TcAttachType) -> PathBuf {
    let tag = if hook == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    };
    // bpffs refuses names with a dot (EPERM); interface names never hold a
    // colon, so the mapping is one to one (`eth0.100` is `eth0:100`).
    dir.join(format!("link-{}-{tag}", iface.replace('.', ":")))
}

/// Each program and the hook it goes on.
const HOOKS: [(&str, TcAttachType); 2] = [
    (INGRESS, TcAttachType::Ingress),
    (EGRESS, TcAttachType::Egress),
];

/// One of the object's classifiers by name.
fn classifier<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| {
            anyhow!(
                "the kernel object has no program {name}: rebuild it with `cargo xtask build-ebpf`"
            )
        })?
        .try_into()?)
}

/// Attaches ingress and egress programs to `iface` with TCX links pinned in
/// `dir`, so they stay when the daemon exits. A link pinned by an earlier
/// run is adopted: its program is replaced atomically (BPF_LINK_UPDATE), so
/// not one packet goes unwatched. Returns whether it adopted.
pub fn attach_pinned(ebpf: &mut Ebpf, iface: &str, dir: &Path) -> Result<bool> {
    let mut adopted = false;
    for (name, hook) in HOOKS {
        let prog = classifier(ebpf, name)?;
        let pin = link_pin(dir, iface, hook);
        if pin.exists() {
            let replaced = PinnedLink::from_pin(&pin)
                .map_err(anyhow::Error::from)
                .and_then(|p| Ok(SchedClassifierLink::try_from(FdLink::from(p))?))
                .and_then(|link| Ok(prog.attach_to_link(link)?));
            match replaced {
                Ok(id) => {
                    // The pin holds the link; this fd may go.
                    drop(prog.take_link(id)?);
                    adopted = true;
                    continue;
                }
                Err(e) => {
                    // Its interface went away (and came back): a new link.
                    log::warn!(
                        "pinned link {} could not be adopted ({}): attaching afresh",
                        pin.display(),
                        describe(e.as_ref())
                    );
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                }
            }
        }
        let id = prog
            .attach_with_options(iface, hook, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(|e| {
                anyhow!(
                    "attaching {name} to {iface} with a TCX link: {}: pinning needs TCX (Linux >= 6.6)",
                    describe(&e)
                )
            })?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        link.pin(&pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
    }
    Ok(adopted)
}

/// Detaches, for good, the pinned links of interfaces no longer watched.
pub fn prune_links(dir: &Path, ifaces: &[String]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let keep: Vec<PathBuf> = ifaces
        .iter()
        .flat_map(|i| {
            [
                link_pin(dir, i, TcAttachType::Ingress),
                link_pin(dir, i, TcAttachType::Egress),
            ]
        })
        .collect();
    for entry in entries {
        let path = entry?.path();
        let is_link = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("link-"));
        if is_link && !keep.contains(&path) {
            log::info!("detaching {} (interface no longer watched)", path.display());
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// `spamdelay detach`: unpins everything in `dir` (links first, which
/// detaches the programs) and removes it. Returns what was removed.
pub fn detach(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    // Links first: the programs stop before their maps go.
    paths.sort_by_key(|p| {
        !p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("link-"))
    });
    let mut removed = Vec::new();
    for path in paths {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        if let Some(n) = path.file_name().and_then(|n| n.to_str()) {
            removed.push(n.to_string());
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(removed)
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
    for (name, hook) in HOOKS {
        let prog = classifier(ebpf, name)?;
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

/// Changes the allowlist in the kernel's tries in place (a reload): the new
/// networks go in first, then those no longer listed come out, so a client
/// allowed before and after is never followed in between.
pub fn replace_allowlist(ebpf: &mut Ebpf, old: &[Cidr], new: &[Cidr]) -> Result<()> {
    let old: Vec<(Cidr, bool)> = old.iter().map(|c| (*c, true)).collect();
    let new: Vec<(Cidr, bool)> = new.iter().map(|c| (*c, true)).collect();
    replace_tries(ebpf, ("ALLOW_V4", "ALLOW_V6"), &old, &new, "the allowlist")
}

/// Changes the PIPECONNECT hosts in place (a reload of an MTA that lists them).
pub fn replace_pipeconnect_hosts(
    ebpf: &mut Ebpf,
    old: &[(Cidr, bool)],
    new: &[(Cidr, bool)],
) -> Result<()> {
    replace_tries(
        ebpf,
        ("PIPE_V4", "PIPE_V6"),
        old,
        new,
        "the PIPECONNECT hosts",
    )
}

fn replace_tries(
    ebpf: &mut Ebpf,
    maps: (&str, &str),
    old: &[(Cidr, bool)],
    new: &[(Cidr, bool)],
    what: &str,
) -> Result<()> {
    fill_tries(ebpf, maps, new, what)?;
    for (cidr, _) in old.iter().filter(|(c, _)| !new.iter().any(|(n, _)| n == c)) {
        let result = match cidr.addr() {
            IpAddr::V4(a) => remove_prefix(ebpf, maps.0, cidr, a.octets()),
            IpAddr::V6(a) => remove_prefix(ebpf, maps.1, cidr, a.octets()),
        };
        result.with_context(|| format!("removing {cidr} from {what}"))?;
    }
    Ok(())
}

fn remove_prefix<const N: usize>(
    ebpf: &mut Ebpf,
    map: &str,
    cidr: &Cidr,
    addr: [u8; N],
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, [u8; N], u8> = LpmTrie::try_from(
        ebpf.map_mut(map)
            .with_context(|| format!("map {map} missing"))?,
    )?;
    match trie.remove(&Key::new(cidr.prefix_len().into(), addr)) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Changes the benign probes in place (a reload).
pub fn replace_probes(ebpf: &mut Ebpf, old: &[Vec<u8>], new: &[Vec<u8>]) -> Result<()> {
    fill_probes(ebpf, new)?;
    let mut map: HashMap<&mut MapData, ProbeKey, u8> =
        HashMap::try_from(ebpf.map_mut("PROBES").context("map PROBES missing")?)?;
    for probe in old.iter().filter(|p| !new.contains(p)) {
        let mut key = ProbeKey {
            len: probe.len() as u32,
            bytes: [0; PAYLOAD_CAPTURE],
        };
        let Some(bytes) = key.bytes.get_mut(..probe.len()) else {
            continue;
        };
        bytes.copy_from_slice(probe);
        match map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing a benign probe"),
        }
    }
    Ok(())
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
