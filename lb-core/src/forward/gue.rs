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
//! accepted by receivers configured for it (RFC 6935); that sum covers the whole inner packet, the
//! one full checksum any mode computes.

use super::checksum::{finish, pseudo_header, sum};
use super::{RewriteError, TunnelTarget, encapsulate, inner_proto, write16};
use crate::frame::Frame;
use crate::packet::{Parsed, proto};
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
        let datagram = buf.get(udp..).ok_or(RewriteError::Inconsistent)?;
        let acc = pseudo_header(&s.octets(), &d.octets(), proto::UDP, u32::from(udp_len16)) + sum(datagram);
        let c = match finish(acc) {
            0 => 0xffff,
            c => c,
        };
        write16(buf, udp + 6, c)?;
    }
    Ok(())
}
