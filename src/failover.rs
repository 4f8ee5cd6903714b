//! Failover: commit of the external cache, promote/demote, purge and continuous injection.
//!
//! Kernel writes are blocking system calls and a commit of 250k flows takes a noticeable
//! fraction of a second, so each write runs as a job on the blocking pool with the [`Writer`]
//! moved into it; the state task keeps serving events and peers meanwhile and learns of the
//! result through a channel. One job at a time: the writer is either here or in the job.

use crate::cache::Mirror;
use crate::commit::{self, CommitCursor, CommitOptions};
use crate::config::{CommitMode, FailoverConfig};
use crate::flow::{Flow, FlowKey};
use crate::netlink::{WriteReport, Writer};
use crate::sync::{ExternalCache, ExternalChange};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The node's role, as keepalived last told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not told yet.
    Unknown,
    /// Holds the virtual IP: its flows are the ones that matter.
    Primary,
    /// Standby.
    Backup,
}

/// What a finished job was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Operator's commit.
    Commit,
    /// Commit as the first step of a promotion.
    Promote,
    /// Continuous injection of replicated changes.
    Inject,
    /// Removal of flows this node no longer owns, after a demotion.
    Purge,
}

/// A finished job.
pub struct JobDone {
    kind: JobKind,
    writer: Writer,
    result: Result<WriteReport, String>,
    flows: usize,
    /// Flows applied to the mirror before they were written (see [`Mirror::own_creations`]).
    fresh: usize,
}

impl JobDone {
    /// Whether flows applied to the mirror ahead of their creation may be missing from the
    /// kernel: some write failed, and the mirror must be checked against the kernel.
    pub fn mirror_unsure(&self) -> bool {
        self.fresh > 0
            && match &self.result {
                Ok(r) => !r.failures.is_empty(),
                Err(_) => true,
            }
    }
}

/// Continuous injections of at most this many flows are written by the state task itself.
///
/// A standby injecting a steady stream gets a few flows per batch (10 per millisecond at 10k
/// flows/s): handed to a writer thread, each batch cost two context switches, a wake-up across
/// CPUs and an affinity change, more than the write (~5 µs per flow in the kernel). Written in
/// place, the state task is held at most a few hundred µs; larger batches (a burst) still go
/// to a thread, so that peers and control requests are not kept waiting.
const INLINE_INJECT: usize = 64;

/// A write job: what [`Failover::spawn`] hands to the writer.
struct Job {
    kind: JobKind,
    writer: Writer,
    fresh: Vec<Flow>,
    known: Vec<Flow>,
    deletes: Vec<Flow>,
}

impl Job {
    fn flows(&self) -> usize {
        self.fresh.len() + self.known.len() + self.deletes.len()
    }

    fn run(self) -> JobDone {
        let flows = self.flows();
        let Job {
            kind,
            mut writer,
            fresh,
            known,
            deletes,
        } = self;
        let result = writer
            .upsert_fresh(&fresh, &known)
            .and_then(|mut r| {
                let d = writer.delete(&deletes)?;
                r.deleted += d.deleted;
                r.absent += d.absent;
                r.failures.extend(d.failures);
                Ok(r)
            })
            .map_err(|e| e.to_string());
        JobDone {
            kind,
            writer,
            result,
            flows,
            fresh: fresh.len(),
        }
    }
}

/// Outcome of a commit, for `syncctl commit` and status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitSummary {
    /// Flows in the external cache that were written.
    pub flows: usize,
    /// Entries created.
    pub created: u64,
    /// Existing entries updated.
    pub updated: u64,
    /// Existing entries replaced (update refused).
    pub replaced: u64,
    /// Flows the kernel refused.
    pub failed: usize,
    /// The first refusals, with the reason.
    pub failures: Vec<crate::netlink::WriteFailure>,
    /// Wall time of the write, in milliseconds.
    pub ms: f64,
    /// A failure of the write as a whole (socket error), if any.
    pub error: Option<String>,
}

impl CommitSummary {
    fn new(flows: usize, result: &Result<WriteReport, String>, elapsed: Duration) -> Self {
        let (report, error) = match result {
            Ok(r) => (r.clone(), None),
            Err(e) => (WriteReport::default(), Some(e.clone())),
        };
        CommitSummary {
            flows,
            created: report.created,
            updated: report.updated,
            replaced: report.replaced,
            failed: report.failures.len(),
            failures: report.failures.into_iter().take(100).collect(),
            ms: elapsed.as_secs_f64() * 1e3,
            error,
        }
    }

    /// Whether every flow made it into the kernel.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.error.is_none()
    }
}

/// Failover counters and state for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverStatus {
    /// Current role.
    pub role: Role,
    /// `manual` or `continuous`.
    pub commit_mode: CommitMode,
    /// Commits done (promotions included).
    pub commits: u64,
    /// The last commit.
    pub last_commit: Option<CommitSummary>,
    /// Flows injected continuously.
    pub injected: u64,
    /// Continuous injections the kernel refused.
    pub inject_failures: u64,
    /// Flows purged after demotions.
    pub purged: u64,
    /// Seconds until a scheduled purge, if one is pending.
    pub purge_in_secs: Option<f64>,
    /// A kernel write is running.
    pub busy: bool,
}

/// What the state task must do after a job finished.
#[derive(Debug, PartialEq)]
pub enum AfterJob {
    /// Nothing more.
    Nothing,
    /// A promotion's commit is done: rebuild the internal cache from the kernel and send
    /// everything to peers.
    RebuildAndAnnounce(CommitSummary),
    /// A commit is done.
    Committed(CommitSummary),
}

/// Flows written per commit job: the flows of a commit are prepared chunk by chunk, so that a
/// commit of the whole cache never holds a second copy of it.
const COMMIT_CHUNK: usize = 16_384;

/// A commit in progress, written chunk by chunk.
struct CommitPlan {
    kind: JobKind,
    /// What remains to be prepared.
    cursor: CommitCursor,
    /// The next chunk, prepared while the previous one is written.
    ready: Option<Vec<Flow>>,
    /// Flows written so far.
    flows: usize,
    report: WriteReport,
    started: Instant,
}

impl CommitPlan {
    /// Shapes the next chunk of flows, unless one is already waiting or none is left.
    fn prepare_next(&mut self, external: &ExternalCache, now: Duration, opts: &CommitOptions) {
        if self.ready.is_some() || self.cursor.is_done() {
            return;
        }
        let chunk = self.cursor.next_chunk(external, COMMIT_CHUNK, now, opts);
        // A commit of nothing still writes one (empty) chunk: its completion ends the commit.
        let first = self.flows == 0;
        self.ready = Some(chunk).filter(|c| first || !c.is_empty());
    }

    /// Whether chunks remain to be written.
    fn unfinished(&self) -> bool {
        self.ready.is_some() || !self.cursor.is_done()
    }
}

/// Failover state owned by the daemon's state task.
pub struct Failover {
    opts: CommitOptions,
    mode: CommitMode,
    purge_delay: Duration,
    writer: Option<Writer>,
    role: Role,
    jobs_tx: mpsc::Sender<JobDone>,
    purge_at: Option<Instant>,
    /// Continuous mode: replicated keys still to write, coalesced (true: delete).
    inject_pending: HashMap<FlowKey, bool>,
    /// The commit being written, if any.
    plan: Option<CommitPlan>,
    commits: u64,
    last_commit: Option<CommitSummary>,
    injected: u64,
    inject_failures: u64,
    purged: u64,
}

impl Failover {
    /// Takes the writer; finished jobs arrive on the returned receiver.
    pub fn new(cfg: &FailoverConfig, writer: Writer) -> (Failover, mpsc::Receiver<JobDone>) {
        let (jobs_tx, rx) = mpsc::channel(4);
        let f = Failover {
            opts: CommitOptions {
                min_timeout: cfg.min_timeout,
                tcp_liberal: cfg.tcp_liberal,
            },
            mode: cfg.commit_mode,
            purge_delay: cfg.purge_delay,
            writer: Some(writer),
            role: Role::Unknown,
            jobs_tx,
            purge_at: None,
            inject_pending: HashMap::new(),
            plan: None,
            commits: 0,
            last_commit: None,
            injected: 0,
            inject_failures: 0,
            purged: 0,
        };
        (f, rx)
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether replicated changes go into the kernel as they arrive.
    pub fn continuous(&self) -> bool {
        self.mode == CommitMode::Continuous
    }

    /// Whether a write job is running, or a commit has chunks left to write.
    pub fn busy(&self) -> bool {
        self.writer.is_none() || self.plan.is_some()
    }

    /// When a scheduled purge is due.
    pub fn purge_at(&self) -> Option<Instant> {
        self.purge_at
    }

    /// Starts a commit of the whole external cache (also the first step of a promotion).
    /// False when another write is running.
    pub fn commit(
        &mut self,
        external: &ExternalCache,
        now: Duration,
        kind: JobKind,
        mirror: &mut Mirror,
    ) -> bool {
        if self.busy() {
            return false;
        }
        if kind == JobKind::Promote {
            self.role = Role::Primary;
            self.purge_at = None;
        }
        self.plan = Some(CommitPlan {
            kind,
            cursor: CommitCursor::new(external),
            ready: None,
            flows: 0,
            report: WriteReport::default(),
            started: Instant::now(),
        });
        self.resume_commit(external, now, mirror);
        true
    }

    /// Writes the next chunk of a commit in progress, if the writer is free, and prepares the
    /// one after it meanwhile: the kernel write is the commit's bottleneck, so the writer should
    /// never wait for the state task to shape flows. Call whenever the state task is woken (the
    /// daemon does after every event).
    pub fn resume_commit(&mut self, external: &ExternalCache, now: Duration, mirror: &mut Mirror) {
        let Some(plan) = &mut self.plan else {
            return;
        };
        plan.prepare_next(external, now, &self.opts);
        if self.writer.is_none() {
            return;
        }
        let Some(flows) = plan.ready.take() else {
            return;
        };
        plan.flows += flows.len();
        let kind = plan.kind;
        self.spawn(kind, flows, Vec::new(), mirror);
        if let Some(plan) = &mut self.plan {
            plan.prepare_next(external, now, &self.opts);
        }
    }

    /// Becomes backup: a purge of flows we no longer own is scheduled (a promotion cancels it).
    pub fn demote(&mut self) {
        self.role = Role::Backup;
        self.purge_at = Some(Instant::now() + self.purge_delay);
    }

    /// Queues replicated changes for continuous injection.
    pub fn queue_injection(&mut self, changes: Vec<ExternalChange>) {
        for c in changes {
            self.inject_pending.insert(c.key, c.deleted);
        }
    }

    /// Starts a continuous-injection job for what is pending, if the writer is free.
    pub fn inject_pending(&mut self, external: &ExternalCache, now: Duration, mirror: &mut Mirror) {
        // A commit in progress goes first; what is pending waits for its end.
        if self.inject_pending.is_empty() || self.busy() {
            return;
        }
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (key, deleted) in self.inject_pending.drain() {
            let current = external.origins().find_map(|(_, o)| o.get(&key));
            match current {
                Some(e) if !deleted => upserts.push(commit::prepare(
                    &e.flow,
                    e.remaining_timeout(now),
                    &self.opts,
                )),
                Some(_) => {}
                None => deletes.push(key_only(key)),
            }
        }
        self.spawn(JobKind::Inject, upserts, deletes, mirror);
    }

    /// Runs a due purge: deletes kernel flows that are ours (in `internal`) and not replicated
    /// from a peer. Returns whether a job started.
    pub fn purge_if_due(&mut self, mirror: &mut Mirror, external: &ExternalCache) -> bool {
        let due = self.purge_at.is_some_and(|t| Instant::now() >= t);
        if !due || self.busy() {
            return false;
        }
        self.purge_at = None;
        let replicated = |k: &FlowKey| external.origins().any(|(_, o)| o.get(k).is_some());
        let doomed: Vec<Flow> = mirror
            .table()
            .iter()
            .filter(|f| !replicated(&f.key))
            .cloned()
            .collect();
        tracing::info!(
            flows = doomed.len(),
            "purging flows this backup no longer owns"
        );
        self.spawn(JobKind::Purge, Vec::new(), doomed, mirror)
    }

    /// Runs a write job; the upserts new to the mirror are applied to it first and written so
    /// that their creation events need not come back (see [`Mirror::own_creations`]).
    fn spawn(
        &mut self,
        kind: JobKind,
        upserts: Vec<Flow>,
        deletes: Vec<Flow>,
        mirror: &mut Mirror,
    ) -> bool {
        let Some(writer) = self.writer.take() else {
            return false;
        };
        let (fresh, known) = mirror.own_creations(upserts);
        let job = Job {
            kind,
            writer,
            fresh,
            known,
            deletes,
        };
        if kind == JobKind::Inject && job.flows() <= INLINE_INJECT {
            // The state task picks the report up at its next turn, as it would a thread's.
            if let Err(e) = self.jobs_tx.try_send(job.run()) {
                // Not reachable: with one writer, at most one finished job is ever unread.
                let done = e.into_inner();
                tracing::error!(flows = done.flows, "injection report lost");
                self.writer = Some(done.writer);
            }
            return true;
        }
        let tx = self.jobs_tx.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::process::float_this_thread() {
                tracing::debug!(error = %e, "kernel writer stays on the daemon's CPU");
            }
            let _ = tx.blocking_send(job.run());
        });
        true
    }

    /// A job finished: take the writer back and report.
    pub fn job_done(&mut self, done: JobDone) -> AfterJob {
        self.writer = Some(done.writer);
        match done.kind {
            JobKind::Commit | JobKind::Promote => {
                let Some(summary) = self.commit_chunk_done(done.result) else {
                    return AfterJob::Nothing;
                };
                self.commits += 1;
                self.last_commit = Some(summary.clone());
                tracing::info!(
                    flows = summary.flows,
                    created = summary.created,
                    updated = summary.updated,
                    failed = summary.failed,
                    ms = summary.ms,
                    "external cache committed"
                );
                for f in summary.failures.iter().take(10) {
                    tracing::warn!(flow = %f.key.orig, error = %f.error, "commit refused");
                }
                if done.kind == JobKind::Promote {
                    AfterJob::RebuildAndAnnounce(summary)
                } else {
                    AfterJob::Committed(summary)
                }
            }
            JobKind::Inject => {
                match &done.result {
                    Ok(r) => {
                        self.injected += r.created + r.updated + r.replaced + r.deleted;
                        self.inject_failures += r.failures.len() as u64;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "continuous injection failed");
                        self.inject_failures += done.flows as u64;
                    }
                }
                AfterJob::Nothing
            }
            JobKind::Purge => {
                if let Ok(r) = &done.result {
                    self.purged += r.deleted;
                }
                AfterJob::Nothing
            }
        }
    }

    /// Adds a chunk's outcome to the commit in progress; the commit's summary once the last
    /// chunk is written or the write failed as a whole.
    fn commit_chunk_done(&mut self, result: Result<WriteReport, String>) -> Option<CommitSummary> {
        let plan = self.plan.as_mut()?;
        let error = match result {
            Ok(r) => {
                plan.report.created += r.created;
                plan.report.updated += r.updated;
                plan.report.replaced += r.replaced;
                plan.report.failures.extend(r.failures);
                None
            }
            Err(e) => Some(e),
        };
        if error.is_none() && plan.unfinished() {
            return None;
        }
        let plan = self.plan.take()?;
        let result = match error {
            Some(e) => Err(e),
            None => Ok(plan.report),
        };
        Some(CommitSummary::new(
            plan.flows,
            &result,
            plan.started.elapsed(),
        ))
    }

    /// State for `syncctl status`.
    pub fn status(&self) -> FailoverStatus {
        FailoverStatus {
            role: self.role,
            commit_mode: self.mode,
            commits: self.commits,
            last_commit: self.last_commit.clone(),
            injected: self.injected,
            inject_failures: self.inject_failures,
            purged: self.purged,
            purge_in_secs: self
                .purge_at
                .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64()),
            busy: self.busy(),
        }
    }
}

/// A flow carrying only its key, for deletes (the kernel needs nothing else).
fn key_only(key: FlowKey) -> Flow {
    Flow::new(key.zone, key.orig, key.orig.inverse())
}
