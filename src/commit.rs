//! Preparing replicated flows for the local kernel (commit at failover, or continuous inject).
//!
//! Pure functions: which flows, in which form. The writing itself is `netlink::Writer`.

use crate::flow::{Flow, ProtoInfo};
use crate::sync::ExternalCache;
use std::time::Duration;

/// `IP_CT_TCP_FLAG_BE_LIBERAL`: the kernel skips sequence-window checks for the flow.
pub const TCP_FLAG_BE_LIBERAL: u8 = 0x08;

/// How replicated flows are shaped before they enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOptions {
    /// Timeout given to a flow whose replicated timeout ran out (or nearly): the origin may have
    /// kept it alive with traffic the kernel reports no event for.
    pub min_timeout: u32,
    /// Mark TCP flows "be liberal", so that the first mid-stream packet after takeover is not
    /// dropped by window tracking (the standby never saw the sequence numbers).
    pub tcp_liberal: bool,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            min_timeout: 60,
            tcp_liberal: true,
        }
    }
}

/// Shapes one replicated flow for injection; `remaining` is its aged timeout.
pub fn prepare(flow: &Flow, remaining: u32, opts: &CommitOptions) -> Flow {
    let mut f = flow.clone();
    f.timeout = remaining.max(opts.min_timeout.min(flow.timeout.max(1)));
    if opts.tcp_liberal {
        if let ProtoInfo::Tcp(mut t) = f.protoinfo() {
            t.flags_orig |= TCP_FLAG_BE_LIBERAL;
            t.flags_reply |= TCP_FLAG_BE_LIBERAL;
            f.set_protoinfo(ProtoInfo::Tcp(t));
        }
    }
    f
}

/// Every flow of the external cache, shaped for injection. Masters come before related flows
/// (the writer keeps that order too).
pub fn prepare_all(external: &ExternalCache, now: Duration, opts: &CommitOptions) -> Vec<Flow> {
    let mut out = Vec::with_capacity(external.len());
    for (_, origin) in external.origins() {
        out.extend(
            origin
                .iter()
                .map(|e| prepare(&e.flow, e.remaining_timeout(now), opts)),
        );
    }
    out.sort_by_key(|f| f.master().is_some());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{proto, TcpInfo, Tuple, Zone, L4};

    fn tcp(timeout: u32) -> Flow {
        let t = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::TCP,
            l4: L4::Ports { src: 1, dst: 2 },
        };
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        f.timeout = timeout;
        f.set_protoinfo(ProtoInfo::Tcp(TcpInfo {
            state: 3,
            flags_orig: 0x03,
            ..TcpInfo::default()
        }));
        f
    }

    #[test]
    fn tcp_flows_become_liberal_and_keep_their_flags() {
        let f = prepare(&tcp(300), 200, &CommitOptions::default());
        let ProtoInfo::Tcp(t) = f.protoinfo() else {
            panic!("not tcp")
        };
        assert_eq!(t.flags_orig, 0x03 | TCP_FLAG_BE_LIBERAL);
        assert_eq!(t.flags_reply, TCP_FLAG_BE_LIBERAL);
        assert_eq!(f.timeout, 200);
        let strict = CommitOptions {
            tcp_liberal: false,
            ..CommitOptions::default()
        };
        assert_eq!(
            prepare(&tcp(300), 200, &strict).protoinfo(),
            tcp(300).protoinfo()
        );
    }

    #[test]
    fn expired_timeouts_get_the_floor_but_never_more_than_the_original() {
        let opts = CommitOptions::default();
        assert_eq!(prepare(&tcp(432000), 0, &opts).timeout, 60);
        assert_eq!(prepare(&tcp(30), 0, &opts).timeout, 30);
    }
}
