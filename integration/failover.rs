//! Failover with keepalived: the master firewall dies, the backup takes over, and every
//! established connection through the pair goes on.
//!
//! The network is [`Topology`]: client and server on two L2 segments, shared by two firewalls
//! running a strict stateful ruleset with `nf_conntrack_tcp_loose = 0` (a mid-stream packet
//! without a conntrack entry is dropped), a source NAT to a shared address, keepalived (VRRPv3,
//! adverts every 100 ms, a sync group moving the gateway addresses v4 and v6 and the NAT
//! address), and ctsyncd replicating over a dedicated link with mutual TLS. keepalived hands its
//! transitions, in order (`vrrp_notify_fifo`), to the shipped `config/keepalived/ctsync-notify.sh`
//! (MASTER: `syncctl promote`; BACKUP/FAULT: `syncctl demote`); its vrrp_script is
//! `syncctl ready`. The firewalls' own input is dropped unless established (see
//! [`firewall_ruleset`](crate::support::cluster::firewall_ruleset) for why that matters).
//!
//! Four streams run from the client to the server through the master (TCP over IPv4, TCP
//! source-NATed, TCP over IPv6, UDP), each sending a counter every 20 ms and checking the echo.
//! Then fw1 is killed: SIGKILL of keepalived and ctsyncd, every link down. The streams must go on
//! through fw2 without a reset and without standing still for a second or more.
//!
//! Why a second is a meaningful bound: keepalived takes over after three missed adverts plus a
//! skew (about 0.35 s at 0.1 s adverts), and a TCP sender whose segment was lost retransmits
//! after about 0.2 s and then 0.6 s (the retransmission timer doubles from its 200 ms floor).
//! When the new master has the connection's state by then (takeover plus promote within
//! ~0.6 s), the stream stands still for about 0.65 s; any later and the next retransmission
//! comes at ~1.4 s, over the bound. UDP just loses the datagrams of the takeover.
//!
//! The negative control runs the same scenario with keepalived alone (no ctsyncd, nothing
//! notified) and asserts that it fails: the TCP streams stall behind fw2's firewall, while
//! UDP (which fw2 may accept as new) still passes, showing that the network did fail over.

use crate::support::cluster::{
    find_stream, keepalived_config_test, make_pki, monotonic, vips_on, Client, ClientReport,
    Keepalived, Node, Notify, Server, Topology, SNAT_VIP, VIPS,
};
use crate::support::netns::TempDir;
use crate::support::{clock, exclusive, kernel, require_root, secs, wait_for};
use ctsync::config::CommitMode;
use std::time::{Duration, Instant};

/// Largest pause a stream may have across the takeover.
const MAX_GAP: f64 = 1.0;
/// How long the streams run after the kill before they are judged.
const AFTER_KILL: Duration = Duration::from_secs(4);

/// What runs on the firewalls.
#[derive(Debug, Clone, Copy)]
enum Setup {
    /// ctsyncd on both, notify and vrrp_script through syncctl.
    Ctsync(CommitMode),
    /// keepalived alone.
    WithoutCtsync,
}

/// What a scenario measured.
struct Outcome {
    /// The client's final report.
    end: ClientReport,
    /// The last report before the kill.
    before: ClientReport,
    /// `CLOCK_MONOTONIC` of the kill.
    killed_at: f64,
    /// From the kill until fw2 held every virtual address.
    takeover: Duration,
}

fn scenario(setup: Setup) -> Outcome {
    let started = Instant::now();
    let topo = Topology::new();
    let dir = TempDir::new();
    // keepalived runs its scripts as root from here; the directory must be traversable.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    eprintln!(
        "{} [{setup:?}] namespaces: client {}, fw1 {}, fw2 {}, server {}; files in {}",
        clock(),
        topo.client.name(),
        topo.fw[0].name(),
        topo.fw[1].name(),
        topo.server.name(),
        dir.path().display()
    );

    let mut nodes: Vec<Node> = Vec::new();
    if let Setup::Ctsync(mode) = setup {
        let pki = make_pki(dir.path());
        for i in 0..2 {
            nodes.push(Node::start(&topo.fw[i], dir.path(), &pki, i, mode));
        }
        for n in &nodes {
            wait_for(
                "ctsyncd to be ready (mirror synced, peer's snapshot in)",
                Duration::from_secs(20),
                Duration::from_millis(100),
                || n.ready(),
            );
        }
        let st = nodes[1].status().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(st["sync"]["security"], "mutual-tls", "{st}");
    }

    let notify = |i: usize| match setup {
        Setup::Ctsync(_) => Notify::Ctsync(&nodes[i]),
        Setup::WithoutCtsync => Notify::Nothing,
    };
    let mut ka1 = Keepalived::start(&topo.fw[0], dir.path(), 0, 150, notify(0));
    let ka2 = Keepalived::start(&topo.fw[1], dir.path(), 1, 100, notify(1));
    wait_for(
        "fw1 to be VRRP master (all virtual addresses) and fw2 backup",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let (on1, on2) = (vips_on(&topo.fw[0]), vips_on(&topo.fw[1]));
            if on1.len() == VIPS.len() && on2.is_empty() {
                Ok(())
            } else {
                Err(format!("fw1 holds {on1:?}, fw2 holds {on2:?}"))
            }
        },
    );
    if let Setup::Ctsync(_) = setup {
        // The notify script has told each daemon its role.
        for (n, role) in nodes.iter().zip(["primary", "backup"]) {
            wait_for(
                &format!("{} to be {role}", n.id),
                Duration::from_secs(10),
                Duration::from_millis(50),
                || {
                    let st = n.status()?;
                    if st["failover"]["role"] == role {
                        Ok(())
                    } else {
                        Err(format!("role {}", st["failover"]["role"]))
                    }
                },
            );
        }
    }
    eprintln!(
        "{} fw1 is master ({:.1} s since start)",
        clock(),
        secs(started.elapsed())
    );

    let server = Server::start(&topo.server, dir.path());
    let mut client = Client::start(&topo.client, dir.path());
    let running = client.wait_running(25, Duration::from_secs(15));
    let accepted = server.accepted();
    assert!(
        accepted
            .iter()
            .any(|(port, peer)| *port == crate::support::cluster::PORT_SNAT4 && peer == SNAT_VIP),
        "the NATed stream did not arrive from {SNAT_VIP}: server accepted {accepted:?}"
    );

    if let Setup::Ctsync(mode) = setup {
        // fw2 knows every stream before the master dies.
        wait_for(
            "fw2's external cache to hold every stream",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                let ext = nodes[1].external()?;
                let missing: Vec<&String> = running
                    .streams
                    .iter()
                    .filter(|(name, s)| {
                        find_stream(ext.iter().map(|e| &e.flow), name, s).is_none_or(|f| {
                            s.proto == "tcp" && f.protoinfo().state_name() != "ESTABLISHED"
                        })
                    })
                    .map(|(name, _)| name)
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "missing or not established: {missing:?}; have {ext:?}"
                    ))
                }
            },
        );
        if mode == CommitMode::Manual {
            // Manual: nothing enters fw2's kernel before it is promoted.
            let flows = kernel::dump(&topo.fw[1]);
            for (name, s) in &running.streams {
                assert!(
                    find_stream(&flows, name, s).is_none(),
                    "stream {name} is in fw2's kernel before any promote (commit_mode = manual)"
                );
            }
        } else {
            wait_for(
                "fw2's kernel to hold every stream (continuous commit)",
                Duration::from_secs(10),
                Duration::from_millis(100),
                || {
                    let flows = kernel::dump(&topo.fw[1]);
                    let missing: Vec<&String> = running
                        .streams
                        .iter()
                        .filter(|(name, s)| find_stream(&flows, name, s).is_none())
                        .map(|(name, _)| name)
                        .collect();
                    if missing.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("missing {missing:?}"))
                    }
                },
            );
        }
        eprintln!("{} fw2 holds every stream ({mode:?} commit)", clock());
    }

    // Let the streams run a little through the master, then kill it.
    std::thread::sleep(Duration::from_secs(1));
    let before = client.latest().expect("reports");
    let killed_at = monotonic();
    let t0 = Instant::now();
    ka1.kill();
    if let Some(n) = nodes.first_mut() {
        n.kill();
    }
    topo.cut(0);
    eprintln!(
        "{} fw1 killed (keepalived and ctsyncd SIGKILLed, links down)",
        clock()
    );
    let takeover = wait_for(
        "fw2 to hold every virtual address",
        Duration::from_secs(10),
        Duration::from_millis(5),
        || {
            let on2 = vips_on(&topo.fw[1]);
            if on2.len() == VIPS.len() {
                Ok(t0.elapsed())
            } else {
                Err(format!("fw2 holds {on2:?}"))
            }
        },
    );
    eprintln!(
        "{} fw2 holds the virtual addresses {:.0} ms after the kill",
        clock(),
        secs(takeover) * 1e3
    );
    std::thread::sleep(AFTER_KILL.saturating_sub(t0.elapsed()));

    if let Setup::Ctsync(_) = setup {
        let st = nodes[1].status().unwrap_or_else(|e| panic!("{e}"));
        let fo = &st["failover"];
        eprintln!(
            "fw2 after takeover: role {}, commits {}, last commit {}, injected {}, inject failures {}",
            fo["role"], fo["commits"], fo["last_commit"], fo["injected"], fo["inject_failures"]
        );
        eprintln!("fw2 notify log:\n{}", ka2.notify_log().trim_end());
        assert_eq!(fo["role"], "primary", "fw2 was not promoted: {st}");
        assert!(
            ka2.notify_log().contains("MASTER: syncctl promote done"),
            "fw2's notify script did not promote: {}",
            ka2.notify_log()
        );
        assert_eq!(fo["last_commit"]["failed"], 0, "commit refused flows: {st}");
        assert!(fo["inject_failures"] == 0, "injections refused: {st}");
    } else {
        eprintln!(
            "fw2's kernel after takeover, without ctsync: {} flows",
            kernel::dump(&topo.fw[1]).len()
        );
    }
    let end = client.finish();
    eprintln!(
        "{} scenario done in {:.1} s",
        clock(),
        secs(started.elapsed())
    );
    Outcome {
        end,
        before,
        killed_at,
        takeover,
    }
}

/// Prints one line per stream: state, counters sent, echoes before the kill ("echoed") and after
/// it ("then"), UDP echoes lost, the largest gap and where it started relative to the kill.
fn print_streams(label: &str, o: &Outcome) {
    eprintln!(
        "\n{label}: takeover (fw2 holds every VIP) {:.0} ms after the kill",
        secs(o.takeover) * 1e3
    );
    eprintln!(
        "  {:<6} {:<8} {:>6} {:>9} {:>9} {:>6} {:>12} {:>16}  error",
        "stream", "state", "sent", "echoed", "then", "lost", "largest gap", "gap start-kill"
    );
    for (name, s) in &o.end.streams {
        let before = o.before.streams.get(name).map_or(0, |b| b.echoed);
        let start = s.max_gap_start.map_or("-".to_string(), |t| {
            format!("{:+.0} ms", (t - o.killed_at) * 1e3)
        });
        eprintln!(
            "  {:<6} {:<8} {:>6} {:>9} {:>9} {:>6} {:>9.0} ms {:>16}  {}",
            name,
            s.state,
            s.sent,
            before,
            s.echoed.saturating_sub(before),
            s.lost,
            s.max_gap * 1e3,
            start,
            s.error.as_deref().unwrap_or("")
        );
    }
}

/// Asserts that every stream survived: still running, no gap of a second, and well fed after
/// the kill.
fn assert_survived(o: &Outcome) {
    for (name, s) in &o.end.streams {
        assert_eq!(
            s.state, "running",
            "stream {name} did not survive the failover: {s:?}"
        );
        assert!(
            s.max_gap < MAX_GAP,
            "stream {name} stood still for {:.3} s (limit {MAX_GAP} s): {s:?}",
            s.max_gap
        );
        let before = o.before.streams[name].echoed;
        // 20 ms per counter: after the kill the stream must have carried on for seconds.
        let after = s.echoed.saturating_sub(before);
        assert!(
            after >= 100,
            "stream {name} got only {after} echoes after the kill: {s:?}"
        );
    }
}

fn failover_survives(mode: CommitMode) {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    let o = scenario(Setup::Ctsync(mode));
    print_streams(&format!("ctsync, commit_mode = {mode:?}"), &o);
    assert_survived(&o);
}

/// commit_mode = manual: fw2's kernel learns the flows only when keepalived makes it master and
/// the notify script runs `syncctl promote`.
#[test]
fn failover_manual_commit_master_killed_streams_survive() {
    failover_survives(CommitMode::Manual);
}

/// commit_mode = continuous: replicated flows enter fw2's kernel as they arrive (asserted before
/// the kill); promote at takeover only confirms them.
#[test]
fn failover_continuous_commit_master_killed_streams_survive() {
    failover_survives(CommitMode::Continuous);
}

/// The negative control: keepalived alone moves the addresses, but fw2 has no state for the
/// established connections, and the test must see them break. It also asserts that the UDP
/// stream survived (fw2 accepts it as new), which shows the network itself did fail over.
#[test]
fn failover_negative_control_without_ctsync_streams_break() {
    if !require_root() {
        return;
    }
    let _serial = exclusive();
    let o = scenario(Setup::WithoutCtsync);
    print_streams("negative control, keepalived without ctsync", &o);
    let broken: Vec<&String> = o
        .end
        .streams
        .iter()
        .filter(|(_, s)| s.state != "running" || s.max_gap >= MAX_GAP)
        .map(|(name, _)| name)
        .collect();
    eprintln!("broken or stalled without ctsync: {broken:?}");
    assert!(
        !broken.is_empty(),
        "every stream survived without ctsync: the test cannot tell a working failover from a \
         broken one"
    );
    for tcp in ["tcp4", "snat4", "tcp6"] {
        assert!(
            broken.iter().any(|b| b.as_str() == tcp),
            "TCP stream {tcp} survived without ctsync (tcp_loose=0 should drop it): {:?}",
            o.end.streams[tcp]
        );
    }
    let udp = &o.end.streams["udp4"];
    assert!(
        udp.state == "running" && udp.max_gap < MAX_GAP,
        "the UDP stream, which needs no replicated state, did not pass through fw2: the network \
         did not fail over, so the control proves nothing: {udp:?}"
    );
}

/// The shipped keepalived.conf (one file for both nodes, `@fw1`/`@fw2` lines) is accepted by
/// keepalived for either node.
#[test]
fn failover_example_keepalived_conf_passes_config_test() {
    if !require_root() {
        return;
    }
    let ns = crate::support::netns::Netns::new();
    let dir = TempDir::new();
    for id in ["fw1", "fw2"] {
        let said = keepalived_config_test(&ns, dir.path(), id).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !said.to_lowercase().contains("warning"),
            "keepalived warns about the example ({id}): {said}"
        );
    }
}
