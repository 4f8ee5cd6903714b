//! CPU time per flow of the sans-IO replication pipeline, in one process and without a kernel or
//! a network: A's mirror and change index, the hand-written wire codec both ways, B's external
//! cache, then the preparation of a commit on B (shaping plus B's mirror) and a delete burst.
//!
//! `cargo run --release --example pipeline_cost -- [flows] [rounds] [pollute_mib]`
//! (defaults: 100000 flows, 5 rounds, 8 MiB). Events go in chunks of 256, as the daemon's event
//! thread hands them over under load; before each chunk the example writes over `pollute_mib`
//! MiB of unrelated memory, because in the daemons other threads and processes evict these
//! tables from the caches between batches, and cache misses are most of the cost. Only the
//! pipeline's own work is timed; the best round of each phase is printed.
//!
//! It isolates the user-space share of `ctsync-compare`'s CPU figures: use it to judge a change
//! to the caches, the index or the codec before the (much noisier) end-to-end comparison.

use ctsync::cache::{FlowTable, Mirror};
use ctsync::commit::{CommitCursor, CommitOptions};
use ctsync::flow::{Flow, Present};
use ctsync::netlink::{CtEventKind, CtMessage};
use ctsync::sync::{Engine, EngineConfig};
use ctsync::wire::{decode_message, encode_message};
use std::hint::black_box;
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../integration/bench/flows.rs"]
mod flows;

/// Events per chunk between two pollutions.
const CHUNK: usize = 256;

/// Flows per commit chunk (as the daemon's commit).
const COMMIT_CHUNK: usize = 16_384;

/// Two nodes wired back to back: "a" replicates its mirror to "b".
struct Pair {
    mirror_a: Mirror,
    mirror_b: Mirror,
    a: Engine,
    b: Engine,
    buf: Vec<u8>,
}

impl Pair {
    fn new(now: Duration) -> Pair {
        let mut mirror_a = Mirror::new();
        mirror_a.start();
        mirror_a.dump_complete(Vec::new());
        let mut mirror_b = Mirror::new();
        mirror_b.start();
        mirror_b.dump_complete(Vec::new());
        let mut a = Engine::new(EngineConfig::new("c", "a", 1, vec!["b".into()]), now);
        let mut b = Engine::new(EngineConfig::new("c", "b", 2, vec!["a".into()]), now);
        a.connected("b", now).expect("a knows b");
        b.connected("a", now).expect("b knows a");
        let mut pair = Pair {
            mirror_a,
            mirror_b,
            a,
            b,
            buf: Vec::new(),
        };
        pair.exchange(now);
        pair
    }

    /// Moves every due message both ways, through the wire codec, until both are quiet.
    fn exchange(&mut self, now: Duration) {
        loop {
            let there = relay(
                &mut self.a,
                "b",
                &mut self.b,
                "a",
                self.mirror_a.table(),
                now,
                &mut self.buf,
            );
            let back = relay(
                &mut self.b,
                "a",
                &mut self.a,
                "b",
                self.mirror_b.table(),
                now,
                &mut self.buf,
            );
            if !there && !back {
                break;
            }
        }
    }

    /// Applies `kind` events for `flows` to A's mirror, chunk by chunk; returns the time spent.
    fn events(&mut self, flows: &[Flow], kind: CtEventKind, now: Duration, junk: &mut [u8]) -> f64 {
        let mut spent = 0.0;
        for chunk in flows.chunks(CHUNK) {
            pollute(junk);
            let started = Instant::now();
            for f in chunk {
                let msg = CtMessage {
                    kind,
                    flow: f.clone(),
                    present: Present::ALL,
                    kernel_id: Some(1),
                };
                if let Some(change) = self.mirror_a.event(msg, false) {
                    self.a.local_change(&change, self.mirror_a.table(), now);
                }
            }
            self.exchange(now);
            spent += started.elapsed().as_secs_f64();
        }
        spent
    }

    /// Shapes everything B holds for its kernel and applies it to B's mirror, as a commit does
    /// before handing each chunk to the kernel writer; returns the time spent.
    fn commit(&mut self, now: Duration, junk: &mut [u8]) -> f64 {
        pollute(junk);
        let started = Instant::now();
        let mut cursor = CommitCursor::new(self.b.external());
        while !cursor.is_done() {
            let chunk = cursor.next_chunk(
                self.b.external(),
                COMMIT_CHUNK,
                now,
                &CommitOptions::default(),
            );
            black_box(self.mirror_b.own_creations(chunk));
        }
        started.elapsed().as_secs_f64()
    }
}

/// Sends what `from` has due for `to_name` into `to`; whether anything moved.
fn relay(
    from: &mut Engine,
    to_name: &str,
    to: &mut Engine,
    from_name: &str,
    table: &FlowTable,
    now: Duration,
    buf: &mut Vec<u8>,
) -> bool {
    let mut moved = false;
    while let Some(msg) = from.poll_transmit(to_name, table, now) {
        buf.clear();
        encode_message(&msg, buf);
        let msg = decode_message(buf).expect("the codec reads what it wrote");
        to.handle(from_name, msg, now)
            .expect("a valid peer message");
        moved = true;
    }
    moved
}

/// Writes one byte per cache line of `junk`.
fn pollute(junk: &mut [u8]) {
    for line in junk.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    black_box(junk);
}

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("argument {n}: a number"))
        })
        .unwrap_or(default)
}

fn main() {
    let n: usize = arg(1, 100_000);
    let rounds: usize = arg(2, 5);
    let mut junk = vec![0u8; arg::<usize>(3, 8) << 20];
    let flows: Vec<Flow> = (0..n).map(flows::realistic_flow).collect();
    let now = Duration::from_secs(1);
    let mut best = [f64::MAX; 3];
    for round in 1..=rounds {
        let mut pair = Pair::new(now);
        let replication = pair.events(&flows, CtEventKind::New, now, &mut junk);
        assert_eq!(pair.b.external().len(), n, "B holds every flow");
        let commit = pair.commit(now, &mut junk);
        assert_eq!(
            pair.mirror_b.table().len(),
            n,
            "B's mirror holds every flow"
        );
        let delete = pair.events(&flows, CtEventKind::Destroy, now, &mut junk);
        assert_eq!(pair.b.external().len(), 0, "B's cache is empty");
        let phases = [replication, commit, delete];
        for (b, p) in best.iter_mut().zip(phases) {
            *b = b.min(p);
        }
        let ns = |s: f64| s * 1e9 / n as f64;
        eprintln!(
            "round {round}: replication {:.0} ns/flow, commit {:.0} ns/flow, delete {:.0} ns/flow",
            ns(replication),
            ns(commit),
            ns(delete)
        );
    }
    let ns = |s: f64| s * 1e9 / n as f64;
    println!(
        "{n} flows, best of {rounds}: replication {:.0} ns/flow, commit preparation {:.0} ns/flow, \
         delete {:.0} ns/flow, total {:.0} ns/flow",
        ns(best[0]),
        ns(best[1]),
        ns(best[2]),
        ns(best.iter().sum())
    );
}
