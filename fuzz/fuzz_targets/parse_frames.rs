//! Arbitrary frames through a Worker: raw bytes and structured frames aimed at the services, with
//! mutations and truncations. No panic, and the invariants of `lb_fuzz::check` hold after each frame.
#![no_main]

use arbitrary::Arbitrary;
use lb_core::Instant;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Input {
    Raw { bytes: Vec<u8>, headroom: u8 },
    Built(lb_fuzz::FrameSpec),
}

fuzz_target!(|frames: Vec<Input>| {
    let mut builder = lb_fuzz::builder();
    let mut w = lb_fuzz::worker(&mut builder, &lb_fuzz::config());
    for (t, f) in frames.iter().take(256).enumerate() {
        let (bytes, headroom) = match f {
            Input::Raw { bytes, headroom } => (bytes.clone(), *headroom),
            Input::Built(spec) => (spec.bytes(), spec.headroom),
        };
        // The two parsers of lb-core's packet module agree on every frame.
        if let Some(p) = lb_core::packet::parse_common(&bytes) {
            assert_eq!(Ok(p), lb_core::packet::parse_general(&bytes));
        }
        let now = Instant::from_secs(t as u64);
        let (v, out) = lb_fuzz::run(&mut w, &bytes, usize::from(headroom), now);
        lb_fuzz::check(&w, v, &bytes, &out, now);
    }
});
