//! Direct server return (IPVS "DR", Maglev): only the Ethernet addresses change. The backend holds
//! the VIP on a loopback (and does not answer ARP for it), accepts the packet as addressed to itself
//! and answers the client directly; replies never come back through the balancer. Nothing in the IP
//! packet changes, so no checksum does, and the TTL is left alone (the balancer acts as a bridge).

use super::{Macs, RewriteError, set_macs};
use crate::frame::Frame;

/// Sets the frame's Ethernet source and destination.
#[inline]
pub fn rewrite(frame: &mut Frame<'_>, macs: &Macs) -> Result<(), RewriteError> {
    set_macs(frame.data_mut(), macs)
}
