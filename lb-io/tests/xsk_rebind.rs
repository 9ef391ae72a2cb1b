//! A queue whose socket has just closed can be bound again at once. The kernel frees a closed
//! AF_XDP socket's queue only after an RCU grace period (~30 ms here), and refuses a bind meanwhile
//! with EBUSY, so a load balancer restarted in place by its supervisor could fail to start.
//! `XskDevice::open` tries such a bind again for `XskConfig::busy_wait`; a queue that a live socket
//! holds is still refused. A veth pair in namespaces of its own. Needs root; skips with the reason
//! otherwise.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use lb_io::netns::{can_create_namespaces, enter_netns, lb_and_peer};
use lb_io::{XskConfig, XskDevice, XskError};

/// Runs `body` on a thread inside a fresh lab namespace (veth `l0`) tagged `tag`; `None` (printed)
/// where the test cannot run.
fn in_lab<T: Send + 'static>(tag: &str, body: impl FnOnce() -> Result<T, XskError> + Send + 'static) -> Option<T> {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return None;
    }
    let (lb, peer) = lb_and_peer(&format!("{tag}{}", std::process::id())).unwrap();
    let name = lb.name().to_string();
    let result = std::thread::spawn(move || {
        enter_netns(&name).unwrap();
        body()
    })
    .join()
    .unwrap();
    drop((peer, lb));
    match result {
        Ok(t) => Some(t),
        Err(e) if e.is_refused() => {
            println!("SKIPPED: AF_XDP refused ({e})");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_queue_is_bound_again_right_after_its_socket_closes() {
    // Without the retry, nearly every reopen here is refused (186 of 200 when measured).
    let Some(opens) = in_lab("lbq", || {
        let config = XskConfig::new("l0", 0);
        for _ in 0..20 {
            drop(XskDevice::open(&config)?);
        }
        Ok(20)
    }) else {
        return;
    };
    assert_eq!(opens, 20);
}

#[test]
fn a_queue_a_live_socket_holds_is_refused_after_the_wait() {
    let wait = Duration::from_millis(200);
    let Some((refused, waited)) = in_lab("lbw", move || {
        let config = XskConfig { busy_wait: wait, ..XskConfig::new("l0", 0) };
        let _holder = XskDevice::open(&config)?;
        let start = Instant::now();
        let second = XskDevice::open(&config);
        Ok((second.map(drop), start.elapsed()))
    }) else {
        return;
    };
    let e = refused.unwrap_err().to_string();
    assert!(e.contains("bind") && e.contains("another socket is bound"), "{e}");
    assert!(waited >= wait, "the bind was tried again for the whole wait, not {waited:?}");
}
