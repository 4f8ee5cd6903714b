//! Preparing replicated flows for the local kernel (commit at failover, or continuous inject).
//!
//! Pure functions: which flows, in which form. The writing itself is `netlink::Writer`.

use crate::flow::{Flow, FlowKey, ProtoInfo};
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

/// The keys of every flow of the external cache, masters before related flows (so that a
/// related flow finds its master in the kernel), for a commit written chunk by chunk.
pub fn commit_order(external: &ExternalCache) -> Vec<FlowKey> {
    let mut keys = Vec::with_capacity(external.len());
    for related in [false, true] {
        for (_, origin) in external.origins() {
            keys.extend(
                origin
                    .iter()
                    .filter(|e| e.flow.master().is_some() == related)
                    .map(|e| e.flow.key),
            );
        }
    }
    keys
}

/// The flows of `keys` still in the external cache, shaped for injection.
pub fn prepare_keys(
    external: &ExternalCache,
    keys: &[FlowKey],
    now: Duration,
    opts: &CommitOptions,
) -> Vec<Flow> {
    keys.iter()
        .filter_map(|k| external.origins().find_map(|(_, o)| o.get(k)))
        .map(|e| prepare(&e.flow, e.remaining_timeout(now), opts))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{proto, TcpInfo, Tuple, Zone, L4};
    use crate::sync::message::Batch;

    fn flow(port: u16) -> Flow {
        let t = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::TCP,
            l4: L4::Ports { src: port, dst: 21 },
        };
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        f.timeout = 100;
        f.set_protoinfo(ProtoInfo::Tcp(TcpInfo {
            state: 3,
            ..TcpInfo::default()
        }));
        f
    }

    /// An external cache holding `flows` from peer "b", received at time zero.
    fn external(flows: Vec<Flow>) -> ExternalCache {
        let mut ext = ExternalCache::default();
        let origin = ext.origin_mut("b");
        origin.set_epoch(1);
        let upserts = flows
            .into_iter()
            .enumerate()
            .map(|(i, f)| (i as u64 + 1, f));
        let batch = Batch {
            epoch: 1,
            seq: 1,
            upserts: upserts.collect(),
            deletes: Vec::new(),
        };
        origin.apply_batch(&batch, Duration::ZERO);
        ext
    }

    #[test]
    fn masters_are_committed_before_related_flows() {
        let mut related = flow(40000);
        related.set_master(Some(flow(1).key.orig));
        let ext = external(vec![related.clone(), flow(1), flow(2)]);
        let keys = commit_order(&ext);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[2], related.key, "the related flow comes last");
    }

    #[test]
    fn prepared_flows_are_aged_liberal_and_skip_vanished_keys() {
        let ext = external(vec![flow(1), flow(2)]);
        let gone = flow(3).key;
        let opts = CommitOptions::default();
        let keys = [flow(1).key, gone, flow(2).key];
        let out = prepare_keys(&ext, &keys, Duration::from_secs(30), &opts);
        assert_eq!(out.len(), 2, "a key no longer in the cache is skipped");
        assert_eq!(out[0].timeout, 70, "100 s replicated, 30 s ago");
        let ProtoInfo::Tcp(t) = out[0].protoinfo() else {
            panic!("TCP state kept")
        };
        assert_eq!(t.flags_orig & TCP_FLAG_BE_LIBERAL, TCP_FLAG_BE_LIBERAL);
        let late = prepare_keys(&ext, &keys[..1], Duration::from_secs(99), &opts);
        assert_eq!(
            late[0].timeout, 60,
            "a nearly expired flow gets min_timeout"
        );
    }
}
