//! Property tests of the rewrite, checked by implementations other than lb-core's:
//! - every rewritten frame (every mode, both families, TCP and UDP, random addresses, ports, payload
//!   lengths, VLAN tags, IPv4 options, IPv6 extension headers, TOS, TTL) re-parses with etherparse,
//!   and smoltcp verifies all of its checksums (outer and inner IPv4 headers, TCP, UDP, the GUE
//!   outer UDP over IPv6), as it does for NAT-ed ICMP errors of every kind lb-core maps;
//! - NAT then the reverse NAT restores the original frame (bar TTL and MACs), and a backend's reply
//!   translated for the client is exactly the frame etherparse builds for it;
//! - a tunnel carries the original IP packet unchanged;
//! - parse never panics on arbitrary bytes or on mutated valid frames, its hand-written common case
//!   agrees with the etherparse-based general parser on all of them, and the rewrite never panics
//!   on whatever parses.
#![allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]

mod test_frames;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, SlicedPacket};
use lb_core::Frame;
use lb_core::forward::{self, Macs, RewriteError, TunnelTarget, nat::NatTarget};
use lb_core::packet::{self, FlowKey, L4, Parsed};
use proptest::prelude::*;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};
use test_frames::{MAC_BACKEND, MAC_NODE, MAC_ROUTER, Spec, Transport, buffer};

const HEADROOM: usize = 64;
const GUE_PORT: u16 = 6080;
const TO_BACKEND: Macs = Macs { src: MAC_NODE, dst: MAC_BACKEND };

fn addr_of(v4: bool, raw: [u8; 16]) -> IpAddr {
    if v4 { IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])) } else { IpAddr::V6(Ipv6Addr::from(raw)) }
}

prop_compose! {
    fn spec()(
        v4 in any::<bool>(),
        src in any::<[u8; 16]>(),
        dst in any::<[u8; 16]>(),
        tcp in any::<bool>(),
        (sport, dport) in any::<(u16, u16)>(),
        (syn, ack, fin) in any::<(bool, bool, bool)>(),
        zero_checksum in any::<bool>(),
        ttl in 2u8..=255,
        tos in any::<u8>(),
        flow_label in any::<u32>(),
        fragmentable_id in any::<Option<u16>>(),
        options in (0usize..=10).prop_flat_map(|words| prop::collection::vec(any::<u8>(), words * 4)),
        v6_exts in v6_exts(),
        vlans in prop::collection::vec(1u16..4095, 0..=2),
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) -> Spec {
        let transport = if tcp {
            Transport::Tcp { sport, dport, seq: 7, syn, ack, fin }
        } else {
            Transport::Udp { sport, dport, zero_checksum }
        };
        Spec {
            src_mac: MAC_ROUTER,
            dst_mac: MAC_NODE,
            vlans,
            src: addr_of(v4, src),
            dst: addr_of(v4, dst),
            ttl,
            tos,
            options: if v4 { options } else { vec![] },
            flow_label,
            fragmentable_id,
            v6_exts: if v4 { vec![] } else { v6_exts },
            transport,
            payload,
        }
    }
}

/// IPv6 extension headers that leave the transport checksum's pseudo-header alone (their next
/// header bytes are filled in by `Spec`): hop-by-hop options (first, if at all), then any of
/// destination options (8 or 16 bytes), a routing header with no segments left (an SRH of one
/// segment or a type 0 one), an atomic Fragment header (offset 0, no more fragments) and an
/// Authentication Header.
fn v6_exts() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    let ext = prop_oneof![
        Just((60u8, vec![0, 0, 1, 4, 0, 0, 0, 0])),
        Just((60u8, [[0u8, 1, 1, 12].as_slice(), &[0; 12]].concat())),
        any::<[u8; 16]>().prop_map(|seg| (43u8, [[0u8, 2, 4, 0, 0, 0, 0, 0].as_slice(), &seg].concat())),
        Just((43u8, vec![0, 0, 0, 0, 0, 0, 0, 0])),
        any::<u32>().prop_map(|id| (44u8, [[0u8, 0, 0, 0].as_slice(), &id.to_be_bytes()].concat())),
        any::<[u8; 8]>().prop_map(|spi_seq| (51u8, [[0u8, 4, 0, 0].as_slice(), &spi_seq, &[0; 12]].concat())),
    ];
    (any::<bool>(), prop::collection::vec(ext, 0..=3)).prop_map(|(hop_by_hop, rest)| {
        let first = hop_by_hop.then(|| (0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]));
        first.into_iter().chain(rest).collect()
    })
}

/// The transport protocol and its offset in `ip` (an IPv6 packet), past the extension headers.
fn v6_transport(ip: &[u8]) -> (u8, usize) {
    let (mut next, mut at) = (ip[6], 40);
    loop {
        let len = match next {
            0 | 43 | 60 => (usize::from(ip[at + 1]) + 1) * 8,
            44 => 8,
            51 => (usize::from(ip[at + 1]) + 2) * 4,
            _ => return (next, at),
        };
        (next, at) = (ip[at], at + len);
    }
}

/// Checks an Ethernet frame with etherparse (it must parse) and smoltcp (every checksum).
fn check_frame(frame: &[u8]) -> Result<(), TestCaseError> {
    check_frame_in(frame, Gue::No)
}

/// Whether a UDP datagram to [`GUE_PORT`] is a GUE packet (a tunnel's outer header) whose inner IP
/// packet is to be checked too, or only a datagram that happens to use that port (random ports
/// drew it: a NAT target's or a client's port, a quoted datagram's).
#[derive(Clone, Copy, PartialEq)]
enum Gue {
    Yes,
    No,
}

/// [`check_frame`] for a frame that may be GUE-tunnelled.
fn check_frame_in(frame: &[u8], gue: Gue) -> Result<(), TestCaseError> {
    let sliced = SlicedPacket::from_ethernet(frame);
    prop_assert!(sliced.is_ok(), "etherparse rejects the frame: {:?}", sliced.err());
    let sliced = sliced.unwrap();
    prop_assert!(sliced.net.as_ref().is_some_and(|n| n.is_ip()));
    let l3 = 14 + 4 * sliced.link_exts.len();
    check_ip(&frame[l3..], gue)
}

/// Checks an IP packet's checksums with smoltcp, recursing into IP-in-IP and (if `gue` says so) GUE.
fn check_ip(ip: &[u8], gue: Gue) -> Result<(), TestCaseError> {
    let (src, dst, proto, payload): (IpAddress, IpAddress, IpProtocol, &[u8]) = match ip.first().map(|b| b >> 4) {
        Some(4) => {
            let p = Ipv4Packet::new_checked(ip).map_err(|e| TestCaseError::fail(format!("IPv4: {e}")))?;
            prop_assert!(p.verify_checksum(), "IPv4 header checksum");
            let len = p.total_len() as usize;
            let hl = p.header_len() as usize;
            (p.src_addr().into(), p.dst_addr().into(), p.next_header(), &ip[hl..len])
        }
        Some(6) => {
            let p = Ipv6Packet::new_checked(ip).map_err(|e| TestCaseError::fail(format!("IPv6: {e}")))?;
            let len = 40 + p.payload_len() as usize;
            let (proto, at) = v6_transport(ip);
            (p.src_addr().into(), p.dst_addr().into(), IpProtocol::from(proto), &ip[at..len])
        }
        v => return Err(TestCaseError::fail(format!("IP version {v:?}"))),
    };
    match proto {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(payload).map_err(|e| TestCaseError::fail(format!("TCP: {e}")))?;
            prop_assert!(t.verify_checksum(&src, &dst), "TCP checksum");
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(payload).map_err(|e| TestCaseError::fail(format!("UDP: {e}")))?;
            prop_assert!(u.verify_checksum(&src, &dst), "UDP checksum");
            if matches!(src, IpAddress::Ipv6(_)) {
                prop_assert_ne!(u.checksum(), 0, "IPv6 UDP needs a checksum");
            }
            if gue == Gue::Yes && u.dst_port() == GUE_PORT {
                let gue = u.payload();
                prop_assert!(gue.len() > 4 && gue[0] == 0 && gue[2..4] == [0, 0], "GUE variant 0 header");
                check_ip(&gue[4..], Gue::No)?;
            }
        }
        IpProtocol::Unknown(4 | 41) => check_ip(payload, Gue::No)?,
        other => return Err(TestCaseError::fail(format!("unexpected protocol {other}"))),
    }
    Ok(())
}

/// Parses `bytes` (placed after headroom) and runs `f` on the frame; returns the resulting bytes.
fn rewritten(
    bytes: &[u8],
    f: impl FnOnce(&mut Frame<'_>, &Parsed) -> Result<(), RewriteError>,
) -> Result<Vec<u8>, RewriteError> {
    let mut buf = buffer(bytes, HEADROOM);
    let mut frame = Frame::new(&mut buf, HEADROOM, bytes.len());
    let parsed = packet::parse(frame.data()).unwrap();
    f(&mut frame, &parsed)?;
    Ok(frame.data().to_vec())
}

fn flow_of(s: &Spec) -> FlowKey {
    let (sport, dport) = s.ports();
    let proto = if matches!(s.transport, Transport::Tcp { .. }) { 6 } else { 17 };
    FlowKey::from_ips(s.src, s.dst, proto, sport, dport).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// NAT towards a backend: etherparse re-parses, smoltcp verifies, addresses and ports are the
    /// target's; the reverse translation restores the original frame; a UDP checksum of 0 stays 0.
    #[test]
    fn nat_round_trip(s in spec(), snat in any::<[u8; 16]>(), backend in any::<[u8; 16]>(), sp in any::<u16>(), bp in any::<u16>()) {
        let original = s.frame();
        let v4 = s.src.is_ipv4();
        let client = flow_of(&s);
        let to_backend = FlowKey::from_ips(addr_of(v4, snat), addr_of(v4, backend), client.proto(), sp, bp).unwrap();
        let out = rewritten(&original, |f, p| forward::nat::rewrite(f, p, &NatTarget { flow: to_backend, macs: TO_BACKEND })).unwrap();
        check_frame(&out)?;
        let p = packet::parse(&out).unwrap();
        prop_assert_eq!(p.flow, to_backend);
        prop_assert_eq!(p.ttl, s.ttl - 1);
        if let (Transport::Udp { zero_checksum: true, .. }, true) = (&s.transport, v4) {
            prop_assert_eq!(&out[p.l4_offset as usize + 6..p.l4_offset as usize + 8], &[0, 0]);
        }
        // The same frame's reverse translation: back to the client's flow, MACs restored.
        if s.ttl > 2 {
            let back = rewritten(&out, |f, p| forward::nat::rewrite(f, p, &NatTarget { flow: client, macs: Macs { src: MAC_ROUTER, dst: MAC_NODE } })).unwrap();
            let mut want = s.clone();
            want.ttl -= 2;
            prop_assert_eq!(back, want.frame());
        }
    }

    /// The backend's reply (built by etherparse), translated for the client, is exactly the reply
    /// etherparse builds from the VIP to the client.
    #[test]
    fn nat_reply_to_client(s in spec(), vip in any::<[u8; 16]>(), client in any::<[u8; 16]>(), vport in any::<u16>(), cport in any::<u16>()) {
        // `s` plays the backend's reply BACKEND:b -> SNAT:s.
        let v4 = s.src.is_ipv4();
        let (vip, client) = (addr_of(v4, vip), addr_of(v4, client));
        let target = FlowKey::from_ips(vip, client, flow_of(&s).proto(), vport, cport).unwrap();
        let out = rewritten(&s.frame(), |f, p| forward::nat::rewrite(f, p, &NatTarget { flow: target, macs: Macs { src: MAC_NODE, dst: MAC_ROUTER } })).unwrap();
        let mut want = s.translated(vip, vport, client, cport);
        want.ttl -= 1;
        (want.src_mac, want.dst_mac) = (MAC_NODE, MAC_ROUTER);
        check_frame(&out)?;
        prop_assert_eq!(out, want.frame());
    }

    /// DSR changes the MACs and nothing else.
    #[test]
    fn dsr_changes_only_macs(s in spec()) {
        let original = s.frame();
        let out = rewritten(&original, |f, _| forward::dsr::rewrite(f, &TO_BACKEND)).unwrap();
        check_frame(&out)?;
        prop_assert_eq!(&out[..6], &MAC_BACKEND);
        prop_assert_eq!(&out[6..12], &MAC_NODE);
        prop_assert_eq!(&out[12..], &original[12..]);
    }

    /// IP-in-IP and GUE, any outer family: the frame re-parses, every checksum (outer and inner)
    /// verifies, the outer addresses are the tunnel's, and the inner IP packet is the original.
    #[test]
    fn tunnels(s in spec(), outer_v4 in any::<bool>(), src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), hash in any::<u32>(), gue in any::<bool>()) {
        let t = TunnelTarget { src: addr_of(outer_v4, src), dst: addr_of(outer_v4, dst), macs: TO_BACKEND, flow_hash: hash, ip_id: 0 };
        let original = s.frame();
        let out = if gue {
            rewritten(&original, |f, p| forward::gue::encap(f, p, &t, GUE_PORT))
        } else {
            rewritten(&original, |f, p| forward::ipip::encap(f, p, &t))
        }.unwrap();
        check_frame_in(&out, if gue { Gue::Yes } else { Gue::No })?;
        let p = packet::parse(&out).unwrap();
        prop_assert_eq!((p.flow.src_ip(), p.flow.dst_ip()), (t.src, t.dst));
        prop_assert_eq!(p.vlan_tags as usize, s.vlans.len());
        let inner_at = p.l4_offset as usize + if gue { 12 } else { 0 };
        prop_assert_eq!(&out[inner_at..], &s.ip_packet()[..]);
        if gue {
            prop_assert_eq!(p.flow.dst_port(), GUE_PORT);
            prop_assert_eq!(p.flow.src_port(), forward::gue::source_port(hash));
        }
    }

    /// GUE over IPv6 (whose outer UDP checksum is required) for an IPv6 UDP datagram shorter than
    /// its IP payload, with bytes after it (a surplus area, RFC 768; where UDP options live): the
    /// outer checksum covers those bytes too, which the inner UDP checksum does not.
    #[test]
    fn gue_checksum_covers_a_udp_surplus_area(
        s in spec(),
        surplus in prop::collection::vec(any::<u8>(), 1..16),
        (client, vip) in any::<([u8; 16], [u8; 16])>(),
        (src, dst) in any::<([u8; 16], [u8; 16])>(),
    ) {
        let mut s = s;
        (s.src, s.dst, s.options) = (addr_of(false, client), addr_of(false, vip), vec![]);
        let Transport::Udp { sport, dport, .. } = s.transport else { return Ok(()) };
        s.transport = Transport::Udp { sport, dport, zero_checksum: false };
        let mut original = s.frame();
        let l3 = 14 + 4 * s.vlans.len();
        let payload_len = u16::from_be_bytes([original[l3 + 4], original[l3 + 5]]) + surplus.len() as u16;
        original[l3 + 4..l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
        original.extend_from_slice(&surplus);
        let t = TunnelTarget { src: addr_of(false, src), dst: addr_of(false, dst), macs: TO_BACKEND, flow_hash: 0, ip_id: 0 };
        let out = rewritten(&original, |f, p| forward::gue::encap(f, p, &t, GUE_PORT)).unwrap();
        check_frame_in(&out, Gue::Yes)?;
        let p = packet::parse(&out).unwrap();
        prop_assert_eq!(&out[p.l4_offset as usize + 12..], &original[l3..]);
    }

    /// Arbitrary bytes never make parse panic, nor the rewrite of whatever parses.
    #[test]
    fn parse_and_rewrite_never_panic_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400), ethertype in prop::sample::select(vec![0x0800u16, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x1234])) {
        let mut bytes = bytes;
        if bytes.len() >= 14 {
            bytes[12..14].copy_from_slice(&ethertype.to_be_bytes());
        }
        exercise(&bytes)?;
    }

    /// Valid frames (TCP, UDP, ICMP errors) with random bytes changed and random truncation never
    /// make parse or rewrite panic, and what parses has offsets inside the frame.
    #[test]
    fn parse_and_rewrite_never_panic_on_mutated_frames(
        s in spec(),
        icmp in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = if icmp { icmp_error_for(&s) } else { s.frame() };
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        exercise(&bytes)?;
    }
}

/// An ICMP error about `s` (dest-unreachable / frag-needed over IPv4, packet-too-big over IPv6),
/// quoting the whole packet.
fn icmp_error_for(s: &Spec) -> Vec<u8> {
    let quote = s.ip_packet();
    let mut v = Vec::new();
    match (s.src, s.dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => PacketBuilder::ethernet2(MAC_ROUTER, MAC_NODE)
            .ipv4(b.octets(), a.octets(), 64)
            .icmpv4_raw(3, 4, [0, 0, 5, 0xdc])
            .write(&mut v, &quote)
            .unwrap(),
        (IpAddr::V6(a), IpAddr::V6(b)) => PacketBuilder::ethernet2(MAC_ROUTER, MAC_NODE)
            .ipv6(b.octets(), a.octets(), 64)
            .icmpv6_raw(2, 0, 1280u32.to_be_bytes())
            .write(&mut v, &quote)
            .unwrap(),
        _ => unreachable!(),
    }
    v
}

/// Parses `bytes`; when it parses, checks the offsets and runs every rewrite (which may refuse, but
/// must not panic), and checks that a NAT-ed ICMP error still verifies.
fn exercise(bytes: &[u8]) -> Result<(), TestCaseError> {
    // The hand-written common case agrees with the etherparse-based general parser.
    let general = packet::parse_general(bytes);
    if let Some(common) = packet::parse_common(bytes) {
        prop_assert_eq!(Ok(common), general);
    }
    prop_assert_eq!(packet::parse(bytes), general);
    let Ok(p) = general else { return Ok(()) };
    let end = (p.l3_offset + p.ip_len) as usize;
    prop_assert!(end <= bytes.len());
    prop_assert!(p.l3_offset <= p.l4_offset && p.l4_offset as usize <= end);
    if let L4::IcmpError(e) = p.l4 {
        prop_assert!(p.l4_offset < e.inner_l3_offset && e.inner_l3_offset <= e.inner_l4_offset);
        prop_assert!(e.inner_l4_offset <= e.end && e.end as usize <= end);
    }
    let v4 = p.family() == packet::Family::V4;
    let a = addr_of(v4, [9; 16]);
    let b = addr_of(v4, [7; 16]);
    let nat = NatTarget { flow: FlowKey::from_ips(a, b, p.flow.proto(), 1, 2).unwrap(), macs: TO_BACKEND };
    let tunnel = TunnelTarget { src: a, dst: b, macs: TO_BACKEND, flow_hash: 1, ip_id: 0 };
    for mode in 0..4 {
        let mut buf = buffer(bytes, HEADROOM);
        let mut frame = Frame::new(&mut buf, HEADROOM, bytes.len());
        let _ = match mode {
            0 => forward::nat::rewrite(&mut frame, &p, &nat),
            1 => forward::dsr::rewrite(&mut frame, &TO_BACKEND),
            2 => forward::ipip::encap(&mut frame, &p, &tunnel),
            _ => forward::gue::encap(&mut frame, &p, &tunnel, GUE_PORT),
        };
    }
    Ok(())
}

proptest! {
    /// An ICMP error (each kind lb-core maps) quoting a translated packet (IPv6 with extension
    /// headers too, cut anywhere after its ports), NAT-ed back: the outer ICMP checksum and the
    /// quoted IPv4 header checksum verify with smoltcp, and the quote names the client's flow.
    #[test]
    fn nat_icmp_error_checksums(
        s in spec(),
        vip in any::<[u8; 16]>(),
        vport in any::<u16>(),
        quote_len in 0usize..200,
        kind in 0usize..4,
    ) {
        // `s` is what the node sent to a backend; the error comes back from a router near it.
        let v4 = s.src.is_ipv4();
        let mut bytes = icmp_error_for(&s);
        // Cut the quote (keeping at least IP header + 8 bytes), fixing the outer lengths and
        // checksums with etherparse by rebuilding.
        let quote_full = s.ip_packet();
        let min = if v4 { 20 + s.options.len() + 8 } else { 40 + s.v6_exts_len() + 8 };
        let keep = (min + quote_len).min(quote_full.len());
        let quote = &quote_full[..keep];
        bytes.clear();
        match (s.src, s.dst) {
            // Destination unreachable (port; fragmentation needed), time exceeded, parameter problem.
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let (ty, code, rest) = [(3, 3, [0; 4]), (3, 4, [0, 0, 5, 0xdc]), (11, 0, [0; 4]), (12, 0, [20, 0, 0, 0])][kind];
                PacketBuilder::ethernet2(MAC_ROUTER, MAC_NODE).ipv4(b.octets(), a.octets(), 64).icmpv4_raw(ty, code, rest).write(&mut bytes, quote).unwrap()
            }
            // Destination unreachable (port), packet too big, time exceeded, parameter problem.
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let (ty, code, rest) = [(1, 4, [0; 4]), (2, 0, [0, 0, 5, 0]), (3, 0, [0; 4]), (4, 1, [0, 0, 0, 6])][kind];
                PacketBuilder::ethernet2(MAC_ROUTER, MAC_NODE).ipv6(b.octets(), a.octets(), 64).icmpv6_raw(ty, code, rest).write(&mut bytes, quote).unwrap()
            }
            _ => unreachable!(),
        }
        let parsed = packet::parse(&bytes).unwrap();
        let L4::IcmpError(e) = parsed.l4 else { return Err(TestCaseError::fail(format!("{:?}", parsed.l4))) };
        prop_assert_eq!(e.inner, flow_of(&s));
        let client = flow_of(&s).dst_ip();
        let target = FlowKey::from_ips(addr_of(v4, vip), client, flow_of(&s).proto(), vport, 4242).unwrap();
        let out = rewritten(&bytes, |f, p| forward::nat::rewrite(f, p, &NatTarget { flow: target, macs: TO_BACKEND })).unwrap();
        let p2 = packet::parse(&out).unwrap();
        let L4::IcmpError(e2) = p2.l4 else { return Err(TestCaseError::fail("not an ICMP error any more")) };
        prop_assert_eq!(e2.inner, target.reverse());
        prop_assert_eq!((p2.flow.src_ip(), p2.flow.dst_ip()), (target.src_ip(), target.dst_ip()));
        let ip = &out[14..];
        let l4 = (p2.l4_offset - p2.l3_offset) as usize;
        if v4 {
            let outer = Ipv4Packet::new_checked(ip).unwrap();
            prop_assert!(outer.verify_checksum());
            let icmp = smoltcp::wire::Icmpv4Packet::new_unchecked(&ip[l4..outer.total_len() as usize]);
            prop_assert!(icmp.verify_checksum(), "ICMPv4 checksum");
            let inner = Ipv4Packet::new_unchecked(&ip[l4 + 8..]);
            prop_assert!(inner.verify_checksum(), "quoted IPv4 header checksum");
        } else {
            let outer = Ipv6Packet::new_checked(ip).unwrap();
            let icmp = smoltcp::wire::Icmpv6Packet::new_unchecked(&ip[l4..40 + outer.payload_len() as usize]);
            prop_assert!(icmp.verify_checksum(&outer.src_addr(), &outer.dst_addr()), "ICMPv6 checksum");
        }
        // When the whole quoted transport segment is there, its checksum verifies too.
        if keep == quote_full.len() {
            let q = (e2.inner_l3_offset - p2.l3_offset) as usize;
            check_ip(&ip[q..], Gue::No)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Every generated TCP/UDP frame takes the fast path or not exactly when it should, with the
    /// same result as the general parser; IPv4 options push it to the general path.
    #[test]
    fn common_parse_agrees_with_general(s in spec()) {
        let bytes = s.frame();
        let common = packet::parse_common(&bytes);
        prop_assert_eq!(common.is_some(), s.options.is_empty() && s.v6_exts.is_empty());
        let general = packet::parse_general(&bytes).unwrap();
        if let Some(c) = common {
            prop_assert_eq!(c, general);
        }
        prop_assert_eq!(general.flow, flow_of(&s));
    }
}

proptest! {
    /// `Parsed` is plain data: a rewrite handed one that does not belong to the frame (offsets and
    /// lengths changed at random, or taken from another frame) refuses or rewrites, never panics.
    #[test]
    fn rewrite_never_panics_on_a_foreign_parse(
        a in spec(),
        b in spec(),
        icmp in any::<bool>(),
        l3 in prop::option::of(0u32..200),
        l4 in prop::option::of(0u32..300),
        ip_len in prop::option::of(0u32..400),
        inner in prop::option::of((0u32..300, 0u32..300, 0u32..400)),
    ) {
        let from = if icmp { icmp_error_for(&a) } else { a.frame() };
        let mut p = packet::parse(&from).unwrap();
        p.l3_offset = l3.unwrap_or(p.l3_offset);
        p.l4_offset = l4.unwrap_or(p.l4_offset);
        p.ip_len = ip_len.unwrap_or(p.ip_len);
        if let (L4::IcmpError(e), Some((i3, i4, end))) = (&mut p.l4, inner) {
            (e.inner_l3_offset, e.inner_l4_offset, e.end) = (i3, i4, end);
        }
        let bytes = b.frame();
        let v4 = p.family() == packet::Family::V4;
        let nat = NatTarget { flow: FlowKey::from_ips(addr_of(v4, [1; 16]), addr_of(v4, [2; 16]), 6, 1, 2).unwrap(), macs: TO_BACKEND };
        let tunnel = TunnelTarget { src: addr_of(!v4, [1; 16]), dst: addr_of(!v4, [2; 16]), macs: TO_BACKEND, flow_hash: 3, ip_id: 0 };
        for headroom in [0, HEADROOM] {
            for mode in 0..3 {
                let mut buf = buffer(&bytes, headroom);
                let mut frame = Frame::new(&mut buf, headroom, bytes.len());
                let _ = match mode {
                    0 => forward::nat::rewrite(&mut frame, &p, &nat),
                    1 => forward::ipip::encap(&mut frame, &p, &tunnel),
                    _ => forward::gue::encap(&mut frame, &p, &tunnel, GUE_PORT),
                };
            }
        }
    }
}
