//! TCP done by hand over raw sockets, for what the kernel's own TCP never
//! sends: payload on the handshake's ACK, data overlapping the first byte,
//! fragments, extension headers, Fast Open SYN data, stray RSTs and FINs, and
//! a server that overlaps its own segments. A `RawConn` completes a real
//! handshake with a real peer and then sends whatever `Tcp` segment a test
//! crafts; a `Sniffer` reads the peer's segments (and a kernel connection's
//! sequence numbers). The namespace's own stack would reset a connection it
//! does not know, so `silence_resets` drops its RSTs from the raw address.

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    lab::Netns,
    nft::nft,
    packet::{ACK, PSH, RAW_MARK, RawSender, SYN, Tcp},
};

/// How long a raw handshake waits for each answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Makes `ns` drop the RSTs its own stack sends from `addr` (to the segments
/// of connections only a raw socket knows). RSTs a `RawSender` crafts carry
/// `RAW_MARK` and still go out. The namespace is the test's own; this
/// touches nothing else. Call it once per address.
pub fn silence_resets(ns: &Netns, addr: impl Into<IpAddr>) -> Result<()> {
    let addr = addr.into();
    let family = if addr.is_ipv4() { "ip" } else { "ip6" };
    nft(ns, &["add", "table", "inet", "raw_tcp"])?;
    nft(
        ns,
        &[
            "add",
            "chain",
            "inet",
            "raw_tcp",
            "out",
            "{ type filter hook output priority 0; }",
        ],
    )?;
    let rule = format!(
        "add rule inet raw_tcp out {family} saddr {addr} tcp flags & rst != 0 meta mark != {RAW_MARK} drop"
    );
    nft(ns, &[&rule])?;
    Ok(())
}

/// A TCP segment as a `Sniffer` saw it arrive.
#[derive(Clone, Debug)]
pub struct Seen {
    pub src: SocketAddr,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl Seen {
    pub fn has(&self, flags: u8) -> bool {
        self.flags & flags == flags
    }
}

/// A raw TCP socket that sees a copy of every TCP segment arriving in its
/// namespace (one family). Open it before the segment it waits for is sent.
pub struct Sniffer {
    sock: Socket,
    v6: bool,
}

impl Sniffer {
    /// Opens the socket in the calling thread's namespace.
    pub fn open(v6: bool) -> Result<Self> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let sock = Socket::new(domain, Type::RAW, Some(Protocol::TCP))
            .context("opening a raw TCP socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Sniffer { sock, v6 })
    }

    /// The next arriving segment that `pick` accepts, within `timeout`.
    pub fn next(&self, timeout: Duration, pick: impl Fn(&Seen) -> bool) -> Result<Option<Seen>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
        while Instant::now() < deadline {
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e).context("reading the raw TCP socket"),
            };
            // SAFETY: recv_from initialised the first n bytes.
            let pkt: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let Some(ip) = from.as_socket().map(|a| a.ip()) else {
                continue;
            };
            // IPv4 raw sockets get the IP header, IPv6 ones the TCP segment.
            let tcp = if self.v6 {
                &pkt[..]
            } else {
                let ihl = usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4;
                pkt.get(ihl..).unwrap_or(&[])
            };
            if let Some(seen) = parse_tcp(ip, tcp)
                && pick(&seen)
            {
                return Ok(Some(seen));
            }
        }
        Ok(None)
    }

    /// The next segment from `from` to local port `port`, within `timeout`.
    pub fn next_between(
        &self,
        from: SocketAddr,
        port: u16,
        timeout: Duration,
        pick: impl Fn(&Seen) -> bool,
    ) -> Result<Option<Seen>> {
        self.next(timeout, |s| s.src == from && s.dst_port == port && pick(s))
    }

    /// The SYN-ACK `server` sent to local port `port`, already received.
    pub fn syn_ack(&self, server: SocketAddr, port: u16) -> Result<Observed> {
        let Some(s) = self.next_between(server, port, ANSWER_WAIT, |s| s.has(SYN | ACK))? else {
            bail!("no SYN-ACK from {server} to port {port}");
        };
        Ok(Observed {
            server_isn: s.seq,
            client_first: s.ack,
        })
    }
}

/// The sequence numbers of a kernel TCP client's connection, read from the
/// server's SYN-ACK by a `Sniffer` opened before the connect.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    /// The server's ISN.
    pub server_isn: u32,
    /// The client's first byte: what the SYN-ACK acknowledged.
    pub client_first: u32,
}

/// A TCP segment from `src`'s address, if `tcp` holds a whole header.
fn parse_tcp(src: IpAddr, tcp: &[u8]) -> Option<Seen> {
    if tcp.len() < 20 {
        return None;
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    let be32 = |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
    Some(Seen {
        src: SocketAddr::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: be32(4),
        ack: be32(8),
        flags: tcp[13],
        payload: tcp.get(doff.max(20)..)?.to_vec(),
    })
}

/// One side of a TCP connection done by hand, after a real handshake with a
/// real peer. Opened on a thread inside a namespace; its sockets stay there,
/// so it can be used from any thread afterwards.
pub struct RawConn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Our initial sequence number: our first byte after the SYN is `isn + 1`.
    pub isn: u32,
    /// The peer's initial sequence number.
    pub peer_isn: u32,
    /// What the peer's SYN-ACK acknowledged: `isn + 1`, plus the Fast Open
    /// bytes of our SYN that it took. Zero on the server side.
    pub syn_acked: u32,
    sender: RawSender,
    sniffer: Sniffer,
}

impl RawConn {
    /// A client: sends `syn` (from `Tcp::new(local, remote).seq(isn).flags(SYN)`
    /// plus whatever the caller adds: options, Fast Open data) and waits for
    /// the SYN-ACK. The handshake's ACK is left to `complete` (or to a
    /// crafted `handshake_ack`). Must run inside the namespace.
    pub fn open(syn: &Tcp) -> Result<Self> {
        let (local, remote) = (syn.src, syn.dst);
        let sniffer = Sniffer::open(local.is_ipv6())?;
        let sender = RawSender::new(local.is_ipv6()).context("opening a raw IP socket")?;
        sender
            .send(&syn.ip_packet())
            .with_context(|| format!("sending a SYN {local} -> {remote}"))?;
        let syn_ack = sniffer
            .next_between(remote, local.port(), ANSWER_WAIT, |s| s.has(SYN | ACK))?
            .with_context(|| format!("no SYN-ACK from {remote} to {local}"))?;
        Ok(RawConn {
            local,
            remote,
            isn: syn.seq,
            peer_isn: syn_ack.seq,
            syn_acked: syn_ack.ack,
            sender,
            sniffer,
        })
    }

    /// A client with a completed handshake, no options, no SYN data.
    pub fn connect(local: SocketAddr, remote: SocketAddr) -> Result<Self> {
        let conn = Self::open(&Self::syn(local, remote))?;
        conn.complete()?;
        Ok(conn)
    }

    /// The plain SYN a client opens with; its ISN is derived from the port,
    /// so a failing test's log reads the same every run.
    pub fn syn(local: SocketAddr, remote: SocketAddr) -> Tcp {
        Tcp::new(local, remote)
            .seq(0x5d00_0000 | u32::from(local.port()))
            .flags(SYN)
    }

    /// A server: waits for a SYN to `local`, answers it and waits for the
    /// handshake's ACK. The namespace's own stack must not answer the SYN
    /// too (nothing listens on the port; `silence_resets`). Must run inside
    /// the namespace.
    pub fn accept(local: SocketAddr, timeout: Duration) -> Result<Self> {
        let sniffer = Sniffer::open(local.is_ipv6())?;
        let sender = RawSender::new(local.is_ipv6()).context("opening a raw IP socket")?;
        let syn = sniffer
            .next(timeout, |s| {
                s.dst_port == local.port() && s.flags & (SYN | ACK) == SYN
            })?
            .with_context(|| format!("no SYN to {local}"))?;
        let conn = RawConn {
            local,
            remote: syn.src,
            isn: 0x5e00_0000 | u32::from(syn.src.port()),
            peer_isn: syn.seq,
            syn_acked: 0,
            sender,
            sniffer,
        };
        let syn_ack = Tcp::new(local, conn.remote)
            .seq(conn.isn)
            .ack(syn.seq.wrapping_add(1))
            .flags(SYN | ACK);
        conn.send(&syn_ack)?;
        let want = conn.isn.wrapping_add(1);
        conn.sniffer
            .next_between(conn.remote, local.port(), ANSWER_WAIT, |s| {
                s.has(ACK) && !s.has(SYN) && s.ack == want
            })?
            .with_context(|| format!("no handshake ACK from {}", conn.remote))?;
        Ok(conn)
    }

    /// The ACK that completes a client's handshake, at the sequence number
    /// the SYN-ACK asked for; add payload to make it talk.
    pub fn handshake_ack(&self) -> Tcp {
        Tcp::new(self.local, self.remote)
            .seq(self.syn_acked)
            .ack(self.peer_isn.wrapping_add(1))
            .flags(ACK)
    }

    /// Sends the handshake's ACK.
    pub fn complete(&self) -> Result<()> {
        self.send(&self.handshake_ack())
    }

    /// A segment `offset` bytes from our first byte (`isn + 1`), acknowledging
    /// the peer's SYN: ACK alone; set flags and payload to taste.
    pub fn at(&self, offset: i32) -> Tcp {
        Tcp::new(self.local, self.remote)
            .seq(self.isn.wrapping_add(1).wrapping_add_signed(offset))
            .ack(self.peer_isn.wrapping_add(1))
            .flags(ACK)
    }

    /// `payload` at `offset`, pushed.
    pub fn data(&self, offset: i32, payload: &[u8]) -> Tcp {
        self.at(offset).flags(ACK | PSH).payload(payload)
    }

    pub fn send(&self, seg: &Tcp) -> Result<()> {
        self.sender
            .send(&seg.ip_packet())
            .with_context(|| format!("sending a segment {} -> {}", seg.src, seg.dst))
    }

    /// Sends `seg` as IP fragments of `chunk` bytes (`Tcp::fragments`).
    ///
    /// The first fragment (the one with the TCP header) goes last: the IP
    /// layer joins the segment the moment it arrives, in the same pass that
    /// shows spamdelay the header, so the segment reaches the server's TCP
    /// before any ban it causes. Sent in order, the rest could meet the
    /// ban (set in microseconds over netlink) and be refused, as it should
    /// be, but a test could then no longer show that the server took them.
    pub fn send_fragments(&self, seg: &Tcp, chunk: usize) -> Result<usize> {
        let frags = seg.fragments(chunk);
        for f in frags.iter().skip(1).chain(frags.first()) {
            self.sender.send(f).context("sending a fragment")?;
        }
        Ok(frags.len())
    }

    /// The next segment from the peer that `pick` accepts, within `timeout`.
    pub fn next(&self, timeout: Duration, pick: impl Fn(&Seen) -> bool) -> Result<Option<Seen>> {
        self.sniffer
            .next_between(self.remote, self.local.port(), timeout, pick)
    }
}

/// Completes a handshake from `src` to `dst` and sends `payload` on its ACK.
/// Must run on a thread inside the client namespace. Returns the server ISN.
/// The connection is left to die with the namespace.
pub fn handshake_ack_with_payload(
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    payload: &[u8],
) -> Result<u32> {
    let conn = RawConn::open(&RawConn::syn(src.into(), dst.into()))?;
    conn.send(&conn.handshake_ack().flags(ACK | PSH).payload(payload))?;
    Ok(conn.peer_isn)
}

/// A forger's sweep of the whole sequence space: one copy of `template`
/// every `step` bytes of sequence numbers (`seq = k * step`), all but
/// `skip`: packets ready for `RawSender::send_all`.
pub fn sweep(template: &Tcp, step: u32, skip: Option<u32>) -> Vec<Vec<u8>> {
    let count = (1u64 << 32) / u64::from(step);
    (0..count)
        .map(|k| (k * u64::from(step)) as u32)
        .filter(|&seq| Some(seq) != skip)
        .map(|seq| {
            let mut seg = template.clone();
            seg.seq = seq;
            seg.ip_packet()
        })
        .collect()
}
