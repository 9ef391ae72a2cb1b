//! Process limits a long-running load balancer needs raised at start.

/// Raises the soft limit on open file descriptors to the hard limit and returns the two limits
/// before, as Go's runtime does at start for every Go program (kube-proxy among them). The soft
/// limit a process inherits is often 1024 (a systemd service, a container under containerd 2)
/// under a hard limit hundreds of times higher; a control plane that opens a descriptor per health
/// probe, watch and client connection runs out at the soft one, and then every connect and accept
/// fails (EMFILE). A hard limit the kernel does not allow as a soft one (beyond `fs.nr_open`) is an
/// error, and the limits stay as they were.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the limits into the rlimit it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = (limit.rlim_cur, limit.rlim_max);
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the rlimit it is given, which lives on this stack.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(before)
}
