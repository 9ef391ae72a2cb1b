//! `XskDevice::transmit_new` calls its writer at most once per frame asked for: a writer that
//! declines (returns 0, or a length that does not fit the chunk) ends the call with what was queued.
//! It once put the chunk back and asked again for as long as the writer declined: a generator with
//! nothing to send hung there for good. A veth pair in namespaces of its own. Needs root; skips
//! with the reason otherwise.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use lb_io::{Device, XskConfig};

#[test]
fn a_writer_that_declines_ends_transmit_new() {
    let result = common::with_xsk("lbn", XskConfig::new("l0", 0), Duration::from_secs(10), "transmit_new", |dev| {
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
    });
    if let Some(results) = result {
        assert_eq!(results, vec![(0, 4), (0, 4), (2, 4), (2, 0)], "(queued, writer calls); then pending");
    }
}
