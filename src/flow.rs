//! The flow model: ctsync's own picture of one conntrack entry.
//!
//! It is deliberately independent of netlink types so that the caches, the sync engine and the
//! peer protocol never depend on how the kernel happens to encode things. Everything a standby
//! needs to re-create a flow faithfully is here; counters, timestamps and the kernel's entry id are
//! not, because they cannot be written back and would make every dump look like a change.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// IP protocol numbers that change how a tuple's layer-4 part is read.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// DCCP.
    pub const DCCP: u8 = 33;
    /// GRE (its keys travel in the port fields).
    pub const GRE: u8 = 47;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// UDP-Lite.
    pub const UDPLITE: u8 = 136;

    /// Whether the kernel identifies flows of this protocol by two 16-bit ports (or GRE keys).
    pub fn has_ports(p: u8) -> bool {
        matches!(p, TCP | UDP | DCCP | GRE | SCTP | UDPLITE)
    }

    /// Whether the tuple carries an ICMP id, type and code instead of ports.
    pub fn is_icmp(p: u8) -> bool {
        matches!(p, ICMP | ICMPV6)
    }
}

/// The `IPS_*` status bits of a conntrack entry.
pub mod status {
    /// Expected connection (created from an expectation).
    pub const EXPECTED: u32 = 1 << 0;
    /// Packets seen in both directions.
    pub const SEEN_REPLY: u32 = 1 << 1;
    /// Never expire early.
    pub const ASSURED: u32 = 1 << 2;
    /// Entry is in the main table.
    pub const CONFIRMED: u32 = 1 << 3;
    /// Source address is translated.
    pub const SRC_NAT: u32 = 1 << 4;
    /// Destination address is translated.
    pub const DST_NAT: u32 = 1 << 5;
    /// TCP sequence numbers need adjusting (NAT helpers).
    pub const SEQ_ADJUST: u32 = 1 << 6;
    /// Source NAT binding has been set up (possibly the identity).
    pub const SRC_NAT_DONE: u32 = 1 << 7;
    /// Destination NAT binding has been set up (possibly the identity).
    pub const DST_NAT_DONE: u32 = 1 << 8;
    /// Entry is being destroyed.
    pub const DYING: u32 = 1 << 9;
    /// Timeout is fixed.
    pub const FIXED_TIMEOUT: u32 = 1 << 10;
    /// Template entry.
    pub const TEMPLATE: u32 = 1 << 11;
    /// Untracked.
    pub const UNTRACKED: u32 = 1 << 12;
    /// A helper is attached.
    pub const HELPER: u32 = 1 << 13;
    /// Offloaded to the flow table.
    pub const OFFLOAD: u32 = 1 << 14;
    /// Offloaded to hardware.
    pub const HW_OFFLOAD: u32 = 1 << 15;

    /// Human names, in bit order, for tables and logs.
    pub const NAMES: [(u32, &str); 16] = [
        (EXPECTED, "EXPECTED"),
        (SEEN_REPLY, "SEEN_REPLY"),
        (ASSURED, "ASSURED"),
        (CONFIRMED, "CONFIRMED"),
        (SRC_NAT, "SRC_NAT"),
        (DST_NAT, "DST_NAT"),
        (SEQ_ADJUST, "SEQ_ADJUST"),
        (SRC_NAT_DONE, "SRC_NAT_DONE"),
        (DST_NAT_DONE, "DST_NAT_DONE"),
        (DYING, "DYING"),
        (FIXED_TIMEOUT, "FIXED_TIMEOUT"),
        (TEMPLATE, "TEMPLATE"),
        (UNTRACKED, "UNTRACKED"),
        (HELPER, "HELPER"),
        (OFFLOAD, "OFFLOAD"),
        (HW_OFFLOAD, "HW_OFFLOAD"),
    ];
}

/// The layer-4 part of a tuple, as the kernel keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L4 {
    /// Protocols the kernel tracks by addresses and protocol number only.
    None,
    /// TCP, UDP, UDP-Lite, SCTP, DCCP ports, or GRE keys.
    Ports {
        /// Source port (or key).
        src: u16,
        /// Destination port (or key).
        dst: u16,
    },
    /// ICMP and ICMPv6.
    Icmp {
        /// Echo identifier.
        id: u16,
        /// Message type.
        #[serde(rename = "type")]
        kind: u8,
        /// Message code.
        code: u8,
    },
}

/// One direction of a flow: addresses, protocol and layer-4 identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tuple {
    /// Source address; both addresses are of the same family.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Ports or ICMP identifiers.
    pub l4: L4,
}

impl Tuple {
    /// Whether this tuple is IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The tuple a reply to this one carries when no NAT applies.
    ///
    /// The kernel requires a reply tuple on create; handing it the plain inverse plus explicit
    /// NAT ranges makes the kernel itself set up the translation (and its status bits), which a
    /// pre-translated reply tuple would not.
    pub fn inverse(&self) -> Tuple {
        let l4 = match self.l4 {
            L4::None => L4::None,
            L4::Ports { src, dst } => L4::Ports { src: dst, dst: src },
            L4::Icmp { id, kind, code } => L4::Icmp {
                id,
                kind: icmp_inverse_type(self.proto, kind).unwrap_or(kind),
                code,
            },
        };
        Tuple {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            l4,
        }
    }
}

/// The reply type of an ICMP query type, as the kernel's `invmap` tables define it.
fn icmp_inverse_type(proto: u8, kind: u8) -> Option<u8> {
    let pairs: &[(u8, u8)] = if proto == proto::ICMP {
        &[(8, 0), (13, 14), (15, 16), (17, 18)]
    } else {
        &[(128, 129), (139, 140)]
    };
    pairs.iter().find_map(|&(a, b)| match kind {
        k if k == a => Some(b),
        k if k == b => Some(a),
        _ => None,
    })
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} src={} dst={}",
            proto_name(self.proto),
            self.src,
            self.dst
        )?;
        match self.l4 {
            L4::None => Ok(()),
            L4::Ports { src, dst } => write!(f, " sport={src} dport={dst}"),
            L4::Icmp { id, kind, code } => write!(f, " type={kind} code={code} id={id}"),
        }
    }
}

/// A short protocol name for tables.
pub fn proto_name(p: u8) -> String {
    match p {
        proto::ICMP => "icmp".into(),
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::DCCP => "dccp".into(),
        proto::GRE => "gre".into(),
        proto::ICMPV6 => "icmpv6".into(),
        proto::SCTP => "sctp".into(),
        proto::UDPLITE => "udplite".into(),
        2 => "igmp".into(),
        4 => "ipip".into(),
        41 => "ipv6".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        89 => "ospf".into(),
        103 => "pim".into(),
        112 => "vrrp".into(),
        115 => "l2tp".into(),
        other => format!("proto{other}"),
    }
}

/// Which directions a conntrack zone applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneDir {
    /// Both directions (`CTA_ZONE`).
    #[default]
    Both,
    /// The original direction only (`CTA_TUPLE_ZONE` in the original tuple).
    Original,
    /// The reply direction only (`CTA_TUPLE_ZONE` in the reply tuple).
    Reply,
}

/// A conntrack zone: entries in different zones never collide, even with equal tuples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Zone {
    /// Zone number; 0 is the default zone.
    pub id: u16,
    /// Directions the zone number applies to.
    pub dir: ZoneDir,
}

/// The identity of a flow, exactly as the kernel looks it up: zone and original tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowKey {
    /// Zone of the entry.
    pub zone: Zone,
    /// Original-direction tuple.
    pub orig: Tuple,
}

impl std::hash::Hash for FlowKey {
    /// A few wide writes instead of the derived field-by-field walk: keys are hashed for every
    /// event, every replicated flow and every growth of a table, and this is measurably faster.
    /// Equal keys write equal words, as `Eq` requires.
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let t = &self.orig;
        let (tag, l4) = match t.l4 {
            L4::None => (0u64, 0u64),
            L4::Ports { src, dst } => (1, u64::from(src) << 16 | u64::from(dst)),
            L4::Icmp { id, kind, code } => (
                2,
                u64::from(id) << 16 | u64::from(kind) << 8 | u64::from(code),
            ),
        };
        let head = u64::from(self.zone.id) << 48
            | (self.zone.dir as u64) << 44
            | tag << 40
            | u64::from(t.proto) << 32
            | l4;
        match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                h.write_u64(head);
                h.write_u64(u64::from(u32::from(s)) << 32 | u64::from(u32::from(d)));
            }
            (s, d) => {
                h.write_u64(head | 1 << 63);
                h.write_u128(addr_bits(s));
                h.write_u128(addr_bits(d));
            }
        }
    }
}

/// An address as 128 bits (IPv4 in the low 32, as no IPv6 tuple mixes with it).
fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// TCP tracking state and per-direction window scale and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TcpInfo {
    /// `TCP_CONNTRACK_*` state number.
    pub state: u8,
    /// Window scale seen from the original side.
    pub wscale_orig: u8,
    /// Window scale seen from the reply side.
    pub wscale_reply: u8,
    /// `IP_CT_TCP_FLAG_*` of the original direction.
    pub flags_orig: u8,
    /// `IP_CT_TCP_FLAG_*` of the reply direction.
    pub flags_reply: u8,
}

/// `IP_CT_TCP_FLAG_*` bits the kernel's window tracking flips on ordinary packets without raising
/// an event: data unacknowledged (0x10), max-ack set (0x20) and challenge-ack expected (0x40).
/// A mirror fed by events holds them as of the last event, so they differ from a fresh dump of
/// any connection that carried traffic since; they are still replicated whenever an event or a
/// dump carries them.
pub const TCP_FLAGS_CHANGED_SILENTLY: u8 = 0x10 | 0x20 | 0x40;

/// Names of the kernel's TCP conntrack states, indexed by state number.
pub const TCP_STATE_NAMES: [&str; 10] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];

/// Protocol-specific tracking state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtoInfo {
    /// No protocol state (UDP, ICMP, GRE, …).
    #[default]
    None,
    /// TCP state machine.
    Tcp(TcpInfo),
    /// SCTP state and verification tags.
    Sctp {
        /// `SCTP_CONNTRACK_*` state.
        state: u8,
        /// Verification tag of the original direction.
        vtag_orig: u32,
        /// Verification tag of the reply direction.
        vtag_reply: u32,
    },
    /// DCCP state.
    Dccp {
        /// `CT_DCCP_*` state.
        state: u8,
        /// Role of the original side.
        role: u8,
        /// Handshake sequence number.
        handshake_seq: u64,
    },
}

impl ProtoInfo {
    /// A short state name for tables.
    pub fn state_name(&self) -> String {
        match self {
            ProtoInfo::None => String::new(),
            ProtoInfo::Tcp(t) => TCP_STATE_NAMES
                .get(usize::from(t.state))
                .map_or_else(|| format!("TCP{}", t.state), |s| (*s).to_string()),
            ProtoInfo::Sctp { state, .. } => format!("SCTP{state}"),
            ProtoInfo::Dccp { state, .. } => format!("DCCP{state}"),
        }
    }
}

/// TCP sequence adjustment of one direction (set by NAT helpers such as FTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SeqAdjDir {
    /// Sequence number at which the correction starts.
    pub correction_pos: u32,
    /// Offset before that position.
    pub offset_before: u32,
    /// Offset after that position.
    pub offset_after: u32,
}

/// Sequence adjustment of both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SeqAdj {
    /// Original direction.
    pub orig: SeqAdjDir,
    /// Reply direction.
    pub reply: SeqAdjDir,
}

/// SYN proxy state: without it a proxied connection cannot be translated after failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Synproxy {
    /// Initial sequence number offset.
    pub isn: u32,
    /// Initial timestamp.
    pub its: u32,
    /// Timestamp offset.
    pub tsoff: u32,
}

/// One conntrack entry.
///
/// Memory per mirrored flow is one of the figures operators compare, and a flow is held several
/// times over (internal and external caches, commit lists, batches), so the struct is kept at
/// 120 bytes: the attributes real tables rarely carry (labels, helper, master, sequence
/// adjustment, SYN proxy) share one optional box, and the protocol state is stored in a 4-byte
/// aligned form (see [`Flow::protoinfo`]). Both are reached through accessors; the JSON form is
/// unchanged (every attribute at top level).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "FlowRepr")]
pub struct Flow {
    /// Identity: zone and original tuple.
    pub key: FlowKey,
    /// Reply tuple; differs from the inverse of the original when NAT applies.
    pub reply: Tuple,
    /// `IPS_*` bits.
    pub status: u32,
    /// Seconds until the entry expires.
    pub timeout: u32,
    /// Connection mark.
    pub mark: u32,
    /// Protocol state; a `ProtoInfo` would be 8-byte aligned for DCCP's 64-bit sequence number.
    protoinfo: PackedProtoInfo,
    /// The rare attributes. `None` exactly when they are all neutral, so that the derived
    /// equality stays structural.
    extra: Option<Box<FlowExtra>>,
}

/// The attributes few flows carry, boxed together so that a flow without any costs one pointer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct FlowExtra {
    labels: u128,
    helper: Option<Box<str>>,
    master: Option<Tuple>,
    seq_adj: Option<SeqAdj>,
    synproxy: Option<Synproxy>,
}

impl FlowExtra {
    /// Whether every attribute has the value of [`Flow::new`] (then the box is not kept).
    fn is_neutral(&self) -> bool {
        self.labels == 0
            && self.helper.is_none()
            && self.master.is_none()
            && self.seq_adj.is_none()
            && self.synproxy.is_none()
    }
}

/// [`ProtoInfo`] with DCCP's sequence number as two words: 12 bytes, 4-byte aligned, instead of
/// 16 bytes, 8-byte aligned. Converts both ways without loss, so equality is unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum PackedProtoInfo {
    #[default]
    None,
    Tcp(TcpInfo),
    Sctp {
        state: u8,
        vtag_orig: u32,
        vtag_reply: u32,
    },
    Dccp {
        state: u8,
        role: u8,
        /// High and low halves of the handshake sequence number.
        handshake_seq: [u32; 2],
    },
}

impl PackedProtoInfo {
    fn without_silent_bits(self) -> Self {
        match self {
            PackedProtoInfo::Tcp(t) => PackedProtoInfo::Tcp(TcpInfo {
                flags_orig: t.flags_orig & !TCP_FLAGS_CHANGED_SILENTLY,
                flags_reply: t.flags_reply & !TCP_FLAGS_CHANGED_SILENTLY,
                ..t
            }),
            other => other,
        }
    }
}

impl From<ProtoInfo> for PackedProtoInfo {
    fn from(p: ProtoInfo) -> Self {
        match p {
            ProtoInfo::None => PackedProtoInfo::None,
            ProtoInfo::Tcp(t) => PackedProtoInfo::Tcp(t),
            ProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply,
            } => PackedProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply,
            },
            ProtoInfo::Dccp {
                state,
                role,
                handshake_seq,
            } => PackedProtoInfo::Dccp {
                state,
                role,
                handshake_seq: [(handshake_seq >> 32) as u32, handshake_seq as u32],
            },
        }
    }
}

impl From<PackedProtoInfo> for ProtoInfo {
    fn from(p: PackedProtoInfo) -> Self {
        match p {
            PackedProtoInfo::None => ProtoInfo::None,
            PackedProtoInfo::Tcp(t) => ProtoInfo::Tcp(t),
            PackedProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply,
            } => ProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply,
            },
            PackedProtoInfo::Dccp {
                state,
                role,
                handshake_seq: [hi, lo],
            } => ProtoInfo::Dccp {
                state,
                role,
                handshake_seq: u64::from(hi) << 32 | u64::from(lo),
            },
        }
    }
}

impl Flow {
    /// A flow with the given tuples and every other attribute at its neutral value.
    pub fn new(zone: Zone, orig: Tuple, reply: Tuple) -> Flow {
        Flow {
            key: FlowKey { zone, orig },
            reply,
            status: 0,
            timeout: 0,
            mark: 0,
            protoinfo: PackedProtoInfo::None,
            extra: None,
        }
    }

    /// Protocol state.
    pub fn protoinfo(&self) -> ProtoInfo {
        self.protoinfo.into()
    }

    /// Sets the protocol state.
    pub fn set_protoinfo(&mut self, info: ProtoInfo) {
        self.protoinfo = info.into();
    }

    /// Connection labels, bit *n* being label *n*.
    pub fn labels(&self) -> u128 {
        self.extra.as_ref().map_or(0, |e| e.labels)
    }

    /// Sets the connection labels.
    pub fn set_labels(&mut self, labels: u128) {
        self.edit_extra(labels == 0, |e| e.labels = labels);
    }

    /// Name of the attached helper, if any.
    pub fn helper(&self) -> Option<&str> {
        self.extra.as_ref()?.helper.as_deref()
    }

    /// Sets the helper name.
    pub fn set_helper(&mut self, helper: Option<Box<str>>) {
        self.edit_extra(helper.is_none(), |e| e.helper = helper);
    }

    /// Original tuple of the master connection, for related flows.
    pub fn master(&self) -> Option<&Tuple> {
        self.extra.as_ref()?.master.as_ref()
    }

    /// Sets the master tuple.
    pub fn set_master(&mut self, master: Option<Tuple>) {
        self.edit_extra(master.is_none(), |e| e.master = master);
    }

    /// TCP sequence adjustment, if any.
    pub fn seq_adj(&self) -> Option<&SeqAdj> {
        self.extra.as_ref()?.seq_adj.as_ref()
    }

    /// Sets the TCP sequence adjustment.
    pub fn set_seq_adj(&mut self, seq_adj: Option<SeqAdj>) {
        self.edit_extra(seq_adj.is_none(), |e| e.seq_adj = seq_adj);
    }

    /// SYN proxy state, if any.
    pub fn synproxy(&self) -> Option<&Synproxy> {
        self.extra.as_ref()?.synproxy.as_ref()
    }

    /// Sets the SYN proxy state.
    pub fn set_synproxy(&mut self, synproxy: Option<Synproxy>) {
        self.edit_extra(synproxy.is_none(), |e| e.synproxy = synproxy);
    }

    /// Heap bytes this flow owns through its rare attributes.
    pub fn heap_bytes(&self) -> usize {
        self.extra.as_ref().map_or(0, |e| {
            std::mem::size_of::<FlowExtra>() + e.helper.as_ref().map_or(0, |h| h.len())
        })
    }

    /// Applies `edit` to the rare attributes, keeping `extra` `None` exactly when they are all
    /// neutral. `neutral` says whether the value being set is neutral: setting one on a flow
    /// without rare attributes then allocates nothing.
    fn edit_extra(&mut self, neutral: bool, edit: impl FnOnce(&mut FlowExtra)) {
        match &mut self.extra {
            None if neutral => {}
            None => {
                let mut e = Box::<FlowExtra>::default();
                edit(&mut e);
                self.extra = Some(e);
            }
            Some(e) => {
                edit(e);
                if e.is_neutral() {
                    self.extra = None;
                }
            }
        }
    }

    /// Whether the kernel translates the source of this flow.
    pub fn is_snat(&self) -> bool {
        self.status & status::SRC_NAT != 0
    }

    /// Whether the kernel translates the destination of this flow.
    pub fn is_dnat(&self) -> bool {
        self.status & status::DST_NAT != 0
    }

    /// Copies into `self` the attributes that `present` says `update` carries.
    ///
    /// Kernel UPDATE events only carry what changed (protocol state, mark, labels…), so an event
    /// must be merged into the mirrored flow rather than replace it.
    pub fn merge(&mut self, update: &Flow, present: Present) {
        self.reply = update.reply;
        if present.has(Present::STATUS) {
            self.status = update.status;
        }
        if present.has(Present::TIMEOUT) {
            self.timeout = update.timeout;
        }
        if present.has(Present::MARK) {
            self.mark = update.mark;
        }
        if present.has(Present::PROTOINFO) {
            self.protoinfo = update.protoinfo;
        }
        const RARE: u16 = Present::LABELS
            | Present::HELPER
            | Present::MASTER
            | Present::SEQ_ADJ
            | Present::SYNPROXY;
        if present.0 & RARE == RARE {
            // Every rare attribute is replaced (full dump entries): take the box as it is.
            self.extra.clone_from(&update.extra);
            return;
        }
        if present.has(Present::LABELS) {
            self.set_labels(update.labels());
        }
        if present.has(Present::HELPER) {
            self.set_helper(update.helper().map(Box::from));
        }
        if present.has(Present::MASTER) {
            self.set_master(update.master().copied());
        }
        if present.has(Present::SEQ_ADJ) {
            self.set_seq_adj(update.seq_adj().copied());
        }
        if present.has(Present::SYNPROXY) {
            self.set_synproxy(update.synproxy().copied());
        }
    }

    /// Equality of everything but what the kernel changes without telling its listeners: the
    /// timeout, which ticks between any two reads, and the TCP flag bits in
    /// [`TCP_FLAGS_CHANGED_SILENTLY`]. Comparing those would make every reconciliation "repair"
    /// any TCP connection that carried traffic since its last event.
    pub fn same_state(&self, other: &Flow) -> bool {
        // Destructured so that a field added to `Flow` must be placed here, or not compile.
        let Flow {
            key,
            reply,
            status,
            timeout: _,
            mark,
            protoinfo,
            extra,
        } = self;
        *key == other.key
            && *reply == other.reply
            && *status == other.status
            && *mark == other.mark
            && protoinfo.without_silent_bits() == other.protoinfo.without_silent_bits()
            && *extra == other.extra
    }
}

/// The same fields, in the same order, as before the rare attributes were boxed together.
impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("key", &self.key)
            .field("reply", &self.reply)
            .field("status", &self.status)
            .field("timeout", &self.timeout)
            .field("mark", &self.mark)
            .field("labels", &self.labels())
            .field("protoinfo", &self.protoinfo())
            .field("helper", &self.helper())
            .field("master", &self.master())
            .field("seq_adj", &self.seq_adj())
            .field("synproxy", &self.synproxy())
            .finish()
    }
}

/// The JSON shape of a flow (control socket, `syncctl dump`): every attribute at top level.
#[derive(Serialize)]
struct FlowRef<'a> {
    key: &'a FlowKey,
    reply: &'a Tuple,
    status: u32,
    timeout: u32,
    mark: u32,
    #[serde(with = "labels_hex")]
    labels: u128,
    protoinfo: ProtoInfo,
    helper: Option<&'a str>,
    master: Option<&'a Tuple>,
    seq_adj: Option<&'a SeqAdj>,
    synproxy: Option<&'a Synproxy>,
}

/// The owned counterpart of [`FlowRef`], for deserializing.
#[derive(Deserialize)]
struct FlowRepr {
    key: FlowKey,
    reply: Tuple,
    status: u32,
    timeout: u32,
    mark: u32,
    #[serde(with = "labels_hex")]
    labels: u128,
    protoinfo: ProtoInfo,
    helper: Option<Box<str>>,
    master: Option<Tuple>,
    seq_adj: Option<SeqAdj>,
    synproxy: Option<Synproxy>,
}

impl Serialize for Flow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        FlowRef {
            key: &self.key,
            reply: &self.reply,
            status: self.status,
            timeout: self.timeout,
            mark: self.mark,
            labels: self.labels(),
            protoinfo: self.protoinfo(),
            helper: self.helper(),
            master: self.master(),
            seq_adj: self.seq_adj(),
            synproxy: self.synproxy(),
        }
        .serialize(s)
    }
}

impl From<FlowRepr> for Flow {
    fn from(r: FlowRepr) -> Flow {
        let mut f = Flow::new(r.key.zone, r.key.orig, r.reply);
        f.status = r.status;
        f.timeout = r.timeout;
        f.mark = r.mark;
        f.set_protoinfo(r.protoinfo);
        f.set_labels(r.labels);
        f.set_helper(r.helper);
        f.set_master(r.master);
        f.set_seq_adj(r.seq_adj);
        f.set_synproxy(r.synproxy);
        f
    }
}

/// Which optional attributes a decoded message carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Present(u16);

impl Present {
    /// `CTA_STATUS`.
    pub const STATUS: u16 = 1 << 0;
    /// `CTA_TIMEOUT`.
    pub const TIMEOUT: u16 = 1 << 1;
    /// `CTA_MARK`.
    pub const MARK: u16 = 1 << 2;
    /// `CTA_LABELS`.
    pub const LABELS: u16 = 1 << 3;
    /// `CTA_PROTOINFO`.
    pub const PROTOINFO: u16 = 1 << 4;
    /// `CTA_HELP`.
    pub const HELPER: u16 = 1 << 5;
    /// `CTA_TUPLE_MASTER`.
    pub const MASTER: u16 = 1 << 6;
    /// `CTA_SEQ_ADJ_*`.
    pub const SEQ_ADJ: u16 = 1 << 7;
    /// `CTA_SYNPROXY`.
    pub const SYNPROXY: u16 = 1 << 8;
    /// Every attribute: what a full dump entry means (absent there is absent in the kernel).
    pub const ALL: Present = Present(0x1ff);

    /// Adds a bit.
    pub fn set(&mut self, bit: u16) {
        self.0 |= bit;
    }

    /// Tests a bit.
    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
}

/// Labels as a 32-digit hex string in JSON: readable, and exact (JSON numbers are not 128-bit).
mod labels_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:032x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

/// A UDP key from 10.0.0.1:`port` to 10.0.0.2:53: the key the table tests share.
#[cfg(test)]
pub(crate) fn test_key(port: u16) -> FlowKey {
    FlowKey {
        zone: Zone::default(),
        orig: Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::UDP,
            l4: L4::Ports { src: port, dst: 53 },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: proto::TCP,
            l4: L4::Ports {
                src: sport,
                dst: dport,
            },
        }
    }

    #[test]
    fn same_state_ignores_only_what_the_kernel_changes_silently() {
        let tcp_flow = |state, flags| {
            let mut f = Flow::new(
                Zone::default(),
                tcp("10.0.0.1", "10.0.0.2", 1000, 80),
                tcp("10.0.0.2", "10.0.0.1", 80, 1000),
            );
            f.set_protoinfo(ProtoInfo::Tcp(TcpInfo {
                state,
                flags_orig: flags,
                flags_reply: flags,
                ..TcpInfo::default()
            }));
            f
        };
        let base = tcp_flow(3, 0x01);
        let mut ticked = tcp_flow(3, 0x01 | TCP_FLAGS_CHANGED_SILENTLY);
        ticked.timeout = 7;
        assert!(base.same_state(&ticked) && ticked.same_state(&base));
        // Bits and fields that do come with events still count.
        assert!(!base.same_state(&tcp_flow(3, 0x01 | 0x04)));
        assert!(!base.same_state(&tcp_flow(4, 0x01)));
        let mut marked = base.clone();
        marked.mark = 1;
        assert!(!base.same_state(&marked));
        let mut labelled = base.clone();
        labelled.set_labels(1);
        assert!(!base.same_state(&labelled));
    }

    #[test]
    fn inverse_swaps_addresses_and_ports() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1000, 80);
        assert_eq!(t.inverse(), tcp("10.0.0.2", "10.0.0.1", 80, 1000));
        assert_eq!(t.inverse().inverse(), t);
    }

    #[test]
    fn inverse_maps_icmp_queries_to_replies() {
        let echo = Tuple {
            src: "::1".parse().unwrap(),
            dst: "::2".parse().unwrap(),
            proto: proto::ICMPV6,
            l4: L4::Icmp {
                id: 7,
                kind: 128,
                code: 0,
            },
        };
        assert_eq!(
            echo.inverse().l4,
            L4::Icmp {
                id: 7,
                kind: 129,
                code: 0
            }
        );
    }

    #[test]
    fn merge_only_touches_present_attributes() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1000, 80);
        let mut base = Flow::new(Zone::default(), t, t.inverse());
        base.mark = 7;
        base.set_protoinfo(ProtoInfo::Tcp(TcpInfo {
            state: 3,
            ..TcpInfo::default()
        }));
        base.set_helper(Some("ftp".into()));
        let mut upd = base.clone();
        upd.mark = 0;
        upd.set_protoinfo(ProtoInfo::None);
        upd.status = status::ASSURED;
        upd.set_helper(None);
        upd.set_labels(3);
        let mut present = Present::default();
        present.set(Present::STATUS);
        present.set(Present::LABELS);
        base.merge(&upd, present);
        assert_eq!(base.mark, 7);
        assert_eq!(base.status, status::ASSURED);
        assert!(matches!(base.protoinfo(), ProtoInfo::Tcp(_)));
        assert_eq!(base.helper(), Some("ftp"));
        assert_eq!(base.labels(), 3);
    }

    #[test]
    fn merge_of_cleared_rare_attributes_equals_a_plain_flow() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1000, 80);
        let plain = Flow::new(Zone::default(), t, t.inverse());
        let mut f = plain.clone();
        f.set_labels(1);
        f.set_helper(Some("ftp".into()));
        f.set_master(Some(t));
        let mut present = Present::default();
        present.set(Present::LABELS);
        present.set(Present::HELPER);
        present.set(Present::MASTER);
        f.merge(&plain, present);
        assert_eq!(f, plain);
        assert_eq!(f.heap_bytes(), 0);
        let mut g = plain.clone();
        g.set_synproxy(Some(Synproxy::default()));
        g.merge(&plain, Present::ALL);
        assert_eq!(g, plain);
    }

    #[test]
    fn neutral_setters_leave_no_box() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1000, 80);
        let plain = Flow::new(Zone::default(), t, t.inverse());
        let mut f = plain.clone();
        f.set_labels(0);
        f.set_helper(None);
        assert_eq!(f.heap_bytes(), 0);
        f.set_seq_adj(Some(SeqAdj::default()));
        f.set_labels(9);
        assert_ne!(
            f, plain,
            "an all-zero sequence adjustment is still an attribute"
        );
        f.set_seq_adj(None);
        f.set_labels(0);
        assert_eq!(f, plain);
        assert_eq!(f.heap_bytes(), 0);
    }

    #[test]
    fn dccp_protoinfo_round_trips() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1000, 80);
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        let info = ProtoInfo::Dccp {
            state: 4,
            role: 1,
            handshake_seq: 0x0123_4567_89ab_cdef,
        };
        f.set_protoinfo(info);
        assert_eq!(f.protoinfo(), info);
    }

    /// A flow is held about three times per connection (caches, commit lists, batches): its
    /// size is most of ctsync's memory per flow, which must stay at half of conntrackd's. Rare
    /// attributes share one box and the protocol state is kept 4-byte aligned to get here.
    #[test]
    fn flow_fits_in_120_bytes() {
        assert!(
            std::mem::size_of::<Flow>() <= 120,
            "{}",
            std::mem::size_of::<Flow>()
        );
    }

    #[test]
    fn json_keeps_rare_attributes_at_top_level() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1, 2);
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["labels"], "00000000000000000000000000000000");
        for k in ["helper", "master", "seq_adj", "synproxy"] {
            assert!(v[k].is_null(), "{k}");
        }
        f.set_helper(Some("ftp".into()));
        f.set_master(Some(t));
        f.set_seq_adj(Some(SeqAdj::default()));
        f.set_synproxy(Some(Synproxy {
            isn: 1,
            its: 2,
            tsoff: 3,
        }));
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["helper"], "ftp");
        assert_eq!(v["master"], serde_json::to_value(t).unwrap());
        assert_eq!(v["seq_adj"]["orig"]["offset_after"], 0);
        assert_eq!(v["synproxy"]["tsoff"], 3);
        let back: Flow = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn labels_serialize_exactly() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1, 2);
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        f.set_labels(u128::MAX - 5);
        let json = serde_json::to_string(&f).unwrap();
        let back: Flow = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f);
    }

    /// JSON and `Debug` as they were before the rare attributes were boxed together: the
    /// control socket, `syncctl dump` and test diffs rely on them.
    #[test]
    fn json_and_debug_are_unchanged_by_the_compact_layout() {
        let t = tcp("10.0.0.1", "2001:db8::2", 1, 2);
        let zone = Zone {
            id: 3,
            dir: ZoneDir::Reply,
        };
        let mut f = Flow::new(zone, t, t.inverse());
        f.status = 0x18e;
        f.timeout = 119;
        f.mark = 7;
        f.set_labels(1 << 127 | 5);
        f.set_protoinfo(ProtoInfo::Dccp {
            state: 4,
            role: 1,
            handshake_seq: u64::MAX - 1,
        });
        f.set_helper(Some("ftp".into()));
        f.set_master(Some(t.inverse()));
        f.set_seq_adj(Some(SeqAdj {
            orig: SeqAdjDir {
                correction_pos: 1,
                offset_before: 2,
                offset_after: 3,
            },
            reply: SeqAdjDir::default(),
        }));
        f.set_synproxy(Some(Synproxy {
            isn: 1,
            its: 2,
            tsoff: 3,
        }));
        let full = r#"{"key":{"zone":{"id":3,"dir":"reply"},"orig":{"src":"10.0.0.1","dst":"2001:db8::2","proto":6,"l4":{"ports":{"src":1,"dst":2}}}},"reply":{"src":"2001:db8::2","dst":"10.0.0.1","proto":6,"l4":{"ports":{"src":2,"dst":1}}},"status":398,"timeout":119,"mark":7,"labels":"80000000000000000000000000000005","protoinfo":{"dccp":{"state":4,"role":1,"handshake_seq":18446744073709551614}},"helper":"ftp","master":{"src":"2001:db8::2","dst":"10.0.0.1","proto":6,"l4":{"ports":{"src":2,"dst":1}}},"seq_adj":{"orig":{"correction_pos":1,"offset_before":2,"offset_after":3},"reply":{"correction_pos":0,"offset_before":0,"offset_after":0}},"synproxy":{"isn":1,"its":2,"tsoff":3}}"#;
        assert_eq!(serde_json::to_string(&f).unwrap(), full);
        assert_eq!(serde_json::from_str::<Flow>(full).unwrap(), f);
        assert_eq!(
            format!("{f:?}"),
            r#"Flow { key: FlowKey { zone: Zone { id: 3, dir: Reply }, orig: Tuple { src: 10.0.0.1, dst: 2001:db8::2, proto: 6, l4: Ports { src: 1, dst: 2 } } }, reply: Tuple { src: 2001:db8::2, dst: 10.0.0.1, proto: 6, l4: Ports { src: 2, dst: 1 } }, status: 398, timeout: 119, mark: 7, labels: 170141183460469231731687303715884105733, protoinfo: Dccp { state: 4, role: 1, handshake_seq: 18446744073709551614 }, helper: Some("ftp"), master: Some(Tuple { src: 2001:db8::2, dst: 10.0.0.1, proto: 6, l4: Ports { src: 2, dst: 1 } }), seq_adj: Some(SeqAdj { orig: SeqAdjDir { correction_pos: 1, offset_before: 2, offset_after: 3 }, reply: SeqAdjDir { correction_pos: 0, offset_before: 0, offset_after: 0 } }), synproxy: Some(Synproxy { isn: 1, its: 2, tsoff: 3 }) }"#
        );
        let plain = Flow::new(Zone::default(), t, t.inverse());
        let bare = r#"{"key":{"zone":{"id":0,"dir":"both"},"orig":{"src":"10.0.0.1","dst":"2001:db8::2","proto":6,"l4":{"ports":{"src":1,"dst":2}}}},"reply":{"src":"2001:db8::2","dst":"10.0.0.1","proto":6,"l4":{"ports":{"src":2,"dst":1}}},"status":0,"timeout":0,"mark":0,"labels":"00000000000000000000000000000000","protoinfo":"none","helper":null,"master":null,"seq_adj":null,"synproxy":null}"#;
        assert_eq!(serde_json::to_string(&plain).unwrap(), bare);
        let back: Flow = serde_json::from_str(bare).unwrap();
        assert_eq!(back, plain);
        assert_eq!(back.heap_bytes(), 0);
    }
}
