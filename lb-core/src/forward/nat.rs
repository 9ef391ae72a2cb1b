//! Full NAT (kube-proxy with masquerade, IPVS "FULLNAT"): both addresses and both ports change, so
//! the backend answers the node and needs no special routing.
//!
//! ```text
//!  client -> VIP        CLIENT:c  -> VIP:v        ==rewrite(to backend)==>  SNAT:s    -> BACKEND:b
//!  backend -> client    BACKEND:b -> SNAT:s       ==rewrite(to client)===>  VIP:v     -> CLIENT:c
//! ```
//!
//! One function, [`rewrite`], does both directions: the [`NatTarget`] says the flow the frame leaves
//! with. ICMP errors about a translated connection are translated too (as Linux conntrack's
//! `nf_nat_icmp_reply_translation` does): the outer addresses become the target's, and the quoted
//! packet, which travelled the other way, gets the target's addresses and ports reversed; the quoted
//! IPv4 header checksum, the quoted TCP/UDP checksum when the quote holds it, and the ICMP checksum are
//! patched. The worker finds the connection of an ICMP error by `IcmpError::inner.reverse()` and
//! passes the same target as for that direction's data packets.
//!
//! TTL / hop limit is decremented, as a router does; a frame that arrives with 1 or 0 is refused with
//! [`RewriteError::TtlExpired`], unchanged (the TTL is checked before anything is written), for the
//! worker to answer ([`super::time_exceeded`]). Checksums are patched incrementally (RFC 1624),
//! never recomputed. A non-first fragment has no ports: only its addresses change (the first
//! fragment's transport checksum already accounts for them), so every fragment of a datagram must
//! get the same target.

use super::checksum::{BigEndian, ChecksumDelta, NativeEndian, WordOrder};
use super::{Macs, field};
use super::{RewriteError, ip_range, l4_checksum_offset, patch_checksum, replace, replace16, set_macs};
use crate::frame::Frame;
use crate::packet::{Family, FlowKey, Fragment, IcmpError, L4, Parsed, proto};

/// The flow a NAT-ed frame leaves with, and its Ethernet addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatTarget {
    /// Source and destination address and port after translation. Towards a backend:
    /// `(SNAT address, SNAT port) -> (backend, backend port)`; towards a client:
    /// `(VIP, service port) -> (client, client port)`. Its protocol is not used.
    pub flow: FlowKey,
    /// Ethernet addresses.
    pub macs: Macs,
}

/// Translates the frame in place to `t`; see the module documentation.
pub fn rewrite(frame: &mut Frame<'_>, p: &Parsed, t: &NatTarget) -> Result<(), RewriteError> {
    let family = p.family();
    if t.flow.family() != family {
        return Err(RewriteError::FamilyMismatch { packet: family, target: t.flow.family() });
    }
    if !matches!(p.l4, L4::Tcp | L4::Udp | L4::IcmpError(_)) {
        return Err(RewriteError::Untranslatable { proto: p.flow.proto() });
    }
    let (l3, end) = ip_range(frame, p)?;
    let l4 = p.l4_offset as usize;
    if l4 < l3 || l4 > end {
        return Err(RewriteError::Inconsistent);
    }
    let pkt = frame.data_mut();
    // Addresses and TTL first: they fail (TTL expired) before anything is written.
    let addrs = match family {
        Family::V4 => rewrite_ipv4::<BigEndian>(pkt, l3, v4_octets(t.flow.src_bytes()), v4_octets(t.flow.dst_bytes()))?,
        Family::V6 => rewrite_ipv6(pkt, l3, &t.flow)?,
    };
    match p.l4 {
        L4::IcmpError(e) => {
            let mut icmp = if family == Family::V6 { addrs } else { ChecksumDelta::default() };
            translate_quote(pkt, &e, &t.flow.reverse(), family, &mut icmp)?;
            patch_checksum(pkt, l4 + 2, icmp)?;
        }
        _ if p.fragment == Fragment::Later => {}
        _ => rewrite_ports::<BigEndian>(pkt, l4, end, p.flow.proto(), addrs, ports_word(&t.flow))?,
    }
    set_macs(pkt, &t.macs)
}

/// [`rewrite`] of an IPv4 TCP or UDP frame that is not a later fragment (the caller's promise:
/// `None` otherwise, the frame unchanged) to `(src, sport) -> (dst, dport)`, with Ethernet source
/// `src_mac` and destination `dst_mac`: a full-NAT flow's packets to its backend. The same checks
/// and writes, in the same order, as `rewrite` with that target, taking the addresses, ports and
/// MACs where they are rather than from a [`NatTarget`] built for it (building it, and the call,
/// were ~60 instructions an established full-NAT packet, callgrind).
#[inline(always)]
pub(crate) fn rewrite_v4_ports(
    frame: &mut Frame<'_>,
    p: &Parsed,
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    (src_mac, dst_mac): (&[u8; 6], &[u8; 6]),
) -> Option<Result<(), RewriteError>> {
    if p.family() != Family::V4 || !matches!(p.l4, L4::Tcp | L4::Udp) || p.fragment == Fragment::Later {
        return None;
    }
    Some(rewrite_v4_ports_checked(
        frame,
        p,
        (src, dst),
        (u32::from(sport) << 16) | u32::from(dport),
        (src_mac, dst_mac),
    ))
}

/// [`rewrite_v4_ports`] once its promise is checked. Its checksums are patched in the machine's
/// byte order, none of their words swapped (swapping them to big-endian and back was ~12
/// instructions an IPv4 full-NAT packet, callgrind); `rewrite` keeps big-endian, as the ICMP
/// checksum it patches for an IPv6 error adds the address change to its own big-endian words.
#[inline(always)]
fn rewrite_v4_ports_checked(
    frame: &mut Frame<'_>,
    p: &Parsed,
    (src, dst): ([u8; 4], [u8; 4]),
    ports: u32,
    (src_mac, dst_mac): (&[u8; 6], &[u8; 6]),
) -> Result<(), RewriteError> {
    // An untagged IPv4 header without options and a whole TCP header (most packets): every offset a
    // constant, so one bounds check covers the headers (~12 checks fewer an established full-NAT
    // packet, callgrind). The same writes and result as below, which takes every other frame.
    let ip_len = p.ip_len as usize;
    if (p.l3_offset, p.l4_offset) == (UNTAGGED_L3, UNTAGGED_L3 + 20)
        && p.flow.proto() == proto::TCP
        && ip_len >= 20 + 18
        && let Some(h) =
            frame.data_mut().get_mut(..UNTAGGED_L3 as usize + ip_len).and_then(|s| s.first_chunk_mut::<52>())
    {
        let addrs = rewrite_ipv4::<NativeEndian>(h, 14, src, dst)?;
        rewrite_ports::<NativeEndian>(h, 34, 52, proto::TCP, addrs, ports)?;
        h[..6].copy_from_slice(dst_mac);
        h[6..12].copy_from_slice(src_mac);
        return Ok(());
    }
    let (l3, end) = ip_range(frame, p)?;
    let l4 = p.l4_offset as usize;
    if l4 < l3 || l4 > end {
        return Err(RewriteError::Inconsistent);
    }
    let pkt = frame.data_mut();
    let addrs = rewrite_ipv4::<NativeEndian>(pkt, l3, src, dst)?;
    rewrite_ports::<NativeEndian>(pkt, l4, end, p.flow.proto(), addrs, ports)?;
    let eth = pkt.get_mut(..12).ok_or(RewriteError::Inconsistent)?;
    eth[..6].copy_from_slice(dst_mac);
    eth[6..].copy_from_slice(src_mac);
    Ok(())
}

/// The IP header's offset in an untagged frame.
const UNTAGGED_L3: u32 = 14;

/// A flow's source and destination ports as one word, as the transport header holds them.
fn ports_word(to: &FlowKey) -> u32 {
    (u32::from(to.src_port()) << 16) | u32::from(to.dst_port())
}

/// IPv4 address bytes of an IPv4 [`FlowKey`] address (stored IPv4-mapped).
fn v4_octets(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Sets the IPv4 header's addresses and decrements its TTL, patching its checksum in word order
/// `O`; returns the address change, in that order, for the transport checksum's pseudo-header.
// Always inlined (into `rewrite`): out of line, it was a call a full-NAT packet (~25 instructions,
// callgrind) while the worker's packets to IPv4 backends took it too.
#[inline(always)]
fn rewrite_ipv4<O: WordOrder>(
    pkt: &mut [u8],
    l3: usize,
    src: [u8; 4],
    dst: [u8; 4],
) -> Result<ChecksumDelta, RewriteError> {
    let h = field::<20>(pkt, l3)?;
    let ttl = h[8];
    if ttl <= 1 {
        return Err(RewriteError::TtlExpired { ttl });
    }
    let mut addrs = ChecksumDelta::default();
    addrs.replace32(O::word32([h[12], h[13], h[14], h[15]]), O::word32(src));
    addrs.replace32(O::word32([h[16], h[17], h[18], h[19]]), O::word32(dst));
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let mut header = addrs;
    // The (TTL, protocol) word: the TTL falls by one.
    header.decrement_first_byte::<O>();
    h[8] = ttl - 1;
    let c = header.apply(O::word16([h[10], h[11]]));
    h[10..12].copy_from_slice(&O::bytes16(c));
    Ok(addrs)
}

/// Sets the IPv6 header's addresses and decrements its hop limit; returns the address change.
#[inline]
fn rewrite_ipv6(pkt: &mut [u8], l3: usize, to: &FlowKey) -> Result<ChecksumDelta, RewriteError> {
    let h = field::<40>(pkt, l3)?;
    let ttl = h[7];
    if ttl <= 1 {
        return Err(RewriteError::TtlExpired { ttl });
    }
    let mut addrs = ChecksumDelta::default();
    let src = field::<16>(h, 8)?;
    addrs.replace_array(src, to.src_bytes());
    *src = *to.src_bytes();
    let dst = field::<16>(h, 24)?;
    addrs.replace_array(dst, to.dst_bytes());
    *dst = *to.dst_bytes();
    h[7] = ttl - 1;
    Ok(addrs)
}

/// Sets the TCP or UDP ports to `new` (source port in the high half) and patches the transport
/// checksum for them and the addresses (`addrs`, in word order `O`).
// Always inlined: as a call (LLVM left it out of line) its arguments (seven then) cost ~25
// instructions a NAT packet, callgrind.
#[inline(always)]
fn rewrite_ports<O: WordOrder>(
    pkt: &mut [u8],
    l4: usize,
    end: usize,
    proto: u8,
    addrs: ChecksumDelta,
    new: u32,
) -> Result<(), RewriteError> {
    let new = new.to_be_bytes();
    let mut delta = addrs;
    // One bounds check covers ports and checksum: 18 bytes of TCP header, 8 of UDP.
    if proto == proto::TCP {
        if l4 + 18 > end {
            return Err(RewriteError::Inconsistent);
        }
        let h = field::<18>(pkt, l4)?;
        delta.replace32(O::word32([h[0], h[1], h[2], h[3]]), O::word32(new));
        h[..4].copy_from_slice(&new);
        let c = delta.apply(O::word16([h[16], h[17]]));
        h[16..18].copy_from_slice(&O::bytes16(c));
    } else {
        if l4 + 8 > end {
            return Err(RewriteError::Inconsistent);
        }
        let h = field::<8>(pkt, l4)?;
        delta.replace32(O::word32([h[0], h[1], h[2], h[3]]), O::word32(new));
        h[..4].copy_from_slice(&new);
        let old = O::word16([h[6], h[7]]);
        // A checksum of 0 means "none" and stays 0; a result of 0 is sent as 0xffff (RFC 768): both
        // read the same in either byte order. IPv6 allows 0 only for tunnels (RFC 6935), which
        // accept it where configured to: patching it would give a checksum certain to be wrong, so
        // it stays 0 there too, as Linux's NAT keeps it (`__udp_manip_pkt`).
        if old != 0 {
            let c = match delta.apply(old) {
                0 => 0xffff,
                c => c,
            };
            h[6..8].copy_from_slice(&O::bytes16(c));
        }
    }
    Ok(())
}

/// Rewrites the packet quoted by an ICMP error to `inner` (addresses, and ports when it has them),
/// patching its own checksums, and records every changed word in `icmp` for the ICMP checksum.
fn translate_quote(
    pkt: &mut [u8],
    e: &IcmpError,
    inner: &FlowKey,
    family: Family,
    icmp: &mut ChecksumDelta,
) -> Result<(), RewriteError> {
    let (l3, l4, end) = (e.inner_l3_offset as usize, e.inner_l4_offset as usize, e.end as usize);
    if !(l3 <= l4 && l4 <= end && end <= pkt.len()) {
        return Err(RewriteError::Inconsistent);
    }
    let mut addrs = ChecksumDelta::default();
    let (src_at, dst_at) = match family {
        Family::V4 => (l3 + 12, l3 + 16),
        Family::V6 => (l3 + 8, l3 + 24),
    };
    replace(pkt, src_at, inner.src_wire(), &mut addrs)?;
    replace(pkt, dst_at, inner.dst_wire(), &mut addrs)?;
    icmp.add(addrs);
    if family == Family::V4 {
        // The quoted IPv4 header checksum: its own change is a change of the ICMP payload too.
        let csum_at = l3 + 10;
        let old = super::read16(pkt, csum_at)?;
        let new = addrs.apply(old);
        replace16(pkt, csum_at, new, icmp)?;
    }
    let ports =
        e.inner_fragment != Fragment::Later && matches!(e.inner.proto(), proto::TCP | proto::UDP) && l4 + 4 <= end;
    if ports {
        let mut ports = ChecksumDelta::default();
        replace16(pkt, l4, inner.src_port(), &mut ports)?;
        replace16(pkt, l4 + 2, inner.dst_port(), &mut ports)?;
        icmp.add(ports);
        let mut l4_delta = addrs;
        l4_delta.add(ports);
        if let Some(at) = l4_checksum_offset(e.inner.proto()).map(|o| l4 + o).filter(|at| at + 2 <= end) {
            let old = super::read16(pkt, at)?;
            // As `rewrite_ports`: a UDP checksum of 0 stays 0.
            let keep_zero = old == 0 && e.inner.proto() == proto::UDP;
            if !keep_zero {
                let new = match l4_delta.apply(old) {
                    0 if e.inner.proto() == proto::UDP => 0xffff,
                    c => c,
                };
                replace16(pkt, at, new, icmp)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    extern crate std;

    use super::*;
    use crate::packet::parse;
    use alloc::vec::Vec;
    use etherparse::PacketBuilder;

    const MACS: Macs = Macs { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 2] };
    /// Addresses whose sums carry and wrap every way.
    const ADDRS: [[u8; 4]; 5] = [[172, 16, 0, 1], [10, 1, 2, 3], [255, 255, 255, 255], [0, 0, 0, 1], [128, 0, 255, 0]];

    /// An Ethernet + IPv4 frame from `client` to a VIP with TTL `ttl`: TCP, UDP, UDP without a
    /// checksum, or ICMP echo.
    fn frame(kind: u8, client: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]).ipv4(client, [192, 0, 2, 10], ttl);
        let mut v = Vec::new();
        match kind {
            0 => b.tcp(40000, 80, 1, 1000).syn().write(&mut v, payload).unwrap(),
            1 | 2 => b.udp(5353, 53).write(&mut v, payload).unwrap(),
            _ => b.icmpv4_echo_request(7, 1).write(&mut v, payload).unwrap(),
        }
        if kind == 2 {
            // A UDP checksum of 0: none (it stays 0).
            v[40] = 0;
            v[41] = 0;
        }
        v
    }

    proptest::proptest! {
        /// `rewrite_v4_ports` gives `rewrite`'s frame and result with the same target whether its
        /// untagged TCP form takes the frame or not: TCP and UDP, untagged and behind a VLAN tag,
        /// any TTL, addresses, ports and payload, frames cut short, and parses whose offsets and IP
        /// length disagree with the frame (the untagged form must decline all it cannot do alike).
        #[test]
        fn rewrite_v4_ports_untagged_tcp_is_rewrite(
            (udp, tagged, ttl) in (proptest::prelude::any::<bool>(), proptest::prelude::any::<bool>(), proptest::prelude::any::<u8>()),
            (client, snat, backend) in (proptest::prelude::any::<[u8; 4]>(), proptest::prelude::any::<[u8; 4]>(), proptest::prelude::any::<[u8; 4]>()),
            (sport, dport, payload) in (proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>(), 0usize..24),
            (cut, ip_len, l3, l4) in (0usize..64, -24i64..8, -2i64..6, -4i64..8),
        ) {
            let mut original = frame(if udp { 1 } else { 0 }, client, ttl, &[0xa5; 24][..payload]);
            if tagged {
                original.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
            }
            let mut p = parse(&original).unwrap();
            let shift = |v: u32, by: i64| u32::try_from((i64::from(v) + by).max(0)).unwrap();
            // Unchanged half the time, so the untagged form takes many frames whole.
            if cut % 2 == 0 {
                (p.ip_len, p.l3_offset, p.l4_offset) = (shift(p.ip_len, ip_len), shift(p.l3_offset, l3), shift(p.l4_offset, l4));
            }
            let len = original.len() - if cut % 3 == 0 { (cut / 3).min(original.len()) } else { 0 };
            let target = NatTarget { flow: FlowKey::v4(snat, backend, p.flow.proto(), sport, dport), macs: MACS };
            let (mut a, mut b) = (original.clone(), original.clone());
            let general = rewrite(&mut Frame::new(&mut a, 0, len), &p, &target);
            let fast = rewrite_v4_ports(&mut Frame::new(&mut b, 0, len), &p, (snat, sport), (backend, dport), (&MACS.src, &MACS.dst));
            proptest::prop_assert_eq!(fast, Some(general));
            proptest::prop_assert_eq!(a, b);
        }
    }

    /// `rewrite_v4_ports` gives `rewrite`'s frame and result with the same target, for TCP and UDP
    /// (with and without a checksum), any TTL (1 and 0 refused unchanged), addresses and ports whose
    /// sums carry, and payloads, and declines (`None`, the frame unchanged) what it is not for.
    #[test]
    fn rewrite_v4_ports_is_rewrite_for_ipv4_ports() {
        let payloads: [&[u8]; 3] = [b"", b"payload", &[0xff, 0xff, 0xff]];
        for kind in 0..4 {
            for ttl in [0, 1, 2, 64, 255] {
                for (sport, dport) in [(1024, 80), (65535, 0), (40001, 8443), (0, 65535)] {
                    for (client, snat, backend) in ADDRS
                        .iter()
                        .flat_map(|c| ADDRS.iter().flat_map(move |s| ADDRS.iter().map(move |b| (*c, *s, *b))))
                    {
                        for payload in payloads {
                            let original = frame(kind, client, ttl, payload);
                            let p = parse(&original).unwrap();
                            let flow = FlowKey::v4(snat, backend, p.flow.proto(), sport, dport);
                            let target = NatTarget { flow, macs: MACS };
                            let (mut a, mut b) = (original.clone(), original.clone());
                            let len = a.len();
                            let general = rewrite(&mut Frame::new(&mut a, 0, len), &p, &target);
                            let fast = rewrite_v4_ports(
                                &mut Frame::new(&mut b, 0, len),
                                &p,
                                (snat, sport),
                                (backend, dport),
                                (&MACS.src, &MACS.dst),
                            );
                            if kind == 3 {
                                assert_eq!(fast, None, "ICMP is not for it");
                                assert_eq!(b, original);
                            } else {
                                assert_eq!(fast, Some(general), "kind {kind} ttl {ttl}");
                                assert_eq!(
                                    a, b,
                                    "kind {kind} ttl {ttl} {client:?} {snat:?} {backend:?} {sport} {dport}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
