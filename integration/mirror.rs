//! The internal cache against the real kernel: `ctsyncd` in a namespace must mirror its conntrack
//! table exactly (every field, timeouts within the seconds that passed), through bursts,
//! updates, deletes and event overruns. Plus the library's own write and read path at scale.

use crate::support::daemon::{cache_flows, is_settled, stat, syncctl_bin, Daemon, KernelConfig};
use crate::support::flows::{self, as_created, modified};
use crate::support::netns::Netns;
use crate::support::traffic::{Traffic, ICMP_ID};
use crate::support::{
    cli, clock, compare, exclusive, kernel, require_root, secs, timeout_slack, wait_for,
};
use ctsync::flow::{proto, status, Flow, ProtoInfo, L4};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// The mirror and the kernel's table at a moment they were found equal.
struct Converged {
    mirror: Vec<Flow>,
    kernel: Vec<Flow>,
    status: Value,
    /// When the first probe began that found the mirror settled with the kernel's flow count.
    counted: Instant,
    /// When the successful probe had the mirror's dump in hand: the mirror was equal to the
    /// kernel at the latest then.
    equal: Instant,
}

/// Waits until the daemon is settled (synced, no dump running), holds as many flows as
/// `conntrack -C` counts, and its `dump internal` equals a kernel dump field by field.
///
/// `since` bounds how old the mirror's timeouts may be. Panics after `timeout` with the
/// differences between the mirror and the kernel at that point.
fn converge(d: &Daemon, ns: &Netns, since: Instant, timeout: Duration) -> Converged {
    let start = Instant::now();
    let mut counted = None;
    let mut last = String::from("never probed");
    while start.elapsed() < timeout {
        let probe = Instant::now();
        let st = d.status().unwrap_or_else(|e| panic!("{e}"));
        let in_kernel = cli::count(ns) as u64;
        if !is_settled(&st) || cache_flows(&st) != in_kernel {
            last = format!("conntrack -C says {in_kernel}; status {st}");
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let counted = *counted.get_or_insert(probe);
        let mirror = d.dump_internal().unwrap_or_else(|e| panic!("{e}"));
        let equal = Instant::now();
        let kernel = kernel::dump(ns);
        match compare::diff("kernel", &kernel, "mirror", &mirror, timeout_slack(since)) {
            Ok(()) => {
                return Converged {
                    mirror,
                    kernel,
                    status: st,
                    counted,
                    equal,
                }
            }
            Err(e) => last = e,
        }
    }
    // Say exactly what is wrong, not only that the counts differ.
    let mirror = d.dump_internal().unwrap_or_else(|e| panic!("{e}"));
    let kernel = kernel::dump(ns);
    let now = compare::diff("kernel", &kernel, "mirror", &mirror, timeout_slack(since))
        .err()
        .unwrap_or_else(|| "now equal".into());
    panic!(
        "the mirror did not become equal to the kernel within {timeout:?}\nlast probe: {last}\n\
         final comparison: {now}\nstatus: {}",
        d.status().unwrap_or_else(Value::String)
    );
}

/// Asserts a write report: exactly `created` created, `updated` updated, nothing else.
fn assert_report(r: &ctsync::netlink::WriteReport, created: u64, updated: u64) {
    assert!(
        r.created == created
            && r.updated == updated
            && r.replaced == 0
            && r.deleted == 0
            && r.absent == 0
            && r.failures.is_empty(),
        "expected created={created} updated={updated} and nothing else, got {}",
        kernel::describe(r)
    );
}

fn stats_line(st: &Value) -> String {
    format!(
        "events={} new={} update={} destroy={} own={} overruns={} resyncs={} repairs={} \
         undecodable={} replay_overflows={} event_buffer_bytes={}",
        stat(st, "events"),
        stat(st, "events_new"),
        stat(st, "events_update"),
        stat(st, "events_destroy"),
        stat(st, "events_own"),
        stat(st, "overruns"),
        stat(st, "resyncs"),
        stat(st, "resync_repairs"),
        stat(st, "undecodable"),
        stat(st, "replay_overflows"),
        st["kernel"]["event_buffer_bytes"]
    )
}

/// Whether a flow comes from the loopback traffic rather than from injection.
fn is_loopback(f: &Flow) -> bool {
    f.key.orig.src.is_loopback()
}

/// Checks that the kernel-made flows of `traffic` are in `flows` with the state real packets
/// gave them: TCP established and assured, echo requests replied, label bit 127 from the
/// namespace's rule.
fn check_real_flows(traffic: &Traffic, flows: &[Flow]) -> Result<(), String> {
    let label = 1u128 << 127;
    for &(client, server) in &traffic.tcp {
        let f = flows
            .iter()
            .find(|f| {
                f.key.orig.proto == proto::TCP
                    && f.key.orig.src == client.ip()
                    && f.key.orig.dst == server.ip()
                    && f.key.orig.l4
                        == L4::Ports {
                            src: client.port(),
                            dst: server.port(),
                        }
            })
            .ok_or_else(|| format!("no flow for the TCP connection {client} -> {server}"))?;
        let established = matches!(f.protoinfo(), ProtoInfo::Tcp(t) if t.state == 3);
        let assured = f.status & (status::ASSURED | status::SEEN_REPLY | status::CONFIRMED)
            == status::ASSURED | status::SEEN_REPLY | status::CONFIRMED;
        if !established || !assured || f.labels() & label == 0 || f.reply != f.key.orig.inverse() {
            return Err(format!(
                "TCP connection {client} -> {server} tracked as {f:?}"
            ));
        }
    }
    for (p, kind) in [(proto::ICMP, 8), (proto::ICMPV6, 128)] {
        let f = flows
            .iter()
            .find(|f| {
                f.key.orig.proto == p
                    && f.key.orig.src.is_loopback()
                    && f.key.orig.l4
                        == L4::Icmp {
                            id: ICMP_ID,
                            kind,
                            code: 0,
                        }
            })
            .ok_or_else(|| format!("no flow for the echo requests of protocol {p}"))?;
        if f.status & status::SEEN_REPLY == 0 || f.labels() & label == 0 {
            return Err(format!("echo flow tracked as {f:?}"));
        }
    }
    Ok(())
}

/// Acceptance: a 100k-flow table of every kind the mirror models, plus flows made by real
/// packets, mirrored exactly; checked field by field against the kernel's dump, against what
/// was injected, and against the `conntrack` CLI.
#[test]
fn mirror_100k_mixed() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 100_000;
    let since = Instant::now();
    let ns = Netns::new();
    ns.enable_labels();
    let daemon = Daemon::start(&ns, KernelConfig::default());
    daemon.wait_synced(Duration::from_secs(30));

    let traffic = Traffic::start(&ns);
    wait_for(
        "the kernel to track the loopback traffic",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || check_real_flows(&traffic, &kernel::dump(&ns)),
    );

    let injected = flows::mixed(N);
    let mut w = kernel::writer(&ns, 2);
    let t = Instant::now();
    let report = kernel::upsert_batched(&mut w, &injected, 10_000);
    let inject_time = t.elapsed();
    assert_report(&report, N as u64, 0);

    let t_end = Instant::now();
    let c = converge(&daemon, &ns, since, Duration::from_secs(180));
    let mirrored_after = c.equal.saturating_duration_since(t_end);
    println!(
        "mirror_100k_mixed: injected {N} flows in {:.2} s; mirror equal to the kernel ({} flows) \
         at the latest {:.2} s after the injection ended; {}",
        secs(inject_time),
        c.mirror.len(),
        secs(mirrored_after),
        stats_line(&c.status)
    );

    // The mirror holds the loopback flows with the state the packets gave them.
    check_real_flows(&traffic, &c.mirror).unwrap_or_else(|e| panic!("mirror: {e}"));
    // Every other flow is exactly what was injected (the kernel adds CONFIRMED).
    let expected: Vec<Flow> = injected.iter().map(as_created).collect();
    let kernel_injected: Vec<Flow> = c
        .kernel
        .iter()
        .filter(|f| !is_loopback(f))
        .cloned()
        .collect();
    compare::diff(
        "injected",
        &expected,
        "kernel",
        &kernel_injected,
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mirror_injected: Vec<Flow> = c
        .mirror
        .iter()
        .filter(|f| !is_loopback(f))
        .cloned()
        .collect();
    compare::diff(
        "injected",
        &expected,
        "mirror",
        &mirror_injected,
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The independent oracle: conntrack-tools' own count and listing.
    let listed = cli::list(&ns);
    cli::check(&listed, &c.mirror, timeout_slack(since)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cli::count(&ns), c.mirror.len(), "conntrack -C vs mirror");
    assert!(c.mirror.len() >= N + 4);

    let st = daemon.status().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stat(&st, "undecodable"), 0, "{st}");
    assert_eq!(stat(&st, "replay_overflows"), 0, "{st}");
    let exit = daemon.stop();
    assert!(exit.success(), "ctsyncd exited with {exit} on SIGTERM");
}

/// Acceptance: with the mirror synced, changing mark, labels and TCP state of 1000 flows and
/// deleting 1000 others is visible in `dump internal` within a second.
#[test]
fn updates_and_deletes_within_one_second() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    let since = Instant::now();
    let ns = Netns::new();
    ns.enable_labels();
    let daemon = Daemon::start(&ns, KernelConfig::default());
    daemon.wait_synced(Duration::from_secs(30));

    let base = flows::mixed(3000);
    let mut w = kernel::writer(&ns, 2);
    assert_report(&w.upsert(&base).expect("upsert"), 3000, 0);
    converge(&daemon, &ns, since, Duration::from_secs(60));

    let changed: Vec<Flow> = base.iter().step_by(3).map(modified).collect();
    let deleted: Vec<Flow> = base.iter().skip(1).step_by(3).cloned().collect();
    let kept = base.iter().skip(2).step_by(3);
    assert_eq!((changed.len(), deleted.len()), (1000, 1000));
    assert!(changed
        .iter()
        .zip(base.iter().step_by(3))
        .all(|(c, b)| c.mark != b.mark && c.labels() != b.labels()));
    let expected: Vec<Flow> = changed.iter().chain(kept).map(as_created).collect();

    let t_write = Instant::now();
    let upd = w.upsert(&changed).expect("upsert");
    let del = w.delete(&deleted).expect("delete");
    let t_written = Instant::now();
    assert_report(&upd, 0, 1000);
    assert!(
        del.deleted == 1000 && del.absent == 0 && del.failures.is_empty(),
        "delete: {}",
        kernel::describe(&del)
    );

    // A probe that finds the mirror changed bounds the delay from both sides: the changes were
    // visible at the latest when it completed, and were not before the previous probe began.
    let (probes, seen_from, seen_by) = {
        let mut probes = 0;
        loop {
            let start = Instant::now();
            let mirror = daemon.dump_internal().unwrap_or_else(|e| panic!("{e}"));
            probes += 1;
            match compare::diff(
                "expected",
                &expected,
                "mirror",
                &mirror,
                timeout_slack(since),
            ) {
                Ok(()) => {
                    break (
                        probes,
                        start.saturating_duration_since(t_written),
                        t_written.elapsed(),
                    )
                }
                Err(e) => assert!(
                    t_written.elapsed() < Duration::from_secs(10),
                    "changes not mirrored 10 s after they were written: {e}"
                ),
            }
        }
    };
    println!(
        "updates_and_deletes_within_one_second: 1000 updates + 1000 deletes written in {:.3} s; \
         mirror showed all of them at the latest {:.3} s after the writes returned (probe {probes} \
         began at {:.3} s)",
        secs(t_written - t_write),
        secs(seen_by),
        secs(seen_from)
    );
    assert!(
        seen_by < Duration::from_secs(1),
        "changes took up to {seen_by:?} to reach the mirror (deadline 1 s)"
    );

    // The kernel agrees with the mirror and with what was written.
    let c = converge(&daemon, &ns, since, Duration::from_secs(30));
    compare::diff(
        "expected",
        &expected,
        "kernel",
        &c.kernel,
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stat(&c.status, "overruns"), 0, "{}", c.status);

    // Human output works too.
    for args in [&["status"][..], &["dump", "internal"][..]] {
        let out = daemon.syncctl(args).unwrap_or_else(|e| panic!("{e}"));
        assert!(!out.is_empty(), "syncctl {args:?} printed nothing");
    }
    let exit = daemon.stop();
    assert!(exit.success(), "ctsyncd exited with {exit} on SIGTERM");
}

/// Acceptance: with a tiny event buffer a burst overruns it; the overrun is counted, and the
/// reconciliation leaves the mirror exactly equal to the kernel.
#[test]
fn forced_overrun_is_counted_and_repaired() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 50_000;
    let since = Instant::now();
    let ns = Netns::new();
    ns.enable_labels();
    let daemon = Daemon::start(
        &ns,
        KernelConfig {
            event_buffer_bytes: Some(4096),
            write_sockets: Some(2),
        },
    );
    daemon.wait_synced(Duration::from_secs(30));

    let injected = flows::mixed(N);
    let mut w = kernel::writer(&ns, 2);
    let t = Instant::now();
    let report = w.upsert(&injected).expect("upsert");
    let t_end = Instant::now();
    assert_report(&report, N as u64, 0);

    let overrun = wait_for(
        "an overrun to be counted",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let st = daemon.status()?;
            if stat(&st, "overruns") > 0 {
                Ok(st)
            } else {
                Err(format!("status: {st}"))
            }
        },
    );
    let c = converge(&daemon, &ns, since, Duration::from_secs(120));
    println!(
        "forced_overrun_is_counted_and_repaired: {N} flows in {:.2} s; mirror equal at the latest \
         {:.2} s after the burst; {}",
        secs(t_end - t),
        secs(c.equal.saturating_duration_since(t_end)),
        stats_line(&c.status)
    );
    assert!(stat(&overrun, "overruns") > 0);
    assert!(
        stat(&c.status, "resyncs") >= 2,
        "an overrun must be followed by a reconciliation: {}",
        c.status
    );
    assert!(
        stat(&c.status, "resync_repairs") > 0,
        "events were lost, so the reconciliation must have repaired flows: {}",
        c.status
    );
    assert_eq!(c.mirror.len(), N);
    let expected: Vec<Flow> = injected.iter().map(as_created).collect();
    compare::diff(
        "injected",
        &expected,
        "mirror",
        &c.mirror,
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cli::count(&ns), N);
    let exit = daemon.stop();
    assert!(exit.success(), "ctsyncd exited with {exit} on SIGTERM");
}

/// After an overrun the mirror must equal the kernel again, whatever the events still queued
/// when the overrun was reported said. Here the daemon is frozen (as if starved of CPU) while
/// 50k flows are created and deleted again: its event socket ends up holding NEW events of flows
/// that no longer exist, and the DESTROY events that followed were dropped. The repaired mirror
/// must be empty, like the kernel's table.
#[test]
fn stale_events_after_overrun_do_not_resurrect_flows() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 50_000;
    let since = Instant::now();
    let ns = Netns::new();
    ns.enable_labels();
    let daemon = Daemon::start(
        &ns,
        KernelConfig {
            event_buffer_bytes: Some(8 << 20),
            write_sockets: None,
        },
    );
    daemon.wait_synced(Duration::from_secs(30));

    let injected = flows::mixed(N);
    let mut w = kernel::writer(&ns, 2);
    daemon.pause();
    let created = w.upsert(&injected).expect("upsert");
    let deleted = w.delete(&injected).expect("delete");
    daemon.resume();
    assert_report(&created, N as u64, 0);
    assert_eq!(deleted.deleted, N as u64, "{}", kernel::describe(&deleted));
    assert_eq!(cli::count(&ns), 0, "conntrack -C after deleting everything");

    wait_for(
        "the overrun to be counted",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let st = daemon.status()?;
            if stat(&st, "overruns") > 0 {
                Ok(())
            } else {
                Err(format!("status: {st}"))
            }
        },
    );
    let c = converge(&daemon, &ns, since, Duration::from_secs(30));
    println!(
        "stale_events_after_overrun_do_not_resurrect_flows: mirror empty like the kernel; {}",
        stats_line(&c.status)
    );
    assert!(c.mirror.is_empty());
    let exit = daemon.stop();
    assert!(exit.success(), "ctsyncd exited with {exit} on SIGTERM");
}

/// Acceptance (library only): 250k flows written in batches read back identical; writing them
/// again updates every one; deleting them empties the table.
#[test]
fn inject_250k_read_back_identical() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 250_000;
    let ns = Netns::new();
    ns.enable_labels();
    let injected = flows::mixed(N);
    let expected: Vec<Flow> = injected.iter().map(as_created).collect();
    let mut w = kernel::writer(&ns, 2);

    let t = Instant::now();
    let created = kernel::upsert_batched(&mut w, &injected, 25_000);
    let create_time = t.elapsed();
    assert_report(&created, N as u64, 0);
    let t_dump = Instant::now();
    let table = kernel::dump(&ns);
    let dump_time = t_dump.elapsed();
    compare::diff("injected", &expected, "kernel", &table, timeout_slack(t))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cli::count(&ns), N, "conntrack -C");
    cli::check(&cli::list(&ns), &table, timeout_slack(t)).unwrap_or_else(|e| panic!("{e}"));

    let t2 = Instant::now();
    let again = kernel::upsert_batched(&mut w, &injected, 25_000);
    let update_time = t2.elapsed();
    assert_report(&again, 0, N as u64);
    compare::diff(
        "injected",
        &expected,
        "kernel",
        &kernel::dump(&ns),
        timeout_slack(t2),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let t3 = Instant::now();
    let gone = w.delete(&injected).expect("delete");
    let delete_time = t3.elapsed();
    assert!(
        gone.deleted == N as u64 && gone.absent == 0 && gone.failures.is_empty(),
        "delete: {}",
        kernel::describe(&gone)
    );
    assert!(
        kernel::dump(&ns).is_empty(),
        "table not empty after deleting all"
    );
    assert_eq!(cli::count(&ns), 0, "conntrack -C after deleting all");
    println!(
        "inject_250k_read_back_identical: create {:.2} s ({:.0}/s), dump {:.2} s, update {:.2} s, \
         delete {:.2} s",
        secs(create_time),
        N as f64 / secs(create_time),
        secs(dump_time),
        secs(update_time),
        secs(delete_time)
    );
}

/// Acceptance: with the default configuration, a 250k-flow burst at full kernel speed is
/// mirrored exactly; measures how long after the burst the mirror equals the kernel.
#[test]
fn burst_250k_default_config() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 250_000;
    let since = Instant::now();
    let ns = Netns::new();
    ns.enable_labels();
    let daemon = Daemon::start(&ns, KernelConfig::default());
    let synced = daemon.wait_synced(Duration::from_secs(30));
    assert_eq!(
        synced["kernel"]["event_buffer_bytes"].as_u64(),
        Some(ctsync::config::DEFAULT_EVENT_BUFFER as u64),
        "default event buffer: {synced}"
    );
    let pid = synced["pid"].as_u64().expect("status has the pid");
    assert_eq!(
        thread_policies(pid),
        vec![(libc::SCHED_RR as u32, 1)],
        "every thread of ctsyncd runs SCHED_RR at priority 1 by default"
    );

    let injected = flows::mixed(N);
    let mut w = kernel::writer(&ns, 2);
    let (t, burst_start) = (Instant::now(), clock());
    let report = w.upsert(&injected).expect("upsert");
    let (t_end, burst_end) = (Instant::now(), clock());
    assert_report(&report, N as u64, 0);

    eprintln!("burst_250k_default_config: burst {burst_start}..{burst_end} UTC");
    let c = converge(&daemon, &ns, since, Duration::from_secs(120));
    let equal_after = c.equal.saturating_duration_since(t_end);
    println!(
        "burst_250k_default_config: burst of {N} flows ({burst_start}..{burst_end} UTC) took {:.2} \
         s ({:.0}/s); mirror count equal {:.2} s and content equal at the latest {:.2} s after \
         the burst; {}",
        secs(t_end - t),
        N as f64 / secs(t_end - t),
        secs(c.counted.saturating_duration_since(t_end)),
        secs(equal_after),
        stats_line(&c.status)
    );
    let expected: Vec<Flow> = injected.iter().map(as_created).collect();
    compare::diff(
        "injected",
        &expected,
        "mirror",
        &c.mirror,
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cli::count(&ns), N, "conntrack -C");
    assert!(
        equal_after < Duration::from_secs(100),
        "mirror took {equal_after:?} to equal the kernel"
    );
    let exit = daemon.stop();
    assert!(exit.success(), "ctsyncd exited with {exit} on SIGTERM");
}

/// The distinct (policy, real-time priority) pairs of a process's threads.
fn thread_policies(pid: u64) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("reading the daemon's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces); field 40 is the real-time
            // priority, 41 the policy.
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((f.get(38)?.parse().ok()?, f.get(37)?.parse().ok()?))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// `syncctl` fails with a message, not a hang or a panic, when no daemon listens.
#[test]
fn syncctl_reports_unreachable_daemon() {
    let dir = crate::support::netns::TempDir::new();
    let socket = dir.path().join("nobody.sock");
    for args in [
        &["status"][..],
        &["status", "--json"][..],
        &["dump", "internal", "--json"][..],
    ] {
        let out = Command::new(syncctl_bin())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .expect("cannot run syncctl");
        assert!(
            !out.status.success(),
            "syncctl {args:?} succeeded without a daemon"
        );
        assert!(!out.stderr.is_empty(), "syncctl {args:?} failed silently");
        assert!(
            out.status.code().is_some(),
            "syncctl {args:?} died of a signal: {}",
            out.status
        );
    }
}

/// `Writer::upsert` must bring an existing entry to the flow's state, labels included: a flow
/// whose labels were all cleared must clear them in the kernel too.
#[test]
fn upsert_clears_labels() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    ns.enable_labels();
    let mut w = kernel::writer(&ns, 1);
    let labelled: Vec<Flow> = flows::mixed(26)
        .into_iter()
        .filter(|f| f.labels() != 0)
        .collect();
    assert!(!labelled.is_empty());
    assert_report(
        &w.upsert(&labelled).expect("upsert"),
        labelled.len() as u64,
        0,
    );
    let cleared: Vec<Flow> = labelled
        .iter()
        .map(|f| {
            let mut c = f.clone();
            c.set_labels(0);
            c
        })
        .collect();
    let r = w.upsert(&cleared).expect("upsert");
    assert!(r.failures.is_empty(), "{}", kernel::describe(&r));
    let expected: Vec<Flow> = cleared.iter().map(as_created).collect();
    compare::diff("written", &expected, "kernel", &kernel::dump(&ns), 5)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The event socket's kernel filter drops exactly the creation events of the writer's quiet
/// sockets: creations through the other socket, updates, replacements and deletions of ours,
/// and every event of someone else's writes still arrive, each told ours or not.
#[test]
fn quiet_creations_are_filtered_in_the_kernel_and_nothing_else() {
    use ctsync::netlink::{CtEventKind, EventSource, KernelEvent, Origins};
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let origins = Origins::new();
    let (mut events, mut w) = ns
        .run_in({
            let origins = origins.clone();
            move || {
                let (events, _) = EventSource::open(64 << 20, origins.clone())?;
                let w = ctsync::netlink::Writer::open(1, &origins)?;
                events.hide_own_creations(&w.quiet_portids())?;
                Ok::<_, ctsync::netlink::KernelError>((events, w))
            }
        })
        .unwrap_or_else(|e| panic!("cannot open: {e}"));
    let mut other = kernel::writer(&ns, 1);
    let all = flows::mixed(40);
    let (fresh, rest) = all.split_at(10);
    let (known, rest) = rest.split_at(10);
    let (foreign, _) = rest.split_at(10);

    let r = w.upsert_fresh(fresh, known).expect("upsert");
    assert_report(&r, 20, 0);
    assert_report(&other.upsert(foreign).expect("foreign upsert"), 10, 0);
    // The fresh flows again, with a new mark: they exist, so the quiet creation fails and they
    // are updated (or replaced, where the kernel refuses the update: NAT) through the other
    // socket, whose events come through.
    let marked: Vec<Flow> = fresh
        .iter()
        .map(|f| {
            let mut m = f.clone();
            m.mark = 77;
            m
        })
        .collect();
    let again = w.upsert_fresh(&marked, &[]).expect("update");
    assert!(
        again.created == 0 && again.updated + again.replaced == 10 && again.failures.is_empty(),
        "{}",
        kernel::describe(&again)
    );
    let (updated, replaced) = (again.updated as usize, again.replaced as usize);
    let gone = w.delete(fresh).expect("delete");
    assert_eq!(gone.deleted, 10, "{}", kernel::describe(&gone));

    // 10 known and 10 foreign creations, the updates and replacements, 10 deletions.
    let expected = 30 + updated + 2 * replaced;
    let mut seen: Vec<(CtEventKind, bool, ctsync::flow::FlowKey)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < expected && Instant::now() < deadline {
        let mut batch = Vec::new();
        events.next_batch(&mut batch, 256).expect("events");
        for ev in batch {
            match ev {
                KernelEvent::Flow { msg, own } => seen.push((msg.kind, own, msg.flow.key)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let count = |kind: CtEventKind, own: bool, set: &[Flow]| {
        seen.iter()
            .filter(|(k, o, key)| *k == kind && *o == own && set.iter().any(|f| f.key == *key))
            .count()
    };
    // The quiet creations alone are missing; a replacement's creation is not quiet.
    assert_eq!(count(CtEventKind::New, true, fresh), replaced, "{seen:?}");
    assert_eq!(count(CtEventKind::New, true, known), 10, "{seen:?}");
    assert_eq!(count(CtEventKind::New, false, foreign), 10, "{seen:?}");
    assert_eq!(count(CtEventKind::Update, true, fresh), updated, "{seen:?}");
    assert_eq!(
        count(CtEventKind::Destroy, true, fresh),
        replaced + 10,
        "{seen:?}"
    );
    // Nothing more comes.
    let mut late = Vec::new();
    events.next_batch(&mut late, 256).expect("events");
    assert!(late.is_empty(), "{late:?}");
    assert_eq!(seen.len(), expected, "{seen:?}");
}

/// The entry count that lets a daemon skip dumping an empty table is its own namespace's: flows
/// of another namespace (which a dump walks past in the shared hash table) are not counted.
#[test]
fn the_entry_count_is_the_namespaces_own() {
    if !require_root() {
        return;
    }
    let (busy, empty) = (Netns::new(), Netns::new());
    let count = |ns: &Netns| {
        ns.run_in(|| {
            let sock = ctsync::netlink::CtSocket::open().map_err(|e| e.to_string())?;
            ctsync::netlink::count(&sock).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e: String| panic!("count: {e}"))
    };
    assert_eq!((count(&busy), count(&empty)), (0, 0));
    let flows = flows::mixed(300);
    let mut w = kernel::writer(&busy, 1);
    assert_report(&w.upsert(&flows).expect("upsert"), 300, 0);
    assert_eq!(count(&busy), 300);
    assert_eq!(
        count(&empty),
        0,
        "another namespace's flows are not counted"
    );
    assert_eq!(kernel::dump(&empty), Vec::<Flow>::new());
    w.delete(&flows[..100]).expect("delete");
    assert_eq!(count(&busy), 200);
}
