//! The kernel program's maps and read-only configuration.

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use spamdelay_common::{Flow, FlowKey, MAX_PORTS, Stat, stats::STAT_COUNT};

/// Watched server ports, host byte order; unused slots repeat a used one.
/// Set by the loader (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
pub static PORTS: [u16; MAX_PORTS] = [25; MAX_PORTS];

/// Non-zero when the MTA advertises PIPECONNECT: one `EHLO` line ahead of
/// the greeting is then allowed. Set by the loader.
#[unsafe(no_mangle)]
pub static PIPECONNECT: u8 = 0;

#[inline(always)]
pub fn pipeconnect() -> bool {
    unsafe { core::ptr::read_volatile(&PIPECONNECT) != 0 }
}

/// Flows between the server's SYN-ACK and their close.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65536, 0);

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
    let ports = unsafe { core::ptr::read_volatile(&PORTS) };
    ports[0] == port
        || ports[1] == port
        || ports[2] == port
        || ports[3] == port
        || ports[4] == port
        || ports[5] == port
        || ports[6] == port
        || ports[7] == port
}
