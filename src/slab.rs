//! A compact map from [`FlowKey`] to values that carry their own key.
//!
//! The big flow stores (the kernel mirror, the per-peer external caches) used to keep their
//! elements inline in a hash table. A hash table keeps at least 1/8 of its buckets empty and
//! doubles when full, so right after a doubling almost half of it is empty buckets: with elements
//! of ~200 bytes that was most of the memory per flow, and a doubling briefly held the old and
//! the new table.
//!
//! [`KeyedSlab`] instead keeps the values densely in fixed-size chunks and indexes them with a
//! hash table of slot numbers (8 bytes with 32 bits of the key's hash). Empty buckets then cost
//! 9 bytes instead of ~200, growing never copies the values (a new chunk is added), and removal
//! moves the last value into the hole so the storage stays dense and chunks are released as the
//! store shrinks.
//!
//! Each slot also keeps its key's 32-bit hash (4 bytes per value, in an array beside the
//! values): moving the last value into a hole must find that value's index entry, and rehashing
//! its key for that was a measurable part of every removal.

use crate::flow::{Flow, FlowKey};
use hashbrown::hash_table::{Entry as IndexEntry, HashTable, VacantEntry as IndexVacant};
use hashbrown::DefaultHashBuilder;
use std::fmt;
use std::hash::BuildHasher;
use std::mem::size_of;

/// A value that carries the key it is stored under.
pub trait Keyed {
    /// The key. It must not change while the value is stored (see [`KeyedSlab::get_mut`]).
    fn key(&self) -> &FlowKey;
}

impl Keyed for Flow {
    fn key(&self) -> &FlowKey {
        &self.key
    }
}

/// Values per chunk by default: big enough that the chunk list is negligible, small enough
/// that the one partly filled chunk (and the one spare) waste little.
pub const DEFAULT_CHUNK: usize = 1024;

/// A map from [`FlowKey`] to values keyed by it, stored densely in chunks of `CHUNK` values.
///
/// Slot `i` lives at `chunks[i / CHUNK].values[i % CHUNK]`; slots `0..len` are all occupied.
/// The index hashes keys with [`DefaultHashBuilder`] (foldhash, randomly seeded per store), so
/// that peers cannot choose keys that collide. Iteration order is unspecified and changes on
/// removal.
///
/// Capacity is bounded by `u32` slot numbers (4 billion values, far beyond any conntrack table
/// that fits in memory).
pub struct KeyedSlab<T, const CHUNK: usize = DEFAULT_CHUNK> {
    /// Value storage; every chunk is allocated with room for exactly `CHUNK` values, so pushing
    /// never reallocates. At most one chunk past the last occupied one is kept (a spare).
    chunks: Vec<Chunk<T>>,
    /// Slot numbers with their key's hash: growing the index rehashes from the stored hash,
    /// without reading every value (a cache miss each, which was most of a rehash).
    index: HashTable<Ix>,
    hasher: DefaultHashBuilder,
    len: usize,
}

/// `CHUNK` slots: the values and, in lock-step (same length), their keys' hashes.
///
/// The hashes are a separate array rather than a field beside each value: a `(u32, T)` would
/// cost the value's alignment (8 bytes for a flow) instead of 4.
struct Chunk<T> {
    values: Vec<T>,
    hashes: Vec<u32>,
}

impl<T> Chunk<T> {
    fn with_capacity(n: usize) -> Self {
        Chunk {
            values: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
        }
    }

    fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn heap_bytes(&self) -> usize {
        self.values.capacity() * size_of::<T>() + self.hashes.capacity() * size_of::<u32>()
    }
}

/// An index entry: a slot number and 32 bits of its key's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ix {
    pub(crate) slot: u32,
    pub(crate) hash: u32,
}

/// The 64-bit hash the index works with, rebuilt from 32 stored bits: hashbrown takes the
/// bucket from the low bits and its tag byte from the top 7, both present here.
pub(crate) fn spread(hash: u32) -> u64 {
    (u64::from(hash) << 32) | u64::from(hash)
}

/// 32 bits of a key's hash, as stored in an [`Ix`].
pub(crate) fn hash32(hasher: &DefaultHashBuilder, key: &FlowKey) -> u32 {
    let h = hasher.hash_one(key);
    (h ^ (h >> 32)) as u32
}

/// Where a key stands in a [`KeyedSlab`], from [`KeyedSlab::entry`].
pub enum Entry<'a, T, const CHUNK: usize = DEFAULT_CHUNK> {
    /// The key is stored: its value.
    Occupied(&'a mut T),
    /// The key is absent: a place to insert it without hashing again.
    Vacant(VacantEntry<'a, T, CHUNK>),
}

/// An absent key of a [`KeyedSlab`], ready to be inserted.
pub struct VacantEntry<'a, T, const CHUNK: usize = DEFAULT_CHUNK> {
    entry: IndexVacant<'a, Ix>,
    hash: u32,
    chunks: &'a mut Vec<Chunk<T>>,
    len: &'a mut usize,
}

impl<T, const CHUNK: usize> Default for KeyedSlab<T, CHUNK> {
    fn default() -> Self {
        KeyedSlab {
            chunks: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            len: 0,
        }
    }
}

impl<T: Clone, const CHUNK: usize> Clone for KeyedSlab<T, CHUNK> {
    /// Clones chunk by chunk so the copy keeps full-size chunks (a cloned `Vec` would be shrunk
    /// to its length, and the partly filled one would then grow by reallocating). The hasher
    /// seed is kept: the index is only valid with it.
    fn clone(&self) -> Self {
        let chunks = self
            .chunks
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                let mut copy = Chunk::with_capacity(CHUNK);
                copy.values.extend(c.values.iter().cloned());
                copy.hashes.extend_from_slice(&c.hashes);
                copy
            })
            .collect();
        KeyedSlab {
            chunks,
            index: self.index.clone(),
            hasher: self.hasher,
            len: self.len,
        }
    }
}

impl<T: fmt::Debug, const CHUNK: usize> fmt::Debug for KeyedSlab<T, CHUNK> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.chunks.iter().flat_map(|c| &c.values))
            .finish()
    }
}

/// The value in `slot` (which must be below the store's length).
fn at<T, const CHUNK: usize>(chunks: &[Chunk<T>], slot: usize) -> &T {
    &chunks[slot / CHUNK].values[slot % CHUNK]
}

/// The value in `slot`, mutably (which must be below the store's length).
fn at_mut<T, const CHUNK: usize>(chunks: &mut [Chunk<T>], slot: usize) -> &mut T {
    &mut chunks[slot / CHUNK].values[slot % CHUNK]
}

/// The key hash stored for `slot` (which must be below the store's length).
fn hash_at<T, const CHUNK: usize>(chunks: &[Chunk<T>], slot: usize) -> u32 {
    chunks[slot / CHUNK].hashes[slot % CHUNK]
}

/// The slot number of the value about to be appended to a store of `len` values.
fn next_slot(len: usize) -> u32 {
    u32::try_from(len).expect("KeyedSlab holds at most u32::MAX values")
}

/// Appends `value` with its key's hash at slot `len`, adding a chunk when the last one is full.
fn push<T, const CHUNK: usize>(
    chunks: &mut Vec<Chunk<T>>,
    len: usize,
    hash: u32,
    value: T,
) -> &mut T {
    let c = len / CHUNK;
    if c == chunks.len() {
        chunks.push(Chunk::with_capacity(CHUNK));
    }
    let chunk = &mut chunks[c];
    chunk.hashes.push(hash);
    chunk.values.push(value);
    let last = chunk.values.len() - 1;
    &mut chunk.values[last]
}

impl<T: Keyed, const CHUNK: usize> KeyedSlab<T, CHUNK> {
    /// An empty store; allocates nothing until the first insertion.
    pub fn new() -> Self {
        Self::default()
    }

    fn hash(&self, key: &FlowKey) -> u32 {
        hash32(&self.hasher, key)
    }

    /// The hash this store files `key` under, for the `*_hashed` methods: a caller that also
    /// files the key elsewhere (under the same hash) then hashes it once. Stable for the life
    /// of the store, [`KeyedSlab::clear`] included; clones share it.
    pub fn hash_key(&self, key: &FlowKey) -> u32 {
        self.hash(key)
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot holding `key`.
    fn find(&self, key: &FlowKey) -> Option<usize> {
        let chunks = &self.chunks;
        let h = self.hash(key);
        self.index
            .find(spread(h), |ix| {
                ix.hash == h && at::<T, CHUNK>(chunks, ix.slot as usize).key() == key
            })
            .map(|ix| ix.slot as usize)
    }

    /// The value in `slot` (slots are `0..len`), for walks that must survive changes between
    /// their steps: a removal moves the last value into the hole, so a walk from the last slot
    /// down never misses a value that stays stored (it may meet a moved one twice), and values
    /// inserted meanwhile land above it.
    pub fn get_slot(&self, slot: usize) -> Option<&T> {
        (slot < self.len).then(|| at::<T, CHUNK>(&self.chunks, slot))
    }

    /// Looks a value up.
    pub fn get(&self, key: &FlowKey) -> Option<&T> {
        self.find(key).map(|s| at::<T, CHUNK>(&self.chunks, s))
    }

    /// Looks a value up for changing it. The caller must not change its key: the value would
    /// then be stored under the wrong hash, unreachable by its new key.
    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut T> {
        self.find(key)
            .map(|s| at_mut::<T, CHUNK>(&mut self.chunks, s))
    }

    /// Whether `key` is stored.
    pub fn contains_key(&self, key: &FlowKey) -> bool {
        self.find(key).is_some()
    }

    /// The value stored under `key`, or a place to insert one: one hash and one probe for a
    /// read-modify-or-insert.
    pub fn entry(&mut self, key: &FlowKey) -> Entry<'_, T, CHUNK> {
        let h = self.hash(key);
        self.entry_hashed(key, h)
    }

    /// [`KeyedSlab::entry`] with the key's hash already known: `h` must be
    /// [`KeyedSlab::hash_key`] of `key` (else the key is filed where it cannot be found).
    pub fn entry_hashed(&mut self, key: &FlowKey, h: u32) -> Entry<'_, T, CHUNK> {
        debug_assert_eq!(h, self.hash(key), "KeyedSlab: hash of another store");
        let KeyedSlab {
            chunks, index, len, ..
        } = self;
        let found = {
            let view: &[Chunk<T>] = chunks;
            index.entry(
                spread(h),
                |ix| ix.hash == h && at::<T, CHUNK>(view, ix.slot as usize).key() == key,
                |ix| spread(ix.hash),
            )
        };
        match found {
            IndexEntry::Occupied(e) => {
                Entry::Occupied(at_mut::<T, CHUNK>(chunks, e.get().slot as usize))
            }
            IndexEntry::Vacant(entry) => Entry::Vacant(VacantEntry {
                entry,
                hash: h,
                chunks,
                len,
            }),
        }
    }

    /// Inserts a value under its key; returns the value it replaces, if any.
    pub fn insert(&mut self, value: T) -> Option<T> {
        let key = *value.key();
        match self.entry(&key) {
            Entry::Occupied(cur) => Some(std::mem::replace(cur, value)),
            Entry::Vacant(e) => {
                e.insert(value);
                None
            }
        }
    }

    /// Removes the value stored under `key`.
    pub fn remove(&mut self, key: &FlowKey) -> Option<T> {
        self.remove_if(key, |_| true)
    }

    /// Removes the value stored under `key` if `pred` accepts it: a conditional delete with one
    /// hash and one probe.
    pub fn remove_if(&mut self, key: &FlowKey, pred: impl FnOnce(&T) -> bool) -> Option<T> {
        let h = self.hash(key);
        self.remove_if_hashed(key, h, pred)
    }

    /// [`KeyedSlab::remove_if`] with the key's hash already known: `h` must be
    /// [`KeyedSlab::hash_key`] of `key` (else nothing is found).
    pub fn remove_if_hashed(
        &mut self,
        key: &FlowKey,
        h: u32,
        pred: impl FnOnce(&T) -> bool,
    ) -> Option<T> {
        debug_assert_eq!(h, self.hash(key), "KeyedSlab: hash of another store");
        let chunks = &self.chunks;
        let e = self
            .index
            .find_entry(spread(h), |ix| {
                ix.hash == h && at::<T, CHUNK>(chunks, ix.slot as usize).key() == key
            })
            .ok()?;
        if !pred(at::<T, CHUNK>(chunks, e.get().slot as usize)) {
            return None;
        }
        let (ix, _) = e.remove();
        Some(self.take_slot(ix.slot as usize))
    }

    /// Takes the value out of `slot`, whose index entry the caller already removed: the last
    /// value moves into the hole (its index entry follows it), then spare chunks are released.
    fn take_slot(&mut self, slot: usize) -> T {
        let last = self.len - 1;
        let tail = &mut self.chunks[last / CHUNK];
        let moved = tail
            .values
            .pop()
            .expect("KeyedSlab: the last slot is occupied");
        let moved_hash = tail.hashes.pop().expect("KeyedSlab: hashes match values");
        self.len = last;
        let out = if slot == last {
            moved
        } else {
            if let Some(ix) = self
                .index
                .find_mut(spread(moved_hash), |ix| ix.slot as usize == last)
            {
                ix.slot = slot as u32;
            }
            let chunk = &mut self.chunks[slot / CHUNK];
            chunk.hashes[slot % CHUNK] = moved_hash;
            std::mem::replace(&mut chunk.values[slot % CHUNK], moved)
        };
        self.release_spare();
        out
    }

    /// Frees chunks beyond the one spare past the occupied ones, and shrinks the index once it
    /// is mostly empty (to twice the length, so that shrinking again needs many removals).
    fn release_spare(&mut self) {
        let keep = self.len.div_ceil(CHUNK) + 1;
        if self.chunks.len() > keep {
            self.chunks.truncate(keep);
        }
        if self.index.capacity() > 64 && self.len * 4 < self.index.capacity() {
            self.index.shrink_to(self.len * 2, |ix| spread(ix.hash));
        }
    }

    /// Keeps only the values for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut slot = 0;
        while slot < self.len {
            if keep(at::<T, CHUNK>(&self.chunks, slot)) {
                slot += 1;
                continue;
            }
            // The slot now holds what was the last value: look at it again.
            let h = hash_at::<T, CHUNK>(&self.chunks, slot);
            if let Ok(e) = self
                .index
                .find_entry(spread(h), |ix| ix.slot as usize == slot)
            {
                e.remove();
            }
            self.take_slot(slot);
        }
    }

    /// Makes room for `additional` more values in the index, so that filling the store from a
    /// dump of known size does not rehash on the way.
    pub fn reserve(&mut self, additional: usize) {
        self.index.reserve(additional, |ix| spread(ix.hash));
    }

    /// Iterates in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|c| &c.values)
    }

    /// Iterates mutably in no particular order. The caller must not change keys (see
    /// [`KeyedSlab::get_mut`]).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flat_map(|c| &mut c.values)
    }

    /// Removes every value and frees all storage (the hasher seed stays).
    pub fn clear(&mut self) {
        self.chunks = Vec::new();
        self.index = HashTable::new();
        self.len = 0;
    }

    /// Heap bytes of the store itself: chunks (values and their hashes), chunk list and index.
    /// What the values own (boxed attributes) is theirs to count.
    pub fn heap_bytes(&self) -> usize {
        let chunks: usize = self.chunks.iter().map(Chunk::heap_bytes).sum();
        chunks + self.chunks.capacity() * size_of::<Chunk<T>>() + self.index.allocation_size()
    }

    /// Panics unless every slot holds its key's hash and the index finds each key at its slot.
    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.index.len(), self.len);
        assert_eq!(self.iter().count(), self.len);
        assert!(self.chunks.iter().all(|c| c.hashes.len() == c.values.len()));
        for slot in 0..self.len {
            let key = at::<T, CHUNK>(&self.chunks, slot).key();
            assert_eq!(hash_at::<T, CHUNK>(&self.chunks, slot), self.hash(key));
            assert_eq!(self.find(key), Some(slot));
        }
    }
}

impl<'a, T: Keyed, const CHUNK: usize> VacantEntry<'a, T, CHUNK> {
    /// Inserts `value`, which must carry the key the entry was looked up with.
    pub fn insert(self, value: T) -> &'a mut T {
        let slot = next_slot(*self.len);
        self.entry.insert(Ix {
            slot,
            hash: self.hash,
        });
        let stored = push::<T, CHUNK>(self.chunks, *self.len, self.hash, value);
        *self.len += 1;
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{test_key as key, L4};
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone, PartialEq)]
    struct Item {
        key: FlowKey,
        val: u32,
    }

    impl Keyed for Item {
        fn key(&self) -> &FlowKey {
            &self.key
        }
    }

    fn item(port: u16, val: u32) -> Item {
        Item {
            key: key(port),
            val,
        }
    }

    /// Small chunks, so that tests cross chunk boundaries.
    type Small = KeyedSlab<Item, 4>;

    fn sorted(s: &Small) -> Vec<(u16, u32)> {
        let mut v: Vec<(u16, u32)> = s
            .iter()
            .map(|i| match i.key.orig.l4 {
                L4::Ports { src, .. } => (src, i.val),
                _ => (0, i.val),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn insert_replace_get_remove() {
        let mut s = Small::new();
        assert!(s.is_empty());
        assert_eq!(s.insert(item(1, 10)), None);
        assert_eq!(s.insert(item(2, 20)), None);
        assert_eq!(s.insert(item(1, 11)), Some(item(1, 10)));
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(&key(1)).map(|i| i.val), Some(11));
        s.get_mut(&key(2)).unwrap().val = 21;
        assert_eq!(s.remove_if(&key(2), |i| i.val == 20), None);
        assert_eq!(s.remove_if(&key(2), |i| i.val == 21), Some(item(2, 21)));
        assert_eq!(s.remove(&key(2)), None);
        assert_eq!(sorted(&s), vec![(1, 11)]);
        assert!(s.contains_key(&key(1)) && !s.contains_key(&key(3)));
    }

    #[test]
    fn removing_a_middle_value_keeps_the_moved_one_reachable() {
        let mut s = Small::new();
        for p in 0..10 {
            s.insert(item(p, p.into()));
        }
        // Slot 3 is refilled from the last slot (port 9): it must still be found, updated
        // and removed through its own key.
        assert_eq!(s.remove(&key(3)).map(|i| i.val), Some(3));
        assert_eq!(s.get(&key(9)).map(|i| i.val), Some(9));
        s.get_mut(&key(9)).unwrap().val = 90;
        assert_eq!(s.remove(&key(9)).map(|i| i.val), Some(90));
        assert_eq!(s.len(), 8);
        for p in (0..9).filter(|&p| p != 3) {
            assert_eq!(s.get(&key(p)).map(|i| i.val), Some(p.into()));
        }
    }

    #[test]
    fn many_keys() {
        let mut s: KeyedSlab<Item> = KeyedSlab::new();
        for p in 0..50_000u16 {
            s.insert(item(p, p.into()));
        }
        assert_eq!(s.len(), 50_000);
        for p in (0..50_000u16).step_by(3) {
            assert!(s.remove(&key(p)).is_some());
        }
        for p in 0..50_000u16 {
            let want = (p % 3 != 0).then_some(u32::from(p));
            assert_eq!(s.get(&key(p)).map(|i| i.val), want, "port {p}");
        }
        assert_eq!(s.iter().count(), s.len());
    }

    #[test]
    fn entry_inserts_or_updates() {
        let mut s = Small::new();
        for round in 0..2 {
            match s.entry(&key(5)) {
                Entry::Occupied(cur) => cur.val += 1,
                Entry::Vacant(e) => e.insert(item(5, 100)).val += round,
            }
        }
        assert_eq!(s.get(&key(5)).map(|i| i.val), Some(101));
    }

    #[test]
    fn retain_removes_and_keeps_the_rest_reachable() {
        let mut s = Small::new();
        for p in 0..30 {
            s.insert(item(p, p.into()));
        }
        s.retain(|i| i.val % 3 == 0);
        assert_eq!(s.len(), 10);
        for p in 0..30 {
            assert_eq!(s.contains_key(&key(p)), p % 3 == 0, "port {p}");
        }
    }

    #[test]
    fn heap_bytes_grows_and_shrinks() {
        let mut s: KeyedSlab<Item> = KeyedSlab::new();
        assert_eq!(s.heap_bytes(), 0);
        for p in 0..10_000 {
            s.insert(item(p, 0));
        }
        let full = s.heap_bytes();
        // Each value with its key's hash.
        let values = 10_000 * (size_of::<Item>() + size_of::<u32>());
        assert!(full >= values && full < values * 2, "{full} for {values}");
        for p in 0..9_000 {
            s.remove(&key(p));
        }
        let after = s.heap_bytes();
        assert!(after < full / 4, "{after} after removals, {full} full");
        s.clear();
        assert_eq!(s.heap_bytes(), 0);
        assert!(s.is_empty() && s.iter().next().is_none());
        s.insert(item(1, 1));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn clone_is_independent_and_equal() {
        let mut s = Small::new();
        for p in 0..9 {
            s.insert(item(p, p.into()));
        }
        let mut c = s.clone();
        c.remove(&key(0));
        c.insert(item(20, 20));
        assert_eq!(s.len(), 9);
        assert_eq!(c.get(&key(20)).map(|i| i.val), Some(20));
        assert_eq!(c.get(&key(8)).map(|i| i.val), Some(8));
    }

    #[test]
    fn options_of_stored_values_need_no_extra_room() {
        // Chunks could hold `Option<T>` for free slots: worth knowing it costs nothing.
        assert_eq!(size_of::<Option<Flow>>(), size_of::<Flow>());
    }

    #[test]
    fn hashed_variants_match_the_plain_ones() {
        let mut s = Small::new();
        for p in 0..10 {
            let h = s.hash_key(&key(p));
            match s.entry_hashed(&key(p), h) {
                Entry::Vacant(e) => e.insert(item(p, p.into())),
                Entry::Occupied(_) => unreachable!("port {p} inserted twice"),
            };
        }
        let h = s.hash_key(&key(2));
        assert_eq!(s.remove_if_hashed(&key(2), h, |i| i.val == 7), None);
        assert_eq!(s.remove_if_hashed(&key(2), h, |_| true), Some(item(2, 2)));
        // The hash survives clearing: callers may keep hashes filed elsewhere.
        let before = s.hash_key(&key(3));
        s.clear();
        assert_eq!(s.hash_key(&key(3)), before);
        assert_eq!(s.clone().hash_key(&key(3)), before);
        s.check();
    }

    #[test]
    fn clone_keeps_hashes_for_later_removals() {
        let mut s = Small::new();
        for p in 0..11 {
            s.insert(item(p, p.into()));
        }
        let mut c = s.clone();
        c.check();
        // Every removal but the last moves a value, whose stored hash must have been copied.
        for p in 0..11 {
            assert_eq!(c.remove(&key(p)).map(|i| i.val), Some(p.into()));
            c.check();
        }
        assert_eq!(s.len(), 11);
        s.check();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
        /// Removes through the hash-reusing variant if the value is a multiple.
        RemoveIf(u16, u32),
        Update(u16, u32),
        Retain(u32),
        Clone,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..64u16, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            4 => (0..64u16).prop_map(Op::Remove),
            2 => (0..64u16, 1..3u32).prop_map(|(k, m)| Op::RemoveIf(k, m)),
            2 => (0..64u16, any::<u32>()).prop_map(|(k, v)| Op::Update(k, v)),
            1 => (2..5u32).prop_map(Op::Retain),
            1 => Just(Op::Clone),
            1 => Just(Op::Clear),
        ]
    }

    fn apply(s: &mut Small, model: &mut HashMap<FlowKey, u32>, op: &Op) {
        match *op {
            Op::Insert(k, v) => {
                let old = s.insert(item(k, v)).map(|i| i.val);
                assert_eq!(old, model.insert(key(k), v));
            }
            Op::Remove(k) => {
                let old = s.remove(&key(k)).map(|i| i.val);
                assert_eq!(old, model.remove(&key(k)));
            }
            Op::RemoveIf(k, m) => {
                let h = s.hash_key(&key(k));
                let old = s.remove_if_hashed(&key(k), h, |i| i.val % m == 0);
                let want = model.get(&key(k)).is_some_and(|v| v % m == 0);
                let want = if want { model.remove(&key(k)) } else { None };
                assert_eq!(old.map(|i| i.val), want);
            }
            Op::Update(k, v) => {
                if let Some(i) = s.get_mut(&key(k)) {
                    i.val = v;
                }
                if let Some(m) = model.get_mut(&key(k)) {
                    *m = v;
                }
            }
            Op::Retain(m) => {
                s.retain(|i| i.val % m != 0);
                model.retain(|_, v| *v % m != 0);
            }
            Op::Clone => *s = s.clone(),
            Op::Clear => {
                s.clear();
                model.clear();
            }
        }
    }

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec(op(), 0..300)) {
            let mut s = Small::new();
            let mut model = HashMap::new();
            for op in &ops {
                apply(&mut s, &mut model, op);
                prop_assert_eq!(s.len(), model.len());
                s.check();
            }
            for k in 0..64 {
                prop_assert_eq!(s.get(&key(k)).map(|i| i.val), model.get(&key(k)).copied());
            }
            let got: HashMap<FlowKey, u32> = s.iter().map(|i| (i.key, i.val)).collect();
            prop_assert_eq!(s.iter().count(), got.len());
            prop_assert_eq!(got, model);
        }
    }
}
