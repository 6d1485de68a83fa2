//! Flows whose verdict is given: a direct-mapped cache of key fingerprints
//! in front of `FLOWS`, so that a decided flow's later segments (most of an
//! SMTP session's) leave after one array read instead of a hash lookup.
//!
//! Only a hint. A slot holds one flow; when another decided flow takes it,
//! the first one's segments go the old way again (`FLOWS`, where a decided
//! flow stays until its close), with the same outcome: nothing. The SYN-ACK
//! of a new connection under a key clears its slot, so the handshake it
//! starts is never taken for the old flow's. A hit needs the 63-bit
//! fingerprint of the whole key, made with a per-load random seed: no flow
//! can be made to pass for another. Each slot is one aligned 8-byte word,
//! written and read whole: two CPUs never tear it.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::Array};
use spamdelay_common::FlowKey;

const _: () =
    assert!(core::mem::size_of::<FlowKey>() == 40 && core::mem::align_of::<FlowKey>() == 8);

/// Slots, plus slot 0 for the seed: 16 KiB, which the kernel allocates
/// with kmalloc (up to 32 KiB), in its direct mapping. A larger array goes
/// to vmalloc's 4 KiB pages, where a random slot cost a TLB and cache miss
/// (about 250 ns measured, as much as the hash lookup it replaces). Many
/// more decided flows than slots only send some of them the old way.
const SLOT_BITS: u32 = 11;

#[map]
static DONE: Array<u64> = Array::with_max_entries((1 << SLOT_BITS) + 1, 0);

/// Set in a slot while the flow is still in `FLOWS` (it leaves at its close).
const IN_FLOWS: u64 = 1;

/// A decided flow, found in the cache.
pub struct Done {
    slot: *mut u64,
    fp: u64,
    pub in_flows: bool,
}

/// `key` as the five words the fingerprint is made of.
#[inline(always)]
fn words(key: &FlowKey) -> &[u64; 5] {
    // SAFETY: FlowKey is 40 bytes aligned to 8, every byte initialised
    // (explicit padding).
    unsafe { &*(key as *const FlowKey as *const [u64; 5]) }
}

/// One step of the fingerprint chain: a bijection of the state and of the
/// word, so chains that differ in one word never collide.
#[inline(always)]
pub fn mix(h: u64, x: u64) -> u64 {
    let h = (h ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

/// The per-load random seed kept in `*seed` (a table's slot 0), made on
/// first use: fingerprints no one outside can predict.
#[inline(always)]
pub fn seed(seed: *mut u64) -> u64 {
    let mut s = unsafe { core::ptr::read_volatile(seed) };
    if s == 0 {
        // First use since load. Two CPUs may race here: what was filed
        // under the losing seed is only a miss.
        s = ((unsafe { bpf_get_prandom_u32() } as u64) << 32)
            | unsafe { bpf_get_prandom_u32() } as u64
            | 1;
        unsafe { core::ptr::write_volatile(seed, s) };
    }
    s
}

/// The fingerprint chain over `key`'s five words, from `seed`.
#[inline(always)]
pub fn hash_key(seed: u64, key: &FlowKey) -> u64 {
    words(key).iter().fold(seed, |h, &x| mix(h, x))
}

/// Where the key would be, and its fingerprint (never 0, low bit clear).
#[inline(always)]
fn locate(key: &FlowKey) -> Option<(*mut u64, u64)> {
    let h = hash_key(seed(DONE.get_ptr_mut(0)?), key);
    let index = 1 + (h >> (64 - SLOT_BITS)) as u32;
    let fp = (h << 1) | 2;
    Some((DONE.get_ptr_mut(index)?, fp))
}

/// Is `key` a decided flow?
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<Done> {
    let (slot, fp) = locate(key)?;
    let v = unsafe { core::ptr::read_volatile(slot) };
    if v & !IN_FLOWS != fp {
        return None;
    }
    Some(Done {
        slot,
        fp,
        in_flows: v & IN_FLOWS != 0,
    })
}

/// `key` got its verdict; `in_flows`: it stays in `FLOWS` until its close.
#[inline(always)]
pub fn mark(key: &FlowKey, in_flows: bool) {
    if let Some((slot, fp)) = locate(key) {
        let v = if in_flows { fp | IN_FLOWS } else { fp };
        unsafe { core::ptr::write_volatile(slot, v) };
    }
}

impl Done {
    /// The flow left `FLOWS`.
    #[inline(always)]
    pub fn left_flows(&self) {
        unsafe { core::ptr::write_volatile(self.slot, self.fp) };
    }
}

/// `key` starts a new connection: whatever was decided under it is over.
#[inline(always)]
pub fn forget(key: &FlowKey) {
    if let Some(done) = find(key) {
        unsafe { core::ptr::write_volatile(done.slot, 0) };
    }
}
