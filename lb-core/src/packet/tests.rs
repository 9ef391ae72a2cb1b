//! Parser tests over frames built with etherparse's `PacketBuilder` (an independent writer).
#![allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]

extern crate std;

use super::*;
use alloc::vec::Vec;
use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6FragmentHeader,
    Ipv6Header, Ipv6RawExtHeader, PacketBuilder, VlanId,
};

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
const C4: [u8; 4] = [10, 0, 0, 1];
const V4: [u8; 4] = [192, 0, 2, 10];
const C6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

fn tcp_v4(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(C4, V4, 64)
        .tcp(40000, 80, 1, 1000)
        .syn()
        .write(&mut v, payload)
        .unwrap();
    v
}

#[test]
fn tcp_over_ipv4() {
    let f = tcp_v4(b"hello");
    let p = parse(&f).unwrap();
    assert_eq!(p.flow, FlowKey::v4(C4, V4, 6, 40000, 80));
    assert_eq!(p.l4, L4::Tcp);
    assert_eq!((p.vlan_tags, p.l3_offset, p.l4_offset, p.ip_len), (0, 14, 34, 20 + 20 + 5));
    assert_eq!(p.ttl, 64);
    assert!(p.tcp_flags.is_syn_only());
    assert_eq!(p.fragment, Fragment::None);
    assert!(p.has_ports());
}

#[test]
fn ethernet_padding_is_not_part_of_the_packet() {
    let mut f = tcp_v4(b"");
    let ip_len = f.len() - 14;
    f.resize(60.max(f.len() + 6), 0);
    let p = parse(&f).unwrap();
    assert_eq!(p.ip_len as usize, ip_len);
}

#[test]
fn udp_over_qinq_ipv6() {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .double_vlan(VlanId::try_new(100).unwrap(), VlanId::try_new(200).unwrap())
        .ipv6(C6, V6, 7)
        .udp(5353, 53)
        .write(&mut v, &[1, 2, 3])
        .unwrap();
    // etherparse writes 0x88a8 for the outer tag of a double VLAN.
    assert_eq!(&v[12..14], &[0x88, 0xa8]);
    let p = parse(&v).unwrap();
    assert_eq!(p.flow, FlowKey::v6(C6, V6, 17, 5353, 53));
    assert_eq!((p.vlan_tags, p.l3_offset, p.l4_offset, p.ip_len), (2, 22, 62, 40 + 8 + 3));
    assert_eq!(p.ttl, 7);
    assert_eq!(p.family(), Family::V6);
}

#[test]
fn single_802_1q_tag() {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .single_vlan(VlanId::try_new(7).unwrap())
        .ipv4(C4, V4, 3)
        .udp(1, 2)
        .write(&mut v, &[])
        .unwrap();
    let p = parse(&v).unwrap();
    assert_eq!((p.vlan_tags, p.l3_offset, p.l4_offset), (1, 18, 38));
}

#[test]
fn three_stacked_tags_pass() {
    let mut f = tcp_v4(b"");
    // Insert three 802.1Q tags by hand.
    let tags = [0x81, 0x00, 0, 1, 0x81, 0x00, 0, 2, 0x81, 0x00, 0, 3];
    f.splice(12..12, tags);
    let e = parse(&f).unwrap_err();
    assert_eq!(e, ParseError::TooManyVlanTags);
    assert_eq!(e.disposition(), Disposition::Pass);
}

#[test]
fn ipv4_options_move_the_transport_header() {
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, C4, V4).unwrap();
    h.options = Ipv4Options::try_from(&[1u8, 1, 1, 0, 0x94, 4, 0, 0][..]).unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(IpHeaders::Ipv4(h, Ipv4Extensions::default()))
        .tcp(1234, 443, 0, 0)
        .write(&mut v, &[9; 10])
        .unwrap();
    let p = parse(&v).unwrap();
    assert_eq!(p.l4_offset, 14 + 28);
    assert_eq!(p.flow.dst_port(), 443);
}

/// An Ethernet II header from `MAC_A` to `MAC_B`, to append a packet to.
fn ethernet(ether_type: etherparse::EtherType) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::Ethernet2Header { source: MAC_A, destination: MAC_B, ether_type }.write(&mut v).unwrap();
    v
}

fn v4_fragment(offset_units: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, IpNumber::UDP, C4, V4).unwrap();
    h.more_fragments = more;
    h.fragment_offset = IpFragOffset::try_new(offset_units).unwrap();
    h.total_len = (20 + payload.len()) as u16;
    h.header_checksum = h.calc_header_checksum();
    let mut v = ethernet(etherparse::EtherType::IPV4);
    h.write(&mut v).unwrap();
    v.extend_from_slice(payload);
    v
}

#[test]
fn ipv4_fragments() {
    // First fragment: UDP header present, ports parsed.
    let first = v4_fragment(0, true, &[0x13, 0x88, 0, 53, 0, 100, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    let p = parse(&first).unwrap();
    assert_eq!(p.fragment, Fragment::First);
    assert_eq!((p.flow.src_port(), p.flow.dst_port()), (5000, 53));
    assert!(p.has_ports());
    // Later fragment: no ports, protocol still known.
    let later = v4_fragment(2, false, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let p = parse(&later).unwrap();
    assert_eq!(p.fragment, Fragment::Later);
    assert_eq!(p.flow, FlowKey::v4(C4, V4, 17, 0, 0));
    assert_eq!(p.l4, L4::Udp);
    assert!(!p.has_ports());
    // A first fragment too short for the UDP header is a tiny-fragment drop.
    let tiny = v4_fragment(0, true, &[0x13, 0x88, 0, 53]);
    assert_eq!(parse(&tiny).unwrap_err(), ParseError::TinyFragment { layer: Layer::Udp, len: 4 });
}

fn v6_with_exts(exts: Ipv6Extensions, payload: &[u8]) -> Vec<u8> {
    let h = Ipv6Header { hop_limit: 9, source: C6, destination: V6, ..Default::default() };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(IpHeaders::Ipv6(h, exts))
        .tcp(40001, 8080, 0, 0)
        .write(&mut v, payload)
        .unwrap();
    v
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    let exts = Ipv6Extensions {
        hop_by_hop_options: Some(Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[0; 6]).unwrap()),
        destination_options: Some(Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[0; 14]).unwrap()),
        ..Default::default()
    };
    let v = v6_with_exts(exts, b"x");
    let p = parse(&v).unwrap();
    assert_eq!(p.l4_offset, 14 + 40 + 8 + 16);
    assert_eq!(p.flow, FlowKey::v6(C6, V6, 6, 40001, 8080));
    assert_eq!(p.fragment, Fragment::None);
}

#[test]
fn ipv6_fragment_header() {
    let frag = |off: u16, more| Ipv6Extensions {
        fragment: Some(Ipv6FragmentHeader::new(IpNumber::TCP, IpFragOffset::try_new(off).unwrap(), more, 7)),
        ..Default::default()
    };
    let p = parse(&v6_with_exts(frag(0, true), b"abc")).unwrap();
    assert_eq!((p.fragment, p.flow.dst_port(), p.l4_offset), (Fragment::First, 8080, 14 + 40 + 8));
    let p = parse(&v6_with_exts(frag(0, false), b"abc")).unwrap();
    assert_eq!(p.fragment, Fragment::None, "an atomic fragment is not fragmented");
    // For a later fragment the builder's "TCP header" is just fragment payload.
    let p = parse(&v6_with_exts(frag(5, false), b"abc")).unwrap();
    assert_eq!((p.fragment, p.flow.dst_port(), p.l4), (Fragment::Later, 0, L4::Tcp));
}

/// An untagged IPv6 packet whose payload is `payload`, the first header in it named `next`.
fn v6_raw(next: IpNumber, payload: &[u8]) -> Vec<u8> {
    let h = Ipv6Header {
        next_header: next,
        payload_length: payload.len() as u16,
        hop_limit: 9,
        source: C6,
        destination: V6,
        ..Default::default()
    };
    let mut v = ethernet(etherparse::EtherType::IPV6);
    h.write(&mut v).unwrap();
    v.extend_from_slice(payload);
    v
}

/// An IPv6 later fragment (offset 8 bytes, the last one) whose Fragment header names `next`; `data`
/// is fragment payload, however much it looks like a header.
fn v6_later_fragment(next: IpNumber, data: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    Ipv6FragmentHeader::new(next, IpFragOffset::try_new(1).unwrap(), false, 0x1234).write(&mut payload).unwrap();
    payload.extend_from_slice(data);
    v6_raw(IpNumber::IPV6_FRAGMENTATION_HEADER, &payload)
}

/// What a later fragment from [`v6_later_fragment`] must parse as: the protocol is the Fragment
/// header's next header and the payload starts right after the Fragment header.
fn later_fragment_parsed(next: u8, data_len: usize) -> Parsed {
    Parsed {
        flow: FlowKey::v6(C6, V6, next, 0, 0),
        l4: L4::Other,
        vlan_tags: 0,
        l3_offset: 14,
        l4_offset: 14 + 40 + 8,
        ip_len: (40 + 8 + data_len) as u32,
        ttl: 9,
        tcp_flags: TcpFlags(0),
        fragment: Fragment::Later,
    }
}

/// RFC 8200 4.1 puts Destination Options and AH after the Fragment header, in the fragmentable part:
/// a later fragment continues that part, so the bytes after its Fragment header are data.
#[test]
fn ipv6_later_fragment_data_is_not_parsed_as_extension_headers() {
    let dest_opts = IpNumber::IPV6_DESTINATION_OPTIONS;
    let auth = IpNumber::AUTHENTICATION_HEADER;
    let cases = [
        // Read as Destination Options: 2048 bytes long, so "truncated".
        (dest_opts, [6u8, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]),
        // Read as Destination Options: 8 bytes naming UDP, so protocol 17 at the wrong offset.
        (dest_opts, [17u8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]),
        // Read as AH: payload length 0, so "malformed chain".
        (auth, [6u8, 0, 0, 0, 0, 0, 0, 0, 7, 8, 9, 10, 11, 12, 13, 14]),
    ];
    for (next, data) in cases {
        let f = v6_later_fragment(next, &data);
        let want = later_fragment_parsed(next.0, data.len());
        assert_eq!(parse(&f), Ok(want), "next header {}, data {:02x?}", next.0, &data[..2]);
        assert_eq!(parse_general(&f), Ok(want));
        assert_eq!(parse_common(&f), None);
    }
}

/// An ICMPv6 Packet Too Big (MTU 1280) from the VIP to the client quoting `quoted`'s IPv6 packet
/// (the frame without its Ethernet header).
fn packet_too_big(quoted: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(V6, C6, 60)
        .icmpv6_raw(2, 0, 1280u32.to_be_bytes())
        .write(&mut v, &quoted[14..])
        .unwrap();
    v
}

#[test]
fn icmpv6_error_quoting_a_later_fragment_names_its_three_tuple() {
    let data = [6u8, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
    let quoted = v6_later_fragment(IpNumber::IPV6_DESTINATION_OPTIONS, &data);
    let v = packet_too_big(&quoted);
    let quote_at = 14 + 40 + 8;
    let want = Parsed {
        flow: FlowKey::v6(V6, C6, 58, 0, 0),
        l4: L4::IcmpError(IcmpError {
            kind: IcmpErrorKind::PacketTooBig { mtu: 1280 },
            inner: FlowKey::v6(C6, V6, 60, 0, 0),
            inner_fragment: Fragment::Later,
            inner_l3_offset: quote_at,
            inner_l4_offset: quote_at + 40 + 8,
            end: quote_at + 40 + 8 + data.len() as u32,
        }),
        vlan_tags: 0,
        l3_offset: 14,
        l4_offset: 14 + 40,
        ip_len: 40 + 8 + 40 + 8 + data.len() as u32,
        ttl: 60,
        tcp_flags: TcpFlags(0),
        fragment: Fragment::None,
    };
    assert_eq!(parse(&v), Ok(want));
}

#[test]
fn ipv6_first_fragment_walks_on_to_the_transport_header() {
    // Fragment (offset 0, more) -> Destination Options (8 bytes) -> UDP.
    let mut payload = Vec::new();
    Ipv6FragmentHeader::new(IpNumber::IPV6_DESTINATION_OPTIONS, IpFragOffset::ZERO, true, 1)
        .write(&mut payload)
        .unwrap();
    payload.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    payload.extend_from_slice(&[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
    let p = parse(&v6_raw(IpNumber::IPV6_FRAGMENTATION_HEADER, &payload)).unwrap();
    assert_eq!((p.fragment, p.flow, p.l4_offset), (Fragment::First, FlowKey::v6(C6, V6, 17, 5000, 53), 14 + 40 + 16));
}

/// A routing header with segments left ends the walk: what follows is the final destination's
/// (RFC 8200 4.4), so the packet has no ports here, whatever its routing type; with none left the
/// walk goes on to the transport header.
#[test]
fn ipv6_routing_header_with_segments_left_stops_the_walk() {
    let udp = [0x13, 0x88, 0, 53, 0, 8, 0, 0];
    for (routing_type, left) in [(0u8, 1u8), (2, 1), (3, 2), (4, 1), (4, 0), (0, 0)] {
        // Routing header (8 bytes of header and 16 of one address) -> UDP.
        let mut payload = std::vec![17, 2, routing_type, left, 0, 0, 0, 0];
        payload.extend_from_slice(&[0x20; 16]);
        payload.extend_from_slice(&udp);
        let p = parse(&v6_raw(IpNumber::IPV6_ROUTE_HEADER, &payload)).unwrap();
        if left == 0 {
            assert_eq!((p.flow, p.l4, p.l4_offset), (FlowKey::v6(C6, V6, 17, 5000, 53), L4::Udp, 14 + 40 + 24));
        } else {
            let want = (FlowKey::v6(C6, V6, 43, 0, 0), L4::Other, 14 + 40);
            assert_eq!((p.flow, p.l4, p.l4_offset), want, "type {routing_type}");
            assert!(!p.has_ports());
        }
    }
}

#[test]
fn malformed_ipv6_extension_chains_keep_their_reasons() {
    let dest_opts = IpNumber::IPV6_DESTINATION_OPTIONS.0;
    // Destination Options claiming 2048 bytes, 16 present.
    let f = v6_raw(IpNumber::IPV6_DESTINATION_OPTIONS, &[6, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(parse(&f), Err(ParseError::Truncated { layer: Layer::Ipv6Extension, needed: 2048, len: 16 }));
    // A Fragment header cut short after a Destination Options header: the length counts from it.
    let f = v6_raw(IpNumber::IPV6_DESTINATION_OPTIONS, &[44, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0]);
    assert_eq!(parse(&f), Err(ParseError::Truncated { layer: Layer::Ipv6Extension, needed: 8, len: 4 }));
    // AH shorter than its 12-byte minimum.
    let f = v6_raw(IpNumber::AUTHENTICATION_HEADER, &[6, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(parse(&f), Err(ParseError::Truncated { layer: Layer::Ipv6Extension, needed: 12, len: 8 }));
    // AH with payload length 0.
    let f = v6_raw(IpNumber::AUTHENTICATION_HEADER, &[6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(parse(&f), Err(ParseError::BadIpv6Extension));
    // Hop-by-hop anywhere but first.
    let f = v6_raw(IpNumber::IPV6_DESTINATION_OPTIONS, &[0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(parse(&f), Err(ParseError::BadIpv6Extension));
    // Hop-by-hop first is fine: Hop-by-hop -> Destination Options -> UDP.
    let mut payload = std::vec![dest_opts, 0, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0, 0x13, 0x88, 0, 53, 0, 8, 0, 0]);
    let p = parse(&v6_raw(IpNumber::IPV6_HEADER_HOP_BY_HOP, &payload)).unwrap();
    assert_eq!((p.flow.dst_port(), p.l4_offset), (53, 14 + 40 + 16));
}

#[test]
fn icmp_echo_uses_the_identifier_as_ports() {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(C4, V4, 64)
        .icmpv4_echo_request(0x1234, 1)
        .write(&mut v, b"ping")
        .unwrap();
    let p = parse(&v).unwrap();
    assert_eq!(p.l4, L4::IcmpEcho { reply: false });
    assert_eq!(p.flow, FlowKey::v4(C4, V4, 1, 0x1234, 0x1234));
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(V6, C6, 64).icmpv6_echo_reply(0x55, 1).write(&mut v, b"pong").unwrap();
    let p = parse(&v).unwrap();
    assert_eq!(p.l4, L4::IcmpEcho { reply: true });
    assert_eq!(p.flow, FlowKey::v6(V6, C6, 58, 0x55, 0x55));
}

#[test]
fn ndp_and_arp_are_recognised() {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(C6, V6, 255)
        .icmpv6_raw(135, 0, [0; 4])
        .write(&mut v, &[0; 16])
        .unwrap();
    assert_eq!(parse(&v).unwrap().l4, L4::Ndp);
    let mut arp = tcp_v4(b"");
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(parse(&arp).unwrap_err(), ParseError::Arp);
    assert_eq!(ParseError::Arp.disposition(), Disposition::Pass);
    let mut lldp = tcp_v4(b"");
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    assert_eq!(parse(&lldp).unwrap_err(), ParseError::NotIp { ether_type: 0x88cc });
}

/// An ICMPv4 frag-needed from `router` to `C4` quoting the packet `C4:40000 -> V4:80` that was sent.
fn frag_needed_v4(quote_len: usize) -> Vec<u8> {
    let quoted = tcp_v4(&[0; 100]);
    let quote = &quoted[14..14 + quote_len];
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([10, 9, 9, 9], C4, 60)
        .icmpv4_raw(3, 4, [0, 0, 0x05, 0xdc])
        .write(&mut v, quote)
        .unwrap();
    v
}

#[test]
fn icmpv4_error_exposes_the_quoted_flow() {
    let v = frag_needed_v4(28);
    let p = parse(&v).unwrap();
    let L4::IcmpError(e) = p.l4 else { panic!("{:?}", p.l4) };
    assert_eq!(e.kind, IcmpErrorKind::FragmentationNeeded { mtu: 1500 });
    assert_eq!(e.inner, FlowKey::v4(C4, V4, 6, 40000, 80));
    assert_eq!(e.inner.reverse().dst_ip(), p.flow.dst_ip());
    assert_eq!((e.inner_l3_offset, e.inner_l4_offset, e.end), (14 + 20 + 8, 14 + 20 + 8 + 20, 14 + 20 + 8 + 28));
    assert_eq!(p.flow, FlowKey::v4([10, 9, 9, 9], C4, 1, 0, 0));
    // A quote that stops inside the ports names no flow: pass it to the kernel.
    let short = frag_needed_v4(24);
    assert_eq!(parse(&short).unwrap_err(), ParseError::BadIcmpQuote);
}

#[test]
fn icmpv6_packet_too_big_exposes_the_quoted_flow() {
    let quoted = v6_with_exts(Ipv6Extensions::default(), &[0; 40]);
    let v = packet_too_big(&quoted);
    let p = parse(&v).unwrap();
    let L4::IcmpError(e) = p.l4 else { panic!("{:?}", p.l4) };
    assert_eq!(e.kind, IcmpErrorKind::PacketTooBig { mtu: 1280 });
    assert_eq!(e.inner, FlowKey::v6(C6, V6, 6, 40001, 8080));
    assert_eq!(e.inner_l4_offset, 14 + 40 + 8 + 40);
}

#[test]
fn malformed_ip_headers_are_drops_with_reasons() {
    let f = tcp_v4(b"abc");
    // Frame shorter than the IPv4 total length.
    let e = parse(&f[..f.len() - 1]).unwrap_err();
    assert!(matches!(e, ParseError::Truncated { layer: Layer::Ipv4, .. }), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Drop);
    // IHL 4.
    let mut g = f.clone();
    g[14] = 0x44;
    assert_eq!(parse(&g).unwrap_err(), ParseError::BadIpv4HeaderLen { ihl: 4 });
    // Version 6 under the IPv4 EtherType.
    let mut g = f.clone();
    g[14] = 0x65;
    assert_eq!(parse(&g).unwrap_err(), ParseError::BadIpVersion { version: 6, expected: 4 });
    // Total length below the header length.
    let mut g = f.clone();
    g[16..18].copy_from_slice(&19u16.to_be_bytes());
    assert!(matches!(parse(&g).unwrap_err(), ParseError::BadIpv4TotalLen { total_len: 19, .. }));
    // TCP data offset 4.
    let mut g = f.clone();
    g[34 + 12] = 0x40;
    assert_eq!(parse(&g).unwrap_err(), ParseError::BadTcpDataOffset { data_offset: 4 });
    // UDP length fields below the header and beyond the IP payload; within it, the datagram is
    // trimmed by the receiver and parses (as the kernel reads it).
    let mut u = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(C4, V4, 64).udp(5353, 53).write(&mut u, b"abcd").unwrap();
    for (length, want) in [
        (7u16, Err(ParseError::BadUdpLength { length: 7 })),
        (0, Err(ParseError::BadUdpLength { length: 0 })),
        (13, Err(ParseError::Truncated { layer: Layer::Udp, needed: 13, len: 12 })),
        (12, Ok(())),
        (8, Ok(())),
    ] {
        let mut g = u.clone();
        g[34 + 4..34 + 6].copy_from_slice(&length.to_be_bytes());
        assert_eq!(parse(&g).map(|_| ()), want, "UDP length {length}");
        assert_eq!(parse_general(&g).map(|_| ()), want, "UDP length {length}");
        assert_eq!(parse_common(&g).is_some(), want.is_ok(), "UDP length {length}");
        if let Err(e) = want {
            assert_eq!(e.disposition(), Disposition::Drop);
        }
    }
    // A quote's UDP length is not checked: an error quotes a cut datagram.
    let mut quoted = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(V4, C4, 64).udp(53, 5353).write(&mut quoted, &[0; 100]).unwrap();
    let mut err = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(C4, V4, 64)
        .icmpv4_raw(3, 4, [0, 0, 5, 0xdc])
        .write(&mut err, &quoted[14..14 + 28])
        .unwrap();
    let L4::IcmpError(e) = parse(&err).unwrap().l4 else { panic!("not an ICMP error") };
    assert_eq!(e.inner, FlowKey::v4(V4, C4, 17, 53, 5353));
    // A frame that ends inside the Ethernet header.
    assert!(matches!(parse(&f[..10]).unwrap_err(), ParseError::Truncated { layer: Layer::Ethernet, .. }));
    // IPv6 payload length 0 with a TCP next header is truncated TCP, not "the rest of the frame".
    let mut v6 = v6_with_exts(Ipv6Extensions::default(), b"");
    v6[18..20].copy_from_slice(&[0, 0]);
    assert!(matches!(parse(&v6).unwrap_err(), ParseError::Truncated { layer: Layer::Tcp, .. }));
}

#[test]
fn every_prefix_of_valid_frames_parses_or_errors_without_panic() {
    let frames = [tcp_v4(b"abcdef"), frag_needed_v4(28), v6_with_exts(Ipv6Extensions::default(), b"12")];
    for f in &frames {
        for n in 0..=f.len() {
            let _ = parse(&f[..n]);
        }
    }
}

#[test]
fn parsed_is_small() {
    std::println!("Parsed: {} bytes", core::mem::size_of::<Parsed>());
    assert!(core::mem::size_of::<Parsed>() <= 128);
}
