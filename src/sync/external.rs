//! The external cache: flows learnt from peers, kept per origin node.
//!
//! Keeping origins apart is what makes a restarted peer's vanished flows disappear (its snapshot
//! replaces exactly its own flows) and what lets three or more nodes share one cluster.

use super::message::Batch;
use crate::flow::{Flow, FlowKey};
use crate::slab::{spread, Entry, Keyed, KeyedSlab};
use hashbrown::hash_table::{Entry as TombEntry, HashTable};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// A flow learnt from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalFlow {
    /// The flow as the origin last sent it.
    pub flow: Flow,
    /// The origin's change counter for it.
    pub version: u64,
    /// When it arrived (engine clock), to age its timeout.
    pub received_at: Duration,
    /// Snapshot generation that last confirmed it.
    generation: u32,
}

impl ExternalFlow {
    /// Seconds the flow has left now, from the timeout the origin sent and its age.
    pub fn remaining_timeout(&self, now: Duration) -> u32 {
        let age = now.saturating_sub(self.received_at).as_secs();
        u32::try_from(u64::from(self.flow.timeout).saturating_sub(age)).unwrap_or(0)
    }
}

impl Keyed for ExternalFlow {
    fn key(&self) -> &FlowKey {
        &self.flow.key
    }
}

/// Bound on remembered deletions per origin (they only guard against reordered old updates):
/// see [`Tombstones`] for what is guaranteed.
const TOMBSTONES: usize = 65_536;
/// Bound on out-of-order sequence numbers remembered per origin.
const SEQ_WINDOW: usize = 4096;

/// Everything learnt from one origin node.
#[derive(Debug, Default)]
pub struct OriginCache {
    epoch: u64,
    /// Dense chunks plus an index of slot numbers: no empty bucket costs a whole flow.
    flows: KeyedSlab<ExternalFlow>,
    /// Recently deleted keys, filed under the flows' hash (randomly seeded: keys come from a
    /// peer, so the hash must stay unpredictable).
    tombstones: Tombstones,
    /// Every sequence up to this one has been applied.
    contiguous: u64,
    /// Applied sequences above `contiguous`.
    above: BTreeSet<u64>,
    generation: u32,
    snapshot: Option<u64>,
    snapshots_completed: u64,
    /// Keys changed since the last `take_changes`, when tracking (continuous injection).
    log: Option<Vec<(FlowKey, bool)>>,
}

/// Outcome of handing a sequenced message to an origin cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// New: applied, acknowledge it.
    Applied,
    /// Seen before: acknowledge again, change nothing.
    Duplicate,
    /// From another epoch of the origin: ignore, do not acknowledge.
    StaleEpoch,
}

/// Keys the origin deleted recently, with the newest version that deleted each: an update it
/// sent before a deletion but that arrived after it must not resurrect the flow.
///
/// Two generations of at most `TOMBSTONES / 2` keys each: deletions go into `young`, and once
/// it is full the next deletion first drops `old` and makes `young` the old one. A deletion is
/// thus remembered until deletions of at least `TOMBSTONES / 2` other distinct keys followed it
/// (and at most `TOMBSTONES` keys are held). Forgetting a whole generation at once leaves one
/// probe per deletion, where a map with a queue of its keys in deletion order took two hashes
/// and two probes past the bound (the key in, the oldest one out) and a queued copy of each key.
///
/// Keys are filed under [`KeyedSlab::hash_key`] of the origin's flows, so that a deletion
/// hashes its key once for both stores.
#[derive(Debug, Default)]
struct Tombstones {
    young: HashTable<(FlowKey, u64)>,
    old: HashTable<(FlowKey, u64)>,
}

impl Tombstones {
    /// The newest remembered version that deleted `key`, whose hash is `h`.
    fn get(&self, key: &FlowKey, h: u32) -> Option<u64> {
        let find = |t: &HashTable<(FlowKey, u64)>| {
            if t.is_empty() {
                return None;
            }
            t.find(spread(h), |(k, _)| k == key).map(|&(_, v)| v)
        };
        // Both: an older deletion arriving late may sit in `young` with the newer one in `old`.
        match (find(&self.young), find(&self.old)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Remembers that `version` deleted `key` (hash `h`); `rehash` gives the hash of any key
    /// (the table keeps none, they would make each entry 8 bytes bigger).
    fn insert(&mut self, key: &FlowKey, h: u32, version: u64, rehash: impl Fn(&FlowKey) -> u32) {
        if self.young.len() >= TOMBSTONES / 2 {
            // The old generation's allocation is reused: its size is the one needed.
            std::mem::swap(&mut self.young, &mut self.old);
            self.young.clear();
        }
        match self
            .young
            .entry(spread(h), |(k, _)| k == key, |(k, _)| spread(rehash(k)))
        {
            TombEntry::Occupied(mut e) => {
                let v = &mut e.get_mut().1;
                *v = (*v).max(version);
            }
            TombEntry::Vacant(e) => {
                e.insert((*key, version));
            }
        }
    }

    /// Forgets every deletion (keeps the allocations for the next ones).
    fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }

    fn heap_bytes(&self) -> usize {
        self.young.allocation_size() + self.old.allocation_size()
    }
}

impl OriginCache {
    /// The origin's epoch this cache follows.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Highest sequence up to which everything was applied.
    pub fn contiguous_seq(&self) -> u64 {
        self.contiguous
    }

    /// Snapshots completed from the current epoch.
    pub fn snapshots_completed(&self) -> u64 {
        self.snapshots_completed
    }

    /// Flows held.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is held.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Iterates in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &ExternalFlow> {
        self.flows.iter()
    }

    /// The flow in storage slot `slot` (`0..len`): see [`KeyedSlab::get_slot`].
    pub fn get_slot(&self, slot: usize) -> Option<&ExternalFlow> {
        self.flows.get_slot(slot)
    }

    /// Looks a flow up.
    pub fn get(&self, key: &FlowKey) -> Option<&ExternalFlow> {
        self.flows.get(key)
    }

    /// The origin announced an epoch. A new epoch restarts sequence tracking; the flows stay
    /// until the origin's snapshot says which of them it still has.
    pub fn set_epoch(&mut self, epoch: u64) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.contiguous = 0;
            self.above.clear();
            self.snapshot = None;
            self.snapshots_completed = 0;
            // Change counters restart with the origin: anything it says from now on is newer
            // than what it said before, whatever the numbers.
            for f in self.flows.iter_mut() {
                f.version = 0;
            }
            self.tombstones.clear();
        }
    }

    /// Records a sequence number; tells whether the message is new.
    fn accept_seq(&mut self, epoch: u64, seq: u64) -> Applied {
        if epoch != self.epoch {
            return Applied::StaleEpoch;
        }
        if seq <= self.contiguous || self.above.contains(&seq) {
            return Applied::Duplicate;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        while self.above.len() > SEQ_WINDOW {
            // A gap this old will not be filled (the sender re-sends under new numbers).
            if let Some(first) = self.above.pop_first() {
                self.contiguous = first;
                while self.above.remove(&(self.contiguous + 1)) {
                    self.contiguous += 1;
                }
            }
        }
        Applied::Applied
    }

    /// Applies a batch: never moves a flow backwards, never resurrects a newer deletion.
    ///
    /// The batch is consumed: its flows move into the cache instead of being copied.
    pub fn apply_batch(&mut self, batch: Batch, now: Duration) -> Applied {
        let verdict = self.accept_seq(batch.epoch, batch.seq);
        if verdict != Applied::Applied {
            return verdict;
        }
        for (version, flow) in batch.upserts {
            self.upsert(version, flow, now);
        }
        for (version, key) in &batch.deletes {
            self.delete(*version, key);
        }
        verdict
    }

    fn logged(&mut self, key: FlowKey, deleted: bool) {
        if let Some(log) = &mut self.log {
            log.push((key, deleted));
        }
    }

    fn upsert(&mut self, version: u64, flow: Flow, now: Duration) {
        let key = flow.key;
        let h = self.flows.hash_key(&key);
        if self.tombstones.get(&key, h).is_some_and(|v| v >= version) {
            return;
        }
        let mut changed = true;
        let generation = self.generation;
        match self.flows.entry_hashed(&key, h) {
            Entry::Occupied(cur) => {
                // The origin still has the flow, whatever the version: confirmed by a snapshot.
                cur.generation = generation;
                if version > cur.version {
                    cur.flow = flow;
                    cur.version = version;
                    cur.received_at = now;
                } else {
                    changed = false;
                }
            }
            Entry::Vacant(e) => {
                e.insert(ExternalFlow {
                    flow,
                    version,
                    received_at: now,
                    generation,
                });
            }
        }
        if changed {
            self.logged(key, false);
        }
    }

    fn delete(&mut self, version: u64, key: &FlowKey) {
        let h = self.flows.hash_key(key);
        if self
            .flows
            .remove_if_hashed(key, h, |f| f.version <= version)
            .is_some()
        {
            self.logged(*key, true);
        }
        let flows = &self.flows;
        self.tombstones
            .insert(key, h, version, |k| flows.hash_key(k));
    }

    /// A snapshot begins: from now on, flows not re-sent before its end are gone at the origin.
    pub fn snapshot_begin(&mut self, epoch: u64, seq: u64, id: u64) -> Applied {
        let verdict = self.accept_seq(epoch, seq);
        if verdict == Applied::Applied {
            self.generation = self.generation.wrapping_add(1);
            self.snapshot = Some(id);
        }
        verdict
    }

    /// A snapshot ends; returns the flows removed because the origin no longer has them.
    pub fn snapshot_end(&mut self, epoch: u64, seq: u64, id: u64) -> (Applied, usize) {
        let verdict = self.accept_seq(epoch, seq);
        if verdict != Applied::Applied || self.snapshot != Some(id) {
            return (verdict, 0);
        }
        let before = self.flows.len();
        let generation = self.generation;
        let mut gone = Vec::new();
        self.flows.retain(|f| {
            let keep = f.generation == generation;
            if !keep {
                gone.push(f.flow.key);
            }
            keep
        });
        for key in gone {
            self.logged(key, true);
        }
        self.snapshot = None;
        self.snapshots_completed += 1;
        (verdict, before - self.flows.len())
    }

    /// Drops every flow (operator's flush).
    pub fn clear(&mut self) {
        self.flows.clear();
    }

    /// Bytes of heap held: flows (with their boxed attributes) and tombstones.
    pub fn heap_bytes(&self) -> usize {
        let boxed: usize = self
            .flows
            .iter()
            .map(|f| crate::cache::boxed_bytes(&f.flow))
            .sum();
        self.flows.heap_bytes() + boxed + self.tombstones.heap_bytes()
    }
}

/// A change of the external cache, for continuous injection into the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalChange {
    /// The origin node.
    pub origin: String,
    /// The flow.
    pub key: FlowKey,
    /// Whether it was removed (else created or changed).
    pub deleted: bool,
}

/// Flows learnt from every origin.
#[derive(Debug, Default)]
pub struct ExternalCache {
    origins: HashMap<String, OriginCache>,
    tracking: bool,
}

impl ExternalCache {
    /// The cache of one origin, created on first use.
    pub fn origin_mut(&mut self, node_id: &str) -> &mut OriginCache {
        let tracking = self.tracking;
        self.origins
            .entry(node_id.to_string())
            .or_insert_with(|| OriginCache {
                log: tracking.then(Vec::new),
                ..OriginCache::default()
            })
    }

    /// Starts or stops recording changes for [`ExternalCache::take_changes`].
    pub fn track_changes(&mut self, on: bool) {
        self.tracking = on;
        for o in self.origins.values_mut() {
            o.log = on.then(Vec::new);
        }
    }

    /// Changes recorded since the last call, in order per origin.
    pub fn take_changes(&mut self) -> Vec<ExternalChange> {
        let mut out = Vec::new();
        for (name, o) in &mut self.origins {
            if let Some(log) = &mut o.log {
                out.extend(log.drain(..).map(|(key, deleted)| ExternalChange {
                    origin: name.clone(),
                    key,
                    deleted,
                }));
            }
        }
        out
    }

    /// Drops every flow of every origin.
    pub fn clear(&mut self) {
        for o in self.origins.values_mut() {
            o.clear();
        }
    }

    /// The cache of one origin.
    pub fn origin(&self, node_id: &str) -> Option<&OriginCache> {
        self.origins.get(node_id)
    }

    /// Origins with their caches.
    pub fn origins(&self) -> impl Iterator<Item = (&String, &OriginCache)> {
        self.origins.iter()
    }

    /// Flows held, all origins together.
    pub fn len(&self) -> usize {
        self.origins.values().map(OriginCache::len).sum()
    }

    /// Whether no flow is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{proto, Tuple, Zone, L4};
    use std::mem::size_of;

    fn flow(port: u16, mark: u32) -> Flow {
        let t = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::TCP,
            l4: L4::Ports { src: port, dst: 80 },
        };
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        f.mark = mark;
        f.timeout = 100;
        f
    }

    fn batch(seq: u64, upserts: Vec<(u64, Flow)>, deletes: Vec<(u64, FlowKey)>) -> Batch {
        Batch {
            epoch: 7,
            seq,
            upserts,
            deletes,
        }
    }

    fn cache() -> OriginCache {
        let mut c = OriginCache::default();
        c.set_epoch(7);
        c
    }

    #[test]
    fn older_versions_never_overwrite_newer_ones() {
        let mut c = cache();
        let t = Duration::ZERO;
        c.apply_batch(batch(2, vec![(5, flow(1, 2))], vec![]), t);
        c.apply_batch(batch(1, vec![(3, flow(1, 1))], vec![]), t);
        assert_eq!(c.get(&flow(1, 0).key).unwrap().flow.mark, 2);
        assert_eq!(c.contiguous_seq(), 2);
    }

    #[test]
    fn a_reordered_update_does_not_resurrect_a_deleted_flow() {
        let mut c = cache();
        let t = Duration::ZERO;
        c.apply_batch(batch(1, vec![(1, flow(1, 0))], vec![]), t);
        c.apply_batch(batch(3, vec![], vec![(4, flow(1, 0).key)]), t);
        c.apply_batch(batch(2, vec![(2, flow(1, 9))], vec![]), t);
        assert!(c.is_empty());
    }

    #[test]
    fn duplicates_and_other_epochs_change_nothing() {
        let mut c = cache();
        let t = Duration::ZERO;
        assert_eq!(
            c.apply_batch(batch(1, vec![(1, flow(1, 0))], vec![]), t),
            Applied::Applied
        );
        assert_eq!(
            c.apply_batch(batch(1, vec![], vec![(9, flow(1, 0).key)]), t),
            Applied::Duplicate
        );
        let mut other = batch(2, vec![], vec![(9, flow(1, 0).key)]);
        other.epoch = 8;
        assert_eq!(c.apply_batch(other, t), Applied::StaleEpoch);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn snapshot_end_removes_flows_the_origin_no_longer_has() {
        let mut c = cache();
        let t = Duration::ZERO;
        c.apply_batch(batch(1, vec![(1, flow(1, 0)), (2, flow(2, 0))], vec![]), t);
        c.set_epoch(8); // the origin restarted
        c.snapshot_begin(8, 1, 42);
        let mut b = batch(2, vec![(1, flow(2, 0)), (2, flow(3, 0))], vec![]);
        b.epoch = 8;
        c.apply_batch(b, t);
        let (_, removed) = c.snapshot_end(8, 3, 42);
        assert_eq!(removed, 1);
        assert!(c.get(&flow(1, 0).key).is_none());
        assert!(c.get(&flow(2, 0).key).is_some());
        assert_eq!(c.snapshots_completed(), 1);
    }

    #[test]
    fn tracked_changes_list_applied_upserts_and_deletes() {
        let mut ext = ExternalCache::default();
        ext.track_changes(true);
        let o = ext.origin_mut("fw9");
        o.set_epoch(7);
        o.apply_batch(
            batch(1, vec![(1, flow(1, 0)), (2, flow(2, 0))], vec![]),
            Duration::ZERO,
        );
        o.apply_batch(
            batch(2, vec![(1, flow(1, 5))], vec![(3, flow(2, 0).key)]),
            Duration::ZERO,
        );
        let changes = ext.take_changes();
        let summary: Vec<(u16, bool)> = changes
            .iter()
            .map(|c| match c.key.orig.l4 {
                L4::Ports { src, .. } => (src, c.deleted),
                _ => (0, c.deleted),
            })
            .collect();
        // The stale version-1 update of flow 1 changed nothing and is not listed.
        assert_eq!(summary, vec![(1, false), (2, false), (2, true)]);
        assert!(ext.take_changes().is_empty());
    }

    /// The `i`th of many distinct keys (more than the ports of one address), none equal to a
    /// key of [`flow`].
    fn nth_key(i: usize) -> FlowKey {
        let mut k = flow(0, 0).key;
        k.orig.src = std::net::Ipv4Addr::from(0x0b00_0000 | u32::try_from(i).unwrap()).into();
        k
    }

    /// Deletes `n` distinct keys nobody else uses, starting at the `from`th, in batch `seq`.
    fn delete_others(c: &mut OriginCache, seq: u64, from: usize, n: usize) {
        let deletes = (from..from + n).map(|i| (1, nth_key(i))).collect();
        assert_eq!(
            c.apply_batch(batch(seq, vec![], deletes), Duration::ZERO),
            Applied::Applied
        );
    }

    #[test]
    fn a_deletion_outlives_half_the_bound_of_later_ones() {
        let half = TOMBSTONES / 2;
        let t = Duration::ZERO;
        let f = flow(1, 0);
        // The deletion lands first in, or last in, a generation.
        for before in [0, half - 1] {
            let mut c = cache();
            delete_others(&mut c, 1, 0, before);
            c.apply_batch(batch(2, vec![(1, f.clone())], vec![(10, f.key)]), t);
            assert!(c.is_empty());
            delete_others(&mut c, 3, before, half);
            // An update the origin sent before deleting the flow, arriving late: ignored.
            c.apply_batch(batch(4, vec![(9, f.clone())], vec![]), t);
            assert!(
                c.is_empty(),
                "resurrected after {before} + {half} deletions"
            );
            // Forgotten by `TOMBSTONES` later deletions at most, so that memory stays bounded:
            // the same stale update is then taken.
            delete_others(&mut c, 5, before + half, half);
            c.apply_batch(batch(6, vec![(9, f.clone())], vec![]), t);
            assert_eq!(
                c.len(),
                1,
                "remembered after {before} + {TOMBSTONES} deletions"
            );
        }
    }

    #[test]
    fn the_newest_deletion_of_a_key_is_the_one_remembered() {
        let t = Duration::ZERO;
        let f = flow(1, 0);
        let mut c = cache();
        // Deleted at 5, then a late deletion from 3 arrives: updates up to 5 stay ignored.
        c.apply_batch(batch(1, vec![], vec![(5, f.key), (3, f.key)]), t);
        c.apply_batch(batch(2, vec![(4, f.clone())], vec![]), t);
        assert!(c.is_empty());
        // Likewise with the newer deletion in the old generation and the late one in the young.
        delete_others(&mut c, 3, 0, TOMBSTONES / 2);
        c.apply_batch(batch(4, vec![], vec![(3, f.key)]), t);
        c.apply_batch(batch(5, vec![(4, f.clone())], vec![]), t);
        assert!(c.is_empty());
        // A newer deletion replaces the older one.
        c.apply_batch(batch(6, vec![(6, f.clone())], vec![]), t);
        assert_eq!(c.len(), 1);
        c.apply_batch(batch(7, vec![], vec![(8, f.key)]), t);
        c.apply_batch(batch(8, vec![(7, f.clone())], vec![]), t);
        assert!(c.is_empty());
        c.apply_batch(batch(9, vec![(9, f.clone())], vec![]), t);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_new_epoch_forgets_deletions() {
        let t = Duration::ZERO;
        let f = flow(1, 0);
        let mut c = cache();
        c.apply_batch(batch(1, vec![], vec![(100, f.key)]), t);
        c.set_epoch(8);
        let mut b = batch(1, vec![(1, f.clone())], vec![]);
        b.epoch = 8;
        c.apply_batch(b, t);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn heap_bytes_counts_tombstones_within_their_bound() {
        let mut c = cache();
        let empty = c.heap_bytes();
        delete_others(&mut c, 1, 0, 1000);
        let some = c.heap_bytes();
        assert!(
            some >= empty + 1000 * size_of::<(FlowKey, u64)>(),
            "{some} bytes with 1000 tombstones, {empty} without"
        );
        delete_others(&mut c, 2, 1000, 2 * TOMBSTONES);
        let full = c.heap_bytes();
        assert!(full > some);
        // Churning further reuses the same room.
        delete_others(&mut c, 3, 1000 + 2 * TOMBSTONES, 2 * TOMBSTONES);
        assert_eq!(c.heap_bytes(), full);
    }

    #[test]
    fn remaining_timeout_ages() {
        let mut c = cache();
        c.apply_batch(
            batch(1, vec![(1, flow(1, 0))], vec![]),
            Duration::from_secs(10),
        );
        let f = c.get(&flow(1, 0).key).unwrap();
        assert_eq!(f.remaining_timeout(Duration::from_secs(40)), 70);
        assert_eq!(f.remaining_timeout(Duration::from_secs(400)), 0);
    }
}
