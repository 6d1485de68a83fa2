//! The ban pipeline: verdicts in, deduplicated per network, sentenced by the
//! policy, applied to nftables in batches (one transaction per batch), then
//! recorded in the register. It also keeps the table alive: should it vanish
//! (`nft flush ruleset`, a firewall reload), it is rebuilt with the live bans.

use std::time::Duration;

use anyhow::{Context, Result};
use log::{error, info, warn};
use spamdelay_common::Verdict;
use tokio::sync::mpsc;

use crate::{
    allow::Cidr,
    bans::{self, Register, Store, TableSettings},
    events::Report,
    netlink::{NetlinkSets, Refusal},
    nft::{self, Change, NftError},
    passcache::PassCache,
    policy::{Offence, Policy},
};

/// A batch holds at most this many verdicts.
pub const BATCH_MAX: usize = 512;
/// How often the table's presence is checked.
pub const HEAL_EVERY: Duration = Duration::from_millis(500);

pub struct Enforcer {
    pub store: Store,
    pub policy: Policy,
    pub table: TableSettings,
    pub dry_run: bool,
    /// Every pass, for PIPECONNECT after a restart and the MTA's file.
    pub pass_cache: PassCache,
    /// When the register was last written, and whether bans since are not.
    pub saved_at: Option<std::time::Instant>,
    pub unsaved: bool,
    /// Where element changes go.
    pub applier: Applier,
}

/// A register this big is written at most every `SAVE_EVERY` (each write is
/// the whole file, fsynced); a smaller one after every batch. Bans are in
/// nftables at once either way: the register is what a reboot restores from.
const SAVE_ANYWAY_BELOW: usize = 10_000;
const SAVE_EVERY: Duration = Duration::from_millis(500);

/// `[198.51.100.7]` for an address, `[2001:db8::]/64` for a network.
pub fn show(cidr: &Cidr) -> String {
    if cidr.is_host() {
        format!("[{}]", cidr.addr())
    } else {
        format!("[{}]/{}", cidr.addr(), cidr.prefix_len())
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

impl Enforcer {
    /// Sets up the table and restores the register's live bans. Nothing at
    /// all is done to nftables in a dry run.
    pub async fn start(&mut self) -> Result<()> {
        if self.dry_run {
            return Ok(());
        }
        let (mut locked, _) = self.store.lock()?;
        locked.register.table = self.table.clone();
        locked.register.forget_expired(bans::now());
        locked.save()?;
        let restored = self
            .rebuild(live_bans(&locked.register, &self.table, bans::now()))
            .await?;
        if restored > 0 {
            info!(
                "restored {restored} bans from {}",
                self.store.path().display()
            );
        }
        Ok(())
    }

    /// (Re)creates the table and loads the live bans into it.
    async fn rebuild(&mut self, live: Vec<Change>) -> Result<usize> {
        let t = &self.table;
        if let Err(e) = t.ensure().await {
            if matches!(e, NftError::Missing | NftError::Permission) {
                return Err(e).context("setting up table inet spamdelay");
            }
            // Sets made earlier with other settings: start the table afresh;
            // the register holds every ban, so nothing is lost.
            warn!("table inet spamdelay does not match these settings ({e}): recreating it");
            nft::delete_table()
                .await
                .context("deleting the old table inet spamdelay")?;
            t.ensure().await.context("creating table inet spamdelay")?;
        }
        Ok(self.applier.apply(&live).await.len())
    }

    /// Runs until the report channel closes.
    pub async fn run(mut self, mut reports: mpsc::Receiver<Report>) {
        let mut heal = tokio::time::interval(HEAL_EVERY);
        heal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                first = reports.recv() => {
                    let Some(first) = first else {
                        if let Err(e) = self.pass_cache.flush(bans::now(), !self.dry_run) {
                            error!("writing the pass cache: {e:#}");
                        }
                        if let Err(e) = self.save_register() {
                            error!("writing the ban register: {e:#}");
                        }
                        return;
                    };
                    let mut batch = collect_batch(first, &mut reports);
                    for r in &mut batch {
                        r.pause = self.policy.greet_pause;
                    }
                    self.remember_passes(&batch);
                    if let Err(e) = self.punish(&batch).await {
                        error!("applying {} verdicts: {e:#}", batch.len());
                    }
                }
                _ = heal.tick() => {
                    if let Err(e) = self.pass_cache.flush(bans::now(), !self.dry_run) {
                        error!("writing the pass cache: {e:#}");
                    }
                    if self.dry_run {
                        continue;
                    }
                    if let Err(e) = self.save_register() {
                        error!("writing the ban register: {e:#}");
                    }
                    if let Err(e) = self.heal().await {
                        error!("checking table inet spamdelay: {e:#}");
                    }
                }
            }
        }
    }

    /// Clients that waited for the greeting go to the pass cache (written on
    /// the next tick, not per verdict), in a dry run too: the kernel keeps
    /// its own copy for PIPECONNECT either way.
    fn remember_passes(&mut self, batch: &[Report]) {
        let now = bans::now();
        // A forgiven PIPECONNECT renews the pass, as the kernel does.
        for r in batch
            .iter()
            .filter(|r| matches!(r.verdict, Verdict::Pass | Verdict::Pipeconnect))
        {
            self.pass_cache.record(r.client.ip(), now);
        }
    }

    /// Sentences a batch of verdicts and applies the bans in one transaction.
    async fn punish(&mut self, batch: &[Report]) -> Result<()> {
        // Log every verdict first: the log is the record even if nft fails.
        for r in batch {
            info!("{r}");
        }
        let mut offences: Vec<Offence> = Vec::new();
        for o in batch.iter().filter_map(|r| self.policy.offence(r)) {
            if !offences.iter().any(|seen| seen.cidr == o.cidr) {
                offences.push(o);
            }
        }
        if offences.is_empty() {
            return Ok(());
        }
        let (mut locked, _) = self.store.lock()?;
        let now = bans::now();
        let mut planned = Vec::new();
        let lengths = locked.register.lengths();
        for o in offences {
            if let Some((by, _)) = locked.register.covering_in(&lengths, &o.cidr, now) {
                info!("{} already banned as {}", show(&o.cidr), show(by));
                continue;
            }
            let sentence = self.policy.sentence(locked.register.bans.get(&o.cidr), now);
            let ban = self.policy.ban(&sentence, o.reason, now);
            let verb = if self.dry_run { "would ban" } else { "ban" };
            info!(
                "{verb} {} for {} (offence {}): {}",
                show(&o.cidr),
                human(sentence.duration),
                sentence.offences,
                ban.reason
            );
            planned.push((o.cidr, ban));
        }
        if self.dry_run || planned.is_empty() {
            return Ok(());
        }
        let changes: Vec<Change> = planned
            .iter()
            .map(|(cidr, ban)| Change::Add {
                cidr: *cidr,
                set: self.table.set_for(cidr),
                timeout_secs: ban.time_left(now).as_secs(),
                comment: nft::comment(&ban.reason),
            })
            .collect();
        let applied = self.applier.apply(&changes).await;
        for (cidr, ban) in planned {
            if applied.contains(&cidr) {
                locked.register.bans.insert(cidr, ban);
            }
        }
        let due = self.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY);
        if locked.register.bans.len() < SAVE_ANYWAY_BELOW || due {
            locked.register.forget_expired(now);
            locked.save()?;
            self.saved_at = Some(std::time::Instant::now());
            self.unsaved = false;
        } else {
            self.unsaved = true;
        }
        Ok(())
    }

    /// Writes bans a busy flood left unsaved.
    fn save_register(&mut self) -> Result<()> {
        if !self.unsaved {
            return Ok(());
        }
        let (mut locked, _) = self.store.lock()?;
        locked.register.forget_expired(bans::now());
        locked.save()?;
        self.saved_at = Some(std::time::Instant::now());
        self.unsaved = false;
        Ok(())
    }

    /// Rebuilds the table if someone removed it.
    async fn heal(&mut self) -> Result<()> {
        if nft::table_exists().await? {
            return Ok(());
        }
        let (locked, _) = self.store.lock()?;
        let live = live_bans(&locked.register, &self.table, bans::now());
        warn!(
            "table inet spamdelay is gone (flushed or reloaded?): recreating it with {} live bans",
            live.len()
        );
        self.rebuild(live).await?;
        Ok(())
    }
}

/// Every ban in force, as additions with their time left.
fn live_bans(register: &Register, table: &TableSettings, now: u64) -> Vec<Change> {
    register
        .active(now)
        .map(|(cidr, ban)| Change::Add {
            cidr: *cidr,
            set: table.set_for(cidr),
            timeout_secs: ban.time_left(now).as_secs(),
            comment: nft::comment(&ban.reason),
        })
        .collect()
}

/// The first verdict and whatever else is already waiting, without waiting
/// for more: a lone early talker is banned at once, while under a flood the
/// verdicts that arrive during one nft transaction make up the next batch.
fn collect_batch(first: Report, reports: &mut mpsc::Receiver<Report>) -> Vec<Report> {
    let mut batch = vec![first];
    while batch.len() < BATCH_MAX {
        match reports.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    batch
}

/// Where element changes go: addresses into the hash sets over netlink, in
/// process (no `nft` run per ban), networks into the interval sets through
/// `nft -j`. A full set is reported once a minute, not once per address.
#[derive(Default)]
pub struct Applier {
    /// Opened on first use, dropped (and reopened) after a transport error.
    netlink: Option<NetlinkSets>,
    full_warned: Option<std::time::Instant>,
    /// Bans refused because their set was full, since the last warning.
    full_since_warning: u64,
}

/// How often a full set is warned about.
const FULL_WARN_EVERY: Duration = Duration::from_secs(60);

impl Applier {
    /// Applies `changes`; returns the networks of those that took.
    pub async fn apply(&mut self, changes: &[Change]) -> Vec<Cidr> {
        if changes.is_empty() {
            return Vec::new();
        }
        let (mut took, rest) = match self.over_netlink(changes).await {
            Ok(split) => split,
            Err(e) => {
                warn!(
                    "netlink: {e}: applying {} changes through nft",
                    changes.len()
                );
                (Vec::new(), changes.to_vec())
            }
        };
        took.extend(apply_resilient(&rest).await);
        took
    }

    /// Sends `changes` over netlink; returns what took and what must go
    /// through nft (interval sets).
    async fn over_netlink(&mut self, changes: &[Change]) -> Result<(Vec<Cidr>, Vec<Change>)> {
        let mut sets = match self.netlink.take() {
            Some(s) => s,
            None => NetlinkSets::open().context("opening a netfilter netlink socket")?,
        };
        let batch = changes.to_vec();
        // The socket blocks: off the two runtime workers.
        let (sets, result) = tokio::task::spawn_blocking(move || {
            let r = sets.apply(&batch);
            (sets, r)
        })
        .await
        .context("the netlink task")?;
        let applied = result?;
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
                Err(e) => error!("nf_tables refused {}: {e}", show(change.cidr())),
            }
        }
        if !full.is_empty() {
            self.full(&full, refused_full);
        }
        Ok((took, rest))
    }

    /// One warning a minute for full sets, with how many bans they cost.
    fn full(&mut self, sets: &[&'static str], refused: usize) {
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
        self.full_warned = Some(std::time::Instant::now());
        self.full_since_warning = 0;
    }
}

/// Applies changes in one transaction; if nft refuses the whole, each change
/// alone, so one bad element cannot cost the others. Returns what took.
pub async fn apply_resilient(changes: &[Change]) -> Vec<Cidr> {
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
