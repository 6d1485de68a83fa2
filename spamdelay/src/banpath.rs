//! The one ban path. The daemon's verdicts, `spamdelay ban` and `unban`,
//! restoring the register at start and rebuilding a vanished table all go
//! through here, so they cannot drift apart: it skips what a ban in force
//! already covers, counts offences through the policy, aggregates IPv6
//! addresses into their /64, removes the narrower bans a new network makes
//! redundant, sends the changes (hash sets over netlink, interval sets
//! through `nft`), and records in the register only what nftables took.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    allow::Cidr,
    bans::{Ban, BanSettings, Lengths, Locked, Register, TableSettings},
    exporter::{Cause, Telemetry},
    netlink::{NetlinkSets, Refusal},
    nft::{self, Change, NftError, V6_NET_PREFIX},
    policy::Policy,
};

/// `[198.51.100.7]` for an address, `[2001:db8::]/64` for a network.
pub fn show(cidr: &Cidr) -> String {
    if cidr.is_host() {
        format!("[{}]", cidr.addr())
    } else {
        format!("[{}]/{}", cidr.addr(), cidr.prefix_len())
    }
}

/// A ban asked for.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub cidr: Cidr,
    pub reason: String,
    pub term: Term,
}

/// How long a wanted ban lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Term {
    /// The policy's sentence: doubled for each remembered offence. A ban in
    /// force that covers the address is enough.
    Sentence,
    /// Exactly this long (`spamdelay ban --time`); a re-ban refreshes it.
    Fixed(Duration),
    /// Another host's ban with this long left (the fleet's): any ban in
    /// force that lasts as long, the same element's included, is enough.
    Foreign(Duration),
}

/// Bans other hosts made, for the enforcer to apply, and ones they lifted.
#[derive(Clone, Debug, Default)]
pub struct Foreign {
    /// Each with `Term::Foreign`.
    pub bans: Vec<Wanted>,
    /// Lifted where the register's ban for exactly this network has a
    /// reason starting with `lift_prefix` (a local ban stays).
    pub lifts: Vec<Cidr>,
    pub lift_prefix: &'static str,
}

/// Told of every ban that took and every unban (not in a dry run): how the
/// fleet hears of this host's bans without the ban path knowing the fleet.
pub trait Observer: Send + Sync {
    fn banned(&self, cidr: &Cidr, ban: &Ban, now: u64);
    fn unbanned(&self, cidr: &Cidr, now: u64);
}

/// What became of a wanted ban.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    /// In nftables and the register (in a dry run: would be).
    Banned { cidr: Cidr, ban: Ban },
    /// Already banned as `by` (itself or a wider network), for long enough.
    Covered { cidr: Cidr, by: Cidr },
    /// nftables refused it (the reason is logged); not in the register.
    Refused { cidr: Cidr },
    /// `--ipv6-aggregate`: the /64 was banned instead, and the addresses
    /// banned inside it before were lifted (`members`, all of them).
    Aggregated {
        cidrs: Vec<Cidr>,
        net: Cidr,
        members: usize,
        ban: Ban,
    },
}

/// The daemon's own counters, shown by `spamdelay status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bans that reached nftables (additions and refreshes).
    pub bans: AtomicU64,
    /// Bans refused because their set was full.
    pub set_full: AtomicU64,
    /// /64 bans made from `--ipv6-aggregate` addresses.
    pub aggregated: AtomicU64,
    /// Changes nftables refused for another reason, or could not be sent.
    pub apply_errors: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("bans", &self.bans),
            ("set_full", &self.set_full),
            ("aggregated", &self.aggregated),
            ("apply_errors", &self.apply_errors),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// What was lifted by an unban.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifted {
    /// Register entries removed (bans, and remembered offences).
    pub register: Vec<Cidr>,
    /// nftables elements deleted.
    pub elements: Vec<Cidr>,
    /// A wider ban that still covers the address, if any.
    pub still_covered_by: Option<Cidr>,
}

/// The daemon writes the register (the whole file each time) at most this
/// often: a lone ban at once, the bans of a busy moment together (`flush`,
/// called at least as often). Bans are in nftables at once either way: the
/// register is what a restart or reboot restores from. Writing it after
/// every batch made a flood cost O(bans²).
pub const SAVE_EVERY: Duration = Duration::from_millis(200);

pub struct BanPath {
    table: TableSettings,
    settings: BanSettings,
    dry_run: bool,
    applier: Applier,
    counters: Arc<Counters>,
    /// Whether saves may wait (the daemon) or not (an admin command).
    throttle_saves: bool,
    saved_at: Option<Instant>,
    unsaved: bool,
    /// The background sync of the last write, if still running.
    syncing: Option<tokio::task::JoinHandle<()>>,
    /// Bans made since the last write: kept if another process (an admin
    /// command) rewrote the file meanwhile.
    pending: BTreeMap<Cidr, Ban>,
    /// The register's prefix lengths, kept up to date rather than counted
    /// over every ban for every batch (which made a flood O(bans²)).
    lengths: Option<Lengths>,
    /// How long the last write took: the next waits ten times as long, so
    /// writing a big register never takes more than a tenth of the time.
    write_took: Duration,
    observer: Option<Arc<dyn Observer>>,
}

impl BanPath {
    /// The daemon's path: its table and settings go into the register, so
    /// the admin commands follow them.
    pub fn daemon(
        table: TableSettings,
        settings: BanSettings,
        dry_run: bool,
        counters: Arc<Counters>,
    ) -> Self {
        Self::new(table, settings, dry_run, counters, true)
    }

    /// Feeds `--metrics-listen`'s metrics: bans by cause, apply latency.
    pub fn with_telemetry(mut self, telemetry: Option<Telemetry>) -> Self {
        self.applier.telemetry = telemetry;
        self
    }

    /// An admin command's path, with the settings the daemon last wrote.
    pub fn admin(register: &Register) -> Self {
        let counters = Arc::new(Counters::default());
        Self::new(
            register.table.clone(),
            register.settings.clone(),
            false,
            counters,
            false,
        )
    }

    fn new(
        table: TableSettings,
        settings: BanSettings,
        dry_run: bool,
        counters: Arc<Counters>,
        throttle_saves: bool,
    ) -> Self {
        BanPath {
            table,
            settings,
            dry_run,
            applier: Applier::new(counters.clone()),
            counters,
            throttle_saves,
            saved_at: None,
            unsaved: false,
            syncing: None,
            pending: BTreeMap::new(),
            lengths: None,
            write_took: Duration::ZERO,
            observer: None,
        }
    }

    /// Tells `observer` of every ban and unban from now on.
    pub fn with_observer(mut self, observer: Option<Arc<dyn Observer>>) -> Self {
        self.observer = observer;
        self
    }

    /// The allowlisted network `cidr` overlaps, if any: no ban may touch it.
    pub fn allowlisted(&self, cidr: &Cidr) -> Option<Cidr> {
        self.settings
            .allow
            .iter()
            .find(|a| a.covers(cidr) || cidr.covers(a))
            .copied()
    }

    /// A reload's settings (allowlist, `--remember`, `--ipv6-aggregate`),
    /// recorded in the register for the admin commands when given it.
    pub fn set_settings(
        &mut self,
        settings: BanSettings,
        locked: Option<&mut Locked>,
    ) -> Result<()> {
        self.settings = settings;
        if let Some(locked) = locked {
            locked.register.settings = self.settings.clone();
            locked.save()?;
        }
        Ok(())
    }

    /// Creates the table (afresh if its sets were made with other settings)
    /// and loads the register's live bans into it; records this path's
    /// settings in the register. Returns how many bans were loaded.
    pub async fn restore(&mut self, locked: &mut Locked, now: u64) -> Result<usize> {
        locked.register.table = self.table.clone();
        locked.register.settings = self.settings.clone();
        locked.register.forget_expired(now);
        locked.save()?;
        self.rebuild(&locked.register, now).await
    }

    /// Whether the table is there with all its sets (a netlink round trip).
    pub async fn table_present(&mut self) -> Result<bool> {
        self.applier.table_present().await
    }

    /// Rebuilds the table someone removed (`nft flush ruleset`, a firewall
    /// reload) with the live bans. Returns how many were loaded.
    pub async fn heal(&mut self, register: &Register, now: u64) -> Result<usize> {
        warn!(
            "table inet spamdelay is gone (flushed or reloaded?): recreating it with {} live bans",
            register.active(now).count()
        );
        self.rebuild(register, now).await
    }

    async fn rebuild(&mut self, register: &Register, now: u64) -> Result<usize> {
        self.ensure_table().await?;
        self.applier.forget_sets();
        let live: Vec<Change> = register
            .active(now)
            .map(|(cidr, ban)| add(cidr, ban, now))
            .collect();
        Ok(self.applier.apply(&live).await.len())
    }

    /// Creates or updates the table; recreates it when its sets do not
    /// match these settings (the register holds every ban: nothing is lost).
    pub async fn ensure_table(&self) -> Result<()> {
        if let Err(e) = self.table.ensure().await {
            if matches!(e, NftError::Missing | NftError::Permission) {
                return Err(e).context("setting up table inet spamdelay");
            }
            warn!("table inet spamdelay does not match these settings ({e}): recreating it");
            nft::delete_table()
                .await
                .context("deleting the old table inet spamdelay")?;
            self.table
                .ensure()
                .await
                .context("creating table inet spamdelay")?;
        }
        Ok(())
    }

    /// Bans what is wanted, in one go: see the module's description. The
    /// register is written (at once for an admin; for the daemon, after
    /// every batch while it is small, every `SAVE_EVERY` when it is big).
    pub async fn ban(
        &mut self,
        locked: &mut Locked,
        policy: &Policy,
        wanted: Vec<Wanted>,
        now: u64,
    ) -> Result<Vec<Done>> {
        self.merge_pending(locked);
        if locked.reread || self.lengths.is_none() {
            self.lengths = Some(locked.register.lengths());
        }
        let lengths = self.lengths.clone().unwrap_or_default();
        let (plan, mut done) = self.plan(&locked.register, &lengths, policy, wanted, now);
        if self.dry_run {
            done.extend(plan.into_iter().map(Planned::done));
            return Ok(done);
        }
        if plan.is_empty() {
            return Ok(done);
        }
        // Additions first; the narrower bans inside a new one are lifted
        // only once it took, so a refusal never leaves a gap.
        let adds: Vec<Change> = plan.iter().map(|p| add(&p.cidr, &p.ban, now)).collect();
        let took: HashSet<Cidr> = self.applier.apply(&adds).await.into_iter().collect();
        let mut lift = Vec::new();
        for p in plan {
            if !took.contains(&p.cidr) {
                done.push(Done::Refused { cidr: p.cidr });
                continue;
            }
            self.counters.bans.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = &self.applier.telemetry {
                t.ban_added(Cause::of_reason(&p.ban.reason));
            }
            if p.members.is_some() {
                self.counters.aggregated.fetch_add(1, Ordering::Relaxed);
            }
            for c in &p.inside {
                locked.register.bans.remove(c);
                lift.push(Change::Delete {
                    cidr: *c,
                    set: nft::set_for(c),
                });
            }
            locked.register.bans.insert(p.cidr, p.ban.clone());
            if let Some(l) = &mut self.lengths {
                l.add(&p.cidr);
            }
            if self.throttle_saves {
                self.pending.insert(p.cidr, p.ban.clone());
            }
            if let Some(o) = &self.observer {
                o.banned(&p.cidr, &p.ban, now);
            }
            done.push(p.done());
        }
        let lifted = self.applier.apply(&lift).await;
        if lifted.len() < lift.len() {
            warn!(
                "{} narrower bans inside new wider ones stay in nftables until they expire",
                lift.len() - lifted.len()
            );
        }
        self.save(locked, now)?;
        Ok(done)
    }

    /// Sentences each wanted ban against the register and the others.
    fn plan(
        &self,
        register: &Register,
        lengths: &Lengths,
        policy: &Policy,
        wanted: Vec<Wanted>,
        now: u64,
    ) -> (Vec<Planned>, Vec<Done>) {
        let mut plan: Vec<Planned> = Vec::new();
        let mut done = Vec::new();
        for w in wanted {
            if plan.iter().any(|p| p.cidr == w.cidr) {
                continue;
            }
            if let Some((by, b)) = register.covering_in(lengths, &w.cidr, now) {
                let long_enough = match w.term {
                    Term::Sentence => true,
                    // A manual re-ban of the same element refreshes it.
                    Term::Fixed(t) => *by != w.cidr && b.expires >= now.saturating_add(t.as_secs()),
                    Term::Foreign(t) => b.expires >= now.saturating_add(t.as_secs()),
                };
                if long_enough {
                    done.push(Done::Covered {
                        cidr: w.cidr,
                        by: *by,
                    });
                    continue;
                }
            }
            let ban = self.sentence(register, policy, &w.cidr, w.term, w.reason, now);
            let inside = if w.cidr.is_host() {
                Vec::new()
            } else {
                register
                    .inside(&w.cidr)
                    .filter(|(c, b)| **c != w.cidr && b.active(now))
                    .map(|(c, _)| *c)
                    .collect()
            };
            plan.push(Planned {
                cidr: w.cidr,
                ban,
                inside,
                members: None,
            });
        }
        let plan = self.aggregate(register, policy, plan, now);
        (plan, done)
    }

    /// The register entry for a new offence of `cidr`: the offence counted
    /// through the policy (remembered ones only), remembered as the policy
    /// says.
    fn sentence(
        &self,
        register: &Register,
        policy: &Policy,
        cidr: &Cidr,
        term: Term,
        reason: String,
        now: u64,
    ) -> Ban {
        let mut sentence = policy.sentence(register.bans.get(cidr), now);
        if let Term::Fixed(t) | Term::Foreign(t) = term {
            sentence.duration = t;
        }
        policy.ban(&sentence, nft::comment(&reason), now)
    }

    /// `--ipv6-aggregate K`: once K distinct addresses of one /64 are
    /// banned (the register's and this batch's), the /64 is banned instead
    /// of the batch's ones, for at least as long as any of them, and the
    /// register's are lifted.
    fn aggregate(
        &self,
        register: &Register,
        policy: &Policy,
        plan: Vec<Planned>,
        now: u64,
    ) -> Vec<Planned> {
        let k = self.settings.ipv6_aggregate as usize;
        if k == 0 {
            return plan;
        }
        let mut by_net: BTreeMap<Cidr, Vec<usize>> = BTreeMap::new();
        for (i, p) in plan.iter().enumerate() {
            if !p.cidr.is_ipv4() && p.cidr.is_host() {
                let net = Cidr::around(p.cidr.addr(), V6_NET_PREFIX);
                by_net.entry(net).or_default().push(i);
            }
        }
        let mut taken = vec![false; plan.len()];
        let mut nets = Vec::new();
        for (net, idx) in by_net {
            if plan.iter().any(|p| p.cidr == net) {
                continue;
            }
            let banned: Vec<(Cidr, u64)> = register
                .inside(&net)
                .filter(|(c, b)| c.is_host() && b.active(now))
                .map(|(c, b)| (*c, b.expires))
                .collect();
            let fresh: Vec<usize> = idx
                .into_iter()
                .filter(|&i| !banned.iter().any(|(c, _)| *c == plan[i].cidr))
                .collect();
            if banned.len() + fresh.len() < k {
                continue;
            }
            if let Some(a) = self
                .settings
                .allow
                .iter()
                .find(|a| a.covers(&net) || net.covers(a))
            {
                if banned.len() < k {
                    info!(
                        "{} not banned as a whole although {k} addresses of it are: it holds allowlisted {a}",
                        show(&net)
                    );
                }
                continue;
            }
            let longest = banned
                .iter()
                .map(|(_, e)| *e)
                .chain(fresh.iter().map(|&i| plan[i].ban.expires))
                .max()
                .unwrap_or(now);
            let last = fresh.last().map_or("", |&i| plan[i].ban.reason.as_str());
            let reason = format!(
                "aggregate: {} addresses of {} banned; last: {last}",
                banned.len() + fresh.len(),
                show(&net)
            );
            let mut ban = self.sentence(register, policy, &net, Term::Sentence, reason, now);
            if ban.expires < longest {
                ban.remember_until = ban.remember_until.saturating_add(longest - ban.expires);
                ban.expires = longest;
            }
            for &i in &fresh {
                taken[i] = true;
            }
            let mut inside: Vec<Cidr> = register
                .inside(&net)
                .filter(|(c, b)| **c != net && b.active(now))
                .map(|(c, _)| *c)
                .collect();
            inside.sort();
            nets.push(Planned {
                cidr: net,
                ban,
                members: Some((
                    fresh.iter().map(|&i| plan[i].cidr).collect(),
                    banned.len() + fresh.len(),
                )),
                inside,
            });
        }
        plan.into_iter()
            .zip(taken)
            .filter_map(|(p, t)| (!t).then_some(p))
            .chain(nets)
            .collect()
    }

    /// Writes the register: an admin's at once and synced; the daemon's
    /// replaced atomically after every batch while it is small, every
    /// `SAVE_EVERY` when it is big, and synced to disk in the background,
    /// so the next verdict never waits for the disk.
    fn save(&mut self, locked: &mut Locked, now: u64) -> Result<()> {
        if !self.throttle_saves {
            locked.register.forget_expired(now);
            return locked.save();
        }
        if self.write_due() {
            self.write(locked, now)?;
        } else {
            self.unsaved = true;
        }
        Ok(())
    }

    /// Whether the register may be written now (see `write_took`).
    fn write_due(&self) -> bool {
        let wait = SAVE_EVERY.max(self.write_took * 10);
        self.saved_at.is_none_or(|t| t.elapsed() >= wait)
    }

    /// Puts back the bans made since the last write when another process
    /// rewrote the register meanwhile (it read the file without them).
    fn merge_pending(&mut self, locked: &mut Locked) {
        if !locked.reread || self.pending.is_empty() {
            return;
        }
        for (cidr, ban) in &self.pending {
            locked
                .register
                .bans
                .entry(*cidr)
                .or_insert_with(|| ban.clone());
        }
    }

    fn write(&mut self, locked: &mut Locked, now: u64) -> Result<()> {
        let started = Instant::now();
        locked.register.forget_expired(now);
        let path = locked.save_unsynced()?;
        self.write_took = started.elapsed();
        self.saved_at = Some(Instant::now());
        self.unsaved = false;
        self.pending.clear();
        if self.syncing.as_ref().is_none_or(|t| t.is_finished()) {
            self.syncing = Some(tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::bans::sync(&path) {
                    warn!("syncing {}: {e:#}", path.display());
                }
            }));
        }
        Ok(())
    }

    /// Writes bans a busy moment left unsaved, once their wait is over (or
    /// at once, `now_or_never`, when the daemon stops).
    pub fn flush(&mut self, locked: &mut Locked, now: u64, now_or_never: bool) -> Result<()> {
        if !self.unsaved || !(now_or_never || self.write_due()) {
            return Ok(());
        }
        self.merge_pending(locked);
        self.write(locked, now)
    }

    /// Whether a busy flood left bans unsaved (`flush` writes them).
    pub fn unsaved(&self) -> bool {
        self.unsaved
    }

    /// Lifts every ban inside `cidr` (and forgets their offences): from the
    /// register, and from nftables, elements the register does not know
    /// included.
    pub async fn unban(&mut self, locked: &mut Locked, cidr: &Cidr, now: u64) -> Result<Lifted> {
        let lifted = self.lift(locked, cidr, now).await?;
        if let Some(o) = &self.observer {
            let told: Vec<&Cidr> = if lifted.register.is_empty() && !lifted.elements.is_empty() {
                vec![cidr]
            } else {
                lifted.register.iter().collect()
            };
            for c in told {
                o.unbanned(c, now);
            }
        }
        Ok(lifted)
    }

    /// Lifts the ban of exactly `cidr` (not the narrower ones inside it),
    /// without telling the observer: a ban the fleet made and lifted.
    pub async fn lift_exactly(&mut self, locked: &mut Locked, cidr: &Cidr, now: u64) -> Result<()> {
        let delete = [Change::Delete {
            cidr: *cidr,
            set: nft::set_for(cidr),
        }];
        if self.applier.apply(&delete).await.is_empty() {
            anyhow::bail!("nftables refused to delete {}", show(cidr));
        }
        locked.register.bans.remove(cidr);
        locked.register.forget_expired(now);
        locked.save()
    }

    /// `unban` without telling the observer: for bans lifted because the
    /// allowlist grew, or because the fleet lifted them itself.
    pub async fn lift(&mut self, locked: &mut Locked, cidr: &Cidr, now: u64) -> Result<Lifted> {
        let register: Vec<Cidr> = locked.register.inside(cidr).map(|(c, _)| *c).collect();
        let mut deletes: Vec<Change> = Vec::new();
        if cidr.is_host() {
            // Deleting a missing element from a hash set is no error (over
            // netlink): no need to list what nftables holds.
            deletes.push(Change::Delete {
                cidr: *cidr,
                set: nft::set_for(cidr),
            });
        } else {
            let listed = nft::list_elements()
                .await
                .context("listing table inet spamdelay")?;
            deletes.extend(listed.iter().filter(|l| cidr.covers(&l.cidr)).map(|l| {
                Change::Delete {
                    cidr: l.cidr,
                    set: l.set,
                }
            }));
        }
        let in_nft: Vec<Cidr> = deletes.iter().map(|d| *d.cidr()).collect();
        let elements = self.applier.apply(&deletes).await;
        if elements.len() < in_nft.len() {
            anyhow::bail!(
                "nftables refused to delete {} of {} elements: nothing lifted",
                in_nft.len() - elements.len(),
                in_nft.len()
            );
        }
        for c in &register {
            locked.register.bans.remove(c);
        }
        locked.register.forget_expired(now);
        locked.save()?;
        let still_covered_by = locked
            .register
            .covering(cidr, now)
            .map(|(by, _)| *by)
            .filter(|by| by != cidr);
        // A host's delete is sent whether or not it was banned: report it
        // only when the register had it.
        let elements = if cidr.is_host() && register.is_empty() {
            Vec::new()
        } else {
            elements
        };
        Ok(Lifted {
            register,
            elements,
            still_covered_by,
        })
    }
}

/// A ban about to be sent.
struct Planned {
    cidr: Cidr,
    ban: Ban,
    /// Narrower bans in force inside it, lifted once it took.
    inside: Vec<Cidr>,
    /// For an aggregate: the batch's addresses it stands for, and how many
    /// addresses in all.
    members: Option<(Vec<Cidr>, usize)>,
}

impl Planned {
    fn done(self) -> Done {
        match self.members {
            Some((cidrs, members)) => Done::Aggregated {
                cidrs,
                net: self.cidr,
                members,
                ban: self.ban,
            },
            None => Done::Banned {
                cidr: self.cidr,
                ban: self.ban,
            },
        }
    }
}

fn add(cidr: &Cidr, ban: &Ban, now: u64) -> Change {
    Change::Add {
        cidr: *cidr,
        set: nft::set_for(cidr),
        timeout_secs: ban.time_left(now).as_secs(),
        comment: nft::comment(&ban.reason),
    }
}

/// Where element changes go: addresses and /64s into the hash sets over
/// netlink, in process (no `nft` run per ban), other networks into the
/// interval sets through `nft -j`. A full set is reported once a minute,
/// not once per address, and counted.
struct Applier {
    /// Opened on first use, dropped (and reopened) after a transport error.
    netlink: Option<NetlinkSets>,
    full_warned: Option<Instant>,
    /// Bans refused because their set was full, since the last warning.
    full_since_warning: u64,
    counters: Arc<Counters>,
    telemetry: Option<Telemetry>,
}

/// How often a full set is warned about.
const FULL_WARN_EVERY: Duration = Duration::from_secs(60);

impl Applier {
    fn new(counters: Arc<Counters>) -> Self {
        Applier {
            netlink: None,
            full_warned: None,
            full_since_warning: 0,
            counters,
            telemetry: None,
        }
    }

    /// Whether the table is complete, over netlink (`nft` if that fails).
    async fn table_present(&mut self) -> Result<bool> {
        let netlink = match self.netlink.take() {
            Some(s) => Ok(s),
            None => NetlinkSets::open(),
        };
        if let Ok(mut sets) = netlink
            && let Ok(present) = blocking(|| sets.table_complete())
        {
            self.netlink = Some(sets);
            return Ok(present);
        }
        Ok(nft::table_exists().await?)
    }

    /// After the table was (re)created: its sets are asked about afresh.
    fn forget_sets(&mut self) {
        if let Some(s) = &mut self.netlink {
            s.forget_sets();
        }
    }

    /// Applies `changes`; returns the networks of those that took.
    async fn apply(&mut self, changes: &[Change]) -> Vec<Cidr> {
        if changes.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let (mut took, rest) = match self.over_netlink(changes).await {
            Ok(split) => split,
            Err(e) => {
                warn!(
                    "netlink: {e:#}: applying {} changes through nft",
                    changes.len()
                );
                (Vec::new(), changes.to_vec())
            }
        };
        let through_nft = apply_resilient(&rest).await;
        self.counters
            .apply_errors
            .fetch_add((rest.len() - through_nft.len()) as u64, Ordering::Relaxed);
        took.extend(through_nft);
        if let Some(t) = &self.telemetry {
            t.applied(started.elapsed());
        }
        took
    }

    /// Sends `changes` over netlink; returns what took and what must go
    /// through nft (interval sets).
    async fn over_netlink(&mut self, changes: &[Change]) -> Result<(Vec<Cidr>, Vec<Change>)> {
        let mut sets = match self.netlink.take() {
            Some(s) => s,
            None => NetlinkSets::open().context("opening a netfilter netlink socket")?,
        };
        // nf_tables handles a batch within the sendmsg call and its answers
        // are read without waiting: microseconds, spent right here rather
        // than on a hand-over to a blocking thread (as long again).
        let applied = blocking(|| sets.apply(changes))?;
        self.netlink = Some(sets);
        let mut took = Vec::new();
        let mut rest = Vec::new();
        let mut full: Vec<&'static str> = Vec::new();
        let mut refused_full = 0;
        for (change, outcome) in changes.iter().zip(applied.outcomes()) {
            match outcome {
                Ok(()) => took.push(*change.cidr()),
                Err(Refusal::IntervalSet { .. } | Refusal::Network { .. }) => {
                    rest.push(change.clone())
                }
                Err(Refusal::Full { set }) => {
                    refused_full += 1;
                    if !full.contains(set) {
                        full.push(set);
                    }
                }
                Err(e) => {
                    self.counters.apply_errors.fetch_add(1, Ordering::Relaxed);
                    error!("nf_tables refused {}: {e}", show(change.cidr()))
                }
            }
        }
        if !full.is_empty() {
            self.full(&full, refused_full);
        }
        Ok((took, rest))
    }

    /// One warning a minute for full sets, with how many bans they cost.
    fn full(&mut self, sets: &[&'static str], refused: usize) {
        self.counters
            .set_full
            .fetch_add(refused as u64, Ordering::Relaxed);
        self.full_since_warning += refused as u64;
        if self
            .full_warned
            .is_some_and(|t| t.elapsed() < FULL_WARN_EVERY)
        {
            return;
        }
        warn!(
            "set {} is full: {} bans refused since the last warning; the kernel's bridge still blocks new offenders for a while; raise --set-size",
            sets.join(", "),
            self.full_since_warning
        );
        self.full_warned = Some(Instant::now());
        self.full_since_warning = 0;
    }
}

/// Runs `f`, which may block briefly (a flock, a write, a command), without
/// stalling the runtime's other tasks (on a multi-threaded runtime; as is
/// otherwise).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Applies changes in one transaction; if nft refuses the whole, each change
/// alone, so one bad element cannot cost the others. Returns what took.
async fn apply_resilient(changes: &[Change]) -> Vec<Cidr> {
    if changes.is_empty() {
        return Vec::new();
    }
    match nft::apply_changes(changes).await {
        Ok(()) => return changes.iter().map(|c| *c.cidr()).collect(),
        Err(e) if changes.len() == 1 => {
            error!("nft refused {}: {e}", show(changes[0].cidr()));
            return Vec::new();
        }
        Err(e) => warn!(
            "nft refused a batch of {} ({e}): applying them one by one",
            changes.len()
        ),
    }
    let mut ok = Vec::new();
    for c in changes {
        match nft::apply_changes(std::slice::from_ref(c)).await {
            Ok(()) => ok.push(*c.cidr()),
            Err(e) => error!("nft refused {}: {e}", show(c.cidr())),
        }
    }
    ok
}
