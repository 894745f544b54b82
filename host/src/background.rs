//! Background threads: an epoch's fresh instance (restored and caught up
//! while the running one applies), a swap's compile. They run at a lower
//! CPU priority than the raft loop, the persister and the apply worker, so
//! that on a busy machine (three nodes of a cluster on two cores, a large
//! state restoring) it is they that wait, not the heartbeats: a leader
//! whose followers answer too late steps down, and every write waits for
//! the election. (Not the snapshot writer: it takes LMDB's write lock in
//! turn with the persister, which must not wait on a thread kept waiting.)

/// How much lower: `nice` 10, as a batch job.
const NICENESS: libc::c_int = 10;

/// Lower the calling thread's priority (Linux keeps one per thread;
/// elsewhere, and if it is refused, nothing changes).
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on this thread's own id.
        let refused = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICENESS) != 0
        };
        if refused {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a background thread's priority");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn a_background_thread_runs_at_a_lower_priority_and_others_do_not() {
        let own = || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = own();
        let lowered = std::thread::spawn(move || {
            super::lower_priority();
            own()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + super::NICENESS).min(19));
        assert_eq!(own(), before, "only the background thread is lowered");
    }
}
