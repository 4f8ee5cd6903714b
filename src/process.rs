//! CPU scheduling of the daemon: a real-time policy so that event intake and replication are
//! not queued behind ordinary work, and one CPU for all threads so that what they hand each
//! other stays in one cache (see [`crate::config::ProcessConfig`] and
//! [`crate::config::CpuChoice`] for the measurements).

use crate::config::{CpuChoice, ProcessConfig, SchedPolicy, MAX_CPUS};
use std::io;
use std::sync::OnceLock;

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

/// Restricts the calling thread to the CPU `choice` names; returns that CPU (`None` for
/// [`CpuChoice::Any`], which changes nothing). Call before any other thread starts: threads
/// inherit the affinity of the thread that creates them.
///
/// Fails with `EINVAL` when the CPU is not among those this process may use (a cpuset, or
/// systemd's `CPUAffinity=`, may have narrowed them).
pub fn pin(choice: CpuChoice) -> io::Result<Option<usize>> {
    let cpu = match choice {
        CpuChoice::Any => return Ok(None),
        CpuChoice::Cpu(n) => usize::from(n),
        CpuChoice::Same => current_cpu()?,
    };
    if !allowed_cpus()?.contains(&cpu) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "CPU {cpu} is not among those this process may use ({:?})",
                allowed_cpus()?
            ),
        ));
    }
    let before = allowed_cpus()?;
    set_affinity(&[cpu])?;
    let _ = UNPINNED.set(before);
    Ok(Some(cpu))
}

/// The CPUs the process could use before [`pin`]: where [`float_this_thread`] sends a thread.
static UNPINNED: OnceLock<Vec<usize>> = OnceLock::new();

/// Lets the calling thread run on every CPU the process could use before [`pin`] (nothing
/// changes when nothing was pinned).
///
/// For the threads that work on their own for long stretches and hand over little: a commit's
/// kernel writer (a 16k-flow chunk is tens of milliseconds in the kernel, during which the state
/// task shapes the next one) and the dump thread (it builds a whole table, then hands it over
/// once). On the pinned CPU they would take turns with the state task instead: a 250k commit
/// measured ~5% slower, and during a dump the state task would wait up to a real-time slice
/// (100 ms) at a time.
pub fn float_this_thread() -> io::Result<()> {
    match UNPINNED.get() {
        Some(cpus) if cpus.len() > 1 => set_affinity(cpus),
        _ => Ok(()),
    }
}

fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < MAX_CPUS) {
        // SAFETY: `cpu` is below the set's 1024 bits.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU the calling thread runs on now.
fn current_cpu() -> io::Result<usize> {
    // SAFETY: no arguments, no pointers.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).map_err(|_| io::Error::last_os_error())
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is valid; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads within the set for every cpu < 1024.
    Ok((0..MAX_CPUS)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_leaves_the_affinity_alone() {
        std::thread::spawn(|| {
            let before = allowed_cpus().unwrap();
            assert_eq!(pin(CpuChoice::Any).unwrap(), None);
            assert_eq!(allowed_cpus().unwrap(), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn same_pins_this_thread_and_the_threads_it_starts_to_one_cpu() {
        std::thread::spawn(|| {
            let allowed = allowed_cpus().unwrap();
            let cpu = pin(CpuChoice::Same).unwrap().expect("a CPU");
            assert!(allowed.contains(&cpu));
            assert_eq!(allowed_cpus().unwrap(), vec![cpu]);
            let child = std::thread::spawn(|| (allowed_cpus().unwrap(), current_cpu().unwrap()));
            assert_eq!(child.join().unwrap(), (vec![cpu], cpu));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_floating_thread_gets_back_every_cpu_the_process_had() {
        std::thread::spawn(|| {
            let all = allowed_cpus().unwrap();
            pin(CpuChoice::Same).unwrap();
            let floating = std::thread::spawn(|| {
                float_this_thread().unwrap();
                allowed_cpus().unwrap()
            });
            assert_eq!(floating.join().unwrap(), all);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_named_cpu_is_used_or_refused_clearly() {
        std::thread::spawn(|| {
            let last = *allowed_cpus().unwrap().last().unwrap();
            let n = u16::try_from(last).unwrap();
            assert_eq!(pin(CpuChoice::Cpu(n)).unwrap(), Some(last));
            assert_eq!(allowed_cpus().unwrap(), vec![last]);
            // Now only `last` is allowed: any other CPU is refused, naming the allowed ones.
            let other = if last == 0 { 1 } else { 0 };
            let err = pin(CpuChoice::Cpu(other)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(
                err.to_string()
                    .contains(&format!("CPU {other} is not among")),
                "{err}"
            );
            assert_eq!(
                allowed_cpus().unwrap(),
                vec![last],
                "unchanged after a refusal"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_ordinary_policy_can_always_be_set() {
        // On a thread of its own: the test harness's threads keep their policy.
        std::thread::spawn(|| {
            let cfg = ProcessConfig {
                scheduler: SchedPolicy::Other,
                priority: 1,
                cpu: CpuChoice::Any,
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
                cpu: CpuChoice::Any,
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
                cpu: CpuChoice::Any,
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
