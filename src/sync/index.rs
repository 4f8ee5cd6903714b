//! The change index: every own flow (and recent deletion) ordered by a change counter.
//!
//! Peers are cursors into this order. Sending to a peer means walking from its cursor, reading
//! each flow's *current* state from the internal cache: a flow that changed ten times while a
//! peer was slow is sent once, in its latest state (coalescing), and the memory used for a slow or
//! dead peer is one cursor, never a queue. Deletions stay as tombstones until every peer has
//! passed them, or until there are too many, in which case lagging peers get a snapshot.

use crate::flow::FlowKey;
use std::collections::{BTreeMap, HashMap};

/// What the index knows of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The key.
    pub key: FlowKey,
    /// Whether the flow is deleted (a tombstone).
    pub deleted: bool,
}

/// Per-key bookkeeping, for the timeout refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyState {
    version: u64,
    /// Seconds (engine clock) when the last version was made.
    stamp: u64,
    /// The flow's timeout at that moment, as peers received it.
    timeout: u32,
}

/// Own flows ordered by change counter.
#[derive(Debug, Default)]
pub struct ChangeIndex {
    next: u64,
    by_version: BTreeMap<u64, IndexEntry>,
    keys: HashMap<FlowKey, KeyState>,
    tombstones: usize,
    /// Tombstones up to this version were dropped: a peer behind it missed deletions.
    dropped_upto: u64,
}

impl ChangeIndex {
    /// An empty index; versions start at 1 so that 0 means "nothing yet".
    pub fn new() -> ChangeIndex {
        ChangeIndex {
            next: 1,
            ..ChangeIndex::default()
        }
    }

    /// Records a change of `key` at `now_secs`; returns its new version.
    pub fn touch(&mut self, key: FlowKey, deleted: bool, timeout: u32, now_secs: u64) -> u64 {
        let version = self.next;
        self.next += 1;
        let state = KeyState {
            version,
            stamp: now_secs,
            timeout,
        };
        if let Some(old) = self.keys.insert(key, state) {
            if let Some(e) = self.by_version.remove(&old.version) {
                self.tombstones -= usize::from(e.deleted);
            }
        }
        self.by_version.insert(version, IndexEntry { key, deleted });
        self.tombstones += usize::from(deleted);
        version
    }

    /// The highest version handed out (0 if none).
    pub fn last_version(&self) -> u64 {
        self.next - 1
    }

    /// Entries with versions in `(after, upto]`, in order, at most `limit`.
    pub fn range(&self, after: u64, upto: u64, limit: usize) -> Vec<(u64, IndexEntry)> {
        if after >= upto {
            return Vec::new();
        }
        self.by_version
            .range(after + 1..=upto)
            .take(limit)
            .map(|(v, e)| (*v, *e))
            .collect()
    }

    /// Live (not deleted) flows indexed.
    pub fn live(&self) -> usize {
        self.by_version.len() - self.tombstones
    }

    /// Tombstones kept.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Versions up to which deletions may have been forgotten.
    pub fn dropped_upto(&self) -> u64 {
        self.dropped_upto
    }

    /// Whether peers should be told again about `key` because its real expiry moved later than
    /// what they computed from the last timeout sent (`stamp + timeout`) by more than `slack`.
    pub fn timeout_stale(&self, key: &FlowKey, timeout: u32, now_secs: u64, slack: u64) -> bool {
        self.keys.get(key).is_some_and(|s| {
            let peer_expiry = s.stamp + u64::from(s.timeout);
            now_secs + u64::from(timeout) > peer_expiry + slack
        })
    }

    /// Forgets tombstones every peer has acknowledged (`version <= acked_by_all`), and the oldest
    /// ones beyond `limit` regardless (the peers behind them will need a snapshot).
    pub fn collect_tombstones(&mut self, acked_by_all: u64, limit: usize) {
        let mut drop = Vec::new();
        let mut excess = self.tombstones.saturating_sub(limit);
        for (v, e) in &self.by_version {
            if !e.deleted {
                continue;
            }
            if *v <= acked_by_all || excess > 0 {
                if *v > acked_by_all {
                    excess -= 1;
                    self.dropped_upto = self.dropped_upto.max(*v);
                }
                drop.push((*v, e.key));
            } else {
                break;
            }
        }
        for (v, key) in drop {
            self.by_version.remove(&v);
            self.keys.remove(&key);
            self.tombstones -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{proto, Tuple, Zone, L4};

    fn key(port: u16) -> FlowKey {
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

    #[test]
    fn a_key_lives_at_its_latest_version_only() {
        let mut ix = ChangeIndex::new();
        ix.touch(key(1), false, 30, 0);
        ix.touch(key(2), false, 30, 0);
        ix.touch(key(1), false, 30, 0);
        let r = ix.range(0, ix.last_version(), 10);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1.key, key(2));
        assert_eq!((r[1].0, r[1].1.key), (3, key(1)));
    }

    #[test]
    fn tombstones_are_kept_until_acknowledged_or_too_many() {
        let mut ix = ChangeIndex::new();
        for p in 0..10 {
            ix.touch(key(p), false, 30, 0);
        }
        for p in 0..6 {
            ix.touch(key(p), true, 0, 0);
        }
        assert_eq!((ix.live(), ix.tombstones()), (4, 6));
        ix.collect_tombstones(12, 100);
        assert_eq!(ix.tombstones(), 4, "versions 11 and 12 acknowledged by all");
        assert_eq!(ix.dropped_upto(), 0);
        ix.collect_tombstones(12, 1);
        assert_eq!(ix.tombstones(), 1);
        assert_eq!(ix.dropped_upto(), 15);
    }

    #[test]
    fn timeout_staleness_compares_expiries() {
        let mut ix = ChangeIndex::new();
        ix.touch(key(1), false, 100, 1000);
        // 50 s later the kernel says 60 s left: expiry 1110 vs 1100 sent, within slack 30.
        assert!(!ix.timeout_stale(&key(1), 60, 1050, 30));
        // Traffic refreshed it to 100 s: expiry 1150, 50 s later than peers believe.
        assert!(ix.timeout_stale(&key(1), 100, 1050, 30));
    }
}
