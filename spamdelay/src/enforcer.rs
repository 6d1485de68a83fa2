//! The daemon's side of banning: verdicts in, deduplicated per network,
//! handed to the ban path (banpath.rs) in batches, the pass cache fed, and
//! the table kept alive: should it vanish (`nft flush ruleset`, a firewall
//! reload), it is rebuilt with the live bans.

use std::time::Duration;

use anyhow::Result;
use log::{error, info, warn};
use spamdelay_common::Verdict;
use tokio::sync::mpsc;

use crate::{
    allow::Cidr,
    banpath::{BanPath, Done, Foreign, Term, Wanted, show},
    bans::{self, Store},
    duration,
    eventlog::{self, EventLog},
    events::Report,
    exporter::Telemetry,
    passcache::PassCache,
    policy::Policy,
};

/// A batch holds at most this many verdicts.
pub const BATCH_MAX: usize = 512;
/// How often the table's presence is checked (one netlink round trip) and
/// the register's deferred bans written.
pub const HEAL_EVERY: Duration = crate::banpath::SAVE_EVERY;

/// Settings a reload (SIGHUP) changes, applied between two batches.
#[derive(Clone, Debug)]
pub struct Update {
    pub policy: Policy,
    pub settings: crate::bans::BanSettings,
    pub pass_file: Option<crate::passcache::PassFile>,
    /// Networks newly allowlisted: their bans are lifted, their offences
    /// forgotten.
    pub lift: Vec<crate::allow::Cidr>,
}

pub struct Enforcer {
    store: Store,
    policy: Policy,
    path: BanPath,
    /// Every pass, for PIPECONNECT after a restart and the MTA's file.
    pass_cache: PassCache,
    dry_run: bool,
    /// `--event-log`: every batch's verdicts and bans as JSON lines.
    event_log: EventLog,
    /// `--metrics-listen`: verdicts counted by kind.
    telemetry: Option<Telemetry>,
}

/// The client of a ban as a journal field: the address, or the network.
fn client_field(cidr: &Cidr) -> String {
    if cidr.is_host() {
        cidr.addr().to_string()
    } else {
        cidr.to_string()
    }
}

impl Enforcer {
    pub fn new(
        store: Store,
        policy: Policy,
        path: BanPath,
        pass_cache: PassCache,
        dry_run: bool,
    ) -> Self {
        Enforcer {
            store,
            policy,
            path,
            pass_cache,
            dry_run,
            event_log: EventLog::off(),
            telemetry: None,
        }
    }

    /// Writes every batch's events to `log` (`--event-log`; a clone of the
    /// daemon's, which reopens it on SIGHUP).
    pub fn with_event_log(mut self, log: EventLog) -> Self {
        self.event_log = log;
        self
    }

    /// Counts every verdict for `--metrics-listen`.
    pub fn with_telemetry(mut self, telemetry: Option<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    pub fn pass_cache(&self) -> &PassCache {
        &self.pass_cache
    }

    /// Sets up the table and restores the register's live bans. Nothing at
    /// all is done to nftables in a dry run.
    pub async fn start(&mut self) -> Result<()> {
        if self.dry_run {
            return Ok(());
        }
        let (mut locked, _) = crate::banpath::blocking(|| self.store.lock())?;
        let restored = self.path.restore(&mut locked, bans::now()).await?;
        if restored > 0 {
            info!(
                "restored {restored} bans from {}",
                self.store.path().display()
            );
        }
        Ok(())
    }

    /// Runs until the report channel closes, taking reloaded settings
    /// between batches.
    pub async fn run(
        mut self,
        mut reports: mpsc::Receiver<Report>,
        mut updates: mpsc::Receiver<Update>,
        mut foreign: mpsc::Receiver<Foreign>,
    ) {
        let mut heal = tokio::time::interval(HEAL_EVERY);
        heal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(update) = updates.recv() => {
                    if let Err(e) = self.update(update).await {
                        error!("applying the reloaded settings: {e:#}");
                    }
                }
                Some(f) = foreign.recv() => {
                    if let Err(e) = self.foreign(f).await {
                        error!("applying the fleet's bans: {e:#}");
                    }
                }
                first = reports.recv() => {
                    let Some(first) = first else {
                        if let Err(e) = crate::banpath::blocking(|| self.pass_cache.flush(bans::now(), !self.dry_run)) {
                            error!("writing the pass cache: {e:#}");
                        }
                        if let Err(e) = self.save_register(true) {
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
                    if let Err(e) = crate::banpath::blocking(|| self.pass_cache.flush(bans::now(), !self.dry_run)) {
                        error!("writing the pass cache: {e:#}");
                    }
                    if self.dry_run {
                        continue;
                    }
                    if let Err(e) = self.save_register(false) {
                        error!("writing the ban register: {e:#}");
                    }
                    if let Err(e) = self.heal().await {
                        error!("checking table inet spamdelay: {e:#}");
                    }
                }
            }
        }
    }

    /// Takes reloaded settings: the policy for the next verdicts, the ban
    /// settings (recorded in the register for the admin commands), and the
    /// MTA's pass file (rewritten at once where it now goes).
    async fn update(&mut self, update: Update) -> Result<()> {
        self.policy = update.policy;
        self.pass_cache.set_file(update.pass_file);
        if self.dry_run {
            return self.path.set_settings(update.settings, None);
        }
        let (mut locked, _) = crate::banpath::blocking(|| self.store.lock())?;
        self.path.set_settings(update.settings, Some(&mut locked))?;
        let now = bans::now();
        for cidr in &update.lift {
            let lifted = self.path.lift(&mut locked, cidr, now).await?;
            let mut names: Vec<String> = lifted.register.iter().map(show).collect();
            names.extend(
                lifted
                    .elements
                    .iter()
                    .filter(|c| !lifted.register.contains(c))
                    .map(show),
            );
            if !names.is_empty() {
                info!("unban {}: now allowlisted", names.join(", "));
            }
            if let Some(by) = lifted.still_covered_by {
                warn!(
                    "{} is allowlisted now but inside the ban of {}: `spamdelay unban {}` lifts it",
                    show(cidr),
                    show(&by),
                    show(&by)
                );
            }
        }
        Ok(())
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

    /// Logs a batch of verdicts and bans its offenders through the ban path.
    async fn punish(&mut self, batch: &[Report]) -> Result<()> {
        // Log every verdict first: the log is the record even if nft fails.
        for r in batch {
            // Fields for the journal (main.rs): SPAMDELAY_VERDICT, SPAMDELAY_CLIENT.
            info!(spamdelay_verdict = r.word(), spamdelay_client:% = r.client.ip(); "{r}");
            if let Some(t) = &self.telemetry {
                t.verdict(r.verdict);
            }
        }
        let wanted: Vec<Wanted> = batch
            .iter()
            .filter_map(|r| self.policy.offence(r))
            .map(|o| Wanted {
                cidr: o.cidr,
                reason: o.reason,
                term: Term::Sentence,
            })
            .collect();
        if wanted.is_empty() {
            self.record(batch, Some(&[]));
            return Ok(());
        }
        let (mut locked, _) = self
            .store
            .lock()
            .inspect_err(|_| self.record(batch, None))?;
        let done = self
            .path
            .ban(&mut locked, &self.policy, wanted, bans::now())
            .await
            .inspect_err(|_| self.record(batch, None))?;
        drop(locked);
        self.record(batch, Some(&done));
        self.log_done(done);
        Ok(())
    }

    /// One line per ban made (or not).
    fn log_done(&self, done: Vec<Done>) {
        let verb = if self.dry_run { "would ban" } else { "ban" };
        for d in done {
            match d {
                Done::Banned { cidr, ban } => {
                    let secs = ban.expires.saturating_sub(bans::now());
                    info!(
                        spamdelay_client = client_field(&cidr), spamdelay_ban_time = secs;
                        "{verb} {} for {} (offence {}): {}",
                        show(&cidr),
                        duration::show(Duration::from_secs(secs)),
                        ban.offences,
                        ban.reason
                    )
                }
                Done::Covered { cidr, by } => {
                    info!("{} already banned as {}", show(&cidr), show(&by))
                }
                Done::Refused { .. } => {}
                Done::Aggregated {
                    cidrs,
                    net,
                    members,
                    ban,
                } => {
                    let shown: Vec<String> = cidrs.iter().map(show).collect();
                    let secs = ban.expires.saturating_sub(bans::now());
                    info!(
                        spamdelay_client = client_field(&net), spamdelay_ban_time = secs;
                        "{verb} {} for {} (offence {}) instead of {}: {members} addresses of it banned (--ipv6-aggregate)",
                        show(&net),
                        duration::show(Duration::from_secs(secs)),
                        ban.offences,
                        shown.join(", ")
                    )
                }
            }
        }
    }

    /// Bans other hosts made (the fleet's), never on an allowlisted
    /// address, and the lifts of their own bans.
    async fn foreign(&mut self, foreign: Foreign) -> Result<()> {
        let now = bans::now();
        let mut wanted = Vec::new();
        for w in foreign.bans {
            match self.path.allowlisted(&w.cidr) {
                Some(a) => info!(
                    "not banning {}: allowlisted ({a}); {}",
                    show(&w.cidr),
                    w.reason
                ),
                None => wanted.push(w),
            }
        }
        let (mut locked, _) = crate::banpath::blocking(|| self.store.lock())?;
        if !wanted.is_empty() {
            let done = self
                .path
                .ban(&mut locked, &self.policy, wanted, now)
                .await?;
            for d in &done {
                if let Done::Banned { cidr, ban } = d
                    && !self.dry_run
                {
                    self.event_log.ban(*cidr, ban, eventlog::By::Fleet, now);
                }
            }
            self.log_done(done);
        }
        for cidr in &foreign.lifts {
            let theirs = locked
                .register
                .bans
                .get(cidr)
                .is_some_and(|b| b.active(now) && b.reason.starts_with(foreign.lift_prefix));
            if !theirs || self.dry_run {
                continue;
            }
            self.path.lift_exactly(&mut locked, cidr, now).await?;
            self.event_log.unban(*cidr, eventlog::By::Fleet);
            info!("unban {}: lifted where it was decided", show(cidr));
        }
        Ok(())
    }

    /// A batch's events for the event log: `done` is what the ban path did,
    /// `None` when it failed.
    fn record(&self, batch: &[Report], done: Option<&[Done]>) {
        self.event_log.record_with(|| {
            eventlog::batch_events(batch, &self.policy, done, self.dry_run, bans::now())
        });
    }

    /// Writes bans a busy moment left unsaved (`at_exit`: whatever the wait).
    fn save_register(&mut self, at_exit: bool) -> Result<()> {
        if !self.path.unsaved() {
            return Ok(());
        }
        let (mut locked, _) = crate::banpath::blocking(|| self.store.lock())?;
        self.path.flush(&mut locked, bans::now(), at_exit)
    }

    /// Rebuilds the table if someone removed it.
    async fn heal(&mut self) -> Result<()> {
        if self.path.table_present().await? {
            return Ok(());
        }
        let (locked, _) = crate::banpath::blocking(|| self.store.lock())?;
        self.path.heal(&locked.register, bans::now()).await?;
        Ok(())
    }
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
