//! Bytes per flow of the two big flow stores, [`FlowTable`] and [`OriginCache`], filled with
//! the benchmarks' realistic flow mix.
//!
//! Run one store per process so that RSS figures are not polluted by the other:
//! `cargo run --release --example flow_memory -- table 250000` (or `origin`).
//! Heap figures come from a counting allocator (exact, live and peak); RSS figures from
//! `/proc/self/status` (peak reset through `/proc/self/clear_refs` before filling).

use ctsync::cache::FlowTable;
use ctsync::flow::FlowKey;
use ctsync::sync::{Batch, OriginCache};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[allow(dead_code)]
#[path = "../integration/bench/flows.rs"]
mod flows;

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as alloc-then-free: a moving realloc briefly holds both blocks.
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `VmRSS` and `VmHWM` in bytes.
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Baseline before filling a store: live heap and RSS, with both peaks reset.
struct Baseline {
    live: usize,
    rss: usize,
}

fn baseline() -> Baseline {
    // "5" resets the peak RSS (VmHWM) to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    Baseline { live, rss: rss().0 }
}

fn report(what: &str, n: usize, base: &Baseline, heap_bytes: Option<usize>) {
    let per = |b: usize| b as f64 / n as f64;
    let (rss_now, hwm) = rss();
    let live = LIVE.load(Ordering::Relaxed) - base.live;
    let peak = PEAK.load(Ordering::Relaxed) - base.live;
    println!("{what}: {n} flows");
    if let Some(h) = heap_bytes {
        println!("  heap_bytes()      {:8.1} B/flow", per(h));
    }
    println!("  live heap         {:8.1} B/flow", per(live));
    println!("  peak heap         {:8.1} B/flow", per(peak));
    println!("  RSS growth        {:8.1} B/flow", per(rss_now - base.rss));
    println!(
        "  peak RSS growth   {:8.1} B/flow",
        per(hwm.saturating_sub(base.rss))
    );
}

fn fill_table(n: usize) {
    let base = baseline();
    let mut table = FlowTable::new();
    for i in 0..n {
        table.insert(flows::realistic_flow(i));
    }
    report("FlowTable", n, &base, Some(table.heap_bytes()));
    // Churn: remove every other flow, then put them back.
    for i in (0..n).step_by(2) {
        table.remove(&flows::realistic_flow(i).key);
    }
    let half = table.heap_bytes();
    for i in (0..n).step_by(2) {
        table.insert(flows::realistic_flow(i));
    }
    println!(
        "  after removing half: heap_bytes {half}; refilled: {} flows",
        table.len()
    );
}

fn fill_origin(n: usize) {
    const BATCH: usize = 200;
    let base = baseline();
    let mut cache = OriginCache::default();
    cache.set_epoch(1);
    for (seq, start) in (0..n).step_by(BATCH).enumerate() {
        let upserts = (start..n.min(start + BATCH))
            .map(|i| (1 + i as u64, flows::realistic_flow(i)))
            .collect();
        let batch = Batch {
            epoch: 1,
            seq: 1 + seq as u64,
            upserts,
            deletes: Vec::new(),
        };
        cache.apply_batch(batch, Duration::ZERO);
    }
    report("OriginCache", n, &base, Some(cache.heap_bytes()));
    // Tombstones: delete a quarter, as a churning origin would.
    let deletes: Vec<(u64, FlowKey)> = (0..n)
        .step_by(4)
        .map(|i| (n as u64 + 1, flows::realistic_flow(i).key))
        .collect();
    let seq = 1 + n.div_ceil(BATCH) as u64;
    let batch = Batch {
        epoch: 1,
        seq,
        upserts: Vec::new(),
        deletes,
    };
    cache.apply_batch(batch, Duration::ZERO);
    println!(
        "  after deleting a quarter: {} flows, heap_bytes {} (tombstones included)",
        cache.len(),
        cache.heap_bytes()
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let store = args.next().unwrap_or_else(|| "table".into());
    let n = args.next().and_then(|a| a.parse().ok()).unwrap_or(250_000);
    match store.as_str() {
        "table" => fill_table(n),
        "origin" => fill_origin(n),
        other => eprintln!("unknown store {other:?}: use `table` or `origin`"),
    }
}
