//! A keepalived firewall pair between a client and a server, for the failover tests.
//!
//! ```text
//!  client ─┐  LAN switch          ┌─ fw1 ─┐         WAN switch  ┌─ server
//!          └──────────────────────┤       ├─────────────────────┘
//!                                 └─ fw2 ─┘
//!                          fw1 ══ sync link ══ fw2
//! ```
//!
//! Six namespaces (`ctsi-<pid>-<n>`): client, fw1, fw2, server, and one bridge namespace per
//! shared L2 segment. Interfaces are created directly inside the namespaces (`lan0`, `wan0`,
//! `sync0` on the firewalls, `br0` and one port per host in the switches), so nothing ever
//! appears in the host's namespace. Both firewalls get the same strict stateful ruleset, a
//! source NAT to a shared address and `nf_conntrack_tcp_loose = 0`: a mid-stream packet without
//! a conntrack entry is dropped, so a connection survives a takeover only if the new master
//! knows it.
//!
//! Processes (`ctsyncd`, `keepalived`, the python stream scripts) are owned by guards that stop
//! them by PID on drop, also when the test panics; declare them after the [`Topology`], so that
//! they are dropped before it.

use super::netns::Netns;
use super::{run_ok, wait_for};
use ctsync::config::CommitMode;
use ctsync::control::ExternalEntry;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The client's IPv4 address.
pub const CLIENT4: &str = "10.91.1.10";
/// The client's IPv6 address.
pub const CLIENT6: &str = "fd91:1::10";
/// The server's IPv4 address.
pub const SERVER4: &str = "10.91.2.10";
/// The server's IPv6 address.
pub const SERVER6: &str = "fd91:2::10";
/// Source address of the NATed stream: a virtual address of the WAN side, so it moves with the
/// master and the server's replies find the new one.
pub const SNAT_VIP: &str = "10.91.2.100";
/// Every virtual address keepalived moves: the client's and the server's gateways (v4, v6) and
/// the NAT address.
pub const VIPS: [&str; 5] = ["10.91.1.1", "fd91:1::1", "10.91.2.1", "fd91:2::1", SNAT_VIP];
/// Server ports: plain TCP over IPv4, source-NATed TCP, TCP over IPv6, UDP.
pub const PORT_TCP4: u16 = 9001;
/// Port of the source-NATed TCP stream (the NAT rule matches it).
pub const PORT_SNAT4: u16 = 9002;
/// Port of the IPv6 TCP stream.
pub const PORT_TCP6: u16 = 9003;
/// Port of the UDP stream.
pub const PORT_UDP4: u16 = 9004;

/// The stream scripts (client and server), next to this file.
pub fn streams_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/support/streams.py")
}

/// The keepalived notify script the project ships.
pub fn notify_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keepalived/ctsync-notify.sh")
}

/// Seconds of `CLOCK_MONOTONIC`: the clock the stream scripts report in (python's
/// `time.monotonic()`), so that their gaps can be placed relative to the kill.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// `ip -n NS ARGS…`, the arguments given as one space-separated string.
fn ip(ns: &Netns, args: &str) {
    run_ok(
        Command::new("ip")
            .args(["-n", ns.name()])
            .args(args.split_whitespace()),
    );
}

fn sysctl(ns: &Netns, settings: &[&str]) {
    run_ok(ns.command("sysctl").arg("-qw").args(settings));
}

/// Runs `cmd` with `input` on its stdin; panics with its stderr unless it succeeded.
fn run_with_input(cmd: &mut Command, input: &str) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("cannot write to the child's stdin");
    let out = child.wait_with_output().expect("the child did not finish");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}\ninput:\n{input}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The ruleset of both firewalls.
///
/// Forwarding: established and related traffic; new TCP only on a SYN from the LAN; new UDP
/// from the LAN; nothing else. The stream to [`PORT_SNAT4`] leaves with the shared address
/// [`SNAT_VIP`]. The sync link and VRRP are not tracked (their flows are nobody's business).
///
/// The firewalls themselves accept only established traffic, the sync link, VRRP and ICMP. This
/// matters at takeover: a packet for a NATed connection the new master does not know yet (before
/// `syncctl promote` committed it) is addressed to a local address, the shared one; accepted, it
/// would reach the local TCP stack, whose reset would kill the connection at the server.
pub fn firewall_ruleset() -> String {
    format!(
        "table inet ctsi_fw {{
  chain input {{
    type filter hook input priority filter; policy drop;
    iif \"lo\" accept
    ct state established,related accept
    iifname \"sync0\" accept
    ip protocol 112 accept
    meta l4proto {{ icmp, ipv6-icmp }} accept
  }}
  chain raw_pre {{
    type filter hook prerouting priority raw; policy accept;
    iifname \"sync0\" notrack
    ip protocol 112 notrack
  }}
  chain raw_out {{
    type filter hook output priority raw; policy accept;
    oifname \"sync0\" notrack
    ip protocol 112 notrack
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"lan0\" oifname \"wan0\" tcp flags & (fin|syn|rst|ack) == syn ct state new accept
    iifname \"lan0\" oifname \"wan0\" meta l4proto udp ct state new accept
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" ip saddr {CLIENT4} tcp dport {PORT_SNAT4} snat ip to {SNAT_VIP}
  }}
}}
"
    )
}

/// The namespaces and links; everything is deleted on drop.
#[derive(Debug)]
pub struct Topology {
    /// The client.
    pub client: Netns,
    /// fw1 (priority 150: the first master) and fw2.
    pub fw: [Netns; 2],
    /// The server.
    pub server: Netns,
    /// The bridge of the client side (client, fw1, fw2).
    pub lan_switch: Netns,
    /// The bridge of the server side (fw1, fw2, server).
    pub wan_switch: Netns,
}

impl Topology {
    /// Builds the whole network: switches, hosts, addresses, routes, and both firewalls'
    /// forwarding, ruleset and conntrack settings.
    pub fn new() -> Topology {
        let t = Topology {
            client: Netns::new(),
            fw: [Netns::new(), Netns::new()],
            server: Netns::new(),
            lan_switch: Netns::new(),
            wan_switch: Netns::new(),
        };
        for ns in [&t.client, &t.fw[0], &t.fw[1], &t.server] {
            // Addresses are usable at once (no duplicate address detection).
            sysctl(
                ns,
                &[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            );
        }
        for sw in [&t.lan_switch, &t.wan_switch] {
            // No multicast snooping: VRRP and neighbour discovery reach every port.
            ip(sw, "link add br0 type bridge mcast_snooping 0");
            ip(sw, "link set br0 up");
        }
        let plug = |host: &Netns, ifname: &str, sw: &Netns, port: &str| {
            let peer = sw.name();
            ip(
                host,
                &format!("link add {ifname} type veth peer name {port} netns {peer}"),
            );
            ip(sw, &format!("link set {port} master br0 up"));
            ip(host, &format!("link set {ifname} up"));
        };
        plug(&t.client, "lan0", &t.lan_switch, "client");
        plug(&t.fw[0], "lan0", &t.lan_switch, "fw1");
        plug(&t.fw[1], "lan0", &t.lan_switch, "fw2");
        plug(&t.fw[0], "wan0", &t.wan_switch, "fw1");
        plug(&t.fw[1], "wan0", &t.wan_switch, "fw2");
        plug(&t.server, "wan0", &t.wan_switch, "server");
        let fw2 = t.fw[1].name();
        ip(
            &t.fw[0],
            &format!("link add sync0 type veth peer name sync0 netns {fw2}"),
        );

        ip(&t.client, &format!("addr add {CLIENT4}/24 dev lan0"));
        ip(&t.client, &format!("addr add {CLIENT6}/64 dev lan0 nodad"));
        ip(&t.client, "route add default via 10.91.1.1");
        ip(&t.client, "-6 route add default via fd91:1::1");
        ip(&t.server, &format!("addr add {SERVER4}/24 dev wan0"));
        ip(&t.server, &format!("addr add {SERVER6}/64 dev wan0 nodad"));
        ip(&t.server, "route add default via 10.91.2.1");
        ip(&t.server, "-6 route add default via fd91:2::1");

        let ruleset = firewall_ruleset();
        for (i, fw) in t.fw.iter().enumerate() {
            let host = i + 2;
            ip(fw, &format!("addr add 10.91.1.{host}/24 dev lan0"));
            ip(fw, &format!("addr add fd91:1::{host}/64 dev lan0 nodad"));
            ip(fw, &format!("addr add 10.91.2.{host}/24 dev wan0"));
            ip(fw, &format!("addr add fd91:2::{host}/64 dev wan0 nodad"));
            ip(fw, &format!("addr add {}/24 dev sync0", sync_addr(i)));
            ip(fw, "link set sync0 up");
            sysctl(
                fw,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            );
            run_with_input(fw.command("nft").args(["-f", "-"]), &ruleset);
            // The ruleset loaded conntrack; the knob exists from now on.
            sysctl(fw, &["net.netfilter.nf_conntrack_tcp_loose=0"]);
            let out = run_ok(
                fw.command("sysctl")
                    .args(["-n", "net.netfilter.nf_conntrack_tcp_loose"]),
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "0",
                "nf_conntrack_tcp_loose did not stick in {}",
                fw.name()
            );
        }
        t
    }

    /// Takes every link of firewall `i` down: it forwards nothing and says nothing any more.
    pub fn cut(&self, i: usize) {
        for dev in ["lan0", "wan0", "sync0"] {
            ip(&self.fw[i], &format!("link set {dev} down"));
        }
    }
}

/// Sync link address of firewall `i` (0 or 1).
pub fn sync_addr(i: usize) -> String {
    format!("10.91.255.{}", i + 1)
}

/// Node id of firewall `i`.
pub fn node_id(i: usize) -> String {
    format!("fw{}", i + 1)
}

/// The virtual addresses (of [`VIPS`]) configured in a namespace.
pub fn vips_on(ns: &Netns) -> Vec<&'static str> {
    let out = run_ok(Command::new("ip").args(["-n", ns.name(), "-o", "addr", "show"]));
    let text = String::from_utf8_lossy(&out.stdout);
    let addrs: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words
                .position(|w| w == "inet" || w == "inet6")
                .and_then(|_| words.next())
                .and_then(|a| a.split('/').next())
        })
        .collect();
    VIPS.iter().copied().filter(|v| addrs.contains(v)).collect()
}

/// A child process, stopped by PID on drop (SIGTERM, then SIGKILL); its output goes to a log
/// file whose end is printed when the test panics.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr into `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let file = File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("cannot clone a file handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child,
            log: log.to_owned(),
            reaped: false,
        }
    }

    /// Its PID (`ip netns exec` execs the program in place: the PID is the program's).
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        !self.reaped && matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn signal(&mut self, sig: i32) {
        if self.alive() {
            // SAFETY: plain signal delivery to our own unreaped child: the PID cannot be reused.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if self.reaped {
            return;
        }
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if !self.alive() {
                self.reaped = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {}) ignored SIGTERM; killing it",
            self.name,
            self.pid()
        );
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}) ----\n{}\n----",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
    }
}

/// The cluster's TLS material, made with `syncctl pki` like an operator would.
pub fn make_pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let syncctl = env!("CARGO_BIN_EXE_syncctl");
    run_ok(
        Command::new(syncctl)
            .args(["pki", "init", "--cluster", "ctsi-pair", "--dir"])
            .arg(&pki),
    );
    for i in 0..2 {
        run_ok(
            Command::new(syncctl)
                .args(["pki", "issue", "--dir"])
                .arg(&pki)
                .arg(node_id(i)),
        );
    }
    pki
}

/// `ctsyncd` of one firewall, replicating to the other over the sync link with mutual TLS.
#[derive(Debug)]
pub struct Node {
    /// `fw1` or `fw2`.
    pub id: String,
    /// Its control socket.
    pub socket: PathBuf,
    proc: Proc,
}

impl Node {
    /// Writes the config of firewall `i` and starts the daemon in its namespace; returns once
    /// the control socket answers.
    pub fn start(ns: &Netns, dir: &Path, pki: &Path, i: usize, mode: CommitMode) -> Node {
        let id = node_id(i);
        let peer = node_id(1 - i);
        let socket = dir.join(format!("{id}.sock"));
        let mode = match mode {
            CommitMode::Manual => "manual",
            CommitMode::Continuous => "continuous",
        };
        let config = format!(
            "node_id = \"{id}\"\n\
             [control]\nsocket = \"{socket}\"\n\
             [sync]\ncluster = \"ctsi-pair\"\nlisten = \"{listen}:7400\"\n\
             peers = [{{ node_id = \"{peer}\", address = \"{peer_addr}:7400\" }}]\n\
             ready_timeout = \"3s\"\n\
             [sync.tls]\nca = \"{pki}/ca.pem\"\ncert = \"{pki}/{id}.pem\"\nkey = \"{pki}/{id}.key\"\n\
             [failover]\ncommit_mode = \"{mode}\"\npurge_delay = \"60s\"\n",
            socket = socket.display(),
            listen = sync_addr(i),
            peer_addr = sync_addr(1 - i),
            pki = pki.display(),
        );
        let path = dir.join(format!("{id}.toml"));
        std::fs::write(&path, config).expect("cannot write the daemon config");
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_ctsyncd"));
        cmd.arg("--config").arg(&path).env("RUST_LOG", "info");
        let proc = Proc::spawn(
            &format!("ctsyncd {id}"),
            cmd,
            &dir.join(format!("{id}.ctsyncd.log")),
        );
        let mut node = Node { id, socket, proc };
        wait_for(
            "ctsyncd's control socket",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                if !node.proc.alive() {
                    panic!("ctsyncd {} exited:\n{}", node.id, node.proc.log_tail(30));
                }
                node.status()
            },
        );
        node
    }

    /// Runs `syncctl --socket SOCKET args…`: stdout, or the failure with stderr.
    pub fn syncctl(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        super::daemon::syncctl_at(&self.socket, args).map_err(|e| format!("{}: {e}", self.id))
    }

    /// `syncctl status --json`.
    pub fn status(&self) -> Result<Value, String> {
        let out = self.syncctl(&["status", "--json"])?;
        serde_json::from_slice(&out).map_err(|e| format!("status --json: {e}"))
    }

    /// `syncctl ready` (exit status 0).
    pub fn ready(&self) -> Result<(), String> {
        self.syncctl(&["ready"]).map(drop)
    }

    /// `syncctl dump external --json`.
    pub fn external(&self) -> Result<Vec<ExternalEntry>, String> {
        let out = self.syncctl(&["dump", "external", "--json"])?;
        serde_json::from_slice(&out).map_err(|e| format!("dump external --json: {e}"))
    }

    /// SIGKILL: the daemon dies without a word to anyone.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// What keepalived tells whom.
#[derive(Debug, Clone, Copy)]
pub enum Notify<'a> {
    /// Every transition, in order (`vrrp_notify_fifo`), to the shipped `ctsync-notify.sh` for
    /// this node's daemon; `syncctl ready` as vrrp_script.
    Ctsync(&'a Node),
    /// Nobody, and no vrrp_script: keepalived alone, the negative control.
    Nothing,
}

/// Installs what keepalived runs (this build's `syncctl` and the shipped notify script) into
/// `dir/bin`, root-owned and mode 0755 like under /usr/bin and /etc/keepalived, so that keepalived
/// can run with `enable_script_security` whoever owns the checkout. Idempotent: a binary that
/// keepalived may be running is not overwritten. Returns their paths.
pub fn install_scripts(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("bin");
    let syncctl = bin.join("syncctl");
    let notify = bin.join("ctsync-notify.sh");
    if syncctl.exists() && notify.exists() {
        return (syncctl, notify);
    }
    std::fs::create_dir_all(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    for (from, to) in [
        (PathBuf::from(env!("CARGO_BIN_EXE_syncctl")), &syncctl),
        (notify_script(), &notify),
    ] {
        std::fs::copy(&from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    for p in [dir, bin.as_path(), syncctl.as_path(), notify.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
    }
    (syncctl, notify)
}

/// Advertisement interval (VRRPv3 allows centiseconds): a backup takes over after three missed
/// adverts plus a skew of under one interval, about 0.35 s.
pub const ADVERT_INT: &str = "0.1";

/// keepalived.conf of firewall `i`, as config/keepalived/keepalived.conf, with this topology's
/// interfaces and addresses and the test's paths.
pub fn keepalived_conf(
    i: usize,
    priority: u8,
    notify: Notify<'_>,
    dir: &Path,
    notify_log: &Path,
) -> String {
    let id = node_id(i);
    let (script, fifo, track) = match notify {
        Notify::Ctsync(node) => {
            let (syncctl, notify) = install_scripts(dir);
            let (syncctl, notify) = (syncctl.display(), notify.display());
            let socket = node.socket.display();
            let fifo = dir.join(format!("{id}.fifo"));
            (
                format!(
                    "vrrp_script ctsync_ready {{\n    script \"{syncctl} --socket {socket} --timeout 2 ready\"\n    \
                     interval 1\n    timeout 3\n    fall 2\n    rise 1\n}}\n"
                ),
                format!(
                    "    vrrp_notify_fifo {}\n    vrrp_notify_fifo_script \"{notify} --syncctl {syncctl} --socket {socket} --log {}\"\n",
                    fifo.display(),
                    notify_log.display()
                ),
                "    track_script {\n        ctsync_ready\n    }\n",
            )
        }
        Notify::Nothing => (String::new(), String::new(), ""),
    };
    format!(
        "global_defs {{
    router_id {id}
    vrrp_version 3
    script_user root
    enable_script_security
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 3
{fifo}}}
{script}
vrrp_sync_group FW {{
    group {{
        LAN
        WAN
    }}
}}
vrrp_instance LAN {{
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority {priority}
    advert_int {ADVERT_INT}
    virtual_ipaddress {{
        10.91.1.1/24
    }}
    virtual_ipaddress_excluded {{
        fd91:1::1/64
    }}
{track}}}
vrrp_instance WAN {{
    state BACKUP
    interface wan0
    virtual_router_id 52
    priority {priority}
    advert_int {ADVERT_INT}
    virtual_ipaddress {{
        10.91.2.1/24
        {SNAT_VIP}/24
    }}
    virtual_ipaddress_excluded {{
        fd91:2::1/64
    }}
{track}}}
"
    )
}

/// keepalived (VRRP only, in the foreground) in one firewall's namespace.
#[derive(Debug)]
pub struct Keepalived {
    proc: Proc,
    vrrp_pid: PathBuf,
    notify_log: PathBuf,
}

impl Keepalived {
    /// Starts keepalived for firewall `i` with its own config and pid files.
    pub fn start(ns: &Netns, dir: &Path, i: usize, priority: u8, notify: Notify<'_>) -> Keepalived {
        let id = node_id(i);
        if let Notify::Ctsync(_) = notify {
            let mode = std::fs::metadata(notify_script())
                .unwrap_or_else(|e| panic!("{}: {e}", notify_script().display()))
                .permissions()
                .mode();
            assert!(
                mode & 0o111 != 0,
                "{} is not executable (mode {mode:o}): keepalived cannot run it",
                notify_script().display()
            );
        }
        let notify_log = dir.join(format!("{id}.notify.log"));
        let conf = dir.join(format!("{id}.keepalived.conf"));
        std::fs::write(
            &conf,
            keepalived_conf(i, priority, notify, dir, &notify_log),
        )
        .expect("cannot write keepalived.conf");
        let vrrp_pid = dir.join(format!("{id}.vrrp.pid"));
        let mut cmd = ns.command("keepalived");
        cmd.args([
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--no-syslog",
            "--vrrp",
        ])
        .arg("--use-file")
        .arg(&conf)
        .arg("--pid")
        .arg(dir.join(format!("{id}.keepalived.pid")))
        .arg("--vrrp_pid")
        .arg(&vrrp_pid);
        let proc = Proc::spawn(
            &format!("keepalived {id}"),
            cmd,
            &dir.join(format!("{id}.keepalived.log")),
        );
        Keepalived {
            proc,
            vrrp_pid,
            notify_log,
        }
    }

    /// PID of the VRRP child (the process that sends the adverts), if it is running.
    fn vrrp_child(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(&self.vrrp_pid)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // Only a live keepalived: the file may be stale and the PID reused.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "keepalived").then_some(pid)
    }

    /// SIGKILL of the VRRP child and then the parent: no goodbye advert, the peer must notice
    /// the silence.
    pub fn kill(&mut self) {
        if let Some(pid) = self.vrrp_child() {
            // SAFETY: plain signal delivery to a process just checked to be keepalived.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.proc.kill();
    }

    /// What the notify script logged.
    pub fn notify_log(&self) -> String {
        std::fs::read_to_string(&self.notify_log).unwrap_or_default()
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        // SIGTERM to the parent stops the VRRP child too; make sure of it.
        self.proc.stop(Duration::from_secs(5));
        if let Some(pid) = self.vrrp_child() {
            eprintln!("keepalived VRRP child {pid} outlived its parent; killing it");
            // SAFETY: as in `kill`.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if std::thread::panicking() {
            eprintln!("---- notify log ----\n{}\n----", self.notify_log());
        }
    }
}

/// The echo server: TCP and UDP on the four ports, v4 and v6.
#[derive(Debug)]
pub struct Server {
    proc: Proc,
}

impl Server {
    /// Starts it and waits until it listens.
    pub fn start(ns: &Netns, dir: &Path) -> Server {
        let mut cmd = ns.command("python3");
        cmd.arg(streams_script()).arg("server");
        for p in [PORT_TCP4, PORT_SNAT4, PORT_TCP6, PORT_UDP4] {
            cmd.arg(p.to_string());
        }
        let mut proc = Proc::spawn("echo server", cmd, &dir.join("server.log"));
        wait_for(
            "the echo server to listen",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                if !proc.alive() {
                    panic!("the echo server exited:\n{}", proc.log());
                }
                if proc.log().contains("listening") {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        );
        Server { proc }
    }

    /// `(port, peer address)` of every accepted TCP connection.
    pub fn accepted(&self) -> Vec<(u16, String)> {
        self.proc
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| {
                Some((
                    u16::try_from(v["accepted"].as_u64()?).ok()?,
                    v["peer"].as_str()?.to_string(),
                ))
            })
            .collect()
    }
}

/// One stream in a client report.
#[derive(Debug, Clone, Deserialize)]
pub struct StreamReport {
    /// `tcp` or `udp`.
    pub proto: String,
    /// `host:port`.
    pub target: String,
    /// The client's source port, once connected.
    pub local_port: Option<u16>,
    /// `running`, or how it ended: `reset`, `closed`, `corrupt`, `failed`.
    pub state: String,
    /// What ended it.
    pub error: Option<String>,
    /// Counters sent.
    pub sent: u64,
    /// Echoes received (in order).
    pub echoed: u64,
    /// UDP echoes that never came.
    pub lost: u64,
    /// Largest time between two echoes, seconds (in the final report: or since the last echo).
    pub max_gap: f64,
    /// When that gap began (`CLOCK_MONOTONIC` seconds).
    pub max_gap_start: Option<f64>,
}

/// One report line of the client.
#[derive(Debug, Clone, Deserialize)]
pub struct ClientReport {
    /// By stream name.
    pub streams: BTreeMap<String, StreamReport>,
    /// The last report, printed when the client was told to stop.
    #[serde(default)]
    pub r#final: bool,
}

/// The stream names the client opens, with their protocol and target.
pub fn stream_specs() -> Vec<(&'static str, String)> {
    vec![
        ("tcp4", format!("tcp:{SERVER4}:{PORT_TCP4}")),
        ("snat4", format!("tcp:{SERVER4}:{PORT_SNAT4}")),
        ("tcp6", format!("tcp:[{SERVER6}]:{PORT_TCP6}")),
        ("udp4", format!("udp:{SERVER4}:{PORT_UDP4}")),
    ]
}

/// The stream client: four streams, a report every 100 ms collected by a reader thread.
#[derive(Debug)]
pub struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    reports: Arc<Mutex<Vec<ClientReport>>>,
    reader: Option<JoinHandle<()>>,
    stderr_log: PathBuf,
}

impl Client {
    /// Starts the client; its streams connect through the firewalls' gateway addresses.
    pub fn start(ns: &Netns, dir: &Path) -> Client {
        let stderr_log = dir.join("client.stderr.log");
        let mut cmd = ns.command("python3");
        cmd.arg(streams_script())
            .args(["client", "--interval", "0.02", "--report", "0.1"]);
        for (name, spec) in stream_specs() {
            cmd.arg(format!("{name}={spec}"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_log).expect("cannot create the client's log"))
            .spawn()
            .expect("cannot start the stream client");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&reports);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ClientReport>(&line) {
                    Ok(r) => sink.lock().unwrap_or_else(|e| e.into_inner()).push(r),
                    Err(e) => eprintln!("client: unexpected line ({e}): {line}"),
                }
            }
        });
        Client {
            child,
            stdin,
            reports,
            reader: Some(reader),
            stderr_log,
        }
    }

    /// The latest report.
    pub fn latest(&self) -> Option<ClientReport> {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }

    /// Waits until every stream runs and has at least `echoes` echoes.
    pub fn wait_running(&mut self, echoes: u64, timeout: Duration) -> ClientReport {
        wait_for(
            "every stream to run",
            timeout,
            Duration::from_millis(50),
            || {
                if let Ok(Some(st)) = self.child.try_wait() {
                    panic!("the stream client exited ({st}): {}", self.stderr());
                }
                let r = self.latest().ok_or("no report yet")?;
                let lagging: Vec<_> = r
                    .streams
                    .iter()
                    .filter(|(_, s)| s.state != "running" || s.echoed < echoes)
                    .map(|(n, s)| format!("{n}: {} {} echoes {:?}", s.state, s.echoed, s.error))
                    .collect();
                if lagging.is_empty() {
                    Ok(r)
                } else {
                    Err(lagging.join(", "))
                }
            },
        )
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Tells the client to stop (end of its stdin) and returns its final report.
    pub fn finish(mut self) -> ClientReport {
        drop(self.stdin.take());
        let status = self
            .child
            .wait()
            .expect("cannot wait for the stream client");
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let last = self.latest();
        match last {
            Some(r) if r.r#final => r,
            _ => panic!(
                "the stream client ended ({status}) without a final report: {}",
                self.stderr()
            ),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Whether `flows` holds the stream `name` of the client report: matched by protocol, client
/// port and server port (and, for the NATed stream, the shared address as the reply's target).
pub fn find_stream<'a>(
    flows: impl IntoIterator<Item = &'a ctsync::flow::Flow>,
    name: &str,
    s: &StreamReport,
) -> Option<&'a ctsync::flow::Flow> {
    use ctsync::flow::{proto, L4};
    let port: u16 = s.target.rsplit(':').next()?.parse().ok()?;
    let local = s.local_port?;
    let want_proto = if s.proto == "udp" {
        proto::UDP
    } else {
        proto::TCP
    };
    flows.into_iter().find(|f| {
        let o = &f.key.orig;
        o.proto == want_proto
            && o.l4
                == L4::Ports {
                    src: local,
                    dst: port,
                }
            && (name != "snat4" || f.reply.dst.to_string() == SNAT_VIP)
            && (name != "tcp6" || o.src.is_ipv6())
    })
}

/// The shipped `config/keepalived/keepalived.conf`.
pub fn example_keepalived_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keepalived/keepalived.conf")
}

/// Runs `keepalived --config-test` on the shipped example for node `id` (`fw1` or `fw2`) in
/// `ns`, after giving `ns` the example's interfaces. The scripts the example names are installed
/// into `dir` (copies of this build's `syncctl` and of the notify script, root-owned, mode 0755),
/// so that `enable_script_security` judges the example's settings and not the checkout's owner.
pub fn keepalived_config_test(ns: &Netns, dir: &Path, id: &str) -> Result<String, String> {
    for dev in ["eth0", "eth1", "eth2"] {
        let exists = ns
            .command("ip")
            .args(["link", "show", dev])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !exists {
            ip(ns, &format!("link add {dev} type veth peer name p{dev}"));
            ip(ns, &format!("link set {dev} up"));
        }
    }
    let text = std::fs::read_to_string(example_keepalived_conf())
        .map_err(|e| format!("{}: {e}", example_keepalived_conf().display()))?;
    let (syncctl, notify) = install_scripts(dir);
    let text = text
        .replace("/usr/bin/syncctl", &syncctl.display().to_string())
        .replace(
            "/etc/keepalived/ctsync-notify.sh",
            &notify.display().to_string(),
        );
    let path = dir.join("example-keepalived.conf");
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    let out = ns
        .command("keepalived")
        .args(["--config-test", "--config-id", id, "--use-file"])
        .arg(&path)
        .output()
        .map_err(|e| format!("cannot run keepalived: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        Err(format!(
            "keepalived --config-test ({id}) failed ({}): {said}",
            out.status
        ))
    }
}
