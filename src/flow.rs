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
/// Rare attributes live behind `Option<Box<…>>` so that the common flow stays small: memory per
/// mirrored flow is one of the figures operators compare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Connection labels, bit *n* being label *n*.
    #[serde(with = "labels_hex")]
    pub labels: u128,
    /// Protocol state.
    pub protoinfo: ProtoInfo,
    /// Name of the attached helper, if any.
    pub helper: Option<Box<str>>,
    /// Original tuple of the master connection, for related flows.
    pub master: Option<Box<Tuple>>,
    /// TCP sequence adjustment, if any.
    pub seq_adj: Option<Box<SeqAdj>>,
    /// SYN proxy state, if any.
    pub synproxy: Option<Box<Synproxy>>,
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
            labels: 0,
            protoinfo: ProtoInfo::None,
            helper: None,
            master: None,
            seq_adj: None,
            synproxy: None,
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
        if present.has(Present::LABELS) {
            self.labels = update.labels;
        }
        if present.has(Present::PROTOINFO) {
            self.protoinfo = update.protoinfo;
        }
        if present.has(Present::HELPER) {
            self.helper.clone_from(&update.helper);
        }
        if present.has(Present::MASTER) {
            self.master.clone_from(&update.master);
        }
        if present.has(Present::SEQ_ADJ) {
            self.seq_adj.clone_from(&update.seq_adj);
        }
        if present.has(Present::SYNPROXY) {
            self.synproxy.clone_from(&update.synproxy);
        }
    }

    /// Equality of everything but the timeout, which ticks between any two reads of the kernel.
    pub fn same_state(&self, other: &Flow) -> bool {
        let mut a = self.clone();
        a.timeout = other.timeout;
        a == *other
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
        base.protoinfo = ProtoInfo::Tcp(TcpInfo {
            state: 3,
            ..TcpInfo::default()
        });
        let mut upd = base.clone();
        upd.mark = 0;
        upd.protoinfo = ProtoInfo::None;
        upd.status = status::ASSURED;
        let mut present = Present::default();
        present.set(Present::STATUS);
        base.merge(&upd, present);
        assert_eq!(base.mark, 7);
        assert_eq!(base.status, status::ASSURED);
        assert!(matches!(base.protoinfo, ProtoInfo::Tcp(_)));
    }

    #[test]
    fn labels_serialize_exactly() {
        let t = tcp("10.0.0.1", "10.0.0.2", 1, 2);
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        f.labels = u128::MAX - 5;
        let json = serde_json::to_string(&f).unwrap();
        let back: Flow = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f);
    }
}
