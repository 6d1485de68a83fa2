//! Load-test helpers: thousands of client addresses added in one `ip -batch`,
//! a server that accepts and holds connections without ever greeting, and a
//! parallel connector that talks first from each address.

use std::{
    io::Write,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Socket, Type};

use crate::lab::Netns;

/// Adds every address in `addrs` as `/prefix` on `dev` in `ns`, through one
/// `ip -batch` (one process, one netlink socket: thousands per second where
/// one `ip` each would take minutes). `nodad`, or binding them fails with
/// EADDRNOTAVAIL until duplicate address detection ends a second or two later.
pub fn add_addresses(ns: &Netns, dev: &str, addrs: &[Ipv6Addr], prefix: u8) -> Result<()> {
    let mut batch = tempfile::NamedTempFile::new().context("creating the ip batch file")?;
    for a in addrs {
        writeln!(batch, "address add {a}/{prefix} dev {dev} nodad")
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
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => held.push(conn),
                    // The accept timeout (SO_RCVTIMEO) ran out: look at the flag.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("accepting after {}", held.len()));
                    }
                }
            }
            Ok(held.len())
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
