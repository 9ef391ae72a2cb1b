//! Generic UDP Encapsulation (draft-ietf-intarea-gue), variant 0, as Linux's `fou` module receives it
//! after `ip fou add port PORT gue`:
//!
//! ```text
//!  outer IPv4/IPv6 | UDP (sport from flow hash, dport PORT) | GUE: ver 0, C 0, hlen 0, proto 4 or 41, flags 0 | inner IP packet
//! ```
//!
//! Why variant 0 and not Katran's choice: Katran puts the inner packet straight after the UDP header
//! (GUE "variant 1", direct IP), which Linux also decapsulates on a `gue` port; variant 0 costs 4
//! bytes more but names the inner protocol explicitly, so any GUE receiver (not only Linux's version
//! check on the first nibble) can decapsulate it, and it leaves room for GUE options later. The
//! backend then needs the matching IP tunnel device as for [`super::ipip`].
//!
//! The UDP source port is `0xc000 | (flow_hash & 0x3fff)`: in the ephemeral range (49152..=65535,
//! as RFC 8086 advises for source-port entropy) and stable per flow, so the backend's NIC spreads
//! flows over its queues (RSS) and routers over their paths (ECMP). The outer UDP checksum is 0 over
//! IPv4 (allowed by RFC 768 and the GUE draft) and computed over IPv6, where a zero checksum is only
//! accepted by receivers configured for it (RFC 6935); that sum covers the whole inner packet, but
//! reads only its IP header when the inner TCP/UDP checksum already vouches for the rest (see
//! `inner_sum`).

use super::checksum::{finish, fold, pseudo_header, sum};
use super::{RewriteError, TunnelTarget, encapsulate, inner_proto, write16};
use crate::frame::Frame;
use crate::packet::{Family, Fragment, L4, Parsed, proto};
use core::net::IpAddr;

/// Length of the UDP header plus the GUE variant 0 base header.
pub const UDP_GUE_LEN: usize = 8 + 4;

/// The outer UDP source port for a flow hash.
pub const fn source_port(flow_hash: u32) -> u16 {
    0xc000 | (flow_hash & 0x3fff) as u16
}

/// Encapsulates the frame's IP packet in UDP + GUE to `t.dst`, UDP destination port `port`.
pub fn encap(frame: &mut Frame<'_>, p: &Parsed, t: &TunnelTarget, port: u16) -> Result<(), RewriteError> {
    let (buf, udp) = encapsulate(frame, p, t, proto::UDP, UDP_GUE_LEN)?;
    let udp_len = buf.len().checked_sub(udp).ok_or(RewriteError::Inconsistent)?;
    let udp_len16 = u16::try_from(udp_len).map_err(|_| RewriteError::TooBig { len: udp_len })?;
    write16(buf, udp, source_port(t.flow_hash))?;
    write16(buf, udp + 2, port)?;
    write16(buf, udp + 4, udp_len16)?;
    write16(buf, udp + 6, 0)?;
    let gue = [0, inner_proto(p.family()), 0, 0];
    buf.get_mut(udp + 8..udp + 12).ok_or(RewriteError::Inconsistent)?.copy_from_slice(&gue);
    if let (IpAddr::V6(s), IpAddr::V6(d)) = (t.src, t.dst) {
        let (headers, inner) = buf.get(udp..).ok_or(RewriteError::Inconsistent)?.split_at(UDP_GUE_LEN);
        let acc = pseudo_header(&s.octets(), &d.octets(), proto::UDP, u32::from(udp_len16))
            + sum(headers)
            + inner_sum(inner, p);
        let c = match finish(acc) {
            0 => 0xffff,
            c => c,
        };
        write16(buf, udp + 6, c)?;
    }
    Ok(())
}

/// Unfolded one's-complement sum of the inner IP packet, for the outer UDP checksum.
///
/// When the inner transport checksum covers everything after the inner IP header (TCP, or UDP
/// with a checksum and a length that spans the IP payload; not fragmented; no IPv4 options or IPv6
/// extension headers, which can change the pseudo-header's destination), that part sums to the
/// complement of its pseudo-header, which is what a valid checksum means, so only the IP header is
/// read: Linux calls this local checksum offload (LCO). It makes GUE over IPv6 cost the same for
/// every packet size. Should the inner checksum be wrong, the outer one is wrong by the same amount,
/// and the backend drops the packet at the UDP layer instead of at TCP: the same fate. Any other
/// packet is summed byte by byte.
fn inner_sum(inner: &[u8], p: &Parsed) -> u64 {
    let header_len = p.l4_offset.saturating_sub(p.l3_offset) as usize;
    let (header, segment) = inner.split_at_checked(header_len).unwrap_or((inner, &[]));
    let checksummed = match p.l4 {
        L4::Tcp => segment.len() >= 20,
        // A UDP checksum covers the UDP length's bytes only (RFC 768): with bytes past it in the IP
        // payload (a surplus area, where UDP options live), the shortcut would leave them out.
        L4::Udp => {
            segment.get(6..8).is_some_and(|c| c != [0, 0])
                && segment.get(4..6).is_some_and(|l| usize::from(u16::from_be_bytes([l[0], l[1]])) == segment.len())
        }
        _ => false,
    };
    let addrs = match (p.family(), header_len) {
        (Family::V4, 20) => header.get(12..16).zip(header.get(16..20)),
        (Family::V6, 40) => header.get(8..24).zip(header.get(24..40)),
        _ => None,
    };
    match addrs {
        Some((src, dst)) if checksummed && p.fragment == Fragment::None => {
            let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
            let pseudo = pseudo_header(src, dst, p.flow.proto(), len);
            sum(header) + u64::from(!fold(pseudo))
        }
        _ => sum(inner),
    }
}
