//! Conversions between the sync engine's messages ([`crate::sync::Message`]) and their protobuf
//! wire form ([`pb`], generated from `proto/ctsync.proto`).
//!
//! Encoding cannot fail. Decoding is a trust boundary: whatever a peer sends is checked before it
//! becomes a [`Flow`], so every value fits its Rust type and every tuple is one the kernel could
//! hold. A message that breaks a rule is rejected whole with a [`WireError`] naming the offending
//! field (`batch.upserts[3].flow.reply.src: address of 5 bytes, …`); nothing here panics on peer
//! input.
//!
//! Conventions on the wire:
//! - an IPv4 address is a `fixed32` (`src_v4`, `dst_v4`; since 1.1), an IPv6 one 16 bytes
//!   (`src`, `dst`); each address is in exactly one form, and both addresses of a tuple are of
//!   one family. IPv4 as 4 bytes in `src`/`dst` (what 1.0 peers send) is still accepted;
//! - the layer-4 fields a protocol does not use are 0: ports only for
//!   [`proto::has_ports`] protocols, id/type/code only for [`proto::is_icmp`] ones;
//! - labels are 16 bytes big-endian (label *n* is bit *n* of the number), and are left empty when
//!   no label is set, which is almost always (an empty field costs nothing, 16 zero bytes cost 18).

use crate::flow::{
    proto, Flow, FlowKey, ProtoInfo, SeqAdj, SeqAdjDir, Synproxy, TcpInfo, Tuple, Zone, ZoneDir, L4,
};
use crate::sync::{Batch, Hello, Message};
use prost::bytes::Bytes;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Types generated from `proto/ctsync.proto`.
pub mod pb {
    #![allow(missing_docs)]
    tonic::include_proto!("ctsync.v1");
}

use pb::peer_message::Body;

mod frame;

pub use frame::{
    decode_message, encode_message, encoded_len, FrameError, ProtobufError, SizedMessage,
};

/// Why a peer's message was rejected.
///
/// `field` is the path of the offending field inside the message, e.g.
/// `batch.upserts[3].flow.key.orig.src_port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The message has no body: it is empty, or of a type this version does not know.
    #[error("peer message without a body (empty, or of a type this version does not know)")]
    EmptyMessage,
    /// A submessage the model requires is absent.
    #[error("{field}: required but missing")]
    Missing {
        /// Path of the field.
        field: String,
    },
    /// An address is neither 4 nor 16 bytes long.
    #[error("{field}: address of {len} bytes, expected 4 (IPv4) or 16 (IPv6)")]
    AddressLength {
        /// Path of the field.
        field: String,
        /// Length received.
        len: usize,
    },
    /// An address is both in its bytes field and in its IPv4 field (`src` and `src_v4`).
    #[error("{field}: address given both as bytes and in {field}_v4, expected one form")]
    AddressTwice {
        /// Path of the bytes field.
        field: String,
    },
    /// An address is in neither its bytes field nor its IPv4 field (`src` or `src_v4`).
    #[error("{field}: address missing, expected 16 bytes (IPv6) or {field}_v4 (IPv4)")]
    AddressMissing {
        /// Path of the bytes field.
        field: String,
    },
    /// The two addresses of a tuple are of different families.
    #[error("{field}: source and destination addresses of different families")]
    MixedFamily {
        /// Path of the tuple.
        field: String,
    },
    /// A number does not fit the width of its field in the model.
    #[error("{field}: {value} does not fit in {bits} bits")]
    OutOfRange {
        /// Path of the field.
        field: String,
        /// Value received.
        value: u64,
        /// Width of the field in the model.
        bits: u32,
    },
    /// A layer-4 field is set for a protocol that does not use it.
    #[error("{field}: must be 0 for IP protocol {proto}, which has no {what}")]
    UnusedL4 {
        /// Path of the field.
        field: String,
        /// The tuple's IP protocol.
        proto: u8,
        /// What the protocol lacks ("ports" or "ICMP id, type and code").
        what: &'static str,
    },
    /// Labels are neither empty nor 16 bytes long.
    #[error("{field}: {len} bytes, expected 16 (or none when no label is set)")]
    LabelsLength {
        /// Path of the field.
        field: String,
        /// Length received.
        len: usize,
    },
    /// A helper name the kernel cannot hold (`NF_CT_HELPER_NAME_LEN` is 16 with the NUL).
    #[error(
        "{field}: helper name of {len} bytes or with a NUL, the kernel allows {HELPER_NAME_MAX}"
    )]
    HelperName {
        /// Path of the field.
        field: String,
        /// Length received.
        len: usize,
    },
    /// An enumeration value this version does not know.
    #[error("{field}: unknown value {value}")]
    UnknownEnum {
        /// Path of the field.
        field: String,
        /// Value received.
        value: i32,
    },
}

/// Longest helper name the kernel accepts, without its terminating NUL.
pub const HELPER_NAME_MAX: usize = 15;

impl WireError {
    /// Puts `prefix` in front of the field path (errors bubble up from the innermost field).
    fn within(mut self, prefix: impl fmt::Display) -> Self {
        match &mut self {
            WireError::EmptyMessage => {}
            WireError::Missing { field }
            | WireError::AddressLength { field, .. }
            | WireError::AddressTwice { field }
            | WireError::HelperName { field, .. }
            | WireError::AddressMissing { field }
            | WireError::MixedFamily { field }
            | WireError::OutOfRange { field, .. }
            | WireError::UnusedL4 { field, .. }
            | WireError::LabelsLength { field, .. }
            | WireError::UnknownEnum { field, .. } => {
                *field = if field.is_empty() {
                    prefix.to_string()
                } else {
                    format!("{prefix}.{field}")
                };
            }
        }
        self
    }

    /// Path of the offending field (empty for [`WireError::EmptyMessage`]).
    pub fn field(&self) -> &str {
        match self {
            WireError::EmptyMessage => "",
            WireError::Missing { field }
            | WireError::AddressLength { field, .. }
            | WireError::AddressTwice { field }
            | WireError::HelperName { field, .. }
            | WireError::AddressMissing { field }
            | WireError::MixedFamily { field }
            | WireError::OutOfRange { field, .. }
            | WireError::UnusedL4 { field, .. }
            | WireError::LabelsLength { field, .. }
            | WireError::UnknownEnum { field, .. } => field,
        }
    }
}

/// Adds a path prefix to the error of a result.
trait Within<T> {
    fn within(self, prefix: impl fmt::Display) -> Result<T, WireError>;
}

impl<T> Within<T> for Result<T, WireError> {
    fn within(self, prefix: impl fmt::Display) -> Result<T, WireError> {
        self.map_err(|e| e.within(prefix))
    }
}

fn missing(field: &str) -> WireError {
    WireError::Missing {
        field: field.to_string(),
    }
}

/// Narrows a wire number to the model's width.
fn narrow<T: TryFrom<u64>>(value: impl Into<u64>, field: &str) -> Result<T, WireError> {
    let value = value.into();
    T::try_from(value).map_err(|_| WireError::OutOfRange {
        field: field.to_string(),
        value,
        bits: 8 * std::mem::size_of::<T>() as u32,
    })
}

fn require<T>(v: Option<T>, field: &str) -> Result<T, WireError> {
    v.ok_or_else(|| missing(field))
}

/// Encodes a message.
pub fn encode(msg: &Message) -> pb::PeerMessage {
    msg.into()
}

/// Decodes and validates a peer's message.
pub fn decode(msg: pb::PeerMessage) -> Result<Message, WireError> {
    msg.try_into()
}

// ---- Messages ----

impl From<&Message> for pb::PeerMessage {
    fn from(msg: &Message) -> Self {
        let body = match msg {
            Message::Hello(h) => Body::Hello(pb::Hello {
                version_major: h.version_major,
                version_minor: h.version_minor,
                cluster: h.cluster.clone(),
                node_id: h.node_id.clone(),
                epoch: h.epoch,
                have_epoch: h.have_epoch,
                have_seq: h.have_seq,
            }),
            Message::Batch(b) => Body::Batch(pb::Batch {
                epoch: b.epoch,
                seq: b.seq,
                upserts: b
                    .upserts
                    .iter()
                    .map(|(version, flow)| pb::FlowUpdate {
                        version: *version,
                        flow: Some(flow.into()),
                    })
                    .collect(),
                deletes: b
                    .deletes
                    .iter()
                    .map(|(version, key)| pb::FlowDelete {
                        version: *version,
                        key: Some(key.into()),
                    })
                    .collect(),
            }),
            Message::Ack { epoch, seq } => Body::Ack(pb::Ack {
                epoch: *epoch,
                seq: *seq,
            }),
            Message::ResyncRequest { reason } => Body::ResyncRequest(pb::ResyncRequest {
                reason: reason.clone(),
            }),
            Message::SnapshotBegin { epoch, seq, id } => Body::SnapshotBegin(pb::SnapshotBegin {
                epoch: *epoch,
                seq: *seq,
                snapshot_id: *id,
            }),
            Message::SnapshotEnd {
                epoch,
                seq,
                id,
                flows,
            } => Body::SnapshotEnd(pb::SnapshotEnd {
                epoch: *epoch,
                seq: *seq,
                snapshot_id: *id,
                flows: *flows,
            }),
            Message::Heartbeat {
                epoch,
                sent_unix_ms,
            } => Body::Heartbeat(pb::Heartbeat {
                epoch: *epoch,
                sent_unix_ms: *sent_unix_ms,
            }),
        };
        pb::PeerMessage { body: Some(body) }
    }
}

impl From<Message> for pb::PeerMessage {
    fn from(msg: Message) -> Self {
        (&msg).into()
    }
}

impl TryFrom<pb::PeerMessage> for Message {
    type Error = WireError;

    fn try_from(msg: pb::PeerMessage) -> Result<Self, WireError> {
        Ok(match msg.body.ok_or(WireError::EmptyMessage)? {
            Body::Hello(h) => Message::Hello(Hello {
                version_major: h.version_major,
                version_minor: h.version_minor,
                cluster: h.cluster,
                node_id: h.node_id,
                epoch: h.epoch,
                have_epoch: h.have_epoch,
                have_seq: h.have_seq,
            }),
            Body::Batch(b) => Message::Batch(decode_batch(b)?),
            Body::Ack(a) => Message::Ack {
                epoch: a.epoch,
                seq: a.seq,
            },
            Body::ResyncRequest(r) => Message::ResyncRequest { reason: r.reason },
            Body::SnapshotBegin(s) => Message::SnapshotBegin {
                epoch: s.epoch,
                seq: s.seq,
                id: s.snapshot_id,
            },
            Body::SnapshotEnd(s) => Message::SnapshotEnd {
                epoch: s.epoch,
                seq: s.seq,
                id: s.snapshot_id,
                flows: s.flows,
            },
            Body::Heartbeat(h) => Message::Heartbeat {
                epoch: h.epoch,
                sent_unix_ms: h.sent_unix_ms,
            },
        })
    }
}

fn decode_batch(b: pb::Batch) -> Result<Batch, WireError> {
    let mut upserts = Vec::with_capacity(b.upserts.len());
    for (i, u) in b.upserts.iter().enumerate() {
        let flow = u.flow.as_ref().map(FlowFields::from);
        upserts.push((u.version, upsert_from_fields(i, flow.as_ref())?));
    }
    let mut deletes = Vec::with_capacity(b.deletes.len());
    for (i, d) in b.deletes.iter().enumerate() {
        let key = d.key.as_ref().map(KeyFields::from);
        deletes.push((d.version, delete_from_fields(i, key.as_ref())?));
    }
    Ok(Batch {
        epoch: b.epoch,
        seq: b.seq,
        upserts,
        deletes,
    })
}

/// Validates the flow of the `i`th upsert of a batch; errors carry the whole path
/// (`batch.upserts[i].flow…`). Shared with [`frame`]'s decoder so that both reject alike.
#[inline]
pub(crate) fn upsert_from_fields(
    i: usize,
    flow: Option<&FlowFields<'_>>,
) -> Result<Flow, WireError> {
    match flow.and_then(flow_fast) {
        Some(f) => Ok(f),
        None => upsert_checked(i, flow),
    }
}

#[cold]
#[inline(never)]
fn upsert_checked(i: usize, flow: Option<&FlowFields<'_>>) -> Result<Flow, WireError> {
    require(flow, "flow")
        .and_then(|f| flow_from_fields(f).within("flow"))
        .within(format_args!("batch.upserts[{i}]"))
}

/// Validates the key of the `i`th delete of a batch, as [`upsert_from_fields`] does a flow.
#[inline]
pub(crate) fn delete_from_fields(
    i: usize,
    key: Option<&KeyFields<'_>>,
) -> Result<FlowKey, WireError> {
    match key.and_then(key_fast) {
        Some(k) => Ok(k),
        None => delete_checked(i, key),
    }
}

#[cold]
#[inline(never)]
fn delete_checked(i: usize, key: Option<&KeyFields<'_>>) -> Result<FlowKey, WireError> {
    require(key, "key")
        .and_then(|k| key_from_fields(k).within("key"))
        .within(format_args!("batch.deletes[{i}]"))
}

// ---- Field views ----
//
// Validation works on these borrowed views of the wire fields rather than on the `pb` types, so
// that prost's messages (the reference path) and the hand-written decoder in [`frame`] (which
// never builds a `pb` message) go through the very same checks and produce the same errors.

/// A `Tuple` as it is on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TupleFields<'a> {
    pub src: &'a [u8],
    pub dst: &'a [u8],
    pub proto: u32,
    pub src_port: u32,
    pub dst_port: u32,
    pub icmp_id: u32,
    pub icmp_type: u32,
    pub icmp_code: u32,
    pub src_v4: Option<u32>,
    pub dst_v4: Option<u32>,
}

/// A `FlowKey` as it is on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KeyFields<'a> {
    pub zone: u32,
    pub zone_dir: i32,
    pub orig: Option<TupleFields<'a>>,
}

/// The `protoinfo` oneof of a `Flow` as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProtoinfoFields {
    Tcp {
        state: u32,
        wscale_orig: u32,
        wscale_reply: u32,
        flags_orig: u32,
        flags_reply: u32,
    },
    Sctp {
        state: u32,
        vtag_orig: u32,
        vtag_reply: u32,
    },
    Dccp {
        state: u32,
        role: u32,
        handshake_seq: u64,
    },
}

/// A `SeqAdj` as it is on the wire (its directions need no check beyond presence).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SeqAdjFields {
    pub orig: Option<SeqAdjDir>,
    pub reply: Option<SeqAdjDir>,
}

/// A `Flow` as it is on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FlowFields<'a> {
    pub key: Option<KeyFields<'a>>,
    pub reply: Option<TupleFields<'a>>,
    pub status: u32,
    pub timeout: u32,
    pub mark: u32,
    pub labels: &'a [u8],
    pub protoinfo: Option<ProtoinfoFields>,
    pub helper: Option<&'a str>,
    pub master: Option<TupleFields<'a>>,
    pub seq_adj: Option<SeqAdjFields>,
    /// Needs no check: every value fits.
    pub synproxy: Option<Synproxy>,
}

impl<'a> From<&'a pb::Tuple> for TupleFields<'a> {
    fn from(t: &'a pb::Tuple) -> Self {
        TupleFields {
            src: &t.src,
            dst: &t.dst,
            proto: t.proto,
            src_port: t.src_port,
            dst_port: t.dst_port,
            icmp_id: t.icmp_id,
            icmp_type: t.icmp_type,
            icmp_code: t.icmp_code,
            src_v4: t.src_v4,
            dst_v4: t.dst_v4,
        }
    }
}

impl<'a> From<&'a pb::FlowKey> for KeyFields<'a> {
    fn from(k: &'a pb::FlowKey) -> Self {
        KeyFields {
            zone: k.zone,
            zone_dir: k.zone_dir,
            orig: k.orig.as_ref().map(TupleFields::from),
        }
    }
}

impl<'a> From<&'a pb::Flow> for FlowFields<'a> {
    fn from(f: &'a pb::Flow) -> Self {
        use pb::flow::Protoinfo;
        FlowFields {
            key: f.key.as_ref().map(KeyFields::from),
            reply: f.reply.as_ref().map(TupleFields::from),
            status: f.status,
            timeout: f.timeout,
            mark: f.mark,
            labels: &f.labels,
            protoinfo: f.protoinfo.as_ref().map(|p| match *p {
                Protoinfo::Tcp(t) => ProtoinfoFields::Tcp {
                    state: t.state,
                    wscale_orig: t.wscale_orig,
                    wscale_reply: t.wscale_reply,
                    flags_orig: t.flags_orig,
                    flags_reply: t.flags_reply,
                },
                Protoinfo::Sctp(s) => ProtoinfoFields::Sctp {
                    state: s.state,
                    vtag_orig: s.vtag_orig,
                    vtag_reply: s.vtag_reply,
                },
                Protoinfo::Dccp(d) => ProtoinfoFields::Dccp {
                    state: d.state,
                    role: d.role,
                    handshake_seq: d.handshake_seq,
                },
            }),
            helper: f.helper.as_deref(),
            master: f.master.as_ref().map(TupleFields::from),
            seq_adj: f.seq_adj.map(|s| SeqAdjFields {
                orig: s.orig.map(decode_seq_adj_dir),
                reply: s.reply.map(decode_seq_adj_dir),
            }),
            synproxy: f.synproxy.map(|s| Synproxy {
                isn: s.isn,
                its: s.its,
                tsoff: s.tsoff,
            }),
        }
    }
}

// ---- Tuples ----

/// An address as its bytes field and its IPv4 field. IPv4 goes in the `fixed32`, which costs
/// no allocation on either side; only IPv6 needs the bytes.
///
/// The bytes are built with [`Bytes::from_owner`]: one allocation, and prost's clone of the field
/// while encoding only bumps its count (a [`Bytes::copy_from_slice`] would allocate again then).
/// On receive, prost slices bytes fields out of tonic's buffer without copying.
fn encode_addr(a: IpAddr) -> (Bytes, Option<u32>) {
    match a {
        IpAddr::V4(a) => (Bytes::new(), Some(a.to_bits())),
        IpAddr::V6(a) => (Bytes::from_owner(a.octets()), None),
    }
}

/// Reads an address from its bytes field `b` and its IPv4 field `v4`, exactly one of which must
/// be set. 4 bytes are still IPv4: that is how senders of version 1.0 encode it.
fn decode_addr(b: &[u8], v4: Option<u32>, field: &str) -> Result<IpAddr, WireError> {
    match v4 {
        Some(_) if !b.is_empty() => Err(WireError::AddressTwice {
            field: field.to_string(),
        }),
        Some(a) => Ok(IpAddr::V4(Ipv4Addr::from_bits(a))),
        None if b.is_empty() => Err(WireError::AddressMissing {
            field: field.to_string(),
        }),
        None => {
            if let Ok(a) = <[u8; 16]>::try_from(b) {
                Ok(IpAddr::V6(Ipv6Addr::from(a)))
            } else if let Ok(a) = <[u8; 4]>::try_from(b) {
                Ok(IpAddr::V4(Ipv4Addr::from(a)))
            } else {
                Err(WireError::AddressLength {
                    field: field.to_string(),
                    len: b.len(),
                })
            }
        }
    }
}

impl From<&Tuple> for pb::Tuple {
    fn from(t: &Tuple) -> Self {
        let (src, src_v4) = encode_addr(t.src);
        let (dst, dst_v4) = encode_addr(t.dst);
        let mut out = pb::Tuple {
            src,
            dst,
            src_v4,
            dst_v4,
            proto: t.proto.into(),
            ..Default::default()
        };
        match t.l4 {
            L4::None => {}
            L4::Ports { src, dst } => {
                out.src_port = src.into();
                out.dst_port = dst.into();
            }
            L4::Icmp { id, kind, code } => {
                out.icmp_id = id.into();
                out.icmp_type = kind.into();
                out.icmp_code = code.into();
            }
        }
        out
    }
}

impl TryFrom<pb::Tuple> for Tuple {
    type Error = WireError;

    fn try_from(t: pb::Tuple) -> Result<Self, WireError> {
        tuple_from_fields(&TupleFields::from(&t))
    }
}

/// The fast path of the checks below: the value when every check passes, `None` otherwise
/// (then the checked version, which it must agree with, finds the error).
#[inline]
fn addr_fast(b: &[u8], v4: Option<u32>) -> Option<IpAddr> {
    match v4 {
        Some(a) if b.is_empty() => Some(IpAddr::V4(Ipv4Addr::from_bits(a))),
        Some(_) => None,
        None => match b.len() {
            16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
            4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
            _ => None,
        },
    }
}

/// [`tuple_checked`] when it succeeds, without building errors.
#[inline]
fn tuple_fast(t: &TupleFields<'_>) -> Option<Tuple> {
    let src = addr_fast(t.src, t.src_v4)?;
    let dst = addr_fast(t.dst, t.dst_v4)?;
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    let p = u8::try_from(t.proto).ok()?;
    let l4 = if proto::has_ports(p) {
        if t.icmp_id | t.icmp_type | t.icmp_code != 0 {
            return None;
        }
        L4::Ports {
            src: t.src_port.try_into().ok()?,
            dst: t.dst_port.try_into().ok()?,
        }
    } else if proto::is_icmp(p) {
        if t.src_port | t.dst_port != 0 {
            return None;
        }
        L4::Icmp {
            id: t.icmp_id.try_into().ok()?,
            kind: t.icmp_type.try_into().ok()?,
            code: t.icmp_code.try_into().ok()?,
        }
    } else {
        if t.src_port | t.dst_port | t.icmp_id | t.icmp_type | t.icmp_code != 0 {
            return None;
        }
        L4::None
    };
    Some(Tuple {
        src,
        dst,
        proto: p,
        l4,
    })
}

#[inline]
fn tuple_from_fields(t: &TupleFields<'_>) -> Result<Tuple, WireError> {
    match tuple_fast(t) {
        Some(t) => Ok(t),
        None => tuple_checked(t),
    }
}

#[cold]
#[inline(never)]
fn tuple_checked(t: &TupleFields<'_>) -> Result<Tuple, WireError> {
    let src = decode_addr(t.src, t.src_v4, "src")?;
    let dst = decode_addr(t.dst, t.dst_v4, "dst")?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(WireError::MixedFamily {
            field: String::new(),
        });
    }
    let p: u8 = narrow(t.proto, "proto")?;
    let unused = |field: &str, value: u32, what: &'static str| {
        if value == 0 {
            Ok(())
        } else {
            Err(WireError::UnusedL4 {
                field: field.to_string(),
                proto: p,
                what,
            })
        }
    };
    const PORTS: &str = "ports";
    const ICMP: &str = "ICMP id, type and code";
    let l4 = if proto::has_ports(p) {
        unused("icmp_id", t.icmp_id, ICMP)?;
        unused("icmp_type", t.icmp_type, ICMP)?;
        unused("icmp_code", t.icmp_code, ICMP)?;
        L4::Ports {
            src: narrow(t.src_port, "src_port")?,
            dst: narrow(t.dst_port, "dst_port")?,
        }
    } else if proto::is_icmp(p) {
        unused("src_port", t.src_port, PORTS)?;
        unused("dst_port", t.dst_port, PORTS)?;
        L4::Icmp {
            id: narrow(t.icmp_id, "icmp_id")?,
            kind: narrow(t.icmp_type, "icmp_type")?,
            code: narrow(t.icmp_code, "icmp_code")?,
        }
    } else {
        unused("src_port", t.src_port, PORTS)?;
        unused("dst_port", t.dst_port, PORTS)?;
        unused("icmp_id", t.icmp_id, ICMP)?;
        unused("icmp_type", t.icmp_type, ICMP)?;
        unused("icmp_code", t.icmp_code, ICMP)?;
        L4::None
    };
    Ok(Tuple {
        src,
        dst,
        proto: p,
        l4,
    })
}

// ---- Keys ----

impl From<&FlowKey> for pb::FlowKey {
    fn from(k: &FlowKey) -> Self {
        pb::FlowKey {
            zone: k.zone.id.into(),
            zone_dir: match k.zone.dir {
                ZoneDir::Both => pb::ZoneDir::Both,
                ZoneDir::Original => pb::ZoneDir::Original,
                ZoneDir::Reply => pb::ZoneDir::Reply,
            } as i32,
            orig: Some((&k.orig).into()),
        }
    }
}

impl TryFrom<pb::FlowKey> for FlowKey {
    type Error = WireError;

    fn try_from(k: pb::FlowKey) -> Result<Self, WireError> {
        key_from_fields(&KeyFields::from(&k))
    }
}

/// [`key_checked`] when it succeeds, without building errors.
#[inline]
fn key_fast(k: &KeyFields<'_>) -> Option<FlowKey> {
    let dir = match pb::ZoneDir::try_from(k.zone_dir).ok()? {
        pb::ZoneDir::Both => ZoneDir::Both,
        pb::ZoneDir::Original => ZoneDir::Original,
        pb::ZoneDir::Reply => ZoneDir::Reply,
    };
    Some(FlowKey {
        zone: Zone {
            id: k.zone.try_into().ok()?,
            dir,
        },
        orig: tuple_fast(k.orig.as_ref()?)?,
    })
}

#[inline]
fn key_from_fields(k: &KeyFields<'_>) -> Result<FlowKey, WireError> {
    match key_fast(k) {
        Some(k) => Ok(k),
        None => key_checked(k),
    }
}

#[cold]
#[inline(never)]
fn key_checked(k: &KeyFields<'_>) -> Result<FlowKey, WireError> {
    let dir = match pb::ZoneDir::try_from(k.zone_dir) {
        Ok(pb::ZoneDir::Both) => ZoneDir::Both,
        Ok(pb::ZoneDir::Original) => ZoneDir::Original,
        Ok(pb::ZoneDir::Reply) => ZoneDir::Reply,
        Err(_) => {
            return Err(WireError::UnknownEnum {
                field: "zone_dir".into(),
                value: k.zone_dir,
            })
        }
    };
    Ok(FlowKey {
        zone: Zone {
            id: narrow(k.zone, "zone")?,
            dir,
        },
        orig: tuple_from_fields(require(k.orig.as_ref(), "orig")?).within("orig")?,
    })
}

// ---- Flows ----

fn encode_seq_adj_dir(d: &SeqAdjDir) -> pb::SeqAdjDir {
    pb::SeqAdjDir {
        correction_pos: d.correction_pos,
        offset_before: d.offset_before,
        offset_after: d.offset_after,
    }
}

fn decode_seq_adj_dir(d: pb::SeqAdjDir) -> SeqAdjDir {
    SeqAdjDir {
        correction_pos: d.correction_pos,
        offset_before: d.offset_before,
        offset_after: d.offset_after,
    }
}

impl From<&Flow> for pb::Flow {
    fn from(f: &Flow) -> Self {
        use pb::flow::Protoinfo;
        pb::Flow {
            key: Some((&f.key).into()),
            reply: Some((&f.reply).into()),
            status: f.status,
            timeout: f.timeout,
            mark: f.mark,
            labels: if f.labels() == 0 {
                Bytes::new()
            } else {
                // As for addresses: one allocation, none for prost's clone.
                Bytes::from_owner(f.labels().to_be_bytes())
            },
            protoinfo: match f.protoinfo() {
                ProtoInfo::None => None,
                ProtoInfo::Tcp(t) => Some(Protoinfo::Tcp(pb::TcpInfo {
                    state: t.state.into(),
                    wscale_orig: t.wscale_orig.into(),
                    wscale_reply: t.wscale_reply.into(),
                    flags_orig: t.flags_orig.into(),
                    flags_reply: t.flags_reply.into(),
                })),
                ProtoInfo::Sctp {
                    state,
                    vtag_orig,
                    vtag_reply,
                } => Some(Protoinfo::Sctp(pb::SctpInfo {
                    state: state.into(),
                    vtag_orig,
                    vtag_reply,
                })),
                ProtoInfo::Dccp {
                    state,
                    role,
                    handshake_seq,
                } => Some(Protoinfo::Dccp(pb::DccpInfo {
                    state: state.into(),
                    role: role.into(),
                    handshake_seq,
                })),
            },
            helper: f.helper().map(str::to_string),
            master: f.master().map(Into::into),
            seq_adj: f.seq_adj().map(|s| pb::SeqAdj {
                orig: Some(encode_seq_adj_dir(&s.orig)),
                reply: Some(encode_seq_adj_dir(&s.reply)),
            }),
            synproxy: f.synproxy().map(|s| pb::Synproxy {
                isn: s.isn,
                its: s.its,
                tsoff: s.tsoff,
            }),
        }
    }
}

impl TryFrom<pb::Flow> for Flow {
    type Error = WireError;

    fn try_from(f: pb::Flow) -> Result<Self, WireError> {
        flow_from_fields(&FlowFields::from(&f))
    }
}

/// [`flow_checked`] when it succeeds, without building errors.
#[inline]
fn flow_fast(f: &FlowFields<'_>) -> Option<Flow> {
    let key = key_fast(f.key.as_ref()?)?;
    let reply = tuple_fast(f.reply.as_ref()?)?;
    let labels = match f.labels.len() {
        0 => 0,
        16 => u128::from_be_bytes(<[u8; 16]>::try_from(f.labels).ok()?),
        _ => return None,
    };
    let protoinfo = match f.protoinfo {
        None => ProtoInfo::None,
        Some(p) => protoinfo_fast(p)?,
    };
    let master = match &f.master {
        None => None,
        Some(t) => Some(tuple_fast(t)?),
    };
    let seq_adj = match &f.seq_adj {
        None => None,
        Some(s) => Some(SeqAdj {
            orig: s.orig?,
            reply: s.reply?,
        }),
    };
    if let Some(name) = f.helper {
        if name.len() > HELPER_NAME_MAX || name.contains('\0') {
            return None;
        }
    }
    let mut flow = Flow::new(key.zone, key.orig, reply);
    flow.status = f.status;
    flow.timeout = f.timeout;
    flow.mark = f.mark;
    flow.set_protoinfo(protoinfo);
    // The rare attributes: setting a neutral one is a no-op on a new flow.
    if labels != 0 {
        flow.set_labels(labels);
    }
    if let Some(name) = f.helper {
        flow.set_helper(Some(Box::from(name)));
    }
    if master.is_some() {
        flow.set_master(master);
    }
    if seq_adj.is_some() {
        flow.set_seq_adj(seq_adj);
    }
    if f.synproxy.is_some() {
        flow.set_synproxy(f.synproxy);
    }
    Some(flow)
}

#[inline]
fn flow_from_fields(f: &FlowFields<'_>) -> Result<Flow, WireError> {
    match flow_fast(f) {
        Some(flow) => Ok(flow),
        None => flow_checked(f),
    }
}

#[cold]
#[inline(never)]
fn flow_checked(f: &FlowFields<'_>) -> Result<Flow, WireError> {
    let key = key_from_fields(require(f.key.as_ref(), "key")?).within("key")?;
    let reply = tuple_from_fields(require(f.reply.as_ref(), "reply")?).within("reply")?;
    let labels = if f.labels.is_empty() {
        0
    } else {
        let bytes = <[u8; 16]>::try_from(f.labels).map_err(|_| WireError::LabelsLength {
            field: "labels".into(),
            len: f.labels.len(),
        })?;
        u128::from_be_bytes(bytes)
    };
    let protoinfo = match f.protoinfo {
        None => ProtoInfo::None,
        Some(p) => protoinfo_from_fields(p)?,
    };
    let master = match &f.master {
        None => None,
        Some(t) => Some(tuple_from_fields(t).within("master")?),
    };
    let seq_adj = match f.seq_adj {
        None => None,
        Some(s) => Some(SeqAdj {
            orig: require(s.orig, "orig").within("seq_adj")?,
            reply: require(s.reply, "reply").within("seq_adj")?,
        }),
    };
    let mut flow = Flow::new(key.zone, key.orig, reply);
    flow.status = f.status;
    flow.timeout = f.timeout;
    flow.mark = f.mark;
    flow.set_labels(labels);
    flow.set_protoinfo(protoinfo);
    if let Some(name) = f.helper {
        if name.len() > HELPER_NAME_MAX || name.contains('\0') {
            return Err(WireError::HelperName {
                field: "helper".into(),
                len: name.len(),
            });
        }
    }
    flow.set_helper(f.helper.map(Box::from));
    flow.set_master(master);
    flow.set_seq_adj(seq_adj);
    flow.set_synproxy(f.synproxy);
    Ok(flow)
}

/// [`protoinfo_from_fields`] when it succeeds, without building errors.
#[inline]
fn protoinfo_fast(p: ProtoinfoFields) -> Option<ProtoInfo> {
    Some(match p {
        ProtoinfoFields::Tcp {
            state,
            wscale_orig,
            wscale_reply,
            flags_orig,
            flags_reply,
        } => ProtoInfo::Tcp(TcpInfo {
            state: state.try_into().ok()?,
            wscale_orig: wscale_orig.try_into().ok()?,
            wscale_reply: wscale_reply.try_into().ok()?,
            flags_orig: flags_orig.try_into().ok()?,
            flags_reply: flags_reply.try_into().ok()?,
        }),
        ProtoinfoFields::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        } => ProtoInfo::Sctp {
            state: state.try_into().ok()?,
            vtag_orig,
            vtag_reply,
        },
        ProtoinfoFields::Dccp {
            state,
            role,
            handshake_seq,
        } => ProtoInfo::Dccp {
            state: state.try_into().ok()?,
            role: role.try_into().ok()?,
            handshake_seq,
        },
    })
}

fn protoinfo_from_fields(p: ProtoinfoFields) -> Result<ProtoInfo, WireError> {
    Ok(match p {
        ProtoinfoFields::Tcp {
            state,
            wscale_orig,
            wscale_reply,
            flags_orig,
            flags_reply,
        } => ProtoInfo::Tcp(TcpInfo {
            state: narrow(state, "state").within("tcp")?,
            wscale_orig: narrow(wscale_orig, "wscale_orig").within("tcp")?,
            wscale_reply: narrow(wscale_reply, "wscale_reply").within("tcp")?,
            flags_orig: narrow(flags_orig, "flags_orig").within("tcp")?,
            flags_reply: narrow(flags_reply, "flags_reply").within("tcp")?,
        }),
        ProtoinfoFields::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        } => ProtoInfo::Sctp {
            state: narrow(state, "state").within("sctp")?,
            vtag_orig,
            vtag_reply,
        },
        ProtoinfoFields::Dccp {
            state,
            role,
            handshake_seq,
        } => ProtoInfo::Dccp {
            state: narrow(state, "state").within("dccp")?,
            role: narrow(role, "role").within("dccp")?,
            handshake_seq,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{VERSION_MAJOR, VERSION_MINOR};
    use proptest::prelude::*;
    use prost::Message as _;

    // ---- Strategies ----

    fn arb_proto() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(proto::TCP),
            Just(proto::UDP),
            Just(proto::ICMP),
            Just(proto::ICMPV6),
            Just(proto::SCTP),
            Just(proto::DCCP),
            Just(proto::GRE),
            Just(proto::UDPLITE),
            any::<u8>(),
        ]
    }

    fn arb_tuple() -> impl Strategy<Value = Tuple> {
        let addrs = prop_oneof![
            (any::<[u8; 4]>(), any::<[u8; 4]>()).prop_map(|(s, d)| (
                IpAddr::from(Ipv4Addr::from(s)),
                IpAddr::from(Ipv4Addr::from(d))
            )),
            (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(s, d)| (
                IpAddr::from(Ipv6Addr::from(s)),
                IpAddr::from(Ipv6Addr::from(d))
            )),
        ];
        (
            addrs,
            arb_proto(),
            any::<(u16, u16)>(),
            any::<(u16, u8, u8)>(),
        )
            .prop_map(|((src, dst), p, (sp, dp), (id, kind, code))| {
                let l4 = if proto::has_ports(p) {
                    L4::Ports { src: sp, dst: dp }
                } else if proto::is_icmp(p) {
                    L4::Icmp { id, kind, code }
                } else {
                    L4::None
                };
                Tuple {
                    src,
                    dst,
                    proto: p,
                    l4,
                }
            })
    }

    fn arb_key() -> impl Strategy<Value = FlowKey> {
        (
            any::<u16>(),
            prop_oneof![
                Just(ZoneDir::Both),
                Just(ZoneDir::Original),
                Just(ZoneDir::Reply)
            ],
            arb_tuple(),
        )
            .prop_map(|(id, dir, orig)| FlowKey {
                zone: Zone { id, dir },
                orig,
            })
    }

    fn arb_protoinfo() -> impl Strategy<Value = ProtoInfo> {
        prop_oneof![
            Just(ProtoInfo::None),
            any::<[u8; 5]>().prop_map(|b| ProtoInfo::Tcp(TcpInfo {
                state: b[0],
                wscale_orig: b[1],
                wscale_reply: b[2],
                flags_orig: b[3],
                flags_reply: b[4],
            })),
            any::<(u8, u32, u32)>().prop_map(|(state, vtag_orig, vtag_reply)| ProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply
            }),
            any::<(u8, u8, u64)>().prop_map(|(state, role, handshake_seq)| ProtoInfo::Dccp {
                state,
                role,
                handshake_seq
            }),
        ]
    }

    fn arb_seq_adj_dir() -> impl Strategy<Value = SeqAdjDir> {
        any::<(u32, u32, u32)>().prop_map(|(correction_pos, offset_before, offset_after)| {
            SeqAdjDir {
                correction_pos,
                offset_before,
                offset_after,
            }
        })
    }

    fn arb_labels() -> impl Strategy<Value = u128> {
        prop_oneof![Just(0u128), Just(1u128), Just(1u128 << 127), any::<u128>()]
    }

    pub(crate) fn arb_flow() -> impl Strategy<Value = Flow> {
        let base = (
            arb_key(),
            arb_tuple(),
            any::<(u32, u32, u32)>(),
            arb_labels(),
            arb_protoinfo(),
        );
        let extras = (
            proptest::option::of("[a-z0-9-]{0,15}"),
            proptest::option::of(arb_tuple()),
            proptest::option::of((arb_seq_adj_dir(), arb_seq_adj_dir())),
            proptest::option::of(any::<(u32, u32, u32)>()),
        );
        (base, extras).prop_map(
            |(
                (key, reply, (status, timeout, mark), labels, protoinfo),
                (helper, master, seq_adj, synproxy),
            )| {
                let mut f = Flow::new(key.zone, key.orig, reply);
                f.status = status;
                f.timeout = timeout;
                f.mark = mark;
                f.set_labels(labels);
                f.set_protoinfo(protoinfo);
                f.set_helper(helper.map(String::into_boxed_str));
                f.set_master(master);
                f.set_seq_adj(seq_adj.map(|(orig, reply)| SeqAdj { orig, reply }));
                f.set_synproxy(synproxy.map(|(isn, its, tsoff)| Synproxy { isn, its, tsoff }));
                f
            },
        )
    }

    pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<(u32, u32)>(),
                ".{0,20}",
                "[a-z0-9.-]{0,20}",
                any::<(u64, u64, u64)>()
            )
                .prop_map(
                    |((version_major, version_minor), cluster, node_id, (epoch, he, hs))| {
                        Message::Hello(Hello {
                            version_major,
                            version_minor,
                            cluster,
                            node_id,
                            epoch,
                            have_epoch: he,
                            have_seq: hs,
                        })
                    }
                ),
            (
                any::<(u64, u64)>(),
                proptest::collection::vec((any::<u64>(), arb_flow()), 0..8),
                proptest::collection::vec((any::<u64>(), arb_key()), 0..8),
            )
                .prop_map(|((epoch, seq), upserts, deletes)| Message::Batch(Batch {
                    epoch,
                    seq,
                    upserts,
                    deletes
                })),
            any::<(u64, u64)>().prop_map(|(epoch, seq)| Message::Ack { epoch, seq }),
            ".{0,40}".prop_map(|reason| Message::ResyncRequest { reason }),
            any::<(u64, u64, u64)>().prop_map(|(epoch, seq, id)| Message::SnapshotBegin {
                epoch,
                seq,
                id
            }),
            any::<(u64, u64, u64, u64)>().prop_map(|(epoch, seq, id, flows)| {
                Message::SnapshotEnd {
                    epoch,
                    seq,
                    id,
                    flows,
                }
            }),
            any::<(u64, u64)>().prop_map(|(epoch, sent_unix_ms)| Message::Heartbeat {
                epoch,
                sent_unix_ms
            }),
        ]
    }

    // ---- The fast validation path against the checked one ----
    //
    // Both decoders take `*_fast` first and fall back on `*_checked`, which builds the errors;
    // were the fast path to accept what the checked one refuses, neither decoder would notice.
    // Values cluster at the edges of each rule so that both paths see every branch.

    fn edge_u32() -> impl Strategy<Value = u32> {
        prop::sample::select(vec![0u32, 1, 7, 255, 256, 65_535, 65_536, u32::MAX])
    }

    fn edge_addr() -> impl Strategy<Value = (Vec<u8>, Option<u32>)> {
        (
            prop::sample::select(vec![0usize, 3, 4, 16]),
            prop::option::of(any::<u32>()),
            any::<u8>(),
        )
            .prop_map(|(len, v4, fill)| (vec![fill; len], v4))
    }

    #[derive(Debug, Clone)]
    struct OwnedTuple {
        src: (Vec<u8>, Option<u32>),
        dst: (Vec<u8>, Option<u32>),
        proto: u32,
        ports: [u32; 5],
    }

    impl OwnedTuple {
        fn view(&self) -> TupleFields<'_> {
            TupleFields {
                src: &self.src.0,
                dst: &self.dst.0,
                proto: self.proto,
                src_port: self.ports[0],
                dst_port: self.ports[1],
                icmp_id: self.ports[2],
                icmp_type: self.ports[3],
                icmp_code: self.ports[4],
                src_v4: self.src.1,
                dst_v4: self.dst.1,
            }
        }
    }

    fn edge_tuple() -> impl Strategy<Value = OwnedTuple> {
        (
            edge_addr(),
            edge_addr(),
            prop::sample::select(vec![0u32, 1, 6, 17, 33, 47, 58, 132, 136, 256]),
            prop::array::uniform5(prop_oneof![3 => Just(0u32), 2 => edge_u32()]),
        )
            .prop_map(|(src, dst, proto, ports)| OwnedTuple {
                src,
                dst,
                proto,
                ports,
            })
    }

    /// Mostly valid tuples (so that flows get past them to their own rules), some edge ones.
    fn mostly_valid_tuple() -> impl Strategy<Value = OwnedTuple> {
        let addr = |a: IpAddr| match a {
            IpAddr::V4(a) => (Vec::new(), Some(a.to_bits())),
            IpAddr::V6(a) => (a.octets().to_vec(), None),
        };
        prop_oneof![
            4 => arb_tuple().prop_map(move |t| {
                let ports = match t.l4 {
                    L4::Ports { src, dst } => [src.into(), dst.into(), 0, 0, 0],
                    L4::Icmp { id, kind, code } => [0, 0, id.into(), kind.into(), code.into()],
                    L4::None => [0; 5],
                };
                OwnedTuple {
                    src: addr(t.src),
                    dst: addr(t.dst),
                    proto: t.proto.into(),
                    ports,
                }
            }),
            1 => edge_tuple(),
        ]
    }

    fn edge_protoinfo() -> impl Strategy<Value = ProtoinfoFields> {
        prop_oneof![
            prop::array::uniform5(edge_u32()).prop_map(|v| ProtoinfoFields::Tcp {
                state: v[0],
                wscale_orig: v[1],
                wscale_reply: v[2],
                flags_orig: v[3],
                flags_reply: v[4],
            }),
            (edge_u32(), any::<u32>(), any::<u32>()).prop_map(|(state, a, b)| {
                ProtoinfoFields::Sctp {
                    state,
                    vtag_orig: a,
                    vtag_reply: b,
                }
            }),
            (edge_u32(), edge_u32(), any::<u64>()).prop_map(|(state, role, seq)| {
                ProtoinfoFields::Dccp {
                    state,
                    role,
                    handshake_seq: seq,
                }
            }),
        ]
    }

    #[derive(Debug, Clone)]
    struct OwnedFlow {
        key: Option<(u32, i32, Option<OwnedTuple>)>,
        reply: Option<OwnedTuple>,
        scalars: [u32; 3],
        labels: Vec<u8>,
        protoinfo: Option<ProtoinfoFields>,
        helper: Option<String>,
        master: Option<OwnedTuple>,
        seq_adj: Option<(bool, bool)>,
    }

    impl OwnedFlow {
        fn key_view(&self) -> Option<KeyFields<'_>> {
            self.key.as_ref().map(|(zone, dir, orig)| KeyFields {
                zone: *zone,
                zone_dir: *dir,
                orig: orig.as_ref().map(OwnedTuple::view),
            })
        }

        fn view(&self) -> FlowFields<'_> {
            let dir = SeqAdjDir {
                correction_pos: 1,
                offset_before: 2,
                offset_after: 3,
            };
            FlowFields {
                key: self.key_view(),
                reply: self.reply.as_ref().map(OwnedTuple::view),
                status: self.scalars[0],
                timeout: self.scalars[1],
                mark: self.scalars[2],
                labels: &self.labels,
                protoinfo: self.protoinfo,
                helper: self.helper.as_deref(),
                master: self.master.as_ref().map(OwnedTuple::view),
                seq_adj: self.seq_adj.map(|(o, r)| SeqAdjFields {
                    orig: o.then_some(dir),
                    reply: r.then_some(dir),
                }),
                synproxy: None,
            }
        }
    }

    fn edge_flow() -> impl Strategy<Value = OwnedFlow> {
        (
            prop::option::weighted(
                0.9,
                (
                    prop_oneof![3 => Just(0u32), 1 => edge_u32()],
                    -1i32..4,
                    prop::option::weighted(0.95, mostly_valid_tuple()),
                ),
            ),
            prop::option::weighted(0.95, mostly_valid_tuple()),
            prop::array::uniform3(any::<u32>()),
            prop::sample::select(vec![0usize, 5, 16, 17]).prop_map(|n| vec![0xa5; n]),
            prop::option::of(edge_protoinfo()),
            prop::option::of("[a-z\\x00]{0,17}"),
            prop::option::weighted(0.2, mostly_valid_tuple()),
            prop::option::weighted(0.2, (any::<bool>(), any::<bool>())),
        )
            .prop_map(
                |(key, reply, scalars, labels, protoinfo, helper, master, seq_adj)| OwnedFlow {
                    key,
                    reply,
                    scalars,
                    labels,
                    protoinfo,
                    helper,
                    master,
                    seq_adj,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn fast_and_checked_tuple_validation_agree(t in edge_tuple()) {
            prop_assert_eq!(tuple_fast(&t.view()), tuple_checked(&t.view()).ok());
        }

        #[test]
        fn fast_and_checked_flow_validation_agree(f in edge_flow()) {
            if let Some(k) = f.key_view() {
                prop_assert_eq!(key_fast(&k), key_checked(&k).ok());
            }
            prop_assert_eq!(flow_fast(&f.view()), flow_checked(&f.view()).ok());
        }
    }

    proptest! {
        #[test]
        fn message_round_trips_through_bytes(msg in arb_message()) {
            let bytes = encode(&msg).encode_to_vec();
            let back = decode(pb::PeerMessage::decode(bytes.as_slice()).unwrap()).unwrap();
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn flow_round_trips(flow in arb_flow()) {
            let back = Flow::try_from(pb::Flow::from(&flow)).unwrap();
            prop_assert_eq!(back, flow);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(m) = pb::PeerMessage::decode(bytes.as_slice()) {
                let _ = decode(m);
            }
        }

        #[test]
        fn mutated_flows_never_panic(flow in arb_flow(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = pb::Flow::from(&flow).encode_to_vec();
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            if let Ok(f) = pb::Flow::decode(bytes.as_slice()) {
                let _ = Flow::try_from(f);
            }
        }
    }

    // ---- Rejections ----

    fn tcp_flow() -> Flow {
        let orig = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::TCP,
            l4: L4::Ports { src: 1000, dst: 80 },
        };
        Flow::new(Zone::default(), orig, orig.inverse())
    }

    fn batch_of(flow: pb::Flow) -> pb::PeerMessage {
        pb::PeerMessage {
            body: Some(Body::Batch(pb::Batch {
                epoch: 1,
                seq: 1,
                upserts: vec![pb::FlowUpdate {
                    version: 1,
                    flow: Some(flow),
                }],
                deletes: vec![],
            })),
        }
    }

    /// Decodes a batch holding `tcp_flow()` changed by `f`, expecting an error.
    fn reject(f: impl FnOnce(&mut pb::Flow)) -> WireError {
        let mut pf = pb::Flow::from(&tcp_flow());
        f(&mut pf);
        decode(batch_of(pf)).unwrap_err()
    }

    fn orig(pf: &mut pb::Flow) -> &mut pb::Tuple {
        pf.key.as_mut().unwrap().orig.as_mut().unwrap()
    }

    #[test]
    fn unchanged_flow_is_accepted() {
        let m = Message::Batch(Batch {
            epoch: 1,
            seq: 1,
            upserts: vec![(1, tcp_flow())],
            deletes: vec![],
        });
        assert_eq!(decode(batch_of(pb::Flow::from(&tcp_flow()))).unwrap(), m);
    }

    #[test]
    fn rejects_empty_message() {
        let e = decode(pb::PeerMessage::default()).unwrap_err();
        assert_eq!(e, WireError::EmptyMessage);
        assert!(e.to_string().contains("without a body"));
    }

    #[test]
    fn rejects_unknown_message_type_as_empty() {
        // Field 15 (a type from a later version) is skipped by prost, leaving no body.
        let bytes = [0x7a, 0x00];
        let m = pb::PeerMessage::decode(&bytes[..]).unwrap();
        assert_eq!(decode(m).unwrap_err(), WireError::EmptyMessage);
    }

    #[test]
    fn rejects_bad_address_length() {
        let e = reject(|f| {
            let t = orig(f);
            t.src = vec![10, 0, 0].into();
            t.src_v4 = None;
        });
        assert_eq!(
            e,
            WireError::AddressLength {
                field: "batch.upserts[0].flow.key.orig.src".into(),
                len: 3
            }
        );
        assert_eq!(
            e.to_string(),
            "batch.upserts[0].flow.key.orig.src: address of 3 bytes, expected 4 (IPv4) or 16 (IPv6)"
        );
        let e = reject(|f| {
            let t = orig(f);
            t.dst = vec![0; 5].into();
            t.dst_v4 = None;
        });
        assert_eq!(e.field(), "batch.upserts[0].flow.key.orig.dst");
    }

    #[test]
    fn ipv4_addresses_go_in_the_fixed32_fields() {
        let pt = pb::Tuple::from(&tcp_flow().key.orig);
        assert!(pt.src.is_empty() && pt.dst.is_empty());
        assert_eq!(pt.src_v4, Some(0x0a00_0001));
        assert_eq!(pt.dst_v4, Some(0x0a00_0002));
        // On the wire: tag 9 and 10, wire type 5 (fixed32), little-endian; nothing for src/dst.
        let bytes = pt.encode_to_vec();
        assert!(
            bytes.starts_with(&[0x18, 6, 0x20, 0xe8, 0x07, 0x28, 80]),
            "{bytes:02x?}"
        );
        assert!(
            bytes.ends_with(&[0x4d, 1, 0, 0, 0x0a, 0x55, 2, 0, 0, 0x0a]),
            "{bytes:02x?}"
        );
        // 0.0.0.0 is a present field, not an absent one.
        let zero = Tuple {
            src: Ipv4Addr::UNSPECIFIED.into(),
            ..tcp_flow().key.orig
        };
        let pt = pb::Tuple::decode(pb::Tuple::from(&zero).encode_to_vec().as_slice()).unwrap();
        assert_eq!(pt.src_v4, Some(0));
        assert_eq!(Tuple::try_from(pt).unwrap(), zero);
        // The whole flow round-trips, reply and master included.
        let mut flow = tcp_flow();
        flow.set_master(Some(flow.key.orig));
        let pf = pb::Flow::from(&flow);
        for t in [&pf.key.as_ref().unwrap().orig, &pf.reply, &pf.master] {
            let t = t.as_ref().unwrap();
            assert!(t.src.is_empty() && t.dst.is_empty());
            assert!(t.src_v4.is_some() && t.dst_v4.is_some());
        }
        assert_eq!(Flow::try_from(pf).unwrap(), flow);
    }

    #[test]
    fn ipv6_addresses_stay_in_bytes() {
        let t = Tuple {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
            proto: proto::UDP,
            l4: L4::Ports { src: 53, dst: 53 },
        };
        let pt = pb::Tuple::from(&t);
        assert_eq!((pt.src.len(), pt.dst.len()), (16, 16));
        assert_eq!((pt.src_v4, pt.dst_v4), (None, None));
        assert_eq!(Tuple::try_from(pt).unwrap(), t);
    }

    #[test]
    fn ipv4_as_four_bytes_from_older_peers_is_accepted() {
        let flow = tcp_flow();
        let mut pf = pb::Flow::from(&flow);
        // What a 1.0 sender writes: 4 bytes, no fixed32 field.
        let key_orig = pf.key.as_mut().unwrap().orig.as_mut().unwrap();
        for t in [key_orig, pf.reply.as_mut().unwrap()] {
            t.src = t.src_v4.take().unwrap().to_be_bytes().to_vec().into();
            t.dst = t.dst_v4.take().unwrap().to_be_bytes().to_vec().into();
        }
        assert_eq!(pf.reply.as_ref().unwrap().dst, vec![10, 0, 0, 1]);
        assert_eq!(decode(batch_of(pf.clone())).unwrap(), {
            Message::Batch(Batch {
                epoch: 1,
                seq: 1,
                upserts: vec![(1, flow.clone())],
                deletes: vec![],
            })
        });
        // One address of each form in a tuple is fine too: each address is read on its own.
        orig(&mut pf).dst_v4 = Some(0x0a00_0002);
        orig(&mut pf).dst.clear();
        assert_eq!(Flow::try_from(pf).unwrap(), flow);
    }

    #[test]
    fn rejects_an_address_in_both_forms() {
        let e = reject(|f| orig(f).src = vec![10, 0, 0, 1].into());
        assert_eq!(
            e,
            WireError::AddressTwice {
                field: "batch.upserts[0].flow.key.orig.src".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "batch.upserts[0].flow.key.orig.src: address given both as bytes and in \
             batch.upserts[0].flow.key.orig.src_v4, expected one form"
        );
        // Even when the bytes are IPv6: no guessing which form the sender meant.
        let e = reject(|f| f.reply.as_mut().unwrap().dst = vec![0; 16].into());
        assert_eq!(e.field(), "batch.upserts[0].flow.reply.dst");
        assert!(matches!(e, WireError::AddressTwice { .. }));
    }

    #[test]
    fn rejects_an_address_in_neither_form() {
        let e = reject(|f| orig(f).dst_v4 = None);
        assert_eq!(
            e,
            WireError::AddressMissing {
                field: "batch.upserts[0].flow.key.orig.dst".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "batch.upserts[0].flow.key.orig.dst: address missing, expected 16 bytes (IPv6) or \
             batch.upserts[0].flow.key.orig.dst_v4 (IPv4)"
        );
        let m = pb::PeerMessage {
            body: Some(Body::Batch(pb::Batch {
                deletes: vec![pb::FlowDelete {
                    version: 1,
                    key: Some(pb::FlowKey {
                        orig: Some(pb::Tuple {
                            src_v4: Some(1),
                            proto: proto::TCP.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            })),
        };
        let e = decode(m).unwrap_err();
        assert_eq!(e.field(), "batch.deletes[0].key.orig.dst");
        assert!(matches!(e, WireError::AddressMissing { .. }));
    }

    #[test]
    fn rejects_mixed_families() {
        let e = reject(|f| {
            let t = orig(f);
            t.dst = vec![0; 16].into();
            t.dst_v4 = None;
        });
        assert_eq!(
            e,
            WireError::MixedFamily {
                field: "batch.upserts[0].flow.key.orig".into()
            }
        );
    }

    #[test]
    fn rejects_out_of_range_numbers() {
        let e = reject(|f| orig(f).src_port = 65536);
        assert_eq!(
            e,
            WireError::OutOfRange {
                field: "batch.upserts[0].flow.key.orig.src_port".into(),
                value: 65536,
                bits: 16
            }
        );
        assert_eq!(
            reject(|f| orig(f).proto = 256).field(),
            "batch.upserts[0].flow.key.orig.proto"
        );
        assert_eq!(
            reject(|f| f.key.as_mut().unwrap().zone = 70000).field(),
            "batch.upserts[0].flow.key.zone"
        );
        let e = reject(|f| {
            f.protoinfo = Some(pb::flow::Protoinfo::Tcp(pb::TcpInfo {
                state: 256,
                ..Default::default()
            }))
        });
        assert_eq!(e.field(), "batch.upserts[0].flow.tcp.state");
        for (field, info) in [
            (
                "tcp.wscale_orig",
                pb::flow::Protoinfo::Tcp(pb::TcpInfo {
                    wscale_orig: 300,
                    ..Default::default()
                }),
            ),
            (
                "tcp.flags_reply",
                pb::flow::Protoinfo::Tcp(pb::TcpInfo {
                    flags_reply: 300,
                    ..Default::default()
                }),
            ),
            (
                "sctp.state",
                pb::flow::Protoinfo::Sctp(pb::SctpInfo {
                    state: 300,
                    ..Default::default()
                }),
            ),
            (
                "dccp.role",
                pb::flow::Protoinfo::Dccp(pb::DccpInfo {
                    role: 300,
                    ..Default::default()
                }),
            ),
        ] {
            let e = reject(|f| f.protoinfo = Some(info));
            assert_eq!(e.field(), format!("batch.upserts[0].flow.{field}"));
        }
    }

    #[test]
    fn rejects_out_of_range_icmp_fields() {
        let icmp = |f: &mut pb::Flow, t: pb::Tuple| {
            *orig(f) = pb::Tuple {
                proto: proto::ICMP.into(),
                ..t
            }
        };
        let base = pb::Tuple {
            src: vec![10, 0, 0, 1].into(),
            dst: vec![10, 0, 0, 2].into(),
            ..Default::default()
        };
        let e = reject(|f| {
            icmp(
                f,
                pb::Tuple {
                    icmp_type: 256,
                    ..base.clone()
                },
            )
        });
        assert_eq!(e.field(), "batch.upserts[0].flow.key.orig.icmp_type");
        let e = reject(|f| {
            icmp(
                f,
                pb::Tuple {
                    icmp_id: 1 << 16,
                    ..base.clone()
                },
            )
        });
        assert_eq!(e.field(), "batch.upserts[0].flow.key.orig.icmp_id");
        let e = reject(|f| {
            icmp(
                f,
                pb::Tuple {
                    icmp_code: 999,
                    ..base.clone()
                },
            )
        });
        assert_eq!(e.field(), "batch.upserts[0].flow.key.orig.icmp_code");
    }

    #[test]
    fn rejects_layer4_fields_a_protocol_does_not_use() {
        // ICMP fields on TCP.
        let e = reject(|f| orig(f).icmp_type = 8);
        assert_eq!(
            e,
            WireError::UnusedL4 {
                field: "batch.upserts[0].flow.key.orig.icmp_type".into(),
                proto: proto::TCP,
                what: "ICMP id, type and code"
            }
        );
        // Ports on ICMP.
        let e = reject(|f| {
            let t = orig(f);
            t.proto = proto::ICMP.into();
            t.src_port = 0;
            t.dst_port = 7;
        });
        assert_eq!(e.field(), "batch.upserts[0].flow.key.orig.dst_port");
        // Anything on a protocol without layer-4 identifiers (here OSPF, 89).
        let e = reject(|f| orig(f).proto = 89);
        assert_eq!(e.field(), "batch.upserts[0].flow.key.orig.src_port");
        assert_eq!(
            e.to_string(),
            "batch.upserts[0].flow.key.orig.src_port: must be 0 for IP protocol 89, which has no ports"
        );
        let e = reject(|f| {
            let t = orig(f);
            t.proto = 89;
            t.src_port = 0;
            t.dst_port = 0;
            t.icmp_code = 1;
        });
        assert_eq!(e.field(), "batch.upserts[0].flow.key.orig.icmp_code");
    }

    #[test]
    fn protocol_without_layer4_decodes_as_none() {
        let mut pf = pb::Flow::from(&tcp_flow());
        let key_orig = pf.key.as_mut().unwrap().orig.as_mut().unwrap();
        for t in [key_orig, pf.reply.as_mut().unwrap()] {
            t.proto = 89;
            t.src_port = 0;
            t.dst_port = 0;
        }
        let f = Flow::try_from(pf).unwrap();
        assert_eq!(f.key.orig.l4, L4::None);
        assert_eq!(f.key.orig.proto, 89);
    }

    #[test]
    fn rejects_bad_labels() {
        for len in [1, 15, 17, 32] {
            let e = reject(|f| f.labels = vec![0; len].into());
            assert_eq!(
                e,
                WireError::LabelsLength {
                    field: "batch.upserts[0].flow.labels".into(),
                    len
                }
            );
        }
    }

    #[test]
    fn rejects_helper_names_the_kernel_cannot_hold() {
        for name in ["x".repeat(16), "x".repeat(70_000), "ft\0p".into()] {
            let len = name.len();
            let e = reject(|f| f.helper = Some(name.clone()));
            assert_eq!(
                e,
                WireError::HelperName {
                    field: "batch.upserts[0].flow.helper".into(),
                    len
                }
            );
        }
    }

    #[test]
    fn labels_are_big_endian_bit_n_is_label_n() {
        let mut flow = tcp_flow();
        flow.set_labels(1); // label 0
        assert_eq!(pb::Flow::from(&flow).labels, {
            let mut v = vec![0; 16];
            v[15] = 1;
            v
        });
        flow.set_labels(1 << 127); // label 127
        assert_eq!(pb::Flow::from(&flow).labels[0], 0x80);
        flow.set_labels(0);
        assert!(pb::Flow::from(&flow).labels.is_empty());
        // 16 zero bytes from another encoder mean no label as well.
        let mut pf = pb::Flow::from(&flow);
        pf.labels = vec![0; 16].into();
        assert_eq!(Flow::try_from(pf).unwrap().labels(), 0);
    }

    #[test]
    fn rejects_missing_submessages() {
        type Change = fn(&mut pb::Flow);
        let cases: [(&str, Change); 6] = [
            ("key", |f| f.key = None),
            ("reply", |f| f.reply = None),
            ("key.orig", |f| f.key.as_mut().unwrap().orig = None),
            ("seq_adj.orig", |f| {
                f.seq_adj = Some(pb::SeqAdj {
                    orig: None,
                    reply: Some(pb::SeqAdjDir::default()),
                })
            }),
            ("seq_adj.reply", |f| {
                f.seq_adj = Some(pb::SeqAdj {
                    orig: Some(pb::SeqAdjDir::default()),
                    reply: None,
                })
            }),
            ("master.src", |f| f.master = Some(pb::Tuple::default())),
        ];
        for (field, change) in cases {
            let e = reject(change);
            assert_eq!(e.field(), format!("batch.upserts[0].flow.{field}"), "{e}");
        }
    }

    #[test]
    fn rejects_missing_flow_and_key_in_batch() {
        let m = pb::PeerMessage {
            body: Some(Body::Batch(pb::Batch {
                upserts: vec![
                    pb::FlowUpdate {
                        version: 1,
                        flow: Some(pb::Flow::from(&tcp_flow())),
                    },
                    pb::FlowUpdate {
                        version: 2,
                        flow: None,
                    },
                ],
                ..Default::default()
            })),
        };
        assert_eq!(
            decode(m).unwrap_err(),
            WireError::Missing {
                field: "batch.upserts[1].flow".into()
            }
        );
        let m = pb::PeerMessage {
            body: Some(Body::Batch(pb::Batch {
                deletes: vec![pb::FlowDelete {
                    version: 1,
                    key: None,
                }],
                ..Default::default()
            })),
        };
        let e = decode(m).unwrap_err();
        assert_eq!(e.field(), "batch.deletes[0].key");
        assert_eq!(e.to_string(), "batch.deletes[0].key: required but missing");
    }

    #[test]
    fn rejects_unknown_zone_direction() {
        let e = reject(|f| f.key.as_mut().unwrap().zone_dir = 3);
        assert_eq!(
            e,
            WireError::UnknownEnum {
                field: "batch.upserts[0].flow.key.zone_dir".into(),
                value: 3
            }
        );
    }

    #[test]
    fn hello_round_trips() {
        let m = Message::Hello(Hello {
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            cluster: "c".into(),
            node_id: "fw1".into(),
            epoch: 7,
            have_epoch: 3,
            have_seq: 9,
        });
        assert_eq!(decode(encode(&m)).unwrap(), m);
    }
}
