//! A pausing SMTP test server and the clients that probe it: blind senders,
//! teaser talkers, hang-ups and patient clients. Blocking I/O on threads that
//! live inside the lab's namespaces.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Socket, Type};

use crate::{Watched, lab::Netns};

/// How the server greets.
#[derive(Clone, Copy, Debug)]
pub struct Greeting {
    /// Time the final `220 ` line is held back.
    pub pause: Duration,
    /// Send a `220-` teaser line at once, as postscreen does.
    pub teaser: bool,
    /// Send the final line in two segments, `22` and `0 ...\r\n`.
    pub split: bool,
}

impl Greeting {
    pub fn pause(ms: u64) -> Self {
        Greeting {
            pause: Duration::from_millis(ms),
            teaser: false,
            split: false,
        }
    }

    pub fn with_teaser(self) -> Self {
        Greeting {
            teaser: true,
            ..self
        }
    }

    pub fn split(self) -> Self {
        Greeting {
            split: true,
            ..self
        }
    }
}

pub const TEASER: &[u8] = b"220-mx.example.test ESMTP spamdelay test server\r\n";
pub const BANNER: &[u8] = b"220 mx.example.test ESMTP ready\r\n";

/// How the server listens, beyond how it greets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Listen {
    /// TCP_FASTOPEN with this queue length: SYN data is taken when the
    /// namespace's `net.ipv4.tcp_fastopen` has the server bits.
    pub fast_open: Option<u32>,
}

/// What each connection had received when the server sent its final
/// greeting line, by client address: proof that the kernel took early bytes.
type Heard = Watched<Vec<(SocketAddr, Vec<u8>)>>;

/// An SMTP server on `[::]:port` (IPv4 and IPv6) in a namespace; it stops
/// accepting when dropped.
pub struct TestServer {
    stop: Arc<AtomicBool>,
    heard: Arc<Heard>,
}

impl TestServer {
    pub fn start(ns: &Netns, port: u16, greeting: Greeting) -> Result<Self> {
        Self::start_with(ns, port, greeting, Listen::default())
    }

    pub fn start_with(ns: &Netns, port: u16, greeting: Greeting, listen: Listen) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let heard = Arc::new(Heard::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let (flag, log) = (stop.clone(), heard.clone());
        ns.spawn(move || {
            let listener = match bind(port, listen) {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let log = log.clone();
                        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                        thread::spawn(move || {
                            let _ = serve(conn, greeting, |early| {
                                log.update(|heard| heard.push((peer, early)))
                            });
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("test server did not start")?
            .with_context(|| format!("test server binding port {port}"))?;
        Ok(TestServer { stop, heard })
    }

    /// The bytes the connection from `peer` had received (and not yet read)
    /// when the server sent its final greeting line, waiting up to `timeout`
    /// for that moment. Urgent data is not among them: it is read apart.
    pub fn heard_before_greeting(&self, peer: SocketAddr, timeout: Duration) -> Option<Vec<u8>> {
        self.heard.wait_for(timeout, |heard| {
            heard
                .iter()
                .find(|(p, _)| *p == peer)
                .map(|(_, bytes)| bytes.clone())
        })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A non-blocking dual-stack listener on `[::]:port`.
fn bind(port: u16, listen: Listen) -> std::io::Result<TcpListener> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    if let Some(qlen) = listen.fast_open {
        let qlen = qlen as libc::c_int;
        // SAFETY: setsockopt reads a c_int from a live local.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_FASTOPEN,
                (&qlen as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    sock.listen(128)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// What `conn` has received and nobody has read yet, without reading it.
fn unread(conn: &TcpStream) -> std::io::Result<Vec<u8>> {
    conn.set_nonblocking(true)?;
    let mut buf = vec![0u8; 1 << 16];
    let got = conn.peek(&mut buf);
    conn.set_nonblocking(false)?;
    match got {
        Ok(n) => buf.truncate(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => buf.clear(),
        Err(e) => return Err(e),
    }
    Ok(buf)
}

fn serve(conn: TcpStream, greeting: Greeting, heard: impl FnOnce(Vec<u8>)) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = conn.try_clone()?;
    if greeting.teaser {
        out.write_all(TEASER)?;
    }
    thread::sleep(greeting.pause);
    heard(unread(&conn)?);
    if greeting.split {
        out.write_all(&BANNER[..2])?;
        thread::sleep(Duration::from_millis(50));
        out.write_all(&BANNER[2..])?;
    } else {
        out.write_all(BANNER)?;
    }
    let mut lines = BufReader::new(conn);
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if in_data {
            if line == ".\r\n" {
                in_data = false;
                out.write_all(b"250 2.0.0 queued\r\n")?;
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-mx.example.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 ok\r\n",
            "DATA" => {
                in_data = true;
                b"354 go ahead\r\n"
            }
            "QUIT" => {
                out.write_all(b"221 2.0.0 bye\r\n")?;
                return Ok(());
            }
            _ => b"502 5.5.2 unknown command\r\n",
        };
        out.write_all(reply)?;
    }
}

/// Connects from a chosen local address.
pub fn connect(src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("binding {src}"))?;
    sock.connect_timeout(&dst.into(), Duration::from_secs(5))
        .with_context(|| format!("connecting {src} -> {dst}"))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    Ok(stream)
}

/// Reads reply lines until a final one (fourth character not `-`).
pub fn read_reply(r: &mut impl BufRead) -> Result<String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(anyhow!("connection closed after {all:?}"));
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(all);
        }
    }
}

/// The client's local port, as spamdelay will log it.
pub type ClientPort = u16;

/// Talks without waiting for the greeting, then hangs up.
pub fn blind(src: IpAddr, dst: SocketAddr) -> Result<ClientPort> {
    talk_after(
        src,
        dst,
        Duration::ZERO,
        b"EHLO blind.example\r\nMAIL FROM:<spam@example.com>\r\n",
    )
}

/// Stays silent for `wait`, then sends `words` without waiting for the
/// greeting, then hangs up.
pub fn talk_after(
    src: IpAddr,
    dst: SocketAddr,
    wait: Duration,
    words: &[u8],
) -> Result<ClientPort> {
    let mut s = connect(src, dst)?;
    let port = s.local_addr()?.port();
    thread::sleep(wait);
    s.write_all(words)?;
    thread::sleep(Duration::from_millis(100));
    Ok(port)
}

/// Reads the `220-` teaser, then talks before the final line.
pub fn teaser_talker(src: IpAddr, dst: SocketAddr) -> Result<ClientPort> {
    let s = connect(src, dst)?;
    let port = s.local_addr()?.port();
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("220-") {
        return Err(anyhow!("expected a teaser, got {line:?}"));
    }
    (&s).write_all(b"EHLO eager.example\r\n")?;
    thread::sleep(Duration::from_millis(100));
    Ok(port)
}

/// Waits for the whole greeting, then says EHLO and QUIT.
pub fn patient(src: IpAddr, dst: SocketAddr) -> Result<ClientPort> {
    let s = connect(src, dst)?;
    let port = s.local_addr()?.port();
    converse_patiently(&s)?;
    Ok(port)
}

/// On a connected stream: waits for the whole greeting, then says EHLO and
/// QUIT.
pub fn converse_patiently(s: &TcpStream) -> Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let greeting = read_reply(&mut r)?;
    if !greeting.contains("220 ") {
        return Err(anyhow!("unexpected greeting {greeting:?}"));
    }
    (&*s).write_all(b"EHLO patient.example\r\n")?;
    read_reply(&mut r)?;
    (&*s).write_all(b"QUIT\r\n")?;
    read_reply(&mut r)?;
    Ok(())
}

/// Connects, stays silent for `wait`, hangs up (FIN) before the greeting.
pub fn hang_up(src: IpAddr, dst: SocketAddr, wait: Duration) -> Result<ClientPort> {
    let mut s = connect(src, dst)?;
    let port = s.local_addr()?.port();
    thread::sleep(wait);
    s.shutdown(std::net::Shutdown::Both)?;
    // Drain whatever arrives so the close is orderly.
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = s.read(&mut [0u8; 256]);
    Ok(port)
}
