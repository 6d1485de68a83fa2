//! The kernel program's maps and read-only configuration.

use aya_ebpf::{
    helpers::bpf_jiffies64,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use spamdelay_common::{
    ClientAddr, Flow, FlowKey, MAX_PORTS, Stat,
    flow::{BRIDGE_MAX, HalfOpen, PASSERS_MAX, PROBES_MAX, ProbeKey, SynData},
    stats::STAT_COUNT,
};

/// Watched server ports, host byte order; unused slots repeat a used one.
/// Set by the loader (`EbpfLoader::set_global`), 16 bytes as the loader's
/// `[u16; MAX_PORTS]`; aligned to 8, so `watched` reads them four at a time.
#[unsafe(no_mangle)]
pub static PORTS: Ports = Ports([25; MAX_PORTS]);

#[repr(C, align(8))]
pub struct Ports(pub [u16; MAX_PORTS]);

const _: () = assert!(MAX_PORTS == 8 && core::mem::size_of::<Ports>() == 16);

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

/// When (`bpf_jiffies64`) a client's SYN last carried data: until
/// `SYN_DATA_WINDOW` jiffies later a SYN-ACK looks for its bytes in
/// `SYN_DATA`, after that it need not. Most servers never see one. Not
/// pinned: after a restart it starts empty, which misses only a SYN-ACK
/// answering a data SYN the previous program saw (the server answers a
/// SYN as it takes it, so that is a restart between the two).
#[map]
pub static SYN_DATA_SEEN: Array<u64> = Array::with_max_entries(1, 0);

/// Far longer than any SYN-ACK comes after its SYN (retransmissions
/// included), whatever the kernel's HZ: 2^22 jiffies is over an hour.
const SYN_DATA_WINDOW: u64 = 1 << 22;

/// A data-carrying SYN was seen.
#[inline(always)]
pub fn syn_data_seen() {
    stamp(SYN_DATA_SEEN.get_ptr_mut(0));
}

/// May `SYN_DATA` hold the bytes of a SYN this SYN-ACK answers? A read of
/// one array slot (and jiffies, inlined by the verifier) instead of a hash
/// lookup on every SYN-ACK.
#[inline(always)]
pub fn syn_data_recent() -> bool {
    stamped_within(SYN_DATA_SEEN.get_ptr(0), SYN_DATA_WINDOW)
}

/// A gate word: `at` (a map slot) takes the time now, in jiffies, saying
/// that something went where a lookup would otherwise be skipped.
#[inline(always)]
pub fn stamp(at: Option<*mut u64>) {
    if let Some(p) = at {
        unsafe { core::ptr::write_volatile(p, bpf_jiffies64()) };
    }
}

/// Was the gate word at `at` stamped less than `window` jiffies ago? Never
/// stamped: no. No word at all: yes, look.
#[inline(always)]
pub fn stamped_within(at: Option<*const u64>, window: u64) -> bool {
    let Some(p) = at else {
        return true;
    };
    let seen = unsafe { core::ptr::read_volatile(p) };
    seen != 0 && unsafe { bpf_jiffies64() }.wrapping_sub(seen) < window
}

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
    // Four slots per 64-bit word (little-endian: slot i in bits 16i..):
    // one of them is `port` when the word XOR `port` in every slot has a
    // zero slot, which the carry trick below finds without a branch each.
    const ONES: u64 = 0x0001_0001_0001_0001;
    const HIGHS: u64 = 0x8000_8000_8000_8000;
    let words = PORTS.0.as_ptr() as *const u64;
    let wanted = port as u64 * ONES;
    let zero_slot = |i: usize| {
        let x = unsafe { core::ptr::read_volatile(words.add(i)) } ^ wanted;
        x.wrapping_sub(ONES) & !x & HIGHS != 0
    };
    zero_slot(0) || zero_slot(1)
}
