//! The `conntrack` CLI (conntrack-tools, libnetfilter_conntrack) as an oracle independent of
//! ctsync's codec: it counts the table and lists every entry in its own text format, which is
//! parsed here and checked against flows decoded by ctsync.

use super::netns::Netns;
use super::run_ok;
use ctsync::flow::{proto, status, Flow, FlowKey, ProtoInfo, Tuple, Zone, ZoneDir, L4};
use std::collections::HashMap;
use std::fmt::Write;
use std::net::IpAddr;

/// `conntrack -C` in the namespace: the kernel's entry count.
pub fn count(ns: &Netns) -> usize {
    let out = run_ok(ns.command("conntrack").arg("-C"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("conntrack -C printed {text:?}"))
}

/// One line of `conntrack -L -o extended`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliEntry {
    /// Remaining seconds.
    pub timeout: u32,
    /// TCP state name, when printed.
    pub state: Option<String>,
    /// Original tuple.
    pub orig: Tuple,
    /// Reply tuple.
    pub reply: Tuple,
    /// Zone (from `zone=`, `zone-orig=` or `zone-reply=`).
    pub zone: Zone,
    /// `[UNREPLIED]` was printed.
    pub unreplied: bool,
    /// `[ASSURED]` was printed.
    pub assured: bool,
    /// `mark=`.
    pub mark: u32,
}

#[derive(Default)]
struct PartialTuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: Option<u16>,
    dport: Option<u16>,
    kind: Option<u8>,
    code: Option<u8>,
    id: Option<u16>,
}

impl PartialTuple {
    fn finish(self, proto_num: u8) -> Result<Tuple, String> {
        let src = self.src.ok_or("no src=")?;
        let dst = self.dst.ok_or("no dst=")?;
        let l4 = if proto::has_ports(proto_num) {
            L4::Ports {
                src: self.sport.ok_or("no sport=")?,
                dst: self.dport.ok_or("no dport=")?,
            }
        } else if proto::is_icmp(proto_num) {
            L4::Icmp {
                id: self.id.ok_or("no id=")?,
                kind: self.kind.ok_or("no type=")?,
                code: self.code.ok_or("no code=")?,
            }
        } else {
            L4::None
        };
        Ok(Tuple {
            src,
            dst,
            proto: proto_num,
            l4,
        })
    }
}

fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("bad {key}={v}"))
}

/// Parses one line of `conntrack -L -o extended`.
///
/// Format: `ipv4 2 tcp 6 431999 ESTABLISHED src= dst= sport= dport= [UNREPLIED] src= dst= sport=
/// dport= [ASSURED] mark=0 zone=3 use=1`; ICMP tuples have `type= code= id=`.
pub fn parse_line(line: &str) -> Result<CliEntry, String> {
    let tok: Vec<&str> = line.split_whitespace().collect();
    if tok.len() < 6 {
        return Err("too short".into());
    }
    let proto_num: u8 = num("protocol", tok[3])?;
    let timeout: u32 = num("timeout", tok[4])?;
    let mut rest = &tok[5..];
    let mut state = None;
    if let Some(first) = rest.first() {
        if !first.contains('=') && !first.starts_with('[') {
            state = Some((*first).to_string());
            rest = &rest[1..];
        }
    }
    let mut tuples: Vec<PartialTuple> = Vec::new();
    let (mut zone, mut unreplied, mut assured, mut mark) = (Zone::default(), false, false, None);
    for t in rest {
        match *t {
            "[UNREPLIED]" => unreplied = true,
            "[ASSURED]" => assured = true,
            _ => {
                let (k, v) = t
                    .split_once('=')
                    .ok_or_else(|| format!("unknown token {t}"))?;
                if k == "src" {
                    if tuples.len() == 2 {
                        return Err("more than two tuples".into());
                    }
                    tuples.push(PartialTuple::default());
                }
                let cur = tuples.last_mut();
                match (k, cur) {
                    ("src", Some(c)) => c.src = Some(num(k, v)?),
                    ("dst", Some(c)) => c.dst = Some(num(k, v)?),
                    ("sport", Some(c)) => c.sport = Some(num(k, v)?),
                    ("dport", Some(c)) => c.dport = Some(num(k, v)?),
                    ("type", Some(c)) => c.kind = Some(num(k, v)?),
                    ("code", Some(c)) => c.code = Some(num(k, v)?),
                    ("id", Some(c)) => c.id = Some(num(k, v)?),
                    ("mark", _) => mark = Some(num(k, v)?),
                    ("zone", _) => {
                        zone = Zone {
                            id: num(k, v)?,
                            dir: ZoneDir::Both,
                        }
                    }
                    ("zone-orig", _) => {
                        zone = Zone {
                            id: num(k, v)?,
                            dir: ZoneDir::Original,
                        }
                    }
                    ("zone-reply", _) => {
                        zone = Zone {
                            id: num(k, v)?,
                            dir: ZoneDir::Reply,
                        }
                    }
                    ("use", _) => {}
                    _ => return Err(format!("unexpected token {t}")),
                }
            }
        }
    }
    let mut tuples = tuples.into_iter();
    let orig = tuples
        .next()
        .ok_or("no original tuple")?
        .finish(proto_num)?;
    let reply = tuples.next().ok_or("no reply tuple")?.finish(proto_num)?;
    Ok(CliEntry {
        timeout,
        state,
        orig,
        reply,
        zone,
        unreplied,
        assured,
        mark: mark.ok_or("no mark=")?,
    })
}

/// `conntrack -L -o extended` in the namespace, every line parsed.
pub fn list(ns: &Netns) -> Vec<CliEntry> {
    let out = run_ok(ns.command("conntrack").args(["-L", "-o", "extended"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_line(l).unwrap_or_else(|e| panic!("cannot parse conntrack line {l:?}: {e}")))
        .collect()
}

/// Checks every CLI entry against the flow of the same key: tuples, zone, mark, TCP state,
/// the `SEEN_REPLY` and `ASSURED` bits and the timeout (within `slack`). Also that both hold
/// the same number of entries.
pub fn check(cli: &[CliEntry], flows: &[Flow], slack: u32) -> Result<(), String> {
    let by_key: HashMap<FlowKey, &Flow> = flows.iter().map(|f| (f.key, f)).collect();
    let mut problems = Vec::new();
    if cli.len() != flows.len() {
        problems.push(format!(
            "conntrack -L lists {} entries, ctsync {}",
            cli.len(),
            flows.len()
        ));
    }
    let mut bad = 0usize;
    for e in cli {
        let key = FlowKey {
            zone: e.zone,
            orig: e.orig,
        };
        let Some(f) = by_key.get(&key) else {
            bad += 1;
            problems.push(format!("conntrack -L has {e:?}, ctsync has no such flow"));
            continue;
        };
        let mut d = Vec::new();
        if e.reply != f.reply {
            d.push(format!("reply {} vs {}", e.reply, f.reply));
        }
        if e.mark != f.mark {
            d.push(format!("mark {} vs {}", e.mark, f.mark));
        }
        let state = match f.protoinfo() {
            ProtoInfo::Tcp(_) => Some(f.protoinfo().state_name()),
            _ => None,
        };
        if e.state != state {
            d.push(format!("state {:?} vs {state:?}", e.state));
        }
        if e.unreplied != (f.status & status::SEEN_REPLY == 0) {
            d.push(format!(
                "[UNREPLIED] {} vs status {:#x}",
                e.unreplied, f.status
            ));
        }
        if e.assured != (f.status & status::ASSURED != 0) {
            d.push(format!("[ASSURED] {} vs status {:#x}", e.assured, f.status));
        }
        if e.timeout.abs_diff(f.timeout) > slack {
            d.push(format!(
                "timeout {} vs {} (tolerance {slack})",
                e.timeout, f.timeout
            ));
        }
        if !d.is_empty() {
            bad += 1;
            problems.push(format!("{}: {}", e.orig, d.join(", ")));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut r = format!(
        "{bad} of {} conntrack -L entries disagree with ctsync",
        cli.len()
    );
    for p in problems.iter().take(10) {
        let _ = write!(r, "\n  {p}");
    }
    Err(r)
}

#[test]
fn parses_conntrack_extended_lines() {
    let tcp = parse_line(
        "ipv4     2 tcp      6 99 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1000 dport=80 \
         zone-orig=3 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=1000 [ASSURED] mark=6 use=1",
    )
    .unwrap();
    assert_eq!(tcp.state.as_deref(), Some("ESTABLISHED"));
    assert_eq!(
        tcp.zone,
        Zone {
            id: 3,
            dir: ZoneDir::Original
        }
    );
    assert_eq!(tcp.reply, tcp.orig.inverse());
    assert!(tcp.assured && !tcp.unreplied);
    assert_eq!((tcp.mark, tcp.timeout), (6, 99));
    let icmp = parse_line(
        "ipv6     10 icmpv6   58 99 src=fd00::1 dst=fd00::2 type=128 code=0 id=77 [UNREPLIED] \
         src=fd00::2 dst=fd00::1 type=129 code=0 id=77 mark=0 zone=4 use=1",
    )
    .unwrap();
    assert_eq!(icmp.reply, icmp.orig.inverse());
    assert_eq!(
        icmp.zone,
        Zone {
            id: 4,
            dir: ZoneDir::Both
        }
    );
    assert!(icmp.unreplied && icmp.state.is_none());
    assert!(parse_line("ipv4 2 tcp 6 99 src=1.2.3.4 bogus").is_err());
}
