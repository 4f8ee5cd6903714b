//! Replication glue: drives the sans-IO [`Engine`] with the gRPC transport and a clock.
//!
//! Lives inside the daemon's state task, next to the mirror it reads flows from, so that the
//! engine reads each flow's current state at send time without any lock.

use crate::cache::{Change, FlowTable};
use crate::config::{Config, SyncConfig};
use crate::control::{ExternalEntry, SyncStatus};
use crate::sync::{Engine, EngineConfig};
use crate::transport::grpc::{
    self, PeerAddr, TlsFiles, Transport, TransportConfig, TransportEvent,
};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The transport could not be started.
#[derive(Debug, thiserror::Error)]
#[error("sync transport: {0}")]
pub struct ReplicationError(String);

/// Slack before a refreshed timeout is re-announced to peers.
const TIMEOUT_SLACK: Duration = Duration::from_secs(10);

/// Engine, transport and the messages the transport could not take yet.
pub struct Replication {
    engine: Engine,
    transport: Transport,
    clock: Instant,
    cfg: SyncConfig,
    /// The live connection of each peer: events of older connections still in the channel
    /// after a reconnect must not be taken for the new one's.
    conns: std::collections::HashMap<String, u64>,
}

impl Replication {
    /// Starts the transport; its events arrive on the returned receiver.
    pub async fn start(
        cfg: &Config,
        sync: &SyncConfig,
        table: &FlowTable,
        clock: Instant,
    ) -> Result<(Replication, mpsc::Receiver<TransportEvent>), ReplicationError> {
        let peers: Vec<String> = sync.peers.iter().map(|p| p.node_id.clone()).collect();
        let epoch = random_epoch();
        let mut ecfg = EngineConfig::new(&sync.cluster, &cfg.node_id, epoch, peers);
        ecfg.ready_timeout = sync.ready_timeout;
        let now = clock.elapsed();
        let mut engine = Engine::new(ecfg, now);
        engine.index_all(table, now);
        let tcfg = TransportConfig {
            node_id: cfg.node_id.clone(),
            listen: sync.listen,
            peers: sync
                .peers
                .iter()
                .map(|p| PeerAddr {
                    node_id: p.node_id.clone(),
                    address: p.address.clone(),
                })
                .collect(),
            tls: sync.tls.as_ref().map(|t| TlsFiles {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            connect_timeout: Duration::from_secs(2),
            backoff_max: Duration::from_secs(2),
        };
        let (tx, rx) = mpsc::channel(1024);
        let transport = grpc::start(tcfg, tx)
            .await
            .map_err(|e| ReplicationError(e.to_string()))?;
        tracing::info!(
            cluster = %sync.cluster,
            epoch,
            listen = %sync.listen,
            peers = sync.peers.len(),
            "replication started"
        );
        let repl = Replication {
            engine,
            transport,
            clock,
            cfg: sync.clone(),
            conns: std::collections::HashMap::new(),
        };
        Ok((repl, rx))
    }

    /// The engine clock.
    pub fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Flows learnt from peers.
    pub fn external(&self) -> &crate::sync::ExternalCache {
        self.engine.external()
    }

    /// Replicated changes since the last call (continuous injection must be enabled).
    pub fn take_external_changes(&mut self) -> Vec<crate::sync::ExternalChange> {
        self.engine.external_mut().take_changes()
    }

    /// Records external changes from now on, for continuous injection.
    pub fn track_external_changes(&mut self) {
        self.engine.external_mut().track_changes(true);
    }

    /// Empties the external cache and asks peers for snapshots to fill it again.
    pub fn flush_external(&mut self) {
        self.engine.external_mut().clear();
        self.engine
            .request_resync_all("peer flushed its external cache");
    }

    /// Asks every connected peer for a snapshot.
    pub fn request_resync_all(&mut self, reason: &str) {
        self.engine.request_resync_all(reason);
    }

    /// Sends every flow of `table` to every peer again.
    pub fn resend_all(&mut self, table: &FlowTable) {
        let now = self.now();
        self.engine.resend_all(table, now);
    }

    /// A change of the internal cache, at engine time `now` (from [`Replication::now`]; one
    /// reading serves a whole batch of events: the index keeps whole seconds, and a clock read
    /// per event was a measurable share of the event path).
    pub fn local_change(&mut self, change: &Change, table: &FlowTable, now: Duration) {
        self.engine.local_change(change, table, now);
    }

    /// A fresh dump was applied: re-announce flows whose timeouts were extended.
    pub fn after_dump(&mut self, table: &FlowTable) {
        let now = self.now();
        let n = self.engine.refresh_timeouts(table, now, TIMEOUT_SLACK);
        if n > 0 {
            tracing::debug!(flows = n, "timeouts refreshed towards peers");
        }
    }

    /// How often the kernel table is re-read for timeouts.
    pub fn refresh_interval(&self) -> Duration {
        self.cfg.timeout_refresh
    }

    /// Applies a transport event.
    pub fn transport_event(&mut self, ev: TransportEvent) {
        let now = self.now();
        match ev {
            TransportEvent::Connected { peer, conn } => {
                self.conns.insert(peer.clone(), conn);
                if let Err(e) = self.engine.connected(&peer, now) {
                    tracing::warn!(%peer, error = %e, "refusing peer");
                    self.transport.disconnect(&peer);
                } else {
                    tracing::info!(%peer, "peer connected");
                }
            }
            TransportEvent::Message { peer, conn, .. } if self.conns.get(&peer) != Some(&conn) => {
                tracing::debug!(%peer, conn, "message of a replaced connection dropped");
            }
            TransportEvent::Message { peer, msg, .. } => {
                if let Err(e) = self.engine.handle(&peer, msg, now) {
                    tracing::warn!(%peer, error = %e, "dropping peer connection");
                    self.engine.disconnected(&peer, now);
                    self.transport.disconnect(&peer);
                }
            }
            TransportEvent::Disconnected { peer, conn, .. }
                if self.conns.get(&peer) != Some(&conn) =>
            {
                tracing::debug!(%peer, conn, "end of a replaced connection");
            }
            TransportEvent::Disconnected { peer, reason, .. } => {
                self.conns.remove(&peer);
                tracing::info!(%peer, %reason, "peer disconnected");
                self.engine.disconnected(&peer, now);
            }
        }
    }

    /// Timers: heartbeats, retransmissions, dead peers.
    pub fn tick(&mut self) {
        let now = self.now();
        for peer in self.engine.handle_timeout(now) {
            tracing::warn!(%peer, "peer silent for too long; dropping its connection");
            self.transport.disconnect(&peer);
        }
    }

    /// Moves every due message from the engine to the transport, as far as each peer's
    /// transport queue has room (the rest stays due in the engine: back-pressure, not loss).
    pub fn pump(&mut self, table: &FlowTable) {
        let now = self.now();
        for peer in self.cfg.peers.iter().map(|p| p.node_id.as_str()) {
            let mut room = self.transport.capacity(peer).unwrap_or(0);
            while room > 0 {
                let Some(msg) = self.engine.poll_transmit(peer, table, now) else {
                    break;
                };
                if let Err(e) = self.transport.send(peer, msg) {
                    // Lost with the connection: the engine re-sends after the reconnect.
                    tracing::debug!(peer, error = ?e, "message not sent");
                    break;
                }
                room -= 1;
            }
        }
    }

    /// Whether every peer delivered its snapshot or has been unreachable past the bound.
    pub fn is_ready(&self) -> bool {
        self.engine.is_ready(self.now())
    }

    /// Replication state for `syncctl status`.
    pub fn status(&self) -> SyncStatus {
        let now = self.now();
        SyncStatus {
            cluster: self.cfg.cluster.clone(),
            epoch: self.engine.epoch(),
            listen: self.cfg.listen.to_string(),
            peers_ready: self.engine.is_ready(now),
            external_flows: self.engine.external().len(),
            security: if self.cfg.tls.is_some() {
                "mutual-tls".into()
            } else {
                "PLAINTEXT".into()
            },
            peers: self.engine.peer_status(now),
        }
    }

    /// The external cache for `syncctl dump external`.
    pub fn external_dump(&self) -> Vec<ExternalEntry> {
        let now = self.now();
        let mut out = Vec::with_capacity(self.engine.external().len());
        for (origin, cache) in self.engine.external().origins() {
            out.extend(cache.iter().map(|e| ExternalEntry {
                origin: origin.clone(),
                version: e.version,
                age_secs: now.saturating_sub(e.received_at).as_secs(),
                remaining_timeout: e.remaining_timeout(now),
                flow: e.flow.clone(),
            }));
        }
        out
    }

    /// Stops the transport.
    pub async fn shutdown(self) {
        self.transport.shutdown().await;
    }
}

/// A random, non-zero epoch: tells peers that this is a new daemon start.
fn random_epoch() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let mut epoch = u64::from_ne_bytes(buf);
    if n != 8 {
        // No entropy source: time and pid still differ between two starts.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        epoch = t ^ (u64::from(std::process::id()) << 32);
    }
    epoch.max(1)
}
