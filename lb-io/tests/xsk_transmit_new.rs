//! `XskDevice::transmit_new` calls its writer at most once per frame asked for: a writer that
//! declines (returns 0, or a length that does not fit the chunk) ends the call with what was queued.
//! It once put the chunk back and asked again for as long as the writer declined: a generator with
//! nothing to send hung there for good. A veth pair in namespaces of its own. Needs root; skips
//! with the reason otherwise.
#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;

use lb_io::netns::{can_create_namespaces, enter_netns, lb_and_peer};
use lb_io::{Device, XskConfig, XskDevice};

#[test]
fn a_writer_that_declines_ends_transmit_new() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbn{}", std::process::id());
    let (lb, peer) = lb_and_peer(&tag).unwrap();
    let name = lb.name().to_string();
    let (done_tx, done_rx) = mpsc::channel::<Result<Vec<(usize, usize)>, String>>();
    std::thread::spawn(move || {
        let run = || -> Result<Vec<(usize, usize)>, String> {
            enter_netns(&name).map_err(|e| e.to_string())?;
            let mut dev = match XskDevice::open(&XskConfig::new("l0", 0)) {
                Ok(d) => d,
                Err(e) if e.is_refused() => return Err(format!("SKIPPED: AF_XDP refused ({e})")),
                Err(e) => return Err(e.to_string()),
            };
            let mut results = Vec::new();
            // Nothing to send.
            let mut calls = 0;
            let queued = dev.transmit_new(4, |_| {
                calls += 1;
                0
            });
            results.push((queued, calls));
            // A frame that does not fit the chunk.
            calls = 0;
            let queued = dev.transmit_new(4, |buf| {
                calls += 1;
                buf.len() + 1
            });
            results.push((queued, calls));
            // Every other frame skipped.
            calls = 0;
            let queued = dev.transmit_new(4, |buf| {
                calls += 1;
                if calls % 2 == 0 {
                    return 0;
                }
                buf[..60].fill(0);
                buf[..6].fill(0xff);
                buf[12..14].copy_from_slice(&[0x88, 0xb5]);
                60
            });
            results.push((queued, calls));
            results.push((dev.pending_tx(), 0));
            Ok(results)
        };
        let _ = done_tx.send(run());
    });
    let result = done_rx.recv_timeout(Duration::from_secs(10));
    drop((peer, lb));
    match result {
        Err(_) => panic!("transmit_new did not return within 10 s"),
        Ok(Err(skip)) if skip.starts_with("SKIPPED") => println!("{skip}"),
        Ok(Err(e)) => panic!("{e}"),
        Ok(Ok(results)) => {
            assert_eq!(results, vec![(0, 4), (0, 4), (2, 4), (2, 0)], "(queued, writer calls); then pending");
        }
    }
}
