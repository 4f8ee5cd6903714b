//! The daemon runtime: wires the kernel bridge, the mirror and the control socket together.
//!
//! Threads and tasks:
//! - `ctsync-events` (OS thread): blocking reads of the event socket, decoded in batches (their
//!   size set by `EventPacer`) and pushed into a bounded channel. When the mirror falls behind
//!   the channel fills, the thread blocks, the kernel buffer fills, and the kernel reports an
//!   overrun: back-pressure ends in a reconciliation, never in unbounded memory.
//! - `ctsync-dump` (OS thread): runs full dumps on request, on a socket of its own.
//! - the state task (tokio): sole owner of the [`Mirror`]; applies events and dumps, answers
//!   control requests. No locks around the cache.
//! - the control server (tokio): accepts `syncctl` connections.
//! - kernel writes (commits, injection) run on tokio's blocking pool.
//!
//! The tokio tasks share one thread (`ctsyncd` uses a current-thread runtime): see its `main`.

use crate::cache::{FlowTable, Mirror, MirrorAction};
use crate::config::Config;
use crate::control::{self, CacheName, CacheStatus, Call, KernelStatus, Reply, Request};
use crate::failover::{AfterJob, Failover, JobDone, JobKind};
use crate::netlink::{
    self, CreationSwitch, CtSocket, EventSource, KernelError, KernelEvent, Origins, Writer,
};
use crate::replication::{Replication, ReplicationError};
use crate::transport::grpc::TransportEvent;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The kernel bridge failed.
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    Control {
        /// The socket path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The event stream ended.
    #[error("event reader stopped: {0}")]
    EventsStopped(String),
    /// Replication could not start.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
}

/// Items of the event channel.
enum EventMsg {
    Batch(Vec<KernelEvent>),
    Failed(String),
}

/// Result of one dump run by the dump thread.
struct DumpResult {
    flows: Result<FlowTable, String>,
    elapsed: Duration,
}

/// Events per channel message: amortises the channel hand-off.
const EVENT_BATCH: usize = 2048;
/// Channel capacity in batches; beyond it the reader blocks and the kernel buffer takes over.
/// Small on purpose: events waiting here cost the daemon's memory (about 300 KB a batch), while
/// the kernel's socket buffer holds them in kernel memory, up to `event_buffer_bytes`.
const EVENT_QUEUE: usize = 4;

/// Runs the daemon until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let started = Instant::now();
    let origins = Origins::new();
    let stop = Arc::new(AtomicBool::new(false));

    // Subscribe before the first dump, so that no change falls between the two.
    let (events, granted) = EventSource::open(cfg.kernel.event_buffer_bytes, origins.clone())?;
    if granted < cfg.kernel.event_buffer_bytes {
        tracing::warn!(
            requested = cfg.kernel.event_buffer_bytes,
            granted,
            "kernel granted a smaller event buffer than configured (no CAP_NET_ADMIN?)"
        );
    }
    let writer = Writer::open(cfg.kernel.write_sockets, &origins)?;
    events.hide_own_creations(&writer.quiet_portids())?;
    let creations = events.creation_switch()?;
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    spawn_event_reader(events, event_tx, stop.clone())?;
    let (dump_req, dump_rx) = spawn_dumper(CtSocket::open().map_err(KernelError::from)?)?;
    let (failover, jobs_rx) = Failover::new(&cfg.failover, writer);

    let listener = control::bind(&cfg.control.socket).map_err(|source| DaemonError::Control {
        path: cfg.control.socket.clone(),
        source,
    })?;
    let (call_tx, call_rx) = mpsc::channel(16);
    let server = tokio::spawn(control::serve(listener, call_tx));
    tracing::info!(
        node_id = %cfg.node_id,
        socket = %cfg.control.socket.display(),
        event_buffer = granted,
        "ctsyncd started"
    );

    let state = State {
        cfg: &cfg,
        mirror: Mirror::new(),
        started,
        event_buffer: granted,
        last_dump: None,
        changes: 0,
        dump_req,
        repl: None,
        failover,
        creations,
        waiting: Vec::new(),
        rebuild_pending: false,
        notifier: crate::notify::Notifier::from_env(),
        notified_ready: false,
    };
    let result = state
        .run(event_rx, dump_rx, call_rx, jobs_rx, shutdown)
        .await;

    stop.store(true, Ordering::Relaxed);
    server.abort();
    let _ = std::fs::remove_file(&cfg.control.socket);
    tracing::info!("ctsyncd stopped");
    result
}

/// A stall of the runtime's thread longer than this is logged.
const STALL_WARN: Duration = Duration::from_millis(500);

/// Tells when the runtime's one thread was held by a single piece of work for longer than
/// [`STALL_WARN`]: the peers' keepalive answers, control requests and event intake all waited
/// that long (a reconciliation of millions of flows can do it). Left unnoticed, a stall near the
/// peers' keepalive timeout looks like a flapping link. It reads the lateness of the state
/// task's periodic tick rather than running a timer of its own: an idle daemon's CPU is mostly
/// its wake-ups.
struct StallMeter {
    last: Instant,
}

impl StallMeter {
    fn new(now: Instant) -> StallMeter {
        StallMeter { last: now }
    }

    /// Called at each [`TICK`]; returns how long the thread was held, if that was too long.
    fn tick(&mut self, now: Instant) -> Option<Duration> {
        let held = now.duration_since(self.last).saturating_sub(TICK);
        self.last = now;
        (held > STALL_WARN).then_some(held)
    }
}

fn spawn_event_reader(
    mut source: EventSource,
    tx: mpsc::Sender<EventMsg>,
    stop: Arc<AtomicBool>,
) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("ctsync-events".into())
        .spawn(move || {
            let mut pacer = EventPacer::new(Instant::now());
            while !stop.load(Ordering::Relaxed) {
                let mut batch = Vec::with_capacity(EVENT_BATCH);
                let read = source.next_batch(&mut batch, EVENT_BATCH);
                let pause = pacer.after_read(batch.len(), Instant::now());
                let msg = match read {
                    Ok(()) if batch.is_empty() => continue,
                    Ok(()) => EventMsg::Batch(batch),
                    Err(e) => EventMsg::Failed(e.to_string()),
                };
                let failed = matches!(msg, EventMsg::Failed(_));
                if tx.blocking_send(msg).is_err() || failed {
                    return;
                }
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        })
        .map(drop)
        .map_err(DaemonError::Thread)
}

/// Decides how long the event thread waits before reading again, from the rate of the events
/// it just read.
///
/// Read as they come, events of a steady stream wake the thread every few of them, and every
/// wake costs a context switch (paid by whatever creates the flows: a third of a 250k
/// commit's CPU on 2 cores, measured), a channel hand-off, a replication batch and a TLS record
/// to each peer. Waiting before the next read lets the kernel queue them instead, to be taken
/// in one batch. The wait grows with the rate, up to [`MAX_PAUSE`] at [`FULL_RATE`]: a quiet
/// stream is read at once (a wait would add latency and save nothing), a burst is read in
/// batches of hundreds. Measured on the 250k scenario of `ctsync-compare` (alternating runs):
/// both daemons' CPU fell by 15-20% against a fixed 0.2 ms wait, and the p99 latency at a
/// steady 10k/s did not grow.
struct EventPacer {
    /// When the queue was last found drained: the events read next arrived since.
    drained: Instant,
}

/// The longest wait: the latency a burst may add to an event before it is read.
const MAX_PAUSE: Duration = Duration::from_millis(1);
/// Events per second from which the wait is [`MAX_PAUSE`] (a kernel creating flows as fast as
/// it can, about 250k/s on 2 cores); below, it shrinks in proportion (0.04 ms at 10k/s).
const FULL_RATE: f64 = 250_000.0;

impl EventPacer {
    fn new(now: Instant) -> EventPacer {
        EventPacer { drained: now }
    }

    /// `n` events were read, which found the queue drained at `now` (or stopped at
    /// [`EVENT_BATCH`]): the wait before the next read.
    fn after_read(&mut self, n: usize, now: Instant) -> Duration {
        let since = now.duration_since(self.drained).as_secs_f64();
        self.drained = now;
        if n == 0 || n >= EVENT_BATCH {
            // Nothing to wait for, or a backlog: read on.
            return Duration::ZERO;
        }
        let rate = n as f64 / since.max(1e-9);
        MAX_PAUSE.mul_f64((rate / FULL_RATE).min(1.0))
    }
}

fn spawn_dumper(
    sock: CtSocket,
) -> Result<(std::sync::mpsc::Sender<()>, mpsc::Receiver<DumpResult>), DaemonError> {
    let (req_tx, req_rx) = std::sync::mpsc::channel::<()>();
    let (res_tx, res_rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("ctsync-dump".into())
        .spawn(move || {
            if let Err(e) = crate::process::float_this_thread() {
                tracing::debug!(error = %e, "dump thread stays on the daemon's CPU");
            }
            for () in req_rx {
                let t0 = Instant::now();
                // Built here rather than on the state task: at millions of flows this is
                // seconds of work, and the state task also answers the peers' keepalives.
                let mut flows = FlowTable::new();
                let result = if table_is_empty(&sock) {
                    Ok(0)
                } else {
                    netlink::dump(&sock, |m| {
                        flows.insert(m.flow);
                    })
                };
                // Undecodable entries are logged by `dump`; the rest is still the best mirror.
                let flows = result.map(|_| flows).map_err(|e| e.to_string());
                let done = DumpResult {
                    flows,
                    elapsed: t0.elapsed(),
                };
                if res_tx.blocking_send(done).is_err() {
                    return;
                }
            }
        })
        .map_err(DaemonError::Thread)?;
    Ok((req_tx, res_rx))
}

/// Whether the namespace's table is empty, in which case a dump can be skipped: it would walk
/// every bucket of the kernel's shared hash table, other namespaces' flows included, to find
/// nothing. A node that starts on an empty table (at boot, or a standby whose table was
/// flushed) is the common case. It is safe because the event subscription predates every dump
/// request: whatever is created after the count arrives as events, exactly as it would during a
/// dump. When the count cannot be read, the dump runs.
fn table_is_empty(sock: &CtSocket) -> bool {
    match netlink::count(sock) {
        Ok(n) => n == 0,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the kernel's entry count; dumping");
            false
        }
    }
}

/// The state task: owner of the mirror.
struct State<'a> {
    cfg: &'a Config,
    mirror: Mirror,
    started: Instant,
    event_buffer: usize,
    last_dump: Option<Duration>,
    changes: u64,
    dump_req: std::sync::mpsc::Sender<()>,
    repl: Option<Replication>,
    failover: Failover,
    /// Creation events are muted while a promotion commits.
    creations: CreationSwitch,
    /// Control clients waiting for a commit (or promotion) to finish.
    waiting: Vec<tokio::sync::oneshot::Sender<Reply>>,
    /// A promotion committed: once the next dump is in, announce every flow to peers.
    rebuild_pending: bool,
    notifier: crate::notify::Notifier,
    notified_ready: bool,
}

/// How often replication timers run (heartbeats, retransmissions, dead peers) and the stall
/// meter reads the clock. Their deadlines are half a second and more; each tick is a wake-up of
/// an otherwise idle daemon.
const TICK: Duration = Duration::from_millis(250);

async fn next_transport_event(rx: &mut Option<mpsc::Receiver<TransportEvent>>) -> TransportEvent {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(ev) => ev,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl State<'_> {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<EventMsg>,
        mut dumps: mpsc::Receiver<DumpResult>,
        mut calls: mpsc::Receiver<Call>,
        mut jobs: mpsc::Receiver<JobDone>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        tokio::pin!(shutdown);
        let action = self.mirror.start();
        self.act(action);
        let retry = tokio::time::sleep(Duration::MAX);
        tokio::pin!(retry);
        let mut retry_armed = false;
        let mut transport_rx = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stalls = StallMeter::new(Instant::now());
        let refresh_every = self
            .cfg
            .sync
            .as_ref()
            .map_or(Duration::from_secs(3600), |s| s.timeout_refresh);
        let pet_every = self
            .notifier
            .watchdog_interval()
            .unwrap_or(Duration::from_secs(3600));
        let mut watchdog = tokio::time::interval(pet_every);
        let mut refresh =
            tokio::time::interval_at(tokio::time::Instant::now() + refresh_every, refresh_every);
        let result = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                // Before events: a commit's next chunk waits for this, and the commit's own
                // events would otherwise keep it waiting.
                Some(done) = jobs.recv() => if let Err(e) = self.job_done(done) {
                    break Err(e);
                },
                Some(msg) = events.recv() => match msg {
                    EventMsg::Batch(batch) => self.events(batch),
                    EventMsg::Failed(e) => break Err(DaemonError::EventsStopped(e)),
                },
                Some(done) = dumps.recv() => {
                    if !self.dump_done(done) {
                        retry.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(1));
                        retry_armed = true;
                    }
                    if let Err(e) = self.start_replication(&mut transport_rx).await {
                        break Err(e);
                    }
                }
                () = &mut retry, if retry_armed => {
                    retry_armed = false;
                    let action = self.mirror.retry_dump();
                    self.act(action);
                }
                ev = next_transport_event(&mut transport_rx) => {
                    if let Some(r) = &mut self.repl {
                        r.transport_event(ev);
                    }
                }
                _ = tick.tick() => {
                    if let Some(held) = stalls.tick(Instant::now()) {
                        tracing::warn!(
                            ms = held.as_millis() as u64,
                            "ctsyncd's main thread was held this long by one piece of work; \
                             peers, control requests and kernel events waited meanwhile"
                        );
                    }
                    if let Some(r) = &mut self.repl {
                        r.tick();
                    }
                }
                _ = refresh.tick(), if self.repl.is_some() => {
                    let action = self.mirror.refresh();
                    self.act(action);
                }
                _ = watchdog.tick() => self.notifier.send("WATCHDOG=1"),
                Some((req, reply)) = calls.recv() => self.call(req, reply),
                () = purge_timer(self.failover.purge_at()) => {}
                else => break Err(DaemonError::EventsStopped("channels closed".into())),
            }
            if !self.notified_ready && self.mirror.is_synced() {
                // systemd's "started": the kernel table is mirrored and the control socket serves.
                self.notified_ready = true;
                self.notifier.send("READY=1\nSTATUS=kernel table mirrored");
            }
            if let Some(r) = &mut self.repl {
                if self.failover.purge_at().is_some() {
                    self.failover.purge_if_due(&mut self.mirror, r.external());
                }
                r.pump(self.mirror.table());
                self.failover
                    .resume_commit(r.external(), r.now(), &mut self.mirror);
                if self.failover.continuous() {
                    self.failover.queue_injection(r.take_external_changes());
                    self.failover
                        .inject_pending(r.external(), r.now(), &mut self.mirror);
                }
            }
        };
        self.notifier.send("STOPPING=1");
        if let Some(r) = self.repl.take() {
            r.shutdown().await;
        }
        result
    }

    /// Starts replication once the mirror is first synced: a snapshot sent before that would
    /// tell peers that flows not yet read from the kernel are gone.
    async fn start_replication(
        &mut self,
        rx: &mut Option<mpsc::Receiver<TransportEvent>>,
    ) -> Result<(), DaemonError> {
        let Some(sync) = &self.cfg.sync else {
            return Ok(());
        };
        if self.repl.is_some() || !self.mirror.is_synced() {
            return Ok(());
        }
        let (repl, events) =
            Replication::start(self.cfg, sync, self.mirror.table(), self.started).await?;
        let mut repl = repl;
        if self.failover.continuous() {
            repl.track_external_changes();
        }
        self.repl = Some(repl);
        *rx = Some(events);
        Ok(())
    }

    /// The replication engine's clock (zero while replication is not running: then changes
    /// are only counted).
    fn engine_now(&self) -> Duration {
        self.repl.as_ref().map_or(Duration::ZERO, Replication::now)
    }

    /// `now`: the engine clock read once for the whole batch the change belongs to.
    fn change(&mut self, change: crate::cache::Change, now: Duration) {
        let Some(r) = &mut self.repl else {
            self.changes += 1;
            return;
        };
        // A standby injecting continuously holds its peers' flows in its kernel. Their events
        // carry our writer's origin and are never reported, but after an overrun the repair
        // dump cannot tell whose they are: never hand a peer's own flow back to it.
        if self.failover.continuous() && self.failover.role() != crate::failover::Role::Primary {
            let key = match &change {
                crate::cache::Change::Upsert(k) | crate::cache::Change::Remove(k) => k,
            };
            if r.external().origins().any(|(_, o)| o.get(key).is_some()) {
                return;
            }
        }
        self.changes += 1;
        r.local_change(&change, self.mirror.table(), now);
    }

    fn act(&mut self, action: MirrorAction) {
        if action == MirrorAction::StartDump && self.dump_req.send(()).is_err() {
            tracing::error!("dump thread is gone");
        }
    }

    fn events(&mut self, batch: Vec<KernelEvent>) {
        let now = self.engine_now();
        for ev in batch {
            match ev {
                KernelEvent::Flow { msg, own } => {
                    if let Some(change) = self.mirror.event(msg, own) {
                        self.change(change, now);
                    }
                }
                KernelEvent::Overrun => {
                    tracing::warn!("kernel event overrun; reconciling with a dump");
                    let action = self.mirror.overrun();
                    self.act(action);
                }
                KernelEvent::Undecodable(e) => {
                    tracing::warn!(error = %e, "undecodable event; reconciling with a dump");
                    let action = self.mirror.undecodable();
                    self.act(action);
                }
            }
        }
    }

    /// Applies a finished dump; false when it failed and must be retried.
    fn dump_done(&mut self, done: DumpResult) -> bool {
        self.last_dump = Some(done.elapsed);
        match done.flows {
            Ok(flows) => {
                let n = flows.len();
                let repairs = self.mirror.stats().resync_repairs;
                let (changes, action) = self.mirror.dump_complete_table(flows);
                let changed = changes.len();
                if self.mirror.stats().resync_repairs > repairs {
                    // The mirror had diverged from the kernel: name a few, for the post-mortem.
                    for c in changes.iter().take(3) {
                        tracing::info!(change = ?c, "reconciliation repaired the mirror");
                    }
                }
                let now = self.engine_now();
                for change in changes {
                    self.change(change, now);
                }
                if let Some(r) = &mut self.repl {
                    r.after_dump(self.mirror.table());
                    if action == MirrorAction::None && std::mem::take(&mut self.rebuild_pending) {
                        tracing::info!(flows = n, "promoted: announcing every flow to peers");
                        r.resend_all(self.mirror.table());
                    }
                }
                tracing::info!(
                    flows = n,
                    changed,
                    ms = done.elapsed.as_secs_f64() * 1e3,
                    "kernel table reconciled"
                );
                self.act(action);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "kernel dump failed; retrying in 1 s");
                self.mirror.dump_failed();
                false
            }
        }
    }

    /// Serves a control request; commits answer later, when their job is done.
    fn call(&mut self, req: Request, reply: tokio::sync::oneshot::Sender<Reply>) {
        let answer = match req {
            Request::Commit | Request::Promote => {
                let kind = if req == Request::Commit {
                    JobKind::Commit
                } else {
                    JobKind::Promote
                };
                match self.start_commit(kind) {
                    Ok(()) => return self.waiting.push(reply),
                    Err(e) => Reply::Error(e),
                }
            }
            other => self.answer(other),
        };
        let _ = reply.send(answer);
    }

    fn start_commit(&mut self, kind: JobKind) -> Result<(), String> {
        let Some(r) = &self.repl else {
            return Err("replication is not configured ([sync] section): nothing to commit".into());
        };
        if self.failover.busy() {
            return Err("another kernel write is running; try again".into());
        }
        if kind == JobKind::Promote {
            // The promotion re-reads the table once committed: see `CreationSwitch`.
            if let Err(e) = self.creations.mute() {
                tracing::warn!(error = %e, "cannot mute creation events; committing with them");
            }
        }
        if self
            .failover
            .commit(r.external(), r.now(), kind, &mut self.mirror)
        {
            return Ok(());
        }
        // Not reached (the writer was checked free), but never leave creations muted.
        self.creations.unmute().map_err(|e| e.to_string())?;
        Err("another kernel write is running; try again".into())
    }

    /// Fails only when creation events cannot be heard again: the mirror would then miss every
    /// new flow, so the daemon stops (and its supervisor restarts it).
    fn job_done(&mut self, done: JobDone) -> Result<(), DaemonError> {
        if done.mirror_unsure() {
            tracing::info!("some kernel writes failed; re-reading the kernel table");
            let action = self.mirror.own_creations_failed();
            self.act(action);
        }
        let mut deaf = None;
        let summary = match self.failover.job_done(done) {
            AfterJob::Nothing => return Ok(()),
            AfterJob::Committed(s) => s,
            AfterJob::RebuildAndAnnounce(s) => {
                // The committed flows are ours now: read them back as such and tell peers. The
                // dump is requested once creation events are heard again, so that it finds
                // whatever was created while they were muted.
                self.rebuild_pending = true;
                let action = match self.creations.unmute() {
                    Ok(true) => self.mirror.creations_unheard(),
                    Ok(false) => self.mirror.refresh(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot hear creation events again; stopping");
                        deaf = Some(e);
                        MirrorAction::None
                    }
                };
                self.act(action);
                s
            }
        };
        let value = serde_json::to_value(&summary).unwrap_or_default();
        for w in self.waiting.drain(..) {
            let _ =
                w.send(if summary.ok() {
                    Reply::Value(value.clone())
                } else {
                    Reply::Error(format!(
                    "commit incomplete: {} of {} flows refused{}; see `syncctl status` and the log",
                    summary.failed,
                    summary.flows,
                    summary.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                ))
                });
        }
        deaf.map_or(Ok(()), |e| Err(e.into()))
    }

    fn answer(&mut self, req: Request) -> Reply {
        match req {
            Request::Status => Reply::Status(Box::new(self.status())),
            Request::Stats => {
                let s = self.status();
                Reply::Value(serde_json::json!({
                    "kernel": s.kernel.stats,
                    "internal_flows": s.internal_cache.flows,
                    "changes": s.internal_cache.changes,
                    "external_flows": s.sync.as_ref().map_or(0, |x| x.external_flows),
                    "peers": s.sync.as_ref().map(|x| &x.peers),
                    "failover": s.failover,
                }))
            }
            Request::Dump {
                cache: CacheName::Internal,
            } => Reply::Flows(self.mirror.table().iter().cloned().collect()),
            Request::Dump {
                cache: CacheName::External,
            } => match &self.repl {
                Some(r) => Reply::External(r.external_dump()),
                None if self.cfg.sync.is_some() => Reply::External(Vec::new()),
                None => Reply::Error("replication is not configured ([sync] section)".into()),
            },
            Request::Demote => {
                self.failover.demote();
                if let Some(r) = &mut self.repl {
                    r.request_resync_all("peer demoted to backup");
                }
                done("demoted to backup; purge of own flows scheduled")
            }
            Request::Flush {
                cache: CacheName::Internal,
            } => {
                // The mirror must equal the kernel: flushing it means reading it again.
                let action = self.mirror.overrun();
                self.act(action);
                done("internal cache is being re-read from the kernel")
            }
            Request::Flush {
                cache: CacheName::External,
            } => match &mut self.repl {
                Some(r) => {
                    r.flush_external();
                    done("external cache flushed; peers asked for snapshots")
                }
                None => Reply::Error("replication is not configured ([sync] section)".into()),
            },
            Request::Resync => {
                let action = self.mirror.refresh();
                self.act(action);
                done("internal cache resync from the kernel started")
            }
            Request::RequestResync => match &mut self.repl {
                Some(r) => {
                    r.request_resync_all("operator request");
                    done("snapshots requested from every connected peer")
                }
                None => Reply::Error("replication is not configured ([sync] section)".into()),
            },
            Request::BulkSend => match &mut self.repl {
                Some(r) => {
                    r.resend_all(self.mirror.table());
                    done("every flow queued for every peer")
                }
                None => Reply::Error("replication is not configured ([sync] section)".into()),
            },
            Request::Commit | Request::Promote => unreachable!("handled by call()"),
        }
    }

    fn status(&self) -> control::StatusReport {
        let table = self.mirror.table();
        control::StatusReport {
            node_id: self.cfg.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            kernel: KernelStatus {
                synced: self.mirror.is_synced(),
                dump_running: self.mirror.dump_running(),
                flows: table.len(),
                event_buffer_bytes: self.event_buffer,
                last_dump_ms: self.last_dump.map(|d| d.as_secs_f64() * 1e3),
                stats: self.mirror.stats().clone(),
            },
            internal_cache: CacheStatus {
                flows: table.len(),
                heap_bytes: table.heap_bytes(),
                changes: self.changes,
            },
            sync: self.repl.as_ref().map(Replication::status),
            ready: self.mirror.is_synced()
                && match (&self.cfg.sync, &self.repl) {
                    (None, _) => true,
                    (Some(_), Some(r)) => r.is_ready(),
                    (Some(_), None) => false,
                },
            failover: self.failover.status(),
        }
    }
}

/// Completes when a scheduled purge is due; never when none is.
async fn purge_timer(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

fn done(message: &str) -> Reply {
    Reply::Value(serde_json::json!({ "done": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_tick_is_a_stall_and_a_punctual_one_is_not() {
        let t0 = Instant::now();
        let mut m = StallMeter::new(t0);
        let mut t = t0;
        for _ in 0..4 {
            t += TICK + Duration::from_millis(5);
            assert_eq!(m.tick(t), None, "a tick a little late is no stall");
        }
        t += TICK + STALL_WARN;
        assert_eq!(m.tick(t), None, "held exactly the bound: not reported");
        t += TICK + Duration::from_millis(800);
        assert_eq!(m.tick(t), Some(Duration::from_millis(800)));
        t += TICK;
        assert_eq!(
            m.tick(t),
            None,
            "the next punctual tick is measured from the late one"
        );
    }

    #[test]
    fn the_event_thread_waits_in_proportion_to_the_rate_it_reads() {
        let t0 = Instant::now();
        let mut p = EventPacer::new(t0);
        let ms = Duration::from_millis;
        // 250 events in 1 ms: 250k/s, the full wait.
        assert_eq!(p.after_read(250, t0 + ms(1)), MAX_PAUSE);
        // 10 events in the next 1 ms: 10k/s, a 25th of it.
        assert_eq!(p.after_read(10, t0 + ms(2)), MAX_PAUSE / 25);
        // One event after a quiet second: read at once next time.
        let quiet = p.after_read(1, t0 + ms(1002));
        assert!(quiet < Duration::from_micros(1), "{quiet:?}");
        // Faster than the full rate: capped.
        assert_eq!(p.after_read(1000, t0 + ms(1003)), MAX_PAUSE);
    }

    #[test]
    fn a_backlog_or_nothing_read_means_no_wait() {
        let t0 = Instant::now();
        let mut p = EventPacer::new(t0);
        let us = Duration::from_micros;
        assert_eq!(p.after_read(EVENT_BATCH, t0 + us(10)), Duration::ZERO);
        assert_eq!(p.after_read(0, t0 + us(20)), Duration::ZERO);
        assert_eq!(p.after_read(100, t0 + us(20)), MAX_PAUSE, "no time elapsed");
    }
}
