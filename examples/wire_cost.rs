//! CPU time and heap allocations per flow of the peer wire codecs, on a batch of the benchmarks'
//! realistic flow mix: the reference path (`ctsync::wire` conversions plus prost) and the
//! hand-written one the transport uses (`wire::encode_message`/`wire::decode_message`), side by
//! side.
//!
//! `cargo run --release --example wire_cost -- [rounds]` (default 2000 rounds of 512 flows).
//! Encode writes into a reused buffer (as the gRPC codec does); for prost it is `wire::encode`
//! then prost's `Message::encode`, including the drop of the intermediate protobuf message.
//! Decode excludes the drop of the decoded batch (its flows go on to the sync engine); for prost
//! it is `Message::decode` then `wire::decode`. Decode reads from a `Bytes`, as tonic's decoder
//! reads from its `BytesMut`: prost then takes `bytes` fields (generated as `Bytes`, see
//! build.rs) out of it without a copy or an allocation. Allocations are counted by a counting
//! global allocator, so they are exact.

use ctsync::sync::{Batch, Message};
use ctsync::wire::{self, pb};
use prost::bytes::Bytes;
use prost::Message as _;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../integration/bench/flows.rs"]
mod flows;

/// Counts allocations (a realloc counts as one).
struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const FLOWS: usize = 512;

/// One way of encoding and decoding a message.
#[derive(Clone, Copy)]
enum Path {
    /// `wire::encode` + prost, prost + `wire::decode` (the reference).
    Prost,
    /// `wire::encode_message` and `wire::decode_message` (what the transport uses).
    Hand,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Prost => "prost",
            Path::Hand => "hand",
        }
    }

    /// Encodes into `buf` as the gRPC codec does (reused buffer, sized by the encoder).
    fn encode(self, msg: &Message, buf: &mut Vec<u8>) {
        match self {
            Path::Prost => {
                let pm = wire::encode(msg);
                pm.encode(buf).unwrap();
                drop(pm);
            }
            Path::Hand => {
                let sized = wire::SizedMessage::new(msg);
                buf.reserve(sized.len());
                sized.encode(buf);
            }
        }
    }

    fn decode(self, bytes: Bytes) -> Message {
        match self {
            Path::Prost => wire::decode(pb::PeerMessage::decode(bytes).unwrap()).unwrap(),
            Path::Hand => wire::decode_message(&bytes).unwrap(),
        }
    }
}

/// Encodes and decodes `msg` `rounds` times; prints ns and allocations per item.
fn measure(what: &str, path: Path, msg: &Message, items: usize, rounds: usize) {
    let mut buf = Vec::with_capacity(64 * 1024);
    // Warm up, and check the round trip (and the encoding against prost's) while at it.
    let reference = wire::encode(msg).encode_to_vec();
    for _ in 0..rounds / 10 + 1 {
        buf.clear();
        path.encode(msg, &mut buf);
        assert_eq!(buf, reference);
        assert_eq!(&path.decode(Bytes::from(buf.clone())), msg);
    }
    let (mut enc_t, mut dec_t) = (Duration::ZERO, Duration::ZERO);
    let (mut enc_a, mut dec_a) = (0, 0);
    for _ in 0..rounds {
        let a0 = ALLOCS.load(Ordering::Relaxed);
        let t0 = Instant::now();
        buf.clear();
        path.encode(black_box(msg), &mut buf);
        let t1 = Instant::now();
        let a1 = ALLOCS.load(Ordering::Relaxed);
        enc_t += t1 - t0;
        enc_a += a1 - a0;
        // Not measured: tonic's receive buffer.
        let received = Bytes::from(buf.clone());
        let a1 = ALLOCS.load(Ordering::Relaxed);
        let t1 = Instant::now();
        let back = path.decode(black_box(received));
        let t2 = Instant::now();
        let a2 = ALLOCS.load(Ordering::Relaxed);
        drop(black_box(back));
        dec_t += t2 - t1;
        dec_a += a2 - a1;
    }
    let n = (items * rounds) as f64;
    println!(
        "{what:8} {:5} {items} per batch, {:.1} bytes/item: encode {:6.1} ns {:5.2} allocs | decode {:6.1} ns {:5.2} allocs (per item)",
        path.name(),
        buf.len() as f64 / items as f64,
        enc_t.as_nanos() as f64 / n,
        enc_a as f64 / n,
        dec_t.as_nanos() as f64 / n,
        dec_a as f64 / n,
    );
}

fn main() {
    let rounds = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let upserts = Message::Batch(Batch {
        epoch: 1,
        seq: 1,
        upserts: (0..FLOWS)
            .map(|i| (1 + i as u64, flows::realistic_flow(i)))
            .collect(),
        deletes: Vec::new(),
    });
    let deletes = Message::Batch(Batch {
        epoch: 1,
        seq: 2,
        upserts: Vec::new(),
        deletes: (0..FLOWS)
            .map(|i| (1 + i as u64, flows::realistic_flow(i).key))
            .collect(),
    });
    println!("flow mix: {}", flows::FLOW_MIX);
    for (what, msg) in [("upserts", &upserts), ("deletes", &deletes)] {
        for path in [Path::Prost, Path::Hand] {
            measure(what, path, msg, FLOWS, rounds);
        }
    }
}
