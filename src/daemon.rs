//! The daemon runtime: wires the kernel bridge, the mirror and the control socket together.
//!
//! Threads and tasks:
//! - `ctsync-events` (OS thread): blocking reads of the event socket, decoded in batches and
//!   pushed into a bounded channel. When the mirror falls behind the channel fills, the thread
//!   blocks, the kernel buffer fills, and the kernel reports an overrun: back-pressure ends in a
//!   reconciliation, never in unbounded memory.
//! - `ctsync-dump` (OS thread): runs full dumps on request, on a socket of its own.
//! - the state task (tokio): sole owner of the [`Mirror`]; applies events and dumps, answers
//!   control requests. No locks around the cache.
//! - the control server (tokio): accepts `syncctl` connections.

use crate::cache::{Mirror, MirrorAction};
use crate::config::Config;
use crate::control::{self, CacheName, CacheStatus, Call, KernelStatus, Reply, Request};
use crate::flow::Flow;
use crate::netlink::{self, CtSocket, EventSource, KernelError, KernelEvent, Origins};
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
}

/// Items of the event channel.
enum EventMsg {
    Batch(Vec<KernelEvent>),
    Failed(String),
}

/// Result of one dump run by the dump thread.
struct DumpResult {
    flows: Result<Vec<Flow>, String>,
    elapsed: Duration,
}

/// Events per channel message: amortises the channel hand-off.
const EVENT_BATCH: usize = 2048;
/// Channel capacity in batches; beyond it the reader blocks and the kernel buffer takes over.
const EVENT_QUEUE: usize = 64;

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
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    spawn_event_reader(events, event_tx, stop.clone())?;
    let (dump_req, dump_rx) = spawn_dumper(CtSocket::open().map_err(KernelError::from)?)?;

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
    };
    let result = state.run(event_rx, dump_rx, call_rx, shutdown).await;

    stop.store(true, Ordering::Relaxed);
    server.abort();
    let _ = std::fs::remove_file(&cfg.control.socket);
    tracing::info!("ctsyncd stopped");
    result
}

fn spawn_event_reader(
    mut source: EventSource,
    tx: mpsc::Sender<EventMsg>,
    stop: Arc<AtomicBool>,
) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("ctsync-events".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut batch = Vec::with_capacity(EVENT_BATCH);
                let msg = match source.next_batch(&mut batch, EVENT_BATCH) {
                    Ok(()) if batch.is_empty() => continue,
                    Ok(()) => EventMsg::Batch(batch),
                    Err(e) => EventMsg::Failed(e.to_string()),
                };
                let failed = matches!(msg, EventMsg::Failed(_));
                if tx.blocking_send(msg).is_err() || failed {
                    return;
                }
            }
        })
        .map(drop)
        .map_err(DaemonError::Thread)
}

fn spawn_dumper(
    sock: CtSocket,
) -> Result<(std::sync::mpsc::Sender<()>, mpsc::Receiver<DumpResult>), DaemonError> {
    let (req_tx, req_rx) = std::sync::mpsc::channel::<()>();
    let (res_tx, res_rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("ctsync-dump".into())
        .spawn(move || {
            for () in req_rx {
                let t0 = Instant::now();
                let mut flows = Vec::new();
                let result = netlink::dump(&sock, |m| flows.push(m.flow));
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

/// The state task: owner of the mirror.
struct State<'a> {
    cfg: &'a Config,
    mirror: Mirror,
    started: Instant,
    event_buffer: usize,
    last_dump: Option<Duration>,
    changes: u64,
    dump_req: std::sync::mpsc::Sender<()>,
}

impl State<'_> {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<EventMsg>,
        mut dumps: mpsc::Receiver<DumpResult>,
        mut calls: mpsc::Receiver<Call>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        tokio::pin!(shutdown);
        let action = self.mirror.start();
        self.act(action);
        let retry = tokio::time::sleep(Duration::MAX);
        tokio::pin!(retry);
        let mut retry_armed = false;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                Some(msg) = events.recv() => match msg {
                    EventMsg::Batch(batch) => self.events(batch),
                    EventMsg::Failed(e) => return Err(DaemonError::EventsStopped(e)),
                },
                Some(done) = dumps.recv() => {
                    if !self.dump_done(done) {
                        retry.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(1));
                        retry_armed = true;
                    }
                }
                () = &mut retry, if retry_armed => {
                    retry_armed = false;
                    let action = self.mirror.retry_dump();
                    self.act(action);
                }
                Some((req, reply)) = calls.recv() => {
                    let _ = reply.send(self.answer(req));
                }
                else => return Err(DaemonError::EventsStopped("channels closed".into())),
            }
        }
    }

    fn act(&mut self, action: MirrorAction) {
        if action == MirrorAction::StartDump && self.dump_req.send(()).is_err() {
            tracing::error!("dump thread is gone");
        }
    }

    fn events(&mut self, batch: Vec<KernelEvent>) {
        for ev in batch {
            match ev {
                KernelEvent::Flow { msg, own } => {
                    if self.mirror.event(msg, own).is_some() {
                        self.changes += 1;
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
                let (changes, action) = self.mirror.dump_complete(flows);
                self.changes += changes.len() as u64;
                tracing::info!(
                    flows = n,
                    changed = changes.len(),
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

    fn answer(&self, req: Request) -> Reply {
        match req {
            Request::Status => Reply::Status(Box::new(self.status())),
            Request::Dump {
                cache: CacheName::Internal,
            } => Reply::Flows(self.mirror.table().iter().cloned().collect()),
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
        }
    }
}
