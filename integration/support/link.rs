//! Sync links: a veth pair between two test namespaces, with an IPv4 address on each end.
//!
//! The pair is created with both ends already inside their namespaces, so nothing ever appears
//! in the host's namespace, and it dies with either namespace. The guard also deletes it on drop
//! (declare it after the namespaces, so that it is dropped first).
//!
//! Every link gets its own `/24` in [`LINK_NET`] (`172.31.<n>.0/24`, `n` from a process-wide
//! counter), so a namespace with several links has one subnet per link, and the flows of the
//! sync traffic itself are easy to tell from generated ones ([`is_link_flow`]).

use super::netns::{unique_name, Netns};
use super::run_ok;
use ctsync::flow::Flow;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// First two octets of every link address: `172.31.0.0/16`.
pub const LINK_NET: [u8; 2] = [172, 31];

static NEXT_SUBNET: AtomicUsize = AtomicUsize::new(0);

/// A veth pair between two namespaces, deleted on drop.
#[derive(Debug)]
pub struct Link {
    ns: [String; 2],
    names: [String; 2],
    addrs: [Ipv4Addr; 2],
}

impl Link {
    /// Creates a veth pair between `a` and `b`, `172.31.<n>.1/24` on `a`'s end and `.2` on
    /// `b`'s, both up.
    pub fn new(a: &Netns, b: &Netns) -> Link {
        let n = (NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 256) as u8;
        let [p, q] = LINK_NET;
        // The guard exists before the pair does: a half-done creation is cleaned up too.
        let link = Link {
            ns: [a.name().to_string(), b.name().to_string()],
            names: [unique_name(), unique_name()],
            addrs: [Ipv4Addr::new(p, q, n, 1), Ipv4Addr::new(p, q, n, 2)],
        };
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &link.names[0],
            "netns",
            &link.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            &link.names[1],
            "netns",
            &link.ns[1],
        ]));
        for i in 0..2 {
            let (ns, dev) = (&link.ns[i], &link.names[i]);
            // IPv4 only: no neighbour discovery or router solicitations on the link.
            run_ok(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
            ]));
            run_ok(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", link.addrs[i]),
                "dev",
                dev,
            ]));
            run_ok(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
        }
        link
    }

    /// Address of `a`'s end (the first namespace given to [`Link::new`]).
    pub fn a_addr(&self) -> Ipv4Addr {
        self.addrs[0]
    }

    /// Address of `b`'s end.
    pub fn b_addr(&self) -> Ipv4Addr {
        self.addrs[1]
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; gone already if a namespace was deleted first.
        let _ = Command::new("ip")
            .args(["-n", &self.ns[0], "link", "del", &self.names[0]])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether an address belongs to a sync link.
pub fn is_link_addr(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if a.octets()[..2] == LINK_NET)
}

/// Whether a flow is traffic of a sync link (the daemons' own connections), as opposed to a
/// generated flow: such flows change in the kernel without events (TCP window data, timeouts
/// extended by traffic), so comparisons leave them out.
pub fn is_link_flow(f: &Flow) -> bool {
    is_link_addr(f.key.orig.src) || is_link_addr(f.key.orig.dst)
}
