//! Load-test helpers: thousands of client addresses added in one `ip -batch`,
//! a server that accepts and holds connections without ever greeting, and a
//! parallel connector that talks first from each address.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Socket, Type};

use crate::lab::Netns;

/// Adds every address in `addrs` as `/prefix` on `dev` in `ns`, through one
/// `ip -batch` (one process, one netlink socket: thousands per second where
/// one `ip` each would take minutes). IPv6 ones `nodad`, or binding them
/// fails with EADDRNOTAVAIL until duplicate address detection ends a second
/// or two later.
pub fn add_addresses<A: Into<IpAddr> + Copy>(
    ns: &Netns,
    dev: &str,
    addrs: &[A],
    prefix: u8,
) -> Result<()> {
    let mut batch = tempfile::NamedTempFile::new().context("creating the ip batch file")?;
    for &a in addrs {
        let a: IpAddr = a.into();
        let nodad = if a.is_ipv6() { " nodad" } else { "" };
        writeln!(batch, "address add {a}/{prefix} dev {dev}{nodad}")
            .context("writing the ip batch file")?;
    }
    batch.flush().context("writing the ip batch file")?;
    let path = batch.path().to_str().context("a UTF-8 temp path")?;
    ns.ip(&["-batch", path])
}

/// `sysctl -w KEY=VALUE` inside `ns` (only per-namespace keys belong here:
/// the host's own settings are never changed).
pub fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let out = ns
        .command("sysctl")
        .args(["-q", "-w", &format!("{key}={value}")])
        .output()
        .context("running sysctl")?;
    if !out.status.success() {
        bail!(
            "sysctl {key}={value} in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Raises this process's soft open-file limit to at least `need` (within the
/// hard limit): a flood test holds both ends of every connection.
pub fn raise_fd_limit(need: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        bail!(
            "need {need} open files, but the hard limit is {}: raise it (ulimit -Hn)",
            lim.rlim_max
        );
    }
    lim.rlim_cur = need;
    // SAFETY: as above; only this process's soft limit changes.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(())
}

/// How often the holding server looks at its stop flag.
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// A TCP server on `[::]:port` in a namespace that accepts every connection
/// and holds it, silent: it never greets, so whoever talks is an early talker.
/// One thread in all, the streams kept in a `Vec`; stopped on drop.
pub struct SilentServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<usize>>>>,
}

impl SilentServer {
    /// Listens with accept backlog `backlog` (the kernel caps it at the
    /// namespace's `net.core.somaxconn`).
    pub fn start(ns: &Netns, port: u16, backlog: i32) -> Result<Self> {
        Self::start_keeping(ns, port, backlog, Keep::All)
    }

    /// Like `start`, but each connection is closed once its client has sent
    /// something, closed or reset it, so a flood of any size fits in the
    /// open-file limit. Its client's first bytes passed tc ingress on their
    /// way to the socket, so the kernel program has judged them; closing
    /// before they came would end a flow before its payload was seen. (Its
    /// reset alone is not enough: a ban in place before it drops it.)
    pub fn start_releasing(ns: &Netns, port: u16, backlog: i32) -> Result<Self> {
        Self::start_keeping(ns, port, backlog, Keep::UntilPeerCloses)
    }

    fn start_keeping(ns: &Netns, port: u16, backlog: i32, keep: Keep) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = ns.spawn(move || -> Result<usize> {
            let listener = match listen(port, backlog) {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    // Reported by `start`; nothing was accepted.
                    let _ = ready_tx.send(Err(e));
                    return Ok(0);
                }
            };
            let mut held = Vec::new();
            let mut accepted = 0;
            while !flag.load(Ordering::Relaxed) {
                // Now and then, not per accept: a sweep costs one read per
                // held connection.
                if keep == Keep::UntilPeerCloses && accepted % RELEASE_SWEEP_EVERY == 0 {
                    held.retain(peer_still_silent);
                }
                match listener.accept() {
                    Ok((conn, _)) => {
                        accepted += 1;
                        if keep == Keep::UntilPeerCloses {
                            conn.set_nonblocking(true)?;
                        }
                        held.push(conn);
                    }
                    // The accept timeout (SO_RCVTIMEO) ran out: look at the flag.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        if keep == Keep::UntilPeerCloses {
                            held.retain(peer_still_silent);
                        }
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("accepting after {accepted}"));
                    }
                }
            }
            Ok(accepted)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the silent server did not start")??;
        Ok(SilentServer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting, closes every held connection, and returns how many
    /// connections it accepted.
    pub fn stop(mut self) -> Result<usize> {
        self.halt()
    }

    fn halt(&mut self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().context("already stopped")?;
        // No resume_unwind: this also runs in `drop`, maybe while unwinding.
        thread
            .join()
            .map_err(|_| anyhow!("the silent server's thread panicked"))??
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        if self.thread.is_some()
            && let Err(e) = self.halt()
        {
            // A failed test's own panic says what broke for the clients;
            // this says why, should the server have given up first.
            eprintln!("silent server: {e:#}");
        }
    }
}

/// A releasing server sweeps its held connections after this many accepts
/// (and whenever accept times out).
const RELEASE_SWEEP_EVERY: usize = 256;

/// What the silent server keeps of the connections it accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Every one, until the server stops.
    All,
    /// Each until its client closes or resets it.
    UntilPeerCloses,
}

/// Whether a held (non-blocking) connection must still be held: its client
/// has sent nothing yet, and has not closed or reset it.
fn peer_still_silent(conn: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match (&*conn).read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Data, end of stream or an error (a reset).
            _ => return false,
        }
    }
}

/// A blocking IPv6 listener whose `accept` gives up after `ACCEPT_TICK`
/// (Linux honours SO_RCVTIMEO on accept), so the loop can notice its stop
/// flag without busy polling or a thread per connection.
fn listen(port: u16, backlog: i32) -> Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, None).context("creating a socket")?;
    sock.set_reuse_address(true)?;
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    sock.bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    sock.listen(backlog).context("listening")?;
    sock.set_read_timeout(Some(ACCEPT_TICK))?;
    Ok(sock.into())
}

/// From `ns`, opens one connection to `dst` from each address in `srcs` and
/// writes `payload` at once, spread over `threads` threads. Returns the open
/// streams, in no particular order.
pub fn connect_all(
    ns: &Netns,
    srcs: &[IpAddr],
    dst: SocketAddr,
    payload: &'static [u8],
    threads: usize,
) -> Result<Vec<TcpStream>> {
    let chunk = srcs.len().div_ceil(threads.max(1)).max(1);
    let workers: Vec<_> = srcs
        .chunks(chunk)
        .map(|part| {
            let part = part.to_vec();
            ns.spawn(move || -> Result<Vec<TcpStream>> {
                part.into_iter()
                    .map(|src| talk_first(src, dst, payload))
                    .collect()
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(srcs.len());
    for w in workers {
        let part = match w.join() {
            Ok(r) => r??,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        streams.extend(part);
    }
    Ok(streams)
}

/// Connects from `src` and sends `payload` without waiting for a greeting.
fn talk_first(src: IpAddr, dst: SocketAddr, payload: &[u8]) -> Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("binding {src}"))?;
    sock.connect_timeout(&dst.into(), Duration::from_secs(5))
        .with_context(|| format!("connecting {src} -> {dst}"))?;
    let mut stream: TcpStream = sock.into();
    stream
        .write_all(payload)
        .with_context(|| format!("writing from {src}"))?;
    Ok(stream)
}

/// The prefix `anyip_addr` numbers clients in: 2001:db8::/64's upper half
/// from the fifth group on, clear of the lab's clients (::10..) and server
/// (::25).
pub const ANYIP_NET: &str = "2001:db8:0:0:8000::/65";

/// Client `i` (up to 2^31) in `ANYIP_NET`: 2001:db8::8000+hi:lo:0:1.
pub fn anyip_addr(i: u32) -> Ipv6Addr {
    // Bits 16.. in the fifth group, bits 0..16 in the sixth; both as u16 by
    // construction (i < 2^31 keeps the fifth group below 0x10000).
    let hi = 0x8000 | ((i >> 16) & 0x7fff) as u16;
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, hi, (i & 0xffff) as u16, 0, 1)
}

/// Makes every address in `net` local to `ns` at once, an AnyIP route
/// (`local NET dev lo`), so sockets with `IPV6_FREEBIND` can use any of them
/// as their source (`talk_first_freebind`). Adding addresses one by one
/// (`add_addresses`) slows down quadratically: 5,000 take 0.3 s, 75,000 took
/// ten minutes here. The server side must route `net` back to this
/// namespace, through one neighbour.
pub fn route_local(ns: &Netns, net: &str) -> Result<()> {
    ns.ip(&["-6", "route", "add", "local", net, "dev", "lo"])
}

/// Connects from `src` (any address of a `route_local` prefix: the socket
/// binds with `IPV6_FREEBIND`) to `dst` and writes `payload` without waiting
/// for a greeting. Returns the stream and the moment just before the write.
/// Must run on a thread inside the client namespace.
pub fn talk_first_freebind(
    src: Ipv6Addr,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<(TcpStream, Instant)> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    sock.set_freebind_v6(true)
        .context("setting IPV6_FREEBIND")?;
    sock.bind(&SocketAddr::new(src.into(), 0).into())
        .with_context(|| format!("binding {src}"))?;
    sock.connect_timeout(&dst.into(), Duration::from_secs(5))
        .with_context(|| format!("connecting {src} -> {dst}"))?;
    let mut stream: TcpStream = sock.into();
    let at = Instant::now();
    stream
        .write_all(payload)
        .with_context(|| format!("writing from {src}"))?;
    Ok((stream, at))
}

/// Closes `stream` with a reset (SO_LINGER 0): no FIN_WAIT socket outlives
/// it, so a flood of any size costs neither file descriptors nor memory.
pub fn reset(stream: TcpStream) -> Result<()> {
    Socket::from(stream)
        .set_linger(Some(Duration::ZERO))
        .context("setting SO_LINGER")
}
