//! `syncctl`: the operator's command line for a running `ctsyncd`.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ctsync::control::{self, CacheName, Request, StatusReport};
use ctsync::flow::{self, Flow, ProtoInfo};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Control a running ctsyncd over its local socket.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Control socket of the daemon (default: from --config, else /run/ctsync/ctsyncd.sock).
    #[arg(long, short = 's', global = true)]
    socket: Option<PathBuf>,
    /// Daemon configuration file to read the control socket path from.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the daemon.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Node, kernel mirror and cache state.
    Status,
    /// Every flow of a cache.
    Dump {
        /// Which cache.
        cache: Cache,
    },
    /// Counters: kernel events, overruns, peers, commits.
    Stats,
    /// Write the external cache into the kernel now (exit 1 if any flow was refused).
    Commit,
    /// Become primary: commit, rebuild the internal cache from the kernel, send it to peers.
    Promote,
    /// Become backup: ask peers for snapshots, purge own flows after the configured delay.
    Demote,
    /// Empty a cache (internal: re-read from the kernel; external: refilled by peers).
    Flush {
        /// Which cache.
        cache: Cache,
    },
    /// Re-read the internal cache from the kernel.
    Resync,
    /// Ask every peer for a full snapshot.
    RequestResync,
    /// Send every flow of the internal cache to every peer again.
    BulkSend,
    /// Exit 0 if the node is ready to take over (mirror synced, peers' snapshots received or
    /// peers unreachable past the bound), 1 if not: for keepalived's `vrrp_script`.
    Ready,
    /// Cluster certificates for the sync link's mutual TLS.
    Pki {
        #[command(subcommand)]
        action: PkiAction,
    },
}

#[derive(Subcommand, Debug)]
enum PkiAction {
    /// Create the cluster CA (ca.pem, ca.key) in DIR.
    Init {
        /// Directory for the CA and node files (created 0700).
        #[arg(long, default_value = "/etc/ctsync/pki")]
        dir: PathBuf,
        /// Cluster name, written into the CA's name.
        #[arg(long)]
        cluster: String,
    },
    /// Issue NODE.pem and NODE.key, signed by the CA in DIR.
    Issue {
        /// Directory holding the CA.
        #[arg(long, default_value = "/etc/ctsync/pki")]
        dir: PathBuf,
        /// The node id, as in its config's node_id.
        node: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Cache {
    /// The mirror of this node's kernel table.
    Internal,
    /// Flows learnt from peers.
    External,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        // `syncctl … | head` closing the pipe early is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("syncctl: {}", ctsync::report(&e));
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let req = match &args.command {
        Command::Pki { action } => return pki(action),
        Command::Status | Command::Ready => Request::Status,
        Command::Stats => Request::Stats,
        Command::Commit => Request::Commit,
        Command::Promote => Request::Promote,
        Command::Demote => Request::Demote,
        Command::Flush { cache } => Request::Flush {
            cache: cache_name(*cache),
        },
        Command::Resync => Request::Resync,
        Command::RequestResync => Request::RequestResync,
        Command::BulkSend => Request::BulkSend,
        Command::Dump { cache } => Request::Dump {
            cache: cache_name(*cache),
        },
    };
    let socket = socket_path(args)?;
    let body = match control::request(&socket, &req, Duration::from_secs(args.timeout)) {
        Err(control::ControlError::Refused(e))
            if req == Request::Commit || req == Request::Promote =>
        {
            eprintln!("syncctl: {e}");
            return Ok(ExitCode::from(1));
        }
        other => other?,
    };
    let mut out = std::io::stdout().lock();
    if let Command::Ready = args.command {
        let status = control::parse_status(&body)?;
        if args.json {
            writeln!(out, "{{\"ready\":{}}}", status.ready)?;
        } else {
            writeln!(out, "{}", if status.ready { "ready" } else { "not ready" })?;
        }
        return Ok(if status.ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if args.json {
        out.write_all(body.as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    match &args.command {
        Command::Dump {
            cache: Cache::External,
        } => print_external(&mut out, &control::parse_external(&body)?)?,
        Command::Dump { .. } => print_flows(&mut out, &control::parse_flows(&body)?)?,
        Command::Status => print_status(&mut out, &control::parse_status(&body)?)?,
        _ => print_value(&mut out, &body)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn cache_name(c: Cache) -> CacheName {
    match c {
        Cache::Internal => CacheName::Internal,
        Cache::External => CacheName::External,
    }
}

/// Prints a JSON answer as indented `key: value` lines.
fn print_value(out: &mut impl Write, body: &str) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(body)?;
    print_tree(out, &v, 0)?;
    Ok(())
}

fn print_tree(out: &mut impl Write, v: &serde_json::Value, depth: usize) -> std::io::Result<()> {
    let pad = "  ".repeat(depth);
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if v.is_object() || v.is_array() {
                    writeln!(out, "{pad}{k}:")?;
                    print_tree(out, v, depth + 1)?;
                } else {
                    writeln!(out, "{pad}{k}: {v}")?;
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                writeln!(out, "{pad}- [{i}]")?;
                print_tree(out, v, depth + 1)?;
            }
        }
        other => writeln!(out, "{pad}{other}")?,
    }
    Ok(())
}

fn pki(action: &PkiAction) -> anyhow::Result<ExitCode> {
    match action {
        PkiAction::Init { dir, cluster } => {
            let ca = ctsync::pki::init_ca(dir, cluster)?;
            println!(
                "created cluster CA {} (key next to it, mode 0600)",
                ca.display()
            );
        }
        PkiAction::Issue { dir, node } => {
            let (cert, key) = ctsync::pki::issue(dir, node)?;
            println!(
                "issued {} and {} (mode 0600)",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn socket_path(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &args.config {
        let cfg = ctsync::config::Config::load(c).context("cannot read the daemon config")?;
        return Ok(cfg.control.socket);
    }
    Ok(PathBuf::from(ctsync::config::DEFAULT_SOCKET))
}

fn print_status(out: &mut impl Write, s: &StatusReport) -> std::io::Result<()> {
    let k = &s.kernel;
    let sync = if k.synced {
        "synced"
    } else if k.dump_running {
        "reconciling (dump running)"
    } else {
        "NOT synced"
    };
    writeln!(
        out,
        "node          {} (ctsyncd {}, pid {})",
        s.node_id, s.version, s.pid
    )?;
    writeln!(out, "uptime        {:.0} s", s.uptime_secs)?;
    writeln!(out, "kernel        {sync}, {} flows mirrored", k.flows)?;
    if let Some(ms) = k.last_dump_ms {
        writeln!(out, "last dump     {ms:.1} ms")?;
    }
    writeln!(out, "event buffer  {} KiB", k.event_buffer_bytes / 1024)?;
    let st = &k.stats;
    writeln!(
        out,
        "events        {} (new {}, update {}, destroy {}, own {})",
        st.events, st.events_new, st.events_update, st.events_destroy, st.events_own
    )?;
    writeln!(
        out,
        "own creations {} (applied as written, their events dropped in the kernel; \
         {} promotions with creation events muted)",
        st.own_creations, st.creations_muted
    )?;
    writeln!(
        out,
        "overruns      {} (resyncs {}, flows repaired {}, undecodable {})",
        st.overruns, st.resyncs, st.resync_repairs, st.undecodable
    )?;
    let c = &s.internal_cache;
    writeln!(
        out,
        "internal      {} flows, {} KiB, {} changes to replicate",
        c.flows,
        c.heap_bytes / 1024,
        c.changes
    )?;
    writeln!(out, "ready         {}", if s.ready { "yes" } else { "NO" })?;
    let fo = &s.failover;
    writeln!(
        out,
        "role          {:?}, commit mode {:?}, {} commits, {} injected, {} purged{}",
        fo.role,
        fo.commit_mode,
        fo.commits,
        fo.injected,
        fo.purged,
        fo.purge_in_secs
            .map(|t| format!(", purge in {t:.0} s"))
            .unwrap_or_default()
    )?;
    if let Some(c) = &fo.last_commit {
        writeln!(
            out,
            "last commit   {} flows in {:.1} ms ({} created, {} updated, {} failed)",
            c.flows, c.ms, c.created, c.updated, c.failed
        )?;
    }
    let Some(sync) = &s.sync else {
        return writeln!(out, "sync          not configured");
    };
    writeln!(
        out,
        "sync          cluster {}, epoch {:016x}, listen {}, {}",
        sync.cluster, sync.epoch, sync.listen, sync.security
    )?;
    writeln!(
        out,
        "external      {} flows from peers",
        sync.external_flows
    )?;
    writeln!(
        out,
        "\n{:<16} {:<10} {:<16} {:>10} {:>10} {:>8} {:>7} {:>9}",
        "PEER", "STATE", "EPOCH", "ACKED", "LAG", "LAG(s)", "SYNCED", "FLOWS"
    )?;
    for p in &sync.peers {
        writeln!(
            out,
            "{:<16} {:<10} {:<16x} {:>10} {:>10} {:>8.2} {:>7} {:>9}",
            p.node_id,
            p.state,
            p.epoch,
            p.acked_seq,
            p.lag_changes,
            p.lag_secs,
            if p.synced { "yes" } else { "no" },
            p.external_flows
        )?;
    }
    Ok(())
}

fn print_external(out: &mut impl Write, entries: &[control::ExternalEntry]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<12} {:<7} {:<12} {:>7}  {:<58} {:<58}",
        "ORIGIN", "PROTO", "STATE", "TIMEOUT", "ORIGINAL", "REPLY"
    )?;
    for e in entries {
        let f = &e.flow;
        writeln!(
            out,
            "{:<12} {:<7} {:<12} {:>7}  {:<58} {:<58}",
            e.origin,
            flow::proto_name(f.key.orig.proto),
            state(&f.protoinfo()),
            e.remaining_timeout,
            endpoints(&f.key.orig),
            endpoints(&f.reply)
        )?;
    }
    writeln!(out, "{} flows", entries.len())
}

fn print_flows(out: &mut impl Write, flows: &[Flow]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<7} {:<12} {:>7}  {:<58} {:<58} {:>5} {:>10}  FLAGS",
        "PROTO", "STATE", "TIMEOUT", "ORIGINAL", "REPLY", "ZONE", "MARK"
    )?;
    for f in flows {
        writeln!(
            out,
            "{:<7} {:<12} {:>7}  {:<58} {:<58} {:>5} {:>10}  {}",
            flow::proto_name(f.key.orig.proto),
            state(&f.protoinfo()),
            f.timeout,
            endpoints(&f.key.orig),
            endpoints(&f.reply),
            zone(f),
            f.mark,
            flags(f.status)
        )?;
    }
    writeln!(out, "{} flows", flows.len())
}

fn state(p: &ProtoInfo) -> String {
    let s = p.state_name();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

fn endpoints(t: &flow::Tuple) -> String {
    match t.l4 {
        flow::L4::Ports { src, dst } => format!("{} -> {}", sock(t.src, src), sock(t.dst, dst)),
        flow::L4::Icmp { id, kind, code } => {
            format!("{} -> {} t{kind}/c{code} id {id}", t.src, t.dst)
        }
        flow::L4::None => format!("{} -> {}", t.src, t.dst),
    }
}

fn sock(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn zone(f: &Flow) -> String {
    let z = f.key.zone;
    match z.dir {
        flow::ZoneDir::Both => z.id.to_string(),
        flow::ZoneDir::Original => format!("{}o", z.id),
        flow::ZoneDir::Reply => format!("{}r", z.id),
    }
}

fn flags(status: u32) -> String {
    let shown = [
        flow::status::ASSURED,
        flow::status::SEEN_REPLY,
        flow::status::SRC_NAT,
        flow::status::DST_NAT,
        flow::status::EXPECTED,
        flow::status::HELPER,
        flow::status::OFFLOAD,
    ];
    flow::status::NAMES
        .iter()
        .filter(|(bit, _)| shown.contains(bit) && status & bit != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}
