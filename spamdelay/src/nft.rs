//! Where bans reach nftables: spamdelay's own `inet spamdelay` table (two
//! sets with timeouts, input and forward chains that refuse banned clients on
//! the watched ports), created idempotently, and element changes applied as
//! one `nft -j` transaction per batch. Nothing outside the table is touched.

use std::{borrow::Cow, collections::HashSet, net::IpAddr, process::Stdio};

use nftables::{
    expr::{
        BinaryOperation, Elem, Expression, NamedExpression, Payload, PayloadField, Prefix, SetItem,
    },
    schema::{
        Chain, Element, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag,
        SetType, SetTypeValue, Table,
    },
    stmt::{Counter, Match, Operator, Reject, RejectType, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use serde::{Deserialize, Serialize};

use crate::allow::Cidr;

pub const TABLE: &str = "spamdelay";
/// Banned addresses: hash sets, whose cost per added element stays flat
/// however many bans they hold (interval sets grow slower with every element).
pub const SET_V4: &str = "early_talkers_v4";
pub const SET_V6: &str = "early_talkers_v6";
/// IPv6 /64 networks (`--ipv6-prefix 64`, `--ipv6-aggregate`, a /64 banned
/// by hand), kept as a hash set of their network addresses and matched by
/// `ip6 saddr & ffff:ffff:ffff:ffff:: @early_talkers_v6_64`: as cheap per
/// ban as single addresses, where an interval set costs more with each one.
pub const SET_V6_64: &str = "early_talkers_v6_64";
/// The prefix length SET_V6_64's elements stand for.
pub const V6_NET_PREFIX: u8 = 64;
const V6_NET_MASK: &str = "ffff:ffff:ffff:ffff::";
/// Other networks, banned by hand (`spamdelay ban 203.0.113.0/24`) or by
/// `--ipv6-prefix` other than 64: interval sets, written through `nft`.
pub const SET_V4_NETS: &str = "early_talkers_v4_nets";
pub const SET_V6_NETS: &str = "early_talkers_v6_nets";
pub const ALL_SETS: [&str; 5] = [SET_V4, SET_V6, SET_V6_64, SET_V4_NETS, SET_V6_NETS];
/// nft keeps at most this many bytes of an element comment.
const COMMENT_MAX: usize = 120;

/// What the chain does to a banned client's connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Answer with a TCP reset: the client learns at once.
    #[default]
    Reject,
    /// Drop silently: the client waits for its timeout.
    Drop,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft is not installed: install nftables (apt-get install nftables)")]
    Missing,
    #[error("nft was refused (no CAP_NET_ADMIN): run as root or grant CAP_NET_ADMIN")]
    Permission,
    #[error("nft: no such table, set or element")]
    NoSuchObject,
    #[error("nft failed: {0}")]
    Failed(String),
}

/// Runs `nft -j ARGS`, feeding `input` on stdin; returns stdout.
async fn nft(args: &'static [&'static str], input: Option<Vec<u8>>) -> Result<Vec<u8>, NftError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .arg("-j")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                NftError::Missing
            } else {
                NftError::Failed(e.to_string())
            }
        })?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(&bytes)
            .await
            .map_err(|e| NftError::Failed(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NftError::Failed(e.to_string()))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Operation not permitted") {
        return Err(NftError::Permission);
    }
    if stderr.contains("No such file or directory") {
        return Err(NftError::NoSuchObject);
    }
    Err(NftError::Failed(stderr.trim().replace('\n', "; ")))
}

/// One element change, in the set that holds (or is to hold) it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Add {
        cidr: Cidr,
        set: &'static str,
        timeout_secs: u64,
        comment: String,
    },
    Delete {
        cidr: Cidr,
        set: &'static str,
    },
}

impl Change {
    pub fn cidr(&self) -> &Cidr {
        match self {
            Change::Add { cidr, .. } | Change::Delete { cidr, .. } => cidr,
        }
    }

    fn set(&self) -> &'static str {
        match self {
            Change::Add { set, .. } | Change::Delete { set, .. } => set,
        }
    }
}

/// A banned element as nft lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub cidr: Cidr,
    pub set: &'static str,
    pub expires_secs: Option<u64>,
    pub comment: Option<String>,
}

/// The set a ban goes to: addresses and IPv6 /64s to the hash sets, other
/// networks to the interval sets.
pub fn set_for(cidr: &Cidr) -> &'static str {
    match (cidr.is_ipv4(), cidr.is_host()) {
        (true, true) => SET_V4,
        (true, false) => SET_V4_NETS,
        (false, true) => SET_V6,
        (false, false) if cidr.prefix_len() == V6_NET_PREFIX => SET_V6_64,
        (false, false) => SET_V6_NETS,
    }
}

/// Whether `set` holds its networks as single (masked) addresses.
pub fn masked(set: &str) -> bool {
    set == SET_V6_64
}

/// A set's element for `cidr`: an address, or a prefix for interval sets.
fn elem_value(cidr: &Cidr, set: &str) -> Expression<'static> {
    let addr = Expression::String(Cow::Owned(cidr.addr().to_string()));
    if cidr.is_host() || masked(set) {
        addr
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(addr),
            len: cidr.prefix_len().into(),
        }))
    }
}

/// A comment nft can hold and `nft list` can show: printable ASCII only
/// (callers escape payload first), no double quote, cut to nft's limit.
pub fn comment(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| match c {
            '"' => '\'',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect();
    s.truncate(COMMENT_MAX);
    s
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

/// The table's objects: table, sets, chains (flushed, then their rules).
fn table_objects(ports: &[u16], action: Action, set_size: u32) -> Vec<NfObject<'static>> {
    let mut objs = vec![NfObject::CmdObject(NfCmd::Add(NfListObject::Table(
        Table {
            family: NfFamily::INet,
            name: TABLE.into(),
            handle: None,
        },
    )))];
    for (name, ty, interval) in [
        (SET_V4, SetType::Ipv4Addr, false),
        (SET_V6, SetType::Ipv6Addr, false),
        (SET_V6_64, SetType::Ipv6Addr, false),
        (SET_V4_NETS, SetType::Ipv4Addr, true),
        (SET_V6_NETS, SetType::Ipv6Addr, true),
    ] {
        let mut flags = HashSet::from([SetFlag::Timeout]);
        if interval {
            flags.insert(SetFlag::Interval);
        }
        objs.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Set(
            Box::new(Set {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: name.into(),
                handle: None,
                set_type: SetTypeValue::Single(ty),
                policy: None,
                flags: Some(flags),
                elem: None,
                timeout: None,
                gc_interval: None,
                size: Some(set_size),
                comment: Some("spamdelay: SMTP early talkers".into()),
            }),
        ))));
    }
    let ports_expr = Expression::Named(NamedExpression::Set(
        ports
            .iter()
            .map(|&p| SetItem::Element(Expression::Number(p.into())))
            .collect(),
    ));
    for (chain, hook) in [("input", NfHook::Input), ("forward", NfHook::Forward)] {
        objs.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(
            Chain {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: chain.into(),
                newname: None,
                handle: None,
                _type: Some(NfChainType::Filter),
                hook: Some(hook),
                prio: Some(-10),
                dev: None,
                policy: Some(NfChainPolicy::Accept),
            },
        ))));
        objs.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(
            Chain {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: chain.into(),
                ..Default::default()
            },
        ))));
        for set in ALL_SETS {
            let verdict = match action {
                Action::Reject => {
                    Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None)))
                }
                Action::Drop => Statement::Drop(None),
            };
            objs.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: TABLE.into(),
                chain: chain.into(),
                expr: vec![
                    eq(saddr_of(set), Expression::String(format!("@{set}").into())),
                    eq(payload("tcp", "dport"), ports_expr.clone()),
                    Statement::Counter(Counter::Anonymous(None)),
                    verdict,
                ]
                .into(),
                handle: None,
                index: None,
                comment: Some("spamdelay: refuse banned SMTP clients".into()),
            }))));
        }
    }
    objs
}

/// What a set's elements are matched against: the source address, masked
/// to its /64 for SET_V6_64.
fn saddr_of(set: &str) -> Expression<'static> {
    let v4 = set == SET_V4 || set == SET_V4_NETS;
    let saddr = payload(if v4 { "ip" } else { "ip6" }, "saddr");
    if !masked(set) {
        return saddr;
    }
    Expression::BinaryOperation(Box::new(BinaryOperation::AND(
        saddr,
        Expression::String(V6_NET_MASK.into()),
    )))
}

fn change_object(change: &Change) -> NfObject<'static> {
    let (cmd, elem): (
        fn(NfListObject<'static>) -> NfCmd<'static>,
        Expression<'static>,
    ) = match change {
        Change::Add {
            cidr,
            timeout_secs,
            comment,
            ..
        } => (
            NfCmd::Add,
            Expression::Named(NamedExpression::Elem(Elem {
                val: Box::new(elem_value(cidr, change.set())),
                timeout: Some(u32::try_from(*timeout_secs).unwrap_or(u32::MAX).max(1)),
                expires: None,
                comment: Some(comment.clone().into()),
                counter: None,
            })),
        ),
        Change::Delete { cidr, set } => (NfCmd::Delete, elem_value(cidr, set)),
    };
    NfObject::CmdObject(cmd(NfListObject::Element(Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: change.set().into(),
        elem: vec![elem].into(),
    })))
}

async fn apply(objects: Vec<NfObject<'static>>) -> Result<(), NftError> {
    let doc = Nftables {
        objects: objects.into(),
    };
    let json = serde_json::to_vec(&doc).map_err(|e| NftError::Failed(e.to_string()))?;
    nft(&["-f", "-"], Some(json)).await.map(drop)
}

/// Creates (or re-creates the rules of) spamdelay's table. Idempotent.
pub fn ensure_table(
    ports: &[u16],
    action: Action,
    set_size: u32,
) -> impl std::future::Future<Output = Result<(), NftError>> + Send + 'static {
    apply(table_objects(ports, action, set_size))
}

/// Deletes spamdelay's table (used when its sets were made with other settings).
pub async fn delete_table() -> Result<(), NftError> {
    apply(vec![NfObject::CmdObject(NfCmd::Delete(
        NfListObject::Table(Table {
            family: NfFamily::INet,
            name: TABLE.into(),
            handle: None,
        }),
    ))])
    .await
}

/// Applies element changes as one transaction: all or nothing. The future
/// owns its objects (no borrow of `changes` lives across its await).
pub fn apply_changes(
    changes: &[Change],
) -> impl std::future::Future<Output = Result<(), NftError>> + Send + 'static {
    let objects: Vec<NfObject<'static>> = changes.iter().map(change_object).collect();
    async move {
        if objects.is_empty() {
            return Ok(());
        }
        apply(objects).await
    }
}

async fn list(args: &'static [&'static str]) -> Result<Option<Nftables<'static>>, NftError> {
    match nft(args, None).await {
        Ok(out) => serde_json::from_slice(&out)
            .map(Some)
            .map_err(|e| NftError::Failed(format!("nft's JSON: {e}"))),
        Err(NftError::NoSuchObject) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the table exists with all its sets. Terse (`-t`): without the
/// elements, which at 90,000 bans took nft 2 s and 146 MB to list.
pub async fn table_exists() -> Result<bool, NftError> {
    Ok(list(&["-t", "list", "table", "inet", TABLE])
        .await?
        .is_some_and(|doc| {
            let sets = doc
                .objects
                .iter()
                .filter(|o| matches!(o, NfObject::ListObject(NfListObject::Set(_))))
                .count();
            sets >= ALL_SETS.len()
        }))
}

/// The elements of both sets as nft has them now (empty when no table).
pub async fn list_elements() -> Result<Vec<Listed>, NftError> {
    let mut out = Vec::new();
    for set in ALL_SETS {
        let args: &'static [&'static str] = match set {
            SET_V4 => &["list", "set", "inet", TABLE, SET_V4],
            SET_V6 => &["list", "set", "inet", TABLE, SET_V6],
            SET_V6_64 => &["list", "set", "inet", TABLE, SET_V6_64],
            SET_V4_NETS => &["list", "set", "inet", TABLE, SET_V4_NETS],
            _ => &["list", "set", "inet", TABLE, SET_V6_NETS],
        };
        let Some(doc) = list(args).await? else {
            continue;
        };
        for obj in doc.objects.iter() {
            let NfObject::ListObject(NfListObject::Set(s)) = obj else {
                continue;
            };
            for e in s.elem.iter().flat_map(|v| v.iter()) {
                if let Some(l) = listed(e, set) {
                    out.push(l);
                }
            }
        }
    }
    Ok(out)
}

fn listed(e: &Expression<'_>, set: &'static str) -> Option<Listed> {
    let (val, expires, comment) = match e {
        Expression::Named(NamedExpression::Elem(el)) => {
            (&*el.val, el.expires, el.comment.as_deref())
        }
        other => (other, None, None),
    };
    let cidr = match val {
        Expression::String(s) if masked(set) => {
            Cidr::around(s.parse::<IpAddr>().ok()?, V6_NET_PREFIX)
        }
        Expression::String(s) => s.parse().ok()?,
        Expression::Named(NamedExpression::Prefix(p)) => match &*p.addr {
            Expression::String(a) => {
                Cidr::around(a.parse::<IpAddr>().ok()?, u8::try_from(p.len).ok()?)
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(Listed {
        cidr,
        set,
        expires_secs: expires.map(u64::from),
        comment: comment.map(str::to_string),
    })
}

/// Packets refused by the table's rules so far (all chains, both families).
pub async fn refused_packets() -> Result<u64, NftError> {
    let Some(doc) = list(&["-t", "list", "table", "inet", TABLE]).await? else {
        return Ok(0);
    };
    let mut total = 0;
    for obj in doc.objects.iter() {
        let NfObject::ListObject(NfListObject::Rule(rule)) = obj else {
            continue;
        };
        for st in rule.expr.iter() {
            if let Statement::Counter(Counter::Anonymous(Some(c))) = st {
                total += c.packets.unwrap_or(0) as u64;
            }
        }
    }
    Ok(total)
}
