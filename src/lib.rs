//! ctsync: keeps the conntrack tables of a Linux firewall cluster in sync.
//!
//! # Layout
//! - [`flow`]: the flow model, independent of netlink.
//! - [`netlink`]: ctnetlink codec, sockets, dump, events and batched writes (the kernel bridge).
//! - [`cache`]: flow tables and the kernel-mirror state machine (sans-IO).
//! - [`slab`]: the compact keyed store under the big flow tables.
//! - [`config`]: the daemon's TOML configuration.
//! - [`control`]: the local control socket protocol shared by `ctsyncd` and `syncctl`.
//! - [`daemon`]: the runtime that wires the kernel bridge, the caches and the control socket.
//! - [`sync`]: the replication engine and the peer messages (sans-IO).
//! - [`transport`]: the gRPC peer transport (one mutual-TLS stream per pair of nodes).
//! - [`wire`]: the peer messages' protobuf form, validated on decode (a peer is a trust boundary).
//! - [`netns`]: entering network namespaces (tests, benchmarks, demo tooling).
//! - [`pki`]: the cluster CA and node certificates for mutual TLS between peers.
//! - [`process`]: CPU scheduling of the daemon (real-time by default, like conntrackd).
#![warn(missing_docs)]

pub mod cache;
pub mod commit;
pub mod config;
pub mod control;
pub mod daemon;
pub mod failover;
pub mod flow;
pub mod netlink;
pub mod netns;
pub mod notify;
pub mod pki;
pub mod process;
pub mod replication;
pub mod slab;
pub mod sync;
#[cfg(test)]
mod test_rng;
pub mod transport;
pub mod wire;

/// An error and its causes on one line, each cause once (messages that already quote their
/// cause are not repeated): what the binaries print.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}
