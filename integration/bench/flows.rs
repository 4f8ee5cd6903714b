//! The flows benchmarks write: a realistic mix, and a minimal variant of the same tuples.

use ctsync::flow::{proto, status, Flow, ProtoInfo, TcpInfo, Tuple, Zone, ZoneDir, L4};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Timeout of every flow written: long enough that nothing expires during a run.
pub const FLOW_TIMEOUT: u32 = 3600;

pub const FLOW_MIX: &str = "35% TCPv4 + 15% TCPv6 established (protoinfo), 15% UDPv4, 5% UDPv6, \
                        5% ICMP echo, 5% ICMPv6 echo, 10% SNAT and 5% DNAT TCPv4 (NAT_DONE bits), \
                        5% UDPv4 in zones 1-3; 1 flow in 11 marked";

pub fn v4(net: u8, n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(net, (n >> 16) as u8, (n >> 8) as u8, n as u8))
}

pub fn v4s(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub fn v6(net: u16, n: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        net,
        0,
        0,
        0,
        (n >> 16) as u16,
        n as u16,
    ))
}

pub fn ports(proto: u8, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Tuple {
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

pub fn echo(proto: u8, src: IpAddr, dst: IpAddr, id: u16) -> Tuple {
    let kind = if proto == proto::ICMPV6 { 128 } else { 8 };
    Tuple {
        src,
        dst,
        proto,
        l4: L4::Icmp { id, kind, code: 0 },
    }
}

/// Flow number `i` of the realistic mix (see [`FLOW_MIX`]); every original and reply tuple is
/// unique for `i < 2^24`.
pub fn realistic_flow(i: usize) -> Flow {
    let n = i as u32;
    let sport = 1024 + (n % 60_000) as u16;
    let established = status::CONFIRMED | status::SEEN_REPLY | status::ASSURED;
    let tcp_est = ProtoInfo::Tcp(TcpInfo {
        state: 3,
        wscale_orig: 7,
        wscale_reply: 7,
        flags_orig: 0x03,
        flags_reply: 0x03,
    });
    let plain = |orig: Tuple| Flow::new(Zone::default(), orig, orig.inverse());
    let mut f = match i % 20 {
        0..=6 => {
            let dport = [443, 80, 22, 8443][i % 4];
            let mut f = plain(ports(
                proto::TCP,
                v4(10, n),
                v4s(192, 0, 2, 1 + (n % 250) as u8),
                sport,
                dport,
            ));
            f.status = established;
            f.set_protoinfo(tcp_est);
            f
        }
        7..=9 => {
            let mut f = plain(ports(proto::TCP, v6(1, n), v6(2, n % 1000), sport, 443));
            f.status = established;
            f.set_protoinfo(tcp_est);
            f
        }
        10..=12 => {
            let mut f = plain(ports(proto::UDP, v4(10, n), v4s(192, 0, 2, 53), sport, 53));
            f.status = status::CONFIRMED | status::SEEN_REPLY;
            f
        }
        13 => {
            let mut f = plain(ports(proto::UDP, v6(1, n), v6(3, 53), sport, 53));
            f.status = status::CONFIRMED | status::SEEN_REPLY;
            f
        }
        14 => {
            let mut f = plain(echo(proto::ICMP, v4(10, n), v4s(192, 0, 2, 1), n as u16));
            f.status = status::CONFIRMED | status::SEEN_REPLY;
            f
        }
        15 => {
            let mut f = plain(echo(proto::ICMPV6, v6(1, n), v6(2, 1), n as u16));
            f.status = status::CONFIRMED | status::SEEN_REPLY;
            f
        }
        16 | 17 => {
            // Masquerade to a pool of 199 addresses, one port per flow.
            let orig = ports(
                proto::TCP,
                v4(10, n),
                v4s(198, 51, 100, 1 + (n % 250) as u8),
                sport,
                443,
            );
            let nat_addr = v4s(203, 0, 113, 1 + ((n / 60_000) % 199) as u8);
            let reply = ports(
                proto::TCP,
                orig.dst,
                nat_addr,
                443,
                1024 + (n % 60_000) as u16,
            );
            let mut f = Flow::new(Zone::default(), orig, reply);
            f.status = established | status::SRC_NAT | status::SRC_NAT_DONE | status::DST_NAT_DONE;
            f.set_protoinfo(tcp_est);
            f
        }
        18 => {
            // A published service forwarded to one of four backends.
            let orig = ports(proto::TCP, v4(100, n), v4s(203, 0, 113, 200), sport, 80);
            let backend = v4s(172, 16, (n % 4) as u8, 10);
            let reply = ports(proto::TCP, backend, orig.src, 8080, sport);
            let mut f = Flow::new(Zone::default(), orig, reply);
            f.status = established | status::DST_NAT | status::DST_NAT_DONE | status::SRC_NAT_DONE;
            f.set_protoinfo(tcp_est);
            f
        }
        _ => {
            let zone = Zone {
                id: 1 + ((i / 20) % 3) as u16,
                dir: ZoneDir::Both,
            };
            let orig = ports(proto::UDP, v4(10, n), v4s(192, 0, 2, 123), sport, 123);
            let mut f = Flow::new(zone, orig, orig.inverse());
            f.status = status::CONFIRMED | status::SEEN_REPLY;
            f.mark = 0x100 + (n % 16);
            f
        }
    };
    f.timeout = FLOW_TIMEOUT;
    if i % 11 == 0 && f.mark == 0 {
        f.mark = 0x10;
    }
    f
}

/// The same original tuple as [`realistic_flow`], with only what the raw writer sends: plain
/// inverse reply, CONFIRMED, timeout. No zone, mark, protoinfo or NAT.
pub fn minimal_flow(i: usize) -> Flow {
    let orig = realistic_flow(i).key.orig;
    let mut f = Flow::new(Zone::default(), orig, orig.inverse());
    f.status = status::CONFIRMED;
    f.timeout = FLOW_TIMEOUT;
    f
}
