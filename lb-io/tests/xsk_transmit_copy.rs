//! `XskDevice::transmit_copy` (how a loop sends a frame another loop handed it) takes a chunk from
//! the device's free chunks while more than a quarter of them are free. With a fill ring as deep as
//! the UMEM, the idle receives' refills once moved every free chunk onto the fill ring, so no chunk
//! was ever free and every handed-over frame was dropped, for good. A veth pair in namespaces of its
//! own. Needs root; skips with the reason otherwise.
#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;

use lb_io::netns::{can_create_namespaces, enter_netns, lb_and_peer};
use lb_io::{Device, XskConfig, XskDevice};

#[test]
fn a_fill_ring_as_deep_as_the_umem_leaves_chunks_for_copies() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbc{}", std::process::id());
    let (lb, peer) = lb_and_peer(&tag).unwrap();
    let name = lb.name().to_string();
    let (done_tx, done_rx) = mpsc::channel::<Result<(usize, usize), String>>();
    std::thread::spawn(move || {
        let run = || -> Result<(usize, usize), String> {
            enter_netns(&name).map_err(|e| e.to_string())?;
            let config = XskConfig { frames: 512, fill_ring_size: 512, ring_size: 512, ..XskConfig::new("l0", 0) };
            let mut dev = match XskDevice::open(&config) {
                Ok(d) => d,
                Err(e) if e.is_refused() => return Err(format!("SKIPPED: AF_XDP refused ({e})")),
                Err(e) => return Err(e.to_string()),
            };
            // An idle loop: receives that find nothing (each refills the fill ring).
            for _ in 0..16 {
                assert_eq!(dev.receive(&mut []).map_err(|e| e.to_string())?.count, 0);
            }
            let mut frame = [0u8; 60];
            frame[..6].fill(0xff);
            frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            frame[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental EtherType
            let copies = (0..8).filter(|_| dev.transmit_copy(&frame)).count();
            let mut completed = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while completed < copies && std::time::Instant::now() < deadline {
                completed += dev.flush().map_err(|e| e.to_string())?.completed;
            }
            Ok((copies, completed))
        };
        let _ = done_tx.send(run());
    });
    let result = done_rx.recv_timeout(Duration::from_secs(20));
    drop((peer, lb));
    match result {
        Err(_) => panic!("the test's thread did not finish within 20 s"),
        Ok(Err(skip)) if skip.starts_with("SKIPPED") => println!("{skip}"),
        Ok(Err(e)) => panic!("{e}"),
        Ok(Ok((copies, completed))) => {
            assert_eq!(copies, 8, "copies queued by an idle device with a fill ring as deep as its UMEM");
            assert_eq!(completed, 8, "copies sent and their chunks taken back");
        }
    }
}
