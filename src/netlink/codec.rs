//! The ctnetlink codec: netlink messages to and from [`Flow`].
//!
//! Decoding walks attributes in place with a bounds-checked iterator of our own (no allocation per
//! attribute: the event path must keep up with the kernel). Unknown attributes are skipped, never
//! an error: newer kernels add attributes (type 27 on 6.18). Encoding appends headers and
//! attributes straight into the caller's buffer, patching lengths in afterwards (no allocation
//! per message either: the writer batches hundreds of thousands of them).

use super::attr::{self, cta};
use crate::flow::{
    proto, status, Flow, FlowKey, Present, ProtoInfo, SeqAdj, SeqAdjDir, Synproxy, TcpInfo, Tuple,
    Zone, ZoneDir, L4,
};
use netlink_packet_core::{NLA_F_NESTED, NLA_TYPE_MASK};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a message could not be decoded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The netlink framing itself is broken.
    #[error("malformed netlink message: {0}")]
    Framing(String),
    /// An attribute the flow cannot exist without is missing.
    #[error("conntrack message lacks {0}")]
    Missing(&'static str),
    /// An attribute has the wrong size.
    #[error("attribute {name} has {len} bytes, expected {expected}")]
    BadLength {
        /// Attribute name.
        name: &'static str,
        /// Size found.
        len: usize,
        /// Size the kernel defines.
        expected: usize,
    },
    /// Source and destination addresses are of different families.
    #[error("tuple mixes IPv4 and IPv6 addresses")]
    MixedFamilies,
}

/// One netlink message inside a received datagram, header fields decoded.
#[derive(Debug, Clone, Copy)]
pub struct RawMessage<'a> {
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`: for events, the port id of the socket whose request caused the change.
    pub portid: u32,
    /// Everything after the netlink header.
    pub payload: &'a [u8],
}

/// Iterates over the netlink messages packed in one datagram.
///
/// The header is read here rather than through netlink-packet-core's checked buffer (the same
/// checks, the same fields; a test holds the two equal on captured traffic): that took about
/// 150 instructions a message, a tenth of decoding an event.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<RawMessage<'_>, CodecError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match header(rest) {
            Ok((msg, len)) => {
                rest = &rest[align4(len).min(rest.len())..];
                Some(Ok(msg))
            }
            Err(e) => {
                rest = &[];
                Some(Err(e))
            }
        }
    })
}

/// Length of a netlink message header.
const NLMSG_HEADER_LEN: usize = 16;

/// The message at the start of `buf` and its length (without padding).
fn header(buf: &[u8]) -> Result<(RawMessage<'_>, usize), CodecError> {
    let Some(h) = buf.first_chunk::<NLMSG_HEADER_LEN>() else {
        return Err(CodecError::Framing(format!(
            "{} bytes left, less than a netlink header",
            buf.len()
        )));
    };
    let word = |at: usize| u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let len = word(0) as usize;
    if !(NLMSG_HEADER_LEN..=buf.len()).contains(&len) {
        return Err(CodecError::Framing(format!(
            "netlink message length {len} outside {NLMSG_HEADER_LEN}..={}",
            buf.len()
        )));
    }
    let msg = RawMessage {
        msg_type: u16::from_ne_bytes([h[4], h[5]]),
        flags: u16::from_ne_bytes([h[6], h[7]]),
        seq: word(8),
        portid: word(12),
        payload: &buf[NLMSG_HEADER_LEN..len],
    };
    Ok((msg, len))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// What a conntrack message says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtEventKind {
    /// A new entry (`NLM_F_CREATE|NLM_F_EXCL` on `IPCTNL_MSG_CT_NEW`).
    New,
    /// A change to an existing entry, or one entry of a dump.
    Update,
    /// The entry is gone.
    Destroy,
}

/// A decoded conntrack message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtMessage {
    /// New, update or destroy.
    pub kind: CtEventKind,
    /// The flow; attributes not in `present` hold neutral values.
    pub flow: Flow,
    /// Which optional attributes the message carried.
    pub present: Present,
    /// The kernel's entry id (`CTA_ID`), which tells a re-created entry from the old one.
    pub kernel_id: Option<u32>,
}

/// The error code of an `NLMSG_ERROR` message (0 for an ACK) and the sequence it answers.
pub fn decode_error(msg: &RawMessage<'_>) -> Result<(i32, u32), CodecError> {
    let p = msg.payload;
    if p.len() < 20 {
        return Err(CodecError::Framing("short NLMSG_ERROR".into()));
    }
    let errno = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    let seq = u32::from_ne_bytes([p[12], p[13], p[14], p[15]]);
    Ok((errno, seq))
}

/// Decodes a ctnetlink `NEW` or `DELETE` message (event or dump entry).
pub fn decode_conntrack(msg: &RawMessage<'_>) -> Result<CtMessage, CodecError> {
    let kind = match msg.msg_type {
        attr::MSG_CT_DELETE => CtEventKind::Destroy,
        attr::MSG_CT_NEW if msg.flags & (attr::NLM_F_CREATE | attr::NLM_F_EXCL) != 0 => {
            CtEventKind::New
        }
        attr::MSG_CT_NEW => CtEventKind::Update,
        other => {
            return Err(CodecError::Framing(format!(
                "message type {other:#06x} is not a conntrack entry"
            )))
        }
    };
    if msg.payload.len() < 4 {
        return Err(CodecError::Framing("missing nfgenmsg".into()));
    }
    let mut d = Decoder::default();
    for nla in nested(&msg.payload[4..]) {
        let (kind, value) = nla?;
        d.top_level(kind, value)?;
    }
    d.finish(kind)
}

/// [`decode_conntrack`] for event intake: a destroy event is decoded down to what removing the
/// flow needs, its key (and kernel id). Half of a churning table's events are destroys, and
/// the rest of their attributes (reply tuple, state, counters) describe a flow that is gone.
///
/// The returned destroy's flow has the reply tuple `orig.inverse()` and nothing `present`.
/// A malformed key is refused as [`decode_conntrack`] refuses it; attributes not read are not
/// checked.
pub fn decode_event(msg: &RawMessage<'_>) -> Result<CtMessage, CodecError> {
    if msg.msg_type != attr::MSG_CT_DELETE {
        return decode_conntrack(msg);
    }
    let payload = msg
        .payload
        .get(4..)
        .ok_or_else(|| CodecError::Framing("missing nfgenmsg".into()))?;
    let mut d = Decoder::default();
    let mut reply_zone = None;
    for nla in nested(payload) {
        let (kind, value) = nla?;
        match kind {
            cta::TUPLE_ORIG | cta::ZONE | cta::ID => d.top_level(kind, value)?,
            cta::TUPLE_REPLY => reply_zone = Some(tuple_zone(value)?),
            _ => {}
        }
    }
    let reply_zone = reply_zone.ok_or(CodecError::Missing("CTA_TUPLE_REPLY"))?;
    let orig = d.orig.ok_or(CodecError::Missing("CTA_TUPLE_ORIG"))?.0;
    d.reply = Some((orig.inverse(), reply_zone));
    d.finish(CtEventKind::Destroy)
}

/// The `CTA_TUPLE_ZONE` of a tuple, without decoding the rest of it.
fn tuple_zone(v: &[u8]) -> Result<Option<u16>, CodecError> {
    for item in nested(v) {
        let (kind, value) = item?;
        if kind == attr::tuple::ZONE {
            return be16(value, "CTA_TUPLE_ZONE").map(Some);
        }
    }
    Ok(None)
}

/// Accumulates attributes of one message before the flow can be assembled.
#[derive(Default)]
struct Decoder {
    orig: Option<(Tuple, Option<u16>)>,
    reply: Option<(Tuple, Option<u16>)>,
    zone: Option<u16>,
    flow_status: u32,
    timeout: u32,
    mark: u32,
    labels: u128,
    protoinfo: ProtoInfo,
    helper: Option<Box<str>>,
    master: Option<Tuple>,
    seq_adj: Option<SeqAdj>,
    synproxy: Option<Synproxy>,
    kernel_id: Option<u32>,
    present: Present,
}

impl Decoder {
    fn top_level(&mut self, kind: u16, v: &[u8]) -> Result<(), CodecError> {
        match kind {
            cta::TUPLE_ORIG => self.orig = Some(decode_tuple(v)?),
            cta::TUPLE_REPLY => self.reply = Some(decode_tuple(v)?),
            cta::TUPLE_MASTER => {
                self.master = Some(decode_tuple(v)?.0);
                self.present.set(Present::MASTER);
            }
            cta::STATUS => {
                self.flow_status = be32(v, "CTA_STATUS")?;
                self.present.set(Present::STATUS);
            }
            cta::TIMEOUT => {
                self.timeout = be32(v, "CTA_TIMEOUT")?;
                self.present.set(Present::TIMEOUT);
            }
            cta::MARK => {
                self.mark = be32(v, "CTA_MARK")?;
                self.present.set(Present::MARK);
            }
            cta::ZONE => self.zone = Some(be16(v, "CTA_ZONE")?),
            cta::ID => self.kernel_id = Some(be32(v, "CTA_ID")?),
            cta::LABELS => {
                self.labels = decode_labels(v)?;
                self.present.set(Present::LABELS);
            }
            cta::PROTOINFO => {
                self.protoinfo = decode_protoinfo(v)?;
                self.present.set(Present::PROTOINFO);
            }
            cta::HELP => {
                self.helper = decode_helper(v)?;
                self.present.set(Present::HELPER);
            }
            cta::SEQ_ADJ_ORIG => {
                self.seq_adj.get_or_insert_with(SeqAdj::default).orig = decode_seqadj(v)?;
                self.present.set(Present::SEQ_ADJ);
            }
            cta::SEQ_ADJ_REPLY => {
                self.seq_adj.get_or_insert_with(SeqAdj::default).reply = decode_seqadj(v)?;
                self.present.set(Present::SEQ_ADJ);
            }
            cta::SYNPROXY => {
                self.synproxy = Some(decode_synproxy(v)?);
                self.present.set(Present::SYNPROXY);
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self, kind: CtEventKind) -> Result<CtMessage, CodecError> {
        let (orig, orig_zone) = self.orig.ok_or(CodecError::Missing("CTA_TUPLE_ORIG"))?;
        let (reply, reply_zone) = self.reply.ok_or(CodecError::Missing("CTA_TUPLE_REPLY"))?;
        let zone = match (self.zone, orig_zone, reply_zone) {
            (Some(id), _, _) => Zone {
                id,
                dir: ZoneDir::Both,
            },
            (None, Some(id), _) => Zone {
                id,
                dir: ZoneDir::Original,
            },
            (None, None, Some(id)) => Zone {
                id,
                dir: ZoneDir::Reply,
            },
            (None, None, None) => Zone::default(),
        };
        let mut flow = Flow::new(zone, orig, reply);
        flow.status = self.flow_status;
        flow.timeout = self.timeout;
        flow.mark = self.mark;
        flow.set_protoinfo(self.protoinfo);
        flow.set_labels(self.labels);
        flow.set_helper(self.helper);
        flow.set_master(self.master);
        flow.set_seq_adj(self.seq_adj);
        // Kernels since 6.x dump an all-zero CTA_SYNPROXY on every entry: that means none.
        flow.set_synproxy(self.synproxy.filter(|s| *s != Synproxy::default()));
        Ok(CtMessage {
            kind,
            flow,
            present: self.present,
            kernel_id: self.kernel_id,
        })
    }
}

fn be16(v: &[u8], name: &'static str) -> Result<u16, CodecError> {
    fixed::<2>(v, name).map(u16::from_be_bytes)
}

fn be32(v: &[u8], name: &'static str) -> Result<u32, CodecError> {
    fixed::<4>(v, name).map(u32::from_be_bytes)
}

fn be64(v: &[u8], name: &'static str) -> Result<u64, CodecError> {
    fixed::<8>(v, name).map(u64::from_be_bytes)
}

fn byte(v: &[u8], name: &'static str) -> Result<u8, CodecError> {
    fixed::<1>(v, name).map(|b| b[0])
}

fn fixed<const N: usize>(v: &[u8], name: &'static str) -> Result<[u8; N], CodecError> {
    v.get(..N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(CodecError::BadLength {
            name,
            len: v.len(),
            expected: N,
        })
}

/// The attributes of `v`: `(type without flags, value)`, each checked against the bytes left.
///
/// Hand-written rather than netlink-packet-core's `NlasIterator`: this is the innermost loop of
/// event intake, and a plain header read is several times cheaper. A malformed attribute ends
/// the walk with an error.
fn nested(v: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), CodecError>> {
    let mut rest = v;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let header = rest.get(..4).map(|h| {
            (
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
            )
        });
        match header {
            Some((len, kind)) if usize::from(len) >= 4 && usize::from(len) <= rest.len() => {
                let len = usize::from(len);
                let value = &rest[4..len];
                rest = &rest[align4(len).min(rest.len())..];
                Some(Ok((kind & NLA_TYPE_MASK, value)))
            }
            _ => {
                let len = rest.len();
                rest = &[];
                Some(Err(CodecError::Framing(format!(
                    "attribute header does not fit in the {len} bytes left"
                ))))
            }
        }
    })
}

fn decode_tuple(v: &[u8]) -> Result<(Tuple, Option<u16>), CodecError> {
    let (mut src, mut dst, mut num, mut zone) = (None, None, None, None);
    let (mut sport, mut dport) = (0u16, 0u16);
    let (mut icmp_id, mut icmp_type, mut icmp_code) = (0u16, 0u8, 0u8);
    for item in nested(v) {
        let (kind, value) = item?;
        match kind {
            attr::tuple::IP => {
                for ip in nested(value) {
                    let (k, iv) = ip?;
                    match k {
                        attr::ip::V4_SRC => src = Some(v4(iv, "CTA_IP_V4_SRC")?),
                        attr::ip::V4_DST => dst = Some(v4(iv, "CTA_IP_V4_DST")?),
                        attr::ip::V6_SRC => src = Some(v6(iv, "CTA_IP_V6_SRC")?),
                        attr::ip::V6_DST => dst = Some(v6(iv, "CTA_IP_V6_DST")?),
                        _ => {}
                    }
                }
            }
            attr::tuple::PROTO => {
                for p in nested(value) {
                    let (k, pv) = p?;
                    match k {
                        attr::l4::NUM => num = Some(byte(pv, "CTA_PROTO_NUM")?),
                        attr::l4::SRC_PORT => sport = be16(pv, "CTA_PROTO_SRC_PORT")?,
                        attr::l4::DST_PORT => dport = be16(pv, "CTA_PROTO_DST_PORT")?,
                        attr::l4::ICMP_ID | attr::l4::ICMPV6_ID => {
                            icmp_id = be16(pv, "CTA_PROTO_ICMP_ID")?
                        }
                        attr::l4::ICMP_TYPE | attr::l4::ICMPV6_TYPE => {
                            icmp_type = byte(pv, "CTA_PROTO_ICMP_TYPE")?
                        }
                        attr::l4::ICMP_CODE | attr::l4::ICMPV6_CODE => {
                            icmp_code = byte(pv, "CTA_PROTO_ICMP_CODE")?
                        }
                        _ => {}
                    }
                }
            }
            attr::tuple::ZONE => zone = Some(be16(value, "CTA_TUPLE_ZONE")?),
            _ => {}
        }
    }
    let src = src.ok_or(CodecError::Missing("source address in tuple"))?;
    let dst = dst.ok_or(CodecError::Missing("destination address in tuple"))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(CodecError::MixedFamilies);
    }
    let proto = num.ok_or(CodecError::Missing("CTA_PROTO_NUM"))?;
    let l4 = if proto::has_ports(proto) {
        L4::Ports {
            src: sport,
            dst: dport,
        }
    } else if proto::is_icmp(proto) {
        L4::Icmp {
            id: icmp_id,
            kind: icmp_type,
            code: icmp_code,
        }
    } else {
        L4::None
    };
    Ok((
        Tuple {
            src,
            dst,
            proto,
            l4,
        },
        zone,
    ))
}

fn v4(v: &[u8], name: &'static str) -> Result<IpAddr, CodecError> {
    fixed::<4>(v, name).map(|b| IpAddr::V4(Ipv4Addr::from(b)))
}

fn v6(v: &[u8], name: &'static str) -> Result<IpAddr, CodecError> {
    fixed::<16>(v, name).map(|b| IpAddr::V6(Ipv6Addr::from(b)))
}

/// The kernel dumps labels as its in-memory `unsigned long` bitmap; bit *n* is label *n*.
fn decode_labels(v: &[u8]) -> Result<u128, CodecError> {
    if v.len() % 4 != 0 || v.len() > 16 {
        return Err(CodecError::BadLength {
            name: "CTA_LABELS",
            len: v.len(),
            expected: 16,
        });
    }
    let mut labels = 0u128;
    for (i, word) in v.chunks_exact(4).enumerate() {
        let w = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        labels |= u128::from(w) << (32 * i);
    }
    Ok(labels)
}

fn decode_protoinfo(v: &[u8]) -> Result<ProtoInfo, CodecError> {
    let mut info = ProtoInfo::None;
    for item in nested(v) {
        let (kind, value) = item?;
        info = match kind {
            attr::protoinfo::TCP => ProtoInfo::Tcp(decode_tcp(value)?),
            attr::protoinfo::SCTP => decode_sctp(value)?,
            attr::protoinfo::DCCP => decode_dccp(value)?,
            _ => info,
        };
    }
    Ok(info)
}

fn decode_tcp(v: &[u8]) -> Result<TcpInfo, CodecError> {
    use attr::protoinfo as p;
    let mut t = TcpInfo::default();
    for item in nested(v) {
        let (kind, value) = item?;
        match kind {
            p::TCP_STATE => t.state = byte(value, "CTA_PROTOINFO_TCP_STATE")?,
            p::TCP_WSCALE_ORIGINAL => t.wscale_orig = byte(value, "CTA_PROTOINFO_TCP_WSCALE")?,
            p::TCP_WSCALE_REPLY => t.wscale_reply = byte(value, "CTA_PROTOINFO_TCP_WSCALE")?,
            p::TCP_FLAGS_ORIGINAL => t.flags_orig = byte(value, "CTA_PROTOINFO_TCP_FLAGS")?,
            p::TCP_FLAGS_REPLY => t.flags_reply = byte(value, "CTA_PROTOINFO_TCP_FLAGS")?,
            _ => {}
        }
    }
    Ok(t)
}

fn decode_sctp(v: &[u8]) -> Result<ProtoInfo, CodecError> {
    use attr::protoinfo as p;
    let (mut state, mut vtag_orig, mut vtag_reply) = (0, 0, 0);
    for item in nested(v) {
        let (kind, value) = item?;
        match kind {
            p::SCTP_STATE => state = byte(value, "CTA_PROTOINFO_SCTP_STATE")?,
            p::SCTP_VTAG_ORIGINAL => vtag_orig = be32(value, "CTA_PROTOINFO_SCTP_VTAG")?,
            p::SCTP_VTAG_REPLY => vtag_reply = be32(value, "CTA_PROTOINFO_SCTP_VTAG")?,
            _ => {}
        }
    }
    Ok(ProtoInfo::Sctp {
        state,
        vtag_orig,
        vtag_reply,
    })
}

fn decode_dccp(v: &[u8]) -> Result<ProtoInfo, CodecError> {
    use attr::protoinfo as p;
    let (mut state, mut role, mut handshake_seq) = (0, 0, 0);
    for item in nested(v) {
        let (kind, value) = item?;
        match kind {
            p::DCCP_STATE => state = byte(value, "CTA_PROTOINFO_DCCP_STATE")?,
            p::DCCP_ROLE => role = byte(value, "CTA_PROTOINFO_DCCP_ROLE")?,
            p::DCCP_HANDSHAKE_SEQ => handshake_seq = be64(value, "CTA_PROTOINFO_DCCP_SEQ")?,
            _ => {}
        }
    }
    Ok(ProtoInfo::Dccp {
        state,
        role,
        handshake_seq,
    })
}

fn decode_helper(v: &[u8]) -> Result<Option<Box<str>>, CodecError> {
    for item in nested(v) {
        let (kind, value) = item?;
        if kind == attr::help::NAME {
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            let name = String::from_utf8_lossy(&value[..end]);
            return Ok(Some(name.into()));
        }
    }
    Ok(None)
}

fn decode_seqadj(v: &[u8]) -> Result<SeqAdjDir, CodecError> {
    use attr::seqadj as s;
    let mut d = SeqAdjDir::default();
    for item in nested(v) {
        let (kind, value) = item?;
        match kind {
            s::CORRECTION_POS => d.correction_pos = be32(value, "CTA_SEQADJ_CORRECTION_POS")?,
            s::OFFSET_BEFORE => d.offset_before = be32(value, "CTA_SEQADJ_OFFSET_BEFORE")?,
            s::OFFSET_AFTER => d.offset_after = be32(value, "CTA_SEQADJ_OFFSET_AFTER")?,
            _ => {}
        }
    }
    Ok(d)
}

fn decode_synproxy(v: &[u8]) -> Result<Synproxy, CodecError> {
    use attr::synproxy as s;
    let mut d = Synproxy::default();
    for item in nested(v) {
        let (kind, value) = item?;
        match kind {
            s::ISN => d.isn = be32(value, "CTA_SYNPROXY_ISN")?,
            s::ITS => d.its = be32(value, "CTA_SYNPROXY_ITS")?,
            s::TSOFF => d.tsoff = be32(value, "CTA_SYNPROXY_TSOFF")?,
            _ => {}
        }
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// What a write message asks the kernel to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    /// Create a new entry; fails with `EEXIST` if it exists (so that the caller can update it).
    Create,
    /// Change an existing entry's mutable attributes; fails with `ENOENT` if it does not exist.
    /// Labels are always written, so that cleared labels are cleared in the kernel too.
    Update,
    /// `Update` without labels: for entries the kernel keeps no labels for (`ENOSPC` on
    /// `Update`), whose labels are thus already zero.
    UpdateWithoutLabels,
    /// Delete the entry.
    Delete,
}

/// Appends one ctnetlink request for `flow` to `buf`.
///
/// `ack` asks the kernel to confirm success too; errors are always reported.
pub fn encode_write(buf: &mut Vec<u8>, op: WriteOp, flow: &Flow, seq: u32, ack: bool) {
    let (msg_type, flags) = match op {
        WriteOp::Create => (attr::MSG_CT_NEW, attr::NLM_F_CREATE | attr::NLM_F_EXCL),
        WriteOp::Update | WriteOp::UpdateWithoutLabels => (attr::MSG_CT_NEW, 0),
        WriteOp::Delete => (attr::MSG_CT_DELETE, 0),
    };
    let flags = attr::NLM_F_REQUEST | flags | if ack { attr::NLM_F_ACK } else { 0 };
    let header = Header {
        msg_type,
        flags,
        seq,
        family: family(&flow.key.orig),
    };
    let mut w = MessageWriter::begin(buf, max_len(flow), header);
    match op {
        WriteOp::Create => create_attrs(&mut w, flow),
        WriteOp::Update => update_attrs(&mut w, flow, true),
        WriteOp::UpdateWithoutLabels => update_attrs(&mut w, flow, false),
        WriteOp::Delete => key_attrs(&mut w, &flow.key),
    }
    w.finish();
}

/// Appends `flow` as the kernel itself would report it: a full entry with its real reply tuple
/// (event or dump form). Used to build test input and to measure decoding without a kernel.
pub fn encode_entry(buf: &mut Vec<u8>, kind: CtEventKind, flow: &Flow, seq: u32) {
    let (msg_type, flags) = match kind {
        CtEventKind::New => (attr::MSG_CT_NEW, attr::NLM_F_CREATE | attr::NLM_F_EXCL),
        CtEventKind::Update => (attr::MSG_CT_NEW, 0),
        CtEventKind::Destroy => (attr::MSG_CT_DELETE, 0),
    };
    let header = Header {
        msg_type,
        flags,
        seq,
        family: family(&flow.key.orig),
    };
    let mut w = MessageWriter::begin(buf, max_len(flow), header);
    key_attrs(&mut w, &flow.key);
    let reply_zone = (flow.key.zone.dir == ZoneDir::Reply).then_some(flow.key.zone.id);
    w.tuple(cta::TUPLE_REPLY, &flow.reply, reply_zone);
    related_attrs(&mut w, flow);
    mutable_attrs(&mut w, flow, flow.status, false);
    w.finish();
}

/// Appends a dump request for the whole table (both families).
pub fn encode_dump_request(buf: &mut Vec<u8>, seq: u32) {
    let header = Header {
        msg_type: attr::MSG_CT_GET,
        flags: attr::NLM_F_REQUEST | attr::NLM_F_DUMP,
        seq,
        family: AF_UNSPEC,
    };
    MessageWriter::begin(buf, MSG_HEADER_LEN, header).finish();
}

/// Asks for the number of conntrack entries of the socket's namespace
/// (`IPCTNL_MSG_CT_GET_STATS`; answered by one message, see [`decode_count`]).
pub fn encode_count_request(buf: &mut Vec<u8>, seq: u32) {
    let header = Header {
        msg_type: attr::MSG_CT_GET_STATS,
        flags: attr::NLM_F_REQUEST,
        seq,
        family: AF_UNSPEC,
    };
    MessageWriter::begin(buf, MSG_HEADER_LEN, header).finish();
}

/// The entry count (`CTA_STATS_GLOBAL_ENTRIES`) of a `IPCTNL_MSG_CT_GET_STATS` answer.
pub fn decode_count(msg: &RawMessage<'_>) -> Result<u32, CodecError> {
    let attrs = msg
        .payload
        .get(4..)
        .ok_or_else(|| CodecError::Framing("stats answer without nfgenmsg".into()))?;
    for a in nested(attrs) {
        let (kind, value) = a?;
        if kind == attr::STATS_GLOBAL_ENTRIES {
            return be32(value, "CTA_STATS_GLOBAL_ENTRIES");
        }
    }
    Err(CodecError::Framing(
        "stats answer without CTA_STATS_GLOBAL_ENTRIES".into(),
    ))
}

/// `nfgenmsg.nfgen_family` values: the family of the entry a request is about.
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

fn family(t: &Tuple) -> u8 {
    if t.is_ipv6() {
        AF_INET6
    } else {
        AF_INET
    }
}

// The size bounds below let an encoder reserve room once and then append without ever growing
// `buf` mid-message (no allocation at all when the caller's buffer has room).

/// `nlmsghdr` plus `nfgenmsg`.
const MSG_HEADER_LEN: usize = 16 + 4;
/// An attribute's own header.
const NLA_HEADER_LEN: usize = 4;
/// The longest value written as an array (an IPv6 address, the labels).
const MAX_FIXED_VALUE: usize = 16;

/// Room an attribute with a `value`-byte payload takes, padding included.
const fn nla_len(value: usize) -> usize {
    NLA_HEADER_LEN + align4(value)
}

/// The largest tuple: IPv6 addresses, three ICMP members after the protocol, a tuple zone.
const TUPLE_MAX: usize =
    nla_len(nla_len(2 * nla_len(16)) + nla_len(nla_len(1) + 3 * nla_len(2)) + nla_len(2));
/// One NAT range: IPv6 minimum and maximum and a port range.
const NAT_RANGE_MAX: usize = nla_len(2 * nla_len(16) + nla_len(2 * nla_len(2)));
/// TCP is the largest protocol info (five members, the flags being two bytes each).
const PROTOINFO_MAX: usize = nla_len(nla_len(3 * nla_len(1) + 2 * nla_len(2)));
const SEQ_ADJ_DIR_LEN: usize = nla_len(3 * nla_len(4));
const SYNPROXY_LEN: usize = nla_len(3 * nla_len(4));
/// Everything but the helper name: the union of what any message form carries.
const FIXED_MAX: usize = MSG_HEADER_LEN
    + 3 * TUPLE_MAX // original, reply, master
    + nla_len(2) // zone
    + 2 * NAT_RANGE_MAX
    + 3 * nla_len(4) // status, timeout, mark
    + nla_len(16) // labels
    + PROTOINFO_MAX
    + 2 * SEQ_ADJ_DIR_LEN
    + SYNPROXY_LEN
    + 2 * NLA_HEADER_LEN; // the helper nest and its name attribute

/// An upper bound on the size of any message about `flow`.
fn max_len(flow: &Flow) -> usize {
    // The name travels NUL-terminated and padded to 4 bytes.
    FIXED_MAX + flow.helper().map_or(0, |h| h.len() + 4)
}

/// Header fields of a ctnetlink message.
struct Header {
    msg_type: u16,
    flags: u16,
    seq: u32,
    family: u8,
}

/// Appends one netlink message to a buffer in place: headers first, attributes as they come,
/// lengths patched in when a nest or the message is complete.
struct MessageWriter<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> MessageWriter<'a> {
    /// Writes the headers, with a length patched in by [`MessageWriter::finish`].
    ///
    /// Reserving `room` up front means appending never reallocates: callers pass an upper bound
    /// of the message size.
    fn begin(buf: &'a mut Vec<u8>, room: usize, h: Header) -> Self {
        buf.reserve(room);
        let start = buf.len();
        // nlmsghdr: the length is patched in by `finish`; the kernel fills in the port id.
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&h.msg_type.to_ne_bytes());
        buf.extend_from_slice(&h.flags.to_ne_bytes());
        buf.extend_from_slice(&h.seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, NFNETLINK_V0, res_id 0 (big endian).
        buf.extend_from_slice(&[h.family, 0, 0, 0]);
        MessageWriter { buf, start }
    }

    /// Sets the message length; every attribute is padded, so the message ends aligned.
    fn finish(self) {
        let len = wire_len32(self.buf.len() - self.start);
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// One attribute, padded with zeros to 4 bytes (the length field excludes the padding).
    ///
    /// Assembled on the stack and appended in one copy whose length is a constant: writing the
    /// header, the value and the padding separately made three copies of lengths known only at
    /// run time, each a call into libc, and was most of the time a commit spends outside the
    /// kernel.
    fn put<const N: usize>(&mut self, kind: u16, value: [u8; N]) {
        const { assert!(N <= MAX_FIXED_VALUE) };
        let len = NLA_HEADER_LEN + N;
        let mut attr = [0u8; NLA_HEADER_LEN + MAX_FIXED_VALUE];
        attr[..2].copy_from_slice(&wire_len16(len).to_ne_bytes());
        attr[2..4].copy_from_slice(&kind.to_ne_bytes());
        attr[NLA_HEADER_LEN..len].copy_from_slice(&value);
        self.buf.extend_from_slice(&attr[..align4(len)]);
    }

    fn u8(&mut self, kind: u16, v: u8) {
        self.put(kind, [v]);
    }

    fn be16(&mut self, kind: u16, v: u16) {
        self.put(kind, v.to_be_bytes());
    }

    fn be32(&mut self, kind: u16, v: u32) {
        self.put(kind, v.to_be_bytes());
    }

    fn be64(&mut self, kind: u16, v: u64) {
        self.put(kind, v.to_be_bytes());
    }

    /// A nest with `NLA_F_NESTED`, as the kernel's own `nla_nest_start` writes it: strict
    /// netlink parsers require the flag.
    fn nest(&mut self, kind: u16, members: impl FnOnce(&mut Self)) {
        let at = self.buf.len();
        self.put_header(kind | NLA_F_NESTED, 0);
        members(self);
        // Members end padded, so the nest's length covers the last member's padding.
        let len = wire_len16(self.buf.len() - at);
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn put_header(&mut self, kind: u16, len: usize) {
        self.buf.extend_from_slice(&wire_len16(len).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
    }

    fn pad(&mut self) {
        let n = align4(self.buf.len() - self.start) - (self.buf.len() - self.start);
        self.buf.extend_from_slice(&[0; 3][..n]);
    }

    /// A tuple nest: addresses, protocol with ports or ICMP identifiers, and an optional
    /// per-direction zone.
    fn tuple(&mut self, kind: u16, t: &Tuple, zone: Option<u16>) {
        self.nest(kind, |w| {
            w.tuple_members(t);
            if let Some(id) = zone {
                w.be16(attr::tuple::ZONE, id);
            }
        });
    }

    /// What a tuple nest holds; a master tuple is only this.
    fn tuple_members(&mut self, t: &Tuple) {
        self.nest(attr::tuple::IP, |w| w.addresses(t));
        self.nest(attr::tuple::PROTO, |w| w.l4(t));
    }

    fn addresses(&mut self, t: &Tuple) {
        for (addr, v4, v6) in [
            (t.src, attr::ip::V4_SRC, attr::ip::V6_SRC),
            (t.dst, attr::ip::V4_DST, attr::ip::V6_DST),
        ] {
            match addr {
                IpAddr::V4(a) => self.put(v4, a.octets()),
                IpAddr::V6(a) => self.put(v6, a.octets()),
            }
        }
    }

    fn l4(&mut self, t: &Tuple) {
        use attr::l4 as a;
        self.u8(a::NUM, t.proto);
        match t.l4 {
            L4::None => {}
            L4::Ports { src, dst } => {
                self.be16(a::SRC_PORT, src);
                self.be16(a::DST_PORT, dst);
            }
            L4::Icmp { id, kind, code } => {
                let (a_id, a_type, a_code) = if t.proto == proto::ICMPV6 {
                    (a::ICMPV6_ID, a::ICMPV6_TYPE, a::ICMPV6_CODE)
                } else {
                    (a::ICMP_ID, a::ICMP_TYPE, a::ICMP_CODE)
                };
                self.be16(a_id, id);
                self.u8(a_type, kind);
                self.u8(a_code, code);
            }
        }
    }
}

/// A length field of the message header. Messages are bounded by [`max_len`]: a few hundred
/// bytes plus a helper name, far below 4 GiB.
fn wire_len32(len: usize) -> u32 {
    len as u32
}

/// A length field of an attribute header. A nest can only exceed 64 KiB with an absurdly long
/// helper name, which the kernel refuses anyway (at most 15 bytes); the length then wraps, as it
/// did with netlink-packet-core's emitter.
fn wire_len16(len: usize) -> u16 {
    len as u16
}

/// Tuple and zone attributes: what identifies the entry to the kernel.
fn key_attrs(w: &mut MessageWriter<'_>, key: &FlowKey) {
    let orig_zone = (key.zone.dir == ZoneDir::Original).then_some(key.zone.id);
    w.tuple(cta::TUPLE_ORIG, &key.orig, orig_zone);
    if key.zone.dir == ZoneDir::Both && key.zone.id != 0 {
        w.be16(cta::ZONE, key.zone.id);
    }
}

fn create_attrs(w: &mut MessageWriter<'_>, flow: &Flow) {
    key_attrs(w, &flow.key);
    let reply_zone = (flow.key.zone.dir == ZoneDir::Reply).then_some(flow.key.zone.id);
    // The plain inverse: the kernel derives the translated reply tuple from the NAT ranges.
    w.tuple(cta::TUPLE_REPLY, &flow.key.orig.inverse(), reply_zone);
    nat_attrs(w, flow);
    related_attrs(w, flow);
    // The kernel itself sets EXPECTED when it links a master, and refuses it from userspace.
    let st = (flow.status | status::CONFIRMED) & !(status::DYING | status::EXPECTED);
    mutable_attrs(w, flow, st, true);
}

fn update_attrs(w: &mut MessageWriter<'_>, flow: &Flow, labels: bool) {
    key_attrs(w, &flow.key);
    // NAT, master and helper cannot change on an existing entry; the kernel refuses them.
    let st = (flow.status | status::CONFIRMED) & !status::DYING;
    mutable_attrs(w, flow, st, false);
    if labels && flow.labels() == 0 {
        // Explicit zeros, so that labels cleared on the origin are cleared here too.
        labels_attr(w, 0);
    }
}

/// Master tuple and helper: set once, when the entry is created (or reported whole).
fn related_attrs(w: &mut MessageWriter<'_>, flow: &Flow) {
    if let Some(master) = flow.master() {
        w.nest(cta::TUPLE_MASTER, |w| w.tuple_members(master));
    }
    if let Some(helper) = flow.helper() {
        helper_attr(w, helper);
    }
}

fn mutable_attrs(w: &mut MessageWriter<'_>, flow: &Flow, st: u32, create: bool) {
    w.be32(cta::STATUS, st);
    w.be32(cta::TIMEOUT, flow.timeout);
    if flow.mark != 0 || !create {
        w.be32(cta::MARK, flow.mark);
    }
    // Labels need the kernel's label extension; an all-zero write fails where it is absent
    // (updates handle that case themselves).
    if flow.labels() != 0 {
        labels_attr(w, flow.labels());
    }
    protoinfo_attr(w, &flow.protoinfo());
    if let Some(adj) = flow.seq_adj() {
        seqadj_attr(w, cta::SEQ_ADJ_ORIG, &adj.orig);
        seqadj_attr(w, cta::SEQ_ADJ_REPLY, &adj.reply);
    }
    if let Some(sp) = flow.synproxy() {
        use attr::synproxy as s;
        w.nest(cta::SYNPROXY, |w| {
            w.be32(s::ISN, sp.isn);
            w.be32(s::ITS, sp.its);
            w.be32(s::TSOFF, sp.tsoff);
        });
    }
}

/// The kernel reads labels as its in-memory `unsigned long` bitmap: native-endian 32-bit words,
/// lowest labels first.
fn labels_attr(w: &mut MessageWriter<'_>, labels: u128) {
    let mut bytes = [0u8; 16];
    for (i, word) in bytes.chunks_exact_mut(4).enumerate() {
        word.copy_from_slice(&((labels >> (32 * i)) as u32).to_ne_bytes());
    }
    w.put(cta::LABELS, bytes);
}

/// NAT ranges that make the kernel set up exactly the binding the flow has.
///
/// Only directions whose `*_NAT_DONE` bit is set get a range: an identity range then reproduces
/// a "no translation" binding, which keeps the kernel from running NAT rules on the first packet
/// after failover and translating a flow that was never translated.
fn nat_attrs(w: &mut MessageWriter<'_>, flow: &Flow) {
    if flow.status & status::DST_NAT_DONE != 0 {
        let port = l4_port(&flow.reply, true);
        nat_range(w, cta::NAT_DST, flow.reply.src, port);
    }
    if flow.status & status::SRC_NAT_DONE != 0 {
        let port = l4_port(&flow.reply, false);
        nat_range(w, cta::NAT_SRC, flow.reply.dst, port);
    }
}

/// The port (or ICMP id) a NAT range pins: reply source for DNAT, reply destination for SNAT.
fn l4_port(reply: &Tuple, src_side: bool) -> Option<u16> {
    match reply.l4 {
        L4::Ports { src, dst } => Some(if src_side { src } else { dst }),
        L4::Icmp { id, .. } => Some(id),
        L4::None => None,
    }
}

/// A single-address, single-port range: the binding is reproduced, not re-chosen.
fn nat_range(w: &mut MessageWriter<'_>, kind: u16, addr: IpAddr, port: Option<u16>) {
    use attr::nat;
    w.nest(kind, |w| {
        match addr {
            IpAddr::V4(a) => {
                w.put(nat::V4_MINIP, a.octets());
                w.put(nat::V4_MAXIP, a.octets());
            }
            IpAddr::V6(a) => {
                w.put(nat::V6_MINIP, a.octets());
                w.put(nat::V6_MAXIP, a.octets());
            }
        }
        if let Some(p) = port {
            w.nest(nat::PROTO, |w| {
                w.be16(nat::PORT_MIN, p);
                w.be16(nat::PORT_MAX, p);
            });
        }
    });
}

fn protoinfo_attr(w: &mut MessageWriter<'_>, info: &ProtoInfo) {
    use attr::protoinfo as p;
    match *info {
        ProtoInfo::None => {}
        ProtoInfo::Tcp(t) => w.nest(cta::PROTOINFO, |w| {
            w.nest(p::TCP, |w| {
                w.u8(p::TCP_STATE, t.state);
                w.u8(p::TCP_WSCALE_ORIGINAL, t.wscale_orig);
                w.u8(p::TCP_WSCALE_REPLY, t.wscale_reply);
                // `nf_ct_tcp_flags` with a full mask, so that the kernel's copy ends up equal.
                w.put(p::TCP_FLAGS_ORIGINAL, [t.flags_orig, 0xff]);
                w.put(p::TCP_FLAGS_REPLY, [t.flags_reply, 0xff]);
            });
        }),
        ProtoInfo::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        } => w.nest(cta::PROTOINFO, |w| {
            w.nest(p::SCTP, |w| {
                w.u8(p::SCTP_STATE, state);
                w.be32(p::SCTP_VTAG_ORIGINAL, vtag_orig);
                w.be32(p::SCTP_VTAG_REPLY, vtag_reply);
            });
        }),
        ProtoInfo::Dccp {
            state,
            role,
            handshake_seq,
        } => w.nest(cta::PROTOINFO, |w| {
            w.nest(p::DCCP, |w| {
                w.u8(p::DCCP_STATE, state);
                w.u8(p::DCCP_ROLE, role);
                w.be64(p::DCCP_HANDSHAKE_SEQ, handshake_seq);
            });
        }),
    }
}

/// The name travels NUL-terminated (`NLA_NUL_STRING`).
fn helper_attr(w: &mut MessageWriter<'_>, name: &str) {
    w.nest(cta::HELP, |w| {
        w.put_header(attr::help::NAME, NLA_HEADER_LEN + name.len() + 1);
        w.buf.extend_from_slice(name.as_bytes());
        w.buf.push(0);
        w.pad();
    });
}

fn seqadj_attr(w: &mut MessageWriter<'_>, kind: u16, d: &SeqAdjDir) {
    use attr::seqadj as s;
    w.nest(kind, |w| {
        w.be32(s::CORRECTION_POS, d.correction_pos);
        w.be32(s::OFFSET_BEFORE, d.offset_before);
        w.be32(s::OFFSET_AFTER, d.offset_after);
    });
}

#[cfg(test)]
mod tests;
