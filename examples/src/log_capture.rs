//! What a test logged: a plain-text tracing subscriber writing into a shared buffer, installed as
//! the calling thread's default. For tests that assert on log lines (the `lb` binary's, this
//! library's and the integration tests').

use std::sync::{Arc, Mutex, PoisonError};

/// The log lines written so far. Clones share one buffer.
#[derive(Debug, Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Installs a subscriber writing here as the calling thread's default until the guard drops.
    /// Rebuilds tracing's interest cache once it is in: another thread registering a callsite
    /// meanwhile could leave that callsite marked as wanted by nobody, its lines lost.
    pub fn install() -> (Captured, tracing::subscriber::DefaultGuard) {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        let guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        (log, guard)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// The lines logged since the last call that contain `text`; what was read is forgotten.
    pub fn take_count(&self, text: &str) -> usize {
        let taken = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        String::from_utf8_lossy(&taken).lines().filter(|l| l.contains(text)).count()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
