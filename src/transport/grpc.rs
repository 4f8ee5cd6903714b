//! The gRPC peer transport: one `PeerSync.Sync` bidirectional stream per pair of nodes.
//!
//! # Who dials
//! For each configured peer, the node whose `node_id` is lexicographically smaller dials and the
//! other only accepts, so a pair shares exactly one stream. The dialer reconnects with
//! exponential backoff (25 ms, doubling up to [`TransportConfig::backoff_max`]; back to 25 ms
//! after a connection that got as far as the peer's `Hello`).
//!
//! # Opening a stream
//! Every stream starts with a [`Message::Hello`] in each direction, and the transport enforces it:
//! - **Accepting side:** the dialer's first message must be a `Hello` whose `node_id` is a
//!   configured peer that dials us (and, with TLS, is the DNS name of its client certificate);
//!   anything else is refused with a gRPC error and never reaches the engine. Only then does the
//!   transport emit [`TransportEvent::Connected`], followed by that `Hello` as the first
//!   [`TransportEvent::Message`].
//! - **Dialing side:** the accepting side speaks only after the dialer's `Hello`, so the dialer
//!   emits `Connected` as soon as the connection is up (TCP, and with TLS a server certificate
//!   valid for the peer's node id); the engine answers `Connected` by sending its `Hello`. The
//!   peer's first message must then be a `Hello` carrying the expected node id, else the
//!   connection is dropped; that `Hello` is the first `Message` event.
//!
//! So on both sides the engine's rule is the same: on `Connected`, send a `Hello`; the first
//! `Message` of a connection is always the peer's `Hello`.
//!
//! Outgoing, the transport sends nothing on a new connection before the engine's `Hello`: any
//! other message queued ahead of it (meant for a connection that has just been replaced) is
//! dropped, so the peer never sees a stream that does not start with `Hello`.
//!
//! # Connections and events
//! Each connection has an id (`conn`, unique per transport, increasing). Every `Connected` is
//! eventually followed by exactly one `Disconnected` with the same id, and a connection's
//! `Disconnected` is emitted before the `Connected` of the connection that replaces it, except
//! after [`Transport::shutdown`] (events then are best effort). A new stream from a peer that
//! still has one replaces the old (the peer restarted; the old connection is dead or dying).
//!
//! # Dead peers and back-pressure
//! HTTP/2 keepalive pings every second with a 2 s timeout, on both sides: a peer that stops
//! answering is noticed within about 3 s and its connection reported `Disconnected`.
//! Each connection has a bounded outgoing queue of [`QUEUE_LEN`] messages: [`Transport::send`]
//! never blocks and reports [`SendError::Full`] instead. Incoming messages are delivered through
//! the caller's bounded event channel; when it is full the transport stops reading, and HTTP/2
//! flow control slows the peer down.
//!
//! # Security
//! With [`TlsFiles`], mutual TLS: both sides present a certificate signed by the cluster CA
//! (see [`crate::pki`]), whose DNS name is the node id. Without, the traffic is unauthenticated
//! and unencrypted and the transport says so in a warning at start.

use super::codec::{self, Inbound, SyncHandler, SyncServer};
use crate::sync::Message;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// Capacity of each connection's outgoing queue, in messages.
pub const QUEUE_LEN: usize = 256;
/// Largest encoded message accepted or sent (the engine must keep batches below it).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long an accepted stream may take to deliver its first message (the `Hello`).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive ping interval.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// HTTP/2 keepalive ping timeout: a peer silent for this long after a ping is dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// A failed dial that took less than this was refused by a live host.
const REFUSED_FAST: Duration = Duration::from_millis(20);
/// Retry delay after such a refusal.
const REFUSED_RETRY: Duration = Duration::from_millis(25);
/// First reconnection delay of a dialer.
pub const BACKOFF_MIN: Duration = Duration::from_millis(25);
/// How long [`Transport::shutdown`] waits for its tasks before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The transport's configuration.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// This node's id.
    pub node_id: String,
    /// Address to accept peers on (port 0: any free port, see [`Transport::local_addr`]).
    pub listen: SocketAddr,
    /// The other nodes of the cluster.
    pub peers: Vec<PeerAddr>,
    /// Mutual TLS material; `None` for plaintext (unauthenticated, unencrypted).
    pub tls: Option<TlsFiles>,
    /// Time allowed to establish a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Longest delay between two dial attempts.
    pub backoff_max: Duration,
}

/// A peer node and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The peer's node id (with TLS, the DNS name in its certificate).
    pub node_id: String,
    /// `host:port` it listens on (used only if this node dials it).
    pub address: String,
}

/// PEM files for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate: the only issuer trusted for peers.
    pub ca: PathBuf,
    /// This node's certificate (DNS name = node id), signed by the CA.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// What the transport reports to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// A stream with `peer` is up (see the module docs for when exactly).
    Connected {
        /// Peer node id.
        peer: String,
        /// Connection id.
        conn: u64,
    },
    /// A message from `peer`; the first one of each connection is the peer's `Hello`.
    Message {
        /// Peer node id.
        peer: String,
        /// Connection id.
        conn: u64,
        /// The decoded, validated message.
        msg: Message,
    },
    /// The stream is gone; what was queued for it is lost.
    Disconnected {
        /// Peer node id.
        peer: String,
        /// Connection id.
        conn: u64,
        /// Why, for the logs.
        reason: String,
    },
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The configuration is inconsistent.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// A TLS file cannot be read.
    #[error("{}: {source}", .path.display())]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TLS material is unusable (bad PEM, key not matching, …).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A peer's address is not a valid `host:port`.
    #[error("peer {peer}: invalid address {address:?}: {reason}")]
    PeerAddress {
        /// Peer node id.
        peer: String,
        /// The address given.
        address: String,
        /// What is wrong.
        reason: String,
    },
}

/// Why [`Transport::send`] did not queue a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection's outgoing queue is full: hold back and retry later.
    #[error("outgoing queue full")]
    Full,
    /// There is no live connection to that peer (or to that connection).
    #[error("not connected")]
    NotConnected,
}

/// A running transport. Dropping it shuts it down (see also [`Transport::shutdown`]).
pub struct Transport {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.shared.node_id)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// State shared by the handle, the server and the connection tasks.
struct Shared {
    node_id: String,
    /// Configured peers: node id → whether this node dials it.
    peers: HashMap<String, bool>,
    tls: bool,
    conns: Mutex<ConnTable>,
    next_conn: AtomicU64,
    events: mpsc::Sender<TransportEvent>,
    shutdown: watch::Receiver<bool>,
}

/// The connections, by peer.
#[derive(Default)]
struct ConnTable {
    /// Each peer's current connection.
    current: HashMap<String, Conn>,
    /// Connections no longer current whose task may not have reported `Disconnected` yet: the
    /// `finished` signals a successor waits for before it reports `Connected`.
    draining: HashMap<String, Vec<oneshot::Receiver<()>>>,
}

impl ConnTable {
    /// Takes `peer`'s current connection out, killing it with `reason`.
    fn remove(&mut self, peer: &str, reason: &str) -> bool {
        let Some(c) = self.current.remove(peer) else {
            return false;
        };
        let _ = c.kill.send(reason.to_string());
        let waits = self.draining.entry(peer.to_string()).or_default();
        waits.retain_mut(|f| matches!(f.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        waits.push(c.finished);
        true
    }
}

/// The handle side of a live connection, in [`Shared::conns`].
struct Conn {
    id: u64,
    tx: mpsc::Sender<Message>,
    kill: oneshot::Sender<String>,
    /// Resolves once the connection's task has emitted its `Disconnected`.
    finished: oneshot::Receiver<()>,
}

/// The task side of a live connection.
struct ConnTask {
    id: u64,
    out_rx: mpsc::Receiver<Message>,
    kill_rx: oneshot::Receiver<String>,
    finished_tx: oneshot::Sender<()>,
}

/// Why a connection ended.
enum End {
    Reason(String),
    Shutdown,
}

/// The error and its causes, one line.
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn status_text(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnTable> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Makes a new connection the peer's current one (killing the one it replaces). Returns the
    /// signals to wait for before reporting it: the `finished` of every predecessor.
    fn register(&self, peer: &str) -> (ConnTask, Vec<oneshot::Receiver<()>>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, out_rx) = mpsc::channel(QUEUE_LEN);
        let (kill, kill_rx) = oneshot::channel();
        let (finished_tx, finished) = oneshot::channel();
        let conn = Conn {
            id,
            tx,
            kill,
            finished,
        };
        let mut table = self.lock();
        table.remove(peer, "replaced by a newer connection");
        table.current.insert(peer.to_string(), conn);
        let waits = table.draining.remove(peer).unwrap_or_default();
        drop(table);
        (
            ConnTask {
                id,
                out_rx,
                kill_rx,
                finished_tx,
            },
            waits,
        )
    }

    /// Waits until every predecessor of a connection has reported `Disconnected`.
    async fn after(waits: Vec<oneshot::Receiver<()>>) {
        for w in waits {
            let _ = w.await;
        }
    }

    /// Removes the connection if it is still the peer's current one.
    fn unregister(&self, peer: &str, id: u64) {
        let mut table = self.lock();
        if table.current.get(peer).is_some_and(|c| c.id == id) {
            table.remove(peer, "ended");
        }
    }

    async fn emit(&self, ev: TransportEvent) -> bool {
        self.events.send(ev).await.is_ok()
    }

    /// Ends a connection: unregisters it, then reports it.
    async fn finish(&self, peer: &str, task_id: u64, end: End, finished_tx: oneshot::Sender<()>) {
        self.unregister(peer, task_id);
        let reason = match end {
            End::Reason(r) => r,
            End::Shutdown => "transport shut down".into(),
        };
        info!(peer, conn = task_id, %reason, "peer disconnected");
        let ev = TransportEvent::Disconnected {
            peer: peer.to_string(),
            conn: task_id,
            reason,
        };
        if self.shutting_down() {
            let _ = self.events.try_send(ev);
        } else {
            let _ = self.events.send(ev).await;
        }
        drop(finished_tx);
    }

    /// Reads a connection until it ends, forwarding its messages.
    ///
    /// With `expect_hello`, the first message must be a `Hello` from `peer`; `hello_seen` is set
    /// once it has arrived.
    async fn read_loop(
        &self,
        peer: &str,
        conn: u64,
        mut inbound: Streaming<Inbound>,
        kill_rx: &mut oneshot::Receiver<String>,
        expect_hello: bool,
        hello_seen: &mut bool,
    ) -> End {
        let mut shutdown = self.shutdown.clone();
        let mut first = expect_hello;
        loop {
            let next = tokio::select! {
                r = &mut *kill_rx => return End::Reason(r.unwrap_or_else(|_| "dropped".into())),
                _ = shutdown.wait_for(|s| *s) => return End::Shutdown,
                m = inbound.message() => m,
            };
            let msg = match next {
                Ok(Some(Ok(m))) => m,
                Ok(None) => return End::Reason("stream closed by the peer".into()),
                Err(s) => return End::Reason(format!("stream failed: {}", status_text(&s))),
                Ok(Some(Err(e))) => {
                    warn!(peer, conn, error = %e, "invalid message from peer; dropping the connection");
                    return End::Reason(format!("invalid message from the peer: {e}"));
                }
            };
            if first {
                match &msg {
                    Message::Hello(h) if h.node_id == peer => *hello_seen = true,
                    Message::Hello(h) => {
                        warn!(peer, conn, claimed = %h.node_id, "peer identifies as another node");
                        return End::Reason(format!(
                            "peer identified itself as {:?}, expected {peer:?}",
                            h.node_id
                        ));
                    }
                    _ => return End::Reason("peer's first message is not a Hello".into()),
                }
                first = false;
            }
            let ev = TransportEvent::Message {
                peer: peer.to_string(),
                conn,
                msg,
            };
            if !self.emit(ev).await {
                return End::Reason("event receiver dropped".into());
            }
        }
    }
}

/// A connection's outgoing messages: the engine's `Hello` first, then everything after it.
fn outbound(rx: mpsc::Receiver<Message>, peer: String) -> impl Stream<Item = Message> {
    ReceiverStream::new(rx).skip_while(move |m| {
        let stale = !matches!(m, Message::Hello(_));
        if stale {
            debug!(
                peer,
                "dropping a message queued before the connection's Hello"
            );
        }
        stale
    })
}

/// Whether the leaf of `certs` is valid for the DNS name `node_id`.
fn cert_names(certs: &[rustls_pki_types::CertificateDer<'static>], node_id: &str) -> bool {
    let Some(leaf) = certs.first() else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(node_id) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

/// The accepting side.
struct PeerService {
    shared: Arc<Shared>,
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<Message, Status>> + Send>>;

impl SyncHandler for PeerService {
    type Stream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<Inbound>>,
    ) -> Result<Response<SyncStream>, Status> {
        let shared = &self.shared;
        let remote = request
            .remote_addr()
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        let refuse = |status: Status| {
            warn!(%remote, reason = %status.message(), "refused a peer stream");
            Err(status)
        };
        if shared.shutting_down() {
            return Err(Status::unavailable("shutting down"));
        }
        let certs = request.peer_certs();
        let mut inbound = request.into_inner();
        let mut shutdown = shared.shutdown.clone();
        let first = tokio::select! {
            r = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => r,
            _ = shutdown.wait_for(|s| *s) => return Err(Status::unavailable("shutting down")),
        };
        let first = match first {
            Err(_) => return refuse(Status::deadline_exceeded("no Hello in time")),
            Ok(Err(s)) => return refuse(s),
            Ok(Ok(None)) => return refuse(Status::cancelled("stream closed before its Hello")),
            Ok(Ok(Some(m))) => m,
        };
        let hello = match first {
            Ok(Message::Hello(h)) => h,
            Ok(_) => {
                return refuse(Status::failed_precondition(
                    "the first message must be Hello",
                ))
            }
            Err(e) => return refuse(Status::invalid_argument(format!("invalid Hello: {e}"))),
        };
        let peer = hello.node_id.clone();
        match shared.peers.get(&peer) {
            None => {
                return refuse(Status::permission_denied(format!(
                    "{peer:?} is not a peer of {:?}",
                    shared.node_id
                )))
            }
            Some(true) => {
                return refuse(Status::failed_precondition(format!(
                    "{:?} dials {peer:?}, not the other way round",
                    shared.node_id
                )))
            }
            Some(false) => {}
        }
        if shared.tls && !certs.is_some_and(|c| cert_names(&c, &peer)) {
            return refuse(Status::unauthenticated(format!(
                "the client certificate is not {peer:?}'s"
            )));
        }

        let (task, waits) = shared.register(&peer);
        let ConnTask {
            id,
            out_rx,
            mut kill_rx,
            finished_tx,
        } = task;
        info!(peer, conn = id, %remote, "peer connected");
        let shared = Arc::clone(shared);
        let p = peer.clone();
        tokio::spawn(async move {
            Shared::after(waits).await;
            let mut seen = true;
            let end = if shared
                .emit(TransportEvent::Connected {
                    peer: p.clone(),
                    conn: id,
                })
                .await
                && shared
                    .emit(TransportEvent::Message {
                        peer: p.clone(),
                        conn: id,
                        msg: Message::Hello(hello),
                    })
                    .await
            {
                shared
                    .read_loop(&p, id, inbound, &mut kill_rx, false, &mut seen)
                    .await
            } else {
                End::Reason("event receiver dropped".into())
            };
            shared.finish(&p, id, end, finished_tx).await;
        });
        let out: SyncStream = Box::pin(outbound(out_rx, peer).map(Ok));
        Ok(Response::new(out))
    }
}

/// Dials `peer` until shutdown.
async fn dial_loop(
    shared: Arc<Shared>,
    peer: String,
    endpoint: Endpoint,
    connect_timeout: Duration,
    backoff_max: Duration,
) {
    let mut shutdown = shared.shutdown.clone();
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    let mut last_warned: Option<String> = None;
    loop {
        if shared.shutting_down() || shared.events.is_closed() {
            return;
        }
        let tried = tokio::time::Instant::now();
        let attempt = tokio::select! {
            r = tokio::time::timeout(connect_timeout, endpoint.connect()) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let refused_fast = matches!(&attempt, Ok(Err(_))) && tried.elapsed() < REFUSED_FAST;
        let error = match attempt {
            Ok(Ok(channel)) => {
                failures = 0;
                match run_dialed(&shared, &peer, channel).await {
                    None => return,
                    Some(true) => backoff = BACKOFF_MIN,
                    Some(false) => {}
                }
                None
            }
            Ok(Err(e)) => Some(chain(&e)),
            Err(_) => Some(format!("timed out after {connect_timeout:?}")),
        };
        if let Some(error) = error {
            failures += 1;
            // Once per kind of failure: a certificate refusal that follows a streak of
            // "connection refused" must still reach the operator at warn level.
            if last_warned.as_deref() != Some(error.as_str()) {
                warn!(peer, address = %endpoint.uri(), failures, %error, "cannot connect to peer; retrying");
                last_warned = Some(error);
            } else {
                debug!(peer, failures, %error, "cannot connect to peer");
            }
        } else {
            last_warned = None;
        }
        // A peer host that refuses at once is up, its daemon (re)starting: try again soon, so
        // that a restarted peer is resynchronised within a few tens of milliseconds of
        // listening, instead of after a doubled backoff. Cheap: a SYN and a RST per try.
        let wait = if refused_fast {
            backoff.min(REFUSED_RETRY)
        } else {
            backoff
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// Runs one dialed connection. `None`: shutting down; `Some(hello_seen)` otherwise.
async fn run_dialed(shared: &Shared, peer: &str, channel: Channel) -> Option<bool> {
    let (task, waits) = shared.register(peer);
    let ConnTask {
        id,
        out_rx,
        mut kill_rx,
        finished_tx,
    } = task;
    Shared::after(waits).await;
    info!(peer, conn = id, "connected to peer");
    let mut hello_seen = false;
    let end = if shared
        .emit(TransportEvent::Connected {
            peer: peer.to_string(),
            conn: id,
        })
        .await
    {
        let mut shutdown = shared.shutdown.clone();
        let response = tokio::select! {
            r = codec::open_sync(channel, outbound(out_rx, peer.to_string()), MAX_MESSAGE_BYTES) => Ok(r),
            r = &mut kill_rx => Err(End::Reason(r.unwrap_or_else(|_| "dropped".into()))),
            _ = shutdown.wait_for(|s| *s) => Err(End::Shutdown),
        };
        match response {
            Err(end) => end,
            Ok(Err(s)) => {
                warn!(peer, conn = id, status = %status_text(&s), "peer refused the stream");
                End::Reason(format!("refused by the peer: {}", status_text(&s)))
            }
            Ok(Ok(r)) => {
                shared
                    .read_loop(
                        peer,
                        id,
                        r.into_inner(),
                        &mut kill_rx,
                        true,
                        &mut hello_seen,
                    )
                    .await
            }
        }
    } else {
        End::Reason("event receiver dropped".into())
    };
    let shutdown = matches!(end, End::Shutdown);
    shared.finish(peer, id, end, finished_tx).await;
    (!shutdown).then_some(hello_seen)
}

fn read_tls_file(path: &PathBuf) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::ReadTls {
        path: path.clone(),
        source,
    })
}

/// Starts the transport: binds the listener, starts accepting, and dials the peers this node
/// dials. Events go to `events` until the transport is shut down.
pub async fn start(
    cfg: TransportConfig,
    events: mpsc::Sender<TransportEvent>,
) -> Result<Transport, TransportError> {
    let bad = |m: String| Err(TransportError::Config(m));
    if cfg.node_id.is_empty() {
        return bad("node_id is empty".into());
    }
    let mut peers = HashMap::new();
    for p in &cfg.peers {
        if p.node_id.is_empty() {
            return bad("a peer has an empty node_id".into());
        }
        if p.node_id == cfg.node_id {
            return bad(format!("{:?} is listed as its own peer", p.node_id));
        }
        if peers
            .insert(p.node_id.clone(), cfg.node_id < p.node_id)
            .is_some()
        {
            return bad(format!("peer {:?} is listed twice", p.node_id));
        }
        if cfg.tls.is_some()
            && !matches!(
                rustls_pki_types::ServerName::try_from(p.node_id.as_str()),
                Ok(rustls_pki_types::ServerName::DnsName(_))
            )
        {
            return bad(format!(
                "peer {:?}: with TLS a node id must be a DNS name",
                p.node_id
            ));
        }
    }
    let backoff_max = cfg.backoff_max.max(BACKOFF_MIN);

    let tls = match &cfg.tls {
        Some(t) => {
            let ca = Certificate::from_pem(read_tls_file(&t.ca)?);
            let identity = Identity::from_pem(read_tls_file(&t.cert)?, read_tls_file(&t.key)?);
            Some((ca, identity))
        }
        None => {
            warn!(
                "peer sync runs WITHOUT TLS: the traffic is unauthenticated and unencrypted, and \
                 anyone who can reach {} can inject flows; configure TLS files (see `syncctl pki`)",
                cfg.listen
            );
            None
        }
    };

    // One stream per connection is all a peer needs; a few more cost nothing and bound abuse.
    let mut server = Server::builder()
        .max_concurrent_streams(Some(4))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some((ca, identity)) = &tls {
        let c = ServerTlsConfig::new()
            .identity(identity.clone())
            .client_ca_root(ca.clone());
        server = server
            .tls_config(c)
            .map_err(|e| TransportError::Tls(chain(&e)))?;
    }

    let mut endpoints = Vec::new();
    for p in cfg.peers.iter().filter(|p| cfg.node_id < p.node_id) {
        let addr_err = |reason: String| TransportError::PeerAddress {
            peer: p.node_id.clone(),
            address: p.address.clone(),
            reason,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{}", p.address))
            .map_err(|e| addr_err(chain(&e)))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some((ca, identity)) = &tls {
            let c = ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(identity.clone())
                .domain_name(p.node_id.clone());
            ep = ep
                .tls_config(c)
                .map_err(|e| TransportError::Tls(chain(&e)))?;
        }
        endpoints.push((p.node_id.clone(), ep));
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| TransportError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| TransportError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        node_id: cfg.node_id.clone(),
        peers,
        tls: tls.is_some(),
        conns: Mutex::new(ConnTable::default()),
        next_conn: AtomicU64::new(1),
        events,
        shutdown: shutdown_rx.clone(),
    });

    let svc = SyncServer::new(
        PeerService {
            shared: Arc::clone(&shared),
        },
        MAX_MESSAGE_BYTES,
    );
    let mut stop = shutdown_rx;
    let mut tasks = vec![tokio::spawn(async move {
        let signal = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = server
            .serve_with_incoming_shutdown(svc, incoming, signal)
            .await
        {
            warn!(error = %chain(&e), "peer sync server failed");
        }
    })];
    for (peer, ep) in endpoints {
        tasks.push(tokio::spawn(dial_loop(
            Arc::clone(&shared),
            peer,
            ep,
            cfg.connect_timeout,
            backoff_max,
        )));
    }
    info!(
        node = %cfg.node_id,
        %local_addr,
        tls = shared.tls,
        peers = cfg.peers.len(),
        "peer transport started"
    );
    Ok(Transport {
        shared,
        local_addr,
        shutdown_tx,
        tasks,
    })
}

impl Transport {
    /// The address the transport accepts peers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `msg` for `peer`'s current connection, without waiting.
    pub fn send(&self, peer: &str, msg: Message) -> Result<(), SendError> {
        let table = self.shared.lock();
        let c = table.current.get(peer).ok_or(SendError::NotConnected)?;
        Self::queue(c, msg)
    }

    /// Like [`Transport::send`], but only if `conn` is still `peer`'s current connection: a
    /// message meant for one connection never goes out on its successor.
    pub fn send_on(&self, peer: &str, conn: u64, msg: Message) -> Result<(), SendError> {
        let table = self.shared.lock();
        match table.current.get(peer) {
            Some(c) if c.id == conn => Self::queue(c, msg),
            _ => Err(SendError::NotConnected),
        }
    }

    fn queue(c: &Conn, msg: Message) -> Result<(), SendError> {
        c.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::NotConnected,
        })
    }

    /// Free places in the outgoing queue of `peer`'s current connection (`None`: not connected).
    pub fn capacity(&self, peer: &str) -> Option<usize> {
        self.shared
            .lock()
            .current
            .get(peer)
            .map(|c| c.tx.capacity())
    }

    /// Drops the current connection to `peer`, if any. `Disconnected` follows; if this node
    /// dials the peer it reconnects after the backoff, otherwise the peer redials.
    pub fn disconnect(&self, peer: &str) {
        self.shared.lock().remove(peer, "disconnected locally");
    }

    fn begin_shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        let mut table = self.shared.lock();
        for (_, c) in table.current.drain() {
            let _ = c.kill.send("transport shut down".into());
        }
        table.draining.clear();
    }

    /// Stops accepting and dialing, closes every connection, and waits (a few seconds at most)
    /// for the tasks to end. No event is guaranteed after this is called.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        for mut t in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut t).await.is_err() {
                t.abort();
            }
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.begin_shutdown();
        // The listener closes at once; connections close gracefully in the background.
        if let Some(server) = self.tasks.first() {
            server.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, TempDir};
    use crate::sync::{Batch, Hello};
    use crate::wire::pb::peer_sync_client::PeerSyncClient;
    use crate::wire::{self, pb};
    use prost::bytes::{Buf, BufMut, Bytes};
    use tokio::sync::mpsc::Receiver;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::codegen::http::uri::PathAndQuery;

    const WAIT: Duration = Duration::from_secs(10);

    fn hello(node: &str) -> Message {
        Message::Hello(Hello {
            version_major: crate::sync::VERSION_MAJOR,
            version_minor: crate::sync::VERSION_MINOR,
            cluster: "test".into(),
            node_id: node.into(),
            epoch: 1,
            have_epoch: 0,
            have_seq: 0,
        })
    }

    fn batch(seq: u64) -> Message {
        let t = crate::flow::Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: crate::flow::proto::TCP,
            l4: crate::flow::L4::Ports { src: 1000, dst: 80 },
        };
        let flow = crate::flow::Flow::new(Default::default(), t, t.inverse());
        Message::Batch(Batch {
            epoch: 1,
            seq,
            upserts: vec![(seq, flow)],
            deletes: vec![],
        })
    }

    fn config(node: &str, peers: &[(&str, String)], tls: Option<TlsFiles>) -> TransportConfig {
        TransportConfig {
            node_id: node.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            peers: peers
                .iter()
                .map(|(n, a)| PeerAddr {
                    node_id: n.to_string(),
                    address: a.clone(),
                })
                .collect(),
            tls,
            connect_timeout: Duration::from_secs(2),
            backoff_max: Duration::from_millis(400),
        }
    }

    /// A CA and certificates for `nodes` in a temp dir.
    fn certs(nodes: &[&str]) -> TempDir {
        let dir = TempDir::new("transport");
        pki::init_ca(&dir.0, "test").unwrap();
        for n in nodes {
            pki::issue(&dir.0, n).unwrap();
        }
        dir
    }

    fn tls_files(dir: &TempDir, node: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.0.join("ca.pem"),
            cert: dir.0.join(format!("{node}.pem")),
            key: dir.0.join(format!("{node}.key")),
        }
    }

    async fn next(rx: &mut Receiver<TransportEvent>) -> TransportEvent {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no event in time")
            .expect("event channel closed")
    }

    /// Asserts that no event arrives for a while.
    async fn quiet(rx: &mut Receiver<TransportEvent>, for_: Duration) {
        if let Ok(ev) = tokio::time::timeout(for_, rx.recv()).await {
            panic!("unexpected event {ev:?}");
        }
    }

    async fn expect_connected(rx: &mut Receiver<TransportEvent>, peer: &str) -> u64 {
        match next(rx).await {
            TransportEvent::Connected { peer: p, conn } if p == peer => conn,
            ev => panic!("expected Connected from {peer}, got {ev:?}"),
        }
    }

    async fn expect_message(rx: &mut Receiver<TransportEvent>, peer: &str, conn: u64) -> Message {
        match next(rx).await {
            TransportEvent::Message {
                peer: p,
                conn: c,
                msg,
            } if p == peer && c == conn => msg,
            ev => panic!("expected a message from {peer} on {conn}, got {ev:?}"),
        }
    }

    async fn expect_disconnected(
        rx: &mut Receiver<TransportEvent>,
        peer: &str,
        conn: u64,
    ) -> String {
        match next(rx).await {
            TransportEvent::Disconnected {
                peer: p,
                conn: c,
                reason,
            } if p == peer && c == conn => reason,
            ev => panic!("expected Disconnected from {peer} on {conn}, got {ev:?}"),
        }
    }

    struct Node {
        t: Transport,
        rx: Receiver<TransportEvent>,
    }

    async fn node(cfg: TransportConfig) -> Node {
        let (tx, rx) = mpsc::channel(64);
        Node {
            t: start(cfg, tx).await.unwrap(),
            rx,
        }
    }

    /// Starts "b" (accepting) then "a" (dialing b).
    async fn pair(dir: Option<&TempDir>) -> (Node, Node) {
        let b = node(config(
            "b",
            &[("a", "127.0.0.1:1".into())],
            dir.map(|d| tls_files(d, "b")),
        ))
        .await;
        let a = node(config(
            "a",
            &[("b", b.t.local_addr().to_string())],
            dir.map(|d| tls_files(d, "a")),
        ))
        .await;
        (a, b)
    }

    /// The engine's side of opening a stream: Hello both ways. Returns the connection ids.
    async fn handshake(a: &mut Node, b: &mut Node) -> (u64, u64) {
        let ca = expect_connected(&mut a.rx, "b").await;
        a.t.send("b", hello("a")).unwrap();
        let cb = expect_connected(&mut b.rx, "a").await;
        assert_eq!(expect_message(&mut b.rx, "a", cb).await, hello("a"));
        b.t.send("a", hello("b")).unwrap();
        assert_eq!(expect_message(&mut a.rx, "b", ca).await, hello("b"));
        (ca, cb)
    }

    async fn exchange(a: &mut Node, b: &mut Node, (ca, cb): (u64, u64)) {
        for seq in 1..=20 {
            a.t.send("b", batch(seq)).unwrap();
            b.t.send("a", batch(100 + seq)).unwrap();
        }
        for seq in 1..=20 {
            assert_eq!(expect_message(&mut b.rx, "a", cb).await, batch(seq));
            assert_eq!(expect_message(&mut a.rx, "b", ca).await, batch(100 + seq));
        }
    }

    /// A raw client that dials `addr` and opens a stream starting with `first`; returns the
    /// stream's two sides.
    async fn raw_stream(
        addr: SocketAddr,
        tls: Option<ClientTlsConfig>,
        first: pb::PeerMessage,
    ) -> Result<(mpsc::Sender<pb::PeerMessage>, Streaming<pb::PeerMessage>), String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
        if let Some(t) = tls {
            ep = ep.tls_config(t).unwrap();
        }
        let channel = ep.connect().await.map_err(|e| chain(&e))?;
        let mut client = PeerSyncClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        tx.send(first).await.unwrap();
        let mut inbound = client
            .sync(ReceiverStream::new(rx))
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        // The server may still refuse after the response headers.
        match tokio::time::timeout(Duration::from_millis(500), inbound.message()).await {
            Ok(Err(s)) => Err(status_text(&s)),
            _ => Ok((tx, inbound)),
        }
    }

    #[tokio::test]
    async fn mtls_exchanges_messages_both_ways() {
        let dir = certs(&["a", "b"]);
        let (mut a, mut b) = pair(Some(&dir)).await;
        let conns = handshake(&mut a, &mut b).await;
        exchange(&mut a, &mut b, conns).await;
        assert_eq!(a.t.send("nobody", batch(1)), Err(SendError::NotConnected));
        assert_eq!(
            a.t.send_on("b", conns.0 + 100, batch(1)),
            Err(SendError::NotConnected)
        );
        a.t.send_on("b", conns.0, batch(7)).unwrap();
        assert_eq!(expect_message(&mut b.rx, "a", conns.1).await, batch(7));
        a.t.shutdown().await;
        expect_disconnected(&mut b.rx, "a", conns.1).await;
        assert_eq!(b.t.send("a", batch(1)), Err(SendError::NotConnected));
    }

    #[tokio::test]
    async fn plaintext_exchanges_messages_both_ways() {
        let (mut a, mut b) = pair(None).await;
        let conns = handshake(&mut a, &mut b).await;
        exchange(&mut a, &mut b, conns).await;
    }

    #[tokio::test]
    async fn messages_queued_before_hello_are_not_sent() {
        let (mut a, mut b) = pair(None).await;
        let ca = expect_connected(&mut a.rx, "b").await;
        a.t.send("b", batch(1)).unwrap(); // stale: meant for an earlier connection
        a.t.send("b", hello("a")).unwrap();
        a.t.send("b", batch(2)).unwrap();
        let cb = expect_connected(&mut b.rx, "a").await;
        assert_eq!(expect_message(&mut b.rx, "a", cb).await, hello("a"));
        assert_eq!(expect_message(&mut b.rx, "a", cb).await, batch(2));
        let _ = ca;
    }

    #[tokio::test]
    async fn redials_after_the_accepting_side_restarts() {
        let dir = certs(&["a", "b"]);
        let (mut a, mut b) = pair(Some(&dir)).await;
        let (ca, _) = handshake(&mut a, &mut b).await;
        let addr = b.t.local_addr();
        b.t.shutdown().await;
        expect_disconnected(&mut a.rx, "b", ca).await;
        // Connection attempts fail while b is away; none is reported.
        quiet(&mut a.rx, Duration::from_millis(600)).await;

        let mut cfg = config(
            "b",
            &[("a", "127.0.0.1:1".into())],
            Some(tls_files(&dir, "b")),
        );
        cfg.listen = addr;
        let mut b = node(cfg).await;
        let conns = handshake(&mut a, &mut b).await;
        assert!(conns.0 > ca);
        exchange(&mut a, &mut b, conns).await;
    }

    #[tokio::test]
    async fn disconnect_drops_the_stream_and_the_dialer_redials() {
        let (mut a, mut b) = pair(None).await;
        let (ca, cb) = handshake(&mut a, &mut b).await;
        b.t.disconnect("a");
        assert_eq!(
            expect_disconnected(&mut b.rx, "a", cb).await,
            "disconnected locally"
        );
        expect_disconnected(&mut a.rx, "b", ca).await;
        let (ca2, cb2) = handshake(&mut a, &mut b).await;
        assert!(ca2 > ca && cb2 > cb);
        a.t.disconnect("b");
        expect_disconnected(&mut a.rx, "b", ca2).await;
        expect_disconnected(&mut b.rx, "a", cb2).await;
        handshake(&mut a, &mut b).await;
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let dir = certs(&["a", "b"]);
        let mut b = node(config(
            "b",
            &[("a", "x:1".into())],
            Some(tls_files(&dir, "b")),
        ))
        .await;
        let ca = Certificate::from_pem(std::fs::read(dir.0.join("ca.pem")).unwrap());
        let tls = ClientTlsConfig::new().ca_certificate(ca).domain_name("b");
        let r = raw_stream(b.t.local_addr(), Some(tls), wire::encode(&hello("a"))).await;
        assert!(r.is_err(), "a client without certificate got a stream");
        quiet(&mut b.rx, Duration::from_millis(300)).await;

        // The same client with its certificate is accepted.
        let ca = Certificate::from_pem(std::fs::read(dir.0.join("ca.pem")).unwrap());
        let id = Identity::from_pem(
            std::fs::read(dir.0.join("a.pem")).unwrap(),
            std::fs::read(dir.0.join("a.key")).unwrap(),
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(id)
            .domain_name("b");
        let _s = raw_stream(b.t.local_addr(), Some(tls), wire::encode(&hello("a")))
            .await
            .unwrap();
        let conn = expect_connected(&mut b.rx, "a").await;
        assert_eq!(expect_message(&mut b.rx, "a", conn).await, hello("a"));
    }

    #[tokio::test]
    async fn client_with_certificate_of_another_ca_is_refused() {
        let dir = certs(&["a", "b"]);
        let other = certs(&["a"]);
        let mut b = node(config(
            "b",
            &[("a", "x:1".into())],
            Some(tls_files(&dir, "b")),
        ))
        .await;
        let ca = Certificate::from_pem(std::fs::read(dir.0.join("ca.pem")).unwrap());
        let id = Identity::from_pem(
            std::fs::read(other.0.join("a.pem")).unwrap(),
            std::fs::read(other.0.join("a.key")).unwrap(),
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(id)
            .domain_name("b");
        let r = raw_stream(b.t.local_addr(), Some(tls), wire::encode(&hello("a"))).await;
        assert!(r.is_err(), "a client of another CA got a stream");
        quiet(&mut b.rx, Duration::from_millis(300)).await;

        // A whole transport of another CA never connects either.
        let mut a = node(config(
            "a",
            &[("b", b.t.local_addr().to_string())],
            Some(tls_files(&other, "a")),
        ))
        .await;
        quiet(&mut b.rx, Duration::from_millis(500)).await;
        quiet(&mut a.rx, Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn hello_must_match_the_client_certificate() {
        let dir = certs(&["a", "b", "c"]);
        let mut b = node(config(
            "b",
            &[("a", "x:1".into()), ("c", "x:1".into())],
            Some(tls_files(&dir, "b")),
        ))
        .await;
        // c holds a valid certificate but claims to be a.
        let ca = Certificate::from_pem(std::fs::read(dir.0.join("ca.pem")).unwrap());
        let id = Identity::from_pem(
            std::fs::read(dir.0.join("c.pem")).unwrap(),
            std::fs::read(dir.0.join("c.key")).unwrap(),
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(id)
            .domain_name("b");
        let e = raw_stream(b.t.local_addr(), Some(tls), wire::encode(&hello("a")))
            .await
            .expect_err("an impostor got a stream");
        assert!(e.contains("Unauthenticated"), "{e}");
        quiet(&mut b.rx, Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn streams_that_do_not_open_with_a_valid_hello_are_refused() {
        let mut b = node(config(
            "b",
            &[("a", "x:1".into()), ("c", "x:1".into())],
            None,
        ))
        .await;
        let addr = b.t.local_addr();
        let e = raw_stream(addr, None, wire::encode(&hello("mallory")))
            .await
            .unwrap_err();
        assert!(
            e.contains("PermissionDenied") && e.contains("mallory"),
            "{e}"
        );
        let e = raw_stream(addr, None, wire::encode(&batch(1)))
            .await
            .unwrap_err();
        assert!(e.contains("must be Hello"), "{e}");
        let e = raw_stream(addr, None, pb::PeerMessage::default())
            .await
            .unwrap_err();
        assert!(e.contains("InvalidArgument"), "{e}");
        // "c" sorts after "b": b dials c, so c may not dial b.
        let e = raw_stream(addr, None, wire::encode(&hello("c")))
            .await
            .unwrap_err();
        assert!(e.contains("FailedPrecondition"), "{e}");
        quiet(&mut b.rx, Duration::from_millis(200)).await;
        // A valid one is accepted.
        let _s = raw_stream(addr, None, wire::encode(&hello("a")))
            .await
            .unwrap();
        let conn = expect_connected(&mut b.rx, "a").await;
        assert_eq!(expect_message(&mut b.rx, "a", conn).await, hello("a"));
    }

    #[tokio::test]
    async fn invalid_message_drops_the_connection() {
        let mut b = node(config("b", &[("a", "x:1".into())], None)).await;
        let channel = Endpoint::from_shared(format!("http://{}", b.t.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(wire::encode(&hello("a"))).await.unwrap();
        let _resp = PeerSyncClient::new(channel)
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap();
        let conn = expect_connected(&mut b.rx, "a").await;
        expect_message(&mut b.rx, "a", conn).await;
        tx.send(pb::PeerMessage::default()).await.unwrap();
        let reason = expect_disconnected(&mut b.rx, "a", conn).await;
        assert!(reason.contains("invalid message"), "{reason}");
    }

    #[tokio::test]
    async fn a_new_stream_from_the_same_peer_replaces_the_old() {
        let mut b = node(config("b", &[("a", "x:1".into())], None)).await;
        let addr = b.t.local_addr();
        let _s1 = raw_stream(addr, None, wire::encode(&hello("a")))
            .await
            .unwrap();
        let c1 = expect_connected(&mut b.rx, "a").await;
        expect_message(&mut b.rx, "a", c1).await;
        let _s2 = raw_stream(addr, None, wire::encode(&hello("a")))
            .await
            .unwrap();
        // The old connection's Disconnected comes before the new one's Connected.
        let reason = expect_disconnected(&mut b.rx, "a", c1).await;
        assert!(reason.contains("replaced"), "{reason}");
        let c2 = expect_connected(&mut b.rx, "a").await;
        assert!(c2 > c1);
    }

    #[tokio::test]
    async fn full_queue_is_reported() {
        let (tx, _rx) = mpsc::channel(1);
        let (_stop, shutdown) = watch::channel(false);
        let shared = Shared {
            node_id: "a".into(),
            peers: HashMap::new(),
            tls: false,
            conns: Mutex::new(ConnTable::default()),
            next_conn: AtomicU64::new(1),
            events: tx,
            shutdown,
        };
        let (task, _) = shared.register("b");
        let (shutdown_tx, _) = watch::channel(false);
        let t = Transport {
            shared: Arc::new(shared),
            local_addr: "127.0.0.1:1".parse().unwrap(),
            shutdown_tx,
            tasks: vec![],
        };
        assert_eq!(t.capacity("b"), Some(QUEUE_LEN));
        for i in 0..QUEUE_LEN as u64 {
            t.send("b", batch(i)).unwrap();
        }
        assert_eq!(t.capacity("b"), Some(0));
        assert_eq!(t.send("b", batch(0)), Err(SendError::Full));
        drop(task);
        assert_eq!(t.send("b", batch(0)), Err(SendError::NotConnected));
        assert_eq!(t.capacity("c"), None);
    }

    /// A TCP relay on loopback that can be made to swallow everything silently, like a peer
    /// whose host died or whose link was cut.
    async fn blackhole_relay(target: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut_tx, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pump(ri, wo, cut_rx.clone()));
                tokio::spawn(pump(ro, wi, cut_rx.clone()));
            }
        });
        (addr, cut_tx)
    }

    async fn pump(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        cut: watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16384];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if *cut.borrow() {
                continue; // swallow, keep the socket open
            }
            if w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // Keep the write half open: a dead host sends no FIN.
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn keepalive_detects_a_dead_peer() {
        let mut b = node(config("b", &[("a", "x:1".into())], None)).await;
        let (relay, cut) = blackhole_relay(b.t.local_addr()).await;
        let mut a = node(config("a", &[("b", relay.to_string())], None)).await;
        let (ca, cb) = handshake(&mut a, &mut b).await;
        let start = tokio::time::Instant::now();
        cut.send_replace(true);
        let reason = expect_disconnected(&mut a.rx, "b", ca).await;
        let a_took = start.elapsed();
        expect_disconnected(&mut b.rx, "a", cb).await;
        let b_took = start.elapsed();
        assert!(a_took < Duration::from_millis(4500), "{a_took:?}: {reason}");
        assert!(b_took < Duration::from_millis(4500), "{b_took:?}");
    }

    #[tokio::test]
    async fn start_rejects_bad_configuration() {
        let (tx, _rx) = mpsc::channel(1);
        let e = start(config("a", &[("a", "x:1".into())], None), tx.clone())
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Config(_)), "{e}");
        let e = start(
            config("a", &[("b", "x:1".into()), ("b", "y:1".into())], None),
            tx.clone(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = start(
            config("a", &[("b", "not an address".into())], None),
            tx.clone(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, TransportError::PeerAddress { .. }), "{e}");
        let dir = certs(&["a"]);
        let mut files = tls_files(&dir, "a");
        files.key = dir.0.join("missing.key");
        let e = start(config("a", &[], Some(files)), tx.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(e, TransportError::ReadTls { .. }) && e.to_string().contains("missing.key"),
            "{e}"
        );
        let mut files = tls_files(&dir, "a");
        files.cert = dir.0.join("ca.key"); // not a certificate
        let e = start(config("a", &[], Some(files)), tx.clone())
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Tls(_)), "{e}");
        // The port is taken.
        let n = node(config("b", &[], None)).await;
        let mut cfg = config("c", &[], None);
        cfg.listen = n.t.local_addr();
        let e = start(cfg, tx).await.unwrap_err();
        assert!(matches!(e, TransportError::Bind { .. }), "{e}");
    }

    // ---- Foreign peers: raw bytes, the generated prost client and server ----

    /// Passes bytes through untouched, so that a test can put on the wire what no codec of ours
    /// would ever produce.
    #[derive(Debug, Clone, Copy, Default)]
    struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Bytes;
        type Decode = Bytes;
        type Encoder = RawCodec;
        type Decoder = RawCodec;

        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }

        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Bytes;
        type Error = Status;

        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Bytes;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }

    async fn plain_channel(addr: SocketAddr) -> Channel {
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Opens a stream on `path` whose messages are raw bytes: `first`, then what is sent on the
    /// returned sender. (`first` goes before the call, which waits for the response headers: our
    /// server sends them only once the Hello is in.)
    async fn raw_bytes_call(
        addr: SocketAddr,
        path: &'static str,
        first: Bytes,
    ) -> (mpsc::Sender<Bytes>, Result<Streaming<Bytes>, Status>) {
        let mut grpc = tonic::client::Grpc::new(plain_channel(addr).await);
        grpc.ready().await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(first).await.unwrap();
        let r = grpc
            .streaming(
                Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
            .map(Response::into_inner);
        (tx, r)
    }

    fn encoded(msg: &Message) -> Bytes {
        let mut buf = Vec::new();
        wire::encode_message(msg, &mut buf);
        buf.into()
    }

    #[tokio::test]
    async fn malformed_protobuf_drops_the_connection_and_the_server_keeps_serving() {
        let mut b = node(config("b", &[("a", "x:1".into())], None)).await;
        let addr = b.t.local_addr();
        let cases: [(&[u8], &str); 2] = [
            // Field 2 (batch), length-delimited, whose length varint never ends.
            (&[0x12, 0x80], "invalid varint"),
            // Field 1 (hello) as a varint instead of a submessage.
            (&[0x08, 0x01], "field 1: wire type 0, expected 2"),
        ];
        let mut last = 0;
        for (bytes, what) in cases {
            let (tx, inbound) = raw_bytes_call(addr, codec::SYNC_PATH, encoded(&hello("a"))).await;
            let _inbound = inbound.unwrap();
            let conn = expect_connected(&mut b.rx, "a").await;
            assert!(conn > last);
            last = conn;
            assert_eq!(expect_message(&mut b.rx, "a", conn).await, hello("a"));
            tx.send(Bytes::from_static(bytes)).await.unwrap();
            let reason = expect_disconnected(&mut b.rx, "a", conn).await;
            assert_eq!(
                reason,
                format!("stream failed: Internal: failed to decode Protobuf message: {what}")
            );
        }
        // A malformed first message is refused before it could be a Hello.
        let (_tx, inbound) =
            raw_bytes_call(addr, codec::SYNC_PATH, Bytes::from_static(&[0x12, 0x80])).await;
        let status = match inbound {
            Err(s) => s,
            Ok(mut s) => s.message().await.unwrap_err(),
        };
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert_eq!(
            status.message(),
            "failed to decode Protobuf message: invalid varint"
        );
        quiet(&mut b.rx, Duration::from_millis(200)).await;
        // The server still serves well-behaved peers.
        let (_tx, _inbound) = raw_stream(addr, None, wire::encode(&hello("a")))
            .await
            .unwrap();
        let conn = expect_connected(&mut b.rx, "a").await;
        assert!(conn > last);
        assert_eq!(expect_message(&mut b.rx, "a", conn).await, hello("a"));
    }

    #[tokio::test]
    async fn well_formed_but_invalid_message_is_reported_with_its_field() {
        let mut b = node(config("b", &[("a", "x:1".into())], None)).await;
        let (tx, _inbound) = raw_stream(b.t.local_addr(), None, wire::encode(&hello("a")))
            .await
            .unwrap();
        let conn = expect_connected(&mut b.rx, "a").await;
        expect_message(&mut b.rx, "a", conn).await;
        let mut msg = wire::encode(&batch(1));
        let Some(pb::peer_message::Body::Batch(ref mut bt)) = msg.body else {
            unreachable!("batch() is a Batch");
        };
        let orig = bt.upserts[0].flow.as_mut().unwrap().key.as_mut().unwrap();
        let orig = orig.orig.as_mut().unwrap();
        orig.src_v4 = None;
        orig.src = Bytes::from_static(&[10, 0, 0]);
        tx.send(msg).await.unwrap();
        assert_eq!(
            expect_disconnected(&mut b.rx, "a", conn).await,
            "invalid message from the peer: batch.upserts[0].flow.key.orig.src: address of 3 \
             bytes, expected 4 (IPv4) or 16 (IPv6)"
        );
    }

    /// A message whose encoding is exactly `len` bytes (from a few dozen up), to probe the limit
    /// to the byte: a `ResyncRequest`, whose free-form reason is the only field of any size that
    /// validation lets through.
    fn message_of(len: usize) -> Message {
        let mut reason = "x".repeat(len.saturating_sub(16));
        while wire::encoded_len(&Message::ResyncRequest {
            reason: reason.clone(),
        }) < len
        {
            reason.push('x');
        }
        let msg = Message::ResyncRequest { reason };
        assert_eq!(wire::encoded_len(&msg), len);
        msg
    }

    #[tokio::test]
    async fn oversized_message_from_a_foreign_peer_is_refused() {
        let mut b = node(config("b", &[("a", "x:1".into())], None)).await;
        let channel = plain_channel(b.t.local_addr()).await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(wire::encode(&hello("a"))).await.unwrap();
        let _inbound = PeerSyncClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap();
        let conn = expect_connected(&mut b.rx, "a").await;
        expect_message(&mut b.rx, "a", conn).await;
        // The limit itself is allowed.
        let at_limit = message_of(MAX_MESSAGE_BYTES);
        tx.send(wire::encode(&at_limit)).await.unwrap();
        assert_eq!(expect_message(&mut b.rx, "a", conn).await, at_limit);
        tx.send(wire::encode(&message_of(MAX_MESSAGE_BYTES + 1)))
            .await
            .unwrap();
        assert_eq!(
            expect_disconnected(&mut b.rx, "a", conn).await,
            format!(
                "stream failed: OutOfRange: Error, decoded message length too large: found {} \
                 bytes, the limit is: {MAX_MESSAGE_BYTES} bytes",
                MAX_MESSAGE_BYTES + 1
            )
        );
    }

    /// The engine keeps its messages far below the limit (512 flows a batch); should one go over
    /// anyway, `send` still queues it (sizing every message there would cost what the codec
    /// saves), and the codec refuses to put it on the wire, with an error in the sender's log;
    /// that ends the connection on both sides.
    #[tokio::test]
    async fn oversized_message_of_ours_drops_the_connection() {
        let (mut a, mut b) = pair(None).await;
        let conns = handshake(&mut a, &mut b).await;
        exchange(&mut a, &mut b, conns).await;
        // The limit itself goes through, both ways.
        let at_limit = message_of(MAX_MESSAGE_BYTES);
        a.t.send("b", at_limit.clone()).unwrap();
        assert_eq!(expect_message(&mut b.rx, "a", conns.1).await, at_limit);
        b.t.send("a", at_limit.clone()).unwrap();
        assert_eq!(expect_message(&mut a.rx, "b", conns.0).await, at_limit);

        // From the dialing side. hyper drops tonic's "too large" error of a request body and
        // resets the stream, so neither reason says why.
        a.t.send("b", message_of(MAX_MESSAGE_BYTES + 1)).unwrap();
        let ra = expect_disconnected(&mut a.rx, "b", conns.0).await;
        let rb = expect_disconnected(&mut b.rx, "a", conns.1).await;
        assert!(ra.starts_with("stream failed: "), "{ra}");
        assert!(rb.starts_with("stream failed: "), "{rb}");

        // From the accepting side: the codec's reason goes to the dialer in the trailers.
        let (ca, cb) = handshake(&mut a, &mut b).await;
        b.t.send("a", message_of(MAX_MESSAGE_BYTES + 1)).unwrap();
        let ra = expect_disconnected(&mut a.rx, "b", ca).await;
        expect_disconnected(&mut b.rx, "a", cb).await;
        assert!(
            ra.starts_with("stream failed: ")
                && ra.contains(&format!(
                    "message of {} bytes to send, the limit is {MAX_MESSAGE_BYTES} bytes",
                    MAX_MESSAGE_BYTES + 1
                )),
            "{ra}"
        );

        // Both sides carry on.
        let conns = handshake(&mut a, &mut b).await;
        exchange(&mut a, &mut b, conns).await;
    }

    #[tokio::test]
    async fn other_methods_are_unimplemented() {
        let b = node(config("b", &[("a", "x:1".into())], None)).await;
        let generated = prost_server().await.0;
        for addr in [b.t.local_addr(), generated] {
            for path in [
                "/ctsync.v1.PeerSync/Other",
                "/ctsync.v1.Other/Sync",
                "/grpc.health.v1.Health/Check",
            ] {
                let mut grpc = tonic::client::Grpc::new(plain_channel(addr).await);
                grpc.ready().await.unwrap();
                let status = grpc
                    .unary(
                        Request::new(Bytes::new()),
                        PathAndQuery::from_static(path),
                        RawCodec,
                    )
                    .await
                    .unwrap_err();
                assert_eq!(
                    status.code(),
                    tonic::Code::Unimplemented,
                    "{path}: {status:?}"
                );
            }
        }
    }

    /// A batch that between its flows uses every part of the model: both address families, NAT
    /// (replies that are not the inverse of the original), each protocol state, zones, and the
    /// rare attributes (labels, helper, master, sequence adjustment, SYN proxy).
    fn rich_batch(seq: u64) -> Message {
        use crate::flow::{
            proto, Flow, ProtoInfo, SeqAdj, SeqAdjDir, Synproxy, TcpInfo, Tuple, Zone, ZoneDir, L4,
        };
        use std::net::IpAddr;
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for i in 0..240u16 {
            let v6 = i % 2 == 1;
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                (
                    format!("2001:db8::{i:x}").parse().unwrap(),
                    "2001:db8:1::1".parse().unwrap(),
                )
            } else {
                (
                    [10, 0, (i >> 8) as u8, i as u8].into(),
                    [192, 0, 2, 1].into(),
                )
            };
            let ports = L4::Ports {
                src: 1024 + i,
                dst: 443,
            };
            let (p, l4, info) = match i % 7 {
                0 => (
                    proto::TCP,
                    ports,
                    ProtoInfo::Tcp(TcpInfo {
                        state: 3,
                        wscale_orig: 7,
                        wscale_reply: 8,
                        flags_orig: 0x23,
                        flags_reply: 0x33,
                    }),
                ),
                1 => (proto::UDP, ports, ProtoInfo::None),
                2 => (
                    if v6 { proto::ICMPV6 } else { proto::ICMP },
                    L4::Icmp {
                        id: i,
                        kind: if v6 { 128 } else { 8 },
                        code: 0,
                    },
                    ProtoInfo::None,
                ),
                3 => (
                    proto::SCTP,
                    ports,
                    ProtoInfo::Sctp {
                        state: 3,
                        vtag_orig: 0xdead_0000 | u32::from(i),
                        vtag_reply: 0xbeef_0000 | u32::from(i),
                    },
                ),
                4 => (
                    proto::DCCP,
                    ports,
                    ProtoInfo::Dccp {
                        state: 2,
                        role: 1,
                        handshake_seq: 1 << 40 | u64::from(i),
                    },
                ),
                5 => (proto::GRE, ports, ProtoInfo::None),
                _ => (50, L4::None, ProtoInfo::None), // ESP: addresses only
            };
            let orig = Tuple {
                src,
                dst,
                proto: p,
                l4,
            };
            let mut reply = orig.inverse();
            if i % 3 == 0 {
                // Source NAT: the reply comes back to the translated address and port.
                reply.dst = if v6 {
                    "2001:db8:ffff::7".parse().unwrap()
                } else {
                    [203, 0, 113, 7].into()
                };
                if let L4::Ports { dst, .. } = &mut reply.l4 {
                    *dst = 30000 + i;
                }
            }
            let dir = [ZoneDir::Both, ZoneDir::Original, ZoneDir::Reply][usize::from(i % 3)];
            let mut f = Flow::new(Zone { id: i % 4, dir }, orig, reply);
            f.status = 0x18e;
            f.timeout = 120 + u32::from(i);
            f.mark = u32::from(i) * 7;
            f.set_protoinfo(info);
            if i % 5 == 0 {
                f.set_labels(1 << (i % 128) | 1);
                f.set_helper(Some("ftp".into()));
                f.set_master(Some(orig.inverse()));
                let adj = SeqAdjDir {
                    correction_pos: u32::from(i),
                    offset_before: 1,
                    offset_after: 2,
                };
                f.set_seq_adj(Some(SeqAdj {
                    orig: adj,
                    reply: adj,
                }));
                f.set_synproxy(Some(Synproxy {
                    isn: 1,
                    its: 2,
                    tsoff: 3,
                }));
            }
            if i % 11 == 0 {
                deletes.push((u64::from(i), f.key));
            } else {
                upserts.push((1000 + u64::from(i), f));
            }
        }
        let msg = Message::Batch(Batch {
            epoch: 7,
            seq,
            upserts,
            deletes,
        });
        assert_eq!(wire::decode(wire::encode(&msg)), Ok(msg.clone()));
        msg
    }

    /// One message of each kind.
    fn every_kind() -> Vec<Message> {
        vec![
            hello("a"),
            rich_batch(1),
            Message::Ack { epoch: 7, seq: 1 },
            Message::ResyncRequest {
                reason: "gap".into(),
            },
            Message::SnapshotBegin {
                epoch: 7,
                seq: 2,
                id: 9,
            },
            rich_batch(3),
            Message::SnapshotEnd {
                epoch: 7,
                seq: 4,
                id: 9,
                flows: 200,
            },
            Message::Heartbeat {
                epoch: 7,
                sent_unix_ms: 1_700_000_000_000,
            },
        ]
    }

    #[tokio::test]
    async fn generated_client_interoperates_with_our_server() {
        let mut b = node(config("b", &[("a", "x:1".into())], None)).await;
        let (tx, mut inbound) = raw_stream(b.t.local_addr(), None, wire::encode(&hello("a")))
            .await
            .unwrap();
        let conn = expect_connected(&mut b.rx, "a").await;
        let sent = every_kind();
        for m in &sent[1..] {
            tx.send(wire::encode(m)).await.unwrap();
        }
        for m in &sent {
            assert_eq!(&expect_message(&mut b.rx, "a", conn).await, m);
        }
        let mut answers = every_kind();
        answers[0] = hello("b");
        for m in &answers {
            b.t.send("a", m.clone()).unwrap();
        }
        for m in answers {
            let got = tokio::time::timeout(WAIT, inbound.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(wire::decode(got), Ok(m));
        }
    }

    /// The generated server: echoes every message, and hands a copy to the test.
    struct Echo(mpsc::UnboundedSender<pb::PeerMessage>);

    #[tonic::async_trait]
    impl pb::peer_sync_server::PeerSync for Echo {
        type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::PeerMessage, Status>> + Send>>;

        async fn sync(
            &self,
            request: Request<Streaming<pb::PeerMessage>>,
        ) -> Result<Response<Self::SyncStream>, Status> {
            let seen = self.0.clone();
            let echo = request.into_inner().map(move |m| {
                if let Ok(m) = &m {
                    let _ = seen.send(m.clone());
                }
                m
            });
            Ok(Response::new(Box::pin(echo)))
        }
    }

    /// Starts a generated `PeerSyncServer` (prost codec) on loopback.
    async fn prost_server() -> (SocketAddr, mpsc::UnboundedReceiver<pb::PeerMessage>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let svc = pb::peer_sync_server::PeerSyncServer::new(Echo(tx));
        tokio::spawn(Server::builder().serve_with_incoming(svc, TcpIncoming::from(listener)));
        (addr, rx)
    }

    #[tokio::test]
    async fn our_client_interoperates_with_the_generated_server() {
        let (addr, mut seen) = prost_server().await;
        let sent = every_kind();
        let mut inbound = codec::open_sync(
            plain_channel(addr).await,
            tokio_stream::iter(sent.clone()),
            MAX_MESSAGE_BYTES,
        )
        .await
        .unwrap()
        .into_inner();
        for m in &sent {
            let got = tokio::time::timeout(WAIT, seen.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&wire::decode(got), &Ok(m.clone()));
            let echoed = tokio::time::timeout(WAIT, inbound.message())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(echoed, Some(Ok(m.clone())));
        }
        let end = tokio::time::timeout(WAIT, inbound.message()).await.unwrap();
        assert!(matches!(end, Ok(None)), "{end:?}");
    }
}
