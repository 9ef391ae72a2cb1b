//! The worker's seam to the frame rewrites: NAT, DSR, IP-in-IP and GUE on a parsed frame.
//!
//! Until lb-core's `forward` module (written in parallel) lands, this file holds a small, complete
//! implementation so the worker runs end to end; the worker calls only the functions below, so
//! switching to `forward` touches this file alone. Checksums are updated incrementally (RFC 1624,
//! eq. 3) for NAT; outer headers of tunnels get a full header checksum (IPv4) and a full UDP checksum
//! for GUE over IPv6 (over IPv4 the GUE UDP checksum is 0, as RFC 768 allows and Katran does).
//!
//! Every access is bounds-checked (`get_mut`); a frame that contradicts its [`Parsed`] is a counted
//! drop, never a panic.

use core::net::IpAddr;

use crate::frame::Frame;
use crate::packet::{Family, L4, Parsed, proto};
use crate::stats::DropReason;

/// Ethernet addresses a transmitted frame gets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Macs {
    pub(crate) src: [u8; 6],
    pub(crate) dst: [u8; 6],
}

/// Outer TTL / hop limit of tunnel headers.
const OUTER_TTL: u8 = 64;

fn write_macs(data: &mut [u8], macs: Macs) -> Result<(), DropReason> {
    let eth = data.get_mut(..12).ok_or(DropReason::Truncated)?;
    eth[..6].copy_from_slice(&macs.dst);
    eth[6..].copy_from_slice(&macs.src);
    Ok(())
}

/// RFC 1624 eq. 3: the checksum `csum` after the bytes `old` (even length) became `new`.
pub(crate) fn checksum_adjust(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!csum);
    for c in old.chunks_exact(2) {
        sum += u32::from(!u16::from_be_bytes([c[0], c[1]]));
    }
    for c in new.chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One's complement sum of `bytes` (odd length padded with a zero byte), not yet folded.
fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn read16(data: &[u8], at: usize) -> Result<u16, DropReason> {
    let b = data.get(at..at + 2).ok_or(DropReason::Truncated)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn write16(data: &mut [u8], at: usize, v: u16) -> Result<(), DropReason> {
    data.get_mut(at..at + 2).ok_or(DropReason::Truncated)?.copy_from_slice(&v.to_be_bytes());
    Ok(())
}

fn addr_len(family: Family) -> usize {
    match family {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

fn wire(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// Full NAT (either direction): source becomes `src`, destination `dst`, TTL drops by one, checksums
/// follow incrementally, Ethernet addresses become `macs`.
pub(crate) fn nat(
    frame: &mut Frame<'_>,
    p: &Parsed,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    macs: Macs,
) -> Result<(), DropReason> {
    let family = p.family();
    if Family::of(src.0) != family || Family::of(dst.0) != family {
        return Err(DropReason::Unsupported);
    }
    if p.ttl <= 1 {
        return Err(DropReason::TtlExpired);
    }
    let csum_at = match p.l4 {
        L4::Tcp => 16,
        L4::Udp => 6,
        _ => return Err(DropReason::Unsupported),
    };
    let (l3, l4) = (p.l3_offset as usize, p.l4_offset as usize);
    let data = frame.data_mut();
    let n = addr_len(family);
    let (src_at, dst_at) = match family {
        Family::V4 => (l3 + 12, l3 + 16),
        Family::V6 => (l3 + 8, l3 + 24),
    };
    let new_src = wire(&src.0);
    let new_dst = wire(&dst.0);
    let mut old_addrs = [0u8; 32];
    old_addrs[..n].copy_from_slice(data.get(src_at..src_at + n).ok_or(DropReason::Truncated)?);
    old_addrs[16..16 + n].copy_from_slice(data.get(dst_at..dst_at + n).ok_or(DropReason::Truncated)?);
    let old_ports = data.get(l4..l4 + 4).ok_or(DropReason::Truncated)?;
    let old_ports = [old_ports[0], old_ports[1], old_ports[2], old_ports[3]];
    let mut new_ports = [0u8; 4];
    new_ports[..2].copy_from_slice(&src.1.to_be_bytes());
    new_ports[2..].copy_from_slice(&dst.1.to_be_bytes());

    // Transport checksum: pseudo-header addresses and the ports.
    let l4_csum = read16(data, l4 + csum_at)?;
    let udp_v4_no_csum = p.l4 == L4::Udp && family == Family::V4 && l4_csum == 0;
    if !udp_v4_no_csum {
        let mut c = checksum_adjust(l4_csum, &old_addrs[..n], &new_src[..n]);
        c = checksum_adjust(c, &old_addrs[16..16 + n], &new_dst[..n]);
        c = checksum_adjust(c, &old_ports, &new_ports);
        if p.l4 == L4::Udp && c == 0 {
            c = 0xffff;
        }
        write16(data, l4 + csum_at, c)?;
    }
    data.get_mut(l4..l4 + 4).ok_or(DropReason::Truncated)?.copy_from_slice(&new_ports);

    match family {
        Family::V4 => {
            let ttl_proto = read16(data, l3 + 8)?;
            let new_ttl_proto = ttl_proto - 0x0100;
            let mut c = read16(data, l3 + 10)?;
            c = checksum_adjust(c, &ttl_proto.to_be_bytes(), &new_ttl_proto.to_be_bytes());
            c = checksum_adjust(c, &old_addrs[..n], &new_src[..n]);
            c = checksum_adjust(c, &old_addrs[16..16 + n], &new_dst[..n]);
            write16(data, l3 + 8, new_ttl_proto)?;
            write16(data, l3 + 10, c)?;
        }
        Family::V6 => {
            let hop = data.get_mut(l3 + 7).ok_or(DropReason::Truncated)?;
            *hop -= 1;
        }
    }
    data.get_mut(src_at..src_at + n).ok_or(DropReason::Truncated)?.copy_from_slice(&new_src[..n]);
    data.get_mut(dst_at..dst_at + n).ok_or(DropReason::Truncated)?.copy_from_slice(&new_dst[..n]);
    write_macs(data, macs)
}

/// Direct server return: only the Ethernet addresses change.
pub(crate) fn dsr(frame: &mut Frame<'_>, macs: Macs) -> Result<(), DropReason> {
    write_macs(frame.data_mut(), macs)
}

/// What a tunnel wraps the IP packet in.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tunnel {
    /// IP-in-IP (IPv4 in IPv4, IPv6 in IPv6).
    IpIp,
    /// GUE variant 0 over UDP with these ports.
    Gue {
        /// Outer UDP source port (from the flow hash).
        sport: u16,
        /// Outer UDP destination port.
        dport: u16,
    },
}

/// Bytes of UDP + GUE header.
const GUE_OVERHEAD: usize = 8 + 4;

/// Wraps the frame's IP packet in an outer IP header (and UDP + GUE for GUE) from `outer_src` to
/// `outer_dst`, growing the frame into its headroom; Ethernet (and VLAN tags) stay in front.
pub(crate) fn encapsulate(
    frame: &mut Frame<'_>,
    p: &Parsed,
    tunnel: Tunnel,
    outer_src: IpAddr,
    outer_dst: IpAddr,
    macs: Macs,
) -> Result<(), DropReason> {
    let family = p.family();
    if Family::of(outer_src) != family || Family::of(outer_dst) != family {
        return Err(DropReason::Unsupported);
    }
    let l3 = p.l3_offset as usize;
    let inner_len = p.ip_len as usize;
    let ip_hdr = match family {
        Family::V4 => 20,
        Family::V6 => 40,
    };
    let extra = match tunnel {
        Tunnel::IpIp => 0,
        Tunnel::Gue { .. } => GUE_OVERHEAD,
    };
    let add = ip_hdr + extra;
    if frame.headroom() < add {
        return Err(DropReason::NoHeadroom);
    }
    // Drop Ethernet padding: the outer length fields count the inner IP packet only.
    frame.set_len(l3 + inner_len).ok_or(DropReason::Malformed)?;
    let data = frame.push_front(add).ok_or(DropReason::NoHeadroom)?;
    if data.len() < add + l3 {
        return Err(DropReason::Truncated);
    }
    data.copy_within(add..add + l3, 0);
    let inner_proto = match family {
        Family::V4 => proto::IPIP,
        Family::V6 => proto::IPV6,
    };
    let outer_proto = match tunnel {
        Tunnel::IpIp => inner_proto,
        Tunnel::Gue { .. } => proto::UDP,
    };
    let payload_len = extra + inner_len;
    let (s, d) = (wire(&outer_src), wire(&outer_dst));
    let hdr = data.get_mut(l3..l3 + ip_hdr).ok_or(DropReason::Truncated)?;
    match family {
        Family::V4 => {
            let total = u16::try_from(ip_hdr + payload_len).map_err(|_| DropReason::Unsupported)?;
            hdr[0] = 0x45;
            hdr[1] = 0;
            hdr[2..4].copy_from_slice(&total.to_be_bytes());
            hdr[4..8].fill(0);
            hdr[8] = OUTER_TTL;
            hdr[9] = outer_proto;
            hdr[10..12].fill(0);
            hdr[12..16].copy_from_slice(&s[..4]);
            hdr[16..20].copy_from_slice(&d[..4]);
            let c = !fold(sum_words(hdr));
            hdr[10..12].copy_from_slice(&c.to_be_bytes());
        }
        Family::V6 => {
            let plen = u16::try_from(payload_len).map_err(|_| DropReason::Unsupported)?;
            hdr[..4].copy_from_slice(&[0x60, 0, 0, 0]);
            hdr[4..6].copy_from_slice(&plen.to_be_bytes());
            hdr[6] = outer_proto;
            hdr[7] = OUTER_TTL;
            hdr[8..24].copy_from_slice(&s);
            hdr[24..40].copy_from_slice(&d);
        }
    }
    if let Tunnel::Gue { sport, dport } = tunnel {
        let at = l3 + ip_hdr;
        let udp_len = u16::try_from(payload_len).map_err(|_| DropReason::Unsupported)?;
        let udp = data.get_mut(at..at + GUE_OVERHEAD).ok_or(DropReason::Truncated)?;
        udp[0..2].copy_from_slice(&sport.to_be_bytes());
        udp[2..4].copy_from_slice(&dport.to_be_bytes());
        udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
        udp[6..8].fill(0);
        // GUE variant 0, no control flag, no extension fields; the protocol of what follows.
        udp[8..12].copy_from_slice(&[0, inner_proto, 0, 0]);
        if family == Family::V6 {
            // RFC 8200 requires a UDP checksum over IPv6: pseudo-header + the whole datagram.
            let dgram = data.get(at..).ok_or(DropReason::Truncated)?;
            let mut sum = sum_words(&s).wrapping_add(sum_words(&d));
            sum = sum.wrapping_add(u32::from(udp_len)).wrapping_add(u32::from(proto::UDP));
            sum = sum.wrapping_add(sum_words(dgram));
            let mut c = !fold(sum);
            if c == 0 {
                c = 0xffff;
            }
            write16(data, at + 6, c)?;
        }
    }
    write_macs(data, macs)
}
