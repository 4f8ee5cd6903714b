//! Network namespaces of a benchmark run, and their removal on every path (drop guards, and a
//! signal thread for SIGINT/SIGTERM/SIGHUP); facts about the machine that skew figures.

use crate::rawnl::raw_flush;
use anyhow::{bail, ensure, Context, Result};
use ctsync::netlink::attr;
use ctsync::netns;
use std::io;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Pause after setting up a namespace, so that the previous one's teardown is over.
const SETTLE: Duration = Duration::from_millis(250);

pub static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
pub static NS_SEQ: AtomicUsize = AtomicUsize::new(0);
/// Our child processes that run and are not reaped yet, for the signal thread to stop. A lock,
/// not atomics: a pid must not be reaped (and reusable) while it is being killed, so a child is
/// forgotten (under the lock) before it is waited for.
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// The children the signal thread must stop.
pub fn children() -> MutexGuard<'static, Vec<i32>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forgets a child before it is reaped.
pub fn forget_child(pid: i32) {
    children().retain(|&p| p != pid);
}

pub fn registry() -> MutexGuard<'static, Vec<String>> {
    NAMESPACES.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip(8)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A network namespace of ours: emptied and removed when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create() -> Result<Netns> {
        let name = format!(
            "ctsb-{}-{}",
            std::process::id(),
            NS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // Held across the creation so that the signal thread never misses a namespace.
        let mut reg = registry();
        ip(&["netns", "add", &name])?;
        reg.push(name.clone());
        drop(reg);
        std::thread::sleep(SETTLE);
        Ok(Netns { name })
    }

    /// Runs `f` on a thread inside the namespace (sockets opened there stay bound to it).
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        netns::run_in(&self.name, f).with_context(|| format!("in namespace {}", self.name))
    }

    pub fn conntrack_count(&self) -> Result<u64> {
        self.run(|| read_sysctl("nf_conntrack_count"))?
            .context("reading nf_conntrack_count")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Emptying the table synchronously keeps its teardown from running in a kernel worker
        // during the next measurement.
        match self.run(raw_flush) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: flushing {}: {e}", self.name),
            Err(e) => eprintln!("warning: flushing {}: {e:#}", self.name),
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
        registry().retain(|n| *n != self.name);
    }
}

/// Removes namespaces left by benchmark processes that no longer exist (killed with SIGKILL).
pub fn remove_stale_namespaces() -> bool {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return false;
    };
    let mut removed = false;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ctsb-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing stale namespace {name} (benchmark pid {pid} is gone)");
        if let Err(e) = ip(&["netns", "del", &name]) {
            eprintln!("warning: {e:#}");
        }
        removed = true;
    }
    removed
}

/// Blocks SIGINT/SIGTERM/SIGHUP in every thread and handles them on a dedicated one, which
/// removes our namespaces and exits.
pub fn install_signal_cleanup() -> Result<()> {
    // SAFETY: the set is a local, initialised by sigemptyset before use; pthread_sigmask only
    // changes the mask of this thread (inherited by the threads it spawns from now on).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                eprintln!(
                    "{}: signal {sig}: stopping children, removing namespaces, exiting",
                    env!("CARGO_BIN_NAME")
                );
                for &child in children().iter() {
                    // SAFETY: kill(2) on our own child, not reaped while the lock is held.
                    unsafe {
                        libc::kill(child, libc::SIGTERM);
                    }
                }
                let reg = registry();
                for name in reg.iter() {
                    if let Err(e) = ip(&["netns", "del", name]) {
                        eprintln!("warning: {e:#}");
                    }
                }
                std::process::exit(128 + sig);
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// The first three fields of `/proc/loadavg`: other load on the machine skews every figure.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn unblock_termination_signals() {
    // SAFETY: as in `install_signal_cleanup`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Allocated conntrack entries, all namespaces together (`nf_conntrack` slab, active objects).
pub fn conntrack_slab_objects() -> u64 {
    std::fs::read_to_string("/proc/slabinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("nf_conntrack "))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Inodes of the sockets subscribed to conntrack groups in a `/proc/.../net/netlink` table.
pub fn ct_listener_inodes(table: &str, into: &mut std::collections::HashSet<String>) {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[1] != "12" {
            continue;
        }
        let groups = u32::from_str_radix(f[3], 16).unwrap_or(0);
        let ct_groups = (1 << (attr::GROUP_NEW - 1))
            | (1 << (attr::GROUP_UPDATE - 1))
            | (1 << (attr::GROUP_DESTROY - 1));
        if groups & ct_groups != 0 {
            into.insert(f[9].to_string());
        }
    }
}

/// Sockets subscribed to conntrack events on the whole machine (read-only): the namespaces of
/// every thread, and the named namespaces (sockets opened there by threads that left).
pub fn ctnetlink_listeners() -> usize {
    let mut inodes = std::collections::HashSet::new();
    let tasks = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .flat_map(|p| {
            std::fs::read_dir(p.path().join("task"))
                .into_iter()
                .flatten()
                .flatten()
        });
    for task in tasks {
        if let Ok(table) = std::fs::read_to_string(task.path().join("net/netlink")) {
            ct_listener_inodes(&table, &mut inodes);
        }
    }
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(Ok(table)) = netns::run_in(&name, || {
            std::fs::read_to_string("/proc/thread-self/net/netlink")
        }) {
            ct_listener_inodes(&table, &mut inodes);
        }
    }
    inodes.len()
}

pub fn read_sysctl(name: &str) -> io::Result<u64> {
    let path = format!("/proc/sys/net/netfilter/{name}");
    let text = std::fs::read_to_string(&path)?;
    text.trim()
        .parse()
        .map_err(|e| io::Error::other(format!("{path}: {e}")))
}
