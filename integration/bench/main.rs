//! `ctsync-bench`: how fast ctsync's kernel bridge is, measured against the kernel itself.
//!
//! Figures, each as median/min/max over `--runs` repetitions:
//! - userspace codec alone (no kernel): encode and decode rates and heap allocations per
//!   message, the ceiling of everything else;
//! - injection into an empty table: ctsync's `Writer` (1 and 2 sockets; realistic flows, and the
//!   very same minimal messages as the reference) against a raw batched netlink writer written
//!   here, which is "the kernel's own speed";
//! - dump: `ctsync::netlink::dump` (decoding included), a raw dump that only counts messages,
//!   and a dump handed to `Mirror::dump_complete` (initial synchronisation);
//! - memory per mirrored flow (RSS growth measured in a fresh child process);
//! - event intake: a reader thread feeding a `Mirror` while two raw writers create (then delete)
//!   the flows as fast as the kernel allows; then the same with the reader paused until the
//!   writers are done (the kernel's rate without a competing reader, the buffer each queued
//!   event takes, the reader's own speed), against raw readers that only count.
//!
//! Every measurement runs in network namespaces of its own (`ctsb-<pid>-<n>`), removed again on
//! every path: drop guards, and a signal thread for SIGINT/SIGTERM/SIGHUP. Figures go to stdout
//! (a table, or JSON with `--json`); progress goes to stderr.

mod flows;
mod lab;
#[allow(dead_code)] // Some helpers serve only ctsync-compare.
mod rawnl;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use ctsync::cache::{FlowTable, Mirror};
use ctsync::flow::{Flow, FlowKey, Tuple};
use ctsync::netlink::{
    codec, dump, CtEventKind, CtSocket, EventSource, KernelEvent, Origins, WriteOp, Writer,
};
use ctsync::netns;
use flows::*;
use lab::*;
use rawnl::*;
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::io::{self, Read};
use std::mem::size_of;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// How long the event reader waits for stragglers once the writers are done.
const EVENT_IDLE: Duration = Duration::from_secs(2);

/// The system allocator, counting allocations of the current thread while [`COUNT_ALLOCS`] is
/// set (a shared read-only flag and a thread-local counter: no cost to the timed sections).
struct CountingAlloc;

static COUNT_ALLOCS: AtomicBool = AtomicBool::new(false);

thread_local! {
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNT_ALLOCS.load(Ordering::Relaxed) {
            ALLOCS.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if COUNT_ALLOCS.load(Ordering::Relaxed) {
            ALLOCS.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Heap allocations (and reallocations) the current thread makes while running `f`.
fn count_allocs<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCS.with(|c| c.get());
    COUNT_ALLOCS.store(true, Ordering::Relaxed);
    let r = f();
    COUNT_ALLOCS.store(false, Ordering::Relaxed);
    (r, ALLOCS.with(|c| c.get()) - before)
}

#[derive(Parser, Debug)]
#[command(
    name = "ctsync-bench",
    about = "Kernel-bridge benchmark: ctsync's writer, dump and event intake against the kernel's own speed",
    long_about = None
)]
struct Args {
    /// Flows per measurement (must stay below nf_conntrack_max).
    #[arg(long, default_value_t = 250_000)]
    flows: usize,
    /// Repetitions of every measurement; median, min and max are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Receive buffer(s) of the event socket to try (bytes, K/M/G suffixes, comma-separated).
    #[arg(long = "event-buffer", value_delimiter = ',', value_parser = parse_size, default_value = "64M")]
    event_buffer: Vec<usize>,
    /// Receive buffer of the event socket when the reader is paused while the writers run
    /// (must hold all N events).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    drain_buffer: usize,
    /// Run only these sections (comma-separated); default: all.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Section>,
    /// Internal: measure memory of a dump of this namespace and print it as JSON.
    #[arg(long, hide = true)]
    memory_probe: Option<String>,
    /// Internal: what the memory probe fills.
    #[arg(long, hide = true, value_enum, default_value = "table")]
    probe_mode: ProbeMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Codec,
    Inject,
    Dump,
    Memory,
    Events,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProbeMode {
    Table,
    Mirror,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &lower[digits.len()..];
    let mult: usize = match suffix {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("unknown size suffix in {s:?}")),
    };
    let n: usize = digits
        .trim()
        .parse()
        .map_err(|e| format!("bad size {s:?}: {e}"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(ns) = &args.memory_probe {
        // The parent blocks termination signals for its signal thread; a child inherits the
        // mask, and must die of them.
        unblock_termination_signals();
        return match memory_probe(ns, args.probe_mode) {
            Ok(p) => {
                println!("{}", serde_json::to_string(&p).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ctsync-bench memory probe: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctsync-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Row {
    id: String,
    section: &'static str,
    label: String,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
    samples: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Meta {
    tool: &'static str,
    kernel: String,
    command_line: String,
    cpus: usize,
    flows: usize,
    runs: usize,
    nf_conntrack_max: u64,
    nf_conntrack_buckets: u64,
    flow_mix: &'static str,
    size_of_flow: usize,
    loadavg_start: String,
    loadavg_end: String,
    /// Conntrack entries of every namespace on the machine before the benchmark starts: they
    /// share the kernel's one hash table with ours, and slow every lookup and insertion.
    conntrack_entries_system_wide: u64,
    /// Sockets subscribed to conntrack events anywhere on the machine, at start and at end.
    /// The kernel keeps one global "has listener" flag (`nf_ctnetlink_has_listener`), so one
    /// listener in any namespace makes it build an event for every conntrack change in every
    /// namespace, ours included: creation and deletion get much slower.
    ctnetlink_listeners_start: usize,
    ctnetlink_listeners_end: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    meta: Meta,
    results: Vec<Row>,
    notes: Vec<String>,
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

impl Report {
    fn add(&mut self, section: &'static str, id: &str, label: &str, unit: &'static str, s: &[f64]) {
        let finite = s.iter().copied().filter(|x| x.is_finite());
        self.results.push(Row {
            id: id.to_string(),
            section,
            label: label.to_string(),
            unit,
            median: median(s),
            min: finite.clone().fold(f64::NAN, f64::min),
            max: finite.fold(f64::NAN, f64::max),
            samples: s.to_vec(),
        });
    }

    fn note(&mut self, text: String) {
        eprintln!("note: {text}");
        if !self.notes.contains(&text) {
            self.notes.push(text);
        }
    }

    fn print_table(&self) {
        let m = &self.meta;
        println!("ctsync-bench: kernel-bridge benchmark");
        println!("kernel      {}", m.kernel);
        println!("command     {}", m.command_line);
        println!(
            "machine     {} CPUs; nf_conntrack_max {} per namespace, nf_conntrack_buckets {}",
            m.cpus, m.nf_conntrack_max, m.nf_conntrack_buckets
        );
        println!("flows       {} per measurement, {} runs", m.flows, m.runs);
        println!(
            "conntrack   {} entries in all namespaces at start (all share the kernel's hash table)",
            m.conntrack_entries_system_wide
        );
        println!(
            "listeners   {} conntrack event sockets on the machine at start, {} at end \
             (one anywhere makes the kernel build events in every namespace)",
            m.ctnetlink_listeners_start, m.ctnetlink_listeners_end
        );
        println!(
            "loadavg     {} at start, {} at end",
            m.loadavg_start, m.loadavg_end
        );
        println!("flow mix    {}", m.flow_mix);
        let w = self
            .results
            .iter()
            .map(|r| r.label.len())
            .max()
            .unwrap_or(0)
            .max(50);
        let mut section = "";
        for r in &self.results {
            if r.section != section {
                section = r.section;
                println!();
                println!(
                    "{:<w$} {:>12} {:>12} {:>12}  unit",
                    section_title(section),
                    "median",
                    "min",
                    "max",
                    w = w + 2
                );
            }
            let (lo, hi) = if r.samples.len() <= 1 {
                (String::new(), String::new())
            } else {
                (fmt_value(r.unit, r.min), fmt_value(r.unit, r.max))
            };
            println!(
                "  {:<w$} {:>12} {:>12} {:>12}  {}",
                r.label,
                fmt_value(r.unit, r.median),
                lo,
                hi,
                r.unit
            );
        }
        if !self.notes.is_empty() {
            println!();
            println!("notes");
            for n in &self.notes {
                println!("  - {n}");
            }
        }
    }
}

fn section_title(s: &str) -> &'static str {
    match s {
        "codec" => "[codec] userspace only, no kernel",
        "inject" => "[inject] create N flows in an empty namespace",
        "dump" => "[dump] read back the N-flow table",
        "memory" => "[memory] per mirrored flow",
        "events" => "[events] 2 raw writers flat out; reader concurrent, then paused",
        _ => "[other]",
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn fmt_value(unit: &str, v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    match unit {
        "flows/s" | "events/s" | "events" | "flows" | "B" | "overruns" => thousands(v),
        "x" => format!("{v:.3}"),
        "allocs" | "us" => format!("{v:.2}"),
        _ => format!("{v:.1}"),
    }
}

fn mib(bytes: usize) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        f64::NAN
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------------------

fn wants(args: &Args, s: Section) -> bool {
    args.only.is_empty() || args.only.contains(&s)
}

fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "must run as root: it creates network namespaces and writes their conntrack tables \
             (try: sudo integration/bench.sh {})",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        );
    }
    ensure!(args.flows > 0, "--flows must be positive");
    ensure!(args.runs > 0, "--runs must be positive");
    ensure!(
        args.flows < 1 << 24,
        "--flows must stay below 2^24 (tuples are derived from the flow number)"
    );
    install_signal_cleanup()?;
    if remove_stale_namespaces() {
        std::thread::sleep(Duration::from_secs(1));
    }

    let nf_conntrack_max = {
        let ns = Netns::create()?;
        ns.run(|| read_sysctl("nf_conntrack_max"))?
            .context("reading nf_conntrack_max")?
    };
    if args.flows as u64 >= nf_conntrack_max {
        bail!(
            "--flows {} does not fit in nf_conntrack_max {nf_conntrack_max} of a namespace",
            args.flows
        );
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut rep = Report {
        meta: Meta {
            tool: "ctsync-bench",
            kernel,
            command_line: command_line(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            flows: args.flows,
            runs: args.runs,
            nf_conntrack_max,
            nf_conntrack_buckets: read_sysctl("nf_conntrack_buckets").unwrap_or(0),
            flow_mix: FLOW_MIX,
            size_of_flow: size_of::<Flow>(),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            conntrack_entries_system_wide: conntrack_slab_objects(),
            ctnetlink_listeners_start: ctnetlink_listeners(),
            ctnetlink_listeners_end: 0,
        },
        results: Vec::new(),
        notes: Vec::new(),
    };
    eprintln!(
        "ctsync-bench: kernel {}, {} flows, {} runs",
        rep.meta.kernel, args.flows, args.runs
    );

    let realistic: Vec<Flow> = (0..args.flows).map(realistic_flow).collect();
    let minimal: Vec<Flow> = (0..args.flows).map(minimal_flow).collect();

    if wants(args, Section::Codec) {
        bench_codec(args, &realistic, &minimal, &mut rep)?;
    }
    if wants(args, Section::Inject) {
        bench_inject(args, &realistic, &minimal, &mut rep)?;
    }
    if wants(args, Section::Dump) || wants(args, Section::Memory) {
        bench_dump_and_memory(args, &realistic, &mut rep)?;
    }
    if wants(args, Section::Events) {
        bench_events(args, &minimal, &mut rep)?;
    }

    rep.meta.loadavg_end = loadavg();
    rep.meta.ctnetlink_listeners_end = ctnetlink_listeners();
    if rep.meta.ctnetlink_listeners_start + rep.meta.ctnetlink_listeners_end > 0 {
        rep.note(
            "conntrack event listeners ran elsewhere on the machine: the kernel built an event \
             for each of our creations and deletions too (its listener flag is global), so the \
             [inject] rates are those of a host where ctsyncd listens, not of an idle kernel"
                .into(),
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        rep.print_table();
    }
    Ok(())
}

// --- codec -----------------------------------------------------------------------------------

fn bench_codec(args: &Args, realistic: &[Flow], minimal: &[Flow], rep: &mut Report) -> Result<()> {
    let n = realistic.len();
    let mut series = Series::default();
    // Entries as the kernel reports them (events and dumps), packed in datagrams.
    let mut datagrams = Vec::new();
    let mut cur = Vec::with_capacity(RECV_BUF);
    for (i, f) in realistic.iter().enumerate() {
        codec::encode_entry(&mut cur, CtEventKind::New, f, i as u32);
        if cur.len() >= 32 * 1024 {
            datagrams.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        datagrams.push(cur);
    }
    let ctsync_create = |buf: &mut Vec<u8>, f: &Flow, seq: u32| {
        codec::encode_write(buf, WriteOp::Create, f, seq, false);
    };
    type Encoder<'a> = &'a dyn Fn(&mut Vec<u8>, &Flow, u32);
    let encoders: [(&str, &str, &[Flow], Encoder<'_>); 3] = [
        (
            "realistic",
            "codec::encode_write CT_NEW, realistic flows",
            realistic,
            &ctsync_create,
        ),
        (
            "minimal",
            "codec::encode_write CT_NEW, minimal flows",
            minimal,
            &ctsync_create,
        ),
        (
            "raw_minimal",
            "bench's raw encoder CT_NEW, minimal flows",
            minimal,
            &raw_create,
        ),
    ];
    for run in 0..args.runs {
        eprintln!("[codec] run {}/{}", run + 1, args.runs);
        for &(id, label, flows, encode) in &encoders {
            let mut buf = Vec::with_capacity(BATCH_BYTES + 4096);
            let mut bytes = 0;
            let t0 = Instant::now();
            for (i, f) in flows.iter().enumerate() {
                encode(&mut buf, f, i as u32);
                if buf.len() >= BATCH_BYTES {
                    bytes += buf.len();
                    black_box(&buf);
                    buf.clear();
                }
            }
            black_box(&buf);
            let secs = t0.elapsed().as_secs_f64();
            bytes += buf.len();
            series.push(
                &format!("codec.encode.{id}"),
                label,
                "flows/s",
                rate(n, secs),
            );
            series.push(
                &format!("codec.msg_bytes.{id}"),
                &format!("{label}: bytes per message"),
                "B",
                bytes as f64 / n as f64,
            );
        }

        let t0 = Instant::now();
        let mut count = 0usize;
        for dg in &datagrams {
            for m in codec::messages(dg) {
                black_box(codec::decode_conntrack(&m?)?);
                count += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        ensure!(count == n, "decoded {count} of {n} entries");
        series.push(
            "codec.decode",
            "codec::decode_conntrack, realistic entries",
            "flows/s",
            rate(n, secs),
        );

        let mut mirror = Mirror::new();
        mirror.start();
        mirror.dump_complete(Vec::new());
        let t0 = Instant::now();
        for dg in &datagrams {
            for m in codec::messages(dg) {
                let msg = codec::decode_conntrack(&m?)?;
                black_box(mirror.event(msg, false));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        ensure!(
            mirror.table().len() == n,
            "mirror holds {} of {n}",
            mirror.table().len()
        );
        series.push(
            "codec.decode_apply",
            "decode + Mirror::event, NEW into a synced mirror",
            "flows/s",
            rate(n, secs),
        );
    }
    // The ctsync-vs-raw comparison on minimal flows assumes the kernel gets the same bytes.
    let differing = minimal
        .iter()
        .enumerate()
        .take(2000)
        .filter(|&(i, f)| {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            codec::encode_write(&mut a, WriteOp::Create, f, i as u32, false);
            raw_create(&mut b, f, i as u32);
            a != b
        })
        .count();
    if differing > 0 {
        rep.note(format!(
            "{differing} of the first 2000 minimal CT_NEW messages differ between \
             codec::encode_write and the raw encoder"
        ));
    }

    // Allocations per operation, in an untimed pass.
    let sample = &realistic[..n.min(10_000)];
    let mut buf = Vec::with_capacity(BATCH_BYTES + 64 * 1024);
    let ((), allocs) = count_allocs(|| {
        for (i, f) in sample.iter().enumerate() {
            codec::encode_write(&mut buf, WriteOp::Create, f, i as u32, false);
        }
    });
    series.push(
        "codec.allocs.encode",
        "heap allocations per codec::encode_write, realistic",
        "allocs",
        allocs as f64 / sample.len() as f64,
    );
    let mut entries = Vec::with_capacity(sample.len() * 256);
    for (i, f) in sample.iter().enumerate() {
        codec::encode_entry(&mut entries, CtEventKind::New, f, i as u32);
    }
    let (decoded, allocs) = count_allocs(|| {
        codec::messages(&entries)
            .map(|m| {
                m.map_err(anyhow::Error::from)
                    .and_then(|m| Ok(codec::decode_conntrack(&m)?))
            })
            .collect::<Result<Vec<_>>>()
    });
    let decoded = decoded?;
    series.push(
        "codec.allocs.decode",
        "heap allocations per codec::decode_conntrack (incl. result Vec)",
        "allocs",
        allocs as f64 / sample.len() as f64,
    );
    let mut mirror = Mirror::new();
    mirror.start();
    mirror.dump_complete(Vec::new());
    let ((), allocs) = count_allocs(|| {
        for msg in decoded {
            black_box(mirror.event(msg, false));
        }
    });
    series.push(
        "codec.allocs.apply",
        "heap allocations per Mirror::event (NEW, table growth incl.)",
        "allocs",
        allocs as f64 / sample.len() as f64,
    );
    series.report(rep, "codec");
    Ok(())
}

// --- injection -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injector {
    Raw,
    CtsyncMinimal,
    Ctsync,
    /// As a daemon commits: fresh flows through the quiet sockets, with an event socket
    /// subscribed in the namespace that has the kernel drop their creation events.
    CtsyncListened,
    /// The same with the event socket's creation events muted, as during a promotion.
    CtsyncMuted,
}

impl Injector {
    fn id(self) -> &'static str {
        match self {
            Injector::Raw => "raw",
            Injector::CtsyncMinimal => "ctsync_minimal",
            Injector::Ctsync => "ctsync",
            Injector::CtsyncListened => "ctsync_listened",
            Injector::CtsyncMuted => "ctsync_muted",
        }
    }
}

/// One injection into a fresh namespace; returns flows/s.
fn inject_once(
    who: Injector,
    k: usize,
    realistic: &[Flow],
    minimal: &[Flow],
    rep: &mut Report,
) -> Result<f64> {
    let n = realistic.len();
    let ns = Netns::create()?;
    let secs = match who {
        Injector::Raw => {
            let batches = split_batches(minimal, k, raw_create);
            let socks = raw_writers(&ns, k)?;
            let t = raw_write(&socks, &batches, &Barrier::new(socks.len()))?;
            if t.outcome.errors > 0 {
                rep.note(format!(
                    "raw writer k={k}: {} of {n} creates failed (first: {})",
                    t.outcome.errors,
                    io::Error::from_raw_os_error(t.outcome.first_errno)
                ));
            }
            t.secs()
        }
        Injector::Ctsync | Injector::CtsyncMinimal => {
            let flows = if who == Injector::Ctsync {
                realistic
            } else {
                minimal
            };
            let mut writer = ns
                .run(move || Writer::open(k, &Origins::new()))?
                .context("Writer::open")?;
            let t0 = Instant::now();
            let report = writer.upsert(flows).context("Writer::upsert")?;
            let secs = t0.elapsed().as_secs_f64();
            if report.created != n as u64 || !report.failures.is_empty() {
                let first = report
                    .failures
                    .first()
                    .map(|f| format!("{} {}: {} ({})", f.op, f.key.orig, f.error, f.errno))
                    .unwrap_or_default();
                rep.note(format!(
                    "{} k={k}: created {} updated {} replaced {} failed {} of {n}; first failure: {first}",
                    who.id(),
                    report.created,
                    report.updated,
                    report.replaced,
                    report.failures.len()
                ));
            }
            secs
        }
        Injector::CtsyncListened | Injector::CtsyncMuted => {
            daemon_like_commit(&ns, realistic, who == Injector::CtsyncMuted, rep)?
        }
    };
    let in_kernel = ns.conntrack_count()?;
    if in_kernel != n as u64 {
        rep.note(format!(
            "{} k={k}: the kernel holds {in_kernel} entries after injecting {n}",
            who.id()
        ));
    }
    Ok(rate(n, secs))
}

/// Writes `flows` as a daemon's commit does (see [`Injector::CtsyncListened`]); returns seconds.
fn daemon_like_commit(ns: &Netns, flows: &[Flow], muted: bool, rep: &mut Report) -> Result<f64> {
    let origins = Origins::new();
    let o = origins.clone();
    let mut writer = ns
        .run(move || Writer::open(1, &o))?
        .context("Writer::open")?;
    let quiet = writer.quiet_portids();
    // Nobody reads it: the kernel drops the writer's creation events before queueing them.
    let events = ns
        .run(move || -> Result<EventSource> {
            let (events, _) = EventSource::open(1 << 20, origins)?;
            events.hide_own_creations(&quiet)?;
            Ok(events)
        })?
        .context("EventSource::open")?;
    let switch = events.creation_switch()?;
    if muted {
        switch.mute()?;
    }
    let t0 = Instant::now();
    let report = writer
        .upsert_fresh(flows, &[])
        .context("Writer::upsert_fresh")?;
    let secs = t0.elapsed().as_secs_f64();
    if report.created != flows.len() as u64 || !report.failures.is_empty() {
        rep.note(format!(
            "daemon-like commit (muted: {muted}): created {} of {}, {} failures",
            report.created,
            flows.len(),
            report.failures.len()
        ));
    }
    switch.unmute()?;
    drop(events);
    Ok(secs)
}

fn bench_inject(args: &Args, realistic: &[Flow], minimal: &[Flow], rep: &mut Report) -> Result<()> {
    let order = [
        (Injector::CtsyncListened, 1),
        (Injector::CtsyncMuted, 1),
        (Injector::Raw, 1),
        (Injector::CtsyncMinimal, 1),
        (Injector::Ctsync, 1),
        (Injector::Raw, 2),
        (Injector::CtsyncMinimal, 2),
        (Injector::Ctsync, 2),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); order.len()];
    for run in 0..args.runs {
        for (slot, &(who, k)) in order.iter().enumerate() {
            let r = inject_once(who, k, realistic, minimal, rep)?;
            eprintln!(
                "[inject] run {}/{}: {} k={k}: {} flows/s",
                run + 1,
                args.runs,
                who.id(),
                thousands(r)
            );
            samples[slot].push(r);
        }
    }
    let get = |who: Injector, k: usize| -> &Vec<f64> {
        let slot = order.iter().position(|&o| o == (who, k)).unwrap_or(0);
        &samples[slot]
    };
    for k in [1, 2] {
        let s = if k == 1 { "socket" } else { "sockets/threads" };
        rep.add(
            "inject",
            &format!("inject.raw.k{k}"),
            &format!("raw CT_NEW batches, minimal flows, {k} {s}"),
            "flows/s",
            get(Injector::Raw, k),
        );
        rep.add(
            "inject",
            &format!("inject.ctsync_minimal.k{k}"),
            &format!("ctsync Writer::upsert, same minimal flows, k={k}"),
            "flows/s",
            get(Injector::CtsyncMinimal, k),
        );
        rep.add(
            "inject",
            &format!("inject.ctsync.k{k}"),
            &format!("ctsync Writer::upsert, realistic mix, k={k}"),
            "flows/s",
            get(Injector::Ctsync, k),
        );
    }
    for k in [1, 2] {
        let raw = get(Injector::Raw, k);
        let ratio = |v: &Vec<f64>| -> Vec<f64> { v.iter().zip(raw).map(|(a, b)| a / b).collect() };
        rep.add(
            "inject",
            &format!("inject.ratio_minimal.k{k}"),
            &format!("ratio ctsync minimal / raw, k={k} (paired runs)"),
            "x",
            &ratio(get(Injector::CtsyncMinimal, k)),
        );
        rep.add(
            "inject",
            &format!("inject.ratio.k{k}"),
            &format!("ratio ctsync realistic / raw minimal, k={k} (paired runs)"),
            "x",
            &ratio(get(Injector::Ctsync, k)),
        );
    }
    rep.add(
        "inject",
        "inject.ctsync_listened.k1",
        "commit as a daemon writes it: an event socket subscribed, own creations filtered",
        "flows/s",
        get(Injector::CtsyncListened, 1),
    );
    rep.add(
        "inject",
        "inject.ctsync_muted.k1",
        "the same with creation events muted, as a promotion commits",
        "flows/s",
        get(Injector::CtsyncMuted, 1),
    );
    let listened = get(Injector::CtsyncListened, 1);
    let speedup: Vec<f64> = get(Injector::CtsyncMuted, 1)
        .iter()
        .zip(listened)
        .map(|(m, l)| m / l)
        .collect();
    rep.add(
        "inject",
        "inject.muted_speedup.k1",
        "speed-up of muting (paired runs; needs no other creation listener on the machine)",
        "x",
        &speedup,
    );
    Ok(())
}

// --- dump and memory -------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
struct Probe {
    flows: u64,
    rss_before: u64,
    rss_after: u64,
    hwm_before: u64,
    hwm_after: u64,
    heap_bytes: u64,
}

fn proc_status_bytes(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .with_context(|| format!("{field} missing from /proc/self/status"))?;
    let kb: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("parsing {line:?}"))?;
    Ok(kb * 1024)
}

fn malloc_trim() {
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs in a fresh child process: dumps the namespace into a FlowTable (or a Mirror) and
/// reports RSS before and after, with free heap memory returned to the system both times.
fn memory_probe(ns: &str, mode: ProbeMode) -> Result<Probe> {
    malloc_trim();
    let rss_before = proc_status_bytes("VmRSS")?;
    let hwm_before = proc_status_bytes("VmHWM")?;
    let finish = |flows: usize, heap: usize| -> Result<Probe> {
        malloc_trim();
        Ok(Probe {
            flows: flows as u64,
            rss_before,
            rss_after: proc_status_bytes("VmRSS")?,
            hwm_before,
            hwm_after: proc_status_bytes("VmHWM")?,
            heap_bytes: heap as u64,
        })
    };
    match mode {
        ProbeMode::Table => {
            let table = netns::run_in(ns, || -> Result<FlowTable> {
                let sock = CtSocket::open()?;
                let mut table = FlowTable::new();
                dump(&sock, |m| {
                    table.insert(m.flow);
                })?;
                Ok(table)
            })??;
            let p = finish(table.len(), table.heap_bytes());
            black_box(&table);
            p
        }
        ProbeMode::Mirror => {
            let flows = netns::run_in(ns, || -> Result<Vec<Flow>> {
                let sock = CtSocket::open()?;
                let mut flows = Vec::new();
                dump(&sock, |m| flows.push(m.flow))?;
                Ok(flows)
            })??;
            let mut mirror = Mirror::new();
            mirror.start();
            drop(mirror.dump_complete(flows));
            let p = finish(mirror.table().len(), mirror.table().heap_bytes());
            black_box(&mirror);
            p
        }
    }
}

fn run_probe(ns: &Netns, mode: &str) -> Result<Probe> {
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let mut child = Command::new(exe)
        .args(["--memory-probe", &ns.name, "--probe-mode", mode])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the memory probe")?;
    children().push(child.id() as i32);
    let mut stdout = Vec::new();
    let read = child
        .stdout
        .take()
        .context("memory probe stdout")?
        .read_to_end(&mut stdout);
    // Cleared before the child is reaped: its pid cannot be reused while the signal thread
    // may still kill it.
    forget_child(child.id() as i32);
    let status = child.wait().context("waiting for the memory probe")?;
    read.context("reading the memory probe's output")?;
    ensure!(status.success(), "memory probe failed: {status}");
    serde_json::from_slice(&stdout).context("parsing the memory probe's output")
}

fn bench_dump_and_memory(args: &Args, realistic: &[Flow], rep: &mut Report) -> Result<()> {
    let n = realistic.len();
    let ns = Netns::create()?;
    eprintln!("[dump] populating {n} realistic flows");
    let mut writer = ns
        .run(|| Writer::open(2, &Origins::new()))?
        .context("Writer::open")?;
    let report = writer.upsert(realistic).context("Writer::upsert")?;
    drop(writer);
    let in_kernel = ns.conntrack_count()?;
    if in_kernel != n as u64 || !report.failures.is_empty() {
        rep.note(format!(
            "dump table: {in_kernel} entries in the kernel, {} write failures",
            report.failures.len()
        ));
    }

    if wants(args, Section::Dump) {
        let (mut raw, mut ct, mut rec) = (vec![], vec![], vec![]);
        for run in 0..args.runs {
            let sock = ns.run(RawNl::open)?.context("opening a raw socket")?;
            let t0 = Instant::now();
            let count = raw_dump_count(&sock)?;
            raw.push(rate(count as usize, t0.elapsed().as_secs_f64()));
            if count != in_kernel {
                rep.note(format!("raw dump returned {count} of {in_kernel} entries"));
            }

            let sock = ns.run(CtSocket::open)?.context("CtSocket::open")?;
            let t0 = Instant::now();
            let mut count = 0u64;
            let undecodable = dump(&sock, |m| {
                count += 1;
                black_box(&m);
            })?;
            ct.push(rate(count as usize, t0.elapsed().as_secs_f64()));
            if count != in_kernel || undecodable > 0 {
                rep.note(format!(
                    "ctsync dump returned {count} of {in_kernel} entries, {undecodable} undecodable"
                ));
            }

            let sock = ns.run(CtSocket::open)?.context("CtSocket::open")?;
            let t0 = Instant::now();
            let mut flows = Vec::new();
            dump(&sock, |m| flows.push(m.flow))?;
            let mut mirror = Mirror::new();
            mirror.start();
            let (changes, _) = mirror.dump_complete(flows);
            let secs = t0.elapsed().as_secs_f64();
            rec.push(rate(mirror.table().len(), secs));
            black_box(changes);
            drop(mirror);
            eprintln!(
                "[dump] run {}/{}: raw {} ctsync {} reconcile {} flows/s",
                run + 1,
                args.runs,
                thousands(raw[run]),
                thousands(ct[run]),
                thousands(rec[run])
            );
        }
        rep.add(
            "dump",
            "dump.raw",
            "raw dump, messages counted, not decoded",
            "flows/s",
            &raw,
        );
        rep.add(
            "dump",
            "dump.ctsync",
            "ctsync::netlink::dump, decoded to CtMessage",
            "flows/s",
            &ct,
        );
        rep.add(
            "dump",
            "dump.ctsync_vs_raw",
            "ratio ctsync/raw dump (medians)",
            "x",
            &[median(&ct) / median(&raw)],
        );
        rep.add(
            "dump",
            "dump.reconcile",
            "dump + Mirror::dump_complete (initial sync)",
            "flows/s",
            &rec,
        );
    }

    if wants(args, Section::Memory) {
        let (mut t_rss, mut t_peak, mut t_heap) = (vec![], vec![], vec![]);
        let (mut m_rss, mut m_peak, mut m_heap) = (vec![], vec![], vec![]);
        for run in 0..args.runs {
            for (mode, rss, peak, heap) in [
                ("table", &mut t_rss, &mut t_peak, &mut t_heap),
                ("mirror", &mut m_rss, &mut m_peak, &mut m_heap),
            ] {
                let p = run_probe(&ns, mode)?;
                let flows = p.flows.max(1) as f64;
                if p.flows != in_kernel {
                    rep.note(format!(
                        "memory probe ({mode}) read {} of {in_kernel} flows",
                        p.flows
                    ));
                }
                rss.push(p.rss_after.saturating_sub(p.rss_before) as f64 / flows);
                peak.push(p.hwm_after.saturating_sub(p.hwm_before) as f64 / flows);
                heap.push(p.heap_bytes as f64 / flows);
            }
            eprintln!(
                "[memory] run {}/{}: FlowTable {:.1} B/flow RSS, Mirror {:.1} B/flow RSS",
                run + 1,
                args.runs,
                t_rss[run],
                m_rss[run]
            );
        }
        rep.add(
            "memory",
            "memory.table.rss_per_flow",
            "FlowTable from a dump: RSS growth / N",
            "B/flow",
            &t_rss,
        );
        rep.add(
            "memory",
            "memory.table.peak_per_flow",
            "FlowTable from a dump: peak RSS growth / N",
            "B/flow",
            &t_peak,
        );
        rep.add(
            "memory",
            "memory.table.heap_per_flow",
            "FlowTable::heap_bytes() / N",
            "B/flow",
            &t_heap,
        );
        rep.add(
            "memory",
            "memory.mirror.rss_per_flow",
            "Mirror via dump_complete: RSS growth / N",
            "B/flow",
            &m_rss,
        );
        rep.add(
            "memory",
            "memory.mirror.peak_per_flow",
            "Mirror via dump_complete: peak RSS growth / N",
            "B/flow",
            &m_peak,
        );
        rep.add(
            "memory",
            "memory.mirror.heap_per_flow",
            "Mirror table heap_bytes() / N",
            "B/flow",
            &m_heap,
        );
        rep.add(
            "memory",
            "memory.size_of_flow",
            "size_of::<Flow>()",
            "B",
            &[size_of::<Flow>() as f64],
        );
        rep.add(
            "memory",
            "memory.size_of_flowkey",
            "size_of::<FlowKey>()",
            "B",
            &[size_of::<FlowKey>() as f64],
        );
        rep.add(
            "memory",
            "memory.size_of_tuple",
            "size_of::<Tuple>()",
            "B",
            &[size_of::<Tuple>() as f64],
        );
    }
    Ok(())
}

// --- events ----------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Intake {
    matched: u64,
    other: u64,
    overruns: u64,
    undecodable: u64,
    last_event: Option<Instant>,
    mirrored: usize,
    /// Time spent in `EventSource::next_batch` (receive and decode) and applying to the mirror.
    batch_secs: f64,
    apply_secs: f64,
    /// CPU time of the reader thread over the whole intake (receive, decode, apply).
    cpu_secs: f64,
}

/// The reader: applies every event to the mirror until `expected` events of kind `want` came,
/// or the writers are done and nothing arrived for [`EVENT_IDLE`].
fn intake(
    src: &mut EventSource,
    mirror: &mut Mirror,
    want: CtEventKind,
    expected: u64,
    barrier: Option<&Barrier>,
    writers_done: &AtomicBool,
) -> Result<Intake> {
    if let Some(b) = barrier {
        b.wait();
    }
    let mut r = Intake::default();
    let cpu0 = rawnl::thread_cpu();
    let mut out = Vec::with_capacity(1024);
    let mut idle_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    while r.matched < expected {
        out.clear();
        let t0 = Instant::now();
        src.next_batch(&mut out, 1024)?;
        let t1 = Instant::now();
        if out.is_empty() {
            if (writers_done.load(Ordering::Acquire) && idle_since.elapsed() > EVENT_IDLE)
                || Instant::now() > deadline
            {
                break;
            }
            continue;
        }
        for ev in out.drain(..) {
            match ev {
                KernelEvent::Flow { msg, own } => {
                    if msg.kind == want {
                        r.matched += 1;
                    } else {
                        r.other += 1;
                    }
                    black_box(mirror.event(msg, own));
                }
                KernelEvent::Overrun => {
                    r.overruns += 1;
                    mirror.overrun();
                }
                KernelEvent::Undecodable(_) => {
                    r.undecodable += 1;
                    mirror.undecodable();
                }
            }
        }
        let now = Instant::now();
        r.batch_secs += (t1 - t0).as_secs_f64();
        r.apply_secs += (now - t1).as_secs_f64();
        r.last_event = Some(now);
        idle_since = now;
    }
    r.mirrored = mirror.table().len();
    r.cpu_secs = rawnl::thread_cpu().saturating_sub(cpu0).as_secs_f64();
    Ok(r)
}

/// Bytes queued on the event sockets (netlink sockets with groups) of the calling thread's
/// namespace, from `/proc/thread-self/net/netlink`.
fn event_socket_rmem() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netlink")?;
    let mut rmem = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let subscribed = f
            .get(3)
            .is_some_and(|g| !g.trim_start_matches('0').is_empty());
        if f.len() >= 5 && f[1] == "12" && subscribed {
            rmem += f[4].parse::<u64>().unwrap_or(0);
        }
    }
    Ok(rmem)
}

#[derive(Debug)]
struct Phase {
    intake: Intake,
    write: WriteTiming,
    /// For a paused reader: when it started draining the backlog.
    drain_start: Option<Instant>,
    /// For a paused reader: receive-buffer bytes the backlog occupied.
    queued_bytes: u64,
}

impl Phase {
    /// First write (paused reader: first read) to the last event applied.
    fn wall_secs(&self) -> f64 {
        let from = self.drain_start.unwrap_or(self.write.start);
        self.intake.last_event.map_or(f64::NAN, |t| {
            t.saturating_duration_since(from).as_secs_f64()
        })
    }

    fn applied_rate(&self) -> f64 {
        self.intake.matched as f64 / self.wall_secs()
    }

    /// Milliseconds from the last writer finishing to the last event applied (negative if the
    /// reader was done first, which the writers' final ACK round trip makes possible).
    fn lag_ms(&self) -> f64 {
        match self.intake.last_event {
            None => f64::NAN,
            Some(t) => match t.checked_duration_since(self.write.end) {
                Some(d) => d.as_secs_f64() * 1e3,
                None => -(self.write.end - t).as_secs_f64() * 1e3,
            },
        }
    }
}

/// A namespace with an event reader feeding a synced mirror, and two raw writers.
struct EventRig {
    src: EventSource,
    mirror: Mirror,
    socks: Vec<RawNl>,
    granted: usize,
    // Last: dropped after the sockets.
    ns: Netns,
}

impl EventRig {
    fn open(buffer: usize) -> Result<EventRig> {
        let ns = Netns::create()?;
        let (src, granted) = ns
            .run(move || EventSource::open(buffer, Origins::new()))?
            .context("EventSource::open")?;
        let socks = raw_writers(&ns, 2)?;
        let mut mirror = Mirror::new();
        mirror.start();
        mirror.dump_complete(Vec::new());
        Ok(EventRig {
            src,
            mirror,
            socks,
            granted,
            ns,
        })
    }

    /// `concurrent`: the reader runs while the writers write (the real situation). Otherwise
    /// it waits until they are done: the kernel's rate without a competing reader, then the
    /// reader alone draining the backlog.
    fn phase(
        &mut self,
        batches: &[Batches],
        want: CtEventKind,
        expected: u64,
        concurrent: bool,
    ) -> Result<Phase> {
        let EventRig {
            src,
            mirror,
            socks,
            ns,
            ..
        } = self;
        if !concurrent {
            let write = raw_write(socks, batches, &Barrier::new(socks.len()))?;
            let queued_bytes = ns
                .run(event_socket_rmem)?
                .context("reading /proc/thread-self/net/netlink")?;
            let start = Instant::now();
            let intake = intake(src, mirror, want, expected, None, &AtomicBool::new(true))?;
            return Ok(Phase {
                intake,
                write,
                drain_start: Some(start),
                queued_bytes,
            });
        }
        let barrier = Barrier::new(socks.len() + 1);
        let done = AtomicBool::new(false);
        let (write, intake) = std::thread::scope(|s| {
            let (barrier, done) = (&barrier, &done);
            let reader = s.spawn(move || intake(src, mirror, want, expected, Some(barrier), done));
            let write = raw_write(socks, batches, barrier);
            done.store(true, Ordering::Release);
            let intake = reader
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (write, intake)
        });
        Ok(Phase {
            write: write?,
            intake: intake?,
            drain_start: None,
            queued_bytes: 0,
        })
    }
}

/// Samples of several figures, in first-seen order.
#[derive(Default)]
struct Series(Vec<(String, String, &'static str, Vec<f64>)>);

impl Series {
    fn push(&mut self, id: &str, label: &str, unit: &'static str, v: f64) {
        match self.0.iter_mut().find(|s| s.0 == id) {
            Some(s) => s.3.push(v),
            None => self.0.push((id.into(), label.into(), unit, vec![v])),
        }
    }

    fn report(self, rep: &mut Report, section: &'static str) {
        for (id, label, unit, v) in self.0 {
            rep.add(section, &id, &label, unit, &v);
        }
    }
}

fn kind_name(k: CtEventKind) -> &'static str {
    match k {
        CtEventKind::New => "NEW",
        CtEventKind::Update => "UPDATE",
        CtEventKind::Destroy => "DESTROY",
    }
}

fn check_phase(rep: &mut Report, p: &Phase, what: &str, n: usize, mirror_should_hold: usize) {
    if p.write.outcome.errors > 0 {
        rep.note(format!(
            "events {what}: {} raw writes failed (first: {})",
            p.write.outcome.errors,
            io::Error::from_raw_os_error(p.write.outcome.first_errno)
        ));
    }
    if p.intake.overruns > 0 || p.intake.matched != n as u64 {
        rep.note(format!(
            "events {what}: {} overrun(s), {} of {n} events received: the mirror would need a resync",
            p.intake.overruns, p.intake.matched
        ));
    } else if p.intake.mirrored != mirror_should_hold {
        rep.note(format!(
            "events {what}: mirror holds {} flows afterwards, expected {mirror_should_hold}",
            p.intake.mirrored
        ));
    }
    if p.intake.undecodable > 0 {
        rep.note(format!(
            "events {what}: {} undecodable events",
            p.intake.undecodable
        ));
    }
}

fn bench_events(args: &Args, minimal: &[Flow], rep: &mut Report) -> Result<()> {
    let n = minimal.len();
    let creates = split_batches(minimal, 2, raw_create);
    let deletes = split_batches(minimal, 2, raw_delete);
    let phases = [
        (&creates, CtEventKind::New, n),
        (&deletes, CtEventKind::Destroy, 0),
    ];
    let mut series = Series::default();

    // The real situation: the reader competes with the writers.
    for &bufsize in &args.event_buffer {
        for run in 0..args.runs {
            let mut rig = EventRig::open(bufsize)?;
            let buf = mib(rig.granted);
            for &(batches, kind, holds) in &phases {
                let p = rig.phase(batches, kind, n as u64, true)?;
                let what = format!("{} [{buf}]", kind_name(kind));
                check_phase(rep, &p, &what, n, holds);
                let id = format!(
                    "events.{}.{}",
                    kind_name(kind).to_lowercase(),
                    buf.replace(' ', "")
                );
                let rows: [(&str, &str, &'static str, f64); 8] = [
                    (
                        "received",
                        "events received",
                        "events",
                        (p.intake.matched + p.intake.other) as f64,
                    ),
                    (
                        "overruns",
                        "overruns (ENOBUFS)",
                        "overruns",
                        p.intake.overruns as f64,
                    ),
                    (
                        "lost",
                        "events missing at the end",
                        "events",
                        n as f64 - p.intake.matched as f64,
                    ),
                    (
                        "kernel_rate",
                        "kernel create/delete rate, 2 writers",
                        "flows/s",
                        rate(n, p.write.secs()),
                    ),
                    (
                        "applied_rate",
                        "events applied/s, first write to last event",
                        "events/s",
                        p.applied_rate(),
                    ),
                    (
                        "wall_ms",
                        "wall time, first write to last event",
                        "ms",
                        p.wall_secs() * 1e3,
                    ),
                    ("lag_ms", "lag after the writers finished", "ms", p.lag_ms()),
                    (
                        "reader_cpu_us",
                        "reader thread CPU per event (receive, decode, apply)",
                        "us",
                        p.intake.cpu_secs * 1e6 / p.intake.matched.max(1) as f64,
                    ),
                ];
                for (key, label, unit, v) in rows {
                    series.push(&format!("{id}.{key}"), &format!("{what} {label}"), unit, v);
                }
                eprintln!(
                    "[events] run {}/{} {what}: {} of {n} events, {} overruns, kernel {} flows/s, \
                     applied {} events/s, lag {:.1} ms",
                    run + 1,
                    args.runs,
                    p.intake.matched,
                    p.intake.overruns,
                    thousands(rate(n, p.write.secs())),
                    thousands(p.applied_rate()),
                    p.lag_ms()
                );
            }
        }
    }

    // Decomposition: the kernel with an idle listener, then the reader alone on the backlog.
    let mut per_event = Vec::new();
    for run in 0..args.runs {
        let mut rig = EventRig::open(args.drain_buffer)?;
        let buf = mib(rig.granted);
        for &(batches, kind, holds) in &phases {
            let p = rig.phase(batches, kind, n as u64, false)?;
            let what = format!("{} [{buf}, reader paused]", kind_name(kind));
            check_phase(rep, &p, &what, n, holds);
            let id = format!("events.drain.{}", kind_name(kind).to_lowercase());
            let bytes_per_event = p.queued_bytes as f64 / n as f64;
            if kind == CtEventKind::New {
                per_event.push(bytes_per_event);
            }
            let per_event_us = |secs: f64| secs * 1e6 / p.intake.matched.max(1) as f64;
            let rows: [(&str, &str, &'static str, f64); 6] = [
                (
                    "kernel_rate",
                    "kernel rate, 2 writers, idle listener",
                    "flows/s",
                    rate(n, p.write.secs()),
                ),
                (
                    "queued_bytes",
                    "receive buffer used per queued event",
                    "B/event",
                    bytes_per_event,
                ),
                (
                    "drain_rate",
                    "reader alone: events applied/s",
                    "events/s",
                    p.applied_rate(),
                ),
                (
                    "next_batch_us",
                    "reader: in EventSource::next_batch, per event",
                    "us",
                    per_event_us(p.intake.batch_secs),
                ),
                (
                    "apply_us",
                    "reader: in Mirror::event, per event",
                    "us",
                    per_event_us(p.intake.apply_secs),
                ),
                (
                    "lost",
                    "events missing at the end",
                    "events",
                    n as f64 - p.intake.matched as f64,
                ),
            ];
            for (key, label, unit, v) in rows {
                series.push(&format!("{id}.{key}"), &format!("{what} {label}"), unit, v);
            }
            eprintln!(
                "[events] run {}/{} {what}: kernel {} flows/s, {:.0} B/event queued, drained at {} events/s",
                run + 1,
                args.runs,
                thousands(rate(n, p.write.secs())),
                bytes_per_event,
                thousands(p.applied_rate())
            );
        }
    }
    for run in 0..args.runs {
        for (batch, label) in [
            (1, "raw reader alone: recv() per datagram, count only"),
            (64, "raw reader alone: recvmmsg(64), count only"),
        ] {
            let ns = Netns::create()?;
            let buffer = args.drain_buffer;
            let listener = ns
                .run(move || RawNl::listener(buffer))?
                .context("opening a raw event socket")?;
            let socks = raw_writers(&ns, 2)?;
            raw_write(&socks, &creates, &Barrier::new(socks.len()))?;
            let t0 = Instant::now();
            let (msgs, overruns) = raw_drain(&listener, batch)?;
            let r = rate(msgs as usize, t0.elapsed().as_secs_f64());
            if msgs != n as u64 || overruns > 0 {
                rep.note(format!(
                    "events raw drain (batch {batch}): {msgs} of {n} events, {overruns} overruns"
                ));
            }
            series.push(
                &format!("events.drain.raw_batch{batch}.drain_rate"),
                &format!("NEW [{}] {label}", mib(args.drain_buffer)),
                "events/s",
                r,
            );
            eprintln!(
                "[events] run {}/{} raw drain, batch {batch}: {} events/s",
                run + 1,
                args.runs,
                thousands(r)
            );
        }
    }
    let per_event = median(&per_event);
    for &bufsize in &args.event_buffer {
        series.push(
            &format!("events.capacity.{}", mib(bufsize).replace(' ', "")),
            &format!("NEW events a {} buffer holds (from B/event)", mib(bufsize)),
            "events",
            bufsize as f64 / per_event,
        );
    }
    series.report(rep, "events");
    Ok(())
}
