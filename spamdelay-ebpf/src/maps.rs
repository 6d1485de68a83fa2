//! The kernel program's maps and read-only configuration.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use spamdelay_common::{
    ClientAddr, Flow, FlowKey, MAX_PORTS, Stat,
    flow::{BRIDGE_MAX, HalfOpen, PASSERS_MAX, PROBES_MAX, ProbeKey, SynData},
    stats::STAT_COUNT,
};

/// Watched server ports, host byte order; unused slots repeat a used one.
/// Set by the loader (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
pub static PORTS: [u16; MAX_PORTS] = [25; MAX_PORTS];

/// To whom the MTA advertises PIPECONNECT (`PIPECONNECT_*`): they may talk
/// ahead of the banner if they passed before. Set by the loader.
#[unsafe(no_mangle)]
pub static PIPECONNECT: u8 = 0;

/// How long a pass counts for PIPECONNECT (`--pass-ttl`), in ns.
#[unsafe(no_mangle)]
pub static PASS_TTL_NS: u64 = 86_400_000_000_000;

/// How long a flagged early talker's new SYNs are dropped here (the bridge
/// block, `--bridge-time`), in ns; 0 = off (always in a dry run).
#[unsafe(no_mangle)]
pub static BRIDGE_NS: u64 = 0;

#[inline(always)]
pub fn bridge_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&BRIDGE_NS) }
}

#[inline(always)]
pub fn pipeconnect_mode() -> u8 {
    unsafe { core::ptr::read_volatile(&PIPECONNECT) }
}

#[inline(always)]
pub fn pass_ttl_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&PASS_TTL_NS) }
}

/// Verified flows, from the client's handshake-completing ACK to their close.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65536, 0);

/// Handshakes in progress, from the server's SYN-ACK to the client's ACK.
/// Apart from `FLOWS`, so forged SYNs only ever evict each other.
#[map]
pub static HALF_OPEN: LruHashMap<FlowKey, HalfOpen> = LruHashMap::with_max_entries(65536, 0);

/// Client SYNs that carried data (TCP Fast Open), until their SYN-ACK.
#[map]
pub static SYN_DATA: LruHashMap<FlowKey, SynData> = LruHashMap::with_max_entries(4096, 0);

/// Clients that waited for a greeting here: the CLOCK_BOOTTIME ns at which
/// their pass expires. Fed by PASS verdicts here, restored by the daemon.
#[map]
pub static PASSERS: LruHashMap<ClientAddr, u64> = LruHashMap::with_max_entries(PASSERS_MAX, 0);

/// Early talkers flagged here: the CLOCK_BOOTTIME ns until which their new
/// SYNs are dropped, bridging the moment until their nft ban is in place.
/// Fed by EARLY-TALK verdicts; `spamdelay unban` deletes entries.
#[map]
pub static BRIDGE: LruHashMap<ClientAddr, u64> = LruHashMap::with_max_entries(BRIDGE_MAX, 0);

/// Benign probes (value unused): early talk that is exactly one of these is
/// a PROBE, never an offence.
#[map]
pub static PROBES: HashMap<ProbeKey, u8> = HashMap::with_max_entries(PROBES_MAX, 0);

/// An IPv4 datagram being fragmented: addresses and identification.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: u16,
    pub _pad: [u8; 2],
}

/// A tiny first fragment (ports and seq only) on a flow awaiting its
/// greeting, until the fragment with its ack and flags arrives.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TinyFirst {
    pub key: FlowKey,
    pub seq: u32,
    pub _pad: u32,
}

/// The ack and flags of a segment whose tiny first fragment has not come.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TailPart {
    pub ack: u32,
    pub flags: u8,
    pub _pad: [u8; 3],
}

#[map]
pub static TINY_FIRSTS: LruHashMap<FragKey, TinyFirst> = LruHashMap::with_max_entries(1024, 0);
#[map]
pub static TCP_TAILS: LruHashMap<FragKey, TailPart> = LruHashMap::with_max_entries(1024, 0);

/// With `PIPECONNECT_LISTED`: the MTA's host list, 1 where it advertises
/// PIPECONNECT and 0 where the list excludes (`!`) a network.
#[map]
pub static PIPE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(1024, 1);
#[map]
pub static PIPE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, 1);

/// Clients never followed (CIDR), value unused.
#[map]
pub static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(4096, 1); // BPF_F_NO_PREALLOC
#[map]
pub static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(4096, 1);

/// Verdict events for the daemon.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Counters, indexed by `Stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        unsafe { *p += 1 };
    }
}

/// Is `port` (host order) one of the watched server ports?
#[inline(always)]
pub fn watched(port: u16) -> bool {
    // Volatile: the loader rewrites PORTS, so the compiler must not fold it.
    // One slot at a time: a match stops early, and nothing is kept aside.
    let ports = PORTS.as_ptr();
    (0..MAX_PORTS).any(|i| unsafe { core::ptr::read_volatile(ports.add(i)) } == port)
}
