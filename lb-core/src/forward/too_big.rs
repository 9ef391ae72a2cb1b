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
//! ```
//!
//! The error is built in place, in the frame's own buffer, and leaves the way the packet came: the
//! Ethernet addresses swapped (the sender's router, from the node's MAC), VLAN tags kept, from the
//! packet's destination (the VIP) to its source, TTL 64, quoting the packet's first bytes: up to 576
//! bytes in all for IPv4 (RFC 1812 4.3.2.3), up to 1280 for IPv6 (RFC 4443 2.4). The reported MTU is
//! the largest inner packet that fits: the path MTU less the tunnel's headers.

use core::net::IpAddr;

use super::{RewriteError, checksum, set_macs, write16};
use crate::config::{ForwardMode, SpecialAddress};
use crate::frame::Frame;
use crate::packet::{Family, L4, Parsed};

/// The most an ICMPv4 error may be (RFC 1812 4.3.2.3).
const MAX_ERROR_V4: usize = 576;
/// The most an ICMPv6 error may be (the IPv6 minimum MTU, RFC 4443 2.4).
const MAX_ERROR_V6: usize = 1280;
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
/// that names a single host, and for IPv4 one with DF set. The rest are dropped when too big.
pub fn can_signal(frame: &Frame<'_>, p: &Parsed) -> bool {
    if matches!(p.l4, L4::IcmpError(_)) || !names_one_host(p.flow.src_ip()) {
        return false;
    }
    match p.family() {
        Family::V6 => true,
        Family::V4 => frame.data().get(p.l3_offset as usize + 6).is_some_and(|&flags| flags & 0x40 != 0),
    }
}

/// False for a source address an ICMP error must not be sent to, as it names no single host: RFC
/// 1122 3.2.2 (zero, loopback, broadcast, multicast, class E) and RFC 4443 2.4 (e) (unspecified,
/// multicast); what [`SpecialAddress`] names (which no VIP or backend may be either), and class E.
fn names_one_host(src: IpAddr) -> bool {
    let class_e = matches!(src, IpAddr::V4(a) if a.octets()[0] >= 240);
    SpecialAddress::of(src).is_none() && !class_e
}

/// Turns the frame into the ICMP error telling the packet's sender to keep packets to `mtu` bytes,
/// sent from `local_mac` back to the frame's source MAC. Needs 28 (IPv4) or 48 (IPv6) bytes of
/// headroom. On error the frame may be partly rewritten and must be dropped.
pub fn reply(frame: &mut Frame<'_>, p: &Parsed, mtu: u16, local_mac: [u8; 6]) -> Result<(), RewriteError> {
    let (l3, end) = super::ip_range(frame, p)?;
    // The new IP header and the 8-byte ICMP header go in front of the quote.
    let header = super::ip_header_len(p.family()) + 8;
    let max = match p.family() {
        Family::V4 => MAX_ERROR_V4,
        Family::V6 => MAX_ERROR_V6,
    };
    let quote = (end - l3).min(max - header);
    let client_mac: [u8; 6] =
        frame.data().get(6..12).and_then(|m| m.try_into().ok()).ok_or(RewriteError::Inconsistent)?;
    // The quote stays where it is; the L2 header moves `header` bytes to the front and the new IP and
    // ICMP headers go between.
    frame.set_len(l3 + quote).ok_or(RewriteError::Inconsistent)?;
    let have = frame.headroom();
    let buf = frame.push_front(header).ok_or(RewriteError::NoHeadroom { needed: header, have })?;
    buf.copy_within(header..header + l3, 0);
    set_macs(buf, &super::Macs { src: local_mac, dst: client_mac })?;
    let (vip, client) = (p.flow.dst_ip(), p.flow.src_ip());
    let out = buf.get_mut(l3..l3 + header + quote).ok_or(RewriteError::Inconsistent)?;
    let total = u16::try_from(header + quote).map_err(|_| RewriteError::Inconsistent)?;
    match (vip, client) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let (ip, rest) = out.split_at_mut(20);
            ip.copy_from_slice(&[0x45, 0xc0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            write16(ip, 2, total)?;
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let c = checksum::finish(checksum::sum(ip));
            write16(ip, 10, c)?;
            // Type 3 (destination unreachable), code 4 (fragmentation needed), next-hop MTU.
            rest[..8].copy_from_slice(&[3, 4, 0, 0, 0, 0, 0, 0]);
            write16(rest, 6, mtu)?;
            let c = checksum::finish(checksum::sum(rest));
            write16(rest, 2, c)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let (ip, rest) = out.split_at_mut(40);
            ip[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, 58, 64]);
            write16(ip, 4, total - 40)?;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            // Type 2 (packet too big), code 0, MTU (32 bits).
            rest[..8].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
            rest[4..8].copy_from_slice(&u32::from(mtu.max(IPV6_MIN_MTU)).to_be_bytes());
            let len = u32::from(total - 40);
            let c =
                checksum::finish(checksum::pseudo_header(&src.octets(), &dst.octets(), 58, len) + checksum::sum(rest));
            write16(rest, 2, c)
        }
        _ => Err(RewriteError::Inconsistent),
    }
}
