//! Path MTU for the tunnel modes: a packet that the outer headers would push past the MTU of the
//! path to the backends is not sent; its sender gets the ICMP error that makes it send smaller ones
//! (RFC 1191 / RFC 8201), as Katran does, instead of the frame vanishing on the way (a TCP connection
//! that stalls at its first full-size segment).
//!
//! ```text
//!  IPv4, DF set   ─► ICMP destination unreachable, fragmentation needed (3/4), next-hop MTU
//!  IPv6           ─► ICMPv6 packet too big (2/0), MTU
//!  IPv4, DF clear ─► dropped and counted: the outer packet could be fragmented, but one frame in
//!                    makes one frame out here, and the kernel does not fragment AF_XDP frames
//!  an ICMP error  ─► dropped and counted: no ICMP error about an ICMP error (RFC 1122, RFC 4443)
//!  from a source that names no single host (unspecified, broadcast, multicast, loopback, IPv4
//!  class E: spoofed) ─► dropped and counted: no ICMP error to it (RFC 1122 3.2.2, RFC 4443 2.4 (e))
//!  IPv4 sent to a link-layer broadcast or multicast address ─► dropped and counted (RFC 1812
//!                    4.3.2.7; IPv6 is answered: RFC 4443 2.4 (e.3) excepts Packet Too Big)
//! ```
//!
//! The error is built in place, in the frame's own buffer, and leaves the way the packet came: the
//! Ethernet addresses swapped (the sender's router, from the node's MAC), VLAN tags kept, from the
//! packet's destination (the VIP) to its source, TTL 64, quoting the packet's first bytes: up to 576
//! bytes in all for IPv4 (RFC 1812 4.3.2.3), up to 1280 for IPv6 (RFC 4443 2.4). The reported MTU is
//! the largest inner packet that fits: the path MTU less the tunnel's headers.

use super::RewriteError;
use super::icmp_error::{self, names_one_host};
use crate::config::ForwardMode;
use crate::frame::Frame;
use crate::packet::{Family, L4, Parsed};

/// IPv6's minimum link MTU: no path may report less (RFC 8200 5).
pub const IPV6_MIN_MTU: u16 = 1280;
/// The least `NodeConfig::tunnel_mtu` accepted: IPv6's minimum packet behind the largest tunnel
/// headers (GUE over IPv6, 52 bytes).
#[expect(clippy::cast_possible_truncation, reason = "40 + 12 bytes")]
pub const MIN_TUNNEL_MTU: u16 = IPV6_MIN_MTU + (super::ip_header_len(Family::V6) + super::gue::UDP_GUE_LEN) as u16;

/// Bytes a tunnel mode puts in front of a packet of `family`: the outer IP header (of the packet's
/// own family: tunnel backends share the VIP's), plus UDP and GUE for GUE; `None` for other modes.
pub fn tunnel_overhead(mode: ForwardMode, family: Family) -> Option<u16> {
    let ip = super::ip_header_len(family);
    let bytes = match mode {
        ForwardMode::IpIp => ip,
        ForwardMode::Gue { .. } => ip + super::gue::UDP_GUE_LEN,
        ForwardMode::Nat | ForwardMode::Dsr => return None,
    };
    u16::try_from(bytes).ok()
}

/// Whether the packet can be told to shrink: TCP, UDP or another non-error packet, from a source
/// that names a single host, and for IPv4 one with DF set, sent to the worker's own link-layer
/// address (RFC 1812 4.3.2.7: no error about a link-layer broadcast or multicast; RFC 4443 2.4
/// (e.3, e.4) lets Packet Too Big answer one). The rest are dropped when too big.
pub fn can_signal(frame: &Frame<'_>, p: &Parsed) -> bool {
    if matches!(p.l4, L4::IcmpError(_)) || !names_one_host(p.flow.src_ip()) {
        return false;
    }
    match p.family() {
        Family::V6 => true,
        Family::V4 => {
            let data = frame.data();
            let to_group = data.first().is_none_or(|&b| b & 1 != 0);
            !to_group && data.get(p.l3_offset as usize + 6).is_some_and(|&flags| flags & 0x40 != 0)
        }
    }
}

/// Turns the frame into the ICMP error telling the packet's sender to keep packets to `mtu` bytes,
/// sent from `local_mac` back to the frame's source MAC. Needs 28 (IPv4) or 48 (IPv6) bytes of
/// headroom. On error the frame may be partly rewritten and must be dropped.
pub fn reply(frame: &mut Frame<'_>, p: &Parsed, mtu: u16, local_mac: [u8; 6]) -> Result<(), RewriteError> {
    let header = match p.family() {
        // Type 3 (destination unreachable), code 4 (fragmentation needed), next-hop MTU.
        Family::V4 => {
            let [hi, lo] = mtu.to_be_bytes();
            [3, 4, 0, 0, 0, 0, hi, lo]
        }
        // Type 2 (packet too big), code 0, MTU (32 bits).
        Family::V6 => {
            let [a, b, c, d] = u32::from(mtu.max(IPV6_MIN_MTU)).to_be_bytes();
            [2, 0, 0, 0, a, b, c, d]
        }
    };
    icmp_error::build(frame, p, header, local_mac)
}
