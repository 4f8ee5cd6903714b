//! Real-kernel integration tests of ctsync.
//!
//! Every test builds its own network namespaces (`ctsi-<pid>-<n>`), so the host's conntrack table
//! is never touched. They need root (`CAP_NET_ADMIN`); without it they fail, unless
//! `CTSYNC_SKIP_NETNS=1` asks to skip them explicitly. Tests that move many flows or measure
//! times take a process-wide lock (see [`support::exclusive`]), so `cargo test` with parallel test
//! threads still runs them one at a time on small machines.

mod benchmark;
mod failover;
mod mirror;
mod replication;
mod support;
