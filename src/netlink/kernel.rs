//! Kernel operations on the conntrack table: full dump, event intake and batched writes.

use super::attr;
use super::codec::{self, CodecError, CtMessage, WriteOp};
use super::socket::{CtSocket, SocketError};
use crate::flow::{Flow, FlowKey};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Errors of kernel operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The socket layer failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// A receive failed.
    #[error("netlink receive: {0}")]
    Recv(#[source] io::Error),
    /// The kernel refused a request as a whole.
    #[error("kernel refused {what}: {source}")]
    Refused {
        /// The request.
        what: &'static str,
        /// The errno, as an OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel sent something that cannot be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Size of a receive buffer able to hold the largest datagram the kernel sends us.
const RECV_BUF: usize = 256 * 1024;

/// The number of conntrack entries in the socket's namespace, confirmed or not.
///
/// One small request, where a dump walks every bucket of the kernel's hash table, which is
/// shared by all namespaces (262,144 buckets on a machine with a few GiB: ~8 ms for an empty
/// table). A count of zero means a dump would find nothing.
pub fn count(sock: &CtSocket) -> Result<u32, KernelError> {
    let mut req = Vec::with_capacity(32);
    let seq = 2;
    codec::encode_count_request(&mut req, seq);
    sock.send(&req)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).map_err(KernelError::Recv)?;
        for msg in codec::messages(&buf[..n]) {
            let msg = msg?;
            match msg.msg_type {
                attr::MSG_CT_GET_STATS if msg.seq == seq => return Ok(codec::decode_count(&msg)?),
                attr::NLMSG_ERROR => refused("count", &msg)?,
                _ => {}
            }
        }
    }
}

/// An `NLMSG_ERROR` answer to `what`: an error unless it is an acknowledgement.
fn refused(what: &'static str, msg: &codec::RawMessage<'_>) -> Result<(), KernelError> {
    match codec::decode_error(msg)? {
        (0, _) => Ok(()),
        (errno, _) => Err(KernelError::Refused {
            what,
            source: io::Error::from_raw_os_error(-errno),
        }),
    }
}

/// Receives the whole table (both families), calling `on_flow` for every entry.
///
/// Returns how many entries could not be decoded; they are skipped rather than aborting the dump
/// so that one odd entry does not block a reconciliation, and the count is surfaced in stats.
pub fn dump(sock: &CtSocket, mut on_flow: impl FnMut(CtMessage)) -> Result<u64, KernelError> {
    let mut req = Vec::with_capacity(64);
    let seq = 1;
    codec::encode_dump_request(&mut req, seq);
    sock.send(&req)?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut undecodable = 0;
    loop {
        let n = sock.recv(&mut buf).map_err(KernelError::Recv)?;
        for msg in codec::messages(&buf[..n]) {
            let msg = msg?;
            match msg.msg_type {
                attr::NLMSG_DONE => return Ok(undecodable),
                attr::NLMSG_ERROR => refused("dump", &msg)?,
                _ => match codec::decode_conntrack(&msg) {
                    Ok(ct) => on_flow(ct),
                    Err(e) => {
                        undecodable += 1;
                        tracing::warn!(error = %e, "skipping undecodable dump entry");
                    }
                },
            }
        }
    }
}

/// Port ids of the sockets ctsync writes to the kernel with.
///
/// The kernel stamps events with the port id of the socket whose request caused them; events
/// carrying one of these ids are our own writes (a commit, an injection) and must never be sent
/// back to peers as if they were local traffic.
#[derive(Debug, Clone, Default)]
pub struct Origins(Arc<Vec<AtomicU32>>);

impl Origins {
    const CAPACITY: usize = 64;

    /// An empty registry.
    pub fn new() -> Origins {
        Origins(Arc::new(
            (0..Self::CAPACITY).map(|_| AtomicU32::new(0)).collect(),
        ))
    }

    /// Records a port id as ours. Silently full after 64 sockets, far beyond what ctsync opens.
    pub fn register(&self, portid: u32) {
        for slot in self.0.iter() {
            if slot
                .compare_exchange(0, portid, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
        tracing::error!(portid, "origin registry full; own writes may be echoed");
    }

    /// Whether an event with this `nlmsg_pid` was caused by one of our sockets.
    pub fn is_ours(&self, portid: u32) -> bool {
        portid != 0 && self.0.iter().any(|s| s.load(Ordering::Acquire) == portid)
    }
}

/// One item of the event stream.
#[derive(Debug, Clone)]
pub enum KernelEvent {
    /// A NEW, UPDATE or DESTROY event.
    Flow {
        /// The decoded message.
        msg: CtMessage,
        /// Whether one of our own writing sockets caused it.
        own: bool,
    },
    /// The kernel dropped events (`ENOBUFS`): the mirror must be reconciled with a dump.
    Overrun,
    /// An event that could not be decoded: also a divergence, reconciled like an overrun.
    Undecodable(CodecError),
}

/// Decodes the events of one datagram, telling ours (by sending socket) from the rest.
fn decode_datagram(origins: &Origins, datagram: &[u8], out: &mut Vec<KernelEvent>) {
    for msg in codec::messages(datagram) {
        let item = msg.and_then(|m| {
            let own = origins.is_ours(m.portid);
            codec::decode_event(&m).map(|msg| KernelEvent::Flow { msg, own })
        });
        out.push(item.unwrap_or_else(KernelEvent::Undecodable));
    }
}

/// A classic BPF program for an event socket that drops the creation events (`CT_NEW` with
/// `NLM_F_CREATE`, as the kernel sends a new entry; updates carry no flag) whose `nlmsg_pid` is
/// one of `portids`, and keeps everything else whole.
///
/// Absolute loads read the `nlmsghdr` at the start of the datagram (an event datagram holds one
/// message) in network byte order, while netlink headers are in host order: constants are
/// swapped to match, and the flags' high byte is tested directly.
fn own_creation_filter(portids: &[u32]) -> Vec<libc::sock_filter> {
    const LD_H: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LD_B: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LD_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let be16 = |v: u16| u32::from(u16::from_be_bytes(v.to_ne_bytes()));
    let be32 = |v: u32| u32::from_be_bytes(v.to_ne_bytes());
    // NLM_F_CREATE (0x400) as the byte at offset 7 holds it on a little-endian host, or at
    // offset 6 on a big-endian one.
    let (flags_at, create_bit) = if cfg!(target_endian = "little") {
        (7, 0x04)
    } else {
        (6, 0x04)
    };
    let n = portids.len();
    // Jump offsets count the instructions skipped; "keep" is the last-but-one instruction.
    let keep_from = |i: usize| u8::try_from(i).unwrap_or(u8::MAX);
    let mut prog = vec![
        op(LD_H, 0, 0, 4),
        op(JEQ, 0, keep_from(n + 3), be16(attr::MSG_CT_NEW)),
        op(LD_B, 0, 0, flags_at),
        op(JSET, 0, keep_from(n + 1), create_bit),
        op(LD_W, 0, 0, 12),
    ];
    for (i, &pid) in portids.iter().enumerate() {
        // Match: jump over the remaining comparisons and "keep" to "drop".
        prog.push(op(JEQ, keep_from(n - i), 0, be32(pid)));
    }
    prog.push(op(RET, 0, 0, u32::MAX));
    prog.push(op(RET, 0, 0, 0));
    prog
}

/// The event subscription: NEW, UPDATE and DESTROY groups on one socket.
#[derive(Debug)]
pub struct EventSource {
    sock: CtSocket,
    buf: Vec<u8>,
    /// [`MMSG_SLOTS`] slots of [`MMSG_SLOT`] bytes for `recvmmsg`.
    mbuf: Vec<u8>,
    origins: Origins,
}

/// Turns the event socket's subscription to creation events (`NFNLGRP_CONNTRACK_NEW`) off and
/// on again.
///
/// The kernel builds a creation event for every entry a commit writes, and skips that work only
/// when no socket on the machine is subscribed to the group (the listener check is per protocol,
/// not per namespace). A promotion re-reads the whole table after its commit anyway, and that
/// finds every creation made while the subscription was off; where ctsyncd is the only listener,
/// muting for the commit saves the kernel one event built and freed per committed flow
/// (`ctsync-bench`: a 250k commit written 1.26× as fast).
///
/// Leaving a group the socket is not in would still lower the namespace's count of ctnetlink
/// listeners, and at zero the kernel stops giving new entries the extension that events need:
/// the switch therefore only acts when the state changes.
#[derive(Debug)]
pub struct CreationSwitch {
    sock: CtSocket,
    muted: AtomicBool,
}

impl CreationSwitch {
    /// Stops receiving creation events (updates and deletions still come); whether it was on.
    pub fn mute(&self) -> Result<bool, KernelError> {
        if self.muted.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.sock.leave(attr::GROUP_NEW)?;
        self.muted.store(true, Ordering::Release);
        Ok(true)
    }

    /// Receives creation events again; whether they were muted.
    pub fn unmute(&self) -> Result<bool, KernelError> {
        if !self.muted.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.sock.join(attr::GROUP_NEW)?;
        self.muted.store(false, Ordering::Release);
        Ok(true)
    }
}

/// How long a read waits for an event before returning empty, so that the reading thread can
/// see that the daemon stops. Nothing else depends on it, and each expiry wakes an idle daemon.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// Datagrams taken per `recvmmsg` once the first of a batch is in: one system call instead of
/// one per event (each event is a datagram of its own). The paced event thread finds a few
/// hundred queued in a burst: 32 a call took ~10k calls to read 250k creations.
const MMSG_SLOTS: usize = 128;
/// Room per datagram for `recvmmsg`: an event is one message of well under 1 KiB (every
/// attribute the kernel can report, IPv6 and a master tuple included, is about 700 bytes).
/// A larger one is reported as undecodable (and repaired by a dump), never read in part.
const MMSG_SLOT: usize = 4096;

impl EventSource {
    /// Subscribes in the calling thread's namespace with the given receive buffer size.
    ///
    /// Returns the source and the buffer size the kernel granted.
    pub fn open(recv_buffer: usize, origins: Origins) -> Result<(EventSource, usize), KernelError> {
        let sock = CtSocket::open()?;
        let granted = sock.set_recv_buffer(recv_buffer)?;
        for g in [attr::GROUP_NEW, attr::GROUP_UPDATE, attr::GROUP_DESTROY] {
            sock.join(g)?;
        }
        sock.set_recv_timeout(IDLE_WAKE)?;
        let src = EventSource {
            sock,
            buf: vec![0u8; RECV_BUF],
            mbuf: vec![0u8; MMSG_SLOTS * MMSG_SLOT],
            origins,
        };
        Ok((src, granted))
    }

    /// Has the kernel drop, before they reach this socket, the creation events caused by the
    /// sockets `portids` (the writer's quiet sockets, see [`Writer::quiet_portids`]). Their
    /// flows are applied to the mirror when written ([`crate::cache::Mirror::own_creations`]),
    /// so reading the events back would only cost a copy, a wake-up and a decode per flow: a
    /// third of a commit's CPU. Every other event, ours included, still comes through.
    pub fn hide_own_creations(&self, portids: &[u32]) -> Result<(), KernelError> {
        if portids.is_empty() {
            return Ok(());
        }
        self.sock.attach_filter(&own_creation_filter(portids))?;
        Ok(())
    }

    /// A switch for this socket's creation events, usable from another thread.
    pub fn creation_switch(&self) -> Result<CreationSwitch, KernelError> {
        Ok(CreationSwitch {
            sock: self.sock.try_clone()?,
            muted: AtomicBool::new(false),
        })
    }

    /// Receives at least one event (or returns after the receive timeout with none), then takes
    /// whatever else is already queued, up to `max` items, without blocking again.
    pub fn next_batch(
        &mut self,
        out: &mut Vec<KernelEvent>,
        max: usize,
    ) -> Result<(), KernelError> {
        let mut blocking = true;
        while out.len() < max {
            let received = if blocking {
                self.recv(0)
                    .map(|n| decode_datagram(&self.origins, &self.buf[..n], out))
            } else {
                self.recv_many(out, max)
            };
            match received {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.drain_after_overrun();
                    out.push(KernelEvent::Overrun)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(KernelError::Recv(e)),
            }
            blocking = false;
        }
        Ok(())
    }

    /// Takes up to [`MMSG_SLOTS`] queued datagrams with one `recvmmsg`, without blocking.
    fn recv_many(&mut self, out: &mut Vec<KernelEvent>, max: usize) -> io::Result<()> {
        let want = MMSG_SLOTS.min(max.saturating_sub(out.len())).max(1);
        // SAFETY: all-zero iovec and mmsghdr values are valid (null pointers, zero lengths).
        let mut iovs: [libc::iovec; MMSG_SLOTS] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; MMSG_SLOTS] = unsafe { std::mem::zeroed() };
        for (i, (iov, hdr)) in iovs.iter_mut().zip(hdrs.iter_mut()).take(want).enumerate() {
            iov.iov_base = self.mbuf[i * MMSG_SLOT..].as_mut_ptr().cast();
            iov.iov_len = MMSG_SLOT;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdrs[..want]` point to `want` distinct MMSG_SLOT-byte slots of `self.mbuf`,
        // which outlives the call; no address or control buffers are passed.
        let n = unsafe {
            libc::recvmmsg(
                self.sock_fd(),
                hdrs.as_mut_ptr(),
                want as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (i, hdr) in hdrs.iter().take(n as usize).enumerate() {
            if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                out.push(KernelEvent::Undecodable(codec::CodecError::Framing(
                    format!("event datagram larger than {MMSG_SLOT} bytes"),
                )));
                continue;
            }
            let len = (hdr.msg_len as usize).min(MMSG_SLOT);
            let slot = &self.mbuf[i * MMSG_SLOT..i * MMSG_SLOT + len];
            decode_datagram(&self.origins, slot, out);
        }
        Ok(())
    }

    /// After `ENOBUFS`, discards everything still queued.
    ///
    /// The kernel reports the overrun *before* the events queued ahead of the loss, and stays
    /// silent about further losses until the queue has been emptied once. Those queued events
    /// are older than the repair dump that follows, so replaying them on top of it would bring
    /// back flows whose deletion was lost; emptying the queue also re-arms the kernel's overrun
    /// report, so that no later loss goes unnoticed.
    fn drain_after_overrun(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut drained = 0u64;
        loop {
            match self.recv(libc::MSG_DONTWAIT) {
                Ok(_) => drained += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(drained, "event queue still not empty after 2 s of draining");
                break;
            }
        }
        tracing::debug!(drained, "event queue drained after overrun");
    }

    fn recv(&mut self, flags: i32) -> io::Result<usize> {
        if flags == 0 {
            return self.sock.recv(&mut self.buf);
        }
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.sock_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                flags,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn sock_fd(&self) -> i32 {
        self.sock.raw_fd()
    }
}

/// One flow the kernel did not accept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteFailure {
    /// Which flow.
    pub key: FlowKey,
    /// The last operation tried.
    pub op: String,
    /// The kernel's errno.
    pub errno: i32,
    /// `strerror` of it.
    pub error: String,
}

/// What a batched write did, flow by flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteReport {
    /// Entries created.
    pub created: u64,
    /// Existing entries updated in place.
    pub updated: u64,
    /// Existing entries deleted and re-created because an in-place update was refused.
    pub replaced: u64,
    /// Entries deleted.
    pub deleted: u64,
    /// Deletes of entries that were already gone.
    pub absent: u64,
    /// Every flow that could not be written, with the reason.
    pub failures: Vec<WriteFailure>,
}

impl WriteReport {
    fn fail(&mut self, flow: &Flow, op: WriteOp, errno: i32) {
        self.failures.push(WriteFailure {
            key: flow.key,
            op: op_name(op).to_string(),
            errno,
            error: io::Error::from_raw_os_error(errno).to_string(),
        });
    }

    fn merge(&mut self, other: WriteReport) {
        self.created += other.created;
        self.updated += other.updated;
        self.replaced += other.replaced;
        self.deleted += other.deleted;
        self.absent += other.absent;
        self.failures.extend(other.failures);
    }
}

fn op_name(op: WriteOp) -> &'static str {
    match op {
        WriteOp::Create => "create",
        WriteOp::Update | WriteOp::UpdateWithoutLabels => "update",
        WriteOp::Delete => "delete",
    }
}

/// Batched writer: many requests per system call, every per-flow error reported.
///
/// Several lanes let several threads work at once. The kernel serialises ctnetlink requests
/// on one mutex, so a second lane does not make the kernel faster, and mostly spins on it.
///
/// Each lane has two sockets. The *quiet* one only makes first attempts at creating flows the
/// caller knows to be new to the kernel ([`Writer::upsert_fresh`]); the event socket can have
/// their creation events dropped in the kernel ([`EventSource::hide_own_creations`]) because
/// the caller applies those flows itself. Everything else (updates, replacements, deletions,
/// creations of flows the caller is unsure of) goes through the other socket, whose events come
/// back in order with everything else the kernel reports.
#[derive(Debug)]
pub struct Writer {
    lanes: Vec<Lane>,
}

#[derive(Debug)]
struct Lane {
    sock: CtSocket,
    quiet: CtSocket,
    seq: u32,
    out: Vec<u8>,
    rbuf: Vec<u8>,
}

/// Bytes of requests per datagram: large enough to amortise the system call, small enough
/// that the error reports of a fully failing batch fit in the receive buffer.
const BATCH_BYTES: usize = 128 * 1024;

impl Writer {
    /// Opens `sockets` writing sockets (at least one) and registers them as our origins.
    pub fn open(sockets: usize, origins: &Origins) -> Result<Writer, KernelError> {
        let lanes = (0..sockets.max(1))
            .map(|_| {
                let open = || -> Result<CtSocket, KernelError> {
                    let sock = CtSocket::open()?;
                    sock.set_send_buffer(4 * BATCH_BYTES)?;
                    sock.set_recv_buffer(32 << 20)?;
                    origins.register(sock.portid());
                    Ok(sock)
                };
                Ok(Lane {
                    sock: open()?,
                    quiet: open()?,
                    seq: 0,
                    out: Vec::with_capacity(BATCH_BYTES + 4096),
                    rbuf: vec![0u8; RECV_BUF],
                })
            })
            .collect::<Result<Vec<_>, KernelError>>()?;
        Ok(Writer { lanes })
    }

    /// Port ids of the quiet sockets: see [`EventSource::hide_own_creations`].
    pub fn quiet_portids(&self) -> Vec<u32> {
        self.lanes.iter().map(|l| l.quiet.portid()).collect()
    }

    /// Port ids of the writing sockets, quiet ones included.
    pub fn portids(&self) -> Vec<u32> {
        self.lanes
            .iter()
            .flat_map(|l| [l.sock.portid(), l.quiet.portid()])
            .collect()
    }

    /// Creates every flow, or brings an existing entry to the flow's state.
    ///
    /// Flows without a master go first, so that related flows find their master entry.
    pub fn upsert(&mut self, flows: &[Flow]) -> Result<WriteReport, KernelError> {
        self.upsert_fresh(&[], flows)
    }

    /// [`Writer::upsert`] of `fresh` and `known` flows, where the first creation attempt of a
    /// `fresh` flow (one the caller believes absent from the kernel and has applied to its
    /// mirror itself) goes through the quiet socket. Masters of both go before related flows.
    pub fn upsert_fresh(
        &mut self,
        fresh: &[Flow],
        known: &[Flow],
    ) -> Result<WriteReport, KernelError> {
        let (fresh_masters, fresh_related) = masters_first(fresh);
        let (known_masters, known_related) = masters_first(known);
        let mut report = WriteReport::default();
        for (flows, work) in [
            (&fresh_masters, Lane::upsert_quiet as LaneWork),
            (&known_masters, Lane::upsert),
            (&fresh_related, Lane::upsert_quiet),
            (&known_related, Lane::upsert),
        ] {
            report.merge(self.parallel(flows, work)?);
        }
        Ok(report)
    }

    /// Deletes every flow; entries already gone are counted as `absent`, not as failures.
    pub fn delete(&mut self, flows: &[Flow]) -> Result<WriteReport, KernelError> {
        let refs: Vec<&Flow> = flows.iter().collect();
        self.parallel(&refs, Lane::delete)
    }

    fn parallel(&mut self, flows: &[&Flow], work: LaneWork) -> Result<WriteReport, KernelError> {
        if flows.is_empty() {
            return Ok(WriteReport::default());
        }
        let per_lane = flows.len().div_ceil(self.lanes.len());
        if self.lanes.len() == 1 || flows.len() < 4096 {
            return work(&mut self.lanes[0], flows);
        }
        let results: Vec<Result<WriteReport, KernelError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .lanes
                .iter_mut()
                .zip(flows.chunks(per_lane))
                .map(|(lane, part)| s.spawn(move || work(lane, part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut report = WriteReport::default();
        for r in results {
            report.merge(r?);
        }
        Ok(report)
    }
}

/// Flows without a master, then the related ones: a related flow needs its master's entry.
fn masters_first(flows: &[Flow]) -> (Vec<&Flow>, Vec<&Flow>) {
    flows.iter().partition(|f| f.master().is_none())
}

/// One kind of work a lane does on its share of the flows.
type LaneWork = fn(&mut Lane, &[&Flow]) -> Result<WriteReport, KernelError>;

impl Lane {
    fn upsert(&mut self, flows: &[&Flow]) -> Result<WriteReport, KernelError> {
        self.upsert_via(false, flows)
    }

    fn upsert_quiet(&mut self, flows: &[&Flow]) -> Result<WriteReport, KernelError> {
        self.upsert_via(true, flows)
    }

    /// Creates, or updates what exists; only the first creation attempt may be `quiet`.
    fn upsert_via(&mut self, quiet: bool, flows: &[&Flow]) -> Result<WriteReport, KernelError> {
        let mut report = WriteReport::default();
        let mut existing = Vec::new();
        for (i, errno) in self.run_via(quiet, WriteOp::Create, flows)? {
            match errno {
                0 => report.created += 1,
                e if e == libc::EEXIST => existing.push(flows[i]),
                e => report.fail(flows[i], WriteOp::Create, e),
            }
        }
        let mut refused = Vec::new();
        let mut unlabelled = Vec::new();
        for (i, errno) in self.run(WriteOp::Update, &existing)? {
            match errno {
                0 => report.updated += 1,
                // No label storage on this entry: its labels are zero, as wanted.
                e if e == libc::ENOSPC && existing[i].labels() == 0 => unlabelled.push(existing[i]),
                _ => refused.push(existing[i]),
            }
        }
        for (i, errno) in self.run(WriteOp::UpdateWithoutLabels, &unlabelled)? {
            match errno {
                0 => report.updated += 1,
                _ => refused.push(unlabelled[i]),
            }
        }
        // An update can be refused (status bits that only the kernel may change, or the entry
        // vanished meanwhile): replace the entry so the kernel ends up with exactly our flow.
        self.run(WriteOp::Delete, &refused)?;
        for (i, errno) in self.run(WriteOp::Create, &refused)? {
            match errno {
                0 => report.replaced += 1,
                e => report.fail(refused[i], WriteOp::Create, e),
            }
        }
        Ok(report)
    }

    fn delete(&mut self, flows: &[&Flow]) -> Result<WriteReport, KernelError> {
        let mut report = WriteReport::default();
        for (i, errno) in self.run(WriteOp::Delete, flows)? {
            match errno {
                0 => report.deleted += 1,
                e if e == libc::ENOENT => report.absent += 1,
                e => report.fail(flows[i], WriteOp::Delete, e),
            }
        }
        Ok(report)
    }

    fn run(&mut self, op: WriteOp, flows: &[&Flow]) -> Result<Vec<(usize, i32)>, KernelError> {
        self.run_via(false, op, flows)
    }

    /// Sends `op` for every flow in batches, through the quiet socket or the other one;
    /// returns (index, errno) for each, 0 meaning success.
    fn run_via(
        &mut self,
        quiet: bool,
        op: WriteOp,
        flows: &[&Flow],
    ) -> Result<Vec<(usize, i32)>, KernelError> {
        // A fresh sequence space per run: reports can never be matched to an earlier run.
        self.seq = self.seq.wrapping_add(1 << 24);
        let mut results = Vec::with_capacity(flows.len());
        let mut start = 0;
        while start < flows.len() {
            let end = self.fill(op, flows, start);
            match self.send_and_collect(quiet, start, end) {
                Ok(errors) => {
                    let mut errors = errors.into_iter().peekable();
                    for i in start..end {
                        let errno = match errors.peek() {
                            Some(&(j, e)) if j == i => {
                                errors.next();
                                e
                            }
                            _ => 0,
                        };
                        results.push((i, errno));
                    }
                    start = end;
                }
                // Error reports were lost: every operation is idempotent once retried through
                // `upsert`/`delete`, so redo the batch in single requests with an ACK each.
                Err(KernelError::Recv(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    for (i, flow) in flows.iter().enumerate().take(end).skip(start) {
                        results.push((i, self.single(quiet, op, flow, i)?));
                    }
                    start = end;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(results)
    }

    /// Encodes requests from `start` until the batch is full; returns the end index.
    fn fill(&mut self, op: WriteOp, flows: &[&Flow], start: usize) -> usize {
        self.out.clear();
        let mut end = start;
        while end < flows.len() && self.out.len() < BATCH_BYTES {
            let last = end + 1 == flows.len() || self.out.len() + 1024 >= BATCH_BYTES;
            let seq = self.seq_of(end);
            codec::encode_write(&mut self.out, op, flows[end], seq, last);
            end += 1;
        }
        end
    }

    fn seq_of(&self, index: usize) -> u32 {
        self.seq.wrapping_add(index as u32)
    }

    /// Sends the encoded batch; the last request carries an ACK, whose arrival proves that every
    /// earlier error report has been queued (the kernel handles a datagram in order).
    fn send_and_collect(
        &mut self,
        quiet: bool,
        start: usize,
        end: usize,
    ) -> Result<Vec<(usize, i32)>, KernelError> {
        let sock = if quiet { &self.quiet } else { &self.sock };
        sock.send(&self.out)?;
        let last_seq = self.seq_of(end - 1);
        let mut errors = Vec::new();
        loop {
            let n = sock.recv(&mut self.rbuf).map_err(KernelError::Recv)?;
            for msg in codec::messages(&self.rbuf[..n]) {
                let msg = msg?;
                if msg.msg_type != attr::NLMSG_ERROR {
                    continue;
                }
                let (errno, seq) = codec::decode_error(&msg)?;
                let index = seq.wrapping_sub(self.seq) as usize;
                if (start..end).contains(&index) && errno != 0 {
                    errors.push((index, -errno));
                }
                if seq == last_seq {
                    errors.sort_unstable();
                    return Ok(errors);
                }
            }
        }
    }

    fn single(
        &mut self,
        quiet: bool,
        op: WriteOp,
        flow: &Flow,
        index: usize,
    ) -> Result<i32, KernelError> {
        self.out.clear();
        let seq = self.seq_of(index);
        codec::encode_write(&mut self.out, op, flow, seq, true);
        let errors = self.send_and_collect(quiet, index, index + 1)?;
        Ok(errors.first().map_or(0, |&(_, e)| e))
    }
}
