//! nf_tables' own change notifications (NETLINK_NETFILTER, group
//! NFNLGRP_NFTABLES) read in process inside a lab namespace: each element
//! added to any set, stamped the moment its datagram is received. What `nft
//! monitor` reports, without a process that formats text into a pipe.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use netlink_packet_core::{NLMSG_ALIGNTO, NetlinkBuffer, Nla, Parseable};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, SetElementAttribute, SetElementFlags, SetElementList,
    SetElementMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::{
    lab::Netns,
    nft::{Added, Additions},
};

/// `NFNLGRP_NFTABLES`: the multicast group of nf_tables' change
/// notifications, sent once a transaction has committed.
const NFNLGRP_NFTABLES: u32 = 7;
/// nfnetlink subsystem of nf_tables, in the high byte of a message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
/// The end of a transaction's notifications (with its generation number).
const NFT_MSG_NEWGEN: u16 = 15;
/// Size of `struct nfgenmsg`, before a message's attributes.
const NFGENMSG_LEN: usize = 4;
/// The receive buffer asked for: 100,000 bans' notifications, should the
/// reader fall behind for a while (forced past rmem_max with CAP_NET_ADMIN).
const RCVBUF: usize = 64 << 20;
/// The largest datagram read whole; a notification skb is at most a page or
/// two (NLMSG_GOODSIZE), so a longer one would be a surprise, and is counted.
const DATAGRAM_MAX: usize = 256 << 10;
/// How often the receiving thread looks at its stop flag.
const RECV_TICK: Duration = Duration::from_millis(100);

/// Counters of what could not be seen.
#[derive(Default)]
struct Losses {
    /// Receive buffer overruns (ENOBUFS): notifications the kernel dropped.
    overruns: AtomicU64,
    /// Datagrams longer than DATAGRAM_MAX, read cut.
    truncated: AtomicU64,
    /// NEWSETELEM messages that did not decode.
    undecoded: AtomicU64,
}

/// Every element added to any set of a namespace, as nf_tables announces it
/// after each commit. One thread blocks on the socket and only stamps and
/// passes datagrams on (at real-time priority when it may have it, so a busy
/// machine does not delay the stamp); another decodes them. Stopped on drop.
pub struct Watcher {
    additions: Additions,
    losses: Arc<Losses>,
    realtime: bool,
    stop: Arc<AtomicBool>,
    /// The receiving thread (inside the namespace: entering it may fail).
    receiver: Option<JoinHandle<Result<Result<()>>>>,
    decoder: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Joins the notification group in `ns` and starts reading; listening
    /// when it returns.
    pub fn start(ns: &Netns) -> Result<Watcher> {
        let additions = Additions::default();
        let losses = Arc::new(Losses::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (datagrams_tx, datagrams_rx) = mpsc::channel();
        let flag = stop.clone();
        let counters = losses.clone();
        let receiver = ns.spawn(move || -> Result<()> {
            let socket = match open() {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(realtime()));
            receive(&socket, &flag, &counters, &datagrams_tx)
        });
        let sink = additions.clone();
        let counters = losses.clone();
        // Ends when the receiver does (its end of the channel goes).
        let decoder = std::thread::spawn(move || {
            let mut commit = Vec::new();
            for datagram in datagrams_rx {
                decode(datagram, &mut commit, &sink, &counters);
            }
        });
        let mut watcher = Watcher {
            additions,
            losses,
            realtime: false,
            stop,
            receiver: Some(receiver),
            decoder: Some(decoder),
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(realtime)) => watcher.realtime = realtime,
            Ok(Err(e)) => return Err(e).context("watching nf_tables notifications"),
            // No word: the thread could not enter the namespace, or hangs.
            Err(_) => {
                watcher.halt()?;
                bail!("watching nf_tables notifications: the receiving thread did not start");
            }
        }
        Ok(watcher)
    }

    /// What the watcher has seen.
    pub fn additions(&self) -> &Additions {
        &self.additions
    }

    /// Receive buffer overruns so far: each lost some notifications, so a
    /// count of zero means nothing was missed.
    pub fn overruns(&self) -> u64 {
        self.losses.overruns.load(Ordering::Relaxed)
    }

    /// Datagrams read cut, and element messages that did not decode.
    pub fn unread(&self) -> u64 {
        self.losses.truncated.load(Ordering::Relaxed)
            + self.losses.undecoded.load(Ordering::Relaxed)
    }

    /// Whether the receiving thread runs at real-time priority (SCHED_FIFO
    /// 1); without it, its stamps may wait for a core.
    pub fn realtime(&self) -> bool {
        self.realtime
    }

    /// One line for a report: how the stamps were taken and what was lost.
    pub fn describe(&self) -> String {
        format!(
            "in-process nf_tables notification watcher (NFNLGRP_NFTABLES, receiving thread {}): {} receive buffer overruns, {} messages unread",
            if self.realtime {
                "at SCHED_FIFO 1"
            } else {
                "at normal priority (SCHED_FIFO refused)"
            },
            self.overruns(),
            self.unread()
        )
    }

    /// Stops both threads; the receiver's error, if it met one.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let mut result = Ok(());
        if let Some(t) = self.receiver.take() {
            result = match t.join() {
                Ok(r) => r.and_then(|r| r),
                Err(_) => Err(anyhow!("the receiving thread panicked")),
            };
        }
        if let Some(t) = self.decoder.take()
            && t.join().is_err()
            && result.is_ok()
        {
            result = Err(anyhow!("the decoding thread panicked"));
        }
        result
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Err(e) = self.halt() {
            eprintln!("nf_tables watcher: {e:#}");
        }
    }
}

/// A socket in the calling thread's namespace, in the notification group,
/// with a big receive buffer and a receive timeout of RECV_TICK.
fn open() -> Result<Socket> {
    let mut socket =
        Socket::new(NETLINK_NETFILTER).context("opening a NETLINK_NETFILTER socket")?;
    socket
        .bind(&SocketAddr::new(0, 0))
        .context("binding the netlink socket")?;
    socket
        .add_membership(NFNLGRP_NFTABLES)
        .context("joining NFNLGRP_NFTABLES")?;
    set_int(&socket, libc::SO_RCVBUFFORCE, RCVBUF)
        .or_else(|_| set_int(&socket, libc::SO_RCVBUF, RCVBUF))
        .context("raising the receive buffer")?;
    let tick = libc::timeval {
        tv_sec: 0,
        tv_usec: RECV_TICK.as_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads exactly size_of::<timeval>() bytes of `tick`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tick as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setting SO_RCVTIMEO");
    }
    Ok(socket)
}

fn set_int(socket: &Socket, option: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes of `value`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts the calling thread at SCHED_FIFO 1; whether it took. It only wakes
/// for a datagram, stamps it and hands it on, so it starves nobody.
fn realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets this thread's own policy from a local struct.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// One datagram and the moment it was received.
struct Datagram {
    at: Instant,
    bytes: Vec<u8>,
}

/// Reads datagrams until `stop`, stamping each as `recv` returns.
fn receive(
    socket: &Socket,
    stop: &AtomicBool,
    losses: &Losses,
    out: &mpsc::Sender<Datagram>,
) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(DATAGRAM_MAX);
    while !stop.load(Ordering::Relaxed) {
        buf.clear();
        match socket.recv(&mut buf, libc::MSG_TRUNC) {
            Ok(len) => {
                let at = Instant::now();
                if len > buf.len() {
                    losses.truncated.fetch_add(1, Ordering::Relaxed);
                }
                let datagram = Datagram {
                    at,
                    bytes: buf.clone(),
                };
                if out.send(datagram).is_err() {
                    break;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                losses.overruns.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("reading nf_tables notifications"),
        }
    }
    Ok(())
}

/// One element of a NEWSETELEM notification, before interval ends are
/// paired with their starts.
#[derive(Clone, Debug)]
struct Raw {
    at: Instant,
    table: String,
    set: String,
    key: Vec<u8>,
    /// NFTA_SET_ELEM_KEY_END: the inclusive end of a range, in sets that
    /// store ranges whole (concatenations).
    key_end: Option<Vec<u8>>,
    /// NFT_SET_ELEM_INTERVAL_END: the exclusive end of the interval that
    /// starts below it.
    ends: bool,
    catchall: bool,
}

/// Decodes one datagram: elements join the transaction in progress, which a
/// NEWGEN (sent after all of a commit's notifications) closes.
fn decode(datagram: Datagram, commit: &mut Vec<Raw>, sink: &Additions, losses: &Losses) {
    let mut rest = datagram.bytes.as_slice();
    while let Ok(msg) = NetlinkBuffer::new_checked(rest) {
        let len = msg.length() as usize;
        let kind = msg.message_type();
        if kind >> 8 == NFNL_SUBSYS_NFTABLES {
            match kind & 0xff {
                NFT_MSG_NEWSETELEM => match elements(msg.payload(), datagram.at) {
                    Some(raw) => commit.extend(raw),
                    None => {
                        losses.undecoded.fetch_add(1, Ordering::Relaxed);
                    }
                },
                NFT_MSG_NEWGEN => sink.record(pair(std::mem::take(commit)), true),
                _ => {}
            }
        }
        let next = len.next_multiple_of(usize::from(NLMSG_ALIGNTO));
        if len == 0 || next > rest.len() {
            break;
        }
        rest = &rest[next..];
    }
}

/// The elements of one NEWSETELEM message (its payload: nfgenmsg, then
/// attributes); None when it does not decode.
fn elements(payload: &[u8], at: Instant) -> Option<Vec<Raw>> {
    let msg = SetElementMessage::parse(payload.get(NFGENMSG_LEN..)?).ok()?;
    let mut table = None;
    let mut set = None;
    let mut list = Vec::new();
    for a in msg.attributes {
        match a {
            SetElementList::Table(t) => table = Some(t),
            SetElementList::Set(s) => set = Some(s),
            SetElementList::Elements(e) => list = e,
            _ => {}
        }
    }
    let (table, set) = (table?, set?);
    let mut out = Vec::with_capacity(list.len());
    for element in list {
        let ListAttribute::Element(attrs) = element else {
            continue;
        };
        let mut raw = Raw {
            at,
            table: table.clone(),
            set: set.clone(),
            key: Vec::new(),
            key_end: None,
            ends: false,
            catchall: false,
        };
        for attr in attrs {
            match attr {
                SetElementAttribute::Key(DataAttribute::Value(k)) => raw.key = k,
                SetElementAttribute::KeyEnd(nlas) => {
                    raw.key_end = nlas.first().map(|n| {
                        let mut v = vec![0; n.value_len()];
                        n.emit_value(&mut v);
                        v
                    })
                }
                SetElementAttribute::Flags(f) => {
                    raw.ends = f.contains(SetElementFlags::IntervalEnd);
                    raw.catchall = f.contains(SetElementFlags::CatchAll);
                }
                _ => {}
            }
        }
        out.push(raw);
    }
    Some(out)
}

/// One transaction's elements as `nft monitor` prints them: in an interval
/// set, each start and the end above it make one element (an address, a
/// network, or a range), stamped and ordered by the later of the two.
fn pair(commit: Vec<Raw>) -> Vec<Added> {
    let mut out: Vec<(usize, Added)> = Vec::new();
    let mut sets: Vec<(&str, &str)> = Vec::new();
    for r in &commit {
        if !sets.contains(&(r.table.as_str(), r.set.as_str())) {
            sets.push((&r.table, &r.set));
        }
    }
    for (table, set) in sets {
        let mut idx: Vec<usize> = (0..commit.len())
            .filter(|&i| commit[i].table == table && commit[i].set == set)
            .collect();
        // By key, an end before a start on the same key (adjacent intervals).
        idx.sort_by(|&a, &b| {
            let (a, b) = (&commit[a], &commit[b]);
            a.key.cmp(&b.key).then(b.ends.cmp(&a.ends))
        });
        let mut k = 0;
        while k < idx.len() {
            let (first, start) = (idx[k], &commit[idx[k]]);
            k += 1;
            if start.ends {
                // An end whose start is not in this transaction.
                continue;
            }
            let end = idx
                .get(k)
                .filter(|&&i| commit[i].ends && commit[i].key.len() == start.key.len())
                .copied();
            // Where the element stands: where its later half arrived.
            let mut order = first;
            let (element, at) = if start.catchall {
                ("*".to_string(), start.at)
            } else if let Some(i) = end {
                k += 1;
                order = order.max(i);
                let last = minus_one(&commit[i].key);
                (range(&start.key, &last), start.at.max(commit[i].at))
            } else if let Some(last) = &start.key_end {
                (range(&start.key, last), start.at)
            } else {
                (key(&start.key), start.at)
            };
            out.push((
                order,
                Added {
                    at,
                    table: table.to_string(),
                    set: set.to_string(),
                    element,
                },
            ));
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, a)| a).collect()
}

/// A big-endian key minus one (the inclusive end before an exclusive one).
fn minus_one(key: &[u8]) -> Vec<u8> {
    let mut out = key.to_vec();
    for b in out.iter_mut().rev() {
        let (v, borrow) = b.overflowing_sub(1);
        *b = v;
        if !borrow {
            break;
        }
    }
    out
}

/// A key as nft prints it: an IPv4 or IPv6 address by its length (the ban
/// sets' types), anything else in hex.
fn key(bytes: &[u8]) -> String {
    if let Ok(a) = <[u8; 4]>::try_from(bytes) {
        Ipv4Addr::from(a).to_string()
    } else if let Ok(a) = <[u8; 16]>::try_from(bytes) {
        Ipv6Addr::from(a).to_string()
    } else {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

/// `first..=last` as nft prints it: one address, a network
/// (`198.51.100.0/24`), or a range (`192.0.2.1-192.0.2.9`).
fn range(first: &[u8], last: &[u8]) -> String {
    if first == last {
        return key(first);
    }
    let (Some(f), Some(l)) = (as_u128(first), as_u128(last)) else {
        return format!("{}-{}", key(first), key(last));
    };
    let bits = 8 * first.len() as u32;
    let span = f ^ l;
    // A network: the two differ in exactly the low host bits, all zero in
    // the first and all one in the last.
    if l >= f && (span & span.wrapping_add(1)) == 0 && f & span == 0 && l & span == span {
        let host = u128::BITS - span.leading_zeros();
        format!("{}/{}", key(first), bits - host)
    } else {
        format!("{}-{}", key(first), key(last))
    }
}

fn as_u128(bytes: &[u8]) -> Option<u128> {
    (bytes.len() <= 16).then(|| bytes.iter().fold(0u128, |v, b| (v << 8) | u128::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(set: &str, key: &[u8], ends: bool, at: Instant) -> Raw {
        Raw {
            at,
            table: "t".into(),
            set: set.into(),
            key: key.to_vec(),
            key_end: None,
            ends,
            catchall: false,
        }
    }

    fn v4(s: &str) -> Vec<u8> {
        s.parse::<Ipv4Addr>().expect("an address").octets().to_vec()
    }

    fn v6(s: &str) -> Vec<u8> {
        s.parse::<Ipv6Addr>().expect("an address").octets().to_vec()
    }

    fn names(added: &[Added]) -> Vec<(&str, &str)> {
        added
            .iter()
            .map(|a| (a.set.as_str(), a.element.as_str()))
            .collect()
    }

    #[test]
    fn keys_read_as_addresses_by_length() {
        assert_eq!(key(&v4("198.51.100.7")), "198.51.100.7");
        assert_eq!(key(&v6("2001:db8::8000:5:0:1")), "2001:db8::8000:5:0:1");
        assert_eq!(key(&[0, 25]), "0x0019");
    }

    #[test]
    fn ranges_read_as_networks_when_they_are() {
        assert_eq!(
            range(&v4("198.51.100.0"), &v4("198.51.100.255")),
            "198.51.100.0/24"
        );
        assert_eq!(range(&v4("192.0.2.9"), &v4("192.0.2.9")), "192.0.2.9");
        assert_eq!(
            range(&v4("192.0.2.1"), &v4("192.0.2.9")),
            "192.0.2.1-192.0.2.9"
        );
        assert_eq!(range(&v4("0.0.0.0"), &v4("255.255.255.255")), "0.0.0.0/0");
        assert_eq!(
            range(
                &v6("2001:db8:1::"),
                &v6("2001:db8:1:ffff:ffff:ffff:ffff:ffff")
            ),
            "2001:db8:1::/48"
        );
        // Aligned size but not aligned start: a range.
        assert_eq!(
            range(&v4("192.0.2.2"), &v4("192.0.2.5")),
            "192.0.2.2-192.0.2.5"
        );
        assert_eq!(minus_one(&v4("198.51.101.0")), v4("198.51.100.255"));
    }

    #[test]
    fn interval_starts_and_ends_pair_up_in_either_order() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_micros(5);
        let commit = vec![
            raw("plain", &v6("2001:db8::2"), false, t0),
            raw("nets", &v4("198.51.101.0"), true, t0),
            raw("nets", &v4("198.51.100.0"), false, t1),
            raw("nets", &v4("192.0.2.9"), false, t1),
            raw("nets", &v4("192.0.2.10"), true, t1),
            raw("plain", &v6("2001:db8::1"), false, t1),
            // Adjacent intervals: the first's end is the second's start.
            raw("nets", &v4("203.0.113.0"), false, t1),
            raw("nets", &v4("203.0.113.128"), true, t1),
            raw("nets", &v4("203.0.113.128"), false, t1),
            raw("nets", &v4("203.0.114.0"), true, t1),
        ];
        let added = pair(commit);
        assert_eq!(
            names(&added),
            [
                ("plain", "2001:db8::2"),
                ("nets", "198.51.100.0/24"),
                ("nets", "192.0.2.9"),
                ("plain", "2001:db8::1"),
                ("nets", "203.0.113.0/25"),
                ("nets", "203.0.113.128/25"),
            ]
        );
        // Stamped when the later half arrived.
        assert_eq!(added[1].at, t1);
        assert_eq!(added[0].at, t0);
    }
}
