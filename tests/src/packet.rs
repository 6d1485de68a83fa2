//! Crafted TCP segments for the kernel-program tests and the raw clients:
//! IPv4 (options, fragments) or IPv6 (extension headers, fragments) with real
//! checksums, as IP packet, fragment train or frame, and a raw sender for them.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;

const IPPROTO_TCP: u8 = 6;
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_DEST_OPTS: u8 = 60;
/// IPv4 "don't fragment", as Linux sets it on TCP packets.
const IPV4_DF: u16 = 0x4000;
const IPV4_MF: u16 = 0x2000;
/// RFC 4727's experimental option type, action bits 00: receivers skip it.
/// Filling option headers with it avoids runs of padding Linux would reject.
const IPV6_OPT_EXPERIMENTAL: u8 = 0x1e;

/// Fragment fields, as a fragmenting host would set them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Offset in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// An IPv6 extension header between the fixed header and TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options, `8 * (1 + units)` bytes long.
    HopByHop {
        units: u8,
    },
    /// Destination options, `8 * (1 + units)` bytes long.
    DestOpts {
        units: u8,
    },
    Fragment(Fragment),
}

impl Ipv6Ext {
    fn kind(self) -> u8 {
        match self {
            Ipv6Ext::HopByHop { .. } => NEXT_HOP_BY_HOP,
            Ipv6Ext::DestOpts { .. } => NEXT_DEST_OPTS,
            Ipv6Ext::Fragment(_) => NEXT_FRAGMENT,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ipv6Ext::HopByHop { units } | Ipv6Ext::DestOpts { units } => {
                // One option fills the header; its length byte caps `units`.
                assert!(units <= 31, "option headers are built up to 256 bytes");
                let opt_len = 6 + 8 * usize::from(units) - 2;
                let mut h = vec![next, units, IPV6_OPT_EXPERIMENTAL, opt_len as u8];
                h.resize(8 * (1 + usize::from(units)), 0);
                h
            }
            Ipv6Ext::Fragment(f) => {
                let off = (f.offset << 3) | u16::from(f.more);
                let mut h = vec![next, 0];
                h.extend_from_slice(&off.to_be_bytes());
                h.extend_from_slice(&0x5eed_0001u32.to_be_bytes());
                h
            }
        }
    }
}

/// One TCP segment and the IP header around it. Fields are public so a test
/// can craft anything; the builder methods cover the common ones.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// The urgent pointer (meaningful with `URG`).
    pub urgent: u16,
    /// Padded with end-of-options to a multiple of 4 bytes.
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// IPv4 only; padded with end-of-options to a multiple of 4 bytes.
    pub ipv4_options: Vec<u8>,
    /// IPv4 only. The whole segment follows whatever the fields say: this
    /// builds what an adversary could send, not a real fragment train.
    pub fragment: Option<Fragment>,
    /// IPv6 only, in order, before the TCP header.
    pub ipv6_ext: Vec<Ipv6Ext>,
}

impl Tcp {
    /// A segment with no flags, zero sequence numbers and no payload.
    ///
    /// # Panics
    /// If the addresses are of different families.
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "a packet's addresses share a family: {src} -> {dst}"
        );
        Tcp {
            src,
            dst,
            seq: 0,
            ack: 0,
            flags: 0,
            window: 64240,
            urgent: 0,
            tcp_options: Vec::new(),
            payload: Vec::new(),
            ipv4_options: Vec::new(),
            fragment: None,
            ipv6_ext: Vec::new(),
        }
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// The TCP header and payload, checksummed over the pseudo-header.
    pub fn segment(&self) -> Vec<u8> {
        let options = padded(&self.tcp_options);
        let doff = (TCP_HLEN + options.len()) / 4;
        assert!(doff <= 15, "TCP options exceed 40 bytes");
        let mut seg = Vec::with_capacity(doff * 4 + self.payload.len());
        seg.extend_from_slice(&self.src.port().to_be_bytes());
        seg.extend_from_slice(&self.dst.port().to_be_bytes());
        seg.extend_from_slice(&self.seq.to_be_bytes());
        seg.extend_from_slice(&self.ack.to_be_bytes());
        seg.push((doff as u8) << 4);
        seg.push(self.flags);
        seg.extend_from_slice(&self.window.to_be_bytes());
        seg.extend_from_slice(&[0, 0]); // checksum
        seg.extend_from_slice(&self.urgent.to_be_bytes());
        seg.extend_from_slice(&options);
        seg.extend_from_slice(&self.payload);
        let sum = checksum(&[&self.pseudo_header(seg.len()), &seg]);
        seg[16..18].copy_from_slice(&sum.to_be_bytes());
        seg
    }

    fn pseudo_header(&self, tcp_len: usize) -> Vec<u8> {
        let mut ph = Vec::with_capacity(40);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                ph.extend_from_slice(&s.octets());
                ph.extend_from_slice(&d.octets());
                ph.extend_from_slice(&[0, IPPROTO_TCP]);
                ph.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                ph.extend_from_slice(&s.octets());
                ph.extend_from_slice(&d.octets());
                ph.extend_from_slice(&(tcp_len as u32).to_be_bytes());
                ph.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
            }
            _ => unreachable!("Tcp::new checks the families match"),
        }
        ph
    }

    /// The IP packet: what a raw socket with `IP_HDRINCL` sends.
    pub fn ip_packet(&self) -> Vec<u8> {
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4(s, d),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6(s.octets(), d.octets()),
            _ => unreachable!("Tcp::new checks the families match"),
        }
    }

    fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let frag = self.fragment.unwrap_or(Fragment {
            offset: 0,
            more: false,
        });
        let seg = self.segment();
        let mut p = self.ipv4_header(src, dst, &seg, frag, self.fragment.is_none());
        p.extend_from_slice(&seg);
        p
    }

    /// The IPv4 header (with the options) for `body`.
    fn ipv4_header(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        body: &[u8],
        frag: Fragment,
        dont_fragment: bool,
    ) -> Vec<u8> {
        let options = padded(&self.ipv4_options);
        let ihl = IPV4_HLEN + options.len();
        assert!(ihl <= 60, "IPv4 options exceed 40 bytes");
        let total = u16::try_from(ihl + body.len()).expect("IPv4 packet over 65535 bytes");
        let flags = if dont_fragment { IPV4_DF } else { 0 };
        let frag = flags | frag.offset | if frag.more { IPV4_MF } else { 0 };
        let mut p = Vec::with_capacity(usize::from(total));
        p.push(0x40 | (ihl / 4) as u8);
        p.push(0); // DSCP/ECN
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&0x5eedu16.to_be_bytes()); // identification
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, IPPROTO_TCP, 0, 0]); // TTL, protocol, checksum
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&options);
        let sum = checksum(&[&p]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn ipv6(&self, src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
        ipv6_packet(src, dst, &self.ipv6_ext, &self.segment())
    }

    /// The packet as a fragmenting host sends it: the TCP segment cut into
    /// pieces of `chunk` bytes (a multiple of 8; the last may be shorter),
    /// the first carrying the whole TCP header. IPv4 fragments repeat the IP
    /// options; IPv6 ones carry `ipv6_ext`, then a fragment header. The
    /// receiver reassembles them into `ip_packet()`'s segment.
    ///
    /// # Panics
    /// If `chunk` is not a multiple of 8 or cannot hold the TCP header.
    pub fn fragments(&self, chunk: usize) -> Vec<Vec<u8>> {
        let seg = self.segment();
        assert!(
            chunk.is_multiple_of(8) && chunk >= seg.len() - self.payload.len(),
            "fragments of {chunk} bytes: a multiple of 8 that holds the TCP header"
        );
        seg.chunks(chunk)
            .enumerate()
            .map(|(i, piece)| {
                let frag = Fragment {
                    offset: u16::try_from(i * chunk / 8).expect("fragment offset in range"),
                    more: (i + 1) * chunk < seg.len(),
                };
                match (self.src.ip(), self.dst.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        let mut p = self.ipv4_header(s, d, piece, frag, false);
                        p.extend_from_slice(piece);
                        p
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        let mut exts = self.ipv6_ext.clone();
                        exts.push(Ipv6Ext::Fragment(frag));
                        ipv6_packet(s.octets(), d.octets(), &exts, piece)
                    }
                    _ => unreachable!("Tcp::new checks the families match"),
                }
            })
            .collect()
    }

    /// The Ethernet frame carrying the IP packet: what tc programs see, and
    /// what `BPF_PROG_TEST_RUN` takes for them.
    pub fn frame(&self) -> Vec<u8> {
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        let ip = self.ip_packet();
        let mut f = Vec::with_capacity(ETH_HLEN + ip.len());
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // locally administered
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&ip);
        f
    }
}

/// An IPv6 packet: the fixed header, `exts` in order, then `body` (TCP, or
/// a fragment of it).
fn ipv6_packet(src: [u8; 16], dst: [u8; 16], exts: &[Ipv6Ext], body: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(IPPROTO_TCP, |e| e.kind());
        chain.extend_from_slice(&ext.bytes(next));
    }
    let payload_len =
        u16::try_from(chain.len() + body.len()).expect("IPv6 payload over 65535 bytes");
    let first = exts.first().map_or(IPPROTO_TCP, |e| e.kind());
    let mut p = Vec::with_capacity(IPV6_HLEN + usize::from(payload_len));
    p.extend_from_slice(&[0x60, 0, 0, 0]); // version, traffic class, flow label
    p.extend_from_slice(&payload_len.to_be_bytes());
    p.extend_from_slice(&[first, 64]); // next header, hop limit
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&chain);
    p.extend_from_slice(body);
    p
}

/// Options padded with end-of-options (0, in both IPv4 and TCP) to 4 bytes.
fn padded(options: &[u8]) -> Vec<u8> {
    let mut v = options.to_vec();
    v.resize(options.len().next_multiple_of(4), 0);
    v
}

/// The Internet checksum (RFC 1071) of the concatenated chunks.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for &byte in chunks.iter().flat_map(|c| c.iter()) {
        match odd.take() {
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, byte])),
            None => odd = Some(byte),
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(hi) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The firewall mark on everything a `RawSender` sends, so nft rules can
/// tell crafted packets from the ones the namespace's own stack sends.
pub const RAW_MARK: u32 = 0x5d5d;

/// A raw IP socket that sends whole packets, header included, in the network
/// namespace it was opened in, whichever thread uses it later. One family.
pub struct RawSender {
    sock: Socket,
    v6: bool,
}

impl RawSender {
    /// Opens the socket in the calling thread's namespace.
    pub fn new(v6: bool) -> io::Result<Self> {
        // IPPROTO_RAW implies IP_HDRINCL (IPV6_HDRINCL): the kernel sends our
        // header unchanged (IPv4: but for the checksum, and the ID and source
        // when they are zero).
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
        sock.set_mark(RAW_MARK)?;
        Ok(RawSender { sock, v6 })
    }

    /// Sends one IP packet towards its destination address.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let sent = self.sock.send_to(packet, &destination(packet, self.v6)?)?;
        if sent != packet.len() {
            return Err(io::Error::other(format!(
                "raw socket sent {sent} of {} bytes",
                packet.len()
            )));
        }
        Ok(())
    }

    /// Sends every packet, `sendmmsg` batches at a time: a sweep of the whole
    /// sequence space (65,536 segments) takes a fraction of a second.
    pub fn send_all(&self, packets: &[Vec<u8>]) -> io::Result<()> {
        const BATCH: usize = 1024;
        for batch in packets.chunks(BATCH) {
            let addrs = batch
                .iter()
                .map(|p| destination(p, self.v6))
                .collect::<io::Result<Vec<SockAddr>>>()?;
            let mut iovs: Vec<libc::iovec> = batch
                .iter()
                .map(|p| libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .zip(&addrs)
                .map(|(iov, addr)| {
                    // SAFETY: an all-zero mmsghdr is a valid empty message.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
                    m.msg_hdr.msg_namelen = addr.len();
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let mut done = 0;
            while done < msgs.len() {
                // SAFETY: every header points into `iovs`, `addrs` and
                // `batch`, all alive until the loop ends.
                let n = unsafe {
                    libc::sendmmsg(
                        self.sock.as_raw_fd(),
                        msgs[done..].as_mut_ptr(),
                        (msgs.len() - done) as libc::c_uint,
                        0,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                done += n as usize;
            }
        }
        Ok(())
    }
}

/// The destination of an IP packet (header included) of the given family.
fn destination(packet: &[u8], v6: bool) -> io::Result<SockAddr> {
    match (v6, packet.first().map(|b| b >> 4)) {
        (false, Some(4)) if packet.len() >= IPV4_HLEN => {
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            Ok(SocketAddrV4::new(dst, 0).into())
        }
        (true, Some(6)) if packet.len() >= IPV6_HLEN => {
            let octets: [u8; 16] = packet[24..40].try_into().expect("16 bytes");
            Ok(SocketAddrV6::new(Ipv6Addr::from(octets), 0, 0, 0).into())
        }
        _ => {
            let v = if v6 { 6 } else { 4 };
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a raw IPv{v} sender needs an IPv{v} packet, header included"),
            ))
        }
    }
}

/// Sends an IPv4 packet, header included, towards its destination address,
/// in the calling thread's network namespace.
pub fn send_raw_ipv4(packet: &[u8]) -> io::Result<()> {
    // Checked before the socket opens, which needs privileges.
    destination(packet, false)?;
    RawSender::new(false)?.send(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn() -> Tcp {
        Tcp::new(
            "192.0.2.1:40000".parse().unwrap(),
            "198.51.100.2:25".parse().unwrap(),
        )
        .seq(0x0102_0304)
        .flags(SYN)
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: these bytes sum to 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Chunk boundaries at odd offsets must not shift the byte pairing.
        assert_eq!(checksum(&[&data[..3], &data[3..5], &data[5..]]), !0xddf2);
    }

    #[test]
    fn checksum_pads_an_odd_byte_with_zero() {
        assert_eq!(checksum(&[&[0x12]]), !0x1200);
        assert_eq!(checksum(&[&[0x12, 0x34, 0x56]]), !(0x1234 + 0x5600));
    }

    #[test]
    fn ipv4_syn_is_byte_exact() {
        // Checksums computed independently (Python, RFC 1071 over the header,
        // and over the pseudo-header plus segment).
        #[rustfmt::skip]
        let expected = [
            // IPv4: 20 bytes, DF, TTL 64, TCP, checksum 0xefab.
            0x45, 0x00, 0x00, 0x28, 0x5e, 0xed, 0x40, 0x00, 0x40, 0x06, 0xef, 0xab,
            192, 0, 2, 1, 198, 51, 100, 2,
            // TCP: 40000 -> 25, seq 0x01020304, SYN, window 64240, checksum 0x285b.
            0x9c, 0x40, 0x00, 0x19, 0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x00,
            0x50, 0x02, 0xfa, 0xf0, 0x28, 0x5b, 0x00, 0x00,
        ];
        assert_eq!(syn().ip_packet(), expected);
    }

    #[test]
    fn ipv4_checksums_verify_with_options_and_odd_payload() {
        let mut p = syn().flags(ACK | PSH).payload(b"EHLO x\r\n!".to_vec());
        p.ipv4_options = vec![1, 1, 1, 1, 1];
        p.tcp_options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let ip = p.ip_packet();
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        assert_eq!(ihl, 28, "5 option bytes pad to 8");
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        // A correct checksum makes the sum over the covered bytes all ones.
        assert_eq!(checksum(&[&ip[..ihl]]), 0);
        let tcp = &ip[ihl..];
        assert_eq!(tcp[12] >> 4, 8, "12 option bytes: data offset 8");
        assert_eq!(&tcp[32..], b"EHLO x\r\n!");
        assert_eq!(checksum(&[&p.pseudo_header(tcp.len()), tcp]), 0);
    }

    #[test]
    fn ipv6_chain_and_checksum_verify() {
        let mut p = Tcp::new(
            "[2001:db8::1]:40000".parse().unwrap(),
            "[2001:db8::2]:25".parse().unwrap(),
        )
        .flags(ACK)
        .payload(b"QUIT\r\n".to_vec());
        p.ipv6_ext = vec![
            Ipv6Ext::HopByHop { units: 0 },
            Ipv6Ext::DestOpts { units: 1 },
        ];
        let ip = p.ip_packet();
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            ip.len() - IPV6_HLEN
        );
        assert_eq!(ip[6], NEXT_HOP_BY_HOP);
        let hbh = &ip[IPV6_HLEN..];
        assert_eq!((hbh[0], hbh[1]), (NEXT_DEST_OPTS, 0));
        let dst_opts = &hbh[8..];
        assert_eq!((dst_opts[0], dst_opts[1]), (IPPROTO_TCP, 1));
        let tcp = &dst_opts[16..];
        assert_eq!(&tcp[TCP_HLEN..], b"QUIT\r\n");
        assert_eq!(checksum(&[&p.pseudo_header(tcp.len()), tcp]), 0);
    }

    #[test]
    fn fragments_set_their_fields() {
        let mut v4 = syn();
        v4.fragment = Some(Fragment {
            offset: 185,
            more: true,
        });
        let ip = v4.ip_packet();
        assert_eq!(u16::from_be_bytes([ip[6], ip[7]]), IPV4_MF | 185);

        let mut v6 = Tcp::new(
            "[2001:db8::1]:40000".parse().unwrap(),
            "[2001:db8::2]:25".parse().unwrap(),
        );
        v6.ipv6_ext = vec![Ipv6Ext::Fragment(Fragment {
            offset: 0,
            more: true,
        })];
        let ip = v6.ip_packet();
        assert_eq!(ip[6], NEXT_FRAGMENT);
        assert_eq!(ip[IPV6_HLEN], IPPROTO_TCP);
        assert_eq!(&ip[IPV6_HLEN + 2..IPV6_HLEN + 4], &[0, 1]);
    }

    #[test]
    fn frame_has_ethertype_by_family() {
        let f = syn().frame();
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[ETH_HLEN..], syn().ip_packet().as_slice());
    }

    /// Reassembles `fragments` (IPv4 or IPv6 with only a fragment header)
    /// into the TCP segment they carry, checking each header on the way.
    fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
        let mut seg = Vec::new();
        for (i, f) in fragments.iter().enumerate() {
            let last = i + 1 == fragments.len();
            let (offset, more, body) = if f[0] >> 4 == 4 {
                let ihl = usize::from(f[0] & 0x0f) * 4;
                assert_eq!(checksum(&[&f[..ihl]]), 0, "IPv4 header checksum");
                assert_eq!(usize::from(u16::from_be_bytes([f[2], f[3]])), f.len());
                let field = u16::from_be_bytes([f[6], f[7]]);
                assert_eq!(field & IPV4_DF, 0, "fragments never say don't fragment");
                (field & 0x1fff, field & IPV4_MF != 0, &f[ihl..])
            } else {
                assert_eq!(f[6], NEXT_FRAGMENT);
                let len = usize::from(u16::from_be_bytes([f[4], f[5]]));
                assert_eq!(len, f.len() - IPV6_HLEN);
                let h = &f[IPV6_HLEN..];
                assert_eq!(h[0], IPPROTO_TCP);
                let field = u16::from_be_bytes([h[2], h[3]]);
                (field >> 3, field & 1 != 0, &h[8..])
            };
            assert_eq!(usize::from(offset) * 8, seg.len(), "fragment {i} in place");
            assert_eq!(more, !last, "more fragments on all but the last");
            seg.extend_from_slice(body);
        }
        seg
    }

    #[test]
    fn fragments_reassemble_to_the_segment() {
        let v4 = syn()
            .flags(ACK | PSH)
            .payload(b"EHLO fragmented.example.test\r\n".to_vec());
        let frags = v4.fragments(24);
        assert_eq!(frags.len(), 3, "50 bytes in 24-byte pieces");
        assert_eq!(reassemble(&frags), v4.segment());

        let v6 = Tcp::new(
            "[2001:db8::1]:40000".parse().unwrap(),
            "[2001:db8::2]:25".parse().unwrap(),
        )
        .flags(ACK)
        .payload(b"EHLO x\r\n".to_vec());
        let frags = v6.fragments(24);
        assert_eq!(frags.len(), 2);
        assert_eq!(reassemble(&frags), v6.segment());
    }

    #[test]
    fn urgent_pointer_is_written() {
        let mut seg = syn().flags(ACK | URG).payload(b"x".to_vec());
        seg.urgent = 0x0102;
        let tcp = seg.segment();
        assert_eq!(tcp[13], ACK | URG);
        assert_eq!(&tcp[18..20], &[1, 2]);
    }

    #[test]
    fn raw_send_rejects_non_ipv4() {
        let err = send_raw_ipv4(&[0x60; 40]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
