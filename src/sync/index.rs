//! The change index: every own flow (and recent deletion) ordered by a change counter.
//!
//! Peers are cursors into this order. Sending to a peer means walking from its cursor, reading
//! each flow's *current* state from the internal cache: a flow that changed ten times while a
//! peer was slow is sent once, in its latest state (coalescing), and the memory used for a slow or
//! dead peer is one cursor, never a queue. Deletions stay as tombstones until every peer has
//! passed them, or until there are too many, in which case lagging peers get a snapshot.

use crate::flow::FlowKey;
use crate::slab::{hash32, spread, Ix};
use hashbrown::hash_table::HashTable;
use hashbrown::DefaultHashBuilder;

/// What the index knows of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The key.
    pub key: FlowKey,
    /// Whether the flow is deleted (a tombstone).
    pub deleted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Live,
    Tombstone,
    /// Superseded by a later version of its key, or a collected tombstone: skipped, and
    /// removed at the next compaction.
    Dead,
}

/// One version of one key.
#[derive(Debug, Clone, Copy)]
struct Slot {
    version: u64,
    key: FlowKey,
    /// Seconds (engine clock) when the version was made, for the timeout refresh.
    stamp: u32,
    /// The flow's timeout at that moment, as peers received it.
    timeout: u32,
    state: SlotState,
}

/// Dead slots tolerated before a compaction, at least: small logs are not worth compacting.
const COMPACT_MIN: usize = 1024;

/// Own flows ordered by change counter.
///
/// A log of slots in version order, where a key's older versions are only marked dead (and
/// swept out once they make up half of the log, or a quarter before it outgrows its memory), and a hash table from each key to the
/// position of its current slot (rebuilt by the compaction, which moves slots). About 70 bytes
/// per flow, against ~230 for an ordered map plus a map of keys, and no scan of live flows to
/// collect tombstones.
#[derive(Debug)]
pub struct ChangeIndex {
    next: u64,
    slots: Vec<Slot>,
    dead: usize,
    /// Position in `slots` of each key's current slot.
    keys: HashTable<Ix>,
    hasher: DefaultHashBuilder,
    tombstones: usize,
    /// Tombstones up to this version were dropped: a peer behind it missed deletions.
    dropped_upto: u64,
    /// Tombstones up to this version have been collected (acknowledged by every peer).
    collected_upto: u64,
    /// See [`COMPACT_MIN`] (lower in tests, to exercise compaction).
    compact_min: usize,
    /// The longest the log has been in its current allocation: slots up to there are memory
    /// already touched (see [`ChangeIndex::maybe_compact`]).
    high_water: usize,
}

impl Default for ChangeIndex {
    fn default() -> Self {
        ChangeIndex::new()
    }
}

impl ChangeIndex {
    /// An empty index; versions start at 1 so that 0 means "nothing yet".
    pub fn new() -> ChangeIndex {
        ChangeIndex {
            next: 1,
            slots: Vec::new(),
            dead: 0,
            keys: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            tombstones: 0,
            dropped_upto: 0,
            collected_upto: 0,
            compact_min: COMPACT_MIN,
            high_water: 0,
        }
    }

    /// The current slot of `key`.
    fn current(&self, key: &FlowKey) -> Option<&Slot> {
        let h = hash32(&self.hasher, key);
        let slots = &self.slots;
        let ix = self.keys.find(spread(h), |ix| {
            ix.hash == h && slots[ix.slot as usize].key == *key
        })?;
        // A collected tombstone's entry stays until the next sweep (see `bury`).
        Some(&slots[ix.slot as usize]).filter(|s| s.state != SlotState::Dead)
    }

    /// Records a change of `key` at `now_secs`; returns its new version.
    pub fn touch(&mut self, key: FlowKey, deleted: bool, timeout: u32, now_secs: u64) -> u64 {
        let version = self.next;
        self.next += 1;
        let h = hash32(&self.hasher, &key);
        let pos = u32::try_from(self.slots.len()).expect("fewer than 2^32 slots");
        let slots = &mut self.slots;
        match self.keys.find_mut(spread(h), |ix| {
            ix.hash == h && slots[ix.slot as usize].key == key
        }) {
            Some(ix) => {
                let old = &mut slots[ix.slot as usize];
                // Dead already when it is a collected tombstone still filed (see `bury`).
                if old.state != SlotState::Dead {
                    self.tombstones -= usize::from(old.state == SlotState::Tombstone);
                    old.state = SlotState::Dead;
                    self.dead += 1;
                }
                ix.slot = pos;
            }
            None => {
                let ix = Ix { slot: pos, hash: h };
                self.keys.insert_unique(spread(h), ix, |ix| spread(ix.hash));
            }
        }
        slots.push(Slot {
            version,
            key,
            stamp: u32::try_from(now_secs).unwrap_or(u32::MAX),
            timeout,
            state: if deleted {
                SlotState::Tombstone
            } else {
                SlotState::Live
            },
        });
        self.tombstones += usize::from(deleted);
        self.maybe_compact();
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
        let start = self.slots.partition_point(|s| s.version <= after);
        self.slots[start..]
            .iter()
            .take_while(|s| s.version <= upto)
            .filter(|s| s.state != SlotState::Dead)
            .take(limit)
            .map(|s| {
                let e = IndexEntry {
                    key: s.key,
                    deleted: s.state == SlotState::Tombstone,
                };
                (s.version, e)
            })
            .collect()
    }

    /// Live (not deleted) flows indexed.
    pub fn live(&self) -> usize {
        self.slots.len() - self.dead - self.tombstones
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
        self.current(key).is_some_and(|s| {
            let peer_expiry = u64::from(s.stamp) + u64::from(s.timeout);
            now_secs + u64::from(timeout) > peer_expiry + slack
        })
    }

    /// Forgets tombstones every peer has acknowledged (`version <= acked_by_all`), and the oldest
    /// ones beyond `limit` regardless (the peers behind them will need a snapshot).
    ///
    /// Only the part of the log acknowledged since the last call is scanned.
    pub fn collect_tombstones(&mut self, acked_by_all: u64, limit: usize) {
        let upto = acked_by_all.min(self.last_version());
        if upto > self.collected_upto {
            let from = self
                .slots
                .partition_point(|s| s.version <= self.collected_upto);
            let to = self.slots.partition_point(|s| s.version <= upto);
            for i in from..to {
                if self.slots[i].state == SlotState::Tombstone {
                    self.bury(i);
                }
            }
            self.collected_upto = upto;
        }
        let mut i = 0;
        while self.tombstones > limit && i < self.slots.len() {
            if self.slots[i].state == SlotState::Tombstone {
                self.dropped_upto = self.dropped_upto.max(self.slots[i].version);
                self.bury(i);
            }
            i += 1;
        }
        self.maybe_compact();
    }

    /// Turns the tombstone at `i` into a dead slot.
    ///
    /// Its key stays filed, pointing at the dead slot, until the next sweep drops it with the
    /// slot: forgetting it here took a hash and a probe of the key table per deletion, a cache
    /// miss each, where the sweep only tests a bit it has already computed. Meanwhile a lookup
    /// of the key finds a dead slot, which counts as absent.
    fn bury(&mut self, i: usize) {
        self.slots[i].state = SlotState::Dead;
        self.tombstones -= 1;
        self.dead += 1;
    }

    /// Sweeps dead slots out once they are half of the log, or a quarter of it when the log is
    /// about to outgrow the memory it has used so far (amortised O(1) per change).
    ///
    /// In a burst of deletions every deleted flow leaves two dead slots (its last version, then
    /// its tombstone once acknowledged), and until the sweep the log grows by one slot per
    /// deletion, into memory it never touched. At half, deleting 250k flows grew the source's log
    /// by 83k slots (5 MiB, most of its peak memory above the steady state); a quarter caps that
    /// at 36k. Below the high-water mark the log reuses memory it already holds, and half keeps
    /// the sweeps (a copy of the log each) half as frequent.
    fn maybe_compact(&mut self) {
        let len = self.slots.len();
        let share = if len > self.high_water { 4 } else { 2 };
        self.high_water = self.high_water.max(len);
        if self.dead < self.compact_min || self.dead * share < len {
            return;
        }
        let renumbering = Renumbering::of(&self.slots);
        self.slots.retain(|s| s.state != SlotState::Dead);
        self.dead = 0;
        if self.slots.capacity() > 4 * self.slots.len().max(self.compact_min) {
            self.slots.shrink_to(2 * self.slots.len());
            self.high_water = self.high_water.min(self.slots.capacity());
        }
        // A key filed at a dead slot is a collected tombstone: it goes. Every other key's
        // current slot survived the sweep (only superseded versions and collected tombstones
        // are dead): move its position down, without hashing any key again.
        self.keys.retain(|ix| {
            let live = !renumbering.is_dead(ix.slot);
            if live {
                ix.slot = renumbering.apply(ix.slot);
            }
            live
        });
    }

    /// Heap bytes held (for status and benchmarks).
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>() + self.keys.allocation_size()
    }
}

/// Where each surviving slot lands when the dead ones are swept out: its position minus the
/// dead slots before it, counted from one bit per slot and a running count per 64 slots (~1.2
/// bits per slot of scratch, against 32 for a table of new positions).
struct Renumbering {
    dead: Vec<u64>,
    dead_before: Vec<u32>,
}

impl Renumbering {
    fn of(slots: &[Slot]) -> Renumbering {
        let mut dead = Vec::with_capacity(slots.len().div_ceil(64));
        let mut dead_before = Vec::with_capacity(dead.capacity());
        let mut count = 0u32;
        for block in slots.chunks(64) {
            let bits = block
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == SlotState::Dead)
                .fold(0u64, |bits, (i, _)| bits | 1 << i);
            dead.push(bits);
            dead_before.push(count);
            count += bits.count_ones();
        }
        Renumbering { dead, dead_before }
    }

    /// Whether the slot at `old` is swept out.
    fn is_dead(&self, old: u32) -> bool {
        let (block, bit) = (old as usize / 64, old % 64);
        self.dead[block] & (1u64 << bit) != 0
    }

    /// The new position of the surviving slot at `old`.
    fn apply(&self, old: u32) -> u32 {
        let (block, bit) = (old as usize / 64, old % 64);
        let below = self.dead[block] & ((1u64 << bit) - 1);
        old - self.dead_before[block] - below.count_ones()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::test_key as key;

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
    fn a_collected_tombstone_is_absent_and_leaves_the_key_table_at_the_sweep() {
        let mut ix = ChangeIndex::new();
        ix.touch(key(1), false, 30, 0);
        ix.touch(key(2), false, 30, 0);
        ix.touch(key(1), true, 0, 0);
        ix.touch(key(2), true, 0, 0);
        ix.collect_tombstones(4, 100);
        assert_eq!((ix.live(), ix.tombstones(), ix.dead), (0, 0, 4));
        assert!(ix.current(&key(1)).is_none());
        // Key 1 comes back before any sweep: its filed entry is reused, the dead slot is not
        // counted twice.
        assert_eq!(ix.touch(key(1), false, 30, 0), 5);
        assert_eq!((ix.live(), ix.tombstones(), ix.dead), (1, 0, 4));
        let entry = IndexEntry {
            key: key(1),
            deleted: false,
        };
        assert_eq!(ix.range(0, 5, 10), vec![(5, entry)]);
        ix.compact_min = 1;
        ix.maybe_compact();
        assert_eq!(
            (ix.slots.len(), ix.keys.len()),
            (1, 1),
            "key 2 went with its slot"
        );
        assert_eq!(ix.current(&key(1)).map(|s| s.version), Some(5));
        assert!(ix.current(&key(2)).is_none());
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

    #[test]
    fn compaction_keeps_versions_and_order() {
        let mut ix = ChangeIndex::new();
        for round in 0..10u64 {
            for p in 0..500 {
                ix.touch(key(p), false, 30, round);
            }
        }
        assert!(
            ix.slots.len() < 5000,
            "dead versions were swept: {}",
            ix.slots.len()
        );
        let r = ix.range(0, ix.last_version(), usize::MAX);
        assert_eq!(r.len(), 500);
        assert_eq!(r[0].0, 4501);
        assert!(r.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(ix.timeout_stale(&key(7), 100, 9, 30));
    }

    #[test]
    fn renumbering_moves_each_survivor_down_by_the_dead_before_it() {
        let mut ix = ChangeIndex::new();
        for p in 0..200 {
            ix.touch(key(p), false, 30, 0);
        }
        // Supersede every third key's slot (positions 0, 3, ... 198 die).
        for p in (0..200).step_by(3) {
            ix.touch(key(p), false, 30, 0);
        }
        let r = Renumbering::of(&ix.slots);
        let mut expected = 0u32;
        for (old, slot) in ix.slots.iter().enumerate() {
            if slot.state != SlotState::Dead {
                assert_eq!(r.apply(old as u32), expected, "slot {old}");
                expected += 1;
            }
        }
        assert_eq!(expected as usize, ix.slots.len() - ix.dead);
    }

    proptest::proptest! {
        /// The log behaves like a plain map of key -> (version, deleted) with tombstones
        /// collected as the old ordered-map index did.
        #[test]
        fn behaves_like_a_model(ops in proptest::collection::vec((0u16..40, 0u8..10, 0usize..50), 1..400)) {
            let mut ix = ChangeIndex::new();
            ix.compact_min = 3;
            let mut model: std::collections::HashMap<FlowKey, (u64, bool)> = Default::default();
            let mut dropped = 0;
            for (k, op, arg) in ops {
                if op < 8 {
                    let deleted = op >= 6;
                    let v = ix.touch(key(k), deleted, 30, 0);
                    model.insert(key(k), (v, deleted));
                } else {
                    let last = ix.last_version();
                    let acked = last.saturating_sub(arg as u64);
                    let limit = arg % 7;
                    ix.collect_tombstones(acked, limit);
                    model.retain(|_, (v, d)| !(*d && *v <= acked));
                    let mut tombs: Vec<u64> =
                        model.values().filter(|(_, d)| *d).map(|(v, _)| *v).collect();
                    tombs.sort_unstable();
                    let excess = tombs.len().saturating_sub(limit);
                    for v in &tombs[..excess] {
                        dropped = dropped.max(*v);
                    }
                    model.retain(|_, (v, d)| !(*d && tombs[..excess].contains(v)));
                }
                let mut want: Vec<(u64, IndexEntry)> = model
                    .iter()
                    .map(|(k, (v, d))| (*v, IndexEntry { key: *k, deleted: *d }))
                    .collect();
                want.sort_by_key(|e| e.0);
                proptest::prop_assert_eq!(ix.range(0, ix.last_version(), usize::MAX), want);
                proptest::prop_assert_eq!(ix.dropped_upto(), dropped);
                let tombs = model.values().filter(|(_, d)| *d).count();
                proptest::prop_assert_eq!(ix.tombstones(), tombs);
                proptest::prop_assert_eq!(ix.live(), model.len() - tombs);
                for (k, (v, _)) in &model {
                    proptest::prop_assert_eq!(ix.current(k).map(|s| s.version), Some(*v));
                }
            }
        }
    }
}
