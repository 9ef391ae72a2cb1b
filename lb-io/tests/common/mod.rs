//! What the AF_XDP integration tests share: a device on the lab's veth, in namespaces of its own,
//! and a client and a load balancer namespace joined by a veth pair. (Each test file uses a part.)
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::Duration;

use lb_io::netns::{Netns, can_create_namespaces, enter_netns, format_mac, lb_and_peer, veth_pair};
use lb_io::{XskConfig, XskDevice};

/// Runs `test` on an AF_XDP device opened with `config` (its interface `l0`) in a pair of
/// namespaces named from `tag` and this process's id, on a thread inside the load balancer's
/// namespace, and removes the namespaces. `None`, with the reason printed, where namespaces cannot
/// be made or the kernel refuses AF_XDP. Panics on an error, or when the thread has not finished
/// within `limit` (`what` names it): a hang becomes a failure.
pub(crate) fn with_xsk<T: Send + 'static>(
    tag: &str,
    config: XskConfig,
    limit: Duration,
    what: &str,
    test: impl FnOnce(&mut XskDevice) -> Result<T, String> + Send + 'static,
) -> Option<T> {
    in_lab(tag, limit, what, move || test(&mut open(&config)?))
}

/// Runs `test` as [`with_xsk`] does, in the load balancer's namespace, with no device opened for it
/// (it opens its own, with [`open`]).
pub(crate) fn in_lab<T: Send + 'static>(
    tag: &str,
    limit: Duration,
    what: &str,
    test: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Option<T> {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return None;
    }
    let tag = format!("{tag}{}", std::process::id());
    let (lb, peer) = lb_and_peer(&tag).unwrap();
    let name = lb.name().to_string();
    let (done_tx, done_rx) = mpsc::channel::<Result<T, String>>();
    std::thread::spawn(move || {
        let run = || -> Result<T, String> {
            enter_netns(&name).map_err(|e| e.to_string())?;
            test()
        };
        let _ = done_tx.send(run());
    });
    let result = done_rx.recv_timeout(limit);
    drop((peer, lb));
    match result {
        Err(_) => panic!("{what} did not finish within {limit:?}"),
        Ok(Err(skip)) if skip.starts_with("SKIPPED") => {
            println!("{skip}");
            None
        }
        Ok(Err(e)) => panic!("{e}"),
        Ok(Ok(t)) => Some(t),
    }
}

/// An AF_XDP device opened with `config`; an error starting "SKIPPED" where the kernel refuses
/// AF_XDP (which [`in_lab`] prints and skips on).
pub(crate) fn open(config: &XskConfig) -> Result<XskDevice, String> {
    XskDevice::open(config)
        .map_err(|e| if e.is_refused() { format!("SKIPPED: AF_XDP refused ({e})") } else { e.to_string() })
}

/// A client namespace (`c0`, 10.77.0.1/24) and a load balancer namespace (`l0`, 10.77.0.2/24), named
/// from `tag` and this process's id and joined by a veth pair; the client sends to `vip` through
/// `l0`'s MAC. Dropping the two removes them.
pub(crate) fn client_and_lb(tag: &str, vip: Ipv4Addr) -> (Netns, Netns) {
    let tag = format!("{tag}{}", std::process::id());
    let client = Netns::create(&format!("{tag}c")).unwrap();
    let lb = Netns::create(&format!("{tag}l")).unwrap();
    veth_pair(&client, "c0", &lb, "l0").unwrap();
    client.ip(&["addr", "add", "10.77.0.1/24", "dev", "c0"]).unwrap();
    lb.ip(&["addr", "add", "10.77.0.2/24", "dev", "l0"]).unwrap();
    let lb_mac = format_mac(lb.mac("l0").unwrap());
    client.static_neighbour(&vip.to_string(), &lb_mac, "c0").unwrap();
    (client, lb)
}
