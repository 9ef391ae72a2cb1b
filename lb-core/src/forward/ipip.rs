//! IP-in-IP (IPVS "TUN"): the IP packet, untouched, behind a new outer IP header from the node's
//! tunnel address to the backend. The outer protocol is 4 for an inner IPv4 packet and 41 for an
//! inner IPv6 one, whatever the outer family, so IPv4-in-IPv4 (`ipip`), IPv6-in-IPv6 (`ip6tnl`) and
//! the mixed cases all work. The backend decapsulates with a tunnel device (e.g.
//! `ip link add tunl0 type ipip external` or the `tunl0` / `ip6tnl0` fallback devices) and, holding the
//! VIP on a loopback, answers the client directly.
//!
//! The outer header: IPv4 with DSCP/ECN copied from the inner packet, DF copied from the inner IPv4
//! packet (always set for IPv6), identification 0 when DF is set and otherwise the
//! caller's per-core counter ([`super::TunnelTarget::ip_id`]), TTL 64,
//! checksum computed over its 20 bytes; or
//! IPv6 with the traffic class copied, the flow label taken from the flow hash and hop limit 64.
//! The frame grows by 20 or 40 bytes at the front; the Ethernet header and VLAN tags move with it,
//! Ethernet padding is dropped. The inner packet is not touched (its TTL included). The frame may
//! now exceed the path MTU: give backends' links room for the outer headers (as with any IPVS TUN
//! or Katran setup), or set `NodeConfig::tunnel_mtu`, and the worker answers a packet that would not
//! fit with ICMP "fragmentation needed" / "packet too big" instead ([`super::too_big`]).

use super::{RewriteError, TunnelTarget, encapsulate, inner_proto};
use crate::frame::Frame;
use crate::packet::Parsed;

/// Encapsulates the frame's IP packet for `t.dst`.
pub fn encap(frame: &mut Frame<'_>, p: &Parsed, t: &TunnelTarget) -> Result<(), RewriteError> {
    encapsulate(frame, p, t, inner_proto(p.family()), 0).map(|_| ())
}
