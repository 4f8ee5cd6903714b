//! The peer protocol's messages as the sync engine sees them, independent of any encoding.
//!
//! `proto/ctsync.proto` is their wire form; `crate::wire` converts between the two.

use crate::flow::{Flow, FlowKey};

/// Major protocol version: a peer with another one is refused.
pub const VERSION_MAJOR: u32 = 1;
/// Minor protocol version: only adds optional fields. 1.1: IPv4 addresses in `fixed32` fields.
pub const VERSION_MINOR: u32 = 1;

/// One message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message in each direction.
    Hello(Hello),
    /// Changes of the sender's own flows.
    Batch(Batch),
    /// Acknowledges the batch or control message with this sequence number.
    Ack {
        /// Epoch of the acknowledged stream (the receiver of the ack's own epoch).
        epoch: u64,
        /// Sequence acknowledged.
        seq: u64,
    },
    /// Asks for a full snapshot.
    ResyncRequest {
        /// Why, for the logs.
        reason: String,
    },
    /// A snapshot starts: flows not touched until its end are gone on the sender.
    SnapshotBegin {
        /// Sender epoch.
        epoch: u64,
        /// Sequence number (acknowledged like a batch).
        seq: u64,
        /// Snapshot identifier.
        id: u64,
    },
    /// A snapshot ends.
    SnapshotEnd {
        /// Sender epoch.
        epoch: u64,
        /// Sequence number.
        seq: u64,
        /// Snapshot identifier.
        id: u64,
        /// Flows the sender had at the end.
        flows: u64,
    },
    /// Keeps an idle stream alive and measures lag.
    Heartbeat {
        /// Sender epoch.
        epoch: u64,
        /// Sender's wall clock, Unix milliseconds.
        sent_unix_ms: u64,
    },
}

/// First message of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol major version.
    pub version_major: u32,
    /// Protocol minor version.
    pub version_minor: u32,
    /// Cluster name; peers of other clusters are refused.
    pub cluster: String,
    /// Sender's node id.
    pub node_id: String,
    /// Sender's epoch (random per daemon start).
    pub epoch: u64,
    /// The receiver's epoch as the sender last saw it (0: none).
    pub have_epoch: u64,
    /// Highest sequence of the receiver's stream the sender has fully applied.
    pub have_seq: u64,
}

/// A batch of changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// Sender epoch.
    pub epoch: u64,
    /// Sequence number.
    pub seq: u64,
    /// Flows created or changed, with the sender's change counter.
    pub upserts: Vec<(u64, Flow)>,
    /// Flows deleted, with the sender's change counter.
    pub deletes: Vec<(u64, FlowKey)>,
}
