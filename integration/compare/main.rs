//! `ctsync-compare`: ctsync and conntrackd side by side, on the same work, in the same run.
//!
//! Every measurement builds two firewall namespaces, A and B, joined by a sync link (a veth
//! pair, its traffic untracked), starts one daemon of the same implementation in each, and then:
//! - **replication**: creates N flows in A's kernel as fast as the kernel takes them, and times
//!   until B's external cache holds all N (total, and the tail after A's kernel was done);
//! - **commit**: B writes its external cache into its kernel; B's table is then dumped and
//!   compared key by key with the N flows (completeness);
//! - **resync**: B is stopped, its kernel table emptied, B started again: time until its
//!   external cache holds N again;
//! - **delete burst**: the N flows are deleted from A's kernel: time until B's cache is empty;
//! - CPU seconds (user + system, both nodes, the whole scenario, and per phase: B's stop before
//!   its restart is a phase of its own) and peak RSS of each daemon;
//! - **loss**: the replication again with 10% of the packets dropped at each end of the sync
//!   link (nft `numgen random`), completeness checked after a commit;
//! - **latency**: both daemons injecting as flows arrive (ctsync `continuous`, conntrackd
//!   `DisableExternalCache`), flows created in A at a steady rate; a listener in B's namespace
//!   timestamps each flow's arrival in B's kernel: A's kernel to B's kernel, per flow.
//!
//! A raw batched netlink writer (minimal messages) creating the same N flows in an empty table
//! is measured in the same run: the kernel's own floor for a commit.
//!
//! Figures go to stdout (a table, or JSON with `--json`); progress to stderr. Namespaces are
//! `ctsb-<pid>-<n>` and removed on every path, daemons are our children and stopped by pid.
//! To profile a phase, run under `perf record -a -k CLOCK_MONOTONIC` with
//! `CTSYNC_COMPARE_MARKS=1`: the phase boundaries are printed for `perf report --time`.

#[path = "../bench/flows.rs"]
#[allow(dead_code)]
mod flows;
#[path = "../bench/lab.rs"]
#[allow(dead_code)]
mod lab;
#[path = "../bench/rawnl.rs"]
#[allow(dead_code)]
mod rawnl;

mod daemons;
mod report;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use ctsync::flow::{Flow, Tuple};
use ctsync::netlink::{self, CtEventKind, CtSocket, EventSource, KernelEvent, Origins, Writer};
use daemons::{Daemon, Kind, Mode};
use lab::Netns;
use report::{Report, Sample};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a daemon's cache is polled while waiting for it.
const POLL: Duration = Duration::from_millis(2);

#[derive(Parser, Debug)]
#[command(
    name = "ctsync-compare",
    about = "ctsync against conntrackd (FTFW over UDP) on the same work, in the same run"
)]
pub struct Args {
    /// Flow counts to measure (comma-separated; each must stay below nf_conntrack_max).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,250000")]
    flows: Vec<usize>,
    /// Repetitions of every measurement; medians and min–max are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Implementations to run (default: both; conntrackd is skipped with a message when it
    /// is not installed).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Kind>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file (the table still goes to stdout).
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Skip the 10%-loss replication.
    #[arg(long)]
    no_loss: bool,
    /// Flow counts for the loss measurement (default: the same as --flows).
    #[arg(long, value_delimiter = ',')]
    loss_flows: Vec<usize>,
    /// Skip the steady-rate latency measurement.
    #[arg(long)]
    no_latency: bool,
    /// Let the kernel place both daemons on any CPU (by default A's runs on one CPU and B's on
    /// another, as on two machines).
    #[arg(long)]
    shared_cpus: bool,
    /// Flows per second of the latency measurement.
    #[arg(long, default_value_t = 10_000)]
    latency_rate: usize,
    /// Seconds of the latency measurement.
    #[arg(long, default_value_t = 5)]
    latency_secs: usize,
    /// Write every flow's latency to files in this directory, one per implementation and run
    /// (`<implementation>-<run>.txt`: seconds since the first creation, then milliseconds to B's
    /// kernel, or -1 if it never arrived): to tell a stall that delays every flow of a moment
    /// from a slow path that delays some flows all along.
    #[arg(long)]
    latency_dump: Option<PathBuf>,
    /// Give up waiting for a cache after this many seconds (completeness is then below 1).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Keep the daemons' configs and logs in this directory (default: a temporary one,
    /// removed at the end).
    #[arg(long)]
    keep: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemons::OWN_CPU.store(!args.shared_cpus, std::sync::atomic::Ordering::Relaxed);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctsync-compare: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The sync-link interface of node 0 and node 1 (each inside its own namespace).
pub fn link_name(node: usize) -> &'static str {
    ["ctcmp-a", "ctcmp-b"][node]
}

fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "must run as root: it creates network namespaces and runs daemons in them \
         (try: sudo integration/compare.sh)"
    );
    ensure!(args.runs > 0, "--runs must be positive");
    ensure!(!args.flows.is_empty(), "--flows needs at least one count");
    ensure!(
        args.latency_rate >= 1000,
        "--latency-rate must be at least 1000 flows/s"
    );
    lab::install_signal_cleanup()?;
    if lab::remove_stale_namespaces() {
        std::thread::sleep(Duration::from_secs(1));
    }
    let max = {
        let ns = Netns::create()?;
        ns.run(|| lab::read_sysctl("nf_conntrack_max"))?
            .context("reading nf_conntrack_max")?
    };
    let loss_flows = if args.loss_flows.is_empty() {
        args.flows.clone()
    } else {
        args.loss_flows.clone()
    };
    let latency_flows = args.latency_rate * args.latency_secs;
    for &n in args.flows.iter().chain(&loss_flows).chain([&latency_flows]) {
        ensure!(
            n > 0 && (n as u64) < max,
            "{n} flows do not fit in nf_conntrack_max {max}"
        );
        ensure!(
            n < 1 << 24,
            "{n} flows: tuples are derived from the flow number, below 2^24"
        );
    }

    let mut report = Report::new(args, max);
    let kinds = kinds(args, &mut report);
    let base = match &args.keep {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("ctsync-compare-{}", std::process::id())),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    daemons::make_pki(&base)?;

    let largest = args
        .flows
        .iter()
        .chain(&loss_flows)
        .chain([&latency_flows])
        .max();
    let all: Vec<Flow> = (0..*largest.unwrap_or(&0))
        .map(flows::realistic_flow)
        .collect();
    for run in 0..args.runs {
        for &n in &args.flows {
            let sample = raw_commit(&all[..n])?;
            let floor = sample.get("kernel_cpu_floor_s");
            report.add("raw", n, sample);
            for &kind in &kinds {
                eprintln!(
                    "[run {}/{}] {} with {n} flows",
                    run + 1,
                    args.runs,
                    kind.name()
                );
                let mut s = scenario(kind, &all[..n], &base, args)
                    .with_context(|| format!("{} with {n} flows", kind.name()))?;
                if let (Some(cpu), Some(floor)) = (s.get("cpu_s"), floor) {
                    s.set("cpu_above_floor_s", cpu - floor);
                }
                report.add(kind.name(), n, s);
            }
        }
        if !args.no_loss {
            for &n in &loss_flows {
                for &kind in &kinds {
                    eprintln!(
                        "[run {}/{}] {} with {n} flows, 10% loss",
                        run + 1,
                        args.runs,
                        kind.name()
                    );
                    let s = lossy(kind, &all[..n], &base, args)
                        .with_context(|| format!("{} with {n} flows and loss", kind.name()))?;
                    report.add(kind.name(), n, s);
                }
            }
        }
        if !args.no_latency {
            for &kind in &kinds {
                eprintln!(
                    "[run {}/{}] {} latency at {} flows/s",
                    run + 1,
                    args.runs,
                    kind.name(),
                    args.latency_rate
                );
                let s = latency(kind, &all[..latency_flows], &base, args, run + 1)
                    .with_context(|| format!("{} latency", kind.name()))?;
                report.add(kind.name(), 0, s);
            }
        }
    }
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    report.finish();
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        report.print_table();
    }
    Ok(())
}

fn kinds(args: &Args, report: &mut Report) -> Vec<Kind> {
    let mut kinds = if args.only.is_empty() {
        vec![Kind::Ctsync, Kind::Conntrackd]
    } else {
        args.only.clone()
    };
    if kinds.contains(&Kind::Conntrackd) {
        match conntrackd_version() {
            Some(v) => report.meta_conntrackd(v),
            None => {
                report.note(
                    "conntrackd is not installed (Debian: apt-get install conntrackd): it is \
                     skipped, and no ratio can be given"
                        .into(),
                );
                kinds.retain(|k| *k != Kind::Conntrackd);
            }
        }
    }
    kinds
}

fn conntrackd_version() -> Option<String> {
    let out = Command::new("conntrackd")
        .arg("-v")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| l.contains("Connection tracking userspace daemon"))
        .map(|l| l.trim().to_string())
}

// --- the lab -------------------------------------------------------------------------------

/// Two firewall namespaces joined by the sync link.
struct Pair {
    ns: [Netns; 2],
    dir: PathBuf,
}

impl Pair {
    fn new(base: &Path, loss: bool) -> Result<Pair> {
        let ns = [Netns::create()?, Netns::create()?];
        lab::ip(&[
            "link",
            "add",
            link_name(0),
            "netns",
            &ns[0].name,
            "type",
            "veth",
            "peer",
            "name",
            link_name(1),
            "netns",
            &ns[1].name,
        ])?;
        for (i, n) in ns.iter().enumerate() {
            let addr = format!("{}/30", daemons::LINK_ADDR[i]);
            lab::ip(&["-n", &n.name, "addr", "add", &addr, "dev", link_name(i)])?;
            lab::ip(&["-n", &n.name, "link", "set", link_name(i), "up"])?;
            lab::ip(&["-n", &n.name, "link", "set", "lo", "up"])?;
            nft(&n.name, &link_rules(link_name(i), loss))?;
        }
        let dir = base.join(&ns[0].name);
        std::fs::create_dir_all(&dir)?;
        Ok(Pair { ns, dir })
    }

    /// Starts both daemons and waits until replication is up.
    fn daemons(&self, kind: Kind, mode: Mode) -> Result<(Daemon, Daemon)> {
        let a = Daemon::start(kind, &self.ns[0], 0, mode, &self.dir)?;
        let b = Daemon::start(kind, &self.ns[1], 1, mode, &self.dir)?;
        let t0 = Instant::now();
        while !(a.ready() && b.ready()) {
            ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "replication did not come up in 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((a, b))
    }
}

/// The sync link's traffic is not tracked (it would be replicated and counted otherwise);
/// with `loss`, 10% of the packets arriving on it are dropped.
fn link_rules(link: &str, loss: bool) -> String {
    let drop = if loss {
        format!(
            "chain lossy {{ type filter hook prerouting priority -250; policy accept; \
             iifname \"{link}\" numgen random mod 100 < 10 drop; }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "table inet ctsync_compare {{\n\
         chain pre {{ type filter hook prerouting priority -300; policy accept; iifname \"{link}\" notrack; }}\n\
         chain out {{ type filter hook output priority -300; policy accept; oifname \"{link}\" notrack; }}\n\
         {drop}}}\n"
    )
}

fn nft(ns: &str, rules: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (apt-get install nftables)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn writer(ns: &Netns, sockets: usize) -> Result<Writer> {
    ns.run(move || Writer::open(sockets, &Origins::new()))?
        .context("opening a writer")
}

/// What identifies a flow across both implementations: the zone id and the original tuple
/// (conntrackd does not replicate the zone's direction).
type Key = (u16, Tuple);

fn key(f: &Flow) -> Key {
    (f.key.zone.id, f.key.orig)
}

/// How many of `flows` are in the namespace's kernel table.
fn kernel_matches(ns: &Netns, flows: &[Flow]) -> Result<usize> {
    let keys: HashSet<Key> = ns.run(|| {
        let sock = CtSocket::open()?;
        let mut keys = HashSet::new();
        netlink::dump(&sock, |m| {
            keys.insert(key(&m.flow));
        })?;
        Ok::<_, anyhow::Error>(keys)
    })??;
    Ok(flows.iter().filter(|f| keys.contains(&key(f))).count())
}

/// Polls `d`'s external cache until it holds `target` flows or the timeout passes; returns
/// when it did (None on timeout) and the last count seen.
fn wait_count(d: &Daemon, target: u64, timeout: Duration) -> Result<(Option<Instant>, u64)> {
    let t0 = Instant::now();
    loop {
        let n = d.external_count()?;
        if n == target {
            return Ok((Some(Instant::now()), n));
        }
        if t0.elapsed() > timeout {
            return Ok((None, n));
        }
        std::thread::sleep(POLL);
    }
}

fn secs_since(t0: Instant, t: Option<Instant>) -> f64 {
    t.map_or(f64::NAN, |t| (t - t0).as_secs_f64())
}

fn ms_since(t0: Instant, t: Option<Instant>) -> f64 {
    secs_since(t0, t) * 1e3
}

// --- scenarios -----------------------------------------------------------------------------

/// Replication, commit, resync, delete burst, CPU and memory, on one fresh pair.
fn scenario(kind: Kind, flows: &[Flow], base: &Path, args: &Args) -> Result<Sample> {
    let n = flows.len();
    let timeout = Duration::from_secs(args.timeout);
    let mut s = Sample::default();
    let pair = Pair::new(base, false)?;
    let (mut a, mut b) = pair.daemons(kind, Mode::Cache)?;
    s.set("idle_rss_a_mib", mib(a.idle_rss));
    s.set("idle_rss_b_mib", mib(b.idle_rss));
    let mut w = writer(&pair.ns[0], 2)?;
    let mut cpu = CpuPhases::new(&a, &b);

    let t0 = Instant::now();
    let rep = w.upsert(flows)?;
    let t1 = Instant::now();
    ensure!(
        rep.failures.is_empty() && rep.created == n as u64,
        "A's kernel refused flows: {} created, first failures {:?}",
        rep.created,
        &rep.failures[..rep.failures.len().min(3)]
    );
    let (done, seen) = wait_count(&b, n as u64, timeout)?;
    s.set("fill_s", (t1 - t0).as_secs_f64());
    s.set("replication_s", secs_since(t0, done));
    s.set("replication_tail_ms", ms_since(t1, done));
    s.set("replication_completeness", seen as f64 / n as f64);
    cpu.phase(&mut s, "replication", &a, &b);
    s.set("rss_a_replicated_mib", mib(a.rss()));
    s.set("rss_b_replicated_mib", mib(b.rss()));

    let commit = b.commit()?;
    s.set("commit_s", commit.as_secs_f64());
    cpu.phase(&mut s, "commit", &a, &b);
    s.set(
        "commit_completeness",
        kernel_matches(&pair.ns[1], flows)? as f64 / n as f64,
    );
    cpu.skip(&a, &b);
    s.set("commit_overruns_b", b.event_overruns()? as f64);

    b.stop();
    // Apart from the resync: a daemon's exit work (conntrackd frees its caches entry by entry)
    // is not part of what a restarted node costs to catch up.
    cpu.phase(&mut s, "stop", &a, &b);
    pair.ns[1].run(rawnl::raw_flush)??;
    let t0 = Instant::now();
    b.restart()?;
    let (done, seen) = wait_count(&b, n as u64, timeout)?;
    s.set("resync_s", secs_since(t0, done));
    s.set("resync_completeness", seen as f64 / n as f64);
    cpu.phase(&mut s, "resync", &a, &b);

    let t0 = Instant::now();
    let rep = w.delete(flows)?;
    let t1 = Instant::now();
    ensure!(
        rep.failures.is_empty(),
        "A's kernel refused deletions: {:?}",
        &rep.failures[..1]
    );
    let (done, seen) = wait_count(&b, 0, timeout)?;
    s.set("delete_s", secs_since(t0, done));
    s.set("delete_tail_ms", ms_since(t1, done));
    s.set("delete_completeness", 1.0 - seen as f64 / n as f64);
    cpu.phase(&mut s, "delete", &a, &b);

    let (ua, ub) = (a.usage(), b.usage());
    a.stop();
    b.stop();
    s.set("cpu_a_s", ua.cpu_secs);
    s.set("cpu_b_s", ub.cpu_secs);
    s.set("cpu_s", ua.cpu_secs + ub.cpu_secs);
    s.set("peak_rss_a_mib", mib(ua.peak_rss));
    s.set("peak_rss_b_mib", mib(ub.peak_rss));
    s.set("rss_per_flow_a_b", ua.peak_rss as f64 / n as f64);
    s.set("rss_per_flow_b_b", ub.peak_rss as f64 / n as f64);
    Ok(s)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// CPU seconds of both daemons per phase of a scenario.
struct CpuPhases {
    last: f64,
}

impl CpuPhases {
    fn new(a: &Daemon, b: &Daemon) -> CpuPhases {
        mark("start");
        CpuPhases {
            last: a.usage().cpu_secs + b.usage().cpu_secs,
        }
    }

    /// Records the CPU used since the last phase, under `cpu_<name>_s`.
    fn phase(&mut self, s: &mut Sample, name: &'static str, a: &Daemon, b: &Daemon) {
        let now = a.usage().cpu_secs + b.usage().cpu_secs;
        let metric = match name {
            "replication" => "cpu_replication_s",
            "commit" => "cpu_commit_s",
            "stop" => "cpu_stop_s",
            "resync" => "cpu_resync_s",
            _ => "cpu_delete_s",
        };
        s.set(metric, now - self.last);
        self.last = now;
        mark(name);
    }

    /// Leaves out what happened since the last phase (the benchmark's own checks).
    fn skip(&mut self, a: &Daemon, b: &Daemon) {
        mark("skip");
        self.last = a.usage().cpu_secs + b.usage().cpu_secs;
    }
}

/// Replication with 10% loss each way on the sync link; completeness checked in B's kernel
/// after a commit.
fn lossy(kind: Kind, flows: &[Flow], base: &Path, args: &Args) -> Result<Sample> {
    let n = flows.len();
    let mut s = Sample::default();
    let pair = Pair::new(base, true)?;
    let (_a, b) = pair.daemons(kind, Mode::Cache)?;
    let mut w = writer(&pair.ns[0], 2)?;
    let t0 = Instant::now();
    let rep = w.upsert(flows)?;
    ensure!(rep.failures.is_empty(), "A's kernel refused flows");
    let (done, seen) = wait_count(&b, n as u64, Duration::from_secs(args.timeout))?;
    s.set("loss_replication_s", secs_since(t0, done));
    s.set("loss_replication_completeness", seen as f64 / n as f64);
    b.commit()?;
    s.set(
        "loss_commit_completeness",
        kernel_matches(&pair.ns[1], flows)? as f64 / n as f64,
    );
    Ok(s)
}

/// Flows created in A at a steady rate, timed from A's kernel to B's kernel, both daemons
/// injecting as flows arrive.
fn latency(kind: Kind, flows: &[Flow], base: &Path, args: &Args, run: usize) -> Result<Sample> {
    let pair = Pair::new(base, false)?;
    let (_a, _b) = pair.daemons(kind, Mode::Inject)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut source = pair.ns[1]
        .run(|| EventSource::open(64 << 20, Origins::new()))??
        .0;
    let expected = flows.len();
    let listener = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            instrument_priority();
            // Sized up front: growing it rehashes every flow seen so far on this thread, and the
            // events read meanwhile were stamped late (clusters of several ms at 14k and 28k
            // flows, for both daemons alike).
            let mut seen: HashMap<Key, Instant> = HashMap::with_capacity(expected);
            let mut overruns = 0u64;
            let mut batch = Vec::with_capacity(1024);
            while !stop.load(Ordering::Relaxed) {
                batch.clear();
                if source.next_batch(&mut batch, 1024).is_err() {
                    break;
                }
                let now = Instant::now();
                for ev in batch.drain(..) {
                    match ev {
                        KernelEvent::Flow { msg, .. } if msg.kind == CtEventKind::New => {
                            seen.entry(key(&msg.flow)).or_insert(now);
                        }
                        KernelEvent::Overrun => overruns += 1,
                        _ => {}
                    }
                }
            }
            (seen, overruns)
        })
    };
    let mut w = writer(&pair.ns[0], 1)?;
    let per_ms = (args.latency_rate / 1000).max(1);
    mark(&format!("{} latency start", kind.name()));
    let t0 = Instant::now();
    let mut created_at = Vec::with_capacity(flows.len());
    for (i, chunk) in flows.chunks(per_ms).enumerate() {
        let due = t0 + Duration::from_millis(i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Stamped before the write, not after: a daemon woken by the creation events on this
        // CPU (a real-time one preempts us) may carry them to B's kernel before the write
        // returns, and a stamp taken then would show a latency of zero. Conservative by the
        // kernel's time to create the chunk (tens of µs), for both daemons alike.
        let before = Instant::now();
        let rep = w.upsert(chunk)?;
        ensure!(rep.failures.is_empty(), "A's kernel refused flows");
        created_at.extend(chunk.iter().map(|f| (key(f), before)));
    }
    let sent_s = t0.elapsed().as_secs_f64();
    // Stragglers: wait until B's kernel holds them all, or 5 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && pair.ns[1].run(|| lab::read_sysctl("nf_conntrack_count"))?? < flows.len() as u64
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (seen, overruns) = listener
        .join()
        .map_err(|_| anyhow::anyhow!("listener thread panicked"))?;
    if overruns > 0 {
        bail!("B's listener overran {overruns} times: latencies would be incomplete");
    }
    if let Some(dir) = &args.latency_dump {
        dump_latencies(dir, kind, run, t0, &created_at, &seen)?;
    }
    let mut lat: Vec<f64> = created_at
        .iter()
        .filter_map(|(k, t)| {
            seen.get(k)
                .map(|r| r.saturating_duration_since(*t).as_secs_f64() * 1e3)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let mut s = Sample::default();
    s.set("latency_rate_per_s", flows.len() as f64 / sent_s);
    s.set(
        "latency_completeness",
        lat.len() as f64 / flows.len() as f64,
    );
    for (name, q) in [
        ("latency_p50_ms", 0.5),
        ("latency_p90_ms", 0.9),
        ("latency_p99_ms", 0.99),
        ("latency_p999_ms", 0.999),
    ] {
        s.set(name, report::quantile(&lat, q));
    }
    s.set("latency_max_ms", lat.last().copied().unwrap_or(f64::NAN));
    Ok(s)
}

/// Puts the calling thread (the latency listener) above both daemons: `SCHED_FIFO` at 99.
///
/// The listener is the instrument. Both daemons run their threads under a real-time policy (as
/// conntrackd does by default), so an ordinary-priority listener waits for a CPU whenever they
/// are busy, and stamps every event read after the wait late by that wait: per-flow dumps
/// showed clusters of hundreds of flows, all read within a few µs of each other, tens of ms after
/// B's kernel had them, while `perf sched` showed the listener runnable and not running. At 99
/// it preempts either daemon at once; its own work per event is a read and a map insert.
fn instrument_priority() {
    let param = libc::sched_param { sched_priority: 99 };
    // SAFETY: `param` is a valid sched_param for the duration of the call; pid 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        eprintln!(
            "warning: the latency listener cannot run at SCHED_FIFO 99 ({}): latencies include \
             its waits behind the daemons",
            std::io::Error::last_os_error()
        );
    }
}

/// See `--latency-dump`.
fn dump_latencies(
    dir: &Path,
    kind: Kind,
    run: usize,
    t0: Instant,
    created_at: &[(Key, Instant)],
    seen: &HashMap<Key, Instant>,
) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}-{run}.txt", kind.name()));
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for (k, t) in created_at {
        let ms = seen.get(k).map_or(-1.0, |r| {
            r.saturating_duration_since(*t).as_secs_f64() * 1e3
        });
        writeln!(out, "{:.6} {ms:.4}", (*t - t0).as_secs_f64())?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// The kernel's floor for a commit: a raw batched writer (two sockets, minimal messages)
/// creating the same N flows in an empty table; alone, and with an event listener draining
/// the namespace's events (as every daemon has one, and the kernel then builds an event per
/// creation).
fn raw_commit(flows: &[Flow]) -> Result<Sample> {
    let mut s = Sample::default();
    s.set("raw_commit_s", raw_write_once(flows, false)?);
    s.set("raw_commit_listened_s", raw_write_once(flows, true)?);
    kernel_cpu_floor(flows, &mut s)?;
    Ok(s)
}

/// The kernel's share of a scenario's CPU, which no daemon can avoid, measured with raw
/// sockets in two empty namespaces standing for A and B, one batched writer each (one socket:
/// creations are serialised under the ctnetlink lock, a second one would only spin) and one
/// listener each that receives events without decoding them:
/// - A's writer creates the N flows while A's listener receives their N events (replication);
/// - B's writer creates the same N flows as a commit writes them (full messages: NAT, TCP
///   state, mark, zone, labels) while A's N flows are still in the kernel, as they are during a
///   scenario's commit (the kernel's conntrack hash table is shared by every namespace);
/// - A's writer deletes the N flows while A's listener receives N more events (delete burst).
///
/// The kernel charges each side's work to its thread. The floor is B's writer for the commit
/// (with the kernel building an event per creation, since B listens) and A's listener twice.
/// B reading back the events of its own creations is not counted: it can be avoided (ctsyncd
/// has the kernel drop them; conntrackd reads them). Sending flows between the nodes (TCP or
/// UDP) is not counted either: the floor is the kernel table's work only.
fn kernel_cpu_floor(flows: &[Flow], s: &mut Sample) -> Result<()> {
    let (a, b) = (RawSide::create()?, RawSide::create()?);
    let n = flows.len() as u64;
    let creates = rawnl::build_batches(flows, 0, rawnl::raw_create);
    let commits = rawnl::build_batches(flows, 0, commit_create);
    let deletes = rawnl::build_batches(flows, n as u32, rawnl::raw_delete);
    let (_, _, create_heard) = a.write(&creates, n)?;
    let (commit_cpu, commit_wall, _) = b.write(&commits, n)?;
    let (_, _, delete_heard) = a.write(&deletes, n)?;
    b.ns.run(rawnl::raw_flush)??;
    let listen_create = create_heard.cpu.as_secs_f64();
    let listen_delete = delete_heard.cpu.as_secs_f64();
    s.set("raw_commit_full_s", commit_wall);
    s.set("floor_create_writer_cpu_s", commit_cpu);
    s.set("floor_create_events_cpu_s", listen_create);
    s.set("floor_delete_events_cpu_s", listen_delete);
    s.set(
        "kernel_cpu_floor_s",
        commit_cpu + listen_create + listen_delete,
    );
    Ok(())
}

/// A creation as ctsyncd's commit writes it (the codec's own encoder, no ACK).
fn commit_create(buf: &mut Vec<u8>, f: &Flow, seq: u32) {
    netlink::codec::encode_write(buf, netlink::WriteOp::Create, f, seq, false);
}

/// A namespace with a raw writer and a raw listener, for [`kernel_cpu_floor`].
///
/// Its table must be emptied before it is dropped: a namespace's remaining entries are freed
/// by a kernel worker after its deletion, which would still be running when the next
/// measurement starts.
struct RawSide {
    ns: Netns,
    writer: rawnl::RawNl,
    listener: rawnl::RawNl,
}

impl RawSide {
    fn create() -> Result<RawSide> {
        let ns = Netns::create()?;
        let listener = ns.run(|| rawnl::RawNl::listener(512 << 20))??;
        listener.set_recv_timeout(Duration::from_millis(50))?;
        let writer = ns.run(rawnl::RawNl::writer)??;
        Ok(RawSide {
            ns,
            writer,
            listener,
        })
    }

    /// Sends `batches` while the listener receives the `n` events they cause; returns the
    /// writer's CPU seconds, its wall-clock seconds and what the listener heard.
    fn write(&self, batches: &rawnl::Batches, n: u64) -> Result<(f64, f64, rawnl::Listened)> {
        std::thread::scope(|sc| {
            let heard = sc.spawn(|| rawnl::raw_listen(&self.listener, n, Duration::from_secs(2)));
            let (cpu0, t0) = (rawnl::thread_cpu(), Instant::now());
            let sent = rawnl::send_batches(&self.writer, batches);
            let wall = t0.elapsed().as_secs_f64();
            let cpu = (rawnl::thread_cpu() - cpu0).as_secs_f64();
            let heard = heard
                .join()
                .map_err(|_| anyhow::anyhow!("raw listener panicked"))??;
            let sent = sent?;
            ensure!(
                sent.errors == 0,
                "raw writer: {} errors (first errno {})",
                sent.errors,
                sent.first_errno
            );
            if heard.msgs < n {
                eprintln!(
                    "warning: raw listener heard {} of {n} events ({} overruns): the CPU floor \
                     is understated",
                    heard.msgs, heard.overruns
                );
            }
            Ok((cpu, wall, heard))
        })
    }
}

fn raw_write_once(flows: &[Flow], listener: bool) -> Result<f64> {
    let ns = Netns::create()?;
    let stop = Arc::new(AtomicBool::new(false));
    let drain = if listener {
        let mut source = ns.run(|| EventSource::open(512 << 20, Origins::new()))??.0;
        let stop = stop.clone();
        Some(std::thread::spawn(move || {
            let mut batch = Vec::with_capacity(1024);
            while !stop.load(Ordering::Relaxed) {
                batch.clear();
                if source.next_batch(&mut batch, 1024).is_err() {
                    break;
                }
            }
        }))
    } else {
        None
    };
    let k = 2;
    let batches = rawnl::split_batches(flows, k, rawnl::raw_create);
    let socks = rawnl::raw_writers(&ns, k)?;
    let barrier = std::sync::Barrier::new(k);
    let t = rawnl::raw_write(&socks, &batches, &barrier);
    stop.store(true, Ordering::Relaxed);
    if let Some(d) = drain {
        let _ = d.join();
    }
    // As in `RawSide`: freed now rather than by a kernel worker during the next measurement.
    ns.run(rawnl::raw_flush)??;
    let t = t?;
    ensure!(
        t.outcome.errors == 0,
        "raw writer: {} errors",
        t.outcome.errors
    );
    Ok(t.secs())
}

/// With `CTSYNC_COMPARE_MARKS` set, prints each phase boundary on stderr as CLOCK_MONOTONIC
/// seconds, the clock of `perf record -k CLOCK_MONOTONIC`: a profile of a whole run can then
/// be cut by phase with `perf report --time START,END`.
fn mark(name: &str) {
    if std::env::var_os("CTSYNC_COMPARE_MARKS").is_none() {
        return;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    eprintln!("phase-mark {name} {}.{:09}", ts.tv_sec, ts.tv_nsec);
}
