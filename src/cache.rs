//! Flow caches and the kernel mirror state machine. Plain Rust: no sockets, no clock.
//!
//! [`FlowTable`] stores flows keyed by their own [`FlowKey`] (no key stored twice). [`Mirror`]
//! keeps a table equal to the kernel's: it applies events, and after an overrun (or at start)
//! reconciles against a dump, replaying the events that arrived while the dump ran so that the
//! result is exact, and reporting only the flows that really changed.

use crate::flow::{Flow, FlowKey, Present};
use crate::netlink::{CtEventKind, CtMessage};
use crate::slab::{Entry, KeyedSlab};
use std::borrow::Cow;

/// A set of flows indexed by zone and original tuple.
///
/// Flows live in a [`KeyedSlab`] (dense chunks plus an index of slot numbers) rather than inline
/// in a hash table, whose empty buckets would each cost a whole flow.
#[derive(Debug, Default, Clone)]
pub struct FlowTable {
    table: KeyedSlab<Flow>,
    /// Heap bytes owned by the flows' boxed attributes, kept up to date on every change:
    /// `syncctl status` must not walk a table of millions of flows (monitoring polls it).
    boxed: usize,
}

impl FlowTable {
    /// An empty table.
    pub fn new() -> FlowTable {
        FlowTable::default()
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Looks a flow up.
    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.table.get(key)
    }

    /// Inserts or replaces a flow; returns the previous one.
    pub fn insert(&mut self, flow: Flow) -> Option<Flow> {
        self.boxed += flow.heap_bytes();
        let old = self.table.insert(flow);
        self.boxed -= old.as_ref().map_or(0, Flow::heap_bytes);
        old
    }

    /// Removes a flow.
    pub fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let old = self.table.remove(key);
        self.boxed -= old.as_ref().map_or(0, Flow::heap_bytes);
        old
    }

    /// Merges a partial update into an existing flow, or inserts it when unknown.
    ///
    /// Returns whether the flow's state (everything but the timeout) changed.
    pub fn merge(&mut self, flow: &Flow, present: Present) -> bool {
        self.merge_cow(Cow::Borrowed(flow), present)
    }

    /// [`FlowTable::merge`] of a flow the caller no longer needs: an unknown flow is moved in,
    /// not copied (most events are creations of unknown flows).
    pub fn merge_owned(&mut self, flow: Flow, present: Present) -> bool {
        self.merge_cow(Cow::Owned(flow), present)
    }

    fn merge_cow(&mut self, flow: Cow<'_, Flow>, present: Present) -> bool {
        match self.table.entry(&flow.key) {
            Entry::Occupied(cur) => {
                let before = cur.clone();
                cur.merge(&flow, present);
                self.boxed = self.boxed - before.heap_bytes() + cur.heap_bytes();
                !cur.same_state(&before)
            }
            Entry::Vacant(e) => {
                self.boxed += flow.heap_bytes();
                e.insert(flow.into_owned());
                true
            }
        }
    }

    /// Inserts `flow` unless its key is present; returns whether it was inserted.
    pub fn insert_new(&mut self, flow: Flow) -> bool {
        match self.table.entry(&flow.key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(e) => {
                self.boxed += flow.heap_bytes();
                e.insert(flow);
                true
            }
        }
    }

    /// Iterates in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.table.iter()
    }

    /// Removes every flow.
    pub fn clear(&mut self) {
        self.table.clear();
        self.boxed = 0;
    }

    /// Makes room for `additional` more flows, so that loading a dump does not rehash.
    pub fn reserve(&mut self, additional: usize) {
        self.table.reserve(additional);
    }

    /// Bytes of heap the table uses (value chunks and index, plus boxed attributes).
    pub fn heap_bytes(&self) -> usize {
        self.table.heap_bytes() + self.boxed
    }
}

/// Heap bytes a flow owns through its boxed rare attributes.
pub(crate) fn boxed_bytes(f: &Flow) -> usize {
    f.heap_bytes()
}

/// A change of the mirrored table, for the replication layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The flow is new or its state changed; read its current state from the table.
    Upsert(FlowKey),
    /// The flow is gone.
    Remove(FlowKey),
}

/// What the caller must do next for the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorAction {
    /// Nothing.
    None,
    /// Start a full dump of the kernel table and hand it to [`Mirror::dump_complete`].
    StartDump,
}

/// Counters of the mirror, shown by `syncctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MirrorStats {
    /// Events applied.
    pub events: u64,
    /// NEW events.
    pub events_new: u64,
    /// UPDATE events.
    pub events_update: u64,
    /// DESTROY events.
    pub events_destroy: u64,
    /// Events caused by our own writes.
    pub events_own: u64,
    /// Flows we created and applied here directly, their events being dropped in the kernel
    /// (see [`Mirror::own_creations`]).
    #[serde(default)]
    pub own_creations: u64,
    /// Overruns (`ENOBUFS`) signalled by the kernel.
    pub overruns: u64,
    /// Events that could not be decoded.
    pub undecodable: u64,
    /// Reconciliations against a full dump completed (the initial one included).
    pub resyncs: u64,
    /// Flows found changed, added or removed by reconciliations after the initial one.
    pub resync_repairs: u64,
    /// Events that arrived after a reconciliation had grown past its replay bound.
    pub replay_overflows: u64,
    /// Promotions whose commit ran with creation events muted, each followed by a re-read of
    /// the table (see [`Mirror::creations_unheard`]).
    #[serde(default)]
    pub creations_muted: u64,
}

/// Bound on the events kept for replay while a dump runs; past it the dump is redone.
const REPLAY_LIMIT: usize = 4_000_000;

/// The internal cache: an exact mirror of the local kernel table.
#[derive(Debug, Default)]
pub struct Mirror {
    table: FlowTable,
    /// Events received since the running dump started, replayed on top of its result.
    replay: Option<Vec<CtMessage>>,
    /// Another overrun happened while the dump ran: its result may miss changes.
    dump_again: bool,
    synced: bool,
    stats: MirrorStats,
}

impl Mirror {
    /// An empty, not yet synced mirror.
    pub fn new() -> Mirror {
        Mirror::default()
    }

    /// Starts the initial synchronisation. Subscribe to events before dumping, so nothing is
    /// missed between the dump and the first event.
    pub fn start(&mut self) -> MirrorAction {
        self.request_dump()
    }

    /// Whether the mirror has completed a reconciliation and seen no overrun since.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Whether a dump is running.
    pub fn dump_running(&self) -> bool {
        self.replay.is_some()
    }

    /// The mirrored flows.
    pub fn table(&self) -> &FlowTable {
        &self.table
    }

    /// Counters.
    pub fn stats(&self) -> &MirrorStats {
        &self.stats
    }

    /// Applies one kernel event; returns the resulting change, if the state changed.
    ///
    /// `own` events (caused by our own writes) are applied but not reported, so that what a
    /// peer sent us is never replicated back as if it were local traffic.
    pub fn event(&mut self, msg: CtMessage, own: bool) -> Option<Change> {
        self.count(&msg, own);
        let Some(log) = &mut self.replay else {
            return apply_owned(&mut self.table, msg).filter(|_| !own);
        };
        let change = apply(&mut self.table, &msg);
        if log.len() < REPLAY_LIMIT {
            log.push(msg);
        } else {
            // The running dump's result can no longer be completed exactly: redo it.
            self.stats.replay_overflows += 1;
            self.dump_again = true;
        }
        change.filter(|_| !own)
    }

    /// We are about to create `flows` in the kernel. Those the mirror does not hold are applied
    /// now, as their creation events would be, and returned first ("fresh"): the writer creates
    /// them through its quiet sockets, whose creation events the kernel drops before they reach
    /// the event socket. Those the mirror holds are returned second, to be written through the
    /// other socket: their kernel entry may be changing, and only its events tell how.
    ///
    /// Applying before writing keeps the kernel's order: any later event for a fresh flow (its
    /// first packet, its end) can only follow its creation, and lands on top of it. A creation
    /// that then fails leaves a flow the kernel lacks: see [`Mirror::own_creations_failed`].
    pub fn own_creations(&mut self, flows: Vec<Flow>) -> (Vec<Flow>, Vec<Flow>) {
        let (mut fresh, mut known) = (Vec::with_capacity(flows.len()), Vec::new());
        for flow in flows {
            if !self.table.insert_new(flow.clone()) {
                known.push(flow);
                continue;
            }
            if let Some(log) = &mut self.replay {
                if log.len() < REPLAY_LIMIT {
                    log.push(CtMessage {
                        kind: CtEventKind::New,
                        flow: flow.clone(),
                        present: Present::ALL,
                        kernel_id: None,
                    });
                } else {
                    self.stats.replay_overflows += 1;
                    self.dump_again = true;
                }
            }
            fresh.push(flow);
        }
        self.stats.own_creations += fresh.len() as u64;
        (fresh, known)
    }

    /// Some creations applied by [`Mirror::own_creations`] failed in the kernel (or the write
    /// failed as a whole): re-read the table, without suspecting the rest of the mirror.
    pub fn own_creations_failed(&mut self) -> MirrorAction {
        self.reread()
    }

    /// Creation events were muted for a while (see [`crate::netlink::CreationSwitch`]) and are
    /// heard again: entries created meanwhile are known only to the kernel. Re-reads the table
    /// without suspecting the rest of the mirror.
    pub fn creations_unheard(&mut self) -> MirrorAction {
        self.stats.creations_muted += 1;
        self.reread()
    }

    /// Re-reads the table; a dump already running may have passed what must be read, so it is
    /// redone once it ends.
    fn reread(&mut self) -> MirrorAction {
        if self.replay.is_some() {
            self.dump_again = true;
            return MirrorAction::None;
        }
        self.refresh()
    }

    fn count(&mut self, msg: &CtMessage, own: bool) {
        self.stats.events += 1;
        self.stats.events_own += u64::from(own);
        match msg.kind {
            CtEventKind::New => self.stats.events_new += 1,
            CtEventKind::Update => self.stats.events_update += 1,
            CtEventKind::Destroy => self.stats.events_destroy += 1,
        }
    }

    /// The kernel dropped events: the mirror can no longer be trusted until reconciled.
    pub fn overrun(&mut self) -> MirrorAction {
        self.stats.overruns += 1;
        self.request_dump()
    }

    /// Re-reads the kernel table without suspecting the mirror (periodic timeout refresh): the
    /// reconciliation is the same, the mirror stays "synced" meanwhile.
    pub fn refresh(&mut self) -> MirrorAction {
        if self.replay.is_some() {
            return MirrorAction::None;
        }
        self.replay = Some(Vec::new());
        MirrorAction::StartDump
    }

    /// An event could not be decoded: treated like a lost event.
    pub fn undecodable(&mut self) -> MirrorAction {
        self.stats.undecodable += 1;
        self.request_dump()
    }

    fn request_dump(&mut self) -> MirrorAction {
        self.synced = false;
        if self.replay.is_some() {
            self.dump_again = true;
            MirrorAction::None
        } else {
            self.replay = Some(Vec::new());
            MirrorAction::StartDump
        }
    }

    /// A dump requested by [`MirrorAction::StartDump`] finished with these entries.
    ///
    /// Returns the flows whose state differs from what the mirror held, and whether to dump again.
    pub fn dump_complete(&mut self, dump: Vec<Flow>) -> (Vec<Change>, MirrorAction) {
        let mut fresh = FlowTable::new();
        fresh.reserve(dump.len());
        for flow in dump {
            fresh.insert(flow);
        }
        self.dump_complete_table(fresh)
    }

    /// [`Mirror::dump_complete`] with the dump already in a table: the daemon's dump thread
    /// builds it as entries arrive, so that the state task (which also serves the peers) only
    /// replays and compares, and no list of the whole dump is held besides the table.
    pub fn dump_complete_table(&mut self, mut fresh: FlowTable) -> (Vec<Change>, MirrorAction) {
        for msg in self.replay.take().unwrap_or_default() {
            apply(&mut fresh, &msg);
        }
        let changes = diff(&self.table, &fresh);
        if self.stats.resyncs > 0 {
            self.stats.resync_repairs += changes.len() as u64;
        }
        self.stats.resyncs += 1;
        self.table = fresh;
        if std::mem::take(&mut self.dump_again) {
            self.replay = Some(Vec::new());
            return (changes, MirrorAction::StartDump);
        }
        self.synced = true;
        (changes, MirrorAction::None)
    }

    /// A requested dump failed; the caller retries later with [`Mirror::retry_dump`].
    pub fn dump_failed(&mut self) {
        self.replay = None;
        self.synced = false;
    }

    /// Requests the dump again after a failure.
    pub fn retry_dump(&mut self) -> MirrorAction {
        self.request_dump()
    }
}

/// [`apply`] of an event that is not kept afterwards.
fn apply_owned(table: &mut FlowTable, msg: CtMessage) -> Option<Change> {
    match msg.kind {
        CtEventKind::Destroy => apply(table, &msg),
        CtEventKind::New | CtEventKind::Update => {
            let key = msg.flow.key;
            table
                .merge_owned(msg.flow, msg.present)
                .then_some(Change::Upsert(key))
        }
    }
}

fn apply(table: &mut FlowTable, msg: &CtMessage) -> Option<Change> {
    match msg.kind {
        CtEventKind::Destroy => table.remove(&msg.flow.key).map(|f| Change::Remove(f.key)),
        CtEventKind::New | CtEventKind::Update => table
            .merge(&msg.flow, msg.present)
            .then_some(Change::Upsert(msg.flow.key)),
    }
}

/// Flows added, changed (ignoring timeouts) or removed from `old` to `new`.
fn diff(old: &FlowTable, new: &FlowTable) -> Vec<Change> {
    let mut changes: Vec<Change> = new
        .iter()
        .filter(|f| old.get(&f.key).is_none_or(|o| !o.same_state(f)))
        .map(|f| Change::Upsert(f.key))
        .collect();
    changes.extend(
        old.iter()
            .filter(|f| new.get(&f.key).is_none())
            .map(|f| Change::Remove(f.key)),
    );
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{proto, ProtoInfo, TcpInfo, Tuple, Zone, L4};

    fn flow(port: u16) -> Flow {
        let t = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::UDP,
            l4: L4::Ports { src: port, dst: 53 },
        };
        let mut f = Flow::new(Zone::default(), t, t.inverse());
        f.timeout = 30;
        f
    }

    fn msg(kind: CtEventKind, f: Flow) -> CtMessage {
        CtMessage {
            kind,
            flow: f,
            present: Present::ALL,
            kernel_id: None,
        }
    }

    #[test]
    fn heap_accounting_follows_every_change() {
        let recount =
            |t: &FlowTable| t.table.heap_bytes() + t.iter().map(Flow::heap_bytes).sum::<usize>();
        let mut t = FlowTable::new();
        let mut labelled = flow(1);
        labelled.set_labels(5);
        labelled.set_helper(Some("ftp".into()));
        t.insert(labelled.clone());
        t.insert(flow(2));
        assert_eq!(t.heap_bytes(), recount(&t));
        t.insert(flow(1)); // replaces the labelled flow: its box is gone
        assert_eq!(t.heap_bytes(), recount(&t));
        t.merge(&labelled, Present::ALL);
        assert_eq!(t.heap_bytes(), recount(&t));
        t.remove(&labelled.key);
        assert_eq!(t.heap_bytes(), recount(&t));
        t.clear();
        assert_eq!(t.heap_bytes(), recount(&t));
    }

    #[test]
    fn events_before_first_dump_are_replayed_on_it() {
        let mut m = Mirror::new();
        assert_eq!(m.start(), MirrorAction::StartDump);
        // Flow 1 is destroyed and flow 3 created while the dump runs.
        m.event(msg(CtEventKind::Destroy, flow(1)), false);
        m.event(msg(CtEventKind::New, flow(3)), false);
        let (_, action) = m.dump_complete(vec![flow(1), flow(2)]);
        assert_eq!(action, MirrorAction::None);
        assert!(m.is_synced());
        let mut ports: Vec<u16> = m
            .table()
            .iter()
            .map(|f| match f.key.orig.l4 {
                L4::Ports { src, .. } => src,
                _ => 0,
            })
            .collect();
        ports.sort();
        assert_eq!(ports, vec![2, 3]);
    }

    #[test]
    fn reconciliation_reports_only_real_differences() {
        let tcp = |flags| {
            let mut f = flow(1);
            f.set_protoinfo(ProtoInfo::Tcp(TcpInfo {
                flags_orig: flags,
                ..TcpInfo::default()
            }));
            f
        };
        let mut m = Mirror::new();
        m.start();
        m.dump_complete(vec![tcp(0), flow(2), flow(3)]);
        assert_eq!(m.overrun(), MirrorAction::StartDump);
        assert!(!m.is_synced());
        let mut changed = flow(2);
        changed.mark = 9;
        // Traffic since the last event flipped flag bits the kernel never reports by event.
        let mut ticked = tcp(crate::flow::TCP_FLAGS_CHANGED_SILENTLY);
        ticked.timeout = 12;
        let (changes, _) = m.dump_complete(vec![ticked, changed, flow(4)]);
        assert_eq!(changes.len(), 3);
        assert!(changes.contains(&Change::Upsert(flow(2).key)));
        assert!(changes.contains(&Change::Upsert(flow(4).key)));
        assert!(changes.contains(&Change::Remove(flow(3).key)));
        assert_eq!(m.stats().resync_repairs, 3);
    }

    #[test]
    fn overrun_during_dump_asks_for_another() {
        let mut m = Mirror::new();
        m.start();
        assert_eq!(m.overrun(), MirrorAction::None);
        let (_, action) = m.dump_complete(vec![flow(1)]);
        assert_eq!(action, MirrorAction::StartDump);
        assert!(!m.is_synced());
        let (_, action) = m.dump_complete(vec![flow(1)]);
        assert_eq!(action, MirrorAction::None);
        assert!(m.is_synced());
    }

    #[test]
    fn own_events_change_the_table_but_are_not_reported() {
        let mut m = Mirror::new();
        m.start();
        m.dump_complete(vec![]);
        let change = m.event(msg(CtEventKind::New, flow(7)), true);
        assert_eq!(change, None);
        assert_eq!(m.table().len(), 1);
        let change = m.event(msg(CtEventKind::Destroy, flow(7)), false);
        assert_eq!(change, Some(Change::Remove(flow(7).key)));
    }

    #[test]
    fn own_creations_apply_new_flows_and_leave_known_ones_to_events() {
        let mut m = Mirror::new();
        m.start();
        m.dump_complete(vec![flow(1)]);
        let mut mine = flow(1);
        mine.mark = 9;
        let (fresh, known) = m.own_creations(vec![mine.clone(), flow(2)]);
        assert_eq!(fresh, vec![flow(2)]);
        assert_eq!(known, vec![mine]);
        // The fresh flow is in; the known one keeps the kernel's state until its events come.
        assert_eq!(m.table().get(&flow(2).key), Some(&flow(2)));
        assert_eq!(m.table().get(&flow(1).key).map(|f| f.mark), Some(0));
        assert_eq!(m.stats().own_creations, 1);
        // A later event of the fresh flow lands on top of it, and is reported as ours or not.
        let mut seen = flow(2);
        seen.status = 8;
        assert_eq!(
            m.event(msg(CtEventKind::Update, seen.clone()), false),
            Some(Change::Upsert(seen.key))
        );
        assert_eq!(m.table().get(&seen.key), Some(&seen));
    }

    #[test]
    fn own_creations_during_a_dump_are_replayed_on_its_result() {
        let mut m = Mirror::new();
        m.start();
        m.dump_complete(vec![]);
        assert_eq!(m.refresh(), MirrorAction::StartDump);
        let (fresh, _) = m.own_creations(vec![flow(3)]);
        assert_eq!(fresh.len(), 1);
        // The dump ran before the creation: the replay puts it back.
        let (changes, action) = m.dump_complete(vec![]);
        assert_eq!(action, MirrorAction::None);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(m.table().get(&flow(3).key), Some(&flow(3)));
    }

    #[test]
    fn failed_own_creations_reread_the_kernel() {
        let mut m = Mirror::new();
        m.start();
        m.dump_complete(vec![]);
        m.own_creations(vec![flow(4)]);
        assert_eq!(m.own_creations_failed(), MirrorAction::StartDump);
        assert!(
            m.is_synced(),
            "a refresh, not a suspicion of the whole mirror"
        );
        // The kernel has no such flow: the dump removes it.
        let (changes, _) = m.dump_complete(vec![]);
        assert_eq!(changes, vec![Change::Remove(flow(4).key)]);
        assert!(m.table().is_empty());
        // While a dump runs, the failure makes it run again.
        assert_eq!(m.refresh(), MirrorAction::StartDump);
        m.own_creations(vec![flow(5)]);
        assert_eq!(m.own_creations_failed(), MirrorAction::None);
        assert_eq!(m.dump_complete(vec![]).1, MirrorAction::StartDump);
    }

    #[test]
    fn creations_made_while_muted_are_read_from_the_kernel() {
        let mut m = Mirror::new();
        m.start();
        m.dump_complete(vec![flow(1)]);
        // flow(2) was created while creation events were muted: only a dump can tell.
        assert_eq!(m.creations_unheard(), MirrorAction::StartDump);
        assert!(m.is_synced(), "the rest of the mirror is not suspected");
        let (changes, action) = m.dump_complete(vec![flow(1), flow(2)]);
        assert_eq!(action, MirrorAction::None);
        assert_eq!(changes, vec![Change::Upsert(flow(2).key)]);
        assert_eq!(m.stats().creations_muted, 1);
        // A dump that started while muted may have passed such a creation: it runs again.
        assert_eq!(m.refresh(), MirrorAction::StartDump);
        assert_eq!(m.creations_unheard(), MirrorAction::None);
        assert_eq!(
            m.dump_complete(vec![flow(1), flow(2)]).1,
            MirrorAction::StartDump
        );
        let (changes, action) = m.dump_complete(vec![flow(1), flow(2), flow(3)]);
        assert_eq!(action, MirrorAction::None);
        assert_eq!(changes, vec![Change::Upsert(flow(3).key)]);
    }

    #[test]
    fn partial_update_keeps_absent_attributes() {
        let mut m = Mirror::new();
        m.start();
        let mut f = flow(1);
        f.mark = 5;
        m.dump_complete(vec![f.clone()]);
        let mut upd = flow(1);
        upd.status = 4;
        let mut present = Present::default();
        present.set(Present::STATUS);
        let change = m.event(
            CtMessage {
                kind: CtEventKind::Update,
                flow: upd,
                present,
                kernel_id: None,
            },
            false,
        );
        assert!(change.is_some());
        let got = m.table().get(&f.key).unwrap();
        assert_eq!((got.mark, got.status), (5, 4));
    }
}
