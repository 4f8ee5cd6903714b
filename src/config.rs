//! The daemon's configuration file (TOML).
//!
//! Unknown keys are errors: a misspelt option silently ignored is how a standby ends up not
//! doing what its operator believes.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/ctsync/ctsyncd.sock";
/// Default event receive buffer: holds a burst of about 60k events, so that a burst of
/// connection setups at the kernel's full speed is absorbed without an overrun.
pub const DEFAULT_EVENT_BUFFER: usize = 64 << 20;

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
    /// Sockets (and threads) used for batched writes to the kernel.
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
    2
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
        let id_ok = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !id_ok {
            return Err(format!(
                "node_id {:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                self.node_id
            ));
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
        Ok(())
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
        assert_eq!(cfg.kernel.write_sockets, 2);
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
