//! The local control socket: what `syncctl` asks and what `ctsyncd` answers.
//!
//! One request per connection, as a JSON line. The answer is a JSON header line
//! (`{"ok":true}` or `{"ok":false,"error":"…"}`) followed by the JSON body until the daemon
//! closes the connection: large dumps stream without being parsed twice, and `syncctl --json`
//! prints the body as it comes.

use crate::flow::Flow;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Node, kernel mirror and cache state.
    Status,
    /// Every flow of a cache.
    Dump {
        /// Which cache.
        cache: CacheName,
    },
    /// Counters only.
    Stats,
    /// Writes the external cache into the kernel; answers when done.
    Commit,
    /// Becomes primary: commit, rebuild the internal cache from the kernel, send it all to peers.
    Promote,
    /// Becomes backup: ask peers for snapshots, purge our own flows after the delay.
    Demote,
    /// Empties a cache.
    Flush {
        /// Which cache.
        cache: CacheName,
    },
    /// Re-reads the internal cache from the kernel.
    Resync,
    /// Asks every peer for a full snapshot.
    RequestResync,
    /// Sends every flow of the internal cache to every peer again.
    BulkSend,
}

/// The caches a node keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheName {
    /// The mirror of the local kernel table.
    Internal,
    /// Flows learnt from peers.
    External,
}

/// The header line of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Whether the request succeeded; the body follows only then.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// This node's name.
    pub node_id: String,
    /// Daemon version.
    pub version: String,
    /// Daemon process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: f64,
    /// The kernel mirror.
    pub kernel: KernelStatus,
    /// The internal cache.
    pub internal_cache: CacheStatus,
    /// Replication, when configured.
    pub sync: Option<SyncStatus>,
    /// The node is ready to take over: its mirror is synced and every peer delivered its
    /// snapshot (or has been unreachable for longer than the readiness bound).
    pub ready: bool,
    /// Role, commits, injections and purges.
    pub failover: crate::failover::FailoverStatus,
}

/// Replication part of [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Cluster name.
    pub cluster: String,
    /// This daemon start's epoch.
    pub epoch: u64,
    /// Address the sync service listens on.
    pub listen: String,
    /// Whether peers deliver their snapshots (see `ready` for the whole node).
    pub peers_ready: bool,
    /// Flows learnt from peers, all origins.
    pub external_flows: usize,
    /// Transport security: `mutual-tls` or `PLAINTEXT`.
    pub security: String,
    /// Each peer.
    pub peers: Vec<crate::sync::PeerStatus>,
}

/// One entry of `dump external`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalEntry {
    /// The node the flow belongs to.
    pub origin: String,
    /// The origin's change counter for it.
    pub version: u64,
    /// Seconds since it was received.
    pub age_secs: u64,
    /// Timeout left now (sent timeout minus age).
    pub remaining_timeout: u32,
    /// The flow as the origin sent it.
    pub flow: Flow,
}

/// Kernel mirror part of [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelStatus {
    /// The mirror equals the kernel table: initial dump done, no overrun pending.
    pub synced: bool,
    /// A reconciliation dump is running.
    pub dump_running: bool,
    /// Flows mirrored.
    pub flows: usize,
    /// Receive buffer the kernel granted to the event socket.
    pub event_buffer_bytes: usize,
    /// Duration of the last reconciliation dump, in milliseconds.
    pub last_dump_ms: Option<f64>,
    /// Counters.
    pub stats: crate::cache::MirrorStats,
}

/// Cache part of [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// Flows held.
    pub flows: usize,
    /// Heap bytes used by the table.
    pub heap_bytes: usize,
    /// Local changes that the replication layer will send.
    pub changes: u64,
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The daemon cannot be reached.
    #[error("cannot connect to ctsyncd at {path} (is ctsyncd running, and is this the socket of its config?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon's answer is not what this client understands.
    #[error("unexpected answer from ctsyncd: {0}")]
    Protocol(String),
    /// The daemon refused the request.
    #[error("ctsyncd: {0}")]
    Refused(String),
}

/// Sends a request and returns the answer body (JSON text).
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<String, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let header: Header = serde_json::from_str(&head)
        .map_err(|e| ControlError::Protocol(format!("{e}: {:?}", head.trim_end())))?;
    if !header.ok {
        return Err(ControlError::Refused(
            header.error.unwrap_or_else(|| "request failed".into()),
        ));
    }
    let mut body = String::new();
    reader.read_to_string(&mut body)?;
    Ok(body)
}

/// Parses a dump body.
pub fn parse_flows(body: &str) -> Result<Vec<Flow>, ControlError> {
    serde_json::from_str(body).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// Parses an external dump body.
pub fn parse_external(body: &str) -> Result<Vec<ExternalEntry>, ControlError> {
    serde_json::from_str(body).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// Parses a status body.
pub fn parse_status(body: &str) -> Result<StatusReport, ControlError> {
    serde_json::from_str(body).map_err(|e| ControlError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::Dump {
            cache: CacheName::Internal,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"dump","cache":"internal"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }

    #[test]
    fn unreachable_daemon_is_a_clear_error() {
        let err = request(
            Path::new("/nonexistent/ctsync.sock"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is ctsyncd running"), "{err}");
    }
}

/// What the daemon answers to one request, before serialisation.
#[derive(Debug)]
pub enum Reply {
    /// Answer to [`Request::Status`].
    Status(Box<StatusReport>),
    /// Answer to [`Request::Dump`] of the internal cache.
    Flows(Vec<Flow>),
    /// Answer to [`Request::Dump`] of the external cache.
    External(Vec<ExternalEntry>),
    /// Any other answer.
    Value(serde_json::Value),
    /// The request could not be served.
    Error(String),
}

/// A request handed to the daemon's state owner, with the way back.
pub type Call = (Request, tokio::sync::oneshot::Sender<Reply>);

/// Binds the control socket with owner-only permissions, refusing to steal a live daemon's.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts control connections until the task is dropped, forwarding each request to `calls`.
pub async fn serve(listener: tokio::net::UnixListener, calls: tokio::sync::mpsc::Sender<Call>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, calls.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: tokio::net::UnixStream, calls: tokio::sync::mpsc::Sender<Call>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read);
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => dispatch(req, &calls).await,
            Err(e) => Reply::Error(format!("bad request: {e}")),
        },
        Ok(Err(e)) => Reply::Error(format!("read error: {e}")),
        Err(_) => Reply::Error("timed out waiting for the request".into()),
    };
    // A dump can take a while to serialise and must not hold the runtime; anything else is
    // small, and a hand-off to the blocking pool would cost more than rendering it here (a
    // benchmark polls `stats` every few milliseconds).
    let bytes = if matches!(reply, Reply::Flows(_) | Reply::External(_)) {
        match tokio::task::spawn_blocking(move || render(reply)).await {
            Ok(b) => b,
            Err(e) => header_line(Some(format!("internal error: {e}"))),
        }
    } else {
        render(reply)
    };
    if let Err(e) = write.write_all(&bytes).await {
        tracing::debug!(error = %e, "control client went away");
    }
    let _ = write.shutdown().await;
}

async fn dispatch(req: Request, calls: &tokio::sync::mpsc::Sender<Call>) -> Reply {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if calls.send((req, tx)).await.is_err() {
        return Reply::Error("daemon is shutting down".into());
    }
    rx.await
        .unwrap_or_else(|_| Reply::Error("daemon is shutting down".into()))
}

/// Serialises an answer: header line, then body.
fn render(reply: Reply) -> Vec<u8> {
    let body = match &reply {
        Reply::Status(s) => serde_json::to_vec_pretty(s),
        Reply::Flows(f) => serde_json::to_vec(f),
        Reply::External(f) => serde_json::to_vec(f),
        Reply::Value(v) => serde_json::to_vec_pretty(v),
        Reply::Error(e) => return header_line(Some(e.clone())),
    };
    match body {
        Ok(mut body) => {
            let mut out = header_line(None);
            out.append(&mut body);
            out.push(b'\n');
            out
        }
        Err(e) => header_line(Some(format!("cannot serialise answer: {e}"))),
    }
}

fn header_line(error: Option<String>) -> Vec<u8> {
    let header = Header {
        ok: error.is_none(),
        error,
    };
    let mut line = serde_json::to_vec(&header).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    line
}
