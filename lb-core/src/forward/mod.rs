//! Rewriting a parsed frame in place for its backend: one file per forwarding mode.
//!
//! | mode | what changes | frame size |
//! |---|---|---|
//! | [`nat`] (full NAT) | MACs; IP source and destination; ports; TTL / hop limit − 1; checksums patched (RFC 1624) | same |
//! | [`dsr`] (IPVS "DR") | MACs only | same |
//! | [`ipip`] (IPVS "TUN") | MACs; outer IPv4 (protocol 4 / 41) or IPv6 (next header 41 / 4) header prepended | + 20 or 40 |
//! | [`gue`] (Katran) | MACs; outer IP + UDP + 4-byte GUE header prepended | + 32 or 52 |
//!
//! Every function takes the frame, the [`Parsed`] result of the same frame and a
//! target, allocates nothing and never panics: offsets from the parse are re-checked against the
//! frame, and a mismatch is a [`RewriteError`], as are an expired TTL, a family mismatch or too little
//! headroom. On error the frame may be partly rewritten and must be dropped (the worker counts the
//! reason). Tunnel modes grow the frame into its headroom: [`crate::Frame::HEADROOM_NEEDED`] (64
//! bytes) covers the largest, GUE over IPv6 (52). With `NodeConfig::tunnel_mtu` set, a packet the
//! tunnel would push past it is answered by [`too_big`] instead, and a full-NAT packet whose TTL
//! expires by [`time_exceeded`].

pub mod checksum;
pub mod dsr;
pub mod gue;
mod icmp_error;
pub mod ipip;
pub mod nat;
pub mod time_exceeded;
pub mod too_big;

use core::net::IpAddr;

use crate::frame::Frame;
use crate::packet::{Family, Parsed, proto};
use checksum::ChecksumDelta;

/// The Ethernet addresses a forwarded frame leaves with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Macs {
    /// Source: the node's port.
    pub src: [u8; 6],
    /// Destination: the backend's MAC, or the next hop's.
    pub dst: [u8; 6],
}

/// Where a tunnelled frame goes: the outer header's addresses (both of one family, which may differ
/// from the inner packet's) and the Ethernet addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelTarget {
    /// The node's tunnel source address.
    pub src: IpAddr,
    /// The backend's address.
    pub dst: IpAddr,
    /// Ethernet addresses of the encapsulated frame.
    pub macs: Macs,
    /// The flow's hash: GUE takes its UDP source port from it, an outer IPv6 header its flow label,
    /// so the backend's NIC (RSS) and the routers (ECMP) spread flows while keeping each in order.
    pub flow_hash: u32,
    /// The outer IPv4 identification of a packet that may be fragmented on the way (an inner IPv4
    /// packet without DF): the caller's counter, as RFC 6864 asks one unique per source,
    /// destination and protocol while fragments may meet. Not the inner packet's: many clients'
    /// packets share the tunnel's addresses, and their own identifications collide. Unused for a
    /// packet with DF (0: atomic) and for an outer IPv6 header.
    pub ip_id: u16,
}

/// Why a frame could not be rewritten. Each maps to a counted drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RewriteError {
    /// The TTL or hop limit was 1 or 0: a router must not forward it. The frame is unchanged (the
    /// worker answers it: see [`time_exceeded`]).
    #[error("TTL/hop limit {ttl} expired in transit")]
    TtlExpired {
        /// The TTL found.
        ttl: u8,
    },
    /// The NAT target's addresses are of another IP family than the packet (no NAT46/64).
    #[error("address family mismatch between packet ({packet:?}) and target ({target:?})")]
    FamilyMismatch {
        /// The packet's family.
        packet: Family,
        /// The target's family.
        target: Family,
    },
    /// A tunnel's source and destination addresses are of different families.
    #[error("tunnel source and destination addresses are of different IP families")]
    MixedTunnelFamilies,
    /// The frame has less headroom than the encapsulation needs.
    #[error("encapsulation needs {needed} bytes of headroom, frame has {have}")]
    NoHeadroom {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The encapsulated packet would exceed the outer header's 16-bit length field.
    #[error("encapsulated length {len} exceeds 65535")]
    TooBig {
        /// Length of the would-be packet.
        len: usize,
    },
    /// The mode cannot translate this kind of packet (e.g. NAT of a protocol without ports).
    #[error("NAT cannot translate IP protocol {proto}")]
    Untranslatable {
        /// The IP protocol number.
        proto: u8,
    },
    /// The parse result does not fit the frame (it belongs to another frame, or the frame changed).
    #[error("parse result does not match the frame")]
    Inconsistent,
}

/// Writes the Ethernet addresses.
fn set_macs(pkt: &mut [u8], macs: &Macs) -> Result<(), RewriteError> {
    set_macs_from(pkt, &macs.src, &macs.dst)
}

/// [`set_macs`] from addresses where they are, with no [`Macs`] built for them.
#[inline]
fn set_macs_from(pkt: &mut [u8], src: &[u8; 6], dst: &[u8; 6]) -> Result<(), RewriteError> {
    let eth = pkt.get_mut(..12).ok_or(RewriteError::Inconsistent)?;
    eth[..6].copy_from_slice(dst);
    eth[6..].copy_from_slice(src);
    Ok(())
}

/// `buf[at..at + N]`, or [`RewriteError::Inconsistent`].
fn field<const N: usize>(buf: &mut [u8], at: usize) -> Result<&mut [u8; N], RewriteError> {
    buf.get_mut(at..at.saturating_add(N))
        .and_then(|s| <&mut [u8; N]>::try_from(s).ok())
        .ok_or(RewriteError::Inconsistent)
}

fn read16(buf: &mut [u8], at: usize) -> Result<u16, RewriteError> {
    field::<2>(buf, at).map(|b| u16::from_be_bytes(*b))
}

fn write16(buf: &mut [u8], at: usize, v: u16) -> Result<(), RewriteError> {
    *field::<2>(buf, at)? = v.to_be_bytes();
    Ok(())
}

/// Overwrites `buf[at..at + new.len()]` with `new` and records the change in `delta`.
fn replace(buf: &mut [u8], at: usize, new: &[u8], delta: &mut ChecksumDelta) -> Result<(), RewriteError> {
    let old = buf.get_mut(at..at.saturating_add(new.len())).ok_or(RewriteError::Inconsistent)?;
    delta.replace(old, new);
    old.copy_from_slice(new);
    Ok(())
}

/// Replaces the 16-bit word at `at` and records the change in `delta`.
fn replace16(buf: &mut [u8], at: usize, new: u16, delta: &mut ChecksumDelta) -> Result<(), RewriteError> {
    let old = read16(buf, at)?;
    delta.replace16(old, new);
    write16(buf, at, new)
}

/// Patches the 16-bit checksum at `at` for `delta`.
fn patch_checksum(buf: &mut [u8], at: usize, delta: ChecksumDelta) -> Result<(), RewriteError> {
    let old = read16(buf, at)?;
    write16(buf, at, delta.apply(old))
}

/// Offset of the checksum field in a TCP or UDP header.
fn l4_checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        proto::TCP => Some(16),
        proto::UDP => Some(6),
        _ => None,
    }
}

/// Length of an IP header without options or extension headers: 20 for IPv4, 40 for IPv6.
const fn ip_header_len(family: Family) -> usize {
    match family {
        Family::V4 => 20,
        Family::V6 => 40,
    }
}

/// The IP packet's bounds in the frame, `l3_offset..l3_offset + ip_len`, checked.
fn ip_range(frame: &Frame<'_>, p: &Parsed) -> Result<(usize, usize), RewriteError> {
    let l3 = p.l3_offset as usize;
    let end = l3.checked_add(p.ip_len as usize).ok_or(RewriteError::Inconsistent)?;
    if end > frame.len() || (p.ip_len as usize) < ip_header_len(p.family()) || l3 < 14 {
        return Err(RewriteError::Inconsistent);
    }
    Ok((l3, end))
}

/// Prepends an outer IP header (and `extra` more bytes for the caller, e.g. UDP + GUE) in front of
/// the IP packet, moving the Ethernet header and its VLAN tags to the new front. Returns the frame's
/// bytes and the offset just after the outer IP header. The frame is unchanged on error.
fn encapsulate<'f>(
    frame: &'f mut Frame<'_>,
    p: &Parsed,
    t: &TunnelTarget,
    next_header: u8,
    extra: usize,
) -> Result<(&'f mut [u8], usize), RewriteError> {
    let (l3, end) = ip_range(frame, p)?;
    let outer_family = Family::of(t.src);
    if Family::of(t.dst) != outer_family {
        return Err(RewriteError::MixedTunnelFamilies);
    }
    let outer_ip_len = ip_header_len(outer_family);
    let grow = outer_ip_len + extra;
    let inner_len = end - l3;
    let outer_total = grow + inner_len;
    if outer_total > usize::from(u16::MAX) + if outer_family == Family::V6 { 40 } else { 0 } {
        return Err(RewriteError::TooBig { len: outer_total });
    }
    if frame.headroom() < grow {
        return Err(RewriteError::NoHeadroom { needed: grow, have: frame.headroom() });
    }
    // Read what the outer header copies from the inner one before anything moves.
    let inner = frame.data().get(l3..l3 + 8).ok_or(RewriteError::Inconsistent)?;
    let (tos, inner_df) = match p.family() {
        Family::V4 => (inner[1], inner[6] & 0x40 != 0),
        Family::V6 => ((inner[0] << 4) | (inner[1] >> 4), true),
    };
    // Drop Ethernet padding so it does not end up inside the outer packet.
    frame.set_len(end).ok_or(RewriteError::Inconsistent)?;
    let buf = frame.push_front(grow).ok_or(RewriteError::NoHeadroom { needed: grow, have: 0 })?;
    buf.copy_within(grow..grow + l3, 0);
    let ether_type: u16 = match outer_family {
        Family::V4 => 0x0800,
        Family::V6 => 0x86dd,
    };
    write16(buf, l3 - 2, ether_type)?;
    set_macs(buf, &t.macs)?;
    let outer = buf.get_mut(l3..l3 + outer_ip_len).ok_or(RewriteError::Inconsistent)?;
    match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(outer_total).map_err(|_| RewriteError::TooBig { len: outer_total })?;
            // An atomic datagram (DF set) needs no identification (RFC 6864); one that may be
            // fragmented on the way takes the caller's, unique per tunnel (see `TunnelTarget::ip_id`).
            let (df, [id_hi, id_lo]) = if inner_df { (0x40, [0, 0]) } else { (0, t.ip_id.to_be_bytes()) };
            let [tl_hi, tl_lo] = total.to_be_bytes();
            let [s0, s1, s2, s3] = s.octets();
            let [d0, d1, d2, d3] = d.octets();
            let mut h = [
                0x45,
                tos,
                tl_hi,
                tl_lo,
                id_hi,
                id_lo,
                df,
                0,
                OUTER_TTL,
                next_header,
                0,
                0,
                s0,
                s1,
                s2,
                s3,
                d0,
                d1,
                d2,
                d3,
            ];
            let c = checksum::finish(checksum::sum(&h)).to_be_bytes();
            h[10] = c[0];
            h[11] = c[1];
            outer.copy_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let payload = u16::try_from(outer_total - 40).map_err(|_| RewriteError::TooBig { len: outer_total })?;
            let label = t.flow_hash & 0x000f_ffff;
            let vtf = (6u32 << 28) | (u32::from(tos) << 20) | label;
            outer[..4].copy_from_slice(&vtf.to_be_bytes());
            outer[4..6].copy_from_slice(&payload.to_be_bytes());
            outer[6] = next_header;
            outer[7] = OUTER_TTL;
            outer[8..24].copy_from_slice(&s.octets());
            outer[24..40].copy_from_slice(&d.octets());
        }
        _ => return Err(RewriteError::Inconsistent),
    }
    Ok((buf, l3 + outer_ip_len))
}

/// TTL / hop limit of an outer tunnel header (Linux's default).
const OUTER_TTL: u8 = 64;

/// IP protocol number that announces an inner packet of `family` (IP-in-IP: 4, IPv6: 41).
fn inner_proto(family: Family) -> u8 {
    match family {
        Family::V4 => proto::IPIP,
        Family::V6 => proto::IPV6,
    }
}
