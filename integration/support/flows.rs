//! Deterministic sets of flows of mixed kinds, all distinct in both directions.
//!
//! Flow `i` is of kind `i % KINDS`, and `j = i / KINDS` numbers it within its kind. Each kind has
//! its own address block, and `j` goes into the low 16 bits of the source address (and for
//! translated flows into the translated address or port), so original and reply tuples never
//! collide across the whole set: the kernel refuses an entry whose reply tuple is already taken.

use ctsync::flow::{proto, status, Flow, ProtoInfo, TcpInfo, Tuple, Zone, ZoneDir, L4};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Number of kinds cycled through.
pub const KINDS: usize = 13;

/// `n` flows of mixed kinds: TCP v4/v6 with TCP state, UDP, ICMP, SNAT, DNAT (v4 and v6), zones
/// in both directions and in the original direction only, marks and labels.
///
/// Labels need label support in the namespace ([`super::netns::Netns::enable_labels`]).
pub fn mixed(n: usize) -> Vec<Flow> {
    assert!(n / KINDS < 1 << 16, "at most {} flows", KINDS << 16);
    (0..n).map(mixed_one).collect()
}

fn v4(a: u8, b: u8, j: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, (j >> 8) as u8, j as u8))
}

fn v6(block: u16, j: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, block, 0, 0, 0, 0, 0, j as u16))
}

fn ports(proto: u8, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Tuple {
    Tuple {
        src,
        dst,
        proto,
        l4: L4::Ports {
            src: sport,
            dst: dport,
        },
    }
}

/// TCP state of a generated flow: every state the `conntrack` CLI names (1..=8), window scaling
/// on both sides (the kernel keeps the scale factors only then) for most, none for some.
fn tcp_info(j: usize) -> ProtoInfo {
    let state = 1 + (j % 8) as u8;
    let scaled = j % 4 != 3;
    ProtoInfo::Tcp(TcpInfo {
        state,
        wscale_orig: if scaled { 7 } else { 0 },
        wscale_reply: if scaled { (j % 15) as u8 } else { 0 },
        // WINDOW_SCALE | SACK_PERM, plus MAXACK_SET on some.
        flags_orig: if scaled { 0x03 } else { 0x02 },
        flags_reply: if scaled {
            0x01 | ((j % 2) as u8 * 0x20)
        } else {
            0
        },
    })
}

/// Status bits a tracked TCP flow in `info`'s state plausibly has.
fn tcp_status(info: &ProtoInfo) -> u32 {
    match info {
        ProtoInfo::Tcp(t) if t.state == 1 => 0,
        _ => status::SEEN_REPLY | status::ASSURED,
    }
}

fn mixed_one(i: usize) -> Flow {
    let k = i % KINDS;
    let j = i / KINDS;
    let sport = 1024 + (j % 60000) as u16;
    let server4 = IpAddr::V4(Ipv4Addr::new(198, 18, k as u8, 1));
    let server6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, k as u16));
    let mut zone = Zone::default();
    let (orig, reply, st, info);
    match k {
        0 | 9 | 11 => {
            orig = ports(proto::TCP, v4(10, k as u8, j), server4, sport, 443);
            reply = orig.inverse();
            info = tcp_info(j);
            st = tcp_status(&info);
            if k == 9 {
                zone = Zone {
                    id: 200 + (j % 10) as u16,
                    dir: ZoneDir::Original,
                };
            }
        }
        1 => {
            orig = ports(proto::TCP, v6(1, j), server6, sport, 22);
            reply = orig.inverse();
            info = tcp_info(j + 3);
            st = tcp_status(&info);
        }
        2 | 8 => {
            orig = ports(proto::UDP, v4(10, k as u8, j), server4, sport, 53);
            reply = orig.inverse();
            info = ProtoInfo::None;
            st = if j % 2 == 0 { status::SEEN_REPLY } else { 0 };
            if k == 8 {
                zone = Zone {
                    id: 1 + (j % 100) as u16,
                    dir: ZoneDir::Both,
                };
            }
        }
        3 | 10 => {
            orig = ports(proto::UDP, v6(k as u16, j), server6, sport, 123);
            reply = orig.inverse();
            info = ProtoInfo::None;
            st = status::SEEN_REPLY;
        }
        4 => {
            orig = Tuple {
                src: v4(10, 4, j),
                dst: server4,
                proto: proto::ICMP,
                l4: L4::Icmp {
                    id: j as u16,
                    kind: 8,
                    code: 0,
                },
            };
            reply = orig.inverse();
            info = ProtoInfo::None;
            st = status::SEEN_REPLY;
        }
        5 => {
            orig = Tuple {
                src: v6(5, j),
                dst: server6,
                proto: proto::ICMPV6,
                l4: L4::Icmp {
                    id: j as u16,
                    kind: 128,
                    code: 0,
                },
            };
            reply = orig.inverse();
            info = ProtoInfo::None;
            st = 0;
        }
        6 => {
            // SNAT: replies go to the translated source 203.0.113.x:port.
            orig = ports(proto::TCP, v4(10, 6, j), server4, sport, 80);
            let public = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1 + (j % 250) as u8));
            reply = ports(proto::TCP, server4, public, 80, 10000 + (j / 250) as u16);
            info = tcp_info(2); // ESTABLISHED
            st = status::SRC_NAT
                | status::SRC_NAT_DONE
                | status::DST_NAT_DONE
                | status::SEEN_REPLY
                | status::ASSURED;
        }
        7 => {
            // DNAT: replies come from the translated destination 10.99.x.y:5353.
            orig = ports(proto::UDP, v4(10, 7, j), server4, sport, 53);
            reply = ports(proto::UDP, v4(10, 99, j), orig.src, 5353, sport);
            info = ProtoInfo::None;
            st = status::DST_NAT | status::DST_NAT_DONE | status::SRC_NAT_DONE;
        }
        _ => {
            // DNAT over IPv6 to fd00:99::j port 8080.
            orig = ports(proto::TCP, v6(12, j), server6, sport, 443);
            reply = ports(proto::TCP, v6(0x99, j), orig.src, 8080, sport);
            info = tcp_info(2);
            st = status::DST_NAT
                | status::DST_NAT_DONE
                | status::SRC_NAT_DONE
                | status::SEEN_REPLY
                | status::ASSURED;
        }
    }
    let mut f = Flow::new(zone, orig, reply);
    f.status = st;
    f.set_protoinfo(info);
    // Timeouts spread over 10 minutes to 2 hours, so a field mixed up between flows shows.
    f.timeout = 600 + ((i * 37) % 7200) as u32;
    f.mark = match k {
        10 => 0x1000_0000 | j as u32,
        _ if j % 5 == 0 => 1 + j as u32,
        _ => 0,
    };
    f.set_labels(match k {
        11 => (1u128 << 127) | ((j as u128) << 40) | 1,
        _ if j % 7 == 0 => 1u128 << (j % 128),
        _ => 0,
    });
    f
}

/// The flow with another mark, other labels and (for TCP) another state: what an update test
/// writes. Status and timeout stay.
pub fn modified(f: &Flow) -> Flow {
    let mut m = f.clone();
    m.mark = f.mark.wrapping_mul(3).wrapping_add(0x00c0_ffee);
    // Never all-zero: the writer cannot clear labels (see `upsert_clears_labels`).
    m.set_labels(match f.labels().rotate_left(3) ^ 0x2 {
        0 => 1 << 64,
        l => l,
    });
    if let ProtoInfo::Tcp(mut t) = m.protoinfo() {
        t.state = 1 + t.state % 8;
        m.set_protoinfo(ProtoInfo::Tcp(t));
    }
    m
}

/// What the kernel reports for a flow it created from `f`: the same, with `CONFIRMED`.
pub fn as_created(f: &Flow) -> Flow {
    let mut k = f.clone();
    k.status |= status::CONFIRMED;
    k
}
