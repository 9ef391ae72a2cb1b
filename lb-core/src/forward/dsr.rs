//! Direct server return (IPVS "DR", Maglev): only the Ethernet addresses change. The backend holds
//! the VIP on a loopback (and does not answer ARP for it), accepts the packet as addressed to itself
//! and answers the client directly; replies never come back through the balancer. Nothing in the IP
//! packet changes, so no checksum does, and the TTL is left alone (the balancer acts as a bridge).

use super::{Macs, RewriteError, set_macs_from};
use crate::frame::Frame;

/// Sets the frame's Ethernet source and destination.
#[inline]
pub fn rewrite(frame: &mut Frame<'_>, macs: &Macs) -> Result<(), RewriteError> {
    rewrite_from(frame, &macs.src, &macs.dst)
}

/// [`rewrite`] with the source and destination read where they are (the worker's own MAC, the
/// backend's): through a [`Macs`] built for the call, the source went by the stack, stored and
/// loaded again (~5 instructions a DSR packet, callgrind).
#[inline]
pub(crate) fn rewrite_from(frame: &mut Frame<'_>, src: &[u8; 6], dst: &[u8; 6]) -> Result<(), RewriteError> {
    set_macs_from(frame.data_mut(), src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker's form, from the MACs where they are, writes what a [`Macs`] of them gives: the
    /// destination first, then the source, and nothing else; a frame too short for them is refused.
    #[test]
    fn rewrite_from_is_rewrite() {
        let (src, dst) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let input: [u8; 16] = core::array::from_fn(|i| 0xa0 + i as u8);
        let mut expected = input;
        expected[..6].copy_from_slice(&dst);
        expected[6..12].copy_from_slice(&src);
        for len in [16, 12, 11, 0] {
            let (mut general, mut fast) = ([0u8; 20], [0u8; 20]);
            general[4..].copy_from_slice(&input);
            fast[4..].copy_from_slice(&input);
            let by_macs = rewrite(&mut Frame::new(&mut general, 4, len), &Macs { src, dst });
            let by_refs = rewrite_from(&mut Frame::new(&mut fast, 4, len), &src, &dst);
            assert_eq!(by_refs, by_macs, "len {len}");
            assert_eq!(fast, general, "len {len}");
            if len >= 12 {
                assert_eq!(fast[4..], expected, "len {len}");
            } else {
                assert_eq!(by_refs, Err(RewriteError::Inconsistent), "len {len}");
                assert_eq!(fast[4..], input, "len {len}");
            }
        }
    }
}
