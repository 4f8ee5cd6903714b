//! Results: samples per implementation, flow count and metric; medians, spread, ratios and the
//! targets of the comparison, as a table or JSON.

use crate::Args;
use std::collections::BTreeMap;

/// The metrics of one measurement.
#[derive(Debug, Default)]
pub struct Sample(BTreeMap<&'static str, f64>);

impl Sample {
    pub fn set(&mut self, metric: &'static str, value: f64) {
        self.0.insert(metric, value);
    }

    pub fn get(&self, metric: &str) -> Option<f64> {
        self.0.get(metric).copied()
    }
}

/// Metric, unit, label, in display order.
const METRICS: &[(&str, &str, &str)] = &[
    ("fill_s", "s", "A's kernel filled (N creations)"),
    ("replication_s", "s", "replication: start until B holds N"),
    (
        "replication_tail_ms",
        "ms",
        "replication tail after A's kernel was done",
    ),
    ("replication_completeness", "", "replication completeness"),
    ("commit_s", "s", "commit of N into B's kernel"),
    (
        "raw_commit_s",
        "s",
        "raw batched writer, N minimal creations (kernel floor)",
    ),
    (
        "raw_commit_listened_s",
        "s",
        "the same with an event listener in the namespace",
    ),
    (
        "raw_commit_full_s",
        "s",
        "raw writer, N full creations, listened, A's N in kernel",
    ),
    (
        "commit_overruns_b",
        "",
        "B's event socket overruns by the commit's end",
    ),
    (
        "commit_completeness",
        "",
        "commit completeness (keys in B's kernel)",
    ),
    (
        "resync_s",
        "s",
        "resync of a restarted B (start until B holds N)",
    ),
    ("resync_completeness", "", "resync completeness"),
    (
        "delete_s",
        "s",
        "delete burst: start until B's cache is empty",
    ),
    (
        "delete_tail_ms",
        "ms",
        "delete tail after A's kernel was done",
    ),
    ("delete_completeness", "", "delete completeness"),
    ("cpu_s", "s", "CPU seconds, both nodes, whole scenario"),
    (
        "kernel_cpu_floor_s",
        "s",
        "kernel's CPU floor of the scenario (raw sockets)",
    ),
    (
        "floor_create_writer_cpu_s",
        "s",
        "  of which: N full creations by a raw writer (as above)",
    ),
    (
        "floor_create_events_cpu_s",
        "s",
        "  of which: N creation events received",
    ),
    (
        "floor_delete_events_cpu_s",
        "s",
        "  of which: N deletion events received",
    ),
    (
        "cpu_above_floor_s",
        "s",
        "CPU seconds above the kernel's floor",
    ),
    (
        "cpu_replication_s",
        "s",
        "CPU seconds, both nodes, replication",
    ),
    ("cpu_commit_s", "s", "CPU seconds, both nodes, commit"),
    ("cpu_stop_s", "s", "CPU seconds, both nodes, B stopping"),
    (
        "cpu_resync_s",
        "s",
        "CPU seconds, both nodes, resync (B restarted)",
    ),
    ("cpu_delete_s", "s", "CPU seconds, both nodes, delete burst"),
    ("cpu_a_s", "s", "CPU seconds, A"),
    ("cpu_b_s", "s", "CPU seconds, B (both processes)"),
    ("idle_rss_a_mib", "MiB", "RSS of A at start"),
    ("idle_rss_b_mib", "MiB", "RSS of B at start"),
    ("rss_a_replicated_mib", "MiB", "RSS of A once B holds N"),
    ("rss_b_replicated_mib", "MiB", "RSS of B once it holds N"),
    ("peak_rss_a_mib", "MiB", "peak RSS, A"),
    ("peak_rss_b_mib", "MiB", "peak RSS, B"),
    ("rss_per_flow_a_b", "B", "peak RSS per flow, A"),
    ("rss_per_flow_b_b", "B", "peak RSS per flow, B"),
    ("loss_replication_s", "s", "10% loss: start until B holds N"),
    (
        "loss_replication_completeness",
        "",
        "10% loss: replication completeness",
    ),
    (
        "loss_commit_completeness",
        "",
        "10% loss: completeness in B's kernel after commit",
    ),
    (
        "latency_rate_per_s",
        "/s",
        "latency run: creation rate achieved",
    ),
    (
        "latency_completeness",
        "",
        "latency run: flows that reached B's kernel",
    ),
    ("latency_p50_ms", "ms", "A's kernel to B's kernel, p50"),
    ("latency_p90_ms", "ms", "A's kernel to B's kernel, p90"),
    ("latency_p99_ms", "ms", "A's kernel to B's kernel, p99"),
    ("latency_p999_ms", "ms", "A's kernel to B's kernel, p99.9"),
    ("latency_max_ms", "ms", "A's kernel to B's kernel, max"),
];

/// A target of the comparison and whether ctsync meets it.
#[derive(Debug, serde::Serialize)]
pub struct Verdict {
    pub target: String,
    pub flows: usize,
    /// Whose figure `ctsync` holds: "ctsync", or "raw writer" for a kernel floor.
    pub subject: &'static str,
    pub ctsync: f64,
    pub conntrackd: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Debug, serde::Serialize)]
struct Meta {
    tool: &'static str,
    kernel: String,
    command_line: String,
    cpus: usize,
    runs: usize,
    flows: Vec<usize>,
    nf_conntrack_max: u64,
    flow_mix: &'static str,
    conntrackd: Option<String>,
    loadavg_start: String,
    loadavg_end: String,
    cpu_clock: &'static str,
    /// Which CPU each node's daemon runs on.
    placement: String,
    latency_rate: usize,
    latency_secs: usize,
}

type Key = (String, usize, &'static str);

pub struct Report {
    meta: Meta,
    samples: BTreeMap<Key, Vec<f64>>,
    notes: Vec<String>,
    verdicts: Vec<Verdict>,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    quantile(&s, 0.5)
}

/// Nearest-rank quantile of sorted values (NaN when empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    let f = v.iter().copied().filter(|x| x.is_finite());
    (
        f.clone().fold(f64::NAN, f64::min),
        f.fold(f64::NAN, f64::max),
    )
}

impl Report {
    pub fn new(args: &Args, nf_conntrack_max: u64) -> Report {
        Report {
            meta: Meta {
                tool: "ctsync-compare",
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
                command_line: std::env::args().collect::<Vec<_>>().join(" "),
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
                runs: args.runs,
                flows: args.flows.clone(),
                nf_conntrack_max,
                flow_mix: crate::flows::FLOW_MIX,
                conntrackd: None,
                loadavg_start: crate::lab::loadavg(),
                loadavg_end: String::new(),
                cpu_clock: crate::daemons::cpu_clock(),
                placement: crate::daemons::placement(),
                latency_rate: args.latency_rate,
                latency_secs: args.latency_secs,
            },
            samples: BTreeMap::new(),
            notes: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    pub fn meta_conntrackd(&mut self, version: String) {
        self.meta.conntrackd = Some(version);
    }

    pub fn note(&mut self, text: String) {
        eprintln!("note: {text}");
        self.notes.push(text);
    }

    pub fn add(&mut self, implementation: &str, flows: usize, sample: Sample) {
        for (metric, v) in sample.0 {
            self.samples
                .entry((implementation.to_string(), flows, metric))
                .or_default()
                .push(v);
        }
    }

    fn med(&self, imp: &str, flows: usize, metric: &'static str) -> Option<f64> {
        self.samples
            .get(&(imp.to_string(), flows, metric))
            .map(|v| median(v))
    }

    /// Evaluates the targets once every sample is in.
    pub fn finish(&mut self) {
        self.meta.loadavg_end = crate::lab::loadavg();
        let largest = self.meta.flows.iter().copied().max().unwrap_or(0);
        let mut v = Vec::new();
        v.push(self.absolute(
            "replication tail ≤ 20 ms",
            largest,
            "replication_tail_ms",
            20.0,
        ));
        v.push(self.absolute(
            "p99 A-kernel to B-kernel latency ≤ 5 ms",
            0,
            "latency_p99_ms",
            5.0,
        ));
        for &n in self.meta.flows.iter() {
            v.push(self.ratio("CPU seconds ≤ 0.5× conntrackd", n, "cpu_s", 0.5));
            // Not a target of the issue: the same ratio once the kernel's unavoidable share,
            // paid alike by both daemons, is taken out of both.
            v.push(self.ratio(
                "(CPU seconds above the kernel's floor ≤ 0.5× conntrackd)",
                n,
                "cpu_above_floor_s",
                0.5,
            ));
        }
        v.push(self.ratio(
            "peak RSS per flow, A ≤ 0.5× conntrackd",
            largest,
            "rss_per_flow_a_b",
            0.5,
        ));
        v.push(self.ratio(
            "peak RSS per flow, B ≤ 0.5× conntrackd",
            largest,
            "rss_per_flow_b_b",
            0.5,
        ));
        v.push(self.ratio("commit ≤ 0.25× conntrackd", largest, "commit_s", 0.25));
        // Not a target either: whether the commit target lies above the kernel's own floor,
        // a raw writer of the same messages under the same conditions.
        v.push(self.kernel_floor(
            "(raw writer of the same N flows ≤ 0.25× conntrackd's commit)",
            largest,
            "raw_commit_full_s",
            "commit_s",
            0.25,
        ));
        for key in self
            .samples
            .keys()
            .filter(|k| k.0 == "ctsync" && k.2.ends_with("completeness"))
        {
            let all: &Vec<f64> = &self.samples[key];
            let worst = all.iter().copied().fold(f64::INFINITY, f64::min);
            v.push(Some(Verdict {
                target: format!("{} = 1.0000 in every run", key.2),
                flows: key.1,
                subject: "ctsync",
                ctsync: worst,
                conntrackd: self
                    .samples
                    .get(&("conntrackd".to_string(), key.1, key.2))
                    .map(|c| c.iter().copied().fold(f64::INFINITY, f64::min)),
                met: Some(worst == 1.0),
            }));
        }
        self.verdicts = v.into_iter().flatten().collect();
    }

    fn absolute(
        &self,
        target: &str,
        flows: usize,
        metric: &'static str,
        bound: f64,
    ) -> Option<Verdict> {
        let ours = self.med("ctsync", flows, metric)?;
        Some(Verdict {
            target: target.into(),
            flows,
            subject: "ctsync",
            ctsync: ours,
            conntrackd: self.med("conntrackd", flows, metric),
            met: Some(ours <= bound),
        })
    }

    fn ratio(
        &self,
        target: &str,
        flows: usize,
        metric: &'static str,
        bound: f64,
    ) -> Option<Verdict> {
        let ours = self.med("ctsync", flows, metric)?;
        Some(self.against_conntrackd(target, flows, ("ctsync", ours), metric, bound))
    }

    /// Whether the kernel alone (the raw writer's `floor` metric) stays within `bound` times
    /// conntrackd's `metric`: when it does not, no daemon can meet that target.
    fn kernel_floor(
        &self,
        target: &str,
        flows: usize,
        floor: &'static str,
        metric: &'static str,
        bound: f64,
    ) -> Option<Verdict> {
        let raw = self.med("raw", flows, floor)?;
        Some(self.against_conntrackd(target, flows, ("raw writer", raw), metric, bound))
    }

    /// `subject`'s figure against `bound` times conntrackd's median `metric`.
    fn against_conntrackd(
        &self,
        target: &str,
        flows: usize,
        (subject, ours): (&'static str, f64),
        metric: &'static str,
        bound: f64,
    ) -> Verdict {
        let theirs = self.med("conntrackd", flows, metric);
        Verdict {
            target: target.into(),
            flows,
            subject,
            ctsync: ours,
            conntrackd: theirs,
            met: theirs.map(|t| ours <= bound * t),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let mut rows = Vec::new();
        for ((imp, flows, metric), v) in &self.samples {
            let (min, max) = min_max(v);
            rows.push(serde_json::json!({
                "implementation": imp, "flows": flows, "metric": metric,
                "median": median(v), "min": min, "max": max, "samples": v,
            }));
        }
        serde_json::json!({
            "meta": self.meta, "results": rows, "targets": self.verdicts, "notes": self.notes,
        })
    }

    pub fn print_table(&self) {
        let m = &self.meta;
        println!(
            "ctsync-compare — kernel {}, {} CPUs, {} runs (median [min–max])",
            m.kernel, m.cpus, m.runs
        );
        println!(
            "conntrackd: {}",
            m.conntrackd.as_deref().unwrap_or("not run")
        );
        println!("flows: {}", m.flow_mix);
        println!(
            "load average: {} at start, {} at end",
            m.loadavg_start, m.loadavg_end
        );
        println!("daemons' CPU time read from {}", m.cpu_clock);
        println!("daemons: {}", m.placement);
        let mut flows: Vec<usize> = self.samples.keys().map(|k| k.1).collect();
        flows.sort_unstable();
        flows.dedup();
        for n in flows {
            if n == 0 {
                println!(
                    "\n## steady {} flows/s for {} s",
                    m.latency_rate, m.latency_secs
                );
            } else {
                println!("\n## {n} flows");
            }
            println!(
                "{:<58} {:>26} {:>26} {:>8}",
                "", "ctsync", "conntrackd", "ratio"
            );
            for &(metric, unit, label) in METRICS {
                let cell = |imp: &str| {
                    self.samples.get(&(imp.to_string(), n, metric)).map(|v| {
                        let (lo, hi) = min_max(v);
                        format!("{} [{}–{}]", fmt(median(v), unit), fmt(lo, ""), fmt(hi, ""))
                    })
                };
                let ours = cell("ctsync").or_else(|| cell("raw"));
                let theirs = cell("conntrackd");
                if ours.is_none() && theirs.is_none() {
                    continue;
                }
                let ratio = match (
                    self.med("ctsync", n, metric),
                    self.med("conntrackd", n, metric),
                ) {
                    (Some(a), Some(b)) if b != 0.0 && !unit.is_empty() => format!("{:.2}×", a / b),
                    _ => String::new(),
                };
                println!(
                    "{:<58} {:>26} {:>26} {:>8}",
                    label,
                    ours.unwrap_or_default(),
                    theirs.unwrap_or_default(),
                    ratio
                );
            }
        }
        println!("\n## targets");
        for v in &self.verdicts {
            let mark = match v.met {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let theirs = v
                .conntrackd
                .map(|c| format!(", conntrackd {}", fmt(c, "")))
                .unwrap_or_default();
            let at = if v.flows > 0 {
                format!(" at {}", v.flows)
            } else {
                String::new()
            };
            println!(
                "{mark:<7} {}{at}: {} {}{theirs}",
                v.target,
                v.subject,
                fmt(v.ctsync, "")
            );
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}

fn fmt(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let num = if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if unit.is_empty() && v <= 1.0 {
        format!("{v:.4}")
    } else {
        format!("{v:.3}")
    };
    if unit.is_empty() {
        num
    } else {
        format!("{num} {unit}")
    }
}
