//! A TCP client done by hand over raw IPv4 sockets, for what the kernel's own
//! TCP never sends: payload riding on the handshake's ACK. The client
//! namespace's own stack would reset the handshake it does not know, so its
//! outgoing RSTs from the raw client's address are dropped by nft there.

use std::{
    io,
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    lab::Netns,
    packet::{ACK, PSH, SYN, Tcp, send_raw_ipv4},
};

/// Makes the client namespace drop the RSTs its stack would send from `src`
/// (the namespace is the test's own; this touches nothing else).
pub fn silence_resets(ns: &Netns, src: Ipv4Addr) -> Result<()> {
    for cmd in [
        "add table ip raw_client".to_string(),
        "add chain ip raw_client out { type filter hook output priority 0; }".to_string(),
        format!("add rule ip raw_client out ip saddr {src} tcp flags & rst != 0 drop"),
    ] {
        let out = ns
            .command("nft")
            .arg(&cmd)
            .output()
            .context("running nft (apt-get install nftables)")?;
        if !out.status.success() {
            bail!("nft {cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// Completes a handshake from `src` to `dst` and sends `payload` on its ACK.
/// Must run on a thread inside the client namespace. Returns the server ISN.
/// The connection is left to die with the namespace: a closing RST from this
/// address would meet the nft rule that keeps the stack's own RSTs in.
pub fn handshake_ack_with_payload(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Result<u32> {
    let listen = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    listen.set_read_timeout(Some(Duration::from_millis(200)))?;
    let isn: u32 = 0x5d00_0000 | u32::from(src.port());
    let (s, d) = (SocketAddr::V4(src), SocketAddr::V4(dst));
    send_raw_ipv4(&Tcp::new(s, d).seq(isn).flags(SYN).ip_packet())?;
    let server_isn = wait_syn_ack(&listen, src, dst)?;
    let ack = Tcp::new(s, d)
        .seq(isn.wrapping_add(1))
        .ack(server_isn.wrapping_add(1))
        .flags(ACK | PSH)
        .payload(payload.to_vec());
    send_raw_ipv4(&ack.ip_packet())?;
    Ok(server_isn)
}

/// The server's ISN from its SYN-ACK to `src`.
fn wait_syn_ack(sock: &Socket, src: SocketAddrV4, dst: SocketAddrV4) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while Instant::now() < deadline {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        // SAFETY: recv initialised the first n bytes.
        let pkt: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        if let Some(isn) = syn_ack_isn(&pkt, src, dst) {
            return Ok(isn);
        }
    }
    bail!("no SYN-ACK from {dst} to {src} within 5 s")
}

/// The sequence number of an IPv4 SYN-ACK from `dst` to `src`, if `pkt` is one.
fn syn_ack_isn(pkt: &[u8], src: SocketAddrV4, dst: SocketAddrV4) -> Option<u32> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    let tcp = pkt.get(ihl..ihl + 20)?;
    let from = Ipv4Addr::new(*pkt.get(12)?, pkt[13], pkt[14], pkt[15]);
    let to = Ipv4Addr::new(*pkt.get(16)?, pkt[17], pkt[18], pkt[19]);
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let ours = from == *dst.ip() && sport == dst.port() && to == *src.ip() && dport == src.port();
    (ours && tcp[13] & (SYN | ACK) == SYN | ACK)
        .then(|| u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]))
}
