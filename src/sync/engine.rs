//! The sync engine: one per node, one outbound and one inbound state per peer.
//!
//! Outbound, each peer is a cursor into the [`ChangeIndex`] plus the messages in flight (sent,
//! not yet acknowledged). A lost or unacknowledged batch is re-sent from the index, in the flows'
//! current state. On reconnect the engine resumes from the last acknowledged point when the peer
//! still holds our epoch's stream; otherwise, and whenever deletions were forgotten, it sends a
//! snapshot. Inbound, messages are applied to the peer's [`OriginCache`] and acknowledged.
//!
//! The engine never sees sockets or clocks: the caller passes `now` (a monotonic time since any
//! origin) and moves messages between [`Engine::poll_transmit`] and the transport.

use super::external::{Applied, ExternalCache};
use super::index::ChangeIndex;
use super::message::{Batch, Hello, Message, VERSION_MAJOR, VERSION_MINOR};
use crate::cache::{Change, FlowTable};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Cluster name; peers of other clusters are refused.
    pub cluster: String,
    /// This node's id.
    pub node_id: String,
    /// This daemon start's epoch (random, non-zero).
    pub epoch: u64,
    /// Configured peer node ids.
    pub peers: Vec<String>,
    /// Flows per batch.
    pub batch_flows: usize,
    /// Messages in flight (unacknowledged) per peer.
    pub window: usize,
    /// A message unacknowledged this long is re-sent.
    pub retransmit_after: Duration,
    /// Idle streams carry a heartbeat this often.
    pub heartbeat_every: Duration,
    /// A peer silent this long is declared dead.
    pub dead_after: Duration,
    /// A peer unreachable this long no longer holds back readiness.
    pub ready_timeout: Duration,
    /// Tombstones kept for lagging peers before they are sent to a snapshot instead.
    pub tombstone_limit: usize,
}

impl EngineConfig {
    /// Settings with the defaults for everything but identity and peers.
    pub fn new(cluster: &str, node_id: &str, epoch: u64, peers: Vec<String>) -> EngineConfig {
        EngineConfig {
            cluster: cluster.into(),
            node_id: node_id.into(),
            epoch,
            peers,
            batch_flows: 512,
            window: 32,
            retransmit_after: Duration::from_secs(1),
            heartbeat_every: Duration::from_millis(500),
            dead_after: Duration::from_secs(3),
            ready_timeout: Duration::from_secs(10),
            tombstone_limit: 1 << 20,
        }
    }
}

/// Why a peer's message was refused; the caller drops the connection and logs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer belongs to another cluster.
    #[error("peer {peer} belongs to cluster {theirs:?}, we are {ours:?}")]
    OtherCluster {
        /// Peer.
        peer: String,
        /// Its cluster.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The peer speaks an unknown major protocol version.
    #[error("peer {peer} speaks protocol {major}.x, we speak {VERSION_MAJOR}.x")]
    Version {
        /// Peer.
        peer: String,
        /// Its major version.
        major: u32,
    },
    /// The peer is not configured.
    #[error("{0} is not a configured peer")]
    UnknownPeer(String),
    /// The Hello names another node than the connection belongs to.
    #[error("connection of {expected} says it is {got}")]
    Impostor {
        /// Node the transport authenticated.
        expected: String,
        /// Node the Hello names.
        got: String,
    },
    /// A message arrived before the Hello.
    #[error("peer {0} sent data before its Hello")]
    NoHello(String),
}

/// What an in-flight message stands for, to re-send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Index versions `(from, to]`.
    Range {
        from: u64,
        to: u64,
    },
    SnapshotBegin(u64),
    SnapshotEnd(u64),
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
    what: Sent,
    sent_at: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Snapshot {
    /// Begin sent, waiting for its ack before any data.
    Begin(u64),
    /// Data being sent from version 0; end when caught up and all acknowledged.
    Data(u64),
    /// End sent, waiting for its ack.
    End(u64),
}

/// Per-peer state.
#[derive(Debug)]
struct Peer {
    id: String,
    connected: bool,
    hello_seen: bool,
    /// When the current connection (or the engine) started, or the peer went down.
    since: Duration,
    last_rx: Duration,
    last_tx: Duration,
    next_seq: u64,
    cursor: u64,
    in_flight: VecDeque<InFlight>,
    /// Control messages to send before anything else (acks, hello, resync requests).
    control: VecDeque<Message>,
    snapshot: Option<Snapshot>,
    snapshot_wanted: bool,
    next_snapshot_id: u64,
    /// Highest sequence of ours the peer acknowledged contiguously.
    acked_seq: u64,
    /// Their epoch, from their Hello.
    their_epoch: u64,
    /// Whether this peer delivered a snapshot of its current epoch (or resumed one).
    synced: bool,
    snapshots_sent: u64,
    retransmits: u64,
}

impl Peer {
    fn new(id: &str, now: Duration) -> Peer {
        Peer {
            id: id.into(),
            connected: false,
            hello_seen: false,
            since: now,
            last_rx: now,
            last_tx: now,
            next_seq: 1,
            cursor: 0,
            in_flight: VecDeque::new(),
            control: VecDeque::new(),
            snapshot: None,
            snapshot_wanted: true,
            next_snapshot_id: 1,
            acked_seq: 0,
            their_epoch: 0,
            synced: false,
            snapshots_sent: 0,
            retransmits: 0,
        }
    }

    /// Lowest version not yet known to be at the peer.
    fn acked_version(&self) -> u64 {
        let oldest = self.in_flight.iter().find_map(|f| match f.what {
            Sent::Range { from, .. } => Some(from),
            _ => None,
        });
        match (self.snapshot, oldest) {
            (Some(_), _) => 0,
            (None, Some(from)) => from.min(self.cursor),
            (None, None) => self.cursor,
        }
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Forgets what is in flight and rewinds the cursor so that it is all sent again, in the
    /// flows' current state. A snapshot in progress goes on; only its lost markers are redone.
    fn rewind(&mut self) {
        for f in self.in_flight.drain(..) {
            match f.what {
                Sent::Range { from, .. } => self.cursor = self.cursor.min(from),
                // Nothing was sent after an unacknowledged begin: start the snapshot over.
                Sent::SnapshotBegin(_) => {
                    self.snapshot = None;
                    self.snapshot_wanted = true;
                }
                Sent::SnapshotEnd(id) => self.snapshot = Some(Snapshot::Data(id)),
            }
        }
    }
}

/// A peer's state for `syncctl status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// Peer node id.
    pub node_id: String,
    /// `connected`, `connecting` or `down`.
    pub state: String,
    /// The peer's epoch (0 before its Hello).
    pub epoch: u64,
    /// Highest sequence of ours it acknowledged contiguously.
    pub acked_seq: u64,
    /// Changes of ours it has not acknowledged yet.
    pub lag_changes: u64,
    /// Age of our oldest unacknowledged message, in seconds.
    pub lag_secs: f64,
    /// Whether it delivered a full snapshot of its flows to us.
    pub synced: bool,
    /// Flows of its origin in our external cache.
    pub external_flows: usize,
    /// Snapshots we sent it.
    pub snapshots_sent: u64,
    /// Messages re-sent to it.
    pub retransmits: u64,
}

/// The replication engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    index: ChangeIndex,
    peers: BTreeMap<String, Peer>,
    external: ExternalCache,
    started: Duration,
}

impl Engine {
    /// A new engine; `now` starts the readiness clock.
    pub fn new(cfg: EngineConfig, now: Duration) -> Engine {
        let peers = cfg
            .peers
            .iter()
            .map(|p| (p.clone(), Peer::new(p, now)))
            .collect();
        Engine {
            cfg,
            index: ChangeIndex::new(),
            peers,
            external: ExternalCache::default(),
            started: now,
        }
    }

    /// This node's epoch.
    pub fn epoch(&self) -> u64 {
        self.cfg.epoch
    }

    /// Flows learnt from peers.
    pub fn external(&self) -> &ExternalCache {
        &self.external
    }

    /// Flows learnt from peers, for flushes.
    pub fn external_mut(&mut self) -> &mut ExternalCache {
        &mut self.external
    }

    /// Asks every connected peer for a full snapshot (after a demotion, or by the operator).
    pub fn request_resync_all(&mut self, reason: &str) {
        for p in self.peers.values_mut().filter(|p| p.connected) {
            p.control.push_back(Message::ResyncRequest {
                reason: reason.into(),
            });
        }
    }

    /// Whether peers must learn every flow again: re-index the whole table (bulk send).
    pub fn resend_all(&mut self, table: &FlowTable, now: Duration) {
        self.index_all(table, now);
    }

    /// Records a change of the internal cache (never one caused by our own writes).
    pub fn local_change(&mut self, change: &Change, table: &FlowTable, now: Duration) {
        let secs = now.as_secs();
        match change {
            Change::Upsert(key) => {
                let timeout = table.get(key).map_or(0, |f| f.timeout);
                self.index.touch(*key, false, timeout, secs);
            }
            Change::Remove(key) => {
                self.index.touch(*key, true, 0, secs);
            }
        }
    }

    /// Re-announces flows whose kernel timeout was extended (the kernel sends no event for
    /// that), so that peers commit them with a timeout that is still right. Call after a
    /// periodic dump; returns how many were re-announced.
    pub fn refresh_timeouts(&mut self, table: &FlowTable, now: Duration, slack: Duration) -> usize {
        let secs = now.as_secs();
        let stale: Vec<_> = table
            .iter()
            .filter(|f| {
                self.index
                    .timeout_stale(&f.key, f.timeout, secs, slack.as_secs())
            })
            .map(|f| (f.key, f.timeout))
            .collect();
        for (key, timeout) in &stale {
            self.index.touch(*key, false, *timeout, secs);
        }
        stale.len()
    }

    /// Indexes every flow of the table (at start, and when our own table was rebuilt).
    pub fn index_all(&mut self, table: &FlowTable, now: Duration) {
        for f in table.iter() {
            self.index.touch(f.key, false, f.timeout, now.as_secs());
        }
    }

    /// A connection to `peer` is up: queue our Hello.
    pub fn connected(&mut self, peer: &str, now: Duration) -> Result<(), PeerError> {
        let hello = self.hello_for(peer)?;
        let p = self.peer_mut(peer)?;
        p.connected = true;
        p.hello_seen = false;
        p.since = now;
        p.last_rx = now;
        p.rewind();
        p.control.clear();
        p.control.push_back(Message::Hello(hello));
        Ok(())
    }

    /// The connection to `peer` is gone.
    pub fn disconnected(&mut self, peer: &str, now: Duration) {
        if let Some(p) = self.peers.get_mut(peer) {
            if p.connected {
                p.since = now;
            }
            p.connected = false;
            p.hello_seen = false;
            p.rewind();
            p.control.clear();
        }
    }

    fn hello_for(&self, peer: &str) -> Result<Hello, PeerError> {
        let origin = self.external.origin(peer);
        Ok(Hello {
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            cluster: self.cfg.cluster.clone(),
            node_id: self.cfg.node_id.clone(),
            epoch: self.cfg.epoch,
            // We only claim to hold a peer's stream once we have had its snapshot.
            have_epoch: origin
                .filter(|o| o.snapshots_completed() > 0)
                .map_or(0, |o| o.epoch()),
            have_seq: origin.map_or(0, |o| o.contiguous_seq()),
        })
    }

    fn peer_mut(&mut self, peer: &str) -> Result<&mut Peer, PeerError> {
        self.peers
            .get_mut(peer)
            .ok_or_else(|| PeerError::UnknownPeer(peer.into()))
    }

    /// Handles a message from `peer`. An error means the connection must be dropped.
    pub fn handle(&mut self, peer: &str, msg: Message, now: Duration) -> Result<(), PeerError> {
        let epoch = self.cfg.epoch;
        let p = self.peer_mut(peer)?;
        p.last_rx = now;
        if let Message::Hello(h) = msg {
            return self.hello(peer, h, now);
        }
        if !p.hello_seen {
            return Err(PeerError::NoHello(peer.into()));
        }
        match msg {
            Message::Hello(_) => unreachable!("handled above"),
            Message::Ack { epoch: e, seq } => {
                if e == epoch {
                    self.ack(peer, seq);
                }
            }
            Message::ResyncRequest { reason } => {
                tracing::info!(peer, %reason, "peer asked for a snapshot");
                let p = self.peer_mut(peer)?;
                p.rewind();
                p.snapshot = None;
                p.snapshot_wanted = true;
            }
            Message::Batch(b) => {
                let (epoch, seq) = (b.epoch, b.seq);
                let verdict = self.external.origin_mut(peer).apply_batch(b, now);
                self.ack_back(peer, epoch, seq, verdict);
            }
            Message::SnapshotBegin { epoch, seq, id } => {
                let verdict = self
                    .external
                    .origin_mut(peer)
                    .snapshot_begin(epoch, seq, id);
                self.ack_back(peer, epoch, seq, verdict);
            }
            Message::SnapshotEnd {
                epoch,
                seq,
                id,
                flows,
            } => {
                let origin = self.external.origin_mut(peer);
                let (verdict, removed) = origin.snapshot_end(epoch, seq, id);
                let held = origin.len() as u64;
                if verdict == Applied::Applied {
                    tracing::info!(peer, flows = held, removed, "snapshot from peer complete");
                    if held != flows {
                        tracing::warn!(peer, held, sent = flows, "snapshot flow count differs");
                    }
                    self.peer_mut(peer)?.synced = true;
                }
                self.ack_back(peer, epoch, seq, verdict);
            }
            Message::Heartbeat { .. } => {}
        }
        Ok(())
    }

    fn hello(&mut self, peer: &str, h: Hello, now: Duration) -> Result<(), PeerError> {
        if h.node_id != peer {
            return Err(PeerError::Impostor {
                expected: peer.into(),
                got: h.node_id,
            });
        }
        if h.cluster != self.cfg.cluster {
            return Err(PeerError::OtherCluster {
                peer: peer.into(),
                theirs: h.cluster,
                ours: self.cfg.cluster.clone(),
            });
        }
        if h.version_major != VERSION_MAJOR {
            return Err(PeerError::Version {
                peer: peer.into(),
                major: h.version_major,
            });
        }
        let our_epoch = self.cfg.epoch;
        let origin = self.external.origin_mut(peer);
        let restarted = origin.epoch() != h.epoch;
        origin.set_epoch(h.epoch);
        let p = self.peer_mut(peer)?;
        p.hello_seen = true;
        p.last_rx = now;
        if restarted {
            p.synced = false;
        }
        p.their_epoch = h.epoch;
        // Everything the peer acknowledged is in its external cache as long as it still follows
        // our epoch (it forgets it only by restarting, which its Hello shows): resume from there.
        if h.have_epoch != our_epoch {
            p.rewind();
            p.cursor = 0;
            p.snapshot = None;
            p.snapshot_wanted = true;
        }
        Ok(())
    }

    fn ack_back(&mut self, peer: &str, epoch: u64, seq: u64, verdict: Applied) {
        if verdict == Applied::StaleEpoch {
            return;
        }
        if let Some(p) = self.peers.get_mut(peer) {
            p.control.push_back(Message::Ack { epoch, seq });
        }
    }

    fn ack(&mut self, peer: &str, seq: u64) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let Some(pos) = p.in_flight.iter().position(|f| f.seq == seq) else {
            return;
        };
        let done = p.in_flight.remove(pos).map(|f| f.what);
        p.acked_seq = p.in_flight.front().map_or(p.next_seq - 1, |f| f.seq - 1);
        match (p.snapshot, done) {
            (Some(Snapshot::Begin(id)), Some(Sent::SnapshotBegin(x))) if id == x => {
                p.snapshot = Some(Snapshot::Data(id));
            }
            (Some(Snapshot::End(id)), Some(Sent::SnapshotEnd(x))) if id == x => {
                p.snapshot = None;
                p.snapshots_sent += 1;
            }
            _ => {}
        }
        self.collect_tombstones();
    }

    /// The next message for `peer`, if any is due. Call until it returns `None`.
    pub fn poll_transmit(
        &mut self,
        peer: &str,
        table: &FlowTable,
        now: Duration,
    ) -> Option<Message> {
        let epoch = self.cfg.epoch;
        let (batch_flows, window) = (self.cfg.batch_flows, self.cfg.window);
        let last = self.index.last_version();
        let dropped = self.index.dropped_upto();
        let p = self.peers.get_mut(peer)?;
        if !p.connected {
            return None;
        }
        if let Some(m) = p.control.pop_front() {
            p.last_tx = now;
            return Some(m);
        }
        if !p.hello_seen {
            return None;
        }
        if p.snapshot.is_none() && (p.snapshot_wanted || p.cursor < dropped) {
            p.rewind();
            p.snapshot_wanted = false;
            p.cursor = 0;
            let id = p.next_snapshot_id;
            p.next_snapshot_id += 1;
            p.snapshot = Some(Snapshot::Begin(id));
            return Some(send_tracked(p, Sent::SnapshotBegin(id), now, |seq| {
                Message::SnapshotBegin { epoch, seq, id }
            }));
        }
        if matches!(
            p.snapshot,
            Some(Snapshot::Begin(_)) | Some(Snapshot::End(_))
        ) || p.in_flight.len() >= window
        {
            return None;
        }
        if p.cursor < last {
            let entries = self.index.range(p.cursor, last, batch_flows);
            let to = entries.last().map_or(last, |(v, _)| *v);
            let from = p.cursor;
            p.cursor = to;
            let batch = build_batch(&entries, table, epoch);
            return Some(send_tracked(p, Sent::Range { from, to }, now, |seq| {
                Message::Batch(Batch { seq, ..batch })
            }));
        }
        if let Some(Snapshot::Data(id)) = p.snapshot {
            if p.in_flight.is_empty() {
                p.snapshot = Some(Snapshot::End(id));
                let flows = self.index.live() as u64;
                return Some(send_tracked(p, Sent::SnapshotEnd(id), now, |seq| {
                    Message::SnapshotEnd {
                        epoch,
                        seq,
                        id,
                        flows,
                    }
                }));
            }
        }
        None
    }

    /// Timers: retransmissions, heartbeats, dead peers. Returns peers to disconnect.
    pub fn handle_timeout(&mut self, now: Duration) -> Vec<String> {
        let mut dead = Vec::new();
        let epoch = self.cfg.epoch;
        for p in self.peers.values_mut() {
            if !p.connected {
                continue;
            }
            if now.saturating_sub(p.last_rx) >= self.cfg.dead_after {
                dead.push(p.id.clone());
                continue;
            }
            let rto = self.cfg.retransmit_after;
            if p.in_flight
                .front()
                .is_some_and(|f| now.saturating_sub(f.sent_at) >= rto)
            {
                p.retransmits += p.in_flight.len() as u64;
                p.rewind();
            }
            if p.hello_seen && now.saturating_sub(p.last_tx) >= self.cfg.heartbeat_every {
                p.control.push_back(Message::Heartbeat {
                    epoch,
                    sent_unix_ms: unix_ms(),
                });
                p.last_tx = now;
            }
        }
        for peer in &dead {
            self.disconnected(peer, now);
        }
        self.collect_tombstones();
        dead
    }

    /// Forgets the tombstones every peer has acknowledged. Run at each acknowledgement as well
    /// as on the timer: in a burst of deletions, tombstones held until the next tick keep the
    /// change index's log growing (and the source's memory with it) for the whole burst.
    fn collect_tombstones(&mut self) {
        let acked_by_all = self
            .peers
            .values()
            .map(Peer::acked_version)
            .min()
            .unwrap_or(u64::MAX);
        self.index
            .collect_tombstones(acked_by_all, self.cfg.tombstone_limit);
    }

    /// Deletions still remembered for peers that have not acknowledged them.
    pub fn tombstones(&self) -> usize {
        self.index.tombstones()
    }

    /// Whether every configured peer delivered its snapshot, or has been unreachable for longer
    /// than the readiness bound (so that a lone survivor still becomes ready).
    pub fn is_ready(&self, now: Duration) -> bool {
        self.peers.values().all(|p| {
            p.synced
                || (!p.hello_seen
                    && now.saturating_sub(p.since.max(self.started)) >= self.cfg.ready_timeout)
        })
    }

    /// Per-peer state for status.
    pub fn peer_status(&self, now: Duration) -> Vec<PeerStatus> {
        let last = self.index.last_version();
        self.peers
            .values()
            .map(|p| PeerStatus {
                node_id: p.id.clone(),
                state: match (p.connected, p.hello_seen) {
                    (true, true) => "connected",
                    (true, false) => "handshake",
                    (false, _) => "down",
                }
                .into(),
                epoch: p.their_epoch,
                acked_seq: p.acked_seq,
                lag_changes: last.saturating_sub(p.acked_version()),
                lag_secs: p
                    .in_flight
                    .front()
                    .map_or(0.0, |f| now.saturating_sub(f.sent_at).as_secs_f64()),
                synced: p.synced,
                external_flows: self.external.origin(&p.id).map_or(0, |o| o.len()),
                snapshots_sent: p.snapshots_sent,
                retransmits: p.retransmits,
            })
            .collect()
    }
}

fn send_tracked(
    p: &mut Peer,
    what: Sent,
    now: Duration,
    build: impl FnOnce(u64) -> Message,
) -> Message {
    let seq = p.take_seq();
    p.in_flight.push_back(InFlight {
        seq,
        what,
        sent_at: now,
    });
    p.last_tx = now;
    build(seq)
}

fn build_batch(
    entries: &[(u64, super::index::IndexEntry)],
    table: &FlowTable,
    epoch: u64,
) -> Batch {
    let mut batch = Batch {
        epoch,
        ..Batch::default()
    };
    for (version, e) in entries {
        // A tombstone needs no lookup: its key is gone from the table (or back under a later
        // version, which is sent in its own turn), and probing a big table for an absent key
        // is a cache miss per deletion.
        let flow = if e.deleted { None } else { table.get(&e.key) };
        match flow {
            Some(flow) => batch.upserts.push((*version, flow.clone())),
            None => batch.deletes.push((*version, e.key)),
        }
    }
    batch
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
