//! Clean shutdown: a flag every poll loop checks once per round, set by the program or by SIGINT /
//! SIGTERM once [`StopFlag::watch_signals`] installed the handler (and SIGHUP after
//! [`StopFlag::watch_signals_and_hangup`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set from the signal handler; a static because a handler can touch nothing else.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNALLED.store(true, Ordering::Relaxed);
}

/// A cloneable "please stop" flag.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag that is not set.
    pub fn new() -> Self {
        StopFlag::default()
    }

    /// Asks every loop holding a clone to stop after its current round.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// True once [`StopFlag::stop`] was called or a watched signal arrived (SIGINT / SIGTERM after
    /// `watch_signals`; SIGHUP too after `watch_signals_and_hangup`).
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed) || SIGNALLED.load(Ordering::Relaxed)
    }

    /// True once a watched signal arrived.
    pub fn signalled() -> bool {
        SIGNALLED.load(Ordering::Relaxed)
    }

    /// Installs the SIGINT / SIGTERM handler that sets every flag. Idempotent.
    pub fn watch_signals() -> std::io::Result<()> {
        watch(&[libc::SIGINT, libc::SIGTERM])
    }

    /// As [`StopFlag::watch_signals`], and SIGHUP too, for a program with no reload to do on it
    /// (`lb demo`): a terminal that closes (an SSH session that drops) then stops it as Ctrl-C
    /// does, with its clean-up, where SIGHUP's default action ended it with none.
    pub fn watch_signals_and_hangup() -> std::io::Result<()> {
        watch(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
    }
}

/// Installs the handler that sets every flag for each of `signals`.
fn watch(signals: &[libc::c_int]) -> std::io::Result<()> {
    for &sig in signals {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value, and `on_signal` is
        // async-signal-safe (one atomic store) and lives for the whole program.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_hangup(_sig: libc::c_int) {}

/// Installs a SIGHUP handler that does nothing, so a SIGHUP that comes before the program listens
/// for it (`lb run` reloads on SIGHUP once its control plane has started) does not end the process,
/// which is SIGHUP's default action, with none of its clean-up (its interfaces' offloads). A handler
/// installed later (tokio's) takes over; unlike `SIG_IGN`, a handler is not inherited across `exec`.
pub fn survive_hangup() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "empty mask" value; `on_hangup` does nothing, so is
    // async-signal-safe, and lives for the whole program.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_hangup as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGHUP, &sa, std::ptr::null_mut())
    };
    if rc != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
