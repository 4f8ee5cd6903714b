//! Entering named network namespaces (`ip netns` style, `/run/netns/NAME`).
//!
//! A netlink socket stays bound to the namespace it was opened in, whichever thread uses it
//! later. Tests, benchmarks and tools therefore open sockets on a short-lived thread that has
//! entered the namespace, and never move the calling thread itself.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Runs `f` on a new thread inside the named network namespace and returns its result.
///
/// Threads that `f` spawns inherit the namespace too.
pub fn run_in<T, F>(name: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = Path::new("/run/netns").join(name);
    let ns = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::thread::spawn(move || {
        // SAFETY: `ns` is an open namespace file; setns only affects this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread in namespace panicked"))?
}
