//! Real traffic inside a namespace, so that the kernel itself creates some flows: echo requests
//! to 127.0.0.1 and ::1 (repeated, so the entries do not time out), and an established TCP
//! connection over IPv4 and over IPv6 on loopback.

use super::netns::Netns;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Echo identifier of the pings (the same for both families).
pub const ICMP_ID: u16 = 0x5a17;

/// The traffic's sockets and its pinger thread, all closed or stopped on drop.
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    pinger: Option<JoinHandle<()>>,
    /// Client and server ends of the TCP connections (client local address, server address).
    pub tcp: Vec<(SocketAddr, SocketAddr)>,
    _sockets: Vec<TcpStream>,
}

fn raw_socket(family: i32, protocol: i32) -> OwnedFd {
    // SAFETY: plain socket creation; the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    assert!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(kind: u8, seq: u16, with_checksum: bool) -> Vec<u8> {
    let mut p = vec![kind, 0, 0, 0];
    p.extend_from_slice(&ICMP_ID.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"ctsync integration");
    if with_checksum {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn send_to(fd: &OwnedFd, packet: &[u8], addr: SocketAddr) {
    let (storage, len) = sockaddr(addr);
    // SAFETY: the buffer and address are valid for the lengths passed.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc < 0 {
        eprintln!("ping {addr}: {}", std::io::Error::last_os_error());
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.ip().octets();
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn tcp_pair(listen: &str) -> (TcpStream, TcpStream, SocketAddr, SocketAddr) {
    let l = TcpListener::bind(listen).expect("cannot listen on loopback");
    let server = l.local_addr().expect("listener address");
    let client = TcpStream::connect(server).expect("cannot connect on loopback");
    let (accepted, _) = l.accept().expect("accept");
    let local = client.local_addr().expect("client address");
    (client, accepted, local, server)
}

impl Traffic {
    /// Starts pinging both loopback addresses every 500 ms and opens the TCP connections.
    ///
    /// The connections carry no data after their handshake: TCP flags the kernel changes
    /// without an event (unacknowledged data) would otherwise make the mirror legitimately stale.
    pub fn start(ns: &Netns) -> Traffic {
        let (icmp4, icmp6, conns) = ns.run_in(|| {
            let icmp4 = raw_socket(libc::AF_INET, libc::IPPROTO_ICMP);
            let icmp6 = raw_socket(libc::AF_INET6, libc::IPPROTO_ICMPV6);
            let conns = vec![tcp_pair("127.0.0.1:0"), tcp_pair("[::1]:0")];
            (icmp4, icmp6, conns)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let pinger = std::thread::spawn(move || {
            let mut seq: u16 = 0;
            while !flag.load(Ordering::Relaxed) {
                seq = seq.wrapping_add(1);
                send_to(
                    &icmp4,
                    &echo_request(8, seq, true),
                    "127.0.0.1:0".parse().unwrap(),
                );
                // The kernel computes ICMPv6 checksums of raw sockets itself.
                send_to(
                    &icmp6,
                    &echo_request(128, seq, false),
                    "[::1]:0".parse().unwrap(),
                );
                for _ in 0..10 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        let mut tcp = Vec::new();
        let mut sockets = Vec::new();
        for (client, server_end, local, server) in conns {
            tcp.push((local, server));
            sockets.push(client);
            sockets.push(server_end);
        }
        Traffic {
            stop,
            pinger: Some(pinger),
            tcp,
            _sockets: sockets,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.pinger.take() {
            let _ = t.join();
        }
    }
}
