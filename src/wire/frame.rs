//! A hand-written protobuf codec for the peer messages: [`Message`] to bytes and back, without
//! the intermediate [`pb`](super::pb) messages of prost.
//!
//! Why: replicating a flow through prost meant building a `pb::Flow` tree (six nesting levels,
//! several allocations), having prost recompute each submessage's length at every level above it,
//! then decoding into another tree and converting that; it was the largest userspace cost of the
//! peer transport. Here a flow is written straight from the model and read straight into it.
//!
//! The protobuf semantics are prost's, exactly, so that this codec is interchangeable with
//! [`super::encode`]/[`super::decode`] plus prost (the reference, which the tests compare with):
//! - encoding writes fields in tag order and leaves out proto3 defaults, byte for byte as prost;
//! - decoding accepts any valid encoding: fields in any order, unknown fields (groups included)
//!   skipped, last value wins for scalars, repeated occurrences of an embedded message merged;
//!   `uint32` and enum values are truncated from their varint as prost does;
//! - what prost refuses is a [`ProtobufError`]; what decodes but breaks a model rule is the very
//!   [`WireError`] of [`super::decode`], produced by the same validation code
//!   ([`super::FlowFields`] and friends).

use super::{
    delete_from_fields, upsert_from_fields, FlowFields, KeyFields, ProtoinfoFields, SeqAdjFields,
    TupleFields, WireError,
};
use crate::flow::{Flow, FlowKey, ProtoInfo, SeqAdjDir, Synproxy, Tuple, ZoneDir, L4};
use crate::sync::{Batch, Hello, Message};
use prost::bytes::BufMut;
use std::net::IpAddr;

// ---- Errors ----

/// Why bytes are not a valid protobuf encoding of a peer message (prost would refuse them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtobufError {
    /// A varint longer than 10 bytes, overflowing 64 bits, or cut short.
    #[error("invalid varint")]
    InvalidVarint,
    /// A field key above 32 bits.
    #[error("invalid key value")]
    InvalidKey,
    /// Wire type 6 or 7.
    #[error("invalid wire type value: {0}")]
    InvalidWireType(u8),
    /// Field number 0.
    #[error("invalid tag value: 0")]
    InvalidTag,
    /// A known field with another wire type than its schema's.
    #[error("field {tag}: wire type {actual}, expected {expected}")]
    UnexpectedWireType {
        /// Field number.
        tag: u32,
        /// Wire type received.
        actual: u8,
        /// Wire type of the schema.
        expected: u8,
    },
    /// A field or length runs past the end of its message.
    #[error("buffer underflow")]
    BufferUnderflow,
    /// An end-group key without its start, or of another group.
    #[error("unexpected end group tag")]
    UnexpectedEndGroup,
    /// A string field that is not UTF-8.
    #[error("invalid string value: data is not UTF-8 encoded")]
    InvalidString,
    /// Nesting deeper than prost's limit (100), only reachable with nested unknown groups.
    #[error("recursion limit reached")]
    RecursionLimit,
}

/// Why [`decode_message`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a valid protobuf encoding.
    #[error("failed to decode Protobuf message: {0}")]
    Protobuf(#[from] ProtobufError),
    /// Valid protobuf, but not a valid message (what [`super::decode`] refuses).
    #[error(transparent)]
    Wire(#[from] WireError),
}

type Parse<T> = Result<T, ProtobufError>;

// ---- Encoding: lengths ----

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// The key byte of a field; every field of the schema has a number below 16, so one byte.
const fn key(tag: u8, wire_type: u8) -> u8 {
    tag << 3 | wire_type
}

/// Bytes of `v` as a varint (prost's formula: no branch, no loop).
#[inline]
fn varint_len(v: u64) -> usize {
    ((((v | 1).leading_zeros() ^ 63) * 9 + 73) / 64) as usize
}

/// Bytes of a scalar field, which proto3 leaves out when 0.
#[inline]
fn scalar_len(v: impl Into<u64>) -> usize {
    match v.into() {
        0 => 0,
        v => 1 + varint_len(v),
    }
}

/// [`scalar_len`] of a byte, without branches: every flow's TCP state is five of them.
#[inline]
fn byte_len(v: u8) -> usize {
    2 * usize::from(v != 0) + usize::from(v >= 0x80)
}

/// Bytes of a present length-delimited field whose content is `len` bytes.
#[inline]
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes of an address field: IPv4 in its `fixed32`, IPv6 as 16 bytes.
fn addr_len(a: &IpAddr) -> usize {
    match a {
        IpAddr::V4(_) => 5,
        IpAddr::V6(_) => 18,
    }
}

fn tuple_len(t: &Tuple) -> usize {
    let l4 = match t.l4 {
        L4::None => 0,
        L4::Ports { src, dst } => scalar_len(src) + scalar_len(dst),
        L4::Icmp { id, kind, code } => scalar_len(id) + scalar_len(kind) + scalar_len(code),
    };
    addr_len(&t.src) + addr_len(&t.dst) + scalar_len(t.proto) + l4
}

fn zone_dir_number(d: ZoneDir) -> u8 {
    match d {
        ZoneDir::Both => 0,
        ZoneDir::Original => 1,
        ZoneDir::Reply => 2,
    }
}

fn key_len_with(k: &FlowKey, orig_len: usize) -> usize {
    scalar_len(k.zone.id) + scalar_len(zone_dir_number(k.zone.dir)) + field_len(orig_len)
}

/// Bytes of the protocol state's content (without its own key and length), if any.
fn protoinfo_len(p: &ProtoInfo) -> Option<usize> {
    Some(match *p {
        ProtoInfo::None => return None,
        ProtoInfo::Tcp(t) => [
            t.state,
            t.wscale_orig,
            t.wscale_reply,
            t.flags_orig,
            t.flags_reply,
        ]
        .into_iter()
        .map(byte_len)
        .sum(),
        ProtoInfo::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        } => scalar_len(state) + scalar_len(vtag_orig) + scalar_len(vtag_reply),
        ProtoInfo::Dccp {
            state,
            role,
            handshake_seq,
        } => scalar_len(state) + scalar_len(role) + scalar_len(handshake_seq),
    })
}

fn seq_adj_dir_len(d: &SeqAdjDir) -> usize {
    scalar_len(d.correction_pos) + scalar_len(d.offset_before) + scalar_len(d.offset_after)
}

fn synproxy_len(s: &Synproxy) -> usize {
    scalar_len(s.isn) + scalar_len(s.its) + scalar_len(s.tsoff)
}

/// Bytes of the fields almost no flow has (labels, helper, master, sequence adjustment, SYN
/// proxy), all behind one pointer in [`Flow`].
fn rare_len(f: &Flow) -> usize {
    let mut n = 0;
    if f.labels() != 0 {
        n += field_len(16);
    }
    if let Some(h) = f.helper() {
        n += field_len(h.len());
    }
    if let Some(m) = f.master() {
        n += field_len(tuple_len(m));
    }
    if let Some(s) = f.seq_adj() {
        n += field_len(field_len(seq_adj_dir_len(&s.orig)) + field_len(seq_adj_dir_len(&s.reply)));
    }
    if let Some(s) = f.synproxy() {
        n += field_len(synproxy_len(s));
    }
    n
}

/// The lengths of a flow's submessages, computed once and used both for the flow's own length
/// and for writing each submessage's length prefix.
struct FlowLens {
    orig: usize,
    key: usize,
    reply: usize,
    flow: usize,
}

impl FlowLens {
    fn of(f: &Flow) -> FlowLens {
        let orig = tuple_len(&f.key.orig);
        let key = key_len_with(&f.key, orig);
        let reply = tuple_len(&f.reply);
        let flow = field_len(key)
            + field_len(reply)
            + scalar_len(f.status)
            + scalar_len(f.timeout)
            + scalar_len(f.mark)
            + protoinfo_len(&f.protoinfo()).map_or(0, field_len)
            + rare_len(f);
        FlowLens {
            orig,
            key,
            reply,
            flow,
        }
    }
}

fn update_len(version: u64, flow_len: usize) -> usize {
    scalar_len(version) + field_len(flow_len)
}

fn delete_len(version: u64, key: &FlowKey) -> usize {
    scalar_len(version) + field_len(key_len_with(key, tuple_len(&key.orig)))
}

/// The batch's content length; the lengths of its flows are kept in `lens` for the writing.
fn batch_len(b: &Batch, lens: &mut Vec<FlowLens>) -> usize {
    lens.extend(b.upserts.iter().map(|(_, f)| FlowLens::of(f)));
    let upserts: usize = b
        .upserts
        .iter()
        .zip(lens.iter())
        .map(|((v, _), l)| field_len(update_len(*v, l.flow)))
        .sum();
    let deletes: usize = b
        .deletes
        .iter()
        .map(|(v, k)| field_len(delete_len(*v, k)))
        .sum();
    scalar_len(b.epoch) + scalar_len(b.seq) + upserts + deletes
}

fn str_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field_len(s.len())
    }
}

/// Field number of the message's variant in `PeerMessage.body`, and its content's length;
/// a batch's flow lengths go to `lens`.
fn body_len(msg: &Message, lens: &mut Vec<FlowLens>) -> (u8, usize) {
    match msg {
        Message::Hello(h) => (
            1,
            scalar_len(h.version_major)
                + scalar_len(h.version_minor)
                + str_len(&h.cluster)
                + str_len(&h.node_id)
                + scalar_len(h.epoch)
                + scalar_len(h.have_epoch)
                + scalar_len(h.have_seq),
        ),
        Message::Batch(b) => (2, batch_len(b, lens)),
        Message::Ack { epoch, seq } => (3, scalar_len(*epoch) + scalar_len(*seq)),
        Message::ResyncRequest { reason } => (4, str_len(reason)),
        Message::SnapshotBegin { epoch, seq, id } => {
            (5, scalar_len(*epoch) + scalar_len(*seq) + scalar_len(*id))
        }
        Message::SnapshotEnd {
            epoch,
            seq,
            id,
            flows,
        } => (
            6,
            scalar_len(*epoch) + scalar_len(*seq) + scalar_len(*id) + scalar_len(*flows),
        ),
        Message::Heartbeat {
            epoch,
            sent_unix_ms,
        } => (7, scalar_len(*epoch) + scalar_len(*sent_unix_ms)),
    }
}

// ---- Encoding: writing ----

/// A message with its length known: lets a caller size its buffer once before writing.
pub struct SizedMessage<'m> {
    msg: &'m Message,
    tag: u8,
    body: usize,
    /// The lengths of a batch's flows, needed again for their length prefixes when writing:
    /// computing them twice was a sixth of the encoding's instructions.
    lens: Vec<FlowLens>,
}

impl<'m> SizedMessage<'m> {
    /// Computes the encoded length of `msg` (one walk over its flows).
    pub fn new(msg: &'m Message) -> Self {
        let mut lens = Vec::new();
        let (tag, body) = body_len(msg, &mut lens);
        SizedMessage {
            msg,
            tag,
            body,
            lens,
        }
    }

    /// Bytes [`SizedMessage::encode`] writes.
    pub fn len(&self) -> usize {
        field_len(self.body)
    }

    /// Always false: every message has a body. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message; `buf` must have room for [`SizedMessage::len`] bytes.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_len_field(buf, key(self.tag, LEN), self.body);
        put_body(self.msg, &self.lens, buf);
    }
}

/// Bytes [`encode_message`] writes for `msg`.
pub fn encoded_len(msg: &Message) -> usize {
    SizedMessage::new(msg).len()
}

/// Encodes `msg` as a `PeerMessage`, byte for byte as prost encodes [`super::encode`]'s result.
pub fn encode_message(msg: &Message, buf: &mut impl BufMut) {
    SizedMessage::new(msg).encode(buf);
}

#[inline]
fn put_varint(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

#[inline]
fn put_scalar(buf: &mut impl BufMut, key: u8, v: impl Into<u64>) {
    let v = v.into();
    if v != 0 {
        buf.put_u8(key);
        put_varint(buf, v);
    }
}

#[inline]
fn put_len_field(buf: &mut impl BufMut, key: u8, len: usize) {
    buf.put_u8(key);
    put_varint(buf, len as u64);
}

fn put_bytes(buf: &mut impl BufMut, key: u8, b: &[u8]) {
    if !b.is_empty() {
        put_len_field(buf, key, b.len());
        buf.put_slice(b);
    }
}

fn put_body(msg: &Message, lens: &[FlowLens], buf: &mut impl BufMut) {
    match msg {
        Message::Hello(h) => {
            put_scalar(buf, key(1, VARINT), h.version_major);
            put_scalar(buf, key(2, VARINT), h.version_minor);
            put_bytes(buf, key(3, LEN), h.cluster.as_bytes());
            put_bytes(buf, key(4, LEN), h.node_id.as_bytes());
            put_scalar(buf, key(5, VARINT), h.epoch);
            put_scalar(buf, key(6, VARINT), h.have_epoch);
            put_scalar(buf, key(7, VARINT), h.have_seq);
        }
        Message::Batch(b) => put_batch(b, lens, buf),
        Message::Ack { epoch, seq } => put_scalars(buf, &[*epoch, *seq]),
        Message::ResyncRequest { reason } => put_bytes(buf, key(1, LEN), reason.as_bytes()),
        Message::SnapshotBegin { epoch, seq, id } => put_scalars(buf, &[*epoch, *seq, *id]),
        Message::SnapshotEnd {
            epoch,
            seq,
            id,
            flows,
        } => put_scalars(buf, &[*epoch, *seq, *id, *flows]),
        Message::Heartbeat {
            epoch,
            sent_unix_ms,
        } => put_scalars(buf, &[*epoch, *sent_unix_ms]),
    }
}

/// Writes `values` as varint fields 1, 2, …
fn put_scalars(buf: &mut impl BufMut, values: &[u64]) {
    for (tag, v) in (1..).zip(values) {
        put_scalar(buf, key(tag, VARINT), *v);
    }
}

fn put_batch(b: &Batch, lens: &[FlowLens], buf: &mut impl BufMut) {
    put_scalar(buf, key(1, VARINT), b.epoch);
    put_scalar(buf, key(2, VARINT), b.seq);
    for ((version, flow), lens) in b.upserts.iter().zip(lens) {
        put_len_field(buf, key(3, LEN), update_len(*version, lens.flow));
        put_scalar(buf, key(1, VARINT), *version);
        put_len_field(buf, key(2, LEN), lens.flow);
        put_flow(flow, lens, buf);
    }
    for (version, k) in &b.deletes {
        let orig = tuple_len(&k.orig);
        put_len_field(buf, key(4, LEN), delete_len(*version, k));
        put_scalar(buf, key(1, VARINT), *version);
        put_len_field(buf, key(2, LEN), key_len_with(k, orig));
        put_key(k, orig, buf);
    }
}

fn put_addr(buf: &mut impl BufMut, bytes_key: u8, a: &IpAddr) {
    if let IpAddr::V6(a) = a {
        put_len_field(buf, bytes_key, 16);
        buf.put_slice(&a.octets());
    }
}

/// Writes a tuple's fields, in tag order: the IPv6 bytes (1, 2) come first, the IPv4 `fixed32`s
/// (9, 10) last.
fn put_tuple(t: &Tuple, buf: &mut impl BufMut) {
    put_addr(buf, key(1, LEN), &t.src);
    put_addr(buf, key(2, LEN), &t.dst);
    put_scalar(buf, key(3, VARINT), t.proto);
    match t.l4 {
        L4::None => {}
        L4::Ports { src, dst } => {
            put_scalar(buf, key(4, VARINT), src);
            put_scalar(buf, key(5, VARINT), dst);
        }
        L4::Icmp { id, kind, code } => {
            put_scalar(buf, key(6, VARINT), id);
            put_scalar(buf, key(7, VARINT), kind);
            put_scalar(buf, key(8, VARINT), code);
        }
    }
    for (k, a) in [(key(9, FIXED32), &t.src), (key(10, FIXED32), &t.dst)] {
        if let IpAddr::V4(a) = a {
            buf.put_u8(k);
            buf.put_u32_le(a.to_bits());
        }
    }
}

fn put_key(k: &FlowKey, orig_len: usize, buf: &mut impl BufMut) {
    put_scalar(buf, key(1, VARINT), k.zone.id);
    put_scalar(buf, key(2, VARINT), zone_dir_number(k.zone.dir));
    put_len_field(buf, key(3, LEN), orig_len);
    put_tuple(&k.orig, buf);
}

fn put_flow(f: &Flow, lens: &FlowLens, buf: &mut impl BufMut) {
    put_len_field(buf, key(1, LEN), lens.key);
    put_key(&f.key, lens.orig, buf);
    put_len_field(buf, key(2, LEN), lens.reply);
    put_tuple(&f.reply, buf);
    put_scalar(buf, key(3, VARINT), f.status);
    put_scalar(buf, key(4, VARINT), f.timeout);
    put_scalar(buf, key(5, VARINT), f.mark);
    let labels = f.labels();
    if labels != 0 {
        put_len_field(buf, key(6, LEN), 16);
        buf.put_slice(&labels.to_be_bytes());
    }
    put_protoinfo(&f.protoinfo(), buf);
    if let Some(h) = f.helper() {
        // `optional`: written even when empty.
        put_len_field(buf, key(10, LEN), h.len());
        buf.put_slice(h.as_bytes());
    }
    if let Some(m) = f.master() {
        put_len_field(buf, key(11, LEN), tuple_len(m));
        put_tuple(m, buf);
    }
    if let Some(s) = f.seq_adj() {
        let (o, r) = (seq_adj_dir_len(&s.orig), seq_adj_dir_len(&s.reply));
        put_len_field(buf, key(12, LEN), field_len(o) + field_len(r));
        for (tag, d, len) in [(1, &s.orig, o), (2, &s.reply, r)] {
            put_len_field(buf, key(tag, LEN), len);
            put_scalars(
                buf,
                &[d.correction_pos, d.offset_before, d.offset_after].map(u64::from),
            );
        }
    }
    if let Some(s) = f.synproxy() {
        put_len_field(buf, key(13, LEN), synproxy_len(s));
        put_scalars(buf, &[s.isn, s.its, s.tsoff].map(u64::from));
    }
}

fn put_protoinfo(p: &ProtoInfo, buf: &mut impl BufMut) {
    let Some(len) = protoinfo_len(p) else {
        return;
    };
    match *p {
        ProtoInfo::None => {}
        ProtoInfo::Tcp(t) => {
            put_len_field(buf, key(7, LEN), len);
            let v = [
                t.state,
                t.wscale_orig,
                t.wscale_reply,
                t.flags_orig,
                t.flags_reply,
            ];
            put_scalars(buf, &v.map(u64::from));
        }
        ProtoInfo::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        } => {
            put_len_field(buf, key(8, LEN), len);
            put_scalars(buf, &[state.into(), vtag_orig.into(), vtag_reply.into()]);
        }
        ProtoInfo::Dccp {
            state,
            role,
            handshake_seq,
        } => {
            put_len_field(buf, key(9, LEN), len);
            put_scalars(buf, &[state.into(), role.into(), handshake_seq]);
        }
    }
}

// ---- Decoding: the protobuf layer ----

/// prost's recursion budget: each embedded message (and each nested unknown group) takes one.
const RECURSION_LIMIT: u32 = 100;

/// Reads a varint as prost does: at most 10 bytes, the 10th at most 1.
#[inline(always)]
fn get_varint(buf: &mut &[u8]) -> Parse<u64> {
    let bytes: &[u8] = buf;
    match *bytes {
        [b0, ref rest @ ..] if b0 < 0x80 => {
            *buf = rest;
            Ok(u64::from(b0))
        }
        [b0, b1, ref rest @ ..] if b1 < 0x80 => {
            *buf = rest;
            Ok(u64::from(b0 & 0x7f) | u64::from(b1) << 7)
        }
        _ => get_varint_slow(buf),
    }
}

/// [`get_varint`] for varints of 3 bytes or more, and errors.
#[inline(never)]
fn get_varint_slow(buf: &mut &[u8]) -> Parse<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let Some((&b, rest)) = buf.split_first() else {
            return Err(ProtobufError::InvalidVarint);
        };
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return if i == 9 && b >= 2 {
                Err(ProtobufError::InvalidVarint)
            } else {
                Ok(value)
            };
        }
    }
    Err(ProtobufError::InvalidVarint)
}

/// Reads a field key: (field number, wire type).
#[inline(always)]
fn get_key(buf: &mut &[u8]) -> Parse<(u32, u8)> {
    let k = get_varint(buf)?;
    let k = u32::try_from(k).map_err(|_| ProtobufError::InvalidKey)?;
    let wire_type = (k & 7) as u8;
    if wire_type > FIXED32 {
        return Err(ProtobufError::InvalidWireType(wire_type));
    }
    match k >> 3 {
        0 => Err(ProtobufError::InvalidTag),
        tag => Ok((tag, wire_type)),
    }
}

#[inline(always)]
fn take<'a>(buf: &mut &'a [u8], len: u64) -> Parse<&'a [u8]> {
    if len > buf.len() as u64 {
        return Err(ProtobufError::BufferUnderflow);
    }
    let (head, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(head)
}

/// One field of a message being read: its number, wire type and recursion budget.
#[derive(Clone, Copy)]
struct Field {
    tag: u32,
    wire_type: u8,
    depth: u32,
}

impl Field {
    #[inline(always)]
    fn expect(&self, wire_type: u8) -> Parse<()> {
        if self.wire_type == wire_type {
            Ok(())
        } else {
            Err(ProtobufError::UnexpectedWireType {
                tag: self.tag,
                actual: self.wire_type,
                expected: wire_type,
            })
        }
    }

    #[inline(always)]
    fn u64(&self, buf: &mut &[u8]) -> Parse<u64> {
        self.expect(VARINT)?;
        get_varint(buf)
    }

    /// A `uint32`: prost keeps the low 32 bits of the varint.
    #[inline(always)]
    fn u32(&self, buf: &mut &[u8]) -> Parse<u32> {
        Ok(self.u64(buf)? as u32)
    }

    /// An `int32` (the enum): prost keeps the low 32 bits of the varint.
    #[inline(always)]
    fn i32(&self, buf: &mut &[u8]) -> Parse<i32> {
        Ok(self.u64(buf)? as i32)
    }

    #[inline(always)]
    fn fixed32(&self, buf: &mut &[u8]) -> Parse<u32> {
        self.expect(FIXED32)?;
        let b = take(buf, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline(always)]
    fn bytes<'a>(&self, buf: &mut &'a [u8]) -> Parse<&'a [u8]> {
        self.expect(LEN)?;
        let len = get_varint(buf)?;
        take(buf, len)
    }

    fn str<'a>(&self, buf: &mut &'a [u8]) -> Parse<&'a str> {
        std::str::from_utf8(self.bytes(buf)?).map_err(|_| ProtobufError::InvalidString)
    }

    /// An embedded message: its bytes and the budget of its own fields.
    #[inline(always)]
    fn message<'a>(&self, buf: &mut &'a [u8]) -> Parse<(&'a [u8], u32)> {
        self.expect(LEN)?;
        if self.depth == 0 {
            return Err(ProtobufError::RecursionLimit);
        }
        let len = get_varint(buf)?;
        Ok((take(buf, len)?, self.depth - 1))
    }

    /// Skips a field this version does not know, as prost's `skip_field`.
    fn skip(&self, buf: &mut &[u8]) -> Parse<()> {
        if self.depth == 0 {
            return Err(ProtobufError::RecursionLimit);
        }
        let len = match self.wire_type {
            VARINT => get_varint(buf).map(|_| 0)?,
            FIXED64 => 8,
            LEN => get_varint(buf)?,
            START_GROUP => loop {
                let (tag, wire_type) = get_key(buf)?;
                if wire_type == END_GROUP {
                    if tag != self.tag {
                        return Err(ProtobufError::UnexpectedEndGroup);
                    }
                    break 0;
                }
                let inner = Field {
                    tag,
                    wire_type,
                    depth: self.depth - 1,
                };
                inner.skip(buf)?;
            },
            END_GROUP => return Err(ProtobufError::UnexpectedEndGroup),
            _ => 4,
        };
        take(buf, len).map(|_| ())
    }
}

/// Reads the fields of one message body into `target` with `field`, which handles the known
/// ones and skips the others; a repeated embedded message is merged by calling this again on
/// the same target.
#[inline(always)]
fn merge<'a, T>(
    target: &mut T,
    mut body: &'a [u8],
    depth: u32,
    mut field: impl FnMut(&mut T, Field, &mut &'a [u8]) -> Parse<()>,
) -> Parse<()> {
    while !body.is_empty() {
        let (tag, wire_type) = get_key(&mut body)?;
        field(
            target,
            Field {
                tag,
                wire_type,
                depth,
            },
            &mut body,
        )?;
    }
    Ok(())
}

/// Merges an embedded message field into `slot` (created empty on its first occurrence).
#[inline(always)]
fn merge_into<'a, T: Default>(
    slot: &mut Option<T>,
    f: Field,
    buf: &mut &'a [u8],
    merge_fn: impl FnOnce(&mut T, &'a [u8], u32) -> Parse<()>,
) -> Parse<()> {
    let (body, depth) = f.message(buf)?;
    merge_fn(slot.get_or_insert_with(T::default), body, depth)
}

// ---- Decoding: the schema ----

fn merge_tuple<'a>(t: &mut TupleFields<'a>, body: &'a [u8], depth: u32) -> Parse<()> {
    merge(t, body, depth, |t, f, buf| {
        match f.tag {
            1 => t.src = f.bytes(buf)?,
            2 => t.dst = f.bytes(buf)?,
            3 => t.proto = f.u32(buf)?,
            4 => t.src_port = f.u32(buf)?,
            5 => t.dst_port = f.u32(buf)?,
            6 => t.icmp_id = f.u32(buf)?,
            7 => t.icmp_type = f.u32(buf)?,
            8 => t.icmp_code = f.u32(buf)?,
            9 => t.src_v4 = Some(f.fixed32(buf)?),
            10 => t.dst_v4 = Some(f.fixed32(buf)?),
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

fn merge_key<'a>(k: &mut KeyFields<'a>, body: &'a [u8], depth: u32) -> Parse<()> {
    merge(k, body, depth, |k, f, buf| {
        match f.tag {
            1 => k.zone = f.u32(buf)?,
            2 => k.zone_dir = f.i32(buf)?,
            3 => merge_into(&mut k.orig, f, buf, merge_tuple)?,
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

fn merge_seq_adj_dir(d: &mut SeqAdjDir, body: &[u8], depth: u32) -> Parse<()> {
    merge(d, body, depth, |d, f, buf| {
        match f.tag {
            1 => d.correction_pos = f.u32(buf)?,
            2 => d.offset_before = f.u32(buf)?,
            3 => d.offset_after = f.u32(buf)?,
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

fn merge_seq_adj(s: &mut SeqAdjFields, body: &[u8], depth: u32) -> Parse<()> {
    merge(s, body, depth, |s, f, buf| match f.tag {
        1 => merge_into(&mut s.orig, f, buf, merge_seq_adj_dir),
        2 => merge_into(&mut s.reply, f, buf, merge_seq_adj_dir),
        _ => f.skip(buf),
    })
}

fn merge_synproxy(s: &mut Synproxy, body: &[u8], depth: u32) -> Parse<()> {
    merge(s, body, depth, |s, f, buf| {
        match f.tag {
            1 => s.isn = f.u32(buf)?,
            2 => s.its = f.u32(buf)?,
            3 => s.tsoff = f.u32(buf)?,
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

/// The `protoinfo` oneof: a second occurrence of the same variant merges into it, another
/// variant replaces it (prost's oneof semantics).
fn merge_protoinfo(p: &mut Option<ProtoinfoFields>, f: Field, buf: &mut &[u8]) -> Parse<()> {
    let (body, depth) = f.message(buf)?;
    let mut cur = match (f.tag, p.take()) {
        (7, Some(cur @ ProtoinfoFields::Tcp { .. }))
        | (8, Some(cur @ ProtoinfoFields::Sctp { .. }))
        | (9, Some(cur @ ProtoinfoFields::Dccp { .. })) => cur,
        (7, _) => ProtoinfoFields::Tcp {
            state: 0,
            wscale_orig: 0,
            wscale_reply: 0,
            flags_orig: 0,
            flags_reply: 0,
        },
        (8, _) => ProtoinfoFields::Sctp {
            state: 0,
            vtag_orig: 0,
            vtag_reply: 0,
        },
        _ => ProtoinfoFields::Dccp {
            state: 0,
            role: 0,
            handshake_seq: 0,
        },
    };
    merge(&mut cur, body, depth, merge_protoinfo_field)?;
    *p = Some(cur);
    Ok(())
}

fn merge_protoinfo_field(p: &mut ProtoinfoFields, f: Field, buf: &mut &[u8]) -> Parse<()> {
    match (p, f.tag) {
        (ProtoinfoFields::Tcp { state, .. }, 1)
        | (ProtoinfoFields::Sctp { state, .. }, 1)
        | (ProtoinfoFields::Dccp { state, .. }, 1) => *state = f.u32(buf)?,
        (ProtoinfoFields::Tcp { wscale_orig: v, .. }, 2)
        | (
            ProtoinfoFields::Tcp {
                wscale_reply: v, ..
            },
            3,
        )
        | (ProtoinfoFields::Tcp { flags_orig: v, .. }, 4)
        | (ProtoinfoFields::Tcp { flags_reply: v, .. }, 5)
        | (ProtoinfoFields::Sctp { vtag_orig: v, .. }, 2)
        | (ProtoinfoFields::Sctp { vtag_reply: v, .. }, 3)
        | (ProtoinfoFields::Dccp { role: v, .. }, 2) => *v = f.u32(buf)?,
        (ProtoinfoFields::Dccp { handshake_seq, .. }, 3) => *handshake_seq = f.u64(buf)?,
        _ => f.skip(buf)?,
    }
    Ok(())
}

fn merge_flow<'a>(fl: &mut FlowFields<'a>, body: &'a [u8], depth: u32) -> Parse<()> {
    merge(fl, body, depth, |fl, f, buf| {
        match f.tag {
            1 => merge_into(&mut fl.key, f, buf, merge_key)?,
            2 => merge_into(&mut fl.reply, f, buf, merge_tuple)?,
            3 => fl.status = f.u32(buf)?,
            4 => fl.timeout = f.u32(buf)?,
            5 => fl.mark = f.u32(buf)?,
            6 => fl.labels = f.bytes(buf)?,
            7..=9 => merge_protoinfo(&mut fl.protoinfo, f, buf)?,
            10 => fl.helper = Some(f.str(buf)?),
            11 => merge_into(&mut fl.master, f, buf, merge_tuple)?,
            12 => merge_into(&mut fl.seq_adj, f, buf, merge_seq_adj)?,
            13 => merge_into(&mut fl.synproxy, f, buf, merge_synproxy)?,
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

/// Reads changes laid out exactly as [`encode_message`] writes them, which is how every peer
/// sends them: each field at most once, in tag order, with the fields of a common flow only.
///
/// The general decoder above takes any valid protobuf (fields in any order, repeated, merged,
/// unknown), and that generality was most of its cost. This one tests each expected key byte
/// in turn and gives up on anything else: `None` sends the change to the general decoder, so
/// whatever this one accepts it reads as the general one would (property tests hold them
/// equal), and whatever it does not, errors included, is the general decoder's to judge.
/// Decoding a batch of 512 TCP flows took 1400 instructions per flow instead of 2330
/// (callgrind), validation and the building of each flow included.
mod canonical {
    use super::{get_varint, key, take, Change, FIXED32, LEN, VARINT};
    use crate::wire::{FlowFields, KeyFields, ProtoinfoFields, TupleFields};

    /// Consumes the key byte `k` if it comes next.
    #[inline(always)]
    fn eat(buf: &mut &[u8], k: u8) -> bool {
        match buf.split_first() {
            Some((&b, rest)) if b == k => {
                *buf = rest;
                true
            }
            _ => false,
        }
    }

    #[inline(always)]
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        get_varint(buf).ok()
    }

    /// A length-delimited value (bytes or an embedded message).
    #[inline(always)]
    fn delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = varint(buf)?;
        take(buf, len).ok()
    }

    /// A `FlowUpdate` or `FlowDelete`: its version and its item, read by `item`.
    #[inline(always)]
    pub(super) fn change<'a, T>(
        mut b: &'a [u8],
        item: impl FnOnce(&'a [u8]) -> Option<T>,
    ) -> Option<Change<T>> {
        let version = if eat(&mut b, key(1, VARINT)) {
            varint(&mut b)?
        } else {
            0
        };
        if !eat(&mut b, key(2, LEN)) {
            return None;
        }
        let item = item(delimited(&mut b)?)?;
        b.is_empty().then_some(Change {
            version,
            item: Some(item),
        })
    }

    pub(super) fn flow(mut b: &[u8]) -> Option<FlowFields<'_>> {
        let mut fl = FlowFields::default();
        if eat(&mut b, key(1, LEN)) {
            fl.key = Some(flow_key(delimited(&mut b)?)?);
        }
        if eat(&mut b, key(2, LEN)) {
            fl.reply = Some(tuple(delimited(&mut b)?)?);
        }
        if eat(&mut b, key(3, VARINT)) {
            fl.status = varint(&mut b)? as u32;
        }
        if eat(&mut b, key(4, VARINT)) {
            fl.timeout = varint(&mut b)? as u32;
        }
        if eat(&mut b, key(5, VARINT)) {
            fl.mark = varint(&mut b)? as u32;
        }
        if eat(&mut b, key(6, LEN)) {
            fl.labels = delimited(&mut b)?;
        }
        if eat(&mut b, key(7, LEN)) {
            fl.protoinfo = Some(tcp(delimited(&mut b)?)?);
        }
        // Other protocols' state, helper, master, sequence adjustment, synproxy: rare, and
        // left to the general decoder.
        b.is_empty().then_some(fl)
    }

    pub(super) fn flow_key(mut b: &[u8]) -> Option<KeyFields<'_>> {
        let mut k = KeyFields::default();
        if eat(&mut b, key(1, VARINT)) {
            k.zone = varint(&mut b)? as u32;
        }
        if eat(&mut b, key(2, VARINT)) {
            k.zone_dir = varint(&mut b)? as i32;
        }
        if eat(&mut b, key(3, LEN)) {
            k.orig = Some(tuple(delimited(&mut b)?)?);
        }
        b.is_empty().then_some(k)
    }

    fn tuple(mut b: &[u8]) -> Option<TupleFields<'_>> {
        let mut t = TupleFields::default();
        if eat(&mut b, key(1, LEN)) {
            t.src = delimited(&mut b)?;
        }
        if eat(&mut b, key(2, LEN)) {
            t.dst = delimited(&mut b)?;
        }
        for (tag, field) in [
            (3, &mut t.proto),
            (4, &mut t.src_port),
            (5, &mut t.dst_port),
            (6, &mut t.icmp_id),
            (7, &mut t.icmp_type),
            (8, &mut t.icmp_code),
        ] {
            if eat(&mut b, key(tag, VARINT)) {
                *field = varint(&mut b)? as u32;
            }
        }
        for (tag, field) in [(9, &mut t.src_v4), (10, &mut t.dst_v4)] {
            if eat(&mut b, key(tag, FIXED32)) {
                let v = take(&mut b, 4).ok()?;
                *field = Some(u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
            }
        }
        b.is_empty().then_some(t)
    }

    fn tcp(mut b: &[u8]) -> Option<ProtoinfoFields> {
        let mut v = [0u32; 5];
        for (tag, field) in (1..).zip(&mut v) {
            if eat(&mut b, key(tag, VARINT)) {
                *field = varint(&mut b)? as u32;
            }
        }
        let [state, wscale_orig, wscale_reply, flags_orig, flags_reply] = v;
        b.is_empty().then_some(ProtoinfoFields::Tcp {
            state,
            wscale_orig,
            wscale_reply,
            flags_orig,
            flags_reply,
        })
    }
}

/// A `FlowUpdate` or a `FlowDelete`: a version and one embedded message.
#[derive(Default, Debug, PartialEq)]
struct Change<T> {
    version: u64,
    item: Option<T>,
}

#[inline(always)]
fn merge_change<'a, T: Default>(
    c: &mut Change<T>,
    body: &'a [u8],
    depth: u32,
    mut merge_item: impl FnMut(&mut T, &'a [u8], u32) -> Parse<()>,
) -> Parse<()> {
    merge(c, body, depth, |c, f, buf| {
        match f.tag {
            1 => c.version = f.u64(buf)?,
            2 => merge_into(&mut c.item, f, buf, &mut merge_item)?,
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

/// A batch being read. Its changes are validated as they come, but the first validation error
/// is only reported once the whole input has parsed: prost refuses malformed input before any
/// validation, and [`super::decode`] reports the first bad upsert before any bad delete.
#[derive(Default)]
struct BatchState {
    batch: Batch,
    upserts_seen: usize,
    deletes_seen: usize,
    upsert_error: Option<WireError>,
    delete_error: Option<WireError>,
}

/// The smallest a valid `FlowUpdate` can be (two IPv4 tuples and their framing): bounds what
/// a hostile count of tiny fields can make [`BatchState`] reserve.
const MIN_UPDATE_BYTES: usize = 28;

impl BatchState {
    fn merge(&mut self, body: &[u8], depth: u32) -> Parse<()> {
        if self.upserts_seen == 0 && self.deletes_seen == 0 {
            self.reserve(body);
        }
        merge(self, body, depth, |s, f, buf| {
            match f.tag {
                1 => s.batch.epoch = f.u64(buf)?,
                2 => s.batch.seq = f.u64(buf)?,
                3 => s.upsert(f, buf)?,
                4 => s.delete(f, buf)?,
                _ => f.skip(buf)?,
            }
            Ok(())
        })
    }

    /// Sizes the change lists from a quick count of their fields (a hint: errors end it).
    fn reserve(&mut self, mut body: &[u8]) {
        let most = body.len() / MIN_UPDATE_BYTES + 1;
        let (mut upserts, mut deletes) = (0, 0);
        while let Ok((tag, LEN)) = get_key(&mut body) {
            match get_varint(&mut body).map(|len| take(&mut body, len)) {
                Ok(Ok(_)) if tag == 3 => upserts += 1,
                Ok(Ok(_)) if tag == 4 => deletes += 1,
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        self.batch.upserts.reserve(upserts.min(most));
        self.batch.deletes.reserve(deletes.min(most));
    }

    fn upsert(&mut self, f: Field, buf: &mut &[u8]) -> Parse<()> {
        let (body, depth) = f.message(buf)?;
        let c = match canonical::change(body, canonical::flow) {
            Some(c) => c,
            None => {
                let mut c = Change::default();
                merge_change(&mut c, body, depth, merge_flow)?;
                c
            }
        };
        let i = self.upserts_seen;
        self.upserts_seen += 1;
        if self.upsert_error.is_none() {
            match upsert_from_fields(i, c.item.as_ref()) {
                Ok(flow) => self.batch.upserts.push((c.version, flow)),
                Err(e) => self.upsert_error = Some(e),
            }
        }
        Ok(())
    }

    fn delete(&mut self, f: Field, buf: &mut &[u8]) -> Parse<()> {
        let (body, depth) = f.message(buf)?;
        let c = match canonical::change(body, canonical::flow_key) {
            Some(c) => c,
            None => {
                let mut c = Change::default();
                merge_change(&mut c, body, depth, merge_key)?;
                c
            }
        };
        let i = self.deletes_seen;
        self.deletes_seen += 1;
        if self.upsert_error.is_none() && self.delete_error.is_none() {
            match delete_from_fields(i, c.item.as_ref()) {
                Ok(key) => self.batch.deletes.push((c.version, key)),
                Err(e) => self.delete_error = Some(e),
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Batch, WireError> {
        match self.upsert_error.or(self.delete_error) {
            Some(e) => Err(e),
            None => Ok(self.batch),
        }
    }
}

/// `Hello` as it is on the wire.
#[derive(Default)]
struct HelloFields<'a> {
    version_major: u32,
    version_minor: u32,
    cluster: &'a str,
    node_id: &'a str,
    epoch: u64,
    have_epoch: u64,
    have_seq: u64,
}

fn merge_hello<'a>(h: &mut HelloFields<'a>, body: &'a [u8], depth: u32) -> Parse<()> {
    merge(h, body, depth, |h, f, buf| {
        match f.tag {
            1 => h.version_major = f.u32(buf)?,
            2 => h.version_minor = f.u32(buf)?,
            3 => h.cluster = f.str(buf)?,
            4 => h.node_id = f.str(buf)?,
            5 => h.epoch = f.u64(buf)?,
            6 => h.have_epoch = f.u64(buf)?,
            7 => h.have_seq = f.u64(buf)?,
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

/// A message of only `uint64` fields numbered 1 to N (`Ack`, snapshots, `Heartbeat`).
fn merge_u64s<const N: usize>(v: &mut [u64; N], body: &[u8], depth: u32) -> Parse<()> {
    merge(v, body, depth, |v, f, buf| {
        match usize::try_from(f.tag).ok().and_then(|t| v.get_mut(t - 1)) {
            Some(slot) => *slot = f.u64(buf)?,
            None => f.skip(buf)?,
        }
        Ok(())
    })
}

fn merge_resync<'a>(reason: &mut &'a str, body: &'a [u8], depth: u32) -> Parse<()> {
    merge(reason, body, depth, |reason, f, buf| {
        match f.tag {
            1 => *reason = f.str(buf)?,
            _ => f.skip(buf)?,
        }
        Ok(())
    })
}

/// The `body` oneof of a `PeerMessage` being read.
enum Body<'a> {
    Hello(HelloFields<'a>),
    Batch(BatchState),
    Ack([u64; 2]),
    ResyncRequest(&'a str),
    SnapshotBegin([u64; 3]),
    SnapshotEnd([u64; 4]),
    Heartbeat([u64; 2]),
}

/// Reads one occurrence of a `body` variant: merged into the current one if it is the same
/// variant, replacing it otherwise.
fn merge_body<'a>(body: &mut Option<Body<'a>>, f: Field, buf: &mut &'a [u8]) -> Parse<()> {
    let (bytes, depth) = f.message(buf)?;
    let mut cur = match (f.tag, body.take()) {
        (1, Some(b @ Body::Hello(_)))
        | (2, Some(b @ Body::Batch(_)))
        | (3, Some(b @ Body::Ack(_)))
        | (4, Some(b @ Body::ResyncRequest(_)))
        | (5, Some(b @ Body::SnapshotBegin(_)))
        | (6, Some(b @ Body::SnapshotEnd(_)))
        | (7, Some(b @ Body::Heartbeat(_))) => b,
        (1, _) => Body::Hello(HelloFields::default()),
        (2, _) => Body::Batch(BatchState::default()),
        (3, _) => Body::Ack([0; 2]),
        (4, _) => Body::ResyncRequest(""),
        (5, _) => Body::SnapshotBegin([0; 3]),
        (6, _) => Body::SnapshotEnd([0; 4]),
        _ => Body::Heartbeat([0; 2]),
    };
    match &mut cur {
        Body::Hello(h) => merge_hello(h, bytes, depth)?,
        Body::Batch(b) => b.merge(bytes, depth)?,
        Body::Ack(v) | Body::Heartbeat(v) => merge_u64s(v, bytes, depth)?,
        Body::ResyncRequest(r) => merge_resync(r, bytes, depth)?,
        Body::SnapshotBegin(v) => merge_u64s(v, bytes, depth)?,
        Body::SnapshotEnd(v) => merge_u64s(v, bytes, depth)?,
    }
    *body = Some(cur);
    Ok(())
}

fn into_message(body: Option<Body<'_>>) -> Result<Message, WireError> {
    Ok(match body.ok_or(WireError::EmptyMessage)? {
        Body::Hello(h) => Message::Hello(Hello {
            version_major: h.version_major,
            version_minor: h.version_minor,
            cluster: h.cluster.to_string(),
            node_id: h.node_id.to_string(),
            epoch: h.epoch,
            have_epoch: h.have_epoch,
            have_seq: h.have_seq,
        }),
        Body::Batch(b) => Message::Batch(b.finish()?),
        Body::Ack([epoch, seq]) => Message::Ack { epoch, seq },
        Body::ResyncRequest(reason) => Message::ResyncRequest {
            reason: reason.to_string(),
        },
        Body::SnapshotBegin([epoch, seq, id]) => Message::SnapshotBegin { epoch, seq, id },
        Body::SnapshotEnd([epoch, seq, id, flows]) => Message::SnapshotEnd {
            epoch,
            seq,
            id,
            flows,
        },
        Body::Heartbeat([epoch, sent_unix_ms]) => Message::Heartbeat {
            epoch,
            sent_unix_ms,
        },
    })
}

/// Decodes and validates a `PeerMessage`: the same result as prost's decoding followed by
/// [`super::decode`], for any input, without building the `pb` messages.
pub fn decode_message(mut bytes: &[u8]) -> Result<Message, FrameError> {
    let mut body = None;
    while !bytes.is_empty() {
        let (tag, wire_type) = get_key(&mut bytes)?;
        let f = Field {
            tag,
            wire_type,
            depth: RECURSION_LIMIT,
        };
        match tag {
            1..=7 => merge_body(&mut body, f, &mut bytes)?,
            _ => f.skip(&mut bytes)?,
        }
    }
    Ok(into_message(body)?)
}

#[cfg(test)]
mod tests {
    use super::super::tests::arb_message;
    use super::super::{decode, encode, pb};
    use super::*;
    use proptest::prelude::*;
    use prost::Message as _;

    /// What the reference path (prost, then [`super::super::decode`]) makes of `bytes`: `None`
    /// when prost refuses them.
    fn reference(bytes: &[u8]) -> Result<Message, Option<WireError>> {
        let pm = pb::PeerMessage::decode(bytes).map_err(|_| None)?;
        decode(pm).map_err(Some)
    }

    /// The same for [`decode_message`].
    fn hand(bytes: &[u8]) -> Result<Message, Option<WireError>> {
        decode_message(bytes).map_err(|e| match e {
            FrameError::Protobuf(_) => None,
            FrameError::Wire(e) => Some(e),
        })
    }

    fn hand_encode(msg: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        encode_message(msg, &mut v);
        v
    }

    // The restructuring below is seeded from proptest, so failures shrink and replay.
    use crate::test_rng::Rng;

    fn put_field(out: &mut Vec<u8>, tag: u32, wire_type: u8, value: &[u8]) {
        put_varint(out, u64::from(tag << 3 | u32::from(wire_type)));
        if wire_type == LEN {
            put_varint(out, value.len() as u64);
        }
        out.extend_from_slice(value);
    }

    /// Splits `bytes` into (tag, wire type, value) if it is a plain sequence of fields without
    /// groups; the value of a varint field is its encoded bytes.
    fn fields(mut bytes: &[u8]) -> Option<Vec<(u32, u8, Vec<u8>)>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (tag, wt) = get_key(&mut bytes).ok()?;
            let start = bytes;
            let value = match wt {
                VARINT => {
                    get_varint(&mut bytes).ok()?;
                    &start[..start.len() - bytes.len()]
                }
                FIXED64 => take(&mut bytes, 8).ok()?,
                FIXED32 => take(&mut bytes, 4).ok()?,
                LEN => {
                    let len = get_varint(&mut bytes).ok()?;
                    take(&mut bytes, len).ok()?
                }
                _ => return None,
            };
            out.push((tag, wt, value.to_vec()));
        }
        Some(out)
    }

    /// Re-encodes a valid encoding differently: fields reordered, length-delimited fields that
    /// parse as messages split in two occurrences (which merge) and restructured inside, unknown
    /// fields and groups inserted, scalars preceded by an overridden value. The result is still
    /// valid protobuf (though not always of the same message), for comparing decoders on.
    fn restructure(bytes: &[u8], rng: &mut Rng, depth: u32) -> Vec<u8> {
        let Some(mut fs) = fields(bytes) else {
            return bytes.to_vec();
        };
        if depth > 0 {
            for f in fs.iter_mut() {
                if f.1 == LEN && rng.below(2) == 0 {
                    f.2 = restructure(&f.2, rng, depth - 1);
                }
            }
        }
        if rng.below(3) == 0 && fs.len() > 1 {
            let (i, j) = (rng.below(fs.len()), rng.below(fs.len()));
            fs.swap(i, j);
        }
        let mut out = Vec::new();
        for (tag, wt, value) in fs {
            match rng.below(8) {
                0 if wt == LEN && fields(&value).is_some_and(|f| f.len() > 1) => {
                    // Two occurrences: the first fields, then the rest.
                    let inner = fields(&value).unwrap_or_default();
                    let cut = 1 + rng.below(inner.len() - 1);
                    for part in [&inner[..cut], &inner[cut..]] {
                        let mut v = Vec::new();
                        for (t, w, x) in part {
                            put_field(&mut v, *t, *w, x);
                        }
                        put_field(&mut out, tag, wt, &v);
                    }
                    continue;
                }
                1 => put_field(&mut out, 14 + rng.below(6) as u32, LEN, b"\x08\x01junk"),
                2 => {
                    let t = 20 + rng.below(3) as u32;
                    put_varint(&mut out, u64::from(t << 3 | u32::from(START_GROUP)));
                    put_field(&mut out, 1, VARINT, &[0x96, 0x01]);
                    put_field(&mut out, 2, FIXED64, &[7; 8]);
                    put_varint(&mut out, u64::from(t << 3 | u32::from(END_GROUP)));
                }
                3 if wt == VARINT => put_field(&mut out, tag, wt, &[0x7f]),
                4 => put_field(&mut out, 15, FIXED32, &[1, 2, 3, 4]),
                _ => {}
            }
            put_field(&mut out, tag, wt, &value);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encoding_is_byte_identical_to_prost(msg in arb_message()) {
            let bytes = hand_encode(&msg);
            prop_assert_eq!(&bytes, &encode(&msg).encode_to_vec());
            prop_assert_eq!(encoded_len(&msg), bytes.len());
        }

        #[test]
        fn decoding_round_trips(msg in arb_message()) {
            prop_assert_eq!(decode_message(&hand_encode(&msg)), Ok(msg));
        }

        #[test]
        fn mutated_encodings_decode_as_prost_does(
            msg in arb_message(),
            edits in proptest::collection::vec((0u8..4, any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = hand_encode(&msg);
            for (kind, at, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match kind {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    2 => bytes.insert(i, byte),
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(hand(&bytes), reference(&bytes));
        }

        #[test]
        fn restructured_encodings_decode_as_prost_does(msg in arb_message(), seed in 1u64..) {
            let bytes = restructure(&hand_encode(&msg), &mut Rng(seed), 8);
            prop_assert_eq!(hand(&bytes), reference(&bytes));
        }

        #[test]
        fn arbitrary_bytes_decode_as_prost_does(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            prop_assert_eq!(hand(&bytes), reference(&bytes));
        }
    }

    /// The body of a batch's first change with field number `tag` (3 upserts, 4 deletes), and
    /// the depth budget the decoder reads it with.
    fn first_change(msg: &Message, tag: u32) -> (&'static [u8], u32) {
        let bytes: &'static [u8] = hand_encode(msg).leak();
        let mut rest = bytes;
        let (body_tag, wire_type) = get_key(&mut rest).unwrap();
        let body = Field {
            tag: body_tag,
            wire_type,
            depth: RECURSION_LIMIT,
        };
        let (mut batch, depth) = body.message(&mut rest).unwrap();
        loop {
            let (t, wire_type) = get_key(&mut batch).unwrap();
            let f = Field {
                tag: t,
                wire_type,
                depth,
            };
            if t == tag {
                return f.message(&mut batch).unwrap();
            }
            f.skip(&mut batch).unwrap();
        }
    }

    fn rare(flow: &Flow) -> bool {
        flow.helper().is_some()
            || flow.master().is_some()
            || flow.seq_adj().is_some()
            || flow.synproxy().is_some()
            || !matches!(flow.protoinfo(), ProtoInfo::None | ProtoInfo::Tcp(_))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The canonical reader takes what the encoder writes for every flow without the rare
        /// attributes, and reads it exactly as the general decoder does.
        #[test]
        fn the_canonical_reader_reads_common_flows_as_the_general_one(
            flow in super::super::tests::arb_flow(),
            version in any::<u64>(),
        ) {
            let rare = rare(&flow);
            let msg = Message::Batch(Batch { upserts: vec![(version, flow)], ..Batch::default() });
            let (change, depth) = first_change(&msg, 3);
            let mut general = Change::default();
            let general = merge_change(&mut general, change, depth, merge_flow).map(|()| general);
            match canonical::change(change, canonical::flow) {
                Some(c) => prop_assert_eq!(Ok(c), general),
                None => prop_assert!(rare, "a common flow left to the general decoder"),
            }
        }

        #[test]
        fn the_canonical_reader_reads_every_deletion_as_the_general_one(
            flow in super::super::tests::arb_flow(),
            version in any::<u64>(),
        ) {
            let msg = Message::Batch(Batch { deletes: vec![(version, flow.key)], ..Batch::default() });
            let (change, depth) = first_change(&msg, 4);
            let mut general = Change::default();
            let general = merge_change(&mut general, change, depth, merge_key).map(|()| general);
            let canonical = canonical::change(change, canonical::flow_key);
            prop_assert!(canonical.is_some(), "a deletion left to the general decoder");
            prop_assert_eq!(Ok(canonical.unwrap()), general);
        }

        /// Whatever the canonical reader accepts of a damaged change, it reads as the general
        /// decoder does (which may also accept it, differently laid out, or refuse it).
        #[test]
        fn the_canonical_reader_never_disagrees_on_damaged_changes(
            flow in super::super::tests::arb_flow(),
            version in any::<u64>(),
            edits in proptest::collection::vec((0u8..3, any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let msg = Message::Batch(Batch { upserts: vec![(version, flow)], ..Batch::default() });
            let (change, _) = first_change(&msg, 3);
            let mut bytes = change.to_vec();
            for (kind, at, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match kind {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            if let Some(c) = canonical::change(&bytes, canonical::flow) {
                let mut general = Change::default();
                let general = merge_change(&mut general, &bytes, RECURSION_LIMIT, merge_flow)
                    .map(|()| general);
                prop_assert_eq!(Ok(c), general);
            }
        }
    }

    fn tcp_flow() -> Flow {
        let orig = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: crate::flow::proto::TCP,
            l4: L4::Ports { src: 1000, dst: 80 },
        };
        Flow::new(Default::default(), orig, orig.inverse())
    }

    fn batch(upserts: Vec<pb::FlowUpdate>, deletes: Vec<pb::FlowDelete>) -> pb::PeerMessage {
        pb::PeerMessage {
            body: Some(pb::peer_message::Body::Batch(pb::Batch {
                epoch: 1,
                seq: 2,
                upserts,
                deletes,
            })),
        }
    }

    /// Both decoders on `bytes`, which must agree; returns the result.
    fn both(bytes: &[u8]) -> Result<Message, Option<WireError>> {
        let r = reference(bytes);
        assert_eq!(hand(bytes), r, "{bytes:02x?}");
        r
    }

    #[test]
    fn a_submessage_given_twice_is_merged() {
        // A flow's key in two occurrences: zone in the first, the original tuple in the second.
        let flow = tcp_flow();
        let pf = pb::Flow::from(&flow);
        let key = pf.key.clone().unwrap();
        let mut body = Vec::new();
        prost::encoding::message::encode(
            1,
            &pb::FlowKey {
                zone: 7,
                ..Default::default()
            },
            &mut body,
        );
        prost::encoding::message::encode(
            1,
            &pb::FlowKey {
                orig: key.orig,
                ..Default::default()
            },
            &mut body,
        );
        let rest = pb::Flow { key: None, ..pf };
        rest.encode(&mut body).unwrap();
        let mut update = Vec::new();
        put_field(&mut update, 2, LEN, &body);
        let mut b = Vec::new();
        put_field(&mut b, 3, LEN, &update);
        let mut msg = Vec::new();
        put_field(&mut msg, 2, LEN, &b);
        let mut expected = flow;
        expected.key.zone.id = 7;
        let Ok(Message::Batch(got)) = both(&msg) else {
            panic!("not a batch");
        };
        assert_eq!(got.upserts, vec![(0, expected)]);
    }

    #[test]
    fn batches_given_twice_are_merged_and_other_bodies_replace() {
        let one = |seq: u64, version: u64| {
            batch(
                vec![pb::FlowUpdate {
                    version,
                    flow: Some(pb::Flow::from(&tcp_flow())),
                }],
                vec![],
            )
            .encode_to_vec()
            .into_iter()
            .chain(
                pb::PeerMessage {
                    body: Some(pb::peer_message::Body::Batch(pb::Batch {
                        seq,
                        ..Default::default()
                    })),
                }
                .encode_to_vec(),
            )
            .collect::<Vec<u8>>()
        };
        let mut bytes = one(5, 1);
        bytes.extend(one(6, 2));
        let Ok(Message::Batch(b)) = both(&bytes) else {
            panic!("not a batch");
        };
        assert_eq!((b.epoch, b.seq, b.upserts.len()), (1, 6, 2));
        // An Ack after the batches replaces them; a batch after the Ack starts afresh.
        let ack = encode(&Message::Ack { epoch: 3, seq: 4 }).encode_to_vec();
        let mut with_ack = bytes.clone();
        with_ack.extend(&ack);
        assert_eq!(both(&with_ack), Ok(Message::Ack { epoch: 3, seq: 4 }));
        with_ack.extend(one(9, 3));
        let Ok(Message::Batch(b)) = both(&with_ack) else {
            panic!("not a batch");
        };
        assert_eq!((b.seq, b.upserts.len()), (9, 1));
    }

    #[test]
    fn protoinfo_variants_merge_or_replace() {
        // The TCP state twice in one flow: the second occurrence merges into the first.
        let pf = pb::Flow {
            protoinfo: Some(pb::flow::Protoinfo::Tcp(pb::TcpInfo {
                wscale_orig: 7,
                ..Default::default()
            })),
            ..pb::Flow::from(&tcp_flow())
        };
        let mut flow_bytes = pf.encode_to_vec();
        prost::encoding::message::encode(
            7,
            &pb::TcpInfo {
                state: 2,
                ..Default::default()
            },
            &mut flow_bytes,
        );
        let wrap = |tag: u32, inner: &[u8]| {
            let mut v = Vec::new();
            put_field(&mut v, tag, LEN, inner);
            v
        };
        let msg = wrap(2, &wrap(3, &wrap(2, &flow_bytes)));
        let Ok(Message::Batch(b)) = both(&msg) else {
            panic!("not a batch");
        };
        assert_eq!(
            b.upserts[0].1.protoinfo(),
            ProtoInfo::Tcp(crate::flow::TcpInfo {
                state: 2,
                wscale_orig: 7,
                ..Default::default()
            })
        );
        // Another variant replaces it.
        prost::encoding::message::encode(8, &pb::SctpInfo::default(), &mut flow_bytes);
        let msg = wrap(2, &wrap(3, &wrap(2, &flow_bytes)));
        let Ok(Message::Batch(b)) = both(&msg) else {
            panic!("not a batch");
        };
        assert!(matches!(b.upserts[0].1.protoinfo(), ProtoInfo::Sctp { .. }));
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped() {
        let m = Message::Heartbeat {
            epoch: 5,
            sent_unix_ms: 6,
        };
        let mut bytes = hand_encode(&m);
        // Varint, fixed64, length-delimited, a group holding a nested group, fixed32.
        bytes.extend([0x40, 0x96, 0x01]);
        bytes.extend([0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend([0x52, 2, 0xff, 0xff]);
        bytes.extend([0x5b, 0x08, 1, 0x63, 0x64, 0x5c]);
        bytes.extend([0x6d, 1, 2, 3, 4]);
        assert_eq!(both(&bytes), Ok(m));
    }

    #[test]
    fn each_protobuf_error_is_refused() {
        let cases: [(&[u8], ProtobufError); 10] = [
            (&[0x40], ProtobufError::InvalidVarint),
            (&[0x40; 11], ProtobufError::InvalidVarint),
            (
                &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02],
                ProtobufError::InvalidVarint,
            ),
            (&[0x80, 0x80, 0x80, 0x80, 0x10], ProtobufError::InvalidKey),
            (&[0x0e], ProtobufError::InvalidWireType(6)),
            (&[0x02, 0x00], ProtobufError::InvalidTag),
            (
                &[0x08, 0x01],
                ProtobufError::UnexpectedWireType {
                    tag: 1,
                    actual: VARINT,
                    expected: LEN,
                },
            ),
            (&[0x12, 0x05, 0x08], ProtobufError::BufferUnderflow),
            (&[0x44], ProtobufError::UnexpectedEndGroup),
            (
                &[0x22, 0x03, 0x0a, 0x01, 0xff],
                ProtobufError::InvalidString,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                decode_message(bytes),
                Err(FrameError::Protobuf(want)),
                "{bytes:02x?}"
            );
            assert!(pb::PeerMessage::decode(bytes).is_err(), "{bytes:02x?}");
        }
        // A group closed by another group's end, and groups nested past prost's limit.
        let bad_group = [0x43, 0x4c];
        assert_eq!(
            decode_message(&bad_group),
            Err(FrameError::Protobuf(ProtobufError::UnexpectedEndGroup))
        );
        let mut deep = vec![0x43; 101];
        deep.extend([0x44; 101]);
        assert_eq!(
            decode_message(&deep),
            Err(FrameError::Protobuf(ProtobufError::RecursionLimit))
        );
        assert!(pb::PeerMessage::decode(&deep[..]).is_err());
        let mut ok = vec![0x43; 99];
        ok.extend([0x44; 99]);
        assert_eq!(both(&ok), Err(Some(WireError::EmptyMessage)));
        // A wrong wire type deep inside a flow, and a submessage overrunning its parent.
        let mut flow = pb::Flow::from(&tcp_flow()).encode_to_vec();
        flow.extend([0x18, 0x01]);
        let _ = both(&flow);
        assert_eq!(
            both(&[0x12, 0x02, 0x1a, 0x05, 0x08, 0x01, 0x08, 0x01, 0x08]),
            Err(None)
        );
    }

    #[test]
    fn validation_errors_are_the_reference_ones_in_its_order() {
        let good = pb::FlowUpdate {
            version: 1,
            flow: Some(pb::Flow::from(&tcp_flow())),
        };
        let bad_flow = pb::FlowUpdate {
            version: 2,
            flow: None,
        };
        let bad_delete = pb::FlowDelete {
            version: 3,
            key: None,
        };
        // Deletes first on the wire: the bad upsert is still the one reported.
        let mut bytes = Vec::new();
        let m = batch(vec![good.clone(), bad_flow], vec![bad_delete.clone()]);
        let pb::peer_message::Body::Batch(b) = m.body.clone().unwrap() else {
            unreachable!()
        };
        let mut inner = Vec::new();
        for d in &b.deletes {
            prost::encoding::message::encode(4, d, &mut inner);
        }
        for u in &b.upserts {
            prost::encoding::message::encode(3, u, &mut inner);
        }
        put_field(&mut bytes, 2, LEN, &inner);
        assert_eq!(
            both(&bytes),
            Err(Some(WireError::Missing {
                field: "batch.upserts[1].flow".into()
            }))
        );
        let only_delete = batch(vec![good], vec![bad_delete]).encode_to_vec();
        assert_eq!(
            both(&only_delete).unwrap_err().unwrap().field(),
            "batch.deletes[0].key"
        );
        // A validation error, then malformed bytes: malformed wins (prost fails first).
        let mut broken = m.encode_to_vec();
        broken.push(0x08);
        assert_eq!(both(&broken), Err(None));
        assert_eq!(both(&[]), Err(Some(WireError::EmptyMessage)));
    }

    #[test]
    fn field_paths_match_the_reference() {
        let mut pf = pb::Flow::from(&tcp_flow());
        pf.key.as_mut().unwrap().orig.as_mut().unwrap().src_port = 70000;
        let m = batch(
            vec![
                pb::FlowUpdate {
                    version: 1,
                    flow: Some(pb::Flow::from(&tcp_flow())),
                },
                pb::FlowUpdate {
                    version: 1,
                    flow: Some(pf),
                },
            ],
            vec![],
        );
        let e = both(&m.encode_to_vec()).unwrap_err().unwrap();
        assert_eq!(e.field(), "batch.upserts[1].flow.key.orig.src_port");
    }

    #[test]
    fn uint32_fields_keep_the_low_bits_as_prost_does() {
        // proto = 2^32 + 6 reads as 6 (TCP), as prost truncates.
        let mut pf = pb::Flow::from(&tcp_flow());
        let t = pf.key.as_mut().unwrap().orig.as_mut().unwrap();
        t.proto = 0;
        let mut flow_bytes = pf.encode_to_vec();
        let wrap = |tag: u32, inner: &[u8]| {
            let mut v = Vec::new();
            put_field(&mut v, tag, LEN, inner);
            v
        };
        let mut orig = pb::Flow::from(&tcp_flow()).key.unwrap().orig.unwrap();
        orig.proto = 0;
        let mut tuple = orig.encode_to_vec();
        tuple.push(0x18);
        put_varint(&mut tuple, (1 << 32) + 6);
        flow_bytes.extend(wrap(1, &wrap(3, &tuple)));
        let msg = wrap(2, &wrap(3, &wrap(2, &flow_bytes)));
        let Ok(Message::Batch(b)) = both(&msg) else {
            panic!("not a batch");
        };
        assert_eq!(b.upserts[0].1.key.orig.proto, 6);
    }
}
