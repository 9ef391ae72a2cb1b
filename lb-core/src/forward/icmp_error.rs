//! ICMP errors built in place, for [`super::too_big`] and [`super::time_exceeded`]: the frame that
//! caused the error becomes it, in its own buffer, and leaves the way it came.
//!
//! ```text
//!  in:   [eth (+ VLAN tags)] [IP packet ................................] [padding]
//!  out:  [eth, MACs swapped] [IP header] [ICMP header] [the IP packet's first bytes]
//!                            └── 28 (IPv4) / 48 (IPv6) bytes of headroom ┘
//! ```
//!
//! The Ethernet addresses are swapped (back to the sender or its router, from the node's MAC), VLAN
//! tags kept; the error goes from the packet's destination (a VIP, a SNAT address) to its source,
//! TTL / hop limit 64, and quotes the packet as received, from its IP header on, as much as fits in
//! 576 bytes for IPv4 (RFC 1812 4.3.2.3; RFC 792 asks the IP header and 8 bytes at least) and 1280
//! for IPv6 (RFC 4443 2.4 (c)).

use core::net::IpAddr;

use super::{RewriteError, checksum, set_macs, write16};
use crate::config::SpecialAddress;
use crate::frame::Frame;
use crate::packet::{Family, Parsed};

/// The most an ICMPv4 error may be (RFC 1812 4.3.2.3).
const MAX_ERROR_V4: usize = 576;
/// The most an ICMPv6 error may be (the IPv6 minimum MTU, RFC 4443 2.4).
const MAX_ERROR_V6: usize = 1280;
/// TTL / hop limit of an error (Linux's default).
const ERROR_TTL: u8 = 64;

/// False for a source address an ICMP error must not be sent to, as it names no single host: RFC
/// 1122 3.2.2 (zero, loopback, broadcast, multicast, class E) and RFC 4443 2.4 (e) (unspecified,
/// multicast); what [`SpecialAddress`] names (which no VIP or backend may be either), and class E.
pub(super) fn names_one_host(src: IpAddr) -> bool {
    let class_e = matches!(src, IpAddr::V4(a) if a.octets()[0] >= 240);
    SpecialAddress::of(src).is_none() && !class_e
}

/// Turns the frame into the ICMP (IPv4) or ICMPv6 error with the 8-byte `header` (type, code, a
/// zero checksum and the type's 4 bytes), sent from `local_mac` back to the frame's source MAC.
/// Needs 28 (IPv4) or 48 (IPv6) bytes of headroom. On error the frame may be partly rewritten and
/// must be dropped.
pub(super) fn build(
    frame: &mut Frame<'_>,
    p: &Parsed,
    header: [u8; 8],
    local_mac: [u8; 6],
) -> Result<(), RewriteError> {
    let (l3, end) = super::ip_range(frame, p)?;
    // The new IP header and the 8-byte ICMP header go in front of the quote.
    let grow = super::ip_header_len(p.family()) + 8;
    let max = match p.family() {
        Family::V4 => MAX_ERROR_V4,
        Family::V6 => MAX_ERROR_V6,
    };
    let quote = (end - l3).min(max - grow);
    let client_mac: [u8; 6] =
        frame.data().get(6..12).and_then(|m| m.try_into().ok()).ok_or(RewriteError::Inconsistent)?;
    // The quote stays where it is; the L2 header moves `grow` bytes to the front and the new IP and
    // ICMP headers go between.
    frame.set_len(l3 + quote).ok_or(RewriteError::Inconsistent)?;
    let have = frame.headroom();
    let buf = frame.push_front(grow).ok_or(RewriteError::NoHeadroom { needed: grow, have })?;
    buf.copy_within(grow..grow + l3, 0);
    set_macs(buf, &super::Macs { src: local_mac, dst: client_mac })?;
    let (from, to) = (p.flow.dst_ip(), p.flow.src_ip());
    let out = buf.get_mut(l3..l3 + grow + quote).ok_or(RewriteError::Inconsistent)?;
    let total = u16::try_from(grow + quote).map_err(|_| RewriteError::Inconsistent)?;
    match (from, to) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let (ip, rest) = out.split_at_mut(20);
            // TOS 0xc0 (internetwork control, as Linux sends its errors), no fragment flags.
            ip.copy_from_slice(&[0x45, 0xc0, 0, 0, 0, 0, 0, 0, ERROR_TTL, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            write16(ip, 2, total)?;
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let c = checksum::finish(checksum::sum(ip));
            write16(ip, 10, c)?;
            rest[..8].copy_from_slice(&header);
            write16(rest, 2, 0)?;
            let c = checksum::finish(checksum::sum(rest));
            write16(rest, 2, c)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let (ip, rest) = out.split_at_mut(40);
            ip[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, 58, ERROR_TTL]);
            write16(ip, 4, total - 40)?;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            rest[..8].copy_from_slice(&header);
            write16(rest, 2, 0)?;
            let len = u32::from(total - 40);
            let c =
                checksum::finish(checksum::pseudo_header(&src.octets(), &dst.octets(), 58, len) + checksum::sum(rest));
            write16(rest, 2, c)
        }
        _ => Err(RewriteError::Inconsistent),
    }
}
