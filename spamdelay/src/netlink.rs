//! Ban set elements written in process over netlink, in nf_tables' own batch
//! protocol: no `nft` child per batch. Each element is a message of its own,
//! so the kernel's answer names the change it refuses (a full set above all).

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ALIGNTO, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    nftables::{
        DataAttribute, ListAttribute, NfTablesMessage, SetAttribute, SetElementAttribute,
        SetElementList, SetElementMessage, SetFlags, SetMessage,
    },
    none::ControlMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::nft::{self, Change, TABLE};

/// One transaction is cut at this many encoded bytes; the rest goes in the
/// next (each transaction is atomic on its own, not across the cut).
pub const BATCH_BYTES: usize = 64 * 1024;

/// The receive buffer asked for. Every message of a transaction is answered
/// (an ACK or an error), all queued at once when the kernel has run the
/// batch; answers that do not fit are dropped, and the outcome is unknown.
const RCVBUF: usize = 4 << 20;
/// What one answer costs of the receive buffer (its skb's truesize: 832
/// bytes measured on Linux 6.18, rounded up). With the default buffer
/// (rmem_default, 208 KiB, doubled by the kernel) that is 416 answers, fewer
/// than the messages in 64 KiB, so transactions are cut at the count too.
const ANSWER_BYTES: usize = 1024;

/// nfnetlink subsystem of nf_tables, in the batch header's `res_id`.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_DESTROYSETELEM` (Linux 6.3): deletes an element, and is not an
/// error when the element is gone already (expired, or lifted by hand), where
/// `NFT_MSG_DELSETELEM` would fail the whole transaction with ENOENT. The
/// crate has no variant for it: its payload is DELSETELEM's.
const NFT_MSG_DESTROYSETELEM: u8 = 30;
/// `NFTNL_UDATA_SET_ELEM_COMMENT` (libnftnl): the TLV type under which `nft`
/// keeps an element's comment in its userdata.
const UDATA_SET_ELEM_COMMENT: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket to nf_tables: {0}")]
    Socket(io::Error),
    #[error(
        "nf_tables refused the change (EPERM): spamdelay needs CAP_NET_ADMIN (run it as root or grant CAP_NET_ADMIN)"
    )]
    Permission,
    #[error("no set {set} in table inet {TABLE} (ENOENT): the table is missing or incomplete")]
    NoSuchSet { set: String },
    #[error("{doing}: {source}")]
    Io {
        doing: &'static str,
        source: io::Error,
    },
    #[error(
        "answers from nf_tables were lost (receive buffer overrun): the outcome of the transaction is unknown"
    )]
    Lost,
    #[error("nf_tables refused the transaction as a whole: {0}")]
    Transaction(io::Error),
    #[error(
        "nf_tables did not answer {0} of the messages of a transaction: its outcome is unknown"
    )]
    Unanswered(usize),
    #[error("{source} (after {} of the call's changes had taken)", took.len())]
    Interrupted {
        /// Indexes of the changes in force: those of the transactions that
        /// committed before the failure.
        took: Vec<usize>,
        source: Box<NetlinkError>,
    },
    #[error("reading nf_tables' answer: {0}")]
    Decode(String),
}

impl NetlinkError {
    /// The error for a request (not one element) that the kernel refused.
    fn refused(errno: i32, set: &str) -> Self {
        match errno {
            libc::EPERM => NetlinkError::Permission,
            libc::ENOENT => NetlinkError::NoSuchSet {
                set: set.to_string(),
            },
            e => NetlinkError::Transaction(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Why one change did not take. The others of its call are not affected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The set holds as many elements as its size allows (the kernel's
    /// ENFILE, "Too many open files in system", which nft prints as is).
    #[error("set {set} is full")]
    Full { set: &'static str },
    /// Interval sets (networks, or early_talkers_v6 with `--ipv6-prefix`)
    /// need start and end elements, which this transport does not write.
    #[error("set {set} holds intervals: not written over netlink")]
    IntervalSet { set: &'static str },
    /// A network in a set of addresses.
    #[error("{cidr} is a network: set {set} holds single addresses")]
    Network { cidr: String, set: &'static str },
    /// An IPv4 address for an IPv6 set or the other way round.
    #[error("{cidr} does not fit set {set} ({key_len}-byte keys)")]
    WrongFamily {
        cidr: String,
        set: &'static str,
        key_len: u32,
    },
    /// Anything else the kernel said about this element: an errno.
    #[error("refused by nf_tables: {}", io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
}

impl Refusal {
    fn from_errno(errno: i32, set: &'static str) -> Self {
        match errno {
            // ENFILE is what nft_add_set_elem returns when the set's size
            // is reached (Linux 6.18); ENOSPC is taken for full as well.
            libc::ENFILE | libc::ENOSPC => Refusal::Full { set },
            e => Refusal::Kernel(e),
        }
    }
}

/// What became of each change of one `apply` call, in the call's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    outcomes: Vec<Result<(), Refusal>>,
}

impl Applied {
    /// One per change, in the order given.
    pub fn outcomes(&self) -> &[Result<(), Refusal>] {
        &self.outcomes
    }

    /// Whether every change took.
    pub fn all_took(&self) -> bool {
        self.outcomes.iter().all(Result::is_ok)
    }

    /// Indexes of the changes that took.
    pub fn took(&self) -> impl Iterator<Item = usize> + '_ {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.is_ok().then_some(i))
    }

    /// Indexes of the changes refused because their set is full.
    pub fn full(&self) -> impl Iterator<Item = usize> + '_ {
        self.refused()
            .filter_map(|(i, r)| matches!(r, Refusal::Full { .. }).then_some(i))
    }

    /// The changes refused, by index, with the reason.
    pub fn refused(&self) -> impl Iterator<Item = (usize, &Refusal)> + '_ {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.as_ref().err().map(|r| (i, r)))
    }
}

/// A netlink socket to nf_tables that adds and deletes elements of the sets
/// of table `inet spamdelay`, in the network namespace it was opened in.
/// Blocking (each call is done when it returns): call it off the runtime.
pub struct NetlinkSets {
    socket: Socket,
    seq: u32,
    /// Receive buffer, kept across calls.
    buf: Vec<u8>,
    /// Messages per transaction whose answers the socket can hold.
    max_messages: usize,
    /// What each set was when last asked: asked once, not per call (a
    /// round trip saved on every ban); forgotten on any error.
    kinds: HashMap<&'static str, SetKind>,
}

/// What a set must be for an element to go in over netlink.
#[derive(Clone, Copy, Debug)]
struct SetKind {
    interval: bool,
    key_len: u32,
}

impl NetlinkSets {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        // Errors echo only the request's header, not all of it.
        socket.set_cap_ack(true).map_err(NetlinkError::Socket)?;
        let rcvbuf = set_rcvbuf(&socket, RCVBUF);
        // Start where another socket of this process is unlikely to be.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos());
        Ok(NetlinkSets {
            socket,
            seq,
            buf: Vec::with_capacity(64 * 1024),
            // Room for the batch frame's answers too.
            max_messages: (rcvbuf / ANSWER_BYTES).saturating_sub(4).max(1),
            kinds: HashMap::new(),
        })
    }

    /// Forgets what the sets were (call it when the table was recreated).
    pub fn forget_sets(&mut self) {
        self.kinds.clear();
    }

    /// Whether every set of table `inet spamdelay` exists: one round trip,
    /// no `nft` process (the daemon asks twice a second).
    pub fn table_complete(&mut self) -> Result<bool, NetlinkError> {
        self.kinds.clear();
        match self.set_kinds(&nft::ALL_SETS) {
            Ok(kinds) => Ok(kinds.len() == nft::ALL_SETS.len()),
            Err(NetlinkError::NoSuchSet { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Applies `changes` (additions with their timeout and comment, deletions
    /// that are no error when the element is gone) in as few transactions as
    /// the 64 KiB cut allows, in order. A transaction the kernel refuses is
    /// run again without the changes it named, which come back refused: a
    /// full set takes the first changes and refuses the rest. Re-adding an
    /// element refreshes its timeout (and keeps its comment).
    ///
    /// Err when the call failed as a whole: before anything was sent (no
    /// privilege, no table), or, as `Interrupted`, naming what took.
    pub fn apply(&mut self, changes: &[Change]) -> Result<Applied, NetlinkError> {
        let result = self.apply_once(changes);
        if result.is_err() {
            self.kinds.clear();
        }
        result
    }

    fn apply_once(&mut self, changes: &[Change]) -> Result<Applied, NetlinkError> {
        let mut outcomes: Vec<Result<(), Refusal>> = vec![Ok(()); changes.len()];
        let mut names: Vec<&'static str> = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            let (cidr, set) = target(c);
            let single =
                cidr.is_host() || (nft::masked(set) && cidr.prefix_len() == nft::V6_NET_PREFIX);
            if !single {
                outcomes[i] = Err(Refusal::Network {
                    cidr: cidr.to_string(),
                    set,
                });
            } else if !names.contains(&set) {
                names.push(set);
            }
        }
        let kinds = self.set_kinds(&names)?;
        let mut pending = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            if outcomes[i].is_err() {
                continue;
            }
            let (cidr, set) = target(c);
            let key_len = if cidr.is_ipv4() { 4 } else { 16 };
            match kinds.get(set) {
                Some(kind) if kind.interval => {
                    outcomes[i] = Err(Refusal::IntervalSet { set });
                }
                Some(kind) if kind.key_len != key_len => {
                    outcomes[i] = Err(Refusal::WrongFamily {
                        cidr: cidr.to_string(),
                        set,
                        key_len: kind.key_len,
                    });
                }
                Some(_) => pending.push(i),
                None => return Err(NetlinkError::NoSuchSet { set: set.into() }),
            }
        }
        // Encoded once, sequence numbers set per transaction: a retry sends
        // the same bytes again.
        let mut encoded: Vec<Vec<u8>> = vec![Vec::new(); changes.len()];
        for &i in &pending {
            push(&mut encoded[i], &change_message(&changes[i]));
        }
        let mut took = Vec::with_capacity(pending.len());
        for mut members in chunks(&encoded, &pending, self.max_messages) {
            // Each run refuses at least one change or commits: this ends.
            while !members.is_empty() {
                let verdict = self.transaction(changes, &encoded, &members).map_err(|e| {
                    if took.is_empty() {
                        e
                    } else {
                        NetlinkError::Interrupted {
                            took: took.clone(),
                            source: Box::new(e),
                        }
                    }
                })?;
                match verdict {
                    Verdict::Committed => {
                        took.append(&mut members);
                    }
                    Verdict::Refused { refused, retry } => {
                        for (i, r) in refused {
                            outcomes[i] = Err(r);
                        }
                        members = retry;
                    }
                }
            }
        }
        Ok(Applied { outcomes })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Asks the kernel what each named set is (one request each, sent
    /// together): an interval set must not get a lone element, which it
    /// would take for the start of an interval with no end.
    fn set_kinds(
        &mut self,
        names: &[&'static str],
    ) -> Result<HashMap<&'static str, SetKind>, NetlinkError> {
        if names.iter().all(|n| self.kinds.contains_key(n)) {
            return Ok(self.kinds.clone());
        }
        let mut out = Vec::new();
        let mut asked = HashMap::new();
        for &name in names {
            let seq = self.next_seq();
            let msg = NfTablesMessage::GetSet(SetMessage {
                attributes: vec![
                    SetAttribute::Table(TABLE.to_string()),
                    SetAttribute::Name(name.to_string()),
                ],
            });
            emit(&mut out, msg, NLM_F_REQUEST, seq);
            asked.insert(seq, name);
        }
        let mut kinds = HashMap::new();
        if asked.is_empty() {
            return Ok(kinds);
        }
        self.send(&out)?;
        let mut left = asked.len();
        while left > 0 {
            let Some(datagram) = self.recv()? else {
                return Err(NetlinkError::Unanswered(left));
            };
            for (seq, reply) in replies(datagram)? {
                let Some(&name) = asked.get(&seq) else {
                    continue;
                };
                match reply {
                    Reply::Ack(0) | Reply::Other => {}
                    Reply::Ack(errno) => return Err(NetlinkError::refused(errno, name)),
                    Reply::Set(kind) => {
                        kinds.insert(name, kind);
                        left -= 1;
                    }
                }
            }
        }
        self.kinds.extend(kinds.iter().map(|(k, v)| (*k, *v)));
        Ok(kinds)
    }

    /// Sends one transaction of `members` and reads every answer to it.
    fn transaction(
        &mut self,
        changes: &[Change],
        encoded: &[Vec<u8>],
        members: &[usize],
    ) -> Result<Verdict, NetlinkError> {
        let begin = self.next_seq();
        let mut out = Vec::with_capacity(BATCH_BYTES);
        emit(&mut out, ControlMessage::BatchBegin, NLM_F_REQUEST, begin);
        let mut by_seq = HashMap::with_capacity(members.len());
        for &i in members {
            let seq = self.next_seq();
            by_seq.insert(seq, i);
            let start = out.len();
            out.extend_from_slice(&encoded[i]);
            NetlinkBuffer::new(&mut out[start..]).set_sequence_number(seq);
        }
        let end = self.next_seq();
        emit(&mut out, ControlMessage::BatchEnd, NLM_F_REQUEST, end);
        self.send(&out)?;

        // nfnetlink handles a batch within the sendmsg call and queues its
        // answers before it returns: what is not in the socket now never
        // comes (nft reads the same way).
        let mut unanswered = by_seq.len();
        let mut refused = Vec::new();
        let mut whole = None;
        while let Some(datagram) = self.recv()? {
            for (seq, reply) in replies(datagram)? {
                let Reply::Ack(errno) = reply else {
                    continue;
                };
                if let Some(&i) = by_seq.get(&seq) {
                    unanswered = unanswered.saturating_sub(1);
                    if errno != 0 {
                        refused.push((i, Refusal::from_errno(errno, target(&changes[i]).1)));
                    }
                } else if (seq == begin || seq == end) && errno != 0 {
                    // The batch as a whole: no privilege, out of memory,
                    // or a commit that failed.
                    whole = Some(errno);
                }
            }
        }
        if let Some(errno) = whole {
            let set = members.first().map_or("", |&i| target(&changes[i]).1);
            return Err(NetlinkError::refused(errno, set));
        }
        if refused.is_empty() {
            if unanswered > 0 {
                return Err(NetlinkError::Unanswered(unanswered));
            }
            return Ok(Verdict::Committed);
        }
        let named: HashSet<usize> = refused.iter().map(|(i, _)| *i).collect();
        let retry = members
            .iter()
            .copied()
            .filter(|i| !named.contains(i))
            .collect();
        Ok(Verdict::Refused { refused, retry })
    }

    fn send(&self, bytes: &[u8]) -> Result<(), NetlinkError> {
        let kernel = SocketAddr::new(0, 0);
        let sent = self
            .socket
            .send_to(bytes, &kernel, 0)
            .map_err(|source| NetlinkError::Io {
                doing: "sending to nf_tables",
                source,
            })?;
        if sent != bytes.len() {
            return Err(NetlinkError::Io {
                doing: "sending to nf_tables",
                source: io::Error::new(io::ErrorKind::WriteZero, "short send"),
            });
        }
        Ok(())
    }

    /// The next datagram already queued, or None when there is none.
    fn recv(&mut self) -> Result<Option<&[u8]>, NetlinkError> {
        self.buf.clear();
        match self.socket.recv(&mut self.buf, libc::MSG_DONTWAIT) {
            Ok(_) => Ok(Some(&self.buf)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Err(NetlinkError::Lost),
            Err(source) => Err(NetlinkError::Io {
                doing: "reading nf_tables' answer",
                source,
            }),
        }
    }
}

/// Raises the receive buffer as far as allowed: SO_RCVBUFFORCE (which
/// CAP_NET_ADMIN permits beyond rmem_max), else SO_RCVBUF (up to rmem_max).
/// Returns the size in force, which the kernel reports doubled.
fn set_rcvbuf(socket: &Socket, bytes: usize) -> usize {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes of `value`.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = socket.set_rx_buf_sz(value);
    }
    // The size in force; rmem_default's if it cannot be read.
    socket.get_rx_buf_sz().unwrap_or(2 * 212_992)
}

enum Verdict {
    /// The transaction took: its changes are in force.
    Committed,
    /// The kernel undid the whole transaction; `refused` are the changes it
    /// named, `retry` the others, which it would have taken.
    Refused {
        refused: Vec<(usize, Refusal)>,
        retry: Vec<usize>,
    },
}

/// Cuts `pending` into transactions of at most BATCH_BYTES encoded bytes and
/// `max_messages` messages, in order.
fn chunks(encoded: &[Vec<u8>], pending: &[usize], max_messages: usize) -> Vec<Vec<usize>> {
    // Batch begin and end: a netlink header and nfgenmsg each.
    const FRAME: usize = 2 * (16 + 4);
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = FRAME;
    for &i in pending {
        let len = encoded[i].len();
        if !current.is_empty() && (bytes + len > BATCH_BYTES || current.len() >= max_messages) {
            chunks.push(std::mem::take(&mut current));
            bytes = FRAME;
        }
        current.push(i);
        bytes += len;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

fn target(change: &Change) -> (&crate::allow::Cidr, &'static str) {
    match change {
        Change::Add { cidr, set, .. } | Change::Delete { cidr, set } => (cidr, set),
    }
}

fn key(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An element's comment in the userdata TLV that `nft` writes and reads:
/// type, length (with the NUL), the NUL-terminated text.
fn comment_udata(text: &str) -> Option<Vec<u8>> {
    let text = nft::comment(text);
    if text.is_empty() {
        return None;
    }
    let len = u8::try_from(text.len() + 1).ok()?;
    let mut out = Vec::with_capacity(text.len() + 3);
    out.push(UDATA_SET_ELEM_COMMENT);
    out.push(len);
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    Some(out)
}

/// A timeout as the kernel takes it, in milliseconds; the same range as the
/// nft path's (whole seconds, at least one, at most u32::MAX).
fn timeout_ms(secs: u64) -> u64 {
    secs.clamp(1, u64::from(u32::MAX)) * 1000
}

/// The message for one change (sequence number 0: set when sent). An
/// addition carries an expiration as well as its timeout: the kernel
/// refreshes a re-added element whose timeout is unchanged only when given
/// one. A deletion is a DESTROYSETELEM: DELSETELEM's payload under the
/// destroy message type, which the crate does not have.
fn change_message(change: &Change) -> NetlinkMessage<NetfilterMessage> {
    let (cidr, set) = target(change);
    let mut element = vec![SetElementAttribute::Key(DataAttribute::Value(key(
        cidr.addr()
    )))];
    if let Change::Add {
        timeout_secs,
        comment,
        ..
    } = change
    {
        let ms = timeout_ms(*timeout_secs);
        element.push(SetElementAttribute::Timeout(ms));
        element.push(SetElementAttribute::Expiration(ms));
        if let Some(udata) = comment_udata(comment) {
            element.push(SetElementAttribute::UserData(udata));
        }
    }
    let body = SetElementMessage {
        attributes: vec![
            SetElementList::Table(TABLE.to_string()),
            SetElementList::Set(set.to_string()),
            SetElementList::Elements(vec![ListAttribute::Element(element)]),
        ],
    };
    match change {
        Change::Add { .. } => message(
            NfTablesMessage::NewSetElement(body),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            0,
        ),
        Change::Delete { .. } => {
            let mut m = message(
                NfTablesMessage::DeleteSetElement(body),
                NLM_F_REQUEST | NLM_F_ACK,
                0,
            );
            m.header.message_type = (NFNL_SUBSYS_NFTABLES << 8) | u16::from(NFT_MSG_DESTROYSETELEM);
            m
        }
    }
}

fn message<T: Into<NetfilterMessageInner>>(
    inner: T,
    flags: u16,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let inner = inner.into();
    // The batch frame names the subsystem it carries (in res_id); the
    // messages inside are for family inet, like the table.
    let nfgen = match inner {
        NetfilterMessageInner::None(_) => {
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES)
        }
        _ => NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
    };
    let mut m = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(NetfilterMessage::new(nfgen, inner)),
    );
    m.finalize();
    m.header.flags = flags;
    m.header.sequence_number = seq;
    m
}

fn emit<T: Into<NetfilterMessageInner>>(out: &mut Vec<u8>, inner: T, flags: u16, seq: u32) {
    push(out, &message(inner, flags, seq));
}

fn push(out: &mut Vec<u8>, m: &NetlinkMessage<NetfilterMessage>) {
    let start = out.len();
    let len = m.buffer_len();
    out.resize(start + align(len), 0);
    m.serialize(&mut out[start..start + len]);
}

/// NLMSG_ALIGN: messages follow each other on 4-byte boundaries.
fn align(len: usize) -> usize {
    len.next_multiple_of(usize::from(NLMSG_ALIGNTO))
}

enum Reply {
    /// NLMSG_ERROR: 0 for an ACK, else a positive errno.
    Ack(i32),
    /// A set's description (answer to GETSET).
    Set(SetKind),
    Other,
}

/// The netlink messages in one datagram, by the sequence number they answer.
fn replies(datagram: &[u8]) -> Result<Vec<(u32, Reply)>, NetlinkError> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let len = NetlinkBuffer::new_checked(rest)
            .map_err(|e| NetlinkError::Decode(e.to_string()))?
            .length() as usize;
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&rest[..len])
            .map_err(|e| NetlinkError::Decode(e.to_string()))?;
        let reply = match msg.payload {
            NetlinkPayload::Error(e) => Reply::Ack(e.raw_code().saturating_abs()),
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewSet(set)),
                ..
            }) => Reply::Set(set_kind(&set)),
            _ => Reply::Other,
        };
        out.push((msg.header.sequence_number, reply));
        rest = rest.get(align(len)..).unwrap_or_default();
    }
    Ok(out)
}

fn set_kind(set: &SetMessage) -> SetKind {
    let mut kind = SetKind {
        interval: false,
        key_len: 0,
    };
    for a in &set.attributes {
        match a {
            SetAttribute::Flags(f) => kind.interval = f.contains(SetFlags::Interval),
            SetAttribute::KeyLen(l) => kind.key_len = *l,
            _ => {}
        }
    }
    kind
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(addr: &str, comment: &str) -> Change {
        Change::Add {
            cidr: addr.parse().expect("an address"),
            set: nft::SET_V6,
            timeout_secs: 90,
            comment: comment.to_string(),
        }
    }

    #[test]
    fn missing_privilege_says_cap_net_admin() {
        let text = NetlinkError::refused(libc::EPERM, nft::SET_V4).to_string();
        assert!(text.contains("EPERM"), "{text}");
        assert!(text.contains("CAP_NET_ADMIN"), "{text}");
    }

    #[test]
    fn a_missing_set_is_named() {
        let text = NetlinkError::refused(libc::ENOENT, nft::SET_V6).to_string();
        assert_eq!(
            text,
            "no set early_talkers_v6 in table inet spamdelay (ENOENT): the table is missing or incomplete"
        );
    }

    #[test]
    fn a_full_set_is_told_apart_from_other_refusals() {
        assert_eq!(
            Refusal::from_errno(libc::ENFILE, nft::SET_V4),
            Refusal::Full { set: nft::SET_V4 }
        );
        assert_eq!(
            Refusal::from_errno(libc::ENOSPC, nft::SET_V4),
            Refusal::Full { set: nft::SET_V4 }
        );
        let other = Refusal::from_errno(libc::ERANGE, nft::SET_V4);
        assert_eq!(other, Refusal::Kernel(libc::ERANGE));
        assert!(other.to_string().starts_with("refused by nf_tables: "));
        assert_eq!(
            Refusal::Full { set: nft::SET_V4 }.to_string(),
            "set early_talkers_v4 is full"
        );
    }

    #[test]
    fn an_interrupted_call_says_what_took() {
        let e = NetlinkError::Interrupted {
            took: vec![0, 1, 2],
            source: Box::new(NetlinkError::Lost),
        };
        assert!(
            e.to_string()
                .ends_with("(after 3 of the call's changes had taken)")
        );
    }

    #[test]
    fn the_comment_is_nfts_userdata_tlv() {
        assert_eq!(
            comment_udata("ban x").expect("a comment"),
            [0, 6, b'b', b'a', b'n', b' ', b'x', 0]
        );
        // Sanitised like the nft path's, and cut to its length.
        let udata = comment_udata(&format!("say \"hi\"\n{}", "y".repeat(300))).expect("a comment");
        assert_eq!(
            usize::from(udata[1]),
            nft::comment("x".repeat(300).as_str()).len() + 1
        );
        assert_eq!(&udata[2..12], b"say 'hi'?y");
        assert_eq!(udata.last(), Some(&0));
        assert_eq!(comment_udata(""), None);
    }

    #[test]
    fn an_addition_carries_key_timeout_expiration_and_comment() {
        let m = change_message(&add("2001:db8::7", "why"));
        assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        let mut bytes = Vec::new();
        push(&mut bytes, &m);
        NetlinkBuffer::new(&mut bytes[..]).set_sequence_number(42);
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).expect("decodes");
        assert_eq!(back.header.sequence_number, 42);
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewSetElement(msg)),
            ..
        }) = back.payload
        else {
            panic!("not NEWSETELEM: {back:?}");
        };
        let Some(SetElementList::Elements(list)) = msg.attributes.get(2) else {
            panic!("no elements: {msg:?}");
        };
        let [ListAttribute::Element(attrs)] = list.as_slice() else {
            panic!("not one element: {list:?}");
        };
        let ip: std::net::Ipv6Addr = "2001:db8::7".parse().expect("an address");
        assert_eq!(
            attrs.as_slice(),
            [
                SetElementAttribute::Key(DataAttribute::Value(ip.octets().to_vec())),
                SetElementAttribute::Timeout(90_000),
                SetElementAttribute::Expiration(90_000),
                SetElementAttribute::UserData(vec![0, 4, b'w', b'h', b'y', 0]),
            ]
        );
    }

    #[test]
    fn a_deletion_is_a_destroy_that_tolerates_a_missing_element() {
        let m = change_message(&Change::Delete {
            cidr: "192.0.2.1".parse().expect("an address"),
            set: nft::SET_V4,
        });
        assert_eq!(m.header.message_type, (10 << 8) | 30);
        assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_ACK);
    }

    #[test]
    fn timeouts_keep_the_nft_paths_range() {
        assert_eq!(timeout_ms(0), 1000);
        assert_eq!(timeout_ms(3600), 3_600_000);
        assert_eq!(timeout_ms(u64::MAX), u64::from(u32::MAX) * 1000);
    }

    #[test]
    fn transactions_are_cut_by_bytes_and_by_answers_in_order() {
        let changes: Vec<Change> = (0..2000)
            .map(|i| add(&format!("2001:db8::{i:x}"), "a reason of some length"))
            .collect();
        let encoded: Vec<Vec<u8>> = changes
            .iter()
            .map(|c| {
                let mut out = Vec::new();
                push(&mut out, &change_message(c));
                out
            })
            .collect();
        let all: Vec<usize> = (0..changes.len()).collect();
        let by_bytes = chunks(&encoded, &all, usize::MAX);
        assert!(by_bytes.len() > 1);
        assert_eq!(by_bytes.concat(), all);
        for c in &by_bytes {
            let bytes: usize = c.iter().map(|&i| encoded[i].len()).sum();
            assert!(bytes + 40 <= BATCH_BYTES, "{bytes}");
        }
        let by_count = chunks(&encoded, &all, 100);
        assert!(by_count.iter().all(|c| c.len() <= 100));
        assert_eq!(by_count.concat(), all);
    }
}
