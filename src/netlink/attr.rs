//! ctnetlink numbers that netlink-packet-netfilter does not export (uapi
//! `linux/netfilter/nfnetlink_conntrack.h`, `nfnetlink.h`, `netlink.h`).
//!
//! The constants mirror the uapi names one to one; their documentation is the kernel header.
#![allow(missing_docs)]

/// `NETLINK_NETFILTER` protocol number.
pub const NETLINK_NETFILTER: isize = 12;
/// `NFNL_SUBSYS_CTNETLINK`.
pub const SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_NEW` as a full netlink message type.
pub const MSG_CT_NEW: u16 = SUBSYS_CTNETLINK << 8;
/// `IPCTNL_MSG_CT_GET`.
pub const MSG_CT_GET: u16 = (SUBSYS_CTNETLINK << 8) | 1;
/// `IPCTNL_MSG_CT_DELETE`.
pub const MSG_CT_DELETE: u16 = (SUBSYS_CTNETLINK << 8) | 2;
/// `IPCTNL_MSG_CT_GET_STATS`: the namespace's entry count, as one message.
pub const MSG_CT_GET_STATS: u16 = (SUBSYS_CTNETLINK << 8) | 5;
/// `CTA_STATS_GLOBAL_ENTRIES` (big-endian u32) in a `MSG_CT_GET_STATS` answer.
pub const STATS_GLOBAL_ENTRIES: u16 = 1;

/// `NLMSG_NOOP`.
pub const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR` (also carries ACKs, with errno 0).
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLMSG_OVERRUN`.
pub const NLMSG_OVERRUN: u16 = 4;

/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_MULTI`.
pub const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_DUMP` (`ROOT | MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLM_F_EXCL`.
pub const NLM_F_EXCL: u16 = 0x200;
/// `NLM_F_CREATE`.
pub const NLM_F_CREATE: u16 = 0x400;

/// `NFNLGRP_CONNTRACK_NEW`.
pub const GROUP_NEW: u32 = 1;
/// `NFNLGRP_CONNTRACK_UPDATE`.
pub const GROUP_UPDATE: u32 = 2;
/// `NFNLGRP_CONNTRACK_DESTROY`.
pub const GROUP_DESTROY: u32 = 3;

/// Top-level `CTA_*` attributes.
pub mod cta {
    pub const TUPLE_ORIG: u16 = 1;
    pub const TUPLE_REPLY: u16 = 2;
    pub const STATUS: u16 = 3;
    pub const PROTOINFO: u16 = 4;
    pub const HELP: u16 = 5;
    pub const NAT_SRC: u16 = 6;
    pub const TIMEOUT: u16 = 7;
    pub const MARK: u16 = 8;
    pub const ID: u16 = 12;
    pub const NAT_DST: u16 = 13;
    pub const TUPLE_MASTER: u16 = 14;
    pub const SEQ_ADJ_ORIG: u16 = 15;
    pub const SEQ_ADJ_REPLY: u16 = 16;
    pub const ZONE: u16 = 18;
    pub const LABELS: u16 = 22;
    pub const SYNPROXY: u16 = 24;
}

/// `CTA_TUPLE_*`.
pub mod tuple {
    pub const IP: u16 = 1;
    pub const PROTO: u16 = 2;
    pub const ZONE: u16 = 3;
}

/// `CTA_IP_*`.
pub mod ip {
    pub const V4_SRC: u16 = 1;
    pub const V4_DST: u16 = 2;
    pub const V6_SRC: u16 = 3;
    pub const V6_DST: u16 = 4;
}

/// `CTA_PROTO_*`.
pub mod l4 {
    pub const NUM: u16 = 1;
    pub const SRC_PORT: u16 = 2;
    pub const DST_PORT: u16 = 3;
    pub const ICMP_ID: u16 = 4;
    pub const ICMP_TYPE: u16 = 5;
    pub const ICMP_CODE: u16 = 6;
    pub const ICMPV6_ID: u16 = 7;
    pub const ICMPV6_TYPE: u16 = 8;
    pub const ICMPV6_CODE: u16 = 9;
}

/// `CTA_PROTOINFO_*` and their members.
pub mod protoinfo {
    pub const TCP: u16 = 1;
    pub const DCCP: u16 = 2;
    pub const SCTP: u16 = 3;
    pub const TCP_STATE: u16 = 1;
    pub const TCP_WSCALE_ORIGINAL: u16 = 2;
    pub const TCP_WSCALE_REPLY: u16 = 3;
    pub const TCP_FLAGS_ORIGINAL: u16 = 4;
    pub const TCP_FLAGS_REPLY: u16 = 5;
    pub const DCCP_STATE: u16 = 1;
    pub const DCCP_ROLE: u16 = 2;
    pub const DCCP_HANDSHAKE_SEQ: u16 = 3;
    pub const DCCP_PAD: u16 = 4;
    pub const SCTP_STATE: u16 = 1;
    pub const SCTP_VTAG_ORIGINAL: u16 = 2;
    pub const SCTP_VTAG_REPLY: u16 = 3;
}

/// `CTA_HELP_*`.
pub mod help {
    pub const NAME: u16 = 1;
}

/// `CTA_NAT_*` and `CTA_PROTONAT_*`.
pub mod nat {
    pub const V4_MINIP: u16 = 1;
    pub const V4_MAXIP: u16 = 2;
    pub const PROTO: u16 = 3;
    pub const V6_MINIP: u16 = 4;
    pub const V6_MAXIP: u16 = 5;
    pub const PORT_MIN: u16 = 1;
    pub const PORT_MAX: u16 = 2;
}

/// `CTA_SEQADJ_*`.
pub mod seqadj {
    pub const CORRECTION_POS: u16 = 1;
    pub const OFFSET_BEFORE: u16 = 2;
    pub const OFFSET_AFTER: u16 = 3;
}

/// `CTA_SYNPROXY_*`.
pub mod synproxy {
    pub const ISN: u16 = 1;
    pub const ITS: u16 = 2;
    pub const TSOFF: u16 = 3;
}
