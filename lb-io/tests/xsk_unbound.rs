//! A poll loop whose interface goes away ends with an error naming the device. The kernel unbinds
//! the socket when its interface is unregistered (a veth deleted, a namespace removed, a driver
//! unloaded) and leaves ENETDOWN as the socket's error; poll(2) on the socket then reports nothing,
//! so an idle loop used to wait, time out and receive nothing, for good, without a word. The
//! failed loop hands back its processor (a worker, with its flows, to go on with on another device).
//! A veth pair in namespaces of its own. Needs root; skips with the reason otherwise.
#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;

use lb_io::netns::{can_create_namespaces, enter_netns, lb_and_peer};
use lb_io::{LoopConfig, MacRewrite, PollLoop, StopFlag, XskConfig, XskDevice, update_channel};

/// The loop's processor, to be handed back.
const PROCESSOR: MacRewrite = MacRewrite { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 2] };

#[test]
fn an_idle_loop_whose_interface_is_deleted_ends_with_an_error() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbu{}", std::process::id());
    let (lb, peer) = lb_and_peer(&tag).unwrap();
    let (opened_tx, opened_rx) = mpsc::channel::<Result<(), String>>();
    // How the loop ended: its error and the processor it handed back.
    let (done_tx, done_rx) = mpsc::channel::<Result<(), (String, MacRewrite)>>();
    let stop = StopFlag::new();
    let name = lb.name().to_string();
    let loop_stop = stop.clone();
    let thread = std::thread::spawn(move || {
        let opened = enter_netns(&name).map_err(|e| e.to_string()).and_then(|()| {
            XskDevice::open(&XskConfig::new("l0", 0))
                .map_err(|e| if e.is_refused() { format!("SKIPPED: AF_XDP refused ({e})") } else { e.to_string() })
        });
        let dev = match opened {
            Ok(dev) => {
                opened_tx.send(Ok(())).unwrap();
                dev
            }
            Err(e) => {
                opened_tx.send(Err(e)).unwrap();
                return;
            }
        };
        let (_updates, rx) = update_channel();
        let result = PollLoop::new(dev, PROCESSOR, rx, loop_stop, LoopConfig::default()).run_keeping_parts();
        let _ = done_tx.send(result.map(|_| ()).map_err(|failed| (failed.to_string(), failed.report.processor)));
    });
    match opened_rx.recv().unwrap() {
        Ok(()) => {}
        Err(skip) if skip.starts_with("SKIPPED") => {
            println!("{skip}");
            thread.join().unwrap();
            return;
        }
        Err(e) => panic!("{e}"),
    }
    // The socket is bound and the loop idles; the interface goes away under it.
    lb.ip(&["link", "del", "l0"]).unwrap();
    let result = done_rx.recv_timeout(Duration::from_secs(10));
    stop.stop();
    thread.join().unwrap();
    drop((peer, lb));
    match result {
        Err(_) => panic!("the loop kept polling a socket whose interface is gone (10 s)"),
        Ok(Ok(())) => panic!("the loop ended without an error"),
        Ok(Err((e, processor))) => {
            assert!(e.contains("l0#0"), "{e}");
            assert_eq!(processor, PROCESSOR, "the processor came back");
        }
    }
}

/// A TX kick refused because the link is down is tried again at the next flush; one on a socket
/// whose interface was deleted is an error naming the device. (Zero-copy drivers refuse kicks with
/// ENXIO or EINVAL while a queue is reset, and the kernel refuses an unbound socket's with ENXIO
/// too: the error the socket carries tells them apart.)
#[test]
fn a_tx_kick_on_a_down_link_is_tried_again_and_on_a_deleted_interface_is_an_error() {
    use lb_io::Device;
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbk{}", std::process::id());
    let (lb, peer) = lb_and_peer(&tag).unwrap();
    let name = lb.name().to_string();
    let opened = std::thread::spawn(move || {
        enter_netns(&name).map_err(|e| e.to_string()).and_then(|()| {
            XskDevice::open(&XskConfig::new("l0", 0))
                .map_err(|e| if e.is_refused() { format!("SKIPPED: AF_XDP refused ({e})") } else { e.to_string() })
        })
    })
    .join()
    .unwrap();
    let mut dev = match opened {
        Ok(dev) => dev,
        Err(skip) if skip.starts_with("SKIPPED") => return println!("{skip}"),
        Err(e) => panic!("{e}"),
    };
    let frame = [0u8; 60];
    lb.ip(&["link", "set", "l0", "down"]).unwrap();
    assert!(dev.transmit_copy(&frame));
    let kicks = dev.stats().tx_kicks;
    dev.flush().expect("a kick on a down link is tried again later");
    assert!(dev.stats().tx_kicks > kicks, "the flush kicked");
    assert_eq!(dev.tx_unsent(), 1, "the frame waits on the TX ring");
    lb.ip(&["link", "del", "l0"]).unwrap();
    let e = dev.flush().expect_err("a kick on an unbound socket is an error");
    let msg = e.to_string();
    assert!(msg.contains("l0#0") && msg.contains("TX kick"), "{msg}");
    drop(dev);
    drop((peer, lb));
}
