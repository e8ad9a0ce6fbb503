//! Stopping a container that started without its identity, so that the orchestrator recreates
//! it through the agent: containerd 1.7's NRI accepts a plugin's evictions on the wire but does
//! not act on them (its adaptation relays container updates only), so the agent signals the
//! container's process itself, from the host PID namespace the DaemonSet runs in, with
//! `CAP_KILL`.
//!
//! The PID is pinned first (a pidfd), then checked to be in the container's (or, for a
//! sandboxed pod, the sandbox's) cgroup, then killed through the pidfd: a PID reused by an
//! unrelated process between the runtime's report and the signal is never hit.

use std::os::fd::OwnedFd;

/// Why a container could not be stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvictError {
    /// The runtime reported no process.
    #[error("the runtime reported no process for it")]
    NoPid,
    /// The process is gone already (nothing to stop) or cannot be pinned.
    #[error("cannot pin process {pid}: {source}")]
    Pin { pid: u32, source: std::io::Error },
    /// The PID now belongs to a process outside the container.
    #[error("process {pid} is not in the container's cgroup (its PID was reused)")]
    NotTheContainer { pid: u32 },
    /// The signal was refused (no `CAP_KILL`?).
    #[error("cannot signal process {pid}: {source}")]
    Signal { pid: u32, source: std::io::Error },
}

/// SIGKILLs process `pid` if its cgroup names one of `owners` (the container's id, or the
/// sandbox's for a sandboxed pod, whose containers share the sandbox's process).
///
/// # Errors
/// [`EvictError`] naming what stopped it.
pub fn kill(pid: u32, owners: &[&str]) -> Result<(), EvictError> {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let raw = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let Some(target) = raw else {
        return Err(EvictError::NoPid);
    };
    let pinned: OwnedFd = pidfd_open(target, PidfdFlags::empty()).map_err(|e| EvictError::Pin {
        pid,
        source: e.into(),
    })?;
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|source| EvictError::Pin { pid, source })?;
    if !owners
        .iter()
        .any(|id| !id.is_empty() && cgroup.contains(id))
    {
        return Err(EvictError::NotTheContainer { pid });
    }
    pidfd_send_signal(&pinned, Signal::KILL).map_err(|e| EvictError::Signal {
        pid,
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_only_a_process_in_the_named_cgroup() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep runs");
        let pid = child.id();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        // Not the container: refused, the process lives on.
        assert!(matches!(
            kill(pid, &["0123456789abcdef-not-a-cgroup"]),
            Err(EvictError::NotTheContainer { .. })
        ));
        assert!(kill(pid, &[""]).is_err(), "an empty id matches nothing");
        assert!(child.try_wait().unwrap().is_none());
        // Its own cgroup path: killed.
        let own = cgroup.lines().next().unwrap().rsplit(':').next().unwrap();
        kill(pid, &[own]).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(matches!(kill(0, &[own]), Err(EvictError::NoPid)));
    }
}
