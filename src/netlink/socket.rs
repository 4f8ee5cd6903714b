//! A blocking ctnetlink socket: the one place that makes system calls on netlink.
//!
//! Blocking sockets on dedicated threads keep the event path simple and fast (no wakeups through
//! a reactor for each datagram), and let the kernel apply back-pressure: a reader that falls
//! behind sees `ENOBUFS`, which is exactly the signal for a reconciliation.

use super::attr::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::time::Duration;

/// Errors of the netlink socket layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// A system call failed.
    #[error("netlink {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError::Io { op, source }
}

/// A netfilter netlink socket bound to the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct CtSocket {
    sock: Socket,
    portid: u32,
}

impl CtSocket {
    /// Opens and binds a socket in the calling thread's network namespace.
    pub fn open() -> Result<CtSocket, SocketError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(io_err("socket"))?;
        let addr = sock.bind_auto().map_err(io_err("bind"))?;
        // Errors echo only the header, not the whole request: a failing batch would otherwise
        // fill the receive buffer with copies of what we sent.
        sock.set_cap_ack(true).map_err(io_err("NETLINK_CAP_ACK"))?;
        Ok(CtSocket {
            sock,
            portid: addr.port_number(),
        })
    }

    /// The port id the kernel puts in `nlmsg_pid` of events our requests cause.
    pub fn portid(&self) -> u32 {
        self.portid
    }

    /// The raw descriptor, for non-blocking reads.
    pub(crate) fn raw_fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    /// Joins a multicast group (`NFNLGRP_*`).
    pub fn join(&self, group: u32) -> Result<(), SocketError> {
        self.sock
            .add_membership(group)
            .map_err(io_err("add_membership"))
    }

    /// Leaves a multicast group (`NFNLGRP_*`).
    pub fn leave(&self, group: u32) -> Result<(), SocketError> {
        self.sock
            .drop_membership(group)
            .map_err(io_err("drop_membership"))
    }

    /// A second handle on the same kernel socket (a duplicated descriptor): what one handle
    /// changes (group membership, options) the other sees, so that a thread other than the
    /// one reading can switch the subscription.
    pub fn try_clone(&self) -> Result<CtSocket, SocketError> {
        let fd = self
            .sock
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err("dup"))?;
        // SAFETY: `fd` is a freshly duplicated, owned netlink socket descriptor, handed over.
        let sock = unsafe { Socket::from_raw_fd(fd.into_raw_fd()) };
        Ok(CtSocket {
            sock,
            portid: self.portid,
        })
    }

    /// Sets the receive buffer, beyond `rmem_max` when we have `CAP_NET_ADMIN`.
    ///
    /// Returns the size the kernel actually granted (it doubles the request for bookkeeping).
    pub fn set_recv_buffer(&self, bytes: usize) -> Result<usize, SocketError> {
        set_buffer(&self.sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes)?;
        get_int(&self.sock, libc::SO_RCVBUF)
    }

    /// Sets the send buffer, which bounds the size of one batch of requests.
    pub fn set_send_buffer(&self, bytes: usize) -> Result<usize, SocketError> {
        set_buffer(&self.sock, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)?;
        get_int(&self.sock, libc::SO_SNDBUF)
    }

    /// Makes `recv` return `WouldBlock` after `timeout`, so reader threads can notice shutdown.
    pub fn set_recv_timeout(&self, timeout: Duration) -> Result<(), SocketError> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        setsockopt(&self.sock, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
            .map_err(io_err("SO_RCVTIMEO"))
    }

    /// Sends one datagram, which may hold many netlink messages.
    pub fn send(&self, buf: &[u8]) -> Result<(), SocketError> {
        let kernel = SocketAddr::new(0, 0);
        let sent = self.sock.send_to(buf, &kernel, 0).map_err(io_err("send"))?;
        if sent != buf.len() {
            return Err(SocketError::Io {
                op: "send",
                source: io::Error::other(format!("short send: {sent} of {}", buf.len())),
            });
        }
        Ok(())
    }

    /// Attaches a classic BPF program, run by the kernel on every datagram before it is queued
    /// to this socket: what it drops is never copied, queued, woken for or read.
    pub fn attach_filter(&self, program: &[libc::sock_filter]) -> Result<(), SocketError> {
        let prog = libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(|_| SocketError::Io {
                op: "SO_ATTACH_FILTER",
                source: io::Error::other("BPF program too long"),
            })?,
            filter: program.as_ptr().cast_mut(),
        };
        setsockopt(&self.sock, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
            .map_err(io_err("SO_ATTACH_FILTER"))
    }

    /// Receives one datagram into `buf`, returning its length.
    ///
    /// The raw `io::Error` is returned so that callers can tell `ENOBUFS` (events lost) and
    /// timeouts apart from real failures.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut slice: &mut [u8] = buf;
        let n = self.sock.recv(&mut slice, 0)?;
        Ok(n.min(buf.len()))
    }
}

fn set_buffer(sock: &Socket, force: i32, plain: i32, bytes: usize) -> Result<(), SocketError> {
    let half = i32::try_from(bytes / 2).unwrap_or(i32::MAX / 2);
    // The kernel doubles the value it is given; halve it so the granted size is what was asked.
    if setsockopt(sock, libc::SOL_SOCKET, force, &half).is_err() {
        setsockopt(sock, libc::SOL_SOCKET, plain, &half).map_err(io_err("set buffer size"))?;
    }
    Ok(())
}

fn get_int(sock: &Socket, opt: i32) -> Result<usize, SocketError> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io_err("getsockopt")(io::Error::last_os_error()));
    }
    Ok(usize::try_from(v).unwrap_or(0))
}

fn setsockopt<T>(sock: &Socket, level: i32, opt: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
