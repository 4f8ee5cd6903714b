//! `ctsyncd` run inside a test namespace, and `syncctl` to query it.

use super::netns::{Netns, TempDir};
use super::wait_for;
use ctsync::control::ExternalEntry;
use ctsync::flow::Flow;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The `[kernel]` settings a test chooses; `None` leaves the daemon's default.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelConfig {
    /// `event_buffer_bytes`.
    pub event_buffer_bytes: Option<usize>,
    /// `write_sockets`.
    pub write_sockets: Option<usize>,
}

/// A running `ctsyncd`, stopped (by PID) and its directory removed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Mutex<Child>,
    pid: i32,
    node_id: String,
    /// Namespace name and config file, to start it again.
    ns: String,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    // Dropped last: the log is printed from `drop` when the test failed.
    dir: TempDir,
}

/// Runs `syncctl --socket SOCKET args…`: its stdout, or the exit status with stdout and stderr.
pub fn syncctl_at(socket: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new(syncctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run syncctl: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "syncctl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Path of the `syncctl` binary cargo built for this test run.
pub fn syncctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_syncctl")
}

impl Daemon {
    /// Writes a config (node `fw1`, control socket in a fresh directory) and starts the daemon
    /// in `ns` with `ip netns exec`. Returns once its control socket answers.
    pub fn start(ns: &Netns, kernel: KernelConfig) -> Daemon {
        let mut extra = String::new();
        if kernel.event_buffer_bytes.is_some() || kernel.write_sockets.is_some() {
            extra.push_str("[kernel]\n");
            if let Some(b) = kernel.event_buffer_bytes {
                extra.push_str(&format!("event_buffer_bytes = {b}\n"));
            }
            if let Some(w) = kernel.write_sockets {
                extra.push_str(&format!("write_sockets = {w}\n"));
            }
        }
        Daemon::start_with(ns, "fw1", &extra)
    }

    /// Writes a config with `node_id`, a control socket in a fresh directory and `extra_toml`
    /// (sections such as `[kernel]` or `[sync]`, appended as is) and starts the daemon in `ns`
    /// with `ip netns exec`. Returns once its control socket answers.
    pub fn start_with(ns: &Netns, node_id: &str, extra_toml: &str) -> Daemon {
        let dir = TempDir::new();
        let socket = dir.path().join("ctsyncd.sock");
        let log = dir.path().join("ctsyncd.log");
        let config = format!(
            "node_id = \"{node_id}\"\n\n[control]\nsocket = \"{}\"\n\n{extra_toml}",
            socket.display()
        );
        let config_path = dir.path().join("ctsyncd.toml");
        std::fs::write(&config_path, &config).expect("cannot write the daemon config");
        let child = spawn(ns.name(), &config_path, &log);
        // `ip netns exec` execs the program in place: this PID is the daemon's.
        let pid = i32::try_from(child.id()).expect("pid fits in i32");
        let d = Daemon {
            child: Mutex::new(child),
            pid,
            node_id: node_id.to_string(),
            ns: ns.name().to_string(),
            config: config_path,
            socket,
            log,
            dir,
        };
        d.wait_started();
        d
    }

    /// Waits until the control socket of the process just started answers, and checks that
    /// it is that process.
    fn wait_started(&self) {
        let status = wait_for(
            "the daemon's control socket",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || self.status(),
        );
        assert_eq!(
            status["pid"].as_i64(),
            Some(i64::from(self.pid)),
            "status reports another pid than the process started: {status}"
        );
        assert_eq!(status["node_id"], self.node_id.as_str(), "{status}");
    }

    /// The configured node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Stops the process (SIGTERM; panics if it takes longer than 20 s) but keeps its
    /// directory and config, for [`Daemon::start_again`].
    pub fn stop_process(&mut self) -> ExitStatus {
        self.terminate(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("ctsyncd ignored SIGTERM for 20 s"))
    }

    /// Starts the daemon again with the same config, after [`Daemon::stop_process`]; its log
    /// is appended to. Returns once the new process's control socket answers.
    pub fn start_again(&mut self) {
        {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            assert!(
                matches!(child.try_wait(), Ok(Some(_))),
                "start_again: ctsyncd (pid {}) is still running",
                self.pid
            );
            let new = spawn(&self.ns, &self.config, &self.log);
            self.pid = i32::try_from(new.id()).expect("pid fits in i32");
            *child = new;
        }
        self.wait_started();
    }

    /// [`Daemon::stop_process`] then [`Daemon::start_again`]; the exit status of the old process.
    pub fn restart(&mut self) -> ExitStatus {
        let st = self.stop_process();
        self.start_again();
        st
    }

    /// Panics with the log if the process has exited.
    fn assert_alive(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(st)) = child.try_wait() {
            panic!("ctsyncd exited ({st}); log:\n{}", self.log_tail(60));
        }
    }

    /// The whole log of the daemon (of every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `syncctl --socket PATH args…`; its stdout, or stderr and exit status on failure.
    pub fn syncctl(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        syncctl_at(&self.socket, args)
    }

    /// `syncctl status --json`.
    pub fn status(&self) -> Result<Value, String> {
        let out = self
            .syncctl(&["status", "--json"])
            .inspect_err(|_| self.assert_alive())?;
        serde_json::from_slice(&out).map_err(|e| {
            format!(
                "status --json is not JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        })
    }

    /// `syncctl dump internal --json`, deserialized.
    pub fn dump_internal(&self) -> Result<Vec<Flow>, String> {
        let out = self
            .syncctl(&["dump", "internal", "--json"])
            .inspect_err(|_| self.assert_alive())?;
        serde_json::from_slice(&out).map_err(|e| format!("dump internal --json: {e}"))
    }

    /// `syncctl dump external --json`, deserialized.
    pub fn dump_external(&self) -> Result<Vec<ExternalEntry>, String> {
        let out = self
            .syncctl(&["dump", "external", "--json"])
            .inspect_err(|_| self.assert_alive())?;
        serde_json::from_slice(&out).map_err(|e| format!("dump external --json: {e}"))
    }

    /// `syncctl ready`: `Ok(true)` on exit 0, `Ok(false)` on exit 1, `Err` otherwise.
    pub fn ready(&self) -> Result<bool, String> {
        let out = Command::new(syncctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("ready")
            .output()
            .map_err(|e| format!("cannot run syncctl: {e}"))?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => {
                self.assert_alive();
                Err(format!(
                    "syncctl ready failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
    }

    /// Waits until the mirror has completed its initial (or a repairing) dump and none runs.
    pub fn wait_synced(&self, timeout: Duration) -> Value {
        wait_for(
            "the mirror to be synced",
            timeout,
            Duration::from_millis(20),
            || {
                let st = self.status()?;
                if is_settled(&st) {
                    Ok(st)
                } else {
                    Err(format!("status: {st}"))
                }
            },
        )
    }

    /// Sends SIGTERM and waits for the exit; panics if it takes longer than 20 s.
    pub fn stop(self) -> ExitStatus {
        // Drop (with the directory) follows; the process is already reaped.
        self.terminate(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("ctsyncd ignored SIGTERM for 20 s"))
    }

    /// Sends a signal to the daemon.
    fn signal(&self, sig: i32) {
        // SAFETY: plain signal delivery. The process is our child and is reaped only through
        // `self.child`, which every caller holds or checks, so the PID cannot have been reused.
        unsafe { libc::kill(self.pid, sig) };
    }

    /// Freezes the daemon (SIGSTOP) and waits until it is stopped: it then reads nothing, as if
    /// starved of CPU, while the kernel keeps queueing (and eventually dropping) its events.
    pub fn pause(&self) {
        self.assert_alive();
        self.signal(libc::SIGSTOP);
        let stat = format!("/proc/{}/stat", self.pid);
        wait_for(
            "the daemon to stop",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                let text = std::fs::read_to_string(&stat).map_err(|e| e.to_string())?;
                // The state follows the parenthesised command name.
                match text
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                {
                    Some("T") => Ok(()),
                    other => Err(format!("state {other:?}")),
                }
            },
        );
    }

    /// Continues a paused daemon.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM, then wait up to `grace`; `None` if still running.
    fn terminate(&self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        // A paused daemon would not act on SIGTERM before it is continued.
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Starts `ctsyncd --config CONFIG` in the namespace `ns`, appending its output to `log`.
fn spawn(ns: &str, config: &Path, log: &Path) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("cannot open the daemon log");
    Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ctsyncd")])
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("cannot clone the log handle"))
        .stderr(log_file)
        .spawn()
        .expect("cannot start ctsyncd")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(10)).is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("ctsyncd (pid {}) ignored SIGTERM; killing it", self.pid);
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- ctsyncd {} log ({}) ----\n{}\n----",
                self.node_id,
                self.dir.path().display(),
                self.log_tail(60)
            );
        }
    }
}

/// Whether a status says the mirror is synced with no dump running.
pub fn is_settled(st: &Value) -> bool {
    st["kernel"]["synced"] == true && st["kernel"]["dump_running"] == false
}

/// A counter of `kernel.stats`.
pub fn stat(st: &Value, name: &str) -> u64 {
    st["kernel"]["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status lacks kernel.stats.{name}: {st}"))
}

/// `internal_cache.flows`.
pub fn cache_flows(st: &Value) -> u64 {
    st["internal_cache"]["flows"]
        .as_u64()
        .unwrap_or_else(|| panic!("status lacks internal_cache.flows: {st}"))
}
