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
    if !owners.iter().any(|id| in_cgroup_of(&cgroup, id)) {
        return Err(EvictError::NotTheContainer { pid });
    }
    pidfd_send_signal(&pinned, Signal::KILL).map_err(|e| EvictError::Signal {
        pid,
        source: e.into(),
    })
}

/// Whether `/proc/<pid>/cgroup` text places the process in container `id`'s cgroup: a path
/// component that is the id (the cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`) or ends
/// in `-<id>.scope` (the systemd driver: `cri-containerd-<id>.scope`). Whole components only: a
/// short id inside another hex name is not a match.
fn in_cgroup_of(cgroup: &str, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .any(|component| {
            component == id
                || component
                    .strip_suffix(".scope")
                    .and_then(|c| c.strip_suffix(id))
                    .is_some_and(|prefix| prefix.ends_with('-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_names_a_container_by_whole_components_only() {
        let id = "4f3a9c0d1e2b";
        let cases = [
            (format!("0::/kubepods/burstable/pod1234/{id}\n"), true),
            (
                format!("0::/kubepods.slice/kubepods-pod12.slice/cri-containerd-{id}.scope\n"),
                true,
            ),
            (format!("4:memory:/k8s.io/{id}\n0::/\n"), true),
            (format!("0::/kubepods/pod1234/{id}0\n"), false),
            (format!("0::/kubepods/pod1234/x{id}\n"), false),
            (format!("0::/cri-containerd-{id}0.scope\n"), false),
            (format!("0::/cri-containerd{id}.scope\n"), false),
            ("4:memory:/process_api/fa20e434c1a46ffd\n".to_owned(), false),
            ("0::/\n".to_owned(), false),
        ];
        for (cgroup, expected) in &cases {
            assert_eq!(in_cgroup_of(cgroup, id), *expected, "{cgroup}");
        }
        // The agent's tests name containers `c1`, which is inside many hex names.
        assert!(!in_cgroup_of(
            "4:memory:/process_api/fa20e434c1a46ffd\n",
            "c1"
        ));
        assert!(!in_cgroup_of(&cases[0].0, ""));
    }

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
        // A component of its own cgroup path: killed.
        let own = cgroup
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .flat_map(|p| p.split('/'))
            .find(|c| !c.is_empty())
            .expect("this test runs in a cgroup below the root (a named one)");
        kill(pid, &[own]).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(matches!(kill(0, &[own]), Err(EvictError::NoPid)));
    }
}
