//! The two daemons under comparison, started the same way and asked the same questions.
//!
//! ctsync is the `ctsyncd` built next to this binary: gRPC with mutual TLS on the sync link,
//! manual commit (or continuous injection). conntrackd is Debian's `conntrackd`: FTFW over UDP on
//! the same link, external cache (or `DisableExternalCache`, its injection mode), tuned so that it
//! neither overruns nor drops unacknowledged state at these sizes (see [`conntrackd_conf`]).
//! Both run in the foreground as our children, inside their namespace (`ip netns exec` execs the
//! daemon itself, so the child's pid is the daemon's), and are asked over their control sockets.

use crate::lab::{children, forget_child, Netns};
use anyhow::{bail, ensure, Context, Result};
use ctsync::control::{self, Request};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// ctsyncd.
    Ctsync,
    /// conntrackd (FTFW over UDP).
    Conntrackd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ctsync => "ctsync",
            Kind::Conntrackd => "conntrackd",
        }
    }
}

/// What a backup does with replicated flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Keep them in the external cache until a commit.
    Cache,
    /// Write them into the kernel as they arrive.
    Inject,
}

/// Sync-link addresses of node 0 and node 1.
pub const LINK_ADDR: [&str; 2] = ["10.251.0.1", "10.251.0.2"];
/// ctsync's gRPC port; conntrackd's UDP port.
pub const CTSYNC_PORT: u16 = 7400;
pub const CONNTRACKD_PORT: u16 = 3780;
/// ctsyncd's kernel event buffer: holds a 250k burst without overrun.
const EVENT_BUFFER: usize = 256 << 20;

/// conntrackd's event buffer: twice ctsyncd's. conntrackd reads back the events of its own
/// commit (ctsyncd has the kernel drop them); at 250k flows they can fill 256 MiB while its
/// commit child holds their CPU, and each overrun then costs it a dump of the kernel table and
/// a query per entry (~3 CPU seconds, in about half of the runs measured at 256 MiB).
const CONNTRACKD_EVENT_BUFFER: usize = 512 << 20;

/// CPU and memory of one daemon process (or of the successive processes of one node).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU seconds.
    pub cpu_secs: f64,
    /// Peak resident set (VmHWM), bytes.
    pub peak_rss: u64,
}

impl Usage {
    fn add(&mut self, other: Usage) {
        self.cpu_secs += other.cpu_secs;
        self.peak_rss = self.peak_rss.max(other.peak_rss);
    }
}

/// One running daemon of node `node` (0 = A, the source; 1 = B, the backup).
pub struct Daemon {
    pub kind: Kind,
    node: usize,
    mode: Mode,
    ns: String,
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    /// Usage of earlier processes of this node (before a restart).
    past: Usage,
    /// The node's CPU, every process and thread of it, when a cgroup can count it.
    meter: Option<CpuMeter>,
    /// RSS right after start, before any flow.
    pub idle_rss: u64,
}

impl Daemon {
    /// Writes the config and starts the daemon; returns once its control socket answers.
    pub fn start(kind: Kind, ns: &Netns, node: usize, mode: Mode, dir: &Path) -> Result<Daemon> {
        let socket = dir.join(format!("{}-{node}.sock", kind.name()));
        let mut d = Daemon {
            kind,
            node,
            mode,
            ns: ns.name.clone(),
            dir: dir.to_path_buf(),
            socket,
            child: None,
            past: Usage::default(),
            meter: CpuMeter::create(&format!("{}-{node}", kind.name())),
            idle_rss: 0,
        };
        d.write_config()?;
        d.spawn()?;
        Ok(d)
    }

    fn config_path(&self) -> PathBuf {
        self.dir
            .join(format!("{}-{}.conf", self.kind.name(), self.node))
    }

    fn write_config(&self) -> Result<()> {
        let text = match self.kind {
            Kind::Ctsync => ctsync_conf(self.node, self.mode, &self.socket, &self.dir),
            Kind::Conntrackd => conntrackd_conf(self.node, self.mode, &self.socket, &self.dir),
        };
        std::fs::write(self.config_path(), text).context("writing a daemon config")
    }

    fn spawn(&mut self) -> Result<()> {
        // Appended to: a restarted daemon's log follows its first life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .join(format!("{}-{}.log", self.kind.name(), self.node)),
            )
            .context("creating a daemon log")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]);
        match self.kind {
            Kind::Ctsync => {
                cmd.arg(ctsyncd_path()?)
                    .arg("--config")
                    .arg(self.config_path());
                // Quiet unless asked otherwise: logging is work the comparison would count.
                let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
                cmd.env("RUST_LOG", filter);
            }
            Kind::Conntrackd => {
                let _ =
                    std::fs::remove_file(self.dir.join(format!("conntrackd-{}.lock", self.node)));
                cmd.arg("conntrackd").arg("-C").arg(self.config_path());
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let join = self.meter.as_ref().map(CpuMeter::join_path);
        let cpu = node_cpu(self.node).map(cpu_set);
        // SAFETY: only pthread_sigmask, open, write and close run between fork and exec, all
        // async-signal-safe, on a path built before the fork. This process blocks termination
        // signals for its signal thread; the daemon would inherit the mask and never see our
        // SIGTERM. Joining the cgroup before exec counts the daemon's CPU from its first
        // instruction.
        unsafe {
            cmd.pre_exec(move || {
                crate::lab::unblock_termination_signals();
                if let Some(path) = &join {
                    CpuMeter::join_self(path)?;
                }
                if let Some(set) = &cpu {
                    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this
                    // process, between fork and exec (sched_setaffinity is a plain system call).
                    if libc::sched_setaffinity(0, std::mem::size_of_val(set), set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut reg = children();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.kind.name()))?;
        reg.push(child.id() as i32);
        drop(reg);
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if self.answers() {
                break;
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    forget_child(c.id() as i32);
                    self.child = None;
                    bail!(
                        "{} exited at start ({status}): {}",
                        self.kind.name(),
                        self.log_tail()
                    );
                }
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(20),
                "{} did not answer on {} within 20 s: {}",
                self.kind.name(),
                self.socket.display(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.check_placement()?;
        self.idle_rss = self.proc_status("VmRSS").unwrap_or(0);
        Ok(())
    }

    fn log_tail(&self) -> String {
        let path = self
            .dir
            .join(format!("{}-{}.log", self.kind.name(), self.node));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn answers(&self) -> bool {
        match self.kind {
            Kind::Ctsync => {
                control::request(&self.socket, &Request::Stats, Duration::from_secs(2)).is_ok()
            }
            Kind::Conntrackd => conntrackd_request(&self.socket, STATS).is_ok(),
        }
    }

    /// Whether replication is up: ctsync reports every peer's snapshot delivered; conntrackd
    /// (connectionless, no handshake) only needs to answer.
    pub fn ready(&self) -> bool {
        match self.kind {
            Kind::Ctsync => {
                control::request(&self.socket, &Request::Status, Duration::from_secs(2))
                    .ok()
                    .and_then(|b| control::parse_status(&b).ok())
                    .is_some_and(|s| {
                        s.ready
                            && s.sync
                                .is_some_and(|x| x.peers.iter().all(|p| p.state == "connected"))
                    })
            }
            Kind::Conntrackd => self.answers(),
        }
    }

    /// Flows in the external cache.
    pub fn external_count(&self) -> Result<u64> {
        match self.kind {
            Kind::Ctsync => self.ctsync_stat(&["external_flows"]),
            Kind::Conntrackd => {
                let text = conntrackd_request(&self.socket, STATS)?;
                external_active(&text)
                    .with_context(|| format!("no external cache count in: {text}"))
            }
        }
    }

    /// Overruns of the daemon's kernel event socket so far (the kernel dropped events because
    /// the socket was full). Each one costs conntrackd, 1 s later (`NetlinkOverrunResync 1`), a
    /// dump of the kernel table and a query per cached entry; ctsyncd reconciles with a dump.
    pub fn event_overruns(&self) -> Result<u64> {
        match self.kind {
            Kind::Ctsync => self.ctsync_stat(&["kernel", "overruns"]),
            Kind::Conntrackd => {
                let text = conntrackd_request(&self.socket, STATS_RUNTIME)?;
                netlink_overruns(&text)
                    .with_context(|| format!("no netlink overrun count in: {text}"))
            }
        }
    }

    /// The counter at `path` in ctsyncd's stats (`syncctl stats --json`).
    fn ctsync_stat(&self, path: &[&str]) -> Result<u64> {
        let body = control::request(&self.socket, &Request::Stats, Duration::from_secs(10))?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        path.iter()
            .fold(&v, |v, key| &v[*key])
            .as_u64()
            .with_context(|| format!("no {} in ctsyncd's stats", path.join(".")))
    }

    /// Commits the external cache into the kernel; returns when the daemon says it is done.
    pub fn commit(&self) -> Result<Duration> {
        let t0 = Instant::now();
        match self.kind {
            Kind::Ctsync => {
                control::request(&self.socket, &Request::Commit, Duration::from_secs(600))?;
            }
            Kind::Conntrackd => {
                conntrackd_request(&self.socket, CT_COMMIT)?;
            }
        }
        Ok(t0.elapsed())
    }

    /// Fails unless the daemon runs where [`node_cpu`] put it (read back from the kernel).
    fn check_placement(&self) -> Result<()> {
        let Some(cpu) = node_cpu(self.node) else {
            return Ok(());
        };
        let pid = self.pid().context("the daemon is gone")?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let allowed = text
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(str::trim)
            .unwrap_or("?");
        ensure!(
            allowed == cpu.to_string(),
            "{} of node {} may run on CPUs {allowed}, not on CPU {cpu} alone",
            self.kind.name(),
            self.node
        );
        Ok(())
    }

    fn proc_status(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    fn current_usage(&self) -> Usage {
        let Some(pid) = self.pid() else {
            return Usage::default();
        };
        let cpu_secs = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the command name (which may hold spaces) start at ')'.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                let utime: f64 = f.get(11)?.parse().ok()?;
                let stime: f64 = f.get(12)?.parse().ok()?;
                Some((utime + stime) / clock_ticks())
            })
            .unwrap_or(f64::NAN);
        Usage {
            cpu_secs,
            peak_rss: self.proc_status("VmHWM").unwrap_or(0),
        }
    }

    /// Current resident set, bytes.
    pub fn rss(&self) -> u64 {
        self.proc_status("VmRSS").unwrap_or(0)
    }

    /// Usage of this node so far, restarts included.
    pub fn usage(&self) -> Usage {
        let mut u = self.past;
        u.add(self.current_usage());
        if let Some(cpu) = self.meter.as_ref().and_then(CpuMeter::cpu_secs) {
            // The cgroup has counted every life of the node, to the nanosecond.
            u.cpu_secs = cpu;
        }
        u
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 10 s); its usage is kept.
    pub fn stop(&mut self) {
        let now = self.current_usage();
        self.past.add(now);
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if matches!(child.try_wait(), Ok(Some(_))) {
                forget_child(pid);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "warning: {} did not stop on SIGTERM; killing it",
            self.kind.name()
        );
        let _ = child.kill();
        forget_child(pid);
        let _ = child.wait();
    }

    /// Stops and starts the daemon again with the same config.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if let Some(meter) = self.meter.take() {
            meter.remove();
        }
    }
}

/// CPU time of a group of processes with nanosecond (cgroup v1 `cpuacct`) or microsecond
/// (cgroup v2) resolution, exited threads included.
///
/// `/proc/<pid>/stat` counts in clock ticks (10 ms): at 10k flows a whole scenario is about 14
/// of them, so one tick more or less moved the ratio against conntrackd by 7%. Without a
/// writable cgroup hierarchy the comparison falls back to `/proc` (and says so once).
struct CpuMeter {
    dir: PathBuf,
    v2: bool,
}

/// Where cgroup v1 mounts its CPU accounting controller.
const CPUACCT_V1: &str = "/sys/fs/cgroup/cpuacct";

/// Whether each node's daemon runs on a CPU of its own (cleared by `--shared-cpus`).
pub static OWN_CPU: AtomicBool = AtomicBool::new(true);

/// The CPU node `node`'s daemon (and every process and thread it starts) is confined to: A on
/// the first CPU this process may use, B on the second, as if each node were a machine of its
/// own. Both implementations alike. Left to the kernel, ctsync's daemons (which stay on the CPU
/// they start on, by default) shared one CPU in about half of the runs, and conntrackd's could
/// share one at any moment: the figures then depended on that draw (ctsync's p99 latency 1-2 ms
/// on CPUs of their own, up to 8.6 ms on a shared one, 3 runs each).
fn node_cpu(node: usize) -> Option<usize> {
    if !OWN_CPU.load(Ordering::Relaxed) {
        return None;
    }
    let cpus = ctsync::process::allowed_cpus().ok()?;
    (cpus.len() >= 2).then(|| cpus[node % cpus.len()])
}

/// Where the daemons run, for the report's header.
pub fn placement() -> String {
    match (node_cpu(0), node_cpu(1)) {
        (Some(a), Some(b)) => format!("A's daemon on CPU {a}, B's on CPU {b} (a CPU per node)"),
        _ => "wherever the kernel puts them (--shared-cpus, or one CPU)".into(),
    }
}

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` comes from the allowed set, below the set's 1024 bits.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// How daemons' CPU time is read on this machine, for the report's header.
pub fn cpu_clock() -> &'static str {
    if Path::new(CPUACCT_V1).join("cpuacct.usage").exists() {
        "a cgroup per node (v1 cpuacct.usage, ns)"
    } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "a cgroup per node (v2 cpu.stat, µs)"
    } else {
        "/proc/<pid>/stat (10 ms ticks)"
    }
}

impl CpuMeter {
    /// A fresh, empty cgroup named for this comparison process and `node`.
    fn create(node: &str) -> Option<CpuMeter> {
        let (root, v2) = if Path::new(CPUACCT_V1).join("cpuacct.usage").exists() {
            (PathBuf::from(CPUACCT_V1), false)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), true)
        } else {
            warn_once("no cgroup CPU accounting here: CPU is read from /proc in 10 ms ticks");
            return None;
        };
        sweep_stale_groups(&root);
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("{GROUP_PREFIX}{}-{node}-{seq}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => Some(CpuMeter { dir, v2 }),
            Err(e) => {
                warn_once(&format!(
                    "cannot create {} ({e}): CPU is read from /proc in 10 ms ticks",
                    dir.display()
                ));
                None
            }
        }
    }

    /// The file a process writes "0" into to join the group.
    fn join_path(&self) -> std::ffi::CString {
        let path = self.dir.join("cgroup.procs");
        std::ffi::CString::new(path.into_os_string().into_encoded_bytes())
            .expect("a cgroup path has no NUL")
    }

    /// Moves the calling process into the group; async-signal-safe (for `pre_exec`).
    fn join_self(path: &std::ffi::CStr) -> std::io::Result<()> {
        // SAFETY: open/write/close on a NUL-terminated path and a 1-byte static buffer.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
        }
        Ok(())
    }

    /// CPU seconds of every process that has been in the group.
    fn cpu_secs(&self) -> Option<f64> {
        if self.v2 {
            let text = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
            let usec: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            Some(usec / 1e6)
        } else {
            let text = std::fs::read_to_string(self.dir.join("cpuacct.usage")).ok()?;
            let ns: f64 = text.trim().parse().ok()?;
            Some(ns / 1e9)
        }
    }

    /// Removes the group, once its processes are gone.
    fn remove(self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Our cgroups are named `<prefix><pid of the comparison>-<node>-<n>`.
const GROUP_PREFIX: &str = "ctsync-compare-";

/// Removes the groups left by comparisons that were stopped by a signal (which exit without
/// waiting for their daemons): only empty ones can be removed, and only those of a dead pid
/// are tried.
fn sweep_stale_groups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(GROUP_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

fn warn_once(msg: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("warning: {msg}"));
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The `ctsyncd` binary built with this one.
fn ctsyncd_path() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let path = exe.with_file_name("ctsyncd");
    ensure!(
        path.exists(),
        "{} not found: build it with `cargo build --release --bins`",
        path.display()
    );
    Ok(path)
}

fn ctsync_conf(node: usize, mode: Mode, socket: &Path, dir: &Path) -> String {
    let id = ["fw-a", "fw-b"][node];
    let peer = ["fw-a", "fw-b"][1 - node];
    let mode = match mode {
        Mode::Cache => "manual",
        Mode::Inject => "continuous",
    };
    // One PKI for every pair of a run: see [`make_pki`].
    let pki = dir.parent().unwrap_or(dir).join("pki");
    format!(
        "node_id = \"{id}\"\n\
         [control]\nsocket = \"{socket}\"\n\
         [kernel]\nevent_buffer_bytes = {EVENT_BUFFER}\n\
         [sync]\ncluster = \"bench\"\nlisten = \"{listen}:{CTSYNC_PORT}\"\n\
         peers = [{{ node_id = \"{peer}\", address = \"{peer_addr}:{CTSYNC_PORT}\" }}]\n\
         ready_timeout = \"30s\"\n\
         [sync.tls]\nca = \"{pki}/ca.pem\"\ncert = \"{pki}/{id}.pem\"\nkey = \"{pki}/{id}.key\"\n\
         [failover]\ncommit_mode = \"{mode}\"\n",
        socket = socket.display(),
        listen = LINK_ADDR[node],
        peer_addr = LINK_ADDR[1 - node],
        pki = pki.display(),
    )
}

/// The cluster PKI for ctsync (conntrackd has no authentication to set up).
pub fn make_pki(dir: &Path) -> Result<()> {
    let pki = dir.join("pki");
    ctsync::pki::init_ca(&pki, "bench")?;
    for id in ["fw-a", "fw-b"] {
        ctsync::pki::issue(&pki, id)?;
    }
    Ok(())
}

/// conntrackd's config: FTFW over UDP on the sync link, as the upstream examples, with the
/// sizes raised so that the comparison is not lost to defaults: an event buffer twice
/// ctsync's, a resend queue and hash limit above N (the defaults, 131072 and 262144, would drop
/// state at 250k), socket buffers of 64 MiB, and an overrun resync after 1 s instead of 30 s.
/// `StartupResync` makes a restarted node ask for the table, as ctsync does by itself.
fn conntrackd_conf(node: usize, mode: Mode, socket: &Path, dir: &Path) -> String {
    let external = match mode {
        Mode::Cache => "",
        Mode::Inject => "\t\tDisableExternalCache on\n",
    };
    format!(
        "Sync {{\n\
         \tMode FTFW {{\n\t\tResendQueueSize 2097152\n\t\tStartupResync on\n{external}\t}}\n\
         \tUDP {{\n\t\tIPv4_address {local}\n\t\tIPv4_Destination_Address {peer}\n\
         \t\tPort {CONNTRACKD_PORT}\n\t\tInterface {iface}\n\
         \t\tSndSocketBuffer 67108864\n\t\tRcvSocketBuffer 67108864\n\t\tChecksum on\n\t}}\n\
         }}\n\
         General {{\n\
         \tHashSize 262144\n\tHashLimit 2097152\n\
         \tLogFile {dir}/conntrackd-{node}.file.log\n\tSyslog off\n\
         \tLockFile {dir}/conntrackd-{node}.lock\n\
         \tUNIX {{\n\t\tPath {socket}\n\t}}\n\
         \tNetlinkBufferSize {CONNTRACKD_EVENT_BUFFER}\n\tNetlinkBufferSizeMaxGrowth {max}\n\
         \tNetlinkOverrunResync 1\n\
         }}\n",
        local = LINK_ADDR[node],
        peer = LINK_ADDR[1 - node],
        iface = crate::link_name(node),
        dir = dir.display(),
        socket = socket.display(),
        max = CONNTRACKD_EVENT_BUFFER * 2,
    )
}

/// conntrackd's UNIX-socket requests (`include/conntrackd.h`).
const CT_COMMIT: i32 = 18;
const STATS: i32 = 21;
const STATS_RUNTIME: i32 = 30;

/// Sends one request code and reads the text answer until the daemon closes the connection.
fn conntrackd_request(socket: &Path, code: i32) -> Result<String> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.write_all(&code.to_ne_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// "current active connections" of the "cache external:" block of `conntrackd -s`.
fn external_active(text: &str) -> Option<u64> {
    let block = text.split("cache external:").nth(1)?;
    let line = block
        .lines()
        .find(|l| l.starts_with("current active connections"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The "netlink overrun:" count of `conntrackd -s runtime`.
fn netlink_overruns(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("netlink overrun:"))?;
    line.split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_conntrackd_overrun_count() {
        let text = "netlink stats:\n\tevents received:\t 250000\n\tnetlink overrun:\t\t   3\n\
                    \tflush kernel table:\t 0\n";
        assert_eq!(netlink_overruns(text), Some(3));
        assert_eq!(netlink_overruns("runtime stats:\n"), None);
    }

    #[test]
    fn reads_conntrackd_external_count() {
        let text = "cache internal:\ncurrent active connections:\t 7\n\ncache external:\n\
                    current active connections:\t           1234\nconnections created:\t 1\n";
        assert_eq!(external_active(text), Some(1234));
        assert_eq!(external_active("cache internal:\n"), None);
    }
}
