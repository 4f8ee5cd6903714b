//! Network namespaces and temporary directories with unique names, removed by drop guards.

use super::run_ok;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Prefix of everything the integration tests create.
pub const PREFIX: &str = "ctsi";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A name no other test, in this process or another, uses: `ctsi-<pid>-<n>`.
///
/// Short enough (at most 15 characters) to be an interface name too.
pub fn unique_name() -> String {
    let name = format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    assert!(name.len() <= 15, "{name} is too long for an interface name");
    name
}

/// Removes namespaces and directories left by earlier test processes that were killed before
/// their guards ran (`SIGKILL`, abort). Only names whose process is gone are touched.
fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dead = |name: &str| -> bool {
            let mut parts = name.split('-');
            if parts.next() != Some(PREFIX) {
                return false;
            }
            let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
                return false;
            };
            let n_ok = parts.next().is_some_and(|n| n.parse::<u32>().is_ok());
            n_ok && parts.next().is_none()
                && pid != std::process::id()
                && !Path::new("/proc").join(pid.to_string()).exists()
        };
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                eprintln!("removing stale namespace {name}");
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
        for entry in std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// A named network namespace (`ip netns`), deleted on drop.
///
/// Conntrack entries, nftables tables and sockets die with it; processes started in it must be
/// stopped by their own guards (declared after the namespace, so dropped before it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with `lo` up.
    pub fn new() -> Netns {
        sweep_stale();
        // The guard exists before the namespace does: a half-done `ip netns add` is cleaned too.
        let ns = Netns {
            name: unique_name(),
        };
        run_ok(Command::new("ip").args(["netns", "add", &ns.name]));
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens stay bound to it).
    pub fn run_in<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        ctsync::netns::run_in(&self.name, f)
            .unwrap_or_else(|e| panic!("cannot run in namespace {}: {e}", self.name))
    }

    /// Enables conntrack labels (and connection tracking of packets) in the namespace: the
    /// kernel attaches label storage only once a ruleset uses labels. The rule also labels every
    /// packet-driven flow with bit 127, which the tests use to recognise real traffic.
    pub fn enable_labels(&self) {
        let ruleset = "table inet ctsi_labels {\n chain pre {\n  type filter hook prerouting priority 0\n  ct label set 127\n }\n}\n";
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run nft");
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(ruleset.as_bytes())
            .expect("cannot write the ruleset to nft");
        let out = child.wait_with_output().expect("nft did not finish");
        assert!(
            out.status.success(),
            "nft refused the label ruleset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::piped())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: cannot delete namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: cannot run ip netns del {}: {e}", self.name),
        }
    }
}

/// A directory under the system temporary directory, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/ctsi-<pid>-<n>`.
    pub fn new() -> TempDir {
        sweep_stale();
        let path = std::env::temp_dir().join(unique_name());
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}
