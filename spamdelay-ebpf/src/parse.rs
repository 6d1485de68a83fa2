//! Header parsing: Ethernet, IPv4/IPv6 (with extension headers), TCP. Every
//! read goes through `ptr_at`, which bounds-checks against the linear packet
//! data; anything malformed, fragmented or not TCP is `None`.

use aya_ebpf::programs::TcContext;
use spamdelay_common::{FAMILY_V4, FAMILY_V6};

use crate::maps::watched;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked before giving up on a packet.
const MAX_EXT_HEADERS: usize = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Which side of a watched flow sent the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// To a watched port (tc ingress).
    FromClient,
    /// From a watched port (tc egress).
    FromServer,
}

/// A TCP segment of a watched flow.
pub struct Segment {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Offset of the TCP payload from the start of the packet.
    pub payload_off: usize,
    /// Payload length as the IP header declares it.
    pub payload_len: u32,
}

impl Segment {
    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // Unaligned: IP options and extension headers shift everything after them.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

/// Reads at a variable offset go through `bpf_skb_load_bytes`: direct access
/// there needs bounds proofs the verifier cannot always follow.
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// Parses the packet if it is a TCP segment whose server side (destination for
/// `FromClient`, source for `FromServer`) is a watched port. The common case
/// (no IP options, no extension headers) reads only fixed offsets directly.
#[inline(always)]
pub fn segment(ctx: &TcContext, dir: Dir) -> Option<Segment> {
    let (family, l4, ip_payload_end) = match be16(ctx, 12)? {
        ETH_P_IP => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => return None,
    };
    // The ports first: TCP that is not to or from a watched port (most of
    // the traffic) leaves without anything else being read.
    let ports: [u8; 4] = tcp_bytes(ctx, family, l4, 0)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let server_port = if dir == Dir::FromClient { dport } else { sport };
    if !watched(server_port) {
        return None;
    }
    // Bytes 4..20 of the TCP header: sequence, ack, data offset, flags.
    let tcp: [u8; 16] = tcp_bytes(ctx, family, l4, 4)?;
    let doff = ((tcp[8] >> 4) as usize) * 4;
    if doff < 20 {
        return None;
    }
    let payload_off = l4 + doff;
    // A packet shorter than its IP header claims never reaches the socket:
    // the IP layer drops it, so its bytes must not count as talk either.
    if payload_off > ip_payload_end || ip_payload_end > ctx.len() as usize {
        return None;
    }
    let mut seg = Segment {
        family,
        src: [0; 16],
        dst: [0; 16],
        sport,
        dport,
        seq: u32::from_be_bytes([tcp[0], tcp[1], tcp[2], tcp[3]]),
        ack: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags: tcp[9],
        payload_off,
        payload_len: (ip_payload_end - payload_off) as u32,
    };
    if family == FAMILY_V4 {
        seg.src[..4].copy_from_slice(&read::<[u8; 4]>(ctx, ETH_HLEN + 12)?);
        seg.dst[..4].copy_from_slice(&read::<[u8; 4]>(ctx, ETH_HLEN + 16)?);
    } else {
        seg.src = read::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
        seg.dst = read::<[u8; 16]>(ctx, ETH_HLEN + 24)?;
    }
    Some(seg)
}

/// `N` bytes at `off` into the TCP header: a direct read at the usual fixed
/// offsets, `bpf_skb_load_bytes` after IP options or extension headers.
#[inline(always)]
fn tcp_bytes<const N: usize>(
    ctx: &TcContext,
    family: u8,
    l4: usize,
    off: usize,
) -> Option<[u8; N]> {
    match (family, l4) {
        (FAMILY_V4, L4_V4) => read(ctx, L4_V4 + off),
        (FAMILY_V6, L4_V6) => read(ctx, L4_V6 + off),
        _ => load(ctx, l4 + off),
    }
}

const L4_V4: usize = ETH_HLEN + 20;
const L4_V6: usize = ETH_HLEN + IPV6_HLEN;

/// (family, TCP header offset, end of IP payload) of an unfragmented IPv4 TCP packet.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<(u8, usize, usize)> {
    let hdr: [u8; 20] = read(ctx, ETH_HLEN)?;
    if hdr[9] != IPPROTO_TCP {
        return None;
    }
    // More-fragments flag or a fragment offset: not a whole segment.
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x3fff != 0 {
        return None;
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if ihl < 20 || total < ihl {
        return None;
    }
    Some((FAMILY_V4, ETH_HLEN + ihl, ETH_HLEN + total))
}

/// (family, TCP header offset, end of IP payload) of an unfragmented IPv6 TCP
/// packet, walking hop-by-hop, routing and destination-options headers.
#[inline(always)]
fn ipv6(ctx: &TcContext) -> Option<(u8, usize, usize)> {
    let hdr: [u8; 8] = read(ctx, ETH_HLEN)?;
    let end = L4_V6 + u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    let mut next = hdr[6];
    let mut off = L4_V6;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return Some((FAMILY_V6, off, end)),
            // Hop-by-hop, routing, destination options.
            0 | 43 | 60 => {
                let ext: [u8; 2] = load(ctx, off)?;
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            // Fragments (44) and anything else: not followed.
            _ => return None,
        }
    }
    if next == IPPROTO_TCP {
        return Some((FAMILY_V6, off, end));
    }
    None
}
