//! The encoder ctsync used before the in-place one, kept verbatim as the reference the new
//! encoder must match byte for byte.
//!
//! It builds netlink-packet-netfilter attribute trees, with what that crate does not model as
//! raw `DefaultNla`s, and then restores the `NLA_F_NESTED` flags that the crate drops. Being a
//! separate implementation on top of a third-party serializer is what makes it a useful oracle:
//! attribute order, flags, padding and lengths come out of different code.

use crate::flow::{proto, status, Flow, FlowKey, ProtoInfo, SeqAdjDir, Tuple, ZoneDir, L4};
use crate::netlink::attr::{self, cta};
use crate::netlink::codec::{CtEventKind, WriteOp};
use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NLA_F_NESTED,
    NLA_TYPE_MASK,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo as NfProtoInfo, ProtoInfoTCP,
    ProtoTuple, Protocol, Status, TCPFlags, Tuple as NfTuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use std::net::IpAddr;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn encode_labels(labels: u128) -> Vec<u8> {
    (0..4)
        .flat_map(|i| ((labels >> (32 * i)) as u32).to_ne_bytes())
        .collect()
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
    if let Some(master) = flow.master() {
        attrs.push(nested_raw(cta::TUPLE_MASTER, &tuple_nlas(master, None)));
    }
    if let Some(helper) = flow.helper() {
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
    if let Some(master) = flow.master() {
        attrs.push(nested_raw(cta::TUPLE_MASTER, &tuple_nlas(master, None)));
    }
    if let Some(helper) = flow.helper() {
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
    if labels && flow.labels() == 0 {
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
    if flow.labels() != 0 {
        attrs.push(raw(cta::LABELS, encode_labels(flow.labels())));
    }
    if let Some(p) = protoinfo_attr(&flow.protoinfo()) {
        attrs.push(p);
    }
    if let Some(adj) = flow.seq_adj() {
        attrs.push(seqadj_attr(cta::SEQ_ADJ_ORIG, &adj.orig));
        attrs.push(seqadj_attr(cta::SEQ_ADJ_REPLY, &adj.reply));
    }
    if let Some(sp) = flow.synproxy() {
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
