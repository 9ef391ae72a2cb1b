//! Frames that a flush's kicks leave on the AF_XDP TX ring (in copy mode the kernel sends only as
//! many as the completion ring has room for) must still leave once nothing more is queued: the
//! poll loop then only receives, so the device's idle receive has to kick them on. A veth pair in
//! namespaces of its own, a completion ring of 32 for 320 frames. Needs root; skips with the reason
//! otherwise.
//!
//! Before the fix the flushes left 288 frames there and 40 million idle receives moved none. Two
//! changes each drain them on veth: flushes take completions back between kicks (then none is left),
//! and an idle receive kicks what is left (then 9 receives do). The second is what a busy or stopped
//! driver queue, which veth does not reproduce, needs.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use lb_io::netns::{can_create_namespaces, enter_netns, lb_and_peer};
use lb_io::{Device, XskConfig, XskDevice};

#[test]
fn frames_left_on_the_tx_ring_leave_while_the_loop_only_receives() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbt{}", std::process::id());
    let (lb, peer) = lb_and_peer(&tag).unwrap();
    let name = lb.name().to_string();
    let result = std::thread::spawn(move || -> Result<(u32, u32, u32), String> {
        enter_netns(&name).map_err(|e| e.to_string())?;
        // `ring_size` sizes the completion ring (and RX): 32, against a TX ring of 512.
        let config = XskConfig { ring_size: 32, ..XskConfig::new("l0", 0) };
        let mut dev = match XskDevice::open(&config) {
            Ok(d) => d,
            Err(e) if e.is_refused() => return Err(format!("SKIPPED: AF_XDP refused ({e})")),
            Err(e) => return Err(e.to_string()),
        };
        let frame = |b: &mut [u8]| {
            b[..60].fill(0);
            b[..6].fill(0xff);
            b[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            b[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental EtherType
            60
        };
        assert_eq!(dev.transmit_new(320, frame), 320);
        let failsafe = Instant::now() + Duration::from_secs(10);
        while dev.pending_tx() > 0 {
            dev.flush().map_err(|e| e.to_string())?;
            assert!(Instant::now() < failsafe, "the TX ring never took the queued frames");
        }
        let after_flushes = dev.tx_unsent();
        // What the poll loop does when nothing arrives and nothing is queued: receive, again.
        let mut rounds = 0;
        while dev.tx_unsent() > 0 && Instant::now() < failsafe {
            assert_eq!(dev.receive(&mut []).map_err(|e| e.to_string())?.count, 0);
            rounds += 1;
        }
        Ok((after_flushes, rounds, dev.tx_unsent()))
    })
    .join()
    .unwrap();
    drop((peer, lb));
    match result {
        Err(skip) if skip.starts_with("SKIPPED") => println!("{skip}"),
        Err(e) => panic!("{e}"),
        Ok((after_flushes, rounds, left)) => {
            println!("{after_flushes} frames on the TX ring after the flushes; {left} after {rounds} idle receives");
            // (That the flushes left some there depends on the kernel's pace; that none stays does not.)
            assert_eq!(left, 0, "frames still on the TX ring after {rounds} idle receives");
        }
    }
}
