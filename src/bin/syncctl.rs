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
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Cache {
    /// The mirror of this node's kernel table.
    Internal,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("syncctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args)?;
    let timeout = Duration::from_secs(args.timeout);
    let req = match args.command {
        Command::Status => Request::Status,
        Command::Dump {
            cache: Cache::Internal,
        } => Request::Dump {
            cache: CacheName::Internal,
        },
    };
    let body = control::request(&socket, &req, timeout)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        out.write_all(body.as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    match req {
        Request::Status => print_status(&mut out, &control::parse_status(&body)?)?,
        Request::Dump { .. } => print_flows(&mut out, &control::parse_flows(&body)?)?,
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
    )
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
            state(&f.protoinfo),
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
