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

/// Where a commit of the whole external cache stands, for writing it chunk by chunk without a
/// second copy of the cache: masters first (a related flow must find its master in the kernel),
/// then related flows; within each pass, every origin's flows by storage slot from the last one
/// down.
///
/// Walking slots rather than a list of keys taken at the start spares a key lookup (two cache
/// misses) per flow, and the walk stays complete while the cache changes between chunks: see
/// [`crate::slab::KeyedSlab::get_slot`]. A flow removed meanwhile is not written, one moved may
/// be written twice (writes are idempotent), one received meanwhile is left to the next write.
#[derive(Debug, Clone)]
pub struct CommitCursor {
    /// Origins present when the commit started.
    origins: Vec<String>,
    /// Whether the pass of related flows has begun.
    related: bool,
    /// Index in `origins` of the origin being walked.
    origin: usize,
    /// Slots below this one remain in that origin (`None`: not started).
    below: Option<usize>,
}

impl CommitCursor {
    /// A commit of everything `external` holds.
    pub fn new(external: &ExternalCache) -> CommitCursor {
        let mut origins: Vec<String> = external.origins().map(|(name, _)| name.clone()).collect();
        origins.sort_unstable();
        CommitCursor {
            origins,
            related: false,
            origin: 0,
            below: None,
        }
    }

    /// Whether every flow has been handed out.
    pub fn is_done(&self) -> bool {
        self.related && self.origin >= self.origins.len()
    }

    /// The next flows, at most `limit`, shaped for injection; empty once the walk is done.
    pub fn next_chunk(
        &mut self,
        external: &ExternalCache,
        limit: usize,
        now: Duration,
        opts: &CommitOptions,
    ) -> Vec<Flow> {
        let mut out = Vec::new();
        while out.len() < limit && !self.is_done() {
            let Some(cache) = self
                .origins
                .get(self.origin)
                .and_then(|o| external.origin(o))
            else {
                self.next_origin();
                continue;
            };
            let mut slot = self.below.unwrap_or(usize::MAX).min(cache.len());
            while slot > 0 && out.len() < limit {
                slot -= 1;
                let Some(e) = cache.get_slot(slot) else {
                    break;
                };
                if e.flow.master().is_some() == self.related {
                    out.push(prepare(&e.flow, e.remaining_timeout(now), opts));
                }
            }
            if slot == 0 {
                self.next_origin();
            } else {
                self.below = Some(slot);
            }
        }
        out
    }

    fn next_origin(&mut self) {
        self.origin += 1;
        self.below = None;
        if self.origin >= self.origins.len() && !self.related {
            self.related = true;
            self.origin = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{proto, FlowKey, TcpInfo, Tuple, Zone, L4};
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
        origin.apply_batch(batch, Duration::ZERO);
        ext
    }

    /// Every chunk of a cursor walk, `limit` flows at a time.
    fn walk(ext: &ExternalCache, limit: usize, now: Duration) -> Vec<Vec<Flow>> {
        let mut cursor = CommitCursor::new(ext);
        let mut chunks = Vec::new();
        while !cursor.is_done() {
            chunks.push(cursor.next_chunk(ext, limit, now, &CommitOptions::default()));
        }
        chunks
    }

    #[test]
    fn masters_are_committed_before_related_flows() {
        let mut related = flow(40000);
        related.set_master(Some(flow(1).key.orig));
        let ext = external(vec![related.clone(), flow(1), flow(2)]);
        let flows: Vec<FlowKey> = walk(&ext, 2, Duration::ZERO)
            .concat()
            .iter()
            .map(|f| f.key)
            .collect();
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[2], related.key, "the related flow comes last");
    }

    #[test]
    fn an_empty_cache_is_walked_at_once() {
        let ext = ExternalCache::default();
        let mut cursor = CommitCursor::new(&ext);
        let chunk = cursor.next_chunk(&ext, 10, Duration::ZERO, &CommitOptions::default());
        assert!(chunk.is_empty());
        assert!(cursor.is_done());
    }

    #[test]
    fn prepared_flows_are_aged_and_liberal() {
        let ext = external(vec![flow(1)]);
        let out = walk(&ext, 10, Duration::from_secs(30)).concat();
        assert_eq!(out[0].timeout, 70, "100 s replicated, 30 s ago");
        let ProtoInfo::Tcp(t) = out[0].protoinfo() else {
            panic!("TCP state kept")
        };
        assert_eq!(t.flags_orig & TCP_FLAG_BE_LIBERAL, TCP_FLAG_BE_LIBERAL);
        let late = walk(&ext, 10, Duration::from_secs(99)).concat();
        assert_eq!(
            late[0].timeout, 60,
            "a nearly expired flow gets min_timeout"
        );
    }

    /// Between chunks the cache loses and gains flows (the origin keeps sending): every flow
    /// that stays from start to end is handed out, none that left before its turn is.
    #[test]
    fn a_walk_misses_no_flow_while_the_cache_changes() {
        let mut ext = external((1..=100).map(flow).collect());
        let mut cursor = CommitCursor::new(&ext);
        let opts = CommitOptions::default();
        let mut seen = Vec::new();
        let mut removed = Vec::new();
        let mut seq = 2;
        while !cursor.is_done() {
            let chunk = cursor.next_chunk(&ext, 7, Duration::ZERO, &opts);
            seen.extend(chunk.iter().map(|f| f.key));
            // Remove some flows not handed out yet, and some already handed out; add new ones.
            let origin = ext.origin_mut("b");
            let doomed: Vec<FlowKey> = origin
                .iter()
                .map(|e| e.flow.key)
                .filter(|k| k.orig.l4 != flow(1).key.orig.l4)
                .step_by(5)
                .take(3)
                .collect();
            let added = flow(1000 + seq as u16);
            origin.apply_batch(
                Batch {
                    epoch: 1,
                    seq,
                    upserts: vec![(1000 + seq, added)],
                    deletes: doomed.iter().map(|k| (1000 + seq, *k)).collect(),
                },
                Duration::ZERO,
            );
            seq += 1;
            removed.extend(doomed);
        }
        for port in 1..=100 {
            let key = flow(port).key;
            if !removed.contains(&key) {
                assert!(
                    seen.contains(&key),
                    "flow {port} stayed but was not committed"
                );
            }
        }
        let before_its_turn = removed.iter().filter(|k| !seen.contains(k)).count();
        assert!(
            before_its_turn > 0,
            "the test removed flows not yet handed out"
        );
    }
}
