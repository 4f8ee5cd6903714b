//! The ctnetlink codec: netlink messages to and from [`Flow`].
//!
//! Decoding walks attributes in place with netlink-packet-core's `NlasIterator` (no allocation per
//! attribute: the event path must keep up with the kernel). Encoding builds netlink-packet-netfilter
//! messages, with the attributes that crate does not model passed as raw `DefaultNla`s. Unknown
//! attributes are skipped, never an error: newer kernels add attributes (type 27 on 6.18).

use super::attr::{self, cta};
use crate::flow::{
    proto, status, Flow, FlowKey, Present, ProtoInfo, SeqAdj, SeqAdjDir, Synproxy, TcpInfo, Tuple,
    Zone, ZoneDir, L4,
};
use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla,
    NlaBuffer, NlasIterator, NLA_F_NESTED, NLA_TYPE_MASK,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo as NfProtoInfo, ProtoInfoTCP,
    ProtoTuple, Protocol, Status, TCPFlags, Tuple as NfTuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
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
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<RawMessage<'_>, CodecError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let parsed = NetlinkBuffer::new_checked(rest)
            .map_err(|e| CodecError::Framing(e.to_string()))
            .map(|nb| {
                let len = nb.length() as usize;
                let msg = RawMessage {
                    msg_type: nb.message_type(),
                    flags: nb.flags(),
                    seq: nb.sequence_number(),
                    portid: nb.port_number(),
                    payload: &rest[16..len],
                };
                (msg, len)
            });
        match parsed {
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

fn align4(n: usize) -> usize {
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
    for nla in NlasIterator::new(&msg.payload[4..]) {
        d.top_level(&nla.map_err(framing)?)?;
    }
    d.finish(kind)
}

fn framing(e: netlink_packet_core::DecodeError) -> CodecError {
    CodecError::Framing(e.to_string())
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
    master: Option<Box<Tuple>>,
    seq_adj: Option<SeqAdj>,
    synproxy: Option<Synproxy>,
    kernel_id: Option<u32>,
    present: Present,
}

impl Decoder {
    fn top_level(&mut self, nla: &NlaBuffer<&[u8]>) -> Result<(), CodecError> {
        let v = nla.value();
        match nla.kind() & NLA_TYPE_MASK {
            cta::TUPLE_ORIG => self.orig = Some(decode_tuple(v)?),
            cta::TUPLE_REPLY => self.reply = Some(decode_tuple(v)?),
            cta::TUPLE_MASTER => {
                self.master = Some(Box::new(decode_tuple(v)?.0));
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
        let flow = Flow {
            key: FlowKey { zone, orig },
            reply,
            status: self.flow_status,
            timeout: self.timeout,
            mark: self.mark,
            labels: self.labels,
            protoinfo: self.protoinfo,
            helper: self.helper,
            master: self.master,
            seq_adj: self.seq_adj.map(Box::new),
            // Kernels since 6.x dump an all-zero CTA_SYNPROXY on every entry: that means none.
            synproxy: self
                .synproxy
                .filter(|s| *s != Synproxy::default())
                .map(Box::new),
        };
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

fn nested(v: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), CodecError>> {
    NlasIterator::new(v).map(|r| {
        r.map(|n| (n.kind() & NLA_TYPE_MASK, n.into_inner_value()))
            .map_err(framing)
    })
}

/// `NlaBuffer::value` borrows the wrapper; this keeps the lifetime of the underlying bytes.
trait IntoInnerValue<'a> {
    fn into_inner_value(self) -> &'a [u8];
}

impl<'a> IntoInnerValue<'a> for NlaBuffer<&'a [u8]> {
    fn into_inner_value(self) -> &'a [u8] {
        // `new_checked` (used by the iterator) guarantees 4 <= length <= buffer size.
        let len = usize::from(self.length());
        &self.into_inner()[4..len]
    }
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

fn encode_labels(labels: u128) -> Vec<u8> {
    (0..4)
        .flat_map(|i| ((labels >> (32 * i)) as u32).to_ne_bytes())
        .collect()
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
    let (attrs, msg, flags) = match op {
        WriteOp::Create => (
            create_attrs(flow),
            ConntrackMessage::New as fn(_) -> _,
            attr::NLM_F_CREATE | attr::NLM_F_EXCL,
        ),
        WriteOp::Update => (
            update_attrs(flow, true),
            ConntrackMessage::New as fn(_) -> _,
            0,
        ),
        WriteOp::UpdateWithoutLabels => (
            update_attrs(flow, false),
            ConntrackMessage::New as fn(_) -> _,
            0,
        ),
        WriteOp::Delete => (
            key_attrs(&flow.key),
            ConntrackMessage::Delete as fn(_) -> _,
            0,
        ),
    };
    let flags = attr::NLM_F_REQUEST | flags | if ack { attr::NLM_F_ACK } else { 0 };
    emit_message(buf, family(&flow.key.orig), msg(attrs), flags, seq);
}

/// Appends `flow` as the kernel itself would report it: a full entry with its real reply tuple
/// (event or dump form). Used to build test input and to measure decoding without a kernel.
pub fn encode_entry(buf: &mut Vec<u8>, kind: CtEventKind, flow: &Flow, seq: u32) {
    let mut attrs = key_attrs(&flow.key);
    let reply_zone = (flow.key.zone.dir == ZoneDir::Reply).then_some(flow.key.zone.id);
    attrs.push(ConntrackAttribute::CtaTupleReply(tuple_nlas(
        &flow.reply,
        reply_zone,
    )));
    if let Some(master) = &flow.master {
        attrs.push(nested_raw(cta::TUPLE_MASTER, &tuple_nlas(master, None)));
    }
    if let Some(helper) = &flow.helper {
        attrs.push(helper_attr(helper));
    }
    mutable_attrs(&mut attrs, flow, flow.status, false);
    let (msg, flags) = match kind {
        CtEventKind::New => (
            ConntrackMessage::New(attrs),
            attr::NLM_F_CREATE | attr::NLM_F_EXCL,
        ),
        CtEventKind::Update => (ConntrackMessage::New(attrs), 0),
        CtEventKind::Destroy => (ConntrackMessage::Delete(attrs), 0),
    };
    emit_message(buf, family(&flow.key.orig), msg, flags, seq);
}

/// Appends a dump request for the whole table (both families).
pub fn encode_dump_request(buf: &mut Vec<u8>, seq: u32) {
    emit_message(
        buf,
        NetfilterProtoFamily::Unspec,
        ConntrackMessage::Get(Vec::new()),
        attr::NLM_F_REQUEST | attr::NLM_F_DUMP,
        seq,
    );
}

fn emit_message(
    buf: &mut Vec<u8>,
    family: NetfilterProtoFamily,
    msg: ConntrackMessage,
    flags: u16,
    seq: u32,
) {
    let payload = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg);
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    nl.finalize();
    let start = buf.len();
    buf.resize(start + nl.buffer_len(), 0);
    nl.serialize(&mut buf[start..]);
    // netlink-nlmsghdr (16) + nfgenmsg (4), then the attributes.
    set_nested_flags(&mut buf[start + 20..]);
}

/// Sets `NLA_F_NESTED` on the nests that travel as raw attributes.
///
/// netlink-packet-netfilter's `Other` wrappers report themselves as not nested, so the flag
/// given to their `DefaultNla` is dropped on emit. Kernels ignore it today, but it is part of
/// the format, and stricter parsers require it.
fn set_nested_flags(attrs: &mut [u8]) {
    const RAW_NESTS: [u16; 7] = [
        cta::NAT_SRC,
        cta::NAT_DST,
        cta::TUPLE_MASTER,
        cta::HELP,
        cta::SEQ_ADJ_ORIG,
        cta::SEQ_ADJ_REPLY,
        cta::SYNPROXY,
    ];
    for_each_nla(attrs, |kind, value| {
        if kind == cta::PROTOINFO {
            for_each_nla(value, |_, _| true);
        }
        RAW_NESTS.contains(&kind) || kind == cta::PROTOINFO
    });
}

/// Walks the attributes of `buf`; sets the nested flag where `nested(kind, value)` says so.
fn for_each_nla(buf: &mut [u8], mut nested: impl FnMut(u16, &mut [u8]) -> bool) {
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = usize::from(u16::from_ne_bytes([buf[off], buf[off + 1]]));
        if len < 4 || off + len > buf.len() {
            return;
        }
        let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if nested(kind, &mut buf[off + 4..off + len]) {
            let flagged = (kind | NLA_F_NESTED).to_ne_bytes();
            buf[off + 2..off + 4].copy_from_slice(&flagged);
        }
        off += align4(len);
    }
}

fn family(t: &Tuple) -> NetfilterProtoFamily {
    if t.is_ipv6() {
        NetfilterProtoFamily::IPv6
    } else {
        NetfilterProtoFamily::IPv4
    }
}

/// Tuple and zone attributes: what identifies the entry to the kernel.
fn key_attrs(key: &FlowKey) -> Vec<ConntrackAttribute> {
    let orig_zone = (key.zone.dir == ZoneDir::Original).then_some(key.zone.id);
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple_nlas(
        &key.orig, orig_zone,
    ))];
    if key.zone.dir == ZoneDir::Both && key.zone.id != 0 {
        attrs.push(raw(cta::ZONE, key.zone.id.to_be_bytes().to_vec()));
    }
    attrs
}

fn create_attrs(flow: &Flow) -> Vec<ConntrackAttribute> {
    let mut attrs = key_attrs(&flow.key);
    let reply_zone = (flow.key.zone.dir == ZoneDir::Reply).then_some(flow.key.zone.id);
    // The plain inverse: the kernel derives the translated reply tuple from the NAT ranges.
    attrs.push(ConntrackAttribute::CtaTupleReply(tuple_nlas(
        &flow.key.orig.inverse(),
        reply_zone,
    )));
    attrs.extend(nat_attrs(flow));
    if let Some(master) = &flow.master {
        attrs.push(nested_raw(cta::TUPLE_MASTER, &tuple_nlas(master, None)));
    }
    if let Some(helper) = &flow.helper {
        attrs.push(helper_attr(helper));
    }
    // The kernel itself sets EXPECTED when it links a master, and refuses it from userspace.
    let st = (flow.status | status::CONFIRMED) & !(status::DYING | status::EXPECTED);
    mutable_attrs(&mut attrs, flow, st, true);
    attrs
}

fn update_attrs(flow: &Flow, labels: bool) -> Vec<ConntrackAttribute> {
    let mut attrs = key_attrs(&flow.key);
    // NAT, master and helper cannot change on an existing entry; the kernel refuses them.
    let st = (flow.status | status::CONFIRMED) & !status::DYING;
    mutable_attrs(&mut attrs, flow, st, false);
    if labels && flow.labels == 0 {
        attrs.push(raw(cta::LABELS, encode_labels(0)));
    }
    attrs
}

fn mutable_attrs(attrs: &mut Vec<ConntrackAttribute>, flow: &Flow, st: u32, create: bool) {
    attrs.push(ConntrackAttribute::CtaStatus(Status::from_bits_retain(st)));
    attrs.push(ConntrackAttribute::CtaTimeout(flow.timeout));
    if flow.mark != 0 || !create {
        attrs.push(ConntrackAttribute::CtaMark(flow.mark));
    }
    // Labels need the kernel's label extension; an all-zero write fails where it is absent
    // (updates handle that case themselves).
    if flow.labels != 0 {
        attrs.push(raw(cta::LABELS, encode_labels(flow.labels)));
    }
    if let Some(p) = protoinfo_attr(&flow.protoinfo) {
        attrs.push(p);
    }
    if let Some(adj) = &flow.seq_adj {
        attrs.push(seqadj_attr(cta::SEQ_ADJ_ORIG, &adj.orig));
        attrs.push(seqadj_attr(cta::SEQ_ADJ_REPLY, &adj.reply));
    }
    if let Some(sp) = &flow.synproxy {
        let members = [
            raw_nla(attr::synproxy::ISN, sp.isn.to_be_bytes().to_vec()),
            raw_nla(attr::synproxy::ITS, sp.its.to_be_bytes().to_vec()),
            raw_nla(attr::synproxy::TSOFF, sp.tsoff.to_be_bytes().to_vec()),
        ];
        attrs.push(nested_raw(cta::SYNPROXY, &members));
    }
}

fn tuple_nlas(t: &Tuple, zone: Option<u16>) -> Vec<NfTuple> {
    let mut l4 = vec![ProtoTuple::Protocol(Protocol::from(t.proto))];
    match t.l4 {
        L4::None => {}
        L4::Ports { src, dst } => {
            l4.push(ProtoTuple::SourcePort(src));
            l4.push(ProtoTuple::DestinationPort(dst));
        }
        L4::Icmp { id, kind, code } => {
            let (a_id, a_type, a_code) = if t.proto == proto::ICMPV6 {
                (
                    attr::l4::ICMPV6_ID,
                    attr::l4::ICMPV6_TYPE,
                    attr::l4::ICMPV6_CODE,
                )
            } else {
                (attr::l4::ICMP_ID, attr::l4::ICMP_TYPE, attr::l4::ICMP_CODE)
            };
            l4.push(ProtoTuple::Other(DefaultNla::new(
                a_id,
                id.to_be_bytes().to_vec(),
            )));
            l4.push(ProtoTuple::Other(DefaultNla::new(a_type, vec![kind])));
            l4.push(ProtoTuple::Other(DefaultNla::new(a_code, vec![code])));
        }
    }
    let mut nlas = vec![
        NfTuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        NfTuple::Proto(l4),
    ];
    if let Some(id) = zone {
        nlas.push(NfTuple::Other(DefaultNla::new(
            attr::tuple::ZONE,
            id.to_be_bytes().to_vec(),
        )));
    }
    nlas
}

/// NAT ranges that make the kernel set up exactly the binding the flow has.
///
/// Only directions whose `*_NAT_DONE` bit is set get a range: an identity range then reproduces
/// a "no translation" binding, which keeps the kernel from running NAT rules on the first packet
/// after failover and translating a flow that was never translated.
fn nat_attrs(flow: &Flow) -> Vec<ConntrackAttribute> {
    let mut attrs = Vec::new();
    if flow.status & status::DST_NAT_DONE != 0 {
        let port = l4_port(&flow.reply, true);
        attrs.push(nat_range(cta::NAT_DST, flow.reply.src, port));
    }
    if flow.status & status::SRC_NAT_DONE != 0 {
        let port = l4_port(&flow.reply, false);
        attrs.push(nat_range(cta::NAT_SRC, flow.reply.dst, port));
    }
    attrs
}

/// The port (or ICMP id) a NAT range pins: reply source for DNAT, reply destination for SNAT.
fn l4_port(reply: &Tuple, src_side: bool) -> Option<u16> {
    match reply.l4 {
        L4::Ports { src, dst } => Some(if src_side { src } else { dst }),
        L4::Icmp { id, .. } => Some(id),
        L4::None => None,
    }
}

fn nat_range(kind: u16, addr: IpAddr, port: Option<u16>) -> ConntrackAttribute {
    use attr::nat;
    let (min, max, bytes) = match addr {
        IpAddr::V4(a) => (nat::V4_MINIP, nat::V4_MAXIP, a.octets().to_vec()),
        IpAddr::V6(a) => (nat::V6_MINIP, nat::V6_MAXIP, a.octets().to_vec()),
    };
    let mut members = vec![raw_nla(min, bytes.clone()), raw_nla(max, bytes)];
    if let Some(p) = port {
        let ports = [
            raw_nla(nat::PORT_MIN, p.to_be_bytes().to_vec()),
            raw_nla(nat::PORT_MAX, p.to_be_bytes().to_vec()),
        ];
        members.push(nested_nla(nat::PROTO, &ports));
    }
    nested_raw(kind, &members)
}

fn protoinfo_attr(info: &ProtoInfo) -> Option<ConntrackAttribute> {
    use attr::protoinfo as p;
    let inner = match *info {
        ProtoInfo::None => return None,
        ProtoInfo::Tcp(t) => NfProtoInfo::TCP(vec![
            ProtoInfoTCP::State(t.state),
            ProtoInfoTCP::OriginalWindowScale(t.wscale_orig),
            ProtoInfoTCP::ReplyWindowScale(t.wscale_reply),
            ProtoInfoTCP::OriginalFlags(tcp_flags(t.flags_orig)),
            ProtoInfoTCP::ReplyFlags(tcp_flags(t.flags_reply)),
        ]),
        ProtoInfo::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        } => NfProtoInfo::Other(nested_nla(
            p::SCTP,
            &[
                raw_nla(p::SCTP_STATE, vec![state]),
                raw_nla(p::SCTP_VTAG_ORIGINAL, vtag_orig.to_be_bytes().to_vec()),
                raw_nla(p::SCTP_VTAG_REPLY, vtag_reply.to_be_bytes().to_vec()),
            ],
        )),
        ProtoInfo::Dccp {
            state,
            role,
            handshake_seq,
        } => NfProtoInfo::Other(nested_nla(
            p::DCCP,
            &[
                raw_nla(p::DCCP_STATE, vec![state]),
                raw_nla(p::DCCP_ROLE, vec![role]),
                raw_nla(p::DCCP_HANDSHAKE_SEQ, handshake_seq.to_be_bytes().to_vec()),
            ],
        )),
    };
    Some(ConntrackAttribute::CtaProtoInfo(vec![inner]))
}

/// TCP flags with a full mask, so that the kernel's copy ends up exactly equal.
fn tcp_flags(flags: u8) -> TCPFlags {
    // `TCPFlags` has no public constructor; parsing its two-byte wire form is the way in.
    TCPFlags::parse(&[flags, 0xff]).unwrap_or_else(|_| unreachable!("two bytes always parse"))
}

fn helper_attr(name: &str) -> ConntrackAttribute {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    nested_raw(cta::HELP, &[raw_nla(attr::help::NAME, bytes)])
}

fn seqadj_attr(kind: u16, d: &SeqAdjDir) -> ConntrackAttribute {
    use attr::seqadj as s;
    nested_raw(
        kind,
        &[
            raw_nla(s::CORRECTION_POS, d.correction_pos.to_be_bytes().to_vec()),
            raw_nla(s::OFFSET_BEFORE, d.offset_before.to_be_bytes().to_vec()),
            raw_nla(s::OFFSET_AFTER, d.offset_after.to_be_bytes().to_vec()),
        ],
    )
}

fn raw(kind: u16, value: Vec<u8>) -> ConntrackAttribute {
    ConntrackAttribute::Other(raw_nla(kind, value))
}

fn raw_nla(kind: u16, value: Vec<u8>) -> DefaultNla {
    DefaultNla::new(kind, value)
}

fn nested_nla<T: Nla>(kind: u16, members: &[T]) -> DefaultNla {
    let len: usize = members.iter().map(Emitable::buffer_len).sum();
    let mut bytes = vec![0u8; len];
    let mut off = 0;
    for m in members {
        m.emit(&mut bytes[off..]);
        off += m.buffer_len();
    }
    DefaultNla::new(kind | NLA_F_NESTED, bytes)
}

fn nested_raw<T: Nla>(kind: u16, members: &[T]) -> ConntrackAttribute {
    ConntrackAttribute::Other(nested_nla(kind, members))
}

#[cfg(test)]
mod tests;
