//! The daemon's configuration file (TOML).
//!
//! Unknown keys are errors: a misspelt option silently ignored is how a standby ends up not
//! doing what its operator believes.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/ctsync/ctsyncd.sock";
/// Default event receive buffer. Each queued event takes about 1280 bytes of buffer (6.18), so
/// 256 MiB holds about 210k events: a burst of 250k connection setups at the kernel's full speed
/// on a 2-core machine (where the reader shares the cores) is absorbed without an overrun, while
/// 64 MiB overran in most such runs. It is a limit, not an allocation: memory is only used while
/// events wait.
pub const DEFAULT_EVENT_BUFFER: usize = 256 << 20;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name in the cluster; unique per firewall.
    pub node_id: String,
    /// The local control socket.
    #[serde(default)]
    pub control: ControlConfig,
    /// The kernel bridge.
    #[serde(default)]
    pub kernel: KernelConfig,
    /// Replication to peers; absent: this node only mirrors its own table.
    #[serde(default)]
    pub sync: Option<SyncConfig>,
    /// Commit, promote and demote.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// CPU scheduling of the daemon's threads.
    #[serde(default)]
    pub process: ProcessConfig,
}

/// Scheduling policy of the daemon's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedPolicy {
    /// Real-time round robin (`SCHED_RR`).
    Rr,
    /// Real-time first in, first out (`SCHED_FIFO`).
    Fifo,
    /// The ordinary time-sharing scheduler (`SCHED_OTHER`).
    Other,
}

/// `[process]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// `rr` (default), `fifo` or `other`. A real-time policy keeps event intake and
    /// replication running ahead of whatever creates flows on a busy machine, as conntrackd
    /// does by default (it uses `SCHED_RR` at the highest priority): measured on 2 cores, a
    /// burst of 250k new flows reached the peer 2 ms after the kernel had them instead of 40 to
    /// 200 ms. The kernel's real-time throttling still leaves other tasks 5% of each second.
    #[serde(default = "default_sched_policy")]
    pub scheduler: SchedPolicy,
    /// Real-time priority, 1 to 99 (ignored with `other`). The default, 1, is the lowest: any
    /// real-time task of the machine (keepalived with `vrrp_rt_priority`, say) goes first.
    #[serde(default = "default_sched_priority")]
    pub priority: u8,
    /// Where the daemon's threads run: `"same"` (default), `"any"` or a CPU number.
    #[serde(default)]
    pub cpu: CpuChoice,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            scheduler: default_sched_policy(),
            priority: default_sched_priority(),
            cpu: CpuChoice::default(),
        }
    }
}

/// `[process] cpu`: which CPU the daemon's event thread and state task run on (the kernel
/// writer and the dump thread float: see [`crate::process::float_this_thread`]).
///
/// The event thread hands every event to the state task: on one core that data stays in the
/// core's cache, on two it crosses between them for every flow. Measured with
/// `ctsync-compare` on 2 cores at 250k flows, with the daemons pinned to one CPU: the source's
/// event thread 0.74-0.80 -> 0.46-0.52 CPU seconds, the whole scenario -12%, replication as
/// fast (the kernel, not ctsyncd, sets its pace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum CpuChoice {
    /// All threads on the CPU the daemon starts on.
    #[default]
    Same,
    /// Wherever the kernel's scheduler puts each thread.
    Any,
    /// All threads on this CPU.
    Cpu(u16),
}

impl<'de> Deserialize<'de> for CpuChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Number(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "same" => Ok(CpuChoice::Same),
            Raw::Word(w) if w == "any" => Ok(CpuChoice::Any),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "cpu = \"{w}\": expected \"same\", \"any\" or a CPU number"
            ))),
            Raw::Number(n) => u16::try_from(n)
                .ok()
                .filter(|n| usize::from(*n) < MAX_CPUS)
                .map(CpuChoice::Cpu)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "cpu = {n}: a CPU number is 0 to {}",
                        MAX_CPUS - 1
                    ))
                }),
        }
    }
}

/// CPU numbers a `cpu_set_t` holds.
pub const MAX_CPUS: usize = 1024;

fn default_sched_policy() -> SchedPolicy {
    SchedPolicy::Rr
}

fn default_sched_priority() -> u8 {
    1
}

/// When replicated flows enter the local kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitMode {
    /// At `syncctl commit` / `promote` (takeover), as conntrackd does.
    Manual,
    /// As they arrive: the standby's kernel already knows every flow, takeover needs no commit.
    Continuous,
}

/// `[failover]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// `manual` (default) or `continuous`.
    #[serde(default = "default_commit_mode")]
    pub commit_mode: CommitMode,
    /// After `demote`, flows this node no longer owns are removed from its kernel after this
    /// delay (a `promote` in between cancels it).
    #[serde(default = "default_purge_delay", with = "humantime_serde")]
    pub purge_delay: Duration,
    /// Seconds given to a committed flow whose replicated timeout ran out.
    #[serde(default = "default_min_timeout")]
    pub min_timeout: u32,
    /// Commit TCP flows with window tracking relaxed ("be liberal"), so that the first
    /// mid-stream packet after takeover passes.
    #[serde(default = "default_true")]
    pub tcp_liberal: bool,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            commit_mode: default_commit_mode(),
            purge_delay: default_purge_delay(),
            min_timeout: default_min_timeout(),
            tcp_liberal: true,
        }
    }
}

fn default_commit_mode() -> CommitMode {
    CommitMode::Manual
}

fn default_purge_delay() -> Duration {
    Duration::from_secs(60)
}

fn default_min_timeout() -> u32 {
    60
}

fn default_true() -> bool {
    true
}

/// `[sync]`: replication between the nodes of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Cluster name: nodes of different clusters refuse each other.
    pub cluster: String,
    /// Address the sync service listens on (`IP:port`).
    pub listen: SocketAddr,
    /// The other nodes of the cluster.
    pub peers: Vec<PeerConfig>,
    /// Mutual TLS material; required unless `plaintext = true`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Run the sync link without authentication or encryption (logged as a warning at start).
    #[serde(default)]
    pub plaintext: bool,
    /// A peer unreachable this long no longer holds back readiness (a lone survivor must be
    /// able to become ready).
    #[serde(default = "default_ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// How often the kernel table is re-read to refresh replicated timeouts (the kernel sends
    /// no event when traffic extends a timeout).
    #[serde(default = "default_timeout_refresh", with = "humantime_serde")]
    pub timeout_refresh: Duration,
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's `node_id` (also the name in its certificate).
    pub node_id: String,
    /// Where its sync service listens (`host:port`).
    pub address: String,
}

/// `[sync.tls]`: PEM files, as `syncctl pki` writes them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout_refresh() -> Duration {
    Duration::from_secs(30)
}

/// `[control]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Path of the Unix socket `syncctl` talks to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: default_socket(),
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

/// `[kernel]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// Receive buffer of the event socket, in bytes (set with `SO_RCVBUFFORCE`).
    #[serde(default = "default_event_buffer")]
    pub event_buffer_bytes: usize,
    /// Sockets (and threads) used for batched writes to the kernel. One by default: creations
    /// are serialised under the kernel's ctnetlink lock, and a second writer spins on it.
    #[serde(default = "default_write_sockets")]
    pub write_sockets: usize,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            event_buffer_bytes: default_event_buffer(),
            write_sockets: default_write_sockets(),
        }
    }
}

fn default_event_buffer() -> usize {
    DEFAULT_EVENT_BUFFER
}

fn default_write_sockets() -> usize {
    1
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        check_name("node_id", &self.node_id)?;
        if let Some(sync) = &self.sync {
            sync.validate(&self.node_id)?;
        }
        if self.control.socket.as_os_str().is_empty() {
            return Err("control.socket must not be empty".into());
        }
        let buf = self.kernel.event_buffer_bytes;
        if !(4096..=(1 << 30)).contains(&buf) {
            return Err(format!(
                "kernel.event_buffer_bytes = {buf} is out of range (4096 to 1073741824)"
            ));
        }
        if !(1..=16).contains(&self.kernel.write_sockets) {
            return Err(format!(
                "kernel.write_sockets = {} is out of range (1 to 16)",
                self.kernel.write_sockets
            ));
        }
        if !(1..=99).contains(&self.process.priority) {
            return Err(format!(
                "process.priority = {} is out of range (1 to 99)",
                self.process.priority
            ));
        }
        Ok(())
    }
}

/// Node ids and cluster names: short, and safe in file names and certificate names.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
        ))
    }
}

impl SyncConfig {
    fn validate(&self, me: &str) -> Result<(), String> {
        check_name("sync.cluster", &self.cluster)?;
        if self.peers.is_empty() {
            return Err("sync.peers is empty: list the other nodes of the cluster".into());
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.peers {
            check_name("sync.peers.node_id", &p.node_id)?;
            if p.node_id == me {
                return Err(format!("sync.peers lists this node itself ({me})"));
            }
            if !seen.insert(&p.node_id) {
                return Err(format!("sync.peers lists {} twice", p.node_id));
            }
            if p.address
                .rsplit_once(':')
                .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(format!(
                    "sync.peers: address {:?} of {} must be host:port",
                    p.address, p.node_id
                ));
            }
        }
        match (&self.tls, self.plaintext) {
            (None, false) => Err(
                "sync.tls is required (CA, certificate and key, e.g. from `syncctl pki`); \
                 set sync.plaintext = true only on a trusted, dedicated link"
                    .into(),
            ),
            (Some(_), true) => Err("sync.tls and sync.plaintext = true exclude each other".into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse("node_id = \"fw1\"").unwrap();
        assert_eq!(cfg.control.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(cfg.kernel.event_buffer_bytes, DEFAULT_EVENT_BUFFER);
        assert_eq!(cfg.kernel.write_sockets, 1);
        assert_eq!(cfg.process.scheduler, SchedPolicy::Rr);
        assert_eq!(cfg.process.priority, 1);
    }

    #[test]
    fn the_cpu_is_same_any_or_a_number() {
        let cpu = |text: &str| parse(&format!("node_id = \"a\"\n[process]\n{text}\n"));
        assert_eq!(
            parse("node_id = \"a\"\n").unwrap().process.cpu,
            CpuChoice::Same
        );
        assert_eq!(cpu("cpu = \"any\"").unwrap().process.cpu, CpuChoice::Any);
        assert_eq!(cpu("cpu = \"same\"").unwrap().process.cpu, CpuChoice::Same);
        assert_eq!(cpu("cpu = 3").unwrap().process.cpu, CpuChoice::Cpu(3));
        for (bad, says) in [
            ("cpu = -1", "a CPU number is 0 to 1023"),
            ("cpu = 1024", "a CPU number is 0 to 1023"),
            (
                "cpu = \"first\"",
                "expected \"same\", \"any\" or a CPU number",
            ),
        ] {
            let err = cpu(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn scheduling_is_checked() {
        let cfg = parse("node_id = \"a\"\n[process]\nscheduler = \"other\"\n").unwrap();
        assert_eq!(cfg.process.scheduler, SchedPolicy::Other);
        let err = parse("node_id = \"a\"\n[process]\npriority = 0\n").unwrap_err();
        assert!(err.to_string().contains("process.priority"), "{err}");
        let err = parse("node_id = \"a\"\n[process]\nscheduler = \"idle\"\n").unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse("node_id = \"fw1\"\n[kernel]\nevent_bufer_bytes = 5\n").unwrap_err();
        assert!(err.to_string().contains("event_bufer_bytes"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let err = parse("node_id = \"fw 1\"").unwrap_err();
        assert!(err.to_string().contains("node_id"), "{err}");
        let err = parse("node_id = \"a\"\n[kernel]\nevent_buffer_bytes = 10\n").unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        let err = parse("node_id = \"a\"\n[kernel]\nwrite_sockets = 0\n").unwrap_err();
        assert!(err.to_string().contains("write_sockets"), "{err}");
        assert!(parse("").unwrap_err().to_string().contains("node_id"));
    }

    #[test]
    fn sync_section_is_checked() {
        let base = "node_id = \"fw1\"\n[sync]\ncluster = \"c\"\nlisten = \"127.0.0.1:7400\"\n";
        let peers = "peers = [{ node_id = \"fw2\", address = \"10.0.0.2:7400\" }]\n";
        let err = parse(&format!("{base}{peers}")).unwrap_err();
        assert!(err.to_string().contains("sync.tls is required"), "{err}");
        let cfg = parse(&format!(
            "{base}{peers}plaintext = true\nready_timeout = \"3s\"\n"
        ))
        .unwrap();
        let sync = cfg.sync.unwrap();
        assert_eq!(sync.ready_timeout, Duration::from_secs(3));
        assert_eq!(sync.timeout_refresh, Duration::from_secs(30));
        let self_peer =
            "peers = [{ node_id = \"fw1\", address = \"10.0.0.2:7400\" }]\nplaintext = true\n";
        assert!(parse(&format!("{base}{self_peer}"))
            .unwrap_err()
            .to_string()
            .contains("itself"));
        let bad_addr =
            "peers = [{ node_id = \"fw2\", address = \"10.0.0.2\" }]\nplaintext = true\n";
        assert!(parse(&format!("{base}{bad_addr}"))
            .unwrap_err()
            .to_string()
            .contains("host:port"));
        let bad_listen = "node_id = \"fw1\"\n[sync]\ncluster = \"c\"\nlisten = \"nowhere\"\n";
        assert!(parse(&format!("{bad_listen}{peers}plaintext = true\n")).is_err());
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen > 0, "no example config in {}", dir.display());
    }
}
