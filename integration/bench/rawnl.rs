//! Raw netlink: the reference writer and dump, independent of ctsync's codec and sockets.

use crate::flows::FLOW_TIMEOUT;
use crate::lab::Netns;
use anyhow::{bail, Context, Result};
use ctsync::flow::{proto, status, Flow, Tuple, L4};
use ctsync::netlink::attr::{self, cta};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Bytes of requests per datagram (the same bound as ctsync's `Writer`).
pub const BATCH_BYTES: usize = 128 * 1024;
/// `NETLINK_NETFILTER`.
const NETLINK_NETFILTER: i32 = 12;
/// `NLA_F_NESTED`.
const NLA_F_NESTED: u16 = 0x8000;
/// Receive buffer for dumps and events: larger than any datagram the kernel sends.
pub const RECV_BUF: usize = 256 * 1024;

/// A plain `NETLINK_NETFILTER` socket.
pub struct RawNl {
    pub fd: OwnedFd,
}

pub fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    a.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    a
}

pub fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl RawNl {
    pub fn open() -> io::Result<RawNl> {
        // SAFETY: plain socket(2); the descriptor is owned immediately.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let sock = RawNl {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        let addr = kernel_addr(); // port id 0: the kernel assigns one
                                  // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        cvt(unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        sock.setopt(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        sock.set_recv_timeout(Duration::from_secs(10))?;
        Ok(sock)
    }

    /// A socket for batched writes: room for a whole datagram, and for its error reports.
    pub fn writer() -> io::Result<RawNl> {
        let s = RawNl::open()?;
        s.setopt(
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (4 * BATCH_BYTES) as i32,
        )?;
        s.setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20)?;
        Ok(s)
    }

    /// A socket subscribed to the conntrack NEW, UPDATE and DESTROY groups.
    pub fn listener(buffer: usize) -> io::Result<RawNl> {
        let s = RawNl::open()?;
        let half = i32::try_from(buffer / 2).unwrap_or(i32::MAX / 2);
        s.setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, half)?;
        for g in [attr::GROUP_NEW, attr::GROUP_UPDATE, attr::GROUP_DESTROY] {
            s.setopt(libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, g as i32)?;
        }
        Ok(s)
    }

    pub fn setopt(&self, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
        // SAFETY: `v` is a live c_int and its size is passed.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
    }

    pub fn set_recv_timeout(&self, d: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(d.subsec_micros() as i32),
        };
        // SAFETY: `tv` is a live timeval and its size is passed.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
    }

    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        let addr = kernel_addr();
        loop {
            // SAFETY: `buf` and `addr` are valid for reads of the sizes passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n as usize != buf.len() {
                return Err(io::Error::other(format!(
                    "short send: {n} of {}",
                    buf.len()
                )));
            }
            return Ok(());
        }
    }

    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(n as usize);
        }
    }
}

/// `recvmmsg` buffers: `batch` datagrams of up to 16 KiB per call.
struct Mmsg {
    bufs: Vec<Vec<u8>>,
    /// Kept alive: the headers point into it.
    _iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Mmsg {
    const DGRAM: usize = 16 * 1024;

    fn new(batch: usize) -> Mmsg {
        let mut bufs = vec![vec![0u8; Self::DGRAM]; batch.max(1)];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let hdrs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid value.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        Mmsg {
            bufs,
            _iovs: iovs,
            hdrs,
        }
    }

    /// One `recvmmsg` (one `recv` for a batch of 1) with `flags`; returns the conntrack
    /// messages received.
    fn recv(&mut self, sock: &RawNl, flags: libc::c_int) -> io::Result<u64> {
        let fd = sock.fd.as_raw_fd();
        let count = |b: &[u8]| {
            nlmsgs(b)
                .filter(|m| m.ty == attr::MSG_CT_NEW || m.ty == attr::MSG_CT_DELETE)
                .count() as u64
        };
        if self.bufs.len() == 1 {
            let buf = &mut self.bufs[0];
            // SAFETY: the buffer is valid for writes of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(count(&buf[..n as usize]));
        }
        // SAFETY: every header points to its own live iovec and buffer.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self
            .hdrs
            .iter()
            .zip(&self.bufs)
            .take(r as usize)
            .map(|(h, b)| count(&b[..h.msg_len as usize]))
            .sum())
    }
}

/// Reads a queued backlog until the socket is empty, counting conntrack messages without
/// decoding them: one `recv` per datagram (`batch` 1), or `recvmmsg` of `batch` datagrams.
/// Returns the messages and the overruns seen.
pub fn raw_drain(sock: &RawNl, batch: usize) -> io::Result<(u64, u64)> {
    let mut m = Mmsg::new(batch);
    let (mut msgs, mut overruns) = (0u64, 0u64);
    loop {
        match m.recv(sock, libc::MSG_DONTWAIT) {
            Ok(n) => msgs += n,
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOBUFS) => overruns += 1,
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => return Ok((msgs, overruns)),
                _ => return Err(e),
            },
        }
    }
}

/// What a [`raw_listen`] received, and the CPU its thread spent on it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Listened {
    pub msgs: u64,
    pub overruns: u64,
    pub cpu: Duration,
}

/// Receives events as cheaply as a daemon could, counting them without decoding, until
/// `target` messages are in or nothing arrives for `quiet`: blocking `recvmmsg` of 32 datagrams
/// (woken by the first), and once the queue is drained a pause of 1 ms so that the next read
/// takes many (a wake-up per event would cost the writer and the reader more than the events
/// themselves). The socket needs a receive timeout shorter than `quiet`.
pub fn raw_listen(sock: &RawNl, target: u64, quiet: Duration) -> io::Result<Listened> {
    const SLOTS: usize = 32;
    let mut m = Mmsg::new(SLOTS);
    let cpu0 = thread_cpu();
    let mut out = Listened::default();
    let mut last = Instant::now();
    while out.msgs < target && last.elapsed() < quiet {
        match m.recv(sock, libc::MSG_WAITFORONE) {
            Ok(n) => {
                out.msgs += n;
                last = Instant::now();
                if n < SLOTS as u64 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOBUFS) => out.overruns += 1,
                Some(libc::EINTR | libc::EAGAIN) => {}
                _ => return Err(e),
            },
        }
    }
    out.cpu = thread_cpu().saturating_sub(cpu0);
    Ok(out)
}

/// CPU time (user and system) of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One netlink message of a received datagram.
pub struct Nlmsg<'a> {
    pub ty: u16,
    pub payload: &'a [u8],
}

pub fn nlmsgs(buf: &[u8]) -> impl Iterator<Item = Nlmsg<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            rest = &[];
            return None;
        }
        let m = Nlmsg {
            ty: u16::from_ne_bytes([rest[4], rest[5]]),
            payload: &rest[16..len],
        };
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some(m)
    })
}

/// errno (negative, 0 for an ACK) and the sequence number an `NLMSG_ERROR` answers.
pub fn error_of(m: &Nlmsg<'_>) -> (i32, u32) {
    let p = m.payload;
    if p.len() < 20 {
        return (-libc::EPROTO, 0);
    }
    (
        i32::from_ne_bytes([p[0], p[1], p[2], p[3]]),
        u32::from_ne_bytes([p[12], p[13], p[14], p[15]]),
    )
}

pub fn pad4(buf: &mut Vec<u8>) {
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

pub fn nla(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    pad4(buf);
}

pub fn nest_begin(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    start
}

pub fn nest_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Starts a netlink message with its nfgenmsg header; returns where it starts.
pub fn msg_begin(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, NFNETLINK_V0, res_id 0.
    buf.extend_from_slice(&[family, 0, 0, 0]);
    start
}

pub fn msg_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

pub fn family_of(t: &Tuple) -> u8 {
    if t.is_ipv6() {
        libc::AF_INET6 as u8
    } else {
        libc::AF_INET as u8
    }
}

pub fn put_tuple(buf: &mut Vec<u8>, ty: u16, t: &Tuple) {
    let outer = nest_begin(buf, ty);
    let ip = nest_begin(buf, attr::tuple::IP);
    match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            nla(buf, attr::ip::V4_SRC, &s.octets());
            nla(buf, attr::ip::V4_DST, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            nla(buf, attr::ip::V6_SRC, &s.octets());
            nla(buf, attr::ip::V6_DST, &d.octets());
        }
        _ => panic!("mixed-family tuple {t}"),
    }
    nest_end(buf, ip);
    let l4 = nest_begin(buf, attr::tuple::PROTO);
    nla(buf, attr::l4::NUM, &[t.proto]);
    match t.l4 {
        L4::None => {}
        L4::Ports { src, dst } => {
            nla(buf, attr::l4::SRC_PORT, &src.to_be_bytes());
            nla(buf, attr::l4::DST_PORT, &dst.to_be_bytes());
        }
        L4::Icmp { id, kind, code } => {
            let (a_id, a_type, a_code) = if t.proto == proto::ICMPV6 {
                (
                    attr::l4::ICMPV6_ID,
                    attr::l4::ICMPV6_TYPE,
                    attr::l4::ICMPV6_CODE,
                )
            } else {
                (attr::l4::ICMP_ID, attr::l4::ICMP_TYPE, attr::l4::ICMP_CODE)
            };
            nla(buf, a_id, &id.to_be_bytes());
            nla(buf, a_type, &[kind]);
            nla(buf, a_code, &[code]);
        }
    }
    nest_end(buf, l4);
    nest_end(buf, outer);
}

/// Minimal CT_NEW: both tuples, status CONFIRMED, timeout; create-only, no ACK.
pub fn raw_create(buf: &mut Vec<u8>, f: &Flow, seq: u32) {
    let flags = attr::NLM_F_REQUEST | attr::NLM_F_CREATE | attr::NLM_F_EXCL;
    let start = msg_begin(buf, attr::MSG_CT_NEW, flags, seq, family_of(&f.key.orig));
    put_tuple(buf, cta::TUPLE_ORIG, &f.key.orig);
    put_tuple(buf, cta::TUPLE_REPLY, &f.reply);
    nla(buf, cta::STATUS, &status::CONFIRMED.to_be_bytes());
    nla(buf, cta::TIMEOUT, &FLOW_TIMEOUT.to_be_bytes());
    msg_end(buf, start);
}

/// CT_DELETE by original tuple, no ACK.
pub fn raw_delete(buf: &mut Vec<u8>, f: &Flow, seq: u32) {
    let start = msg_begin(
        buf,
        attr::MSG_CT_DELETE,
        attr::NLM_F_REQUEST,
        seq,
        family_of(&f.key.orig),
    );
    put_tuple(buf, cta::TUPLE_ORIG, &f.key.orig);
    msg_end(buf, start);
}

/// Precomputed datagrams of at most [`BATCH_BYTES`]; the last message of each asks for an ACK.
pub struct Batches {
    pub datagrams: Vec<Vec<u8>>,
    pub last_seq: Vec<u32>,
}

pub fn build_batches(flows: &[Flow], seq0: u32, encode: fn(&mut Vec<u8>, &Flow, u32)) -> Batches {
    let mut b = Batches {
        datagrams: Vec::new(),
        last_seq: Vec::new(),
    };
    let mut cur = Vec::with_capacity(BATCH_BYTES);
    let mut scratch = Vec::with_capacity(512);
    let (mut last_start, mut last_seq) = (0, 0);
    let mut close = |cur: &mut Vec<u8>, last_start: usize, last_seq: u32| {
        let flags_at = last_start + 6;
        let flags = u16::from_ne_bytes([cur[flags_at], cur[flags_at + 1]]) | attr::NLM_F_ACK;
        cur[flags_at..flags_at + 2].copy_from_slice(&flags.to_ne_bytes());
        b.datagrams
            .push(std::mem::replace(cur, Vec::with_capacity(BATCH_BYTES)));
        b.last_seq.push(last_seq);
    };
    for (i, f) in flows.iter().enumerate() {
        let seq = seq0.wrapping_add(i as u32);
        scratch.clear();
        encode(&mut scratch, f, seq);
        if !cur.is_empty() && cur.len() + scratch.len() > BATCH_BYTES {
            close(&mut cur, last_start, last_seq);
        }
        last_start = cur.len();
        last_seq = seq;
        cur.extend_from_slice(&scratch);
    }
    if !cur.is_empty() {
        close(&mut cur, last_start, last_seq);
    }
    b
}

/// Splits `flows` into `k` contiguous parts, one batch list per writing thread.
pub fn split_batches(
    flows: &[Flow],
    k: usize,
    encode: fn(&mut Vec<u8>, &Flow, u32),
) -> Vec<Batches> {
    let per = flows.len().div_ceil(k.max(1)).max(1);
    flows
        .chunks(per)
        .enumerate()
        .map(|(j, part)| build_batches(part, (j * per) as u32, encode))
        .collect()
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RawOutcome {
    pub errors: u64,
    pub first_errno: i32,
}

impl RawOutcome {
    pub fn add(&mut self, o: RawOutcome) {
        self.errors += o.errors;
        if self.first_errno == 0 {
            self.first_errno = o.first_errno;
        }
    }
}

/// Sends every datagram and waits for its final ACK, counting error reports on the way.
pub fn send_batches(sock: &RawNl, b: &Batches) -> io::Result<RawOutcome> {
    let mut rbuf = vec![0u8; 64 * 1024];
    let mut out = RawOutcome::default();
    for (dg, &last) in b.datagrams.iter().zip(&b.last_seq) {
        sock.send(dg)?;
        'ack: loop {
            let n = sock.recv(&mut rbuf)?;
            for m in nlmsgs(&rbuf[..n]) {
                if m.ty != attr::NLMSG_ERROR {
                    continue;
                }
                let (errno, seq) = error_of(&m);
                if errno != 0 {
                    out.errors += 1;
                    if out.first_errno == 0 {
                        out.first_errno = -errno;
                    }
                }
                if seq == last {
                    break 'ack;
                }
            }
        }
    }
    Ok(out)
}

#[derive(Debug)]
pub struct WriteTiming {
    pub start: Instant,
    pub end: Instant,
    pub outcome: RawOutcome,
}

impl WriteTiming {
    pub fn secs(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// One thread per socket, all released by `barrier` (which may have further parties).
pub fn raw_write(socks: &[RawNl], batches: &[Batches], barrier: &Barrier) -> Result<WriteTiming> {
    let results: Vec<io::Result<(Instant, Instant, RawOutcome)>> = std::thread::scope(|s| {
        let handles: Vec<_> = socks
            .iter()
            .zip(batches)
            .map(|(sock, b)| {
                s.spawn(move || {
                    barrier.wait();
                    let t0 = Instant::now();
                    let r = send_batches(sock, b);
                    r.map(|o| (t0, Instant::now(), o))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut timing: Option<WriteTiming> = None;
    for r in results {
        let (t0, t1, o) = r.context("raw writer")?;
        match &mut timing {
            None => {
                timing = Some(WriteTiming {
                    start: t0,
                    end: t1,
                    outcome: o,
                })
            }
            Some(t) => {
                t.start = t.start.min(t0);
                t.end = t.end.max(t1);
                t.outcome.add(o);
            }
        }
    }
    timing.context("no writer thread ran")
}

pub fn raw_writers(ns: &Netns, k: usize) -> Result<Vec<RawNl>> {
    ns.run(move || {
        (0..k)
            .map(|_| RawNl::writer())
            .collect::<io::Result<Vec<_>>>()
    })?
    .context("opening raw writer sockets")
}

/// Deletes every entry of the calling thread's namespace (CT_DELETE without a tuple).
pub fn raw_flush() -> io::Result<()> {
    let sock = RawNl::open()?;
    let mut req = Vec::with_capacity(32);
    let start = msg_begin(
        &mut req,
        attr::MSG_CT_DELETE,
        attr::NLM_F_REQUEST | attr::NLM_F_ACK,
        1,
        libc::AF_UNSPEC as u8,
    );
    msg_end(&mut req, start);
    sock.send(&req)?;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = sock.recv(&mut buf)?;
        for m in nlmsgs(&buf[..n]) {
            if m.ty == attr::NLMSG_ERROR {
                let (errno, seq) = error_of(&m);
                if seq == 1 {
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
            }
        }
    }
}

/// Dumps the table counting entries, without decoding them.
pub fn raw_dump_count(sock: &RawNl) -> Result<u64> {
    let mut req = Vec::with_capacity(32);
    let start = msg_begin(
        &mut req,
        attr::MSG_CT_GET,
        attr::NLM_F_REQUEST | attr::NLM_F_DUMP,
        1,
        libc::AF_UNSPEC as u8,
    );
    msg_end(&mut req, start);
    sock.send(&req)?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut count = 0u64;
    loop {
        let n = sock.recv(&mut buf).context("raw dump receive")?;
        for m in nlmsgs(&buf[..n]) {
            match m.ty {
                attr::NLMSG_DONE => return Ok(count),
                attr::NLMSG_ERROR => {
                    let (errno, _) = error_of(&m);
                    if errno != 0 {
                        bail!("raw dump: {}", io::Error::from_raw_os_error(-errno));
                    }
                }
                attr::MSG_CT_NEW => count += 1,
                _ => {}
            }
        }
    }
}
