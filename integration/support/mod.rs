//! Harness of the integration tests: namespaces, the daemon, flow generators, comparisons and the
//! `conntrack` CLI as an independent oracle.
//!
//! Everything a test creates (namespaces, temporary directories, processes, threads) is owned by a
//! guard whose `Drop` removes it, also when the test panics.

pub mod cli;
pub mod cluster;
pub mod compare;
pub mod daemon;
pub mod flows;
pub mod kernel;
pub mod link;
pub mod netns;
pub mod traffic;

use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Setting this variable to `1` skips the tests explicitly where they cannot run.
pub const SKIP_ENV: &str = "CTSYNC_SKIP_NETNS";

/// Whether the calling test may run.
///
/// Returns `false` (after saying so) when `CTSYNC_SKIP_NETNS=1`; panics when not root, because a
/// silently skipped test suite would look green without testing anything.
#[must_use]
pub fn require_root() -> bool {
    if std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
        eprintln!("skipped: {SKIP_ENV}=1 (real-kernel integration test)");
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "integration tests need root (CAP_NET_ADMIN) to create network namespaces; \
         set {SKIP_ENV}=1 to skip them explicitly"
    );
    true
}

static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Serialises the tests that move many flows or measure times.
///
/// On a 2-core machine two 250k-flow tests at once starve each other and the daemons they
/// watch; holding this for the whole test keeps each one's timing meaningful whatever
/// `--test-threads` is. A panicking holder poisons the lock: that is not a reason to fail the next.
pub fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a command to completion and panics, with its stderr, unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// Polls `probe` every `interval` until it returns `Ok`, or panics after `timeout` with the last
/// error it returned (the most useful description of what never became true).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => std::thread::sleep(interval),
        }
    }
}

/// The wall clock as `HH:MM:SS.mmm` UTC, to line test events up with the daemon's log.
pub fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}

/// Seconds as a float, for printing measurements.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Timeout tolerance for comparing two reads of flows taken `since` apart at most: the kernel's
/// timeouts tick, and a mirror keeps the value of the last event (which carries a timeout).
pub fn timeout_slack(since: Instant) -> u32 {
    u32::try_from(since.elapsed().as_secs()).unwrap_or(u32::MAX - 2) + 2
}
