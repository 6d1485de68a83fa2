//! Header parsing: Ethernet (with up to two VLAN tags left in the frame),
//! IPv4/IPv6 (options, every extension header the kernel would walk, first
//! fragments), TCP. This module is the one packet reader: fixed offsets are
//! read directly after a bounds check, variable ones through
//! `bpf_skb_load_bytes`; anything malformed or not TCP is `None`.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_loop, bpf_skb_load_bytes},
    programs::TcContext,
};
use spamdelay_common::{FAMILY_V4, FAMILY_V6, FlowKey, PAYLOAD_CAPTURE, Stat};

use crate::maps::{count, watched};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked at most. Each takes at least 8 bytes, so
/// this covers any chain a 64 KiB packet can hold: Linux walks them all.
const MAX_EXT_HEADERS: u32 = 8192;

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

/// What part of a TCP segment the packet holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The whole segment.
    Whole,
    /// The first IP fragment, holding at least the TCP header's first 14
    /// bytes (through the flags): more of the segment's bytes follow in other
    /// fragments, which the IP layer joins before TCP sees them.
    FirstFragment,
    /// A first IPv4 fragment too short for the ack and flags: only the ports
    /// and the sequence number are known (`ack` and `flags` are zero).
    TinyFragment,
}

/// A TCP segment of a watched flow.
#[derive(Clone, Copy)]
pub struct Segment {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub part: Part,
    /// Offset of the TCP payload from the start of the packet.
    pub payload_off: usize,
    /// Payload bytes in this packet, as the IP header declares them.
    pub payload_len: u32,
    /// IPv4 identification, to find a tiny fragment's other half.
    pub ip_id: u16,
}

/// The IPv4 fragment at byte 8 of a TCP segment whose first fragment was
/// too short for the ack and flags: it holds them. Its ports are in the
/// first fragment, so it is matched to it by addresses and IP id.
pub struct TcpTail {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ip_id: u16,
    pub ack: u32,
    pub flags: u8,
}

/// What a packet holds for spamdelay.
pub enum Packet {
    Segment(Segment),
    Tail(TcpTail),
}

impl Segment {
    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Is this one fragment of a longer segment?
    #[inline(always)]
    pub fn fragment(&self) -> bool {
        self.part != Part::Whole
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

/// A direct, bounds-checked read at a fixed offset in the linear data.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // Unaligned: IP options and extension headers shift everything after them.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

/// A read at a variable offset, through `bpf_skb_load_bytes`: direct access
/// there needs bounds proofs the verifier cannot always follow.
#[inline(always)]
pub fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// `N` bytes at `off` for the `bpf_loop` callbacks, which get the skb
/// through their context rather than a `TcContext`.
#[inline(always)]
pub fn skb_bytes<const N: usize>(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    off: u32,
    out: &mut [u8; N],
) -> bool {
    let ret =
        unsafe { bpf_skb_load_bytes(skb as *const c_void, off, out.as_mut_ptr().cast(), N as u32) };
    ret == 0
}

/// The first `len` bytes (1 to `N`) at `off` into `out`, for the `bpf_loop`
/// callbacks: a short last chunk is read without reading past the packet.
#[inline(always)]
pub fn skb_bytes_upto<const N: usize>(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    off: u32,
    out: &mut [u8; N],
    len: u64,
) -> bool {
    // The verifier needs the length bounded and non-zero, whatever the caller.
    if len == 0 || len > N as u64 {
        return false;
    }
    let ret = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            off,
            out.as_mut_ptr().cast(),
            len as u32,
        )
    };
    ret == 0
}

/// Copies `want` (at most `PAYLOAD_CAPTURE`) bytes from `off` into `out`;
/// returns how many were copied.
#[inline(always)]
pub fn payload_bytes(
    ctx: &TcContext,
    off: usize,
    want: u32,
    out: &mut [u8; PAYLOAD_CAPTURE],
) -> u8 {
    let want = if want > PAYLOAD_CAPTURE as u32 {
        PAYLOAD_CAPTURE as u32
    } else {
        want
    };
    if want == 0 {
        return 0;
    }
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            off as u32,
            out.as_mut_ptr().cast(),
            want,
        )
    };
    if ret == 0 { want as u8 } else { 0 }
}

/// Where the IP header starts and which family it is, past VLAN tags that
/// were left in the frame (no VLAN offload on the interface).
#[inline(always)]
fn network(ctx: &TcContext) -> Option<(u16, usize)> {
    let mut proto = be16(ctx, 12)?;
    let mut l3 = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(ctx, 16)?;
        l3 = ETH_HLEN + 4;
        if proto == ETH_P_8021Q {
            proto = be16(ctx, 20)?;
            l3 = ETH_HLEN + 8;
        }
    }
    Some((proto, l3))
}

/// Parses the packet if it is a TCP segment (or the first fragment of one)
/// whose server side (destination for `FromClient`, source for
/// `FromServer`) is a watched port. The common case (no VLAN tag, no IP
/// options, no extension headers) reads only fixed offsets directly.
/// Both programs call `look` first, once.
#[inline(always)]
pub fn packet(ctx: &TcContext, dir: Dir) -> Option<Packet> {
    let (proto, l3) = network(ctx)?;
    let ip = match proto {
        ETH_P_IP => ipv4(ctx, l3)?,
        ETH_P_IPV6 => ipv6(ctx, l3)?,
        _ => return None,
    };
    if ip.tail {
        // Only a client's tiny fragments are followed (it is the client
        // that might hide its ack there); the server never sends such.
        if dir != Dir::FromClient || ip.l4 + 6 > ip.end || ip.end > ctx.len() as usize {
            return None;
        }
        let b: [u8; 6] = load(ctx, ip.l4)?;
        return Some(Packet::Tail(TcpTail {
            src: load(ctx, l3 + 12)?,
            dst: load(ctx, l3 + 16)?,
            ip_id: ip.id,
            ack: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            flags: b[5],
        }));
    }
    segment(ctx, dir, l3, &ip).map(Packet::Segment)
}

/// What the first look at a packet says.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Not TCP to or from a watched port: nothing for spamdelay.
    Ignore,
    /// TCP of a watched port in the usual frame (untagged; IPv4 without
    /// options and unfragmented, or IPv6 without extension headers): its
    /// fields are at fixed offsets (`plain`).
    Plain,
    /// Maybe watched, in another frame: the full parse (`packet`) decides.
    Parse,
}

/// The early exit for most traffic: in the usual frame one bounds check
/// reads everything up to the ports, and TCP that is not to or from a
/// watched port (or anything but TCP) leaves here.
#[inline(always)]
pub fn look(ctx: &TcContext, dir: Dir) -> Look {
    let Some(proto) = be16(ctx, 12) else {
        return Look::Ignore;
    };
    // The ports' offset in the TCP header: the server's side.
    let at = if dir == Dir::FromClient { 2 } else { 0 };
    match proto {
        ETH_P_IP => {
            let Some(h) = read::<[u8; 24]>(ctx, ETH_HLEN) else {
                return Look::Parse;
            };
            // Version 4, no options; a fragment past the first has no ports.
            if h[0] != 0x45 || h[6] & 0x1f != 0 || h[7] != 0 {
                return Look::Parse;
            }
            if h[9] != IPPROTO_TCP || !watched(u16::from_be_bytes([h[20 + at], h[21 + at]])) {
                return Look::Ignore;
            }
            // A first fragment (more fragments follow) is not plain.
            if h[6] & 0x20 != 0 {
                return Look::Parse;
            }
            Look::Plain
        }
        ETH_P_IPV6 => {
            let Some(h) = read::<[u8; 44]>(ctx, ETH_HLEN) else {
                return Look::Parse;
            };
            if h[6] != IPPROTO_TCP {
                return Look::Parse;
            }
            if !watched(u16::from_be_bytes([h[40 + at], h[41 + at]])) {
                return Look::Ignore;
            }
            Look::Plain
        }
        _ => Look::Parse,
    }
}

/// A segment in the usual frame, read at fixed offsets: what decides
/// whether it needs following at all.
pub struct Plain {
    pub flags: u8,
    pub payload_len: u32,
    pub key: FlowKey,
}

impl Plain {
    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A TCP segment (the whole of it) of a watched port in the usual frame,
/// after `look` said `Look::Plain`, if `packet` would parse it as one:
/// `None` means "see what the full parse makes of it".
#[inline(always)]
pub fn plain(ctx: &TcContext, dir: Dir) -> Option<Plain> {
    // Each read reaches as far as `segment`'s direct reads of the same frame.
    let (src, dst, ports, ip_end, tcp, family) = match be16(ctx, 12)? {
        ETH_P_IP => {
            let h = read::<[u8; 40]>(ctx, ETH_HLEN)?;
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            let addr = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
            (
                [addr(12) as u64, 0],
                [addr(16) as u64, 0],
                [h[20], h[21], h[22], h[23]],
                ETH_HLEN + total,
                [h[32], h[33]],
                FAMILY_V4,
            )
        }
        ETH_P_IPV6 => {
            let h = read::<[u8; 60]>(ctx, ETH_HLEN)?;
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            let word = |at: usize| {
                u64::from_le_bytes([
                    h[at],
                    h[at + 1],
                    h[at + 2],
                    h[at + 3],
                    h[at + 4],
                    h[at + 5],
                    h[at + 6],
                    h[at + 7],
                ])
            };
            (
                [word(8), word(16)],
                [word(24), word(32)],
                [h[40], h[41], h[42], h[43]],
                L4_V6 + plen,
                [h[52], h[53]],
                FAMILY_V6,
            )
        }
        _ => return None,
    };
    let l4 = if family == FAMILY_V4 { L4_V4 } else { L4_V6 };
    // `segment`'s checks: the whole IP packet present, a TCP header of at
    // least 20 bytes, its options inside the packet.
    let payload_off = l4 + ((tcp[0] >> 4) as usize) * 4;
    if ip_end > ctx.len() as usize || payload_off < l4 + 20 || payload_off > ip_end {
        return None;
    }
    let sport = u16::from_be_bytes([ports[0], ports[1]]) as u64;
    let dport = u16::from_be_bytes([ports[2], ports[3]]) as u64;
    let (client, server, cport, sport) = if dir == Dir::FromClient {
        (src, dst, sport, dport)
    } else {
        (dst, src, dport, sport)
    };
    // FlowKey's five little-endian words: client address (two), server
    // address (two), then client port, server port, family and padding.
    let words = [
        client[0],
        client[1],
        server[0],
        server[1],
        cport | sport << 16 | (family as u64) << 32,
    ];
    Some(Plain {
        flags: tcp[1],
        payload_len: (ip_end - payload_off) as u32,
        // SAFETY: FlowKey is 40 plain bytes aligned to 8, as the words are.
        key: unsafe { core::mem::transmute::<[u64; 5], FlowKey>(words) },
    })
}

#[inline(always)]
fn segment(ctx: &TcContext, dir: Dir, l3: usize, ip: &Ip) -> Option<Segment> {
    let l4 = ip.l4;
    // The ports first: TCP that is not to or from a watched port (most of
    // the traffic) leaves without anything else being read.
    let ports: [u8; 4] = tcp_bytes(ctx, ip.family, l4, 0)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let server_port = if dir == Dir::FromClient { dport } else { sport };
    if !watched(server_port) {
        return None;
    }
    // A packet shorter than its IP header claims never reaches the socket:
    // the IP layer drops it, so its bytes must not count as talk either.
    if ip.end > ctx.len() as usize {
        return None;
    }
    let mut seg = Segment {
        family: ip.family,
        src: [0; 16],
        dst: [0; 16],
        sport,
        dport,
        seq: 0,
        ack: 0,
        flags: 0,
        window: 0,
        part: if ip.first_fragment {
            Part::FirstFragment
        } else {
            Part::Whole
        },
        payload_off: 0,
        payload_len: 0,
        ip_id: ip.id,
    };
    if l4 + 20 <= ip.end {
        // Bytes 4..20 of the TCP header: sequence, ack, data offset, flags, window.
        let tcp: [u8; 16] = tcp_bytes(ctx, ip.family, l4, 4)?;
        let doff = ((tcp[8] >> 4) as usize) * 4;
        if doff < 20 {
            return None;
        }
        seg.seq = u32::from_be_bytes([tcp[0], tcp[1], tcp[2], tcp[3]]);
        seg.ack = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        seg.flags = tcp[9];
        seg.window = u16::from_be_bytes([tcp[10], tcp[11]]);
        seg.payload_off = l4 + doff;
        if seg.payload_off <= ip.end {
            seg.payload_len = (ip.end - seg.payload_off) as u32;
        } else if !ip.first_fragment {
            // Options past the segment's end: malformed, TCP drops it.
            return None;
        }
    } else if ip.first_fragment && ip.family == FAMILY_V4 && l4 + 14 <= ip.end {
        // Through the flags, options and payload in later fragments.
        let tcp: [u8; 10] = load(ctx, l4 + 4)?;
        seg.seq = u32::from_be_bytes([tcp[0], tcp[1], tcp[2], tcp[3]]);
        seg.ack = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        seg.flags = tcp[9];
        if ((tcp[8] >> 4) as usize) * 4 < 20 {
            return None;
        }
    } else if ip.first_fragment && ip.family == FAMILY_V4 && l4 + 8 <= ip.end {
        // IPv4 lets a first fragment end inside the TCP header (IPv6 does
        // not: Linux drops those, RFC 8200 4.5).
        let seq: [u8; 4] = load(ctx, l4 + 4)?;
        seg.seq = u32::from_be_bytes(seq);
        seg.part = Part::TinyFragment;
    } else {
        // A TCP header cut short: TCP drops the segment.
        return None;
    }
    let (src, dst, len) = if ip.family == FAMILY_V4 {
        (l3 + 12, l3 + 16, 4)
    } else {
        (l3 + 8, l3 + 24, 16)
    };
    if l3 == ETH_HLEN {
        if len == 4 {
            seg.src[..4].copy_from_slice(&read::<[u8; 4]>(ctx, ETH_HLEN + 12)?);
            seg.dst[..4].copy_from_slice(&read::<[u8; 4]>(ctx, ETH_HLEN + 16)?);
        } else {
            seg.src = read::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
            seg.dst = read::<[u8; 16]>(ctx, ETH_HLEN + 24)?;
        }
    } else if len == 4 {
        seg.src[..4].copy_from_slice(&load::<[u8; 4]>(ctx, src)?);
        seg.dst[..4].copy_from_slice(&load::<[u8; 4]>(ctx, dst)?);
    } else {
        seg.src = load::<[u8; 16]>(ctx, src)?;
        seg.dst = load::<[u8; 16]>(ctx, dst)?;
    }
    Some(seg)
}

/// `N` bytes at `off` into the TCP header: a direct read at the usual fixed
/// offsets, `bpf_skb_load_bytes` after VLAN tags, IP options or extension
/// headers.
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

/// Where the TCP header is in a packet.
struct Ip {
    family: u8,
    /// Offset of the TCP header.
    l4: usize,
    /// End of the IP payload (of this fragment).
    end: usize,
    /// The packet is the first fragment of a longer datagram.
    first_fragment: bool,
    /// IPv4: the fragment at byte 8, where a tiny first fragment's TCP
    /// header goes on.
    tail: bool,
    /// IPv4 identification.
    id: u16,
}

/// An IPv4 TCP packet: whole, or the first fragment of one. Later fragments
/// carry no TCP header; the first one's header identifies the segment.
#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize) -> Option<Ip> {
    let hdr: [u8; 20] = if l3 == ETH_HLEN {
        read(ctx, ETH_HLEN)?
    } else {
        load(ctx, l3)?
    };
    if hdr[9] != IPPROTO_TCP {
        return None;
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    // A fragment offset past the TCP header's first 8 bytes: no header here.
    let offset = frag & 0x1fff;
    if offset > 1 {
        return None;
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if ihl < 20 || total < ihl {
        return None;
    }
    Some(Ip {
        family: FAMILY_V4,
        l4: l3 + ihl,
        end: l3 + total,
        // More fragments follow.
        first_fragment: offset == 0 && frag & 0x2000 != 0,
        tail: offset == 1,
        id: u16::from_be_bytes([hdr[4], hdr[5]]),
    })
}

/// State of the `bpf_loop` walk over IPv6 extension headers.
#[repr(C)]
struct ExtWalk {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    off: u32,
    next: u8,
    /// A fragment header with more fragments to come was passed.
    first_fragment: u8,
    /// `WALK_*`.
    result: u8,
}

const WALK_ON: u8 = 0;
const WALK_TCP: u8 = 1;
const WALK_NOT_TCP: u8 = 2;

extern "C" fn ext_header(index: u64, data: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(data as *mut ExtWalk) };
    let mut hdr = [0u8; 4];
    match walk.next {
        IPPROTO_TCP => {
            walk.result = WALK_TCP;
            return 1;
        }
        // Hop-by-hop (only first, as ipv6_rcv takes it), routing,
        // destination options.
        0 | 43 | 60 if walk.next != 0 || index == 0 => {
            if !skb_bytes(walk.skb, walk.off, &mut hdr) {
                walk.result = WALK_NOT_TCP;
                return 1;
            }
            walk.next = hdr[0];
            walk.off = walk.off.wrapping_add((hdr[1] as u32 + 1) * 8);
        }
        // Fragment: the first one is followed, later ones hold no TCP header.
        44 => {
            if !skb_bytes(walk.skb, walk.off, &mut hdr) {
                walk.result = WALK_NOT_TCP;
                return 1;
            }
            let frag = u16::from_be_bytes([hdr[2], hdr[3]]);
            if frag & 0xfff8 != 0 {
                walk.result = WALK_NOT_TCP;
                return 1;
            }
            if frag & 1 != 0 {
                walk.first_fragment = 1;
            }
            walk.next = hdr[0];
            walk.off = walk.off.wrapping_add(8);
        }
        _ => {
            walk.result = WALK_NOT_TCP;
            return 1;
        }
    }
    0
}

/// An IPv6 TCP packet (or first fragment), past every extension header.
#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize) -> Option<Ip> {
    let hdr: [u8; 8] = if l3 == ETH_HLEN {
        read(ctx, ETH_HLEN)?
    } else {
        load(ctx, l3)?
    };
    let l4 = l3 + IPV6_HLEN;
    let end = l4 + u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if hdr[6] == IPPROTO_TCP {
        return Some(Ip {
            family: FAMILY_V6,
            l4,
            end,
            first_fragment: false,
            tail: false,
            id: 0,
        });
    }
    if !matches!(hdr[6], 0 | 43 | 44 | 60) {
        return None;
    }
    let mut walk = ExtWalk {
        skb: ctx.skb.skb,
        off: l4 as u32,
        next: hdr[6],
        first_fragment: 0,
        result: WALK_ON,
    };
    let ret = unsafe {
        bpf_loop(
            MAX_EXT_HEADERS,
            ext_header as *mut c_void,
            (&mut walk as *mut ExtWalk).cast(),
            0,
        )
    };
    match walk.result {
        WALK_TCP if ret >= 0 => Some(Ip {
            family: FAMILY_V6,
            l4: walk.off as usize,
            end,
            first_fragment: walk.first_fragment != 0,
            tail: false,
            id: 0,
        }),
        WALK_ON => {
            // The chain outlasted the walk: say so, never guess.
            count(Stat::Unparsed);
            None
        }
        _ => None,
    }
}
