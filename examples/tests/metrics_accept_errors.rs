//! The metrics endpoint when `accept` keeps failing: out of file descriptors (EMFILE), a connection
//! waits in the listen backlog and every `accept` fails at once, so a loop that retries at once
//! spins a control thread and logs without end. It must back off instead.
//!
//! Alone in its own test binary: it lowers the process's descriptor limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use lb_examples::control::LiveState;
use lb_examples::log_capture::Captured;
use lb_examples::metrics::{CoreSnapshot, StatsSource, serve};

/// Sets the soft limit on open descriptors so that none is left: the lowest free one is the limit.
fn no_descriptor_left() {
    // SAFETY: dup of stdin returns a new descriptor (the lowest free one) or -1; it is closed at once.
    let lowest_free = unsafe { libc::dup(0) };
    assert!(lowest_free >= 0);
    // SAFETY: closes the descriptor dup just returned, which nothing else holds.
    unsafe { libc::close(lowest_free) };
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the rlimit they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = lowest_free as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn accept_errors_back_off_instead_of_spinning() {
    let (log, _guard) = Captured::install();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // A client waiting in the backlog, connected before the descriptors run out.
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let live = tokio::sync::watch::Sender::new(LiveState::default());
    let source: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
    no_descriptor_left();
    tokio::spawn(serve(listener, live.subscribe(), source));

    // Let the server run: each yield gives it a turn on this one thread.
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    let text = log.text();
    let failures = text.lines().filter(|l| l.contains("metrics accept failed")).count();
    assert!(failures >= 1, "accept failed (EMFILE): {text}");
    assert!(failures <= 2, "{failures} accept failures logged in 1000 turns: the loop spins");
}
