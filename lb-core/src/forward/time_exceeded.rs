//! TTL / hop limit expired: full NAT routes, and a packet it cannot forward (TTL or hop limit 1 or
//! 0, refused by [`super::nat::rewrite`] before it writes anything) is answered as a router answers
//! it, and as IPVS does (`ip_vs_xmit.c`, `decrement_ttl`), so traceroute through a NAT VIP shows the
//! hop instead of a silent one.
//!
//! ```text
//!  IPv4              ─► ICMP time exceeded (11/0), "time to live exceeded in transit"
//!  IPv6              ─► ICMPv6 time exceeded (3/0), "hop limit exceeded in transit"
//!  an ICMP error, a fragment but the first, a source that names no single host, a frame sent to a
//!  link-layer broadcast or multicast address (RFC 1122 3.2.2, RFC 1812 4.3.2.7, RFC 4443 2.4 (e))
//!                    ─► dropped and counted (`ttl_expired`), no error
//! ```
//!
//! The error is built in place, as [`super::too_big`]'s are (the frame's own buffer becomes it, the
//! Ethernet addresses swapped, VLAN tags kept), from the address the packet was sent to (the VIP, or
//! for a backend's reply the SNAT address) back to its sender, TTL 64, quoting the packet as it
//! came: as much as fits in 576 bytes (IPv4) or 1280 (IPv6). The worker answers at most
//! `node.time_exceeded_per_second` ([`TIME_EXCEEDED_PER_SECOND`] by default) a second on each core:
//! an error can be larger than the packet it answers (by its 28 or 48 bytes of headers), and its
//! destination is the packet's source, which a flood may spoof.

use super::RewriteError;
use super::icmp_error::{self, names_one_host};
use crate::frame::Frame;
use crate::packet::{Family, Fragment, L4, Parsed};

/// The default of [`NodeConfig::time_exceeded_per_second`](crate::config::NodeConfig::time_exceeded_per_second),
/// the most time exceeded errors a worker sends in one second (Linux's `net.ipv4.icmp_msgs_per_sec`
/// default, there for the whole host).
pub const TIME_EXCEEDED_PER_SECOND: u32 = 1000;

/// Whether the expired packet may be answered: not an ICMP error, not a fragment but the first,
/// from a source that names a single host, and not sent to a link-layer group address.
pub fn can_answer(frame: &Frame<'_>, p: &Parsed) -> bool {
    let to_group = frame.data().first().is_none_or(|&b| b & 1 != 0);
    !matches!(p.l4, L4::IcmpError(_)) && p.fragment != Fragment::Later && !to_group && names_one_host(p.flow.src_ip())
}

/// Turns the frame, an expired packet as received, into the time exceeded error for its sender,
/// sent from `local_mac` back to the frame's source MAC. Needs 28 (IPv4) or 48 (IPv6) bytes of
/// headroom. On error the frame may be partly rewritten and must be dropped.
pub fn reply(frame: &mut Frame<'_>, p: &Parsed, local_mac: [u8; 6]) -> Result<(), RewriteError> {
    // Type, code 0 (in transit), a zero checksum, 4 unused bytes.
    let header = match p.family() {
        Family::V4 => [11, 0, 0, 0, 0, 0, 0, 0],
        Family::V6 => [3, 0, 0, 0, 0, 0, 0, 0],
    };
    icmp_error::build(frame, p, header, local_mac)
}
