//! `XskDevice::transmit_copy` (how a loop sends a frame another loop handed it) takes a chunk from
//! the device's free chunks while more than a quarter of them are free. With a fill ring as deep as
//! the UMEM, the idle receives' refills once moved every free chunk onto the fill ring, so no chunk
//! was ever free and every handed-over frame was dropped, for good. A veth pair in namespaces of its
//! own. Needs root; skips with the reason otherwise.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use lb_io::{Device, XskConfig};

#[test]
fn a_fill_ring_as_deep_as_the_umem_leaves_chunks_for_copies() {
    let config = XskConfig { frames: 512, fill_ring_size: 512, ring_size: 512, ..XskConfig::new("l0", 0) };
    let result = common::with_xsk("lbc", config, Duration::from_secs(20), "the test's thread", |dev| {
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
    });
    if let Some((copies, completed)) = result {
        assert_eq!(copies, 8, "copies queued by an idle device with a fill ring as deep as its UMEM");
        assert_eq!(completed, 8, "copies sent and their chunks taken back");
    }
}
