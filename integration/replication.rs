//! Replication between daemons in separate namespaces, over veth sync links with mutual TLS
//! (certificates made by the real `syncctl pki`): every flow of a node's kernel reaches its
//! peers' external caches field by field, deletions too; restarts of either side converge to
//! the origin's table; a full mesh of three keeps origins apart; nodes without a certificate of
//! the cluster CA, or without TLS at all, are refused; `syncctl status` and `ready` tell the truth.
//!
//! The daemons' own sync connections are tracked by the kernel like any traffic, so each node
//! also replicates the flows of its sync link; those change without kernel events (TCP window
//! data, timeouts extended by traffic) and are left out of comparisons ([`is_link_flow`]).

use crate::support::daemon::{syncctl_bin, Daemon};
use crate::support::flows::{self, as_created};
use crate::support::link::{is_link_flow, Link};
use crate::support::netns::{Netns, TempDir};
use crate::support::{
    cli, compare, exclusive, kernel, require_root, run_ok, secs, timeout_slack, wait_for,
};
use ctsync::control::ExternalEntry;
use ctsync::flow::{proto, status, Flow, L4};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Cluster name of every test cluster (the foreign CA of the authentication test uses it too:
/// only the CA differs).
const CLUSTER: &str = "ctsi-cluster";
/// Sync port.
const PORT: u16 = 7400;
/// Deadline for a node to connect to its peers and become ready.
const READY_DEADLINE: Duration = Duration::from_secs(90);
/// Deadline for large replications (debug builds on a 2-core machine are slow).
const REPLICATION_DEADLINE: Duration = Duration::from_secs(300);
/// Deadline for a resynchronisation of a few tens of thousands of flows (a few seconds here).
const RESYNC_DEADLINE: Duration = Duration::from_secs(120);

/// A cluster CA made with `syncctl pki init`, in a temporary directory.
struct Pki {
    dir: TempDir,
}

/// Runs the real `syncctl` binary with `args` and panics unless it succeeds.
fn syncctl_cli(args: &[&str], dir: &Path) -> String {
    let out = run_ok(Command::new(syncctl_bin()).args(args).arg("--dir").arg(dir));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Pki {
    /// `syncctl pki init --dir D --cluster CLUSTER`, then `syncctl pki issue --dir D N` for each
    /// node.
    fn new(nodes: &[&str]) -> Pki {
        let pki = Pki {
            dir: TempDir::new(),
        };
        syncctl_cli(&["pki", "init", "--cluster", CLUSTER], &pki.path());
        for n in nodes {
            syncctl_cli(&["pki", "issue", n], &pki.path());
        }
        pki
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// Files of `node`, trusting this CA.
    fn tls(&self, node: &str) -> Security {
        self.tls_trusting(node, self)
    }

    /// Certificate and key of `node` from this CA, trusting the CA of `trust`.
    fn tls_trusting(&self, node: &str, trust: &Pki) -> Security {
        Security::Tls {
            ca: trust.path().join("ca.pem"),
            cert: self.path().join(format!("{node}.pem")),
            key: self.path().join(format!("{node}.key")),
        }
    }
}

/// How a node secures its sync link.
enum Security {
    Tls {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    Plaintext,
}

/// The `[sync]` section of a node listening on `listen` with `peers` (node id, address).
fn sync_toml(listen: SocketAddr, peers: &[(&str, SocketAddr)], security: &Security) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|(id, addr)| format!("{{ node_id = \"{id}\", address = \"{addr}\" }}"))
        .collect();
    let mut s = format!(
        "[sync]\ncluster = \"{CLUSTER}\"\nlisten = \"{listen}\"\npeers = [{}]\n",
        peers.join(", ")
    );
    match security {
        Security::Plaintext => s.push_str("plaintext = true\n"),
        Security::Tls { ca, cert, key } => s.push_str(&format!(
            "\n[sync.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        )),
    }
    s
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A namespace with labels enabled (the generated flows carry labels).
fn node_ns() -> Netns {
    let ns = Netns::new();
    ns.enable_labels();
    ns
}

/// The status entry of `peer` in `st`.
fn peer_status<'a>(st: &'a Value, peer: &str) -> Result<&'a Value, String> {
    st["sync"]["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["node_id"] == peer))
        .ok_or_else(|| format!("status lists no peer {peer}: {st}"))
}

/// Waits until `d` is ready (`syncctl ready` exits 0) with every peer in `peers` connected and
/// synced; returns its status then.
fn wait_ready(d: &Daemon, peers: &[&str], timeout: Duration) -> Value {
    wait_for(
        &format!("{} to be ready with {peers:?} connected", d.node_id()),
        timeout,
        Duration::from_millis(100),
        || {
            if !d.ready()? {
                return Err(format!("not ready; status {}", d.status()?));
            }
            let st = d.status()?;
            for p in peers {
                let ps = peer_status(&st, p)?;
                if ps["state"] != "connected" || ps["synced"] != true {
                    return Err(format!("peer {p}: {ps}"));
                }
            }
            Ok(st)
        },
    )
}

/// The flows of `origin` in an external dump, link flows aside, each with its remaining
/// timeout as its timeout (what the kernel's dump shows for the same flow now).
fn external_of(entries: &[ExternalEntry], origin: &str) -> Vec<Flow> {
    entries
        .iter()
        .filter(|e| e.origin == origin && !is_link_flow(&e.flow))
        .map(|e| {
            let mut f = e.flow.clone();
            f.timeout = e.remaining_timeout;
            f
        })
        .collect()
}

/// The kernel table of `ns`, link flows aside.
fn kernel_flows(ns: &Netns) -> Vec<Flow> {
    kernel::dump(ns)
        .into_iter()
        .filter(|f| !is_link_flow(f))
        .collect()
}

/// Origins present in an external dump, with their entry counts.
fn origins(entries: &[ExternalEntry]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in entries {
        *m.entry(e.origin.clone()).or_default() += 1;
    }
    m
}

/// Tolerance on replicated timeouts when comparing them with the origin's kernel.
#[derive(Debug, Clone, Copy)]
enum Slack {
    /// The seconds passed since this instant (plus 2): right after a replication, or when only
    /// the content matters.
    Since(Instant),
    /// A fixed bound, the measured delay of the replication: with it a comparison made long
    /// after the replication shows that replicated timeouts age like the kernel's.
    Fixed(u32),
}

impl Slack {
    fn get(self) -> u32 {
        match self {
            Slack::Since(t) => timeout_slack(t),
            Slack::Fixed(s) => s,
        }
    }

    /// The delay from `from` to `to`, rounded up, plus 2 s of rounding (kernel and cache count
    /// whole seconds).
    fn between(from: Instant, to: Instant) -> Slack {
        let d = to.saturating_duration_since(from);
        Slack::Fixed(u32::try_from(d.as_secs()).unwrap_or(u32::MAX - 3) + 3)
    }
}

/// External cache and origin table found equal.
struct Replicated {
    entries: Vec<ExternalEntry>,
    /// Content of the origin's kernel (link flows aside) at that time.
    kernel: Vec<Flow>,
    /// When the last probe that found them different began: not equal yet then.
    unequal_at: Option<Instant>,
    /// When the successful probe's status answer (with the right flow count) arrived.
    counted: Instant,
    /// When the successful probe had the external dump in hand: equal at the latest then.
    equal: Instant,
    /// Full comparisons made (dump and compare).
    probes: usize,
}

impl Replicated {
    /// How long after `t0` the cache was found complete, bounded from both sides.
    fn timing(&self, t0: Instant, what: &str) -> String {
        let after = |t: Instant| secs(t.saturating_duration_since(t0));
        format!(
            "had the right flow count {:.2} s after {what} (still incomplete at {}), and was \
             verified equal field by field by the dump that returned at {:.2} s ({} full \
             comparisons)",
            after(self.counted),
            self.unequal_at
                .map_or_else(|| "no probe".to_string(), |t| format!("{:.2} s", after(t))),
            after(self.equal),
            self.probes
        )
    }
}

/// Waits until `d`'s external cache holds, from `origin`, exactly the flows of `origin_ns`'s
/// kernel (link flows aside), field by field, timeouts within `slack`; and
/// nothing from origins outside `allowed`. Panics after `timeout` with the differences.
fn wait_replicated(
    d: &Daemon,
    origin: &str,
    origin_ns: &Netns,
    allowed: &[&str],
    slack: Slack,
    timeout: Duration,
) -> Replicated {
    let start = Instant::now();
    let mut last = String::from("never probed");
    let mut probes = 0;
    let mut unequal_at = None;
    while start.elapsed() < timeout {
        let probe_began = Instant::now();
        // Cheap test first: the peer's flow count equals the origin's table size (both count
        // the link flows too).
        let st = d.status().unwrap_or_else(|e| panic!("{e}"));
        let held = peer_status(&st, origin)
            .ok()
            .and_then(|p| p["external_flows"].as_u64());
        let counted = Instant::now();
        let in_kernel = cli::count(origin_ns) as u64;
        if held != Some(in_kernel) {
            unequal_at = Some(probe_began);
            last = format!(
                "{} holds {held:?} flows of {origin}, whose kernel has {in_kernel}",
                d.node_id()
            );
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        probes += 1;
        let entries = d.dump_external().unwrap_or_else(|e| panic!("{e}"));
        let equal = Instant::now();
        let kernel = kernel_flows(origin_ns);
        let stray: Vec<_> = origins(&entries)
            .into_iter()
            .filter(|(o, _)| !allowed.contains(&o.as_str()))
            .collect();
        assert!(
            stray.is_empty(),
            "{}'s external cache holds flows of origins other than {allowed:?}: {stray:?}",
            d.node_id()
        );
        match compare::diff(
            &format!("{origin}'s kernel"),
            &kernel,
            &format!("{}'s external cache", d.node_id()),
            &external_of(&entries, origin),
            slack.get(),
        ) {
            Ok(()) => {
                return Replicated {
                    entries,
                    kernel,
                    unequal_at,
                    counted,
                    equal,
                    probes,
                }
            }
            Err(e) => {
                unequal_at = Some(probe_began);
                last = e;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let entries = d.dump_external().unwrap_or_else(|e| panic!("{e}"));
    let now = compare::diff(
        &format!("{origin}'s kernel"),
        &kernel_flows(origin_ns),
        &format!("{}'s external cache", d.node_id()),
        &external_of(&entries, origin),
        slack.get(),
    )
    .err()
    .unwrap_or_else(|| "now equal".into());
    panic!(
        "{}'s external cache did not become equal to {origin}'s kernel within {timeout:?}\n\
         last probe: {last}\nfinal comparison: {now}\nstatus: {}",
        d.node_id(),
        d.status().unwrap_or_else(Value::String)
    );
}

/// Checks the bookkeeping fields of the entries of `origin`: a version per flow, distinct;
/// ages no older than `since`; remaining timeouts no longer than the sent ones.
fn check_entry_fields(entries: &[ExternalEntry], origin: &str, since: Instant) {
    let max_age = since.elapsed().as_secs();
    let mut versions = HashSet::new();
    for e in entries.iter().filter(|e| e.origin == origin) {
        assert!(e.version > 0, "entry without a version: {e:?}");
        assert!(
            versions.insert(e.version),
            "version {} used twice, e.g. by {e:?}",
            e.version
        );
        assert!(
            e.age_secs <= max_age,
            "entry aged {} s in a test running for {max_age} s: {e:?}",
            e.age_secs
        );
        assert!(
            e.remaining_timeout <= e.flow.timeout,
            "remaining timeout above the sent one: {e:?}"
        );
    }
}

/// Writes `flows` into `ns`'s kernel and asserts they were all created.
fn inject(ns: &Netns, flows: &[Flow]) -> Duration {
    let mut w = kernel::writer(ns, 2);
    let t = Instant::now();
    let r = kernel::upsert_batched(&mut w, flows, 10_000);
    let took = t.elapsed();
    assert!(
        r.created == flows.len() as u64 && r.failures.is_empty() && r.updated == 0,
        "injecting {} flows: {}",
        flows.len(),
        kernel::describe(&r)
    );
    took
}

/// Deletes `flows` from `ns`'s kernel and asserts they were all there.
fn delete(ns: &Netns, flows: &[Flow]) {
    let mut w = kernel::writer(ns, 2);
    let r = w.delete(flows).expect("delete");
    assert!(
        r.deleted == flows.len() as u64 && r.absent == 0 && r.failures.is_empty(),
        "deleting {} flows: {}",
        flows.len(),
        kernel::describe(&r)
    );
}

/// Two nodes `fwa` and `fwb` joined by a sync link with mutual TLS.
struct Pair {
    // Dropped first to last: daemons, certificates, link, namespaces.
    a: Daemon,
    b: Daemon,
    _pki: Pki,
    _link: Link,
    a_ns: Netns,
    b_ns: Netns,
}

impl Pair {
    /// Starts both and waits until each is ready with the other connected.
    fn start() -> Pair {
        let a_ns = node_ns();
        let b_ns = node_ns();
        let link = Link::new(&a_ns, &b_ns);
        let pki = Pki::new(&["fwa", "fwb"]);
        let (a_addr, b_addr) = (addr(link.a_addr(), PORT), addr(link.b_addr(), PORT));
        let a = Daemon::start_with(
            &a_ns,
            "fwa",
            &sync_toml(a_addr, &[("fwb", b_addr)], &pki.tls("fwa")),
        );
        let b = Daemon::start_with(
            &b_ns,
            "fwb",
            &sync_toml(b_addr, &[("fwa", a_addr)], &pki.tls("fwb")),
        );
        let t = Instant::now();
        wait_ready(&a, &["fwb"], READY_DEADLINE);
        wait_ready(&b, &["fwa"], READY_DEADLINE);
        println!(
            "pair fwa ({a_addr}) / fwb ({b_addr}): both ready {:.2} s after both started",
            secs(t.elapsed())
        );
        Pair {
            a,
            b,
            _pki: pki,
            _link: link,
            a_ns,
            b_ns,
        }
    }
}

/// Acceptance: 100k mixed flows created in A's kernel reach B's external cache with every field
/// equal to A's kernel; 10k deleted in A's kernel disappear from it; 10k changed (mark, labels,
/// TCP state) change in it; and its timeouts age like the kernel's.
#[test]
fn replicates_100k_flows_updates_and_deletions() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 100_000;
    const DELETED: usize = 10_000;
    const CHANGED: usize = 10_000;
    let since = Instant::now();
    let p = Pair::start();

    let injected = flows::mixed(N);
    let t_inject = Instant::now();
    let inject_time = inject(&p.a_ns, &injected);
    let t_end = Instant::now();
    let r = wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    let expected: Vec<Flow> = injected.iter().map(as_created).collect();
    compare::diff(
        "injected",
        &expected,
        "fwb's external cache",
        &external_of(&r.entries, "fwa"),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    check_entry_fields(&r.entries, "fwa", since);
    println!(
        "replicates_100k_flows_updates_and_deletions: {N} flows injected into fwa's kernel in {:.2} s; \
         fwb's external cache {}",
        secs(inject_time),
        r.timing(t_end, "the injection ended")
    );
    println!(
        "replicates_100k_flows_updates_and_deletions: from the first flow written to fwb holding all {N}: \
         at most {:.2} s",
        secs(r.counted.saturating_duration_since(t_inject))
    );

    // Every tenth flow is deleted in A's kernel.
    let gone: Vec<Flow> = injected.iter().step_by(N / DELETED).cloned().collect();
    assert_eq!(gone.len(), DELETED);
    let t_del = Instant::now();
    delete(&p.a_ns, &gone);
    let t_deleted = Instant::now();
    let r = wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    let gone_keys: HashSet<_> = gone.iter().map(|f| f.key).collect();
    let still: Vec<_> = r
        .entries
        .iter()
        .filter(|e| gone_keys.contains(&e.flow.key))
        .collect();
    assert!(
        still.is_empty(),
        "{} deleted flows still in fwb's cache, e.g. {:?}",
        still.len(),
        still.first()
    );
    assert_eq!(
        r.kernel.len(),
        N - DELETED,
        "fwa's kernel after the deletion"
    );
    println!(
        "replicates_100k_flows_updates_and_deletions: {DELETED} flows deleted in fwa's kernel in {:.2} s; \
         fwb's external cache {}",
        secs(t_deleted - t_del),
        r.timing(t_deleted, "the deletion ended")
    );

    // Every tenth flow, other than those, is changed: mark, labels, TCP state.
    let changed: Vec<Flow> = injected
        .iter()
        .skip(5)
        .step_by(N / CHANGED)
        .map(flows::modified)
        .collect();
    assert_eq!(changed.len(), CHANGED);
    assert!(changed.iter().all(|f| !gone_keys.contains(&f.key)));
    let mut w = kernel::writer(&p.a_ns, 2);
    let t_upd = Instant::now();
    let upd = w.upsert(&changed).expect("upsert");
    let t_updated = Instant::now();
    assert!(
        upd.updated == CHANGED as u64 && upd.created == 0 && upd.failures.is_empty(),
        "updating {CHANGED} flows: {}",
        kernel::describe(&upd)
    );
    // The flow count does not tell when updates have arrived; fwa's view does: every change
    // acknowledged by fwb.
    let acked = wait_for(
        "fwb to acknowledge every change of fwa",
        REPLICATION_DEADLINE,
        Duration::from_millis(20),
        || {
            let st = p.a.status()?;
            let b = peer_status(&st, "fwb")?;
            if b["lag_changes"] == 0 && b["lag_secs"] == 0.0 {
                Ok(t_updated.elapsed())
            } else {
                Err(format!("fwb: {b}"))
            }
        },
    );
    let r = wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    let expected: Vec<Flow> = {
        let changed_keys: HashSet<_> = changed.iter().map(|f| f.key).collect();
        injected
            .iter()
            .filter(|f| !gone_keys.contains(&f.key) && !changed_keys.contains(&f.key))
            .chain(&changed)
            .map(as_created)
            .collect()
    };
    compare::diff(
        "fwa's flows after the changes",
        &expected,
        "fwb's external cache",
        &external_of(&r.entries, "fwa"),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "replicates_100k_flows_updates_and_deletions: {CHANGED} flows changed in fwa's kernel in \
         {:.2} s; fwa saw all changes acknowledged by fwb {:.2} s after the update ended; fwb's \
         external cache {}",
        secs(t_updated - t_upd),
        secs(acked),
        r.timing(t_updated, "the update ended")
    );

    // Timeouts age: every flow was received by fwb at most `slack` after its kernel entry was
    // created or changed, so that bound holds between its remaining timeout and the kernel's
    // at any later time. Checked long enough after the replication for a timeout that does not
    // age (or ages twice) to stand out.
    let slack = Slack::between(t_inject, t_updated.max(r.equal));
    let Slack::Fixed(bound) = slack else {
        unreachable!()
    };
    let check_at = Instant::now() + Duration::from_secs(u64::from(bound) + 10);
    std::thread::sleep(check_at.saturating_duration_since(Instant::now()));
    let entries = p.b.dump_external().unwrap_or_else(|e| panic!("{e}"));
    compare::diff(
        "fwa's kernel",
        &kernel_flows(&p.a_ns),
        &format!("fwb's external cache, {} s on", bound + 10),
        &external_of(&entries, "fwa"),
        bound,
    )
    .unwrap_or_else(|e| panic!("replicated timeouts do not age like the kernel's: {e}"));
    println!(
        "replicates_100k_flows_updates_and_deletions: remaining timeouts within {bound} s of the \
         kernel's {} s after the replication",
        bound + 10
    );

    // Nothing was committed to B's kernel (manual commit mode): its table holds only link flows.
    let b_kernel = kernel_flows(&p.b_ns);
    assert!(
        b_kernel.is_empty(),
        "fwb's kernel holds {} flows, e.g. {:?}",
        b_kernel.len(),
        b_kernel.first()
    );
    let st = p.b.status().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st["ready"], true, "{st}");

    // A commit of the whole external cache, written in several chunks, puts exactly A's flows
    // into B's kernel.
    let held = st["sync"]["external_flows"].as_u64();
    let out =
        p.b.syncctl(&["commit", "--json"])
            .unwrap_or_else(|e| panic!("syncctl commit: {e}"));
    let summary: Value = serde_json::from_slice(&out).expect("commit summary is JSON");
    assert_eq!(summary["flows"].as_u64(), held, "{summary}");
    assert_eq!(summary["failed"].as_u64(), Some(0), "{summary}");
    let committed: HashSet<_> = kernel_flows(&p.b_ns).iter().map(|f| f.key).collect();
    let a_keys: HashSet<_> = kernel_flows(&p.a_ns).iter().map(|f| f.key).collect();
    assert!(
        committed == a_keys,
        "fwb's kernel holds {} flows after the commit, fwa's {}",
        committed.len(),
        a_keys.len()
    );

    // B applied the flows it created to its internal cache itself (their events are dropped in
    // the kernel): the cache must equal B's kernel all the same, and a reconciliation against
    // the kernel must find nothing to repair.
    let st = p.b.status().unwrap_or_else(|e| panic!("{e}"));
    let own = &st["kernel"]["stats"];
    // (Flows B's kernel held already, such as the sync link's own, were written the other way.)
    let created = own["own_creations"].as_u64().unwrap_or(0);
    assert!(
        created > 0 && Some(created) <= held,
        "{created} of {held:?}: {own}"
    );
    compare::diff(
        "fwb's kernel",
        &kernel_flows(&p.b_ns),
        "fwb's internal cache",
        &p.b.dump_internal()
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .filter(|f| !is_link_flow(f))
            .collect::<Vec<_>>(),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("fwb's internal cache differs from its kernel: {e}"));
    let resyncs = own["resyncs"].as_u64().unwrap_or(0);
    p.b.syncctl(&["resync"])
        .unwrap_or_else(|e| panic!("syncctl resync: {e}"));
    let st = wait_for(
        "fwb's reconciliation after the commit",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let st = p.b.status()?;
            match st["kernel"]["stats"]["resyncs"].as_u64() {
                Some(n) if n > resyncs => Ok(st),
                _ => Err("not yet".to_string()),
            }
        },
    );
    assert_eq!(
        st["kernel"]["stats"]["resync_repairs"].as_u64(),
        Some(0),
        "{}",
        st["kernel"]["stats"]
    );
}

/// Acceptance: B restarted with the same config becomes ready again and then holds all of A's
/// flows again.
#[test]
fn restarted_peer_becomes_ready_with_all_flows() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 50_000;
    let since = Instant::now();
    let mut p = Pair::start();
    let injected = flows::mixed(N);
    inject(&p.a_ns, &injected);
    wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    let old_epoch = p.b.status().unwrap_or_else(|e| panic!("{e}"))["sync"]["epoch"].clone();

    let t = Instant::now();
    let exit = p.b.restart();
    assert!(exit.success(), "fwb exited with {exit} on SIGTERM");
    let started = t.elapsed();
    // The first time `syncctl ready` says yes, A's snapshot must be in: every flow must be
    // there at that moment, without waiting further.
    wait_for(
        "fwb to say ready after its restart",
        READY_DEADLINE,
        Duration::from_millis(20),
        || match p.b.ready()? {
            true => Ok(()),
            false => Err("not ready".to_string()),
        },
    );
    let ready_after = t.elapsed();
    let entries = p.b.dump_external().unwrap_or_else(|e| panic!("{e}"));
    let st = wait_ready(&p.b, &["fwa"], READY_DEADLINE);
    assert_ne!(
        st["sync"]["epoch"], old_epoch,
        "a restarted fwb must have a new epoch: {st}"
    );
    compare::diff(
        "fwa's kernel",
        &kernel_flows(&p.a_ns),
        "fwb's external cache when ready",
        &external_of(&entries, "fwa"),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("fwb said ready without holding all of fwa's flows: {e}"));
    assert_eq!(
        origins(&entries).keys().collect::<Vec<_>>(),
        ["fwa"],
        "origins in fwb's cache"
    );
    let expected: Vec<Flow> = injected.iter().map(as_created).collect();
    compare::diff(
        "injected",
        &expected,
        "fwb's external cache",
        &external_of(&entries, "fwa"),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // A sees B's new epoch.
    let a_st = p.a.status().unwrap_or_else(|e| panic!("{e}"));
    let b_seen = peer_status(&a_st, "fwb").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        b_seen["epoch"], st["sync"]["epoch"],
        "fwa's view of fwb: {a_st}"
    );
    println!(
        "restarted_peer_becomes_ready_with_all_flows: fwb stopped and started again in {:.2} s, \
         ready with all {N} flows of fwa {:.2} s after the stop began",
        secs(started),
        secs(ready_after)
    );
}

/// Acceptance: A restarted (new epoch) after flows vanished from, appeared in and changed in its
/// kernel while it was down: B keeps A's flows meanwhile, and afterwards holds exactly A's table.
/// Some of the flows that appear while A is down were closed while it ran (the same tuples
/// opened again, as DNS clients and NAT port reuse do): B saw their deletion from A's old epoch.
#[test]
fn restarted_origin_replaces_its_flows() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 30_000;
    const CHURN: usize = 3_000;
    let since = Instant::now();
    let mut p = Pair::start();
    let all = flows::mixed(N + CHURN);
    let (initial, added) = all.split_at(N);
    let pick = |offset: usize| initial.iter().skip(offset).step_by(N / CHURN);
    let vanished: Vec<Flow> = pick(0).cloned().collect();
    let changed: Vec<Flow> = pick(1).map(flows::modified).collect();
    let recycled: Vec<Flow> = pick(2).cloned().collect();
    assert!([&vanished, &changed, &recycled]
        .iter()
        .all(|v| v.len() == CHURN));

    let t_inject = Instant::now();
    inject(&p.a_ns, initial);
    let first = wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    // Closed while fwa runs: gone from fwb too.
    delete(&p.a_ns, &recycled);
    wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        RESYNC_DEADLINE,
    );
    let old_epoch = p.a.status().unwrap_or_else(|e| panic!("{e}"))["sync"]["epoch"].clone();

    let exit = p.a.stop_process();
    assert!(exit.success(), "fwa exited with {exit} on SIGTERM");
    let t_down = Instant::now();
    delete(&p.a_ns, &vanished);
    inject(&p.a_ns, added);
    inject(&p.a_ns, &recycled);
    let upd = kernel::writer(&p.a_ns, 2).upsert(&changed).expect("upsert");
    assert!(
        upd.updated == CHURN as u64 && upd.failures.is_empty(),
        "{}",
        kernel::describe(&upd)
    );

    // The standby keeps the flows of a peer that went down (that is what it takes over).
    let down = wait_for(
        "fwb to see fwa down",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let st = p.b.status()?;
            let a = peer_status(&st, "fwa")?;
            if a["state"] == "down" {
                Ok(st)
            } else {
                Err(format!("fwa: {a}"))
            }
        },
    );
    let entries = p.b.dump_external().unwrap_or_else(|e| panic!("{e}"));
    let recycled_keys: HashSet<_> = recycled.iter().map(|f| f.key).collect();
    let expected_old: Vec<Flow> = initial
        .iter()
        .filter(|f| !recycled_keys.contains(&f.key))
        .map(as_created)
        .collect();
    compare::diff(
        "fwa's flows before it stopped",
        &expected_old,
        "fwb's external cache while fwa is down",
        &external_of(&entries, "fwa"),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}\nstatus: {down}"));

    let t_start = Instant::now();
    p.a.start_again();
    let r = wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        RESYNC_DEADLINE,
    );
    let expected: Vec<Flow> = {
        let skip: HashSet<_> = vanished.iter().chain(&changed).map(|f| f.key).collect();
        initial
            .iter()
            .filter(|f| !skip.contains(&f.key))
            .chain(added)
            .chain(&changed)
            .map(as_created)
            .collect()
    };
    compare::diff(
        "fwa's new table",
        &expected,
        "fwb's external cache",
        &external_of(&r.entries, "fwa"),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Timeouts: each entry was received at most this long after the kernel state it carries
    // (from the first replication, or from fwa's snapshot after the restart), and has aged
    // since like the kernel's.
    let bound = Slack::between(t_inject, first.equal)
        .get()
        .max(Slack::between(t_start, r.equal).get());
    compare::diff(
        "fwa's kernel",
        &r.kernel,
        "fwb's external cache",
        &external_of(&r.entries, "fwa"),
        bound,
    )
    .unwrap_or_else(|e| panic!("timeouts after fwa's restart: {e}"));
    let a_epoch = p.a.status().unwrap_or_else(|e| panic!("{e}"))["sync"]["epoch"].clone();
    assert_ne!(a_epoch, old_epoch, "fwa restarted with its old epoch");
    let b_st = wait_ready(&p.b, &["fwa"], READY_DEADLINE);
    let seen = peer_status(&b_st, "fwa").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen["epoch"], a_epoch, "fwb's view of fwa: {b_st}");
    println!(
        "restarted_origin_replaces_its_flows: fwa down {:.2} s ({CHURN} flows deleted, {CHURN} \
         added, {CHURN} closed earlier opened again, {CHURN} changed meanwhile); fwb's cache of \
         fwa's new table ({} flows) {}",
        secs(t_start - t_down),
        r.kernel.len(),
        r.timing(t_start, "fwa was started again")
    );
}

/// After A restarts (new epoch, its change counter starts again from 1), its live changes must
/// still reach B: flows A deletes must disappear from B, flows A changes must change in B,
/// also when A's previous run had counted more changes than its new one has so far.
#[test]
fn changes_after_origin_restart_are_applied() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 20_000;
    const LATE: usize = 2_000;
    let since = Instant::now();
    let mut p = Pair::start();
    let initial = flows::mixed(N);
    inject(&p.a_ns, &initial);
    // Every flow changes once while fwa runs: its previous run counts about 2N changes.
    let once: Vec<Flow> = initial.iter().map(flows::modified).collect();
    let upd = kernel::writer(&p.a_ns, 2).upsert(&once).expect("upsert");
    assert!(
        upd.updated == N as u64 && upd.failures.is_empty(),
        "{}",
        kernel::describe(&upd)
    );
    wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );

    let exit = p.a.restart();
    assert!(exit.success(), "fwa exited with {exit} on SIGTERM");
    let t_restarted = Instant::now();
    wait_ready(&p.b, &["fwa"], READY_DEADLINE);
    wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        RESYNC_DEADLINE,
    );

    // Live changes of the new run.
    let step = N / LATE;
    let late_gone: Vec<Flow> = once.iter().step_by(step).cloned().collect();
    let late_changed: Vec<Flow> = once
        .iter()
        .skip(1)
        .step_by(step)
        .map(flows::modified)
        .collect();
    delete(&p.a_ns, &late_gone);
    let upd = kernel::writer(&p.a_ns, 2)
        .upsert(&late_changed)
        .expect("upsert");
    assert!(
        upd.updated == LATE as u64 && upd.failures.is_empty(),
        "{}",
        kernel::describe(&upd)
    );
    let t_changed = Instant::now();
    let r = wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        RESYNC_DEADLINE,
    );
    let expected: Vec<Flow> = {
        let skip: HashSet<_> = late_gone
            .iter()
            .chain(&late_changed)
            .map(|f| f.key)
            .collect();
        once.iter()
            .filter(|f| !skip.contains(&f.key))
            .chain(&late_changed)
            .map(as_created)
            .collect()
    };
    compare::diff(
        "fwa's table",
        &expected,
        "fwb's external cache",
        &external_of(&r.entries, "fwa"),
        timeout_slack(since),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "changes_after_origin_restart_are_applied: fwa restarted {:.2} s before {LATE} deletions \
         and {LATE} changes; fwb's external cache {}",
        secs(t_changed - t_restarted),
        r.timing(t_changed, "the changes")
    );
}

/// Acceptance: three nodes in a full mesh, each with its own flows: every external cache holds
/// exactly the flows of the two others, by origin, and none of its own.
#[test]
fn full_mesh_of_three_keeps_origins_apart() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const EACH: usize = 20_000;
    let since = Instant::now();
    let names = ["fwa", "fwb", "fwc"];
    let ns: Vec<Netns> = names.iter().map(|_| node_ns()).collect();
    // Links a-b, a-c, b-c; the address of node j as seen from node i.
    let mut links = Vec::new();
    let mut seen_at = BTreeMap::new();
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        let l = Link::new(&ns[i], &ns[j]);
        seen_at.insert((i, j), l.b_addr());
        seen_at.insert((j, i), l.a_addr());
        links.push(l);
    }
    let pki = Pki::new(&names);
    let listen = addr(Ipv4Addr::UNSPECIFIED, PORT);
    let daemons: Vec<Daemon> = (0..3)
        .map(|i| {
            let peers: Vec<(&str, SocketAddr)> = (0..3)
                .filter(|&j| j != i)
                .map(|j| (names[j], addr(seen_at[&(i, j)], PORT)))
                .collect();
            Daemon::start_with(
                &ns[i],
                names[i],
                &sync_toml(listen, &peers, &pki.tls(names[i])),
            )
        })
        .collect();
    for (i, d) in daemons.iter().enumerate() {
        let others: Vec<&str> = (0..3).filter(|&j| j != i).map(|j| names[j]).collect();
        wait_ready(d, &others, READY_DEADLINE);
    }

    let all = flows::mixed(3 * EACH);
    let t = Instant::now();
    for (i, chunk) in all.chunks(EACH).enumerate() {
        inject(&ns[i], chunk);
    }
    let t_end = Instant::now();
    // First the cheap probe for all six directions at once: each node's count of each other
    // node's flows equals that node's table size.
    let mut pending: Vec<(usize, usize)> = (0..3)
        .flat_map(|i| (0..3).filter(move |&j| j != i).map(move |j| (i, j)))
        .collect();
    let mut counted = Vec::new();
    let poll = Instant::now();
    while !pending.is_empty() {
        let mut last = String::new();
        pending.retain(|&(i, j)| {
            let st = daemons[i].status().unwrap_or_else(|e| panic!("{e}"));
            let held = peer_status(&st, names[j])
                .ok()
                .and_then(|p| p["external_flows"].as_u64());
            let in_kernel = cli::count(&ns[j]) as u64;
            if held == Some(in_kernel) {
                counted.push((i, j, t_end.elapsed()));
                false
            } else {
                last = format!("{} holds {held:?} of {}'s {in_kernel}", names[i], names[j]);
                true
            }
        });
        assert!(
            poll.elapsed() < REPLICATION_DEADLINE,
            "mesh not replicated within {REPLICATION_DEADLINE:?}: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let slowest = counted.iter().map(|c| c.2).max().unwrap_or_default();
    for (i, j, after) in &counted {
        println!(
            "full_mesh_of_three_keeps_origins_apart: {} counted all of {}'s flows {:.2} s after \
             the injection ended",
            names[*i],
            names[*j],
            secs(*after)
        );
    }
    // Then field by field.
    for (i, d) in daemons.iter().enumerate() {
        let others: Vec<&str> = (0..3).filter(|&j| j != i).map(|j| names[j]).collect();
        let mut entries = Vec::new();
        for &j in &[0, 1, 2] {
            if j == i {
                continue;
            }
            let r = wait_replicated(
                d,
                names[j],
                &ns[j],
                &others,
                Slack::Since(since),
                REPLICATION_DEADLINE,
            );
            let expected: Vec<Flow> = all[j * EACH..(j + 1) * EACH]
                .iter()
                .map(as_created)
                .collect();
            compare::diff(
                &format!("{}'s injected flows", names[j]),
                &expected,
                &format!("{}'s external cache", names[i]),
                &external_of(&r.entries, names[j]),
                timeout_slack(since),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            entries = r.entries;
        }
        // The last dump holds both origins complete, each equal to its node's kernel.
        for &j in &[0, 1, 2] {
            if j != i {
                compare::diff(
                    &format!("{}'s kernel", names[j]),
                    &kernel_flows(&ns[j]),
                    &format!("{}'s external cache", names[i]),
                    &external_of(&entries, names[j]),
                    timeout_slack(since),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let by_origin = origins(&entries);
        let expected_origins: BTreeSet<&str> = others.iter().copied().collect();
        assert_eq!(
            by_origin
                .keys()
                .map(String::as_str)
                .collect::<BTreeSet<_>>(),
            expected_origins,
            "origins in {}'s external cache: {by_origin:?}",
            names[i]
        );
        // None of its own flows came back to it under another origin.
        let own: HashSet<_> = all[i * EACH..(i + 1) * EACH]
            .iter()
            .map(|f| f.key)
            .collect();
        let echoed = entries.iter().filter(|e| own.contains(&e.flow.key)).count();
        assert_eq!(
            echoed, 0,
            "{} holds {echoed} of its own flows in its external cache",
            names[i]
        );
        let st = d.status().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            st["sync"]["external_flows"].as_u64(),
            Some(entries.len() as u64),
            "external_flows of {}: {st}",
            names[i]
        );
    }
    println!(
        "full_mesh_of_three_keeps_origins_apart: {EACH} flows injected into each of 3 nodes in \
         {:.2} s; every external cache had its full flow count at the latest {:.2} s after the injection \
         ended",
        secs(t_end - t),
        secs(slowest)
    );
}

/// Lines of a log that mention any of `words`.
fn log_lines(log: &str, words: &[&str]) -> Vec<String> {
    log.lines()
        .filter(|l| words.iter().any(|w| l.contains(w)))
        .map(str::to_string)
        .collect()
}

/// Whether `flows` hold a TCP connection from `client` to `server:port` that the server
/// answered (`SEEN_REPLY`): proof that the network path worked and a refusal came later, from
/// TLS.
fn tcp_answered(flows: &[Flow], client: Ipv4Addr, server: Ipv4Addr, port: u16) -> bool {
    flows.iter().any(|f| {
        f.key.orig.proto == proto::TCP
            && f.key.orig.src == IpAddr::V4(client)
            && f.key.orig.dst == IpAddr::V4(server)
            && matches!(f.key.orig.l4, L4::Ports { dst, .. } if dst == port)
            && f.status & status::SEEN_REPLY != 0
    })
}

/// An intruder of the authentication test: its namespace, link to A, and daemon.
struct Intruder {
    daemon: Daemon,
    link: Link,
    ns: Netns,
    /// Its own flows, which must never reach A or B.
    flows: Vec<Flow>,
}

/// Acceptance: nodes with a certificate of another CA (one dialing A, one dialed by A), and a
/// node without TLS dialing A, all configured as A's peers, are refused: A never shows them
/// connected, and no flow crosses in either direction; A and B replicate as usual meanwhile.
/// Each intruder has its own namespace and link, and its TCP connections are shown to reach the
/// other side, so the refusal is TLS's doing, not the network's.
#[test]
fn foreign_ca_and_plaintext_peers_are_refused() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const WATCH: Duration = Duration::from_secs(20);
    const EACH: usize = 2_000;
    let since = Instant::now();
    let a_ns = node_ns();
    let b_ns = node_ns();
    let ab = Link::new(&a_ns, &b_ns);
    let pki = Pki::new(&["fwa", "fwb"]);
    // Same cluster name, other CA: only the CA tells them apart. The intruders trust the
    // cluster's CA certificate (it is public), so their side would accept A.
    let foreign = Pki::new(&["fw0", "fwz"]);
    // fw0 and fw1 dial A (their ids are smaller than "fwa"); A dials fwz.
    let plan = [
        ("fw0", foreign.tls_trusting("fw0", &pki)),
        ("fwz", foreign.tls_trusting("fwz", &pki)),
        ("fw1", Security::Plaintext),
    ];
    let all = flows::mixed(EACH * (plan.len() + 1));
    let mut chunks = all.chunks(EACH);
    let a_flows = chunks.next().expect("chunk").to_vec();
    let mut intruders: Vec<Intruder> = Vec::new();
    let mut setups = Vec::new();
    for (name, _) in &plan {
        let ns = node_ns();
        let link = Link::new(&a_ns, &ns);
        setups.push((*name, ns, link, chunks.next().expect("chunk").to_vec()));
    }
    let b_ab = addr(ab.b_addr(), PORT);
    let mut a_peers = vec![("fwb", b_ab)];
    a_peers.extend(
        setups
            .iter()
            .map(|(n, _, l, _)| (*n, addr(l.b_addr(), PORT))),
    );
    // A listens on every address: B and the intruders reach it on different links.
    let a = Daemon::start_with(
        &a_ns,
        "fwa",
        &sync_toml(addr(Ipv4Addr::UNSPECIFIED, PORT), &a_peers, &pki.tls("fwa")),
    );
    let b = Daemon::start_with(
        &b_ns,
        "fwb",
        &sync_toml(b_ab, &[("fwa", addr(ab.a_addr(), PORT))], &pki.tls("fwb")),
    );
    for ((name, ns, link, flows), (_, security)) in setups.into_iter().zip(&plan) {
        let toml = sync_toml(
            addr(link.b_addr(), PORT),
            &[("fwa", addr(link.a_addr(), PORT))],
            security,
        );
        let daemon = Daemon::start_with(&ns, name, &toml);
        inject(&ns, &flows);
        intruders.push(Intruder {
            daemon,
            link,
            ns,
            flows,
        });
    }
    inject(&a_ns, &a_flows);

    // Watch for a while: the dialers retry every 2 s at most, so this spans several attempts.
    let start = Instant::now();
    let mut observations = 0;
    while start.elapsed() < WATCH {
        let st = a.status().unwrap_or_else(|e| panic!("{e}"));
        for i in &intruders {
            let n = i.daemon.node_id();
            let ps = peer_status(&st, n).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                ps["state"] == "down" && ps["epoch"] == 0 && ps["external_flows"] == 0,
                "fwa let intruder {n} in: {ps}\nfwa's log:\n{}",
                a.log_tail(40)
            );
            let st = i.daemon.status().unwrap_or_else(|e| panic!("{e}"));
            let ps = peer_status(&st, "fwa").unwrap_or_else(|e| panic!("{e}"));
            assert!(
                ps["state"] != "connected" && ps["external_flows"] == 0,
                "intruder {n} got a session with fwa: {ps}"
            );
        }
        observations += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    // The intruders' connections did reach the other side: the refusal came from TLS.
    let a_kernel = kernel::dump(&a_ns);
    for i in &intruders {
        let (a_ip, i_ip) = (i.link.a_addr(), i.link.b_addr());
        let n = i.daemon.node_id();
        let reached = if n < "fwa" {
            tcp_answered(&a_kernel, i_ip, a_ip, PORT)
        } else {
            tcp_answered(&a_kernel, a_ip, i_ip, PORT)
        };
        assert!(
            reached,
            "no answered TCP connection between fwa and {n} in fwa's table: the test would not \
             show that TLS refused it"
        );
    }
    // Nothing crossed: A and B hold only each other's flows, the intruders nothing.
    let rb = wait_replicated(
        &b,
        "fwa",
        &a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    assert_eq!(external_of(&rb.entries, "fwa").len(), a_flows.len());
    let a_ext = a.dump_external().unwrap_or_else(|e| panic!("{e}"));
    let a_origins = origins(&a_ext);
    assert!(
        a_origins.keys().all(|o| o == "fwb"),
        "fwa's external cache holds flows of {a_origins:?}"
    );
    let intruder_keys: HashSet<_> = intruders
        .iter()
        .flat_map(|i| i.flows.iter().map(|f| f.key))
        .collect();
    for (who, entries) in [("fwa", &a_ext), ("fwb", &rb.entries)] {
        let leaked = entries
            .iter()
            .filter(|e| intruder_keys.contains(&e.flow.key))
            .count();
        assert_eq!(leaked, 0, "{who} holds {leaked} of the intruders' flows");
    }
    for i in &intruders {
        let ext = i.daemon.dump_external().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ext.is_empty(),
            "intruder {} received {} flows, e.g. {:?}",
            i.daemon.node_id(),
            ext.len(),
            ext.first()
        );
        // Its own table is what it was given (it mirrors it, it just cannot send it).
        assert!(kernel_flows(&i.ns).len() >= i.flows.len());
    }
    let a_st = a.status().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a_st["sync"]["security"], "mutual-tls", "{a_st}");
    assert_eq!(
        peer_status(&a_st, "fwb").unwrap_or_else(|e| panic!("{e}"))["state"],
        "connected",
        "{a_st}"
    );

    // Between two observations neither: fwa's log never reports a connection with them.
    let a_log = a.log();
    for i in &intruders {
        let n = i.daemon.node_id();
        let (plain, quoted) = (format!("peer={n} "), format!("peer=\"{n}\""));
        let connected: Vec<&str> = a_log
            .lines()
            .filter(|l| {
                l.contains(&plain) || l.contains(&quoted) || l.ends_with(&plain[..plain.len() - 1])
            })
            .filter(|l| l.contains("peer connected") || l.contains("connected to peer"))
            .collect();
        assert!(
            connected.is_empty(),
            "fwa's log reports a connection with intruder {n}: {connected:?}"
        );
    }
    let b_lines = log_lines(&a_log, &["peer connected peer=fwb"]);
    assert!(!b_lines.is_empty(), "fwa's log never reports fwb connected");

    // What the logs say about the refusals.
    let names: Vec<&str> = intruders.iter().map(|i| i.daemon.node_id()).collect();
    let lines = log_lines(&a_log, &names);
    println!(
        "foreign_ca_and_plaintext_peers_are_refused: {observations} observations over {:.0} s, no \
         intruder connected; fwa's log lines about them ({}):",
        secs(WATCH),
        lines.len()
    );
    for l in &lines {
        println!("  fwa: {l}");
    }
    for i in &intruders {
        let lines = log_lines(&i.daemon.log(), &["fwa"]);
        for l in lines.iter().take(3) {
            println!("  {}: {l}", i.daemon.node_id());
        }
    }
}

/// Acceptance: `syncctl status --json` on B shows A connected with its epoch, acknowledged
/// messages, synced, and as many flows as A's table; `ready` is true, `syncctl ready` exits 0.
#[test]
fn status_reports_the_peer() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 5_000;
    let since = Instant::now();
    let p = Pair::start();
    inject(&p.a_ns, &flows::mixed(N));
    wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    let a_st = p.a.status().unwrap_or_else(|e| panic!("{e}"));
    let a_flows = a_st["internal_cache"]["flows"]
        .as_u64()
        .unwrap_or_else(|| panic!("{a_st}"));
    let st = p.b.status().unwrap_or_else(|e| panic!("{e}"));
    let sync = &st["sync"];
    let a = peer_status(&st, "fwa").unwrap_or_else(|e| panic!("{e}"));
    println!("status_reports_the_peer: fwb's view of fwa: {a}");
    let check = |ok: bool, what: &str| assert!(ok, "{what}; fwb's status: {st}");
    check(a["state"] == "connected", "state is not connected");
    check(
        a["epoch"] == a_st["sync"]["epoch"] && a["epoch"].as_u64().is_some_and(|e| e != 0),
        "epoch is not fwa's",
    );
    check(
        a["acked_seq"].as_u64().is_some_and(|s| s > 0),
        "acked_seq is 0",
    );
    check(a["synced"] == true, "not synced");
    check(
        a["external_flows"].as_u64() == Some(a_flows),
        &format!("external_flows is not fwa's {a_flows} flows"),
    );
    check(
        a_flows >= N as u64 && a_flows <= N as u64 + 8,
        "fwa's table is the injected flows plus its link flows",
    );
    check(
        sync["external_flows"].as_u64() == Some(a_flows),
        "sync.external_flows",
    );
    check(sync["cluster"] == CLUSTER, "cluster");
    check(sync["security"] == "mutual-tls", "security");
    check(sync["peers_ready"] == true, "peers_ready");
    check(st["ready"] == true, "ready");
    assert!(
        p.b.ready().unwrap_or_else(|e| panic!("{e}")),
        "syncctl ready"
    );
    // The table and JSON forms of `ready` and `status` agree.
    let human = String::from_utf8(p.b.syncctl(&["status"]).unwrap_or_else(|e| panic!("{e}")))
        .expect("utf-8");
    let row = human
        .lines()
        .find(|l| l.starts_with("fwa "))
        .unwrap_or_else(|| panic!("no fwa row in:\n{human}"));
    assert!(
        row.contains("connected") && row.contains(&a_flows.to_string()),
        "{row}"
    );
    let json: Value = serde_json::from_slice(
        &p.b.syncctl(&["ready", "--json"])
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .expect("ready --json is JSON");
    assert_eq!(json, serde_json::json!({ "ready": true }));
}

/// Flows created in a namespace by a writer of its own (not ctsync's: their events are foreign),
/// a few at a time, until told to stop or out of flows; counts what it created.
struct ForeignCreator {
    created: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ForeignCreator {
    /// Starts creating `flows` in `ns`, 10 every millisecond.
    fn start(ns: &Netns, flows: Vec<Flow>) -> ForeignCreator {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let created = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let name = ns.name().to_string();
        let (c, s) = (created.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            ctsync::netns::run_in(&name, move || {
                let mut w = ctsync::netlink::Writer::open(1, &ctsync::netlink::Origins::new())
                    .unwrap_or_else(|e| panic!("foreign writer: {e}"));
                for batch in flows.chunks(10) {
                    if s.load(Ordering::Relaxed) {
                        return;
                    }
                    let r = w
                        .upsert(batch)
                        .unwrap_or_else(|e| panic!("foreign writer: {e}"));
                    assert_eq!(r.created, batch.len() as u64, "{}", kernel::describe(&r));
                    c.fetch_add(batch.len(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .unwrap_or_else(|e| panic!("cannot enter {name}: {e}"));
        });
        ForeignCreator {
            created,
            stop,
            thread: Some(thread),
        }
    }

    fn created(&self) -> usize {
        self.created.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops and returns how many flows were created.
    fn finish(mut self) -> usize {
        if let Err(p) = self.stop_and_join() {
            std::panic::resume_unwind(p);
        }
        self.created()
    }

    fn stop_and_join(&mut self) -> std::thread::Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map_or(Ok(()), |t| t.join())
    }
}

impl Drop for ForeignCreator {
    fn drop(&mut self) {
        // A panic of the writer is reported by `finish`; here the test is failing already.
        let _ = self.stop_and_join();
    }
}

/// A counter of `syncctl status --json` under `kernel.stats`.
fn mirror_stat(st: &Value, name: &str) -> u64 {
    st["kernel"]["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no kernel.stats.{name} in {st}"))
}

/// Acceptance: a promotion commits with creation events muted and still knows, once done, every
/// flow created in its kernel meanwhile by others (the re-read after the commit finds them):
/// fewer creation events arrive than flows were created, none of them is missing from the
/// internal cache, and the committed flows are in the kernel.
#[test]
fn promotion_mutes_creation_events_and_misses_no_flow() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    const N: usize = 50_000;
    const FOREIGN: usize = 30_000;
    let since = Instant::now();
    let p = Pair::start();
    let all = flows::mixed(N + FOREIGN);
    let (replicated, foreign) = all.split_at(N);
    inject(&p.a_ns, replicated);
    wait_replicated(
        &p.b,
        "fwa",
        &p.a_ns,
        &["fwa"],
        Slack::Since(since),
        REPLICATION_DEADLINE,
    );
    let before = p.b.status().unwrap_or_else(|e| panic!("{e}"));

    let creator = ForeignCreator::start(&p.b_ns, foreign.to_vec());
    wait_for(
        "the foreign writer to start",
        Duration::from_secs(10),
        Duration::from_millis(5),
        || {
            (creator.created() > 0)
                .then_some(())
                .ok_or("none yet".to_string())
        },
    );
    let t = Instant::now();
    p.b.syncctl(&["promote"])
        .unwrap_or_else(|e| panic!("promote: {e}"));
    let promote_took = t.elapsed();
    std::thread::sleep(Duration::from_millis(50));
    let created = creator.finish();
    assert!(
        created < FOREIGN,
        "the foreign writer ran out of flows before the promotion ended"
    );

    let foreign_keys: Vec<_> = foreign[..created].iter().map(|f| f.key).collect();
    let st = wait_for(
        "fwb's internal cache to hold every foreign flow after the promotion",
        RESYNC_DEADLINE,
        Duration::from_millis(100),
        || {
            let st = p.b.status()?;
            if st["kernel"]["dump_running"] != false || st["kernel"]["synced"] != true {
                return Err(format!("re-read of the table not done: {}", st["kernel"]));
            }
            let held: HashSet<_> = p.b.dump_internal()?.into_iter().map(|f| f.key).collect();
            let missing = foreign_keys.iter().filter(|k| !held.contains(k)).count();
            match missing {
                0 => Ok(st),
                m => Err(format!("{m} of {created} foreign flows missing")),
            }
        },
    );
    assert_eq!(mirror_stat(&st, "creations_muted"), 1, "{}", st["kernel"]);
    let heard = mirror_stat(&st, "events_new") - mirror_stat(&before, "events_new");
    assert!(
        (heard as usize) < created,
        "{heard} creation events heard for {created} foreign creations: nothing was muted"
    );
    let in_kernel: HashSet<_> = kernel_flows(&p.b_ns).into_iter().map(|f| f.key).collect();
    let uncommitted = replicated
        .iter()
        .filter(|f| !in_kernel.contains(&f.key))
        .count();
    assert_eq!(uncommitted, 0, "flows of fwa missing from fwb's kernel");
    println!(
        "promotion_mutes_creation_events_and_misses_no_flow: {N} flows promoted in {:.0} ms; \
         {created} foreign creations meanwhile, {} of them known from the re-read, not events",
        promote_took.as_secs_f64() * 1e3,
        created - heard as usize
    );
}
