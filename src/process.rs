//! CPU scheduling of the daemon: a real-time policy so that event intake and replication are
//! not queued behind ordinary work (see [`crate::config::ProcessConfig`] for the measurements).

use crate::config::{ProcessConfig, SchedPolicy};
use std::io;

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The policy was set (threads started from now on inherit it).
    Set,
    /// The calling thread already ran with it (set by systemd's `CPUSchedulingPolicy=`).
    AlreadySet,
}

fn policy_number(p: SchedPolicy) -> libc::c_int {
    match p {
        SchedPolicy::Rr => libc::SCHED_RR,
        SchedPolicy::Fifo => libc::SCHED_FIFO,
        SchedPolicy::Other => libc::SCHED_OTHER,
    }
}

/// Sets the calling thread's scheduling policy; call before any other thread starts, so that
/// all of them inherit it. Never with `SCHED_RESET_ON_FORK`: on Linux that flag resets new
/// *threads* too, so the runtime's workers and the event thread would lose the policy (a flag
/// set from outside, by systemd's `CPUSchedulingResetOnFork=`, is cleared for that reason).
///
/// Fails with `EPERM` without `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` allowing the priority).
pub fn apply(cfg: &ProcessConfig) -> io::Result<Applied> {
    let policy = policy_number(cfg.scheduler);
    let priority = if cfg.scheduler == SchedPolicy::Other {
        0
    } else {
        libc::c_int::from(cfg.priority)
    };
    if current() == Some((policy, priority)) {
        return Ok(Applied::AlreadySet);
    }
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param for the duration of the call; pid 0 is this thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Applied::Set)
}

/// The calling thread's policy (with the reset-on-fork flag, if set) and priority.
pub fn current() -> Option<(libc::c_int, libc::c_int)> {
    // SAFETY: pid 0 is this thread; no pointers are involved.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return None;
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is valid for writes.
    if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
        return None;
    }
    Some((policy, param.sched_priority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ordinary_policy_can_always_be_set() {
        // On a thread of its own: the test harness's threads keep their policy.
        std::thread::spawn(|| {
            let cfg = ProcessConfig {
                scheduler: SchedPolicy::Other,
                priority: 1,
            };
            assert!(apply(&cfg).is_ok());
            assert_eq!(current(), Some((libc::SCHED_OTHER, 0)));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn threads_started_afterwards_inherit_the_policy() {
        std::thread::spawn(|| {
            let cfg = ProcessConfig {
                scheduler: SchedPolicy::Rr,
                priority: 1,
            };
            if apply(&cfg).is_err() {
                return; // no CAP_SYS_NICE: covered by the test below
            }
            let child = std::thread::spawn(current).join().unwrap();
            assert_eq!(child, Some((libc::SCHED_RR, 1)));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn real_time_is_set_or_refused_clearly() {
        std::thread::spawn(|| {
            let cfg = ProcessConfig {
                scheduler: SchedPolicy::Rr,
                priority: 1,
            };
            match apply(&cfg) {
                Ok(_) => assert_eq!(current(), Some((libc::SCHED_RR, 1))),
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
            }
        })
        .join()
        .unwrap();
    }
}
