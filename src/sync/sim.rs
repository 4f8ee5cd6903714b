//! Simulated network tests of the engine: virtual clock, latency, loss, duplicates, reordering,
//! disconnects, restarts, slow peers and meshes of three nodes. No sockets, no sleeping.

use super::engine::{Engine, EngineConfig};
use super::message::Message;
use crate::cache::{Change, FlowTable};
use crate::flow::{proto, Flow, Tuple, Zone, L4};
use std::collections::BTreeMap;
use std::time::Duration;

// Deterministic, so that every run of a test sees the same network.
use crate::test_rng::Rng;

struct Node {
    engine: Engine,
    table: FlowTable,
    epochs: u64,
}

struct InTransit {
    at: Duration,
    from: String,
    to: String,
    msg: Message,
}

struct Net {
    nodes: BTreeMap<String, Node>,
    wire: Vec<InTransit>,
    now: Duration,
    rng: Rng,
    latency: Duration,
    loss: u64,
    dup: u64,
    jitter: bool,
    /// Links (a, b) that are down.
    cut: Vec<(String, String)>,
    /// Nodes that only read this often (a slow peer).
    slow: BTreeMap<String, Duration>,
    max_in_flight_seen: usize,
    /// Whether the engines' timers run (off: only messages move things on).
    timers: bool,
}

const TICK: Duration = Duration::from_millis(5);

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("fw{i}")).collect()
}

fn config(me: &str, all: &[String], epoch: u64) -> EngineConfig {
    let peers = all.iter().filter(|p| *p != me).cloned().collect();
    let mut cfg = EngineConfig::new("test", me, epoch, peers);
    cfg.batch_flows = 64;
    cfg.window = 8;
    cfg.ready_timeout = Duration::from_secs(5);
    cfg
}

fn flow(origin: usize, i: u32) -> Flow {
    let t = Tuple {
        src: std::net::IpAddr::from([10, origin as u8, (i >> 8) as u8, i as u8]),
        dst: "192.0.2.1".parse().unwrap(),
        proto: proto::TCP,
        l4: L4::Ports {
            src: (i % 60000) as u16 + 1024,
            dst: 443,
        },
    };
    let mut f = Flow::new(Zone::default(), t, t.inverse());
    f.timeout = 3600;
    f
}

impl Net {
    fn new(n: usize, seed: u64) -> Net {
        let all = names(n);
        let nodes = all
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let engine = Engine::new(config(name, &all, 100 + i as u64), Duration::ZERO);
                (
                    name.clone(),
                    Node {
                        engine,
                        table: FlowTable::new(),
                        epochs: 100 + i as u64,
                    },
                )
            })
            .collect();
        let mut net = Net {
            nodes,
            wire: Vec::new(),
            now: Duration::ZERO,
            rng: Rng(seed),
            latency: Duration::from_millis(2),
            loss: 0,
            dup: 0,
            jitter: false,
            cut: Vec::new(),
            slow: BTreeMap::new(),
            max_in_flight_seen: 0,
            timers: true,
        };
        for a in &all {
            for b in &all {
                if a < b {
                    net.connect(a, b);
                }
            }
        }
        net
    }

    fn connect(&mut self, a: &str, b: &str) {
        let now = self.now;
        self.nodes
            .get_mut(a)
            .unwrap()
            .engine
            .connected(b, now)
            .unwrap();
        self.nodes
            .get_mut(b)
            .unwrap()
            .engine
            .connected(a, now)
            .unwrap();
    }

    fn disconnect(&mut self, a: &str, b: &str) {
        let now = self.now;
        self.nodes.get_mut(a).unwrap().engine.disconnected(b, now);
        self.nodes.get_mut(b).unwrap().engine.disconnected(a, now);
        self.wire
            .retain(|m| !((m.from == a && m.to == b) || (m.from == b && m.to == a)));
    }

    fn is_cut(&self, a: &str, b: &str) -> bool {
        self.cut
            .iter()
            .any(|(x, y)| (x == a && y == b) || (x == b && y == a))
    }

    /// A local change on node `n`.
    fn upsert(&mut self, n: &str, f: Flow) {
        let now = self.now;
        let node = self.nodes.get_mut(n).unwrap();
        let key = f.key;
        node.table.insert(f);
        node.engine
            .local_change(&Change::Upsert(key), &node.table, now);
    }

    fn delete(&mut self, n: &str, f: &Flow) {
        let now = self.now;
        let node = self.nodes.get_mut(n).unwrap();
        node.table.remove(&f.key);
        node.engine
            .local_change(&Change::Remove(f.key), &node.table, now);
    }

    /// Restarts node `n` with a new epoch, keeping `table` as its kernel table.
    fn restart(&mut self, n: &str, table: FlowTable) {
        let all: Vec<String> = self.nodes.keys().cloned().collect();
        for p in all.iter().filter(|p| *p != n) {
            self.disconnect(n, p);
        }
        let now = self.now;
        let node = self.nodes.get_mut(n).unwrap();
        node.epochs += 1000;
        node.engine = Engine::new(config(n, &all, node.epochs), now);
        node.table = table;
        node.engine.index_all(&node.table, now);
        for p in all.iter().filter(|p| *p != n) {
            self.connect(n, p);
        }
    }

    fn step(&mut self) {
        self.now += TICK;
        let now = self.now;
        // Deliver what is due (slow nodes only every so often).
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.wire.len() {
            let slow_ok = self
                .slow
                .get(&self.wire[i].to)
                .is_none_or(|every| now.as_millis() % every.as_millis() < TICK.as_millis());
            if self.wire[i].at <= now && slow_ok {
                due.push(self.wire.remove(i));
            } else {
                i += 1;
            }
        }
        for m in due {
            let node = self.nodes.get_mut(&m.to).unwrap();
            if node.engine.handle(&m.from, m.msg, now).is_err() {
                let (a, b) = (m.from.clone(), m.to.clone());
                self.disconnect(&a, &b);
            }
        }
        // Transmit.
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for a in &names {
            for b in names.iter().filter(|b| *b != a) {
                loop {
                    let node = self.nodes.get_mut(a).unwrap();
                    let Some(msg) = node.engine.poll_transmit(b, &node.table, now) else {
                        break;
                    };
                    if self.is_cut(a, b) || self.rng.percent(self.loss) {
                        continue;
                    }
                    let copies = if self.rng.percent(self.dup) { 2 } else { 1 };
                    for _ in 0..copies {
                        let jitter = if self.jitter {
                            Duration::from_millis(self.rng.next() % 20)
                        } else {
                            Duration::ZERO
                        };
                        self.wire.push(InTransit {
                            at: now + self.latency + jitter,
                            from: a.clone(),
                            to: b.clone(),
                            msg: msg.clone(),
                        });
                    }
                }
            }
            if !self.timers {
                continue;
            }
            let dead = self.nodes.get_mut(a).unwrap().engine.handle_timeout(now);
            for d in dead {
                self.disconnect(a, &d);
            }
        }
        let in_flight = self.wire.len();
        self.max_in_flight_seen = self.max_in_flight_seen.max(in_flight);
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Whether every node's external cache holds exactly every other node's table.
    fn converged(&self) -> Result<(), String> {
        for (a, na) in &self.nodes {
            for (b, nb) in &self.nodes {
                if a == b {
                    continue;
                }
                let origin = nb.engine.external().origin(a);
                let held = origin.map_or(0, |o| o.len());
                if held != na.table.len() {
                    return Err(format!(
                        "{b} holds {held} flows of {a}, {a} has {}",
                        na.table.len()
                    ));
                }
                for f in na.table.iter() {
                    let got = origin.and_then(|o| o.get(&f.key)).map(|e| &e.flow);
                    if got != Some(f) {
                        return Err(format!("{b}'s copy of a flow of {a} differs: {got:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn run_until_converged(&mut self, limit: Duration) {
        let end = self.now + limit;
        while self.now < end {
            self.run(Duration::from_millis(50));
            if self.converged().is_ok() {
                return;
            }
        }
        panic!(
            "not converged after {limit:?}: {}",
            self.converged().unwrap_err()
        );
    }
}

#[test]
fn two_nodes_replicate_creates_updates_and_deletes() {
    let mut net = Net::new(2, 1);
    for i in 0..1000 {
        net.upsert("fw0", flow(0, i));
    }
    net.run_until_converged(Duration::from_secs(5));
    for i in 0..100 {
        let mut f = flow(0, i);
        f.mark = 7;
        net.upsert("fw0", f);
        net.delete("fw0", &flow(0, 500 + i));
    }
    net.run_until_converged(Duration::from_secs(5));
    assert_eq!(net.nodes["fw1"].engine.external().len(), 900);
    assert!(net.nodes["fw1"].engine.is_ready(net.now));
}

/// Tombstones go as soon as every peer acknowledged them, not at the next timer: during a burst
/// of deletions, the change index's log (the source's memory) would otherwise grow until then.
#[test]
fn acknowledged_tombstones_are_collected_without_waiting_for_a_timer() {
    let mut net = Net::new(2, 11);
    for i in 0..1000 {
        net.upsert("fw0", flow(0, i));
    }
    net.run_until_converged(Duration::from_secs(5));
    net.timers = false;
    for i in 0..600 {
        net.delete("fw0", &flow(0, i));
    }
    assert_eq!(net.nodes["fw0"].engine.tombstones(), 600);
    net.run_until_converged(Duration::from_secs(5));
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes["fw1"].engine.external().len(), 400);
    assert_eq!(net.nodes["fw0"].engine.tombstones(), 0);
}

#[test]
fn many_changes_of_one_flow_are_coalesced() {
    let mut net = Net::new(2, 2);
    net.run(Duration::from_millis(100));
    net.cut.push(("fw0".into(), "fw1".into()));
    for mark in 0..500 {
        let mut f = flow(0, 1);
        f.mark = mark;
        net.upsert("fw0", f);
    }
    net.cut.clear();
    net.disconnect("fw0", "fw1");
    net.connect("fw0", "fw1");
    net.run_until_converged(Duration::from_secs(5));
    let got = net.nodes["fw1"].engine.external().origin("fw0").unwrap();
    assert_eq!(got.get(&flow(0, 1).key).unwrap().flow.mark, 499);
}

#[test]
fn loss_duplicates_and_reordering_still_converge() {
    let mut net = Net::new(2, 3);
    net.loss = 10;
    net.dup = 10;
    net.jitter = true;
    for i in 0..3000 {
        net.upsert("fw0", flow(0, i));
        net.upsert("fw1", flow(1, i));
        if i % 3 == 0 {
            net.delete("fw0", &flow(0, i / 2));
        }
    }
    net.run_until_converged(Duration::from_secs(60));
}

#[test]
fn a_restarted_origin_loses_its_vanished_flows_on_peers() {
    let mut net = Net::new(2, 4);
    for i in 0..500 {
        net.upsert("fw0", flow(0, i));
    }
    net.run_until_converged(Duration::from_secs(5));
    // fw0 comes back with only half its flows (the others ended while it was down), some of
    // them changed meanwhile: its change counters restart at 1, below the old ones.
    let mut survivors = FlowTable::new();
    for i in 0..250 {
        let mut f = flow(0, i);
        if i % 5 == 0 {
            f.mark = 77;
        }
        survivors.insert(f);
    }
    net.restart("fw0", survivors);
    net.run_until_converged(Duration::from_secs(5));
    assert_eq!(net.nodes["fw1"].engine.external().len(), 250);
}

#[test]
fn a_restarted_receiver_gets_a_full_snapshot() {
    let mut net = Net::new(2, 5);
    for i in 0..700 {
        net.upsert("fw0", flow(0, i));
    }
    net.run_until_converged(Duration::from_secs(5));
    net.restart("fw1", FlowTable::new());
    assert!(!net.nodes["fw1"].engine.is_ready(net.now));
    net.run_until_converged(Duration::from_secs(5));
    assert!(net.nodes["fw1"].engine.is_ready(net.now));
    assert_eq!(net.nodes["fw1"].engine.external().len(), 700);
}

#[test]
fn reconnect_resumes_without_a_new_snapshot() {
    let mut net = Net::new(2, 6);
    for i in 0..300 {
        net.upsert("fw0", flow(0, i));
    }
    net.run_until_converged(Duration::from_secs(5));
    let sent = |net: &Net| net.nodes["fw0"].engine.peer_status(net.now)[0].snapshots_sent;
    let before = sent(&net);
    net.disconnect("fw0", "fw1");
    for i in 300..400 {
        net.upsert("fw0", flow(0, i));
    }
    net.connect("fw0", "fw1");
    net.run_until_converged(Duration::from_secs(5));
    assert_eq!(sent(&net), before, "resumed, no snapshot");
}

#[test]
fn dead_peer_is_noticed_and_memory_stays_bounded() {
    let mut net = Net::new(2, 7);
    net.run(Duration::from_millis(100));
    net.cut.push(("fw0".into(), "fw1".into()));
    net.run(Duration::from_secs(4));
    let st = net.nodes["fw0"].engine.peer_status(net.now);
    assert_eq!(st[0].state, "down", "dead within 3 s of silence");
    // A long outage with heavy churn: the index holds one entry per key, never a queue.
    for round in 0..20u32 {
        for i in 0..500 {
            let mut f = flow(0, i);
            f.mark = round;
            net.upsert("fw0", f);
        }
    }
    assert!(net.nodes["fw0"].engine.peer_status(net.now)[0].lag_changes >= 500);
    net.cut.clear();
    net.connect("fw0", "fw1");
    net.run_until_converged(Duration::from_secs(10));
}

#[test]
fn a_slow_peer_is_bounded_by_the_window() {
    let mut net = Net::new(2, 8);
    net.slow.insert("fw1".into(), Duration::from_millis(200));
    for i in 0..5000 {
        net.upsert("fw0", flow(0, i));
    }
    net.run(Duration::from_secs(2));
    // Messages on the wire towards the slow peer never exceed window + control messages.
    assert!(net.max_in_flight_seen < 64, "{}", net.max_in_flight_seen);
    net.slow.clear();
    net.run_until_converged(Duration::from_secs(30));
}

#[test]
fn three_nodes_in_a_mesh_converge_without_loops() {
    let mut net = Net::new(3, 9);
    net.jitter = true;
    for n in 0..3 {
        for i in 0..400 {
            net.upsert(&format!("fw{n}"), flow(n, i));
        }
    }
    net.run_until_converged(Duration::from_secs(10));
    // Flows arrive before the snapshot's end marker that makes a peer "synced".
    net.run(Duration::from_millis(100));
    for n in net.nodes.values() {
        assert_eq!(
            n.engine.external().len(),
            800,
            "own flows are never echoed back"
        );
        assert!(n.engine.is_ready(net.now));
    }
}

#[test]
fn a_lone_survivor_becomes_ready_after_the_bound() {
    let mut net = Net::new(2, 10);
    net.disconnect("fw0", "fw1");
    net.cut.push(("fw0".into(), "fw1".into()));
    assert!(!net.nodes["fw0"].engine.is_ready(net.now));
    net.run(Duration::from_secs(6));
    assert!(net.nodes["fw0"].engine.is_ready(net.now));
}

#[test]
fn peers_of_another_cluster_or_version_are_refused() {
    let all = names(2);
    let mut e = Engine::new(config("fw0", &all, 1), Duration::ZERO);
    e.connected("fw1", Duration::ZERO).unwrap();
    let mut hello = super::message::Hello {
        version_major: super::VERSION_MAJOR,
        version_minor: 0,
        cluster: "other".into(),
        node_id: "fw1".into(),
        epoch: 5,
        have_epoch: 0,
        have_seq: 0,
    };
    let err = e
        .handle("fw1", Message::Hello(hello.clone()), Duration::ZERO)
        .unwrap_err();
    assert!(err.to_string().contains("cluster"), "{err}");
    hello.cluster = "test".into();
    hello.version_major = 99;
    let err = e
        .handle("fw1", Message::Hello(hello.clone()), Duration::ZERO)
        .unwrap_err();
    assert!(err.to_string().contains("protocol 99"), "{err}");
    hello.version_major = super::VERSION_MAJOR;
    hello.node_id = "fw9".into();
    assert!(e
        .handle("fw1", Message::Hello(hello), Duration::ZERO)
        .is_err());
}
