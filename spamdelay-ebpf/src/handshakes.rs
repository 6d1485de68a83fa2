//! Handshakes in progress, from the server's SYN-ACK to the client's ACK:
//! a small direct-mapped table in front of the `HALF_OPEN` hash map.
//!
//! Every SMTP session starts with one. In `HALF_OPEN` it cost the SYN-ACK a
//! lookup and an insert, and the ACK a lookup and a delete, each a likely
//! cache and TLB miss in a table of megabytes. Here a handshake is three
//! words in a 24 KiB array the kernel allocates with kmalloc (its direct
//! mapping), written by the SYN-ACK and cleared by the ACK that verifies it.
//!
//! A slot keeps its handshake until then, or until it is stale (`STALE`
//! jiffies old: the server resends a SYN-ACK long before, and each resent
//! one writes it again). A SYN-ACK whose slot holds another live handshake,
//! or one that acknowledged Fast Open data, goes to `HALF_OPEN` as before,
//! so a flood of forged SYNs fills the slots and then only `HALF_OPEN`,
//! where they evict each other and never a verified flow.
//!
//! A slot's first word is a tag: the fingerprint chain (done.rs, per-load
//! random seed) over the key and the other two words. A slot is taken for a
//! key only when the tag matches the key and what the slot holds, so two
//! CPUs that write one slot at once, or a read during a write, give a miss
//! (the handshake is not verified, never verified with another's numbers).
//! A forger cannot make a tag match without the seed.

use aya_ebpf::{helpers::bpf_jiffies64, macros::map, maps::Array};
use spamdelay_common::{FlowKey, flow::HalfOpen};

use crate::{
    done::{hash_key, mix, seed},
    maps::{HALF_OPEN, stamp, stamped_within},
};

/// 1,024 slots of 24 bytes, plus slot 0 (the seed, and when `HALF_OPEN`
/// last took a handshake): 24 KiB, under kmalloc's 32 KiB.
const SLOT_BITS: u32 = 10;

/// Pinned with the other state maps: a handshake whose SYN-ACK the old
/// program saw is verified by the new one.
#[map]
static HANDSHAKES: Array<[u64; 3]> = Array::with_max_entries((1 << SLOT_BITS) + 1, 0);

/// A slot written this many jiffies ago (4 s at HZ=1000, 41 s at HZ=100)
/// may be taken by another handshake: the client's ACK comes within a round
/// trip of the server's last SYN-ACK, and the server resends one after 1 s.
const STALE: u32 = 1 << 12;

/// `HALF_OPEN` is looked in only this many jiffies (131 s at HZ=1000) after
/// it last took a handshake: longer than a server resends SYN-ACKs.
const MAP_WINDOW: u64 = 1 << 17;

/// A handshake found in its slot.
pub struct Slot {
    ptr: *mut [u64; 3],
    pub half: HalfOpen,
}

/// Where `key`'s slot is, and its key hash (the start of its tag).
#[inline(always)]
fn locate(key: &FlowKey) -> Option<(*mut [u64; 3], u64)> {
    let header = HANDSHAKES.get_ptr_mut(0)?;
    let h = hash_key(seed(header as *mut u64), key);
    let index = 1 + (h >> (64 - SLOT_BITS)) as u32;
    Some((HANDSHAKES.get_ptr_mut(index)?, h))
}

/// The tag of a slot holding `words` for the key with hash `h`: never 0.
#[inline(always)]
fn tag(h: u64, words: &[u64; 3]) -> u64 {
    mix(mix(h, words[1]), words[2]) | 1
}

#[inline(always)]
fn read(ptr: *mut [u64; 3]) -> [u64; 3] {
    // Word by word, each whole: the tag tells a torn slot.
    let w = ptr as *const u64;
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
        ]
    }
}

#[inline(always)]
fn jiffies32() -> u32 {
    unsafe { bpf_jiffies64() as u32 }
}

/// The SYN-ACK's handshake into its slot. False when the slot holds another
/// live handshake, or the handshake took Fast Open data (`syn_data`, which
/// a slot has no room for): then it belongs in `HALF_OPEN`.
#[inline(always)]
pub fn put(key: &FlowKey, half: &HalfOpen) -> bool {
    if half.syn_data != 0 {
        return false;
    }
    let Some((ptr, h)) = locate(key) else {
        return false;
    };
    let now = jiffies32();
    let old = read(ptr);
    let free =
        old[0] == 0 || now.wrapping_sub((old[2] >> 32) as u32) >= STALE || old[0] == tag(h, &old);
    if !free {
        return false;
    }
    let mut words = [
        0,
        half.server_isn as u64 | (half.client_next as u64) << 32,
        (half.window & 0xffff) as u64 | (half.allowlisted as u64) << 16 | (now as u64) << 32,
    ];
    words[0] = tag(h, &words);
    let w = ptr as *mut u64;
    unsafe {
        core::ptr::write_volatile(w.add(1), words[1]);
        core::ptr::write_volatile(w.add(2), words[2]);
        core::ptr::write_volatile(w, words[0]);
    }
    true
}

/// `key`'s handshake, if its slot holds it.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<Slot> {
    let (ptr, h) = locate(key)?;
    let w = read(ptr);
    if w[0] == 0 || w[0] != tag(h, &w) {
        return None;
    }
    Some(Slot {
        ptr,
        half: HalfOpen {
            server_isn: w[1] as u32,
            client_next: (w[1] >> 32) as u32,
            window: (w[2] & 0xffff) as u32,
            syn_data: 0,
            allowlisted: (w[2] >> 16) as u8 & 1,
            _pad: [0; 7],
        },
    })
}

impl Slot {
    /// The handshake is over (verified, or reset): the slot is free.
    #[inline(always)]
    pub fn clear(&self) {
        unsafe { core::ptr::write_volatile(self.ptr as *mut u64, 0) };
    }
}

/// The gate word in slot 0 (after the seed): when `HALF_OPEN` last took
/// a handshake.
#[inline(always)]
fn gate() -> Option<*mut u64> {
    HANDSHAKES
        .get_ptr_mut(0)
        .map(|header| unsafe { (header as *mut u64).add(1) })
}

/// A handshake went to `HALF_OPEN`.
#[inline(always)]
pub fn mapped() {
    stamp(gate());
}

/// May `HALF_OPEN` hold a handshake? Not when it took none for longer than
/// any handshake takes: then a client segment costs no lookup there.
#[inline(always)]
pub fn maybe_mapped() -> bool {
    stamped_within(gate().map(|p| p as *const u64), MAP_WINDOW)
}

/// `key`'s handshake in `HALF_OPEN`, if it may hold one.
#[inline(always)]
pub fn find_mapped(key: &FlowKey) -> Option<HalfOpen> {
    if !maybe_mapped() {
        return None;
    }
    HALF_OPEN.get_ptr(key).map(|half| unsafe { *half })
}
