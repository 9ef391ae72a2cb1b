//! Full NAT routes: a packet to a VIP (or a backend's reply to the SNAT address) whose TTL / hop
//! limit is 1 or 0 cannot be forwarded, and its sender is told so with ICMP "time exceeded" (IPv4
//! 11/0) or ICMPv6 "hop limit exceeded in transit" (3/0), sent from the address the packet was sent
//! to, as a router and IPVS (`ip_vs_xmit.c`, `decrement_ttl`) send it: traceroute through a NAT VIP
//! then shows the hop. The errors are read back with etherparse (structure) and smoltcp (checksums)
//! and compared with the packet they quote; the packets that must not be answered (an ICMP error, a
//! source that names no single host, a link-layer broadcast, a later fragment, more than the
//! per-second budget) are counted drops.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use std::net::IpAddr;

use etherparse::{Icmpv4Type, Icmpv6Type, LinkSlice, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_core::Verdict;
use lb_core::stats::DropReason;
use smoltcp::wire::{Icmpv4Packet, Icmpv6Packet, Ipv4Packet, Ipv6Packet};
use worker_common::{
    CLIENT_MAC, LOCAL_MAC, Tcp, all_modes_config, backend_mac, run, run_burst, secs, seen, tcp, udp, v4, worker,
};

const VIP4: &str = "192.0.2.1";
const VIP6: &str = "2001:db8::1";
const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:ff::7";
const SNAT4: &str = "10.0.0.100";
const SNAT6: &str = "fd00::100";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The client and the VIP of a family.
fn ends(v6: bool) -> (IpAddr, IpAddr) {
    if v6 { (ip(CLIENT6), ip(VIP6)) } else { (ip(CLIENT4), ip(VIP4)) }
}

/// Sets the TTL / hop limit of the IP packet at `l3` (an IPv4 header's checksum fixed).
fn set_ttl(frame: &mut [u8], l3: usize, ttl: u8) {
    match frame[l3] >> 4 {
        4 => {
            frame[l3 + 8] = ttl;
            let hl = usize::from(frame[l3] & 0x0f) * 4;
            Ipv4Packet::new_unchecked(&mut frame[l3..l3 + hl]).fill_checksum();
        }
        _ => frame[l3 + 7] = ttl,
    }
}

fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    set_ttl(&mut frame, 14, ttl);
    frame
}

/// Checks that `out` is the time exceeded error answering `sent` (whose IP packet starts at `l3`),
/// sent from `from` back to `sent`'s source and source MAC, VLAN tags kept; returns the quote's length.
fn assert_time_exceeded(out: &[u8], sent: &[u8], l3: usize, from: IpAddr) -> usize {
    let parsed = SlicedPacket::from_ethernet(out).unwrap();
    let Some(LinkSlice::Ethernet2(eth)) = &parsed.link else { panic!("not Ethernet II: {:?}", parsed.link) };
    assert_eq!(eth.destination(), sent[6..12], "back to the sender's MAC (its router's)");
    assert_eq!(eth.source(), LOCAL_MAC);
    assert_eq!(out[12..l3 - 2], sent[12..l3 - 2], "VLAN tags kept");
    let original = &sent[l3..];
    let to = seen_source(original);
    let (quote, bytes5to8) = match (&parsed.net, &parsed.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Icmpv4(icmp))) => {
            let h = ip.header();
            assert_eq!((IpAddr::V4(h.source_addr()), IpAddr::V4(h.destination_addr())), (from, to));
            assert_eq!(h.ttl(), 64);
            assert!(!h.is_fragmenting_payload());
            let raw = Ipv4Packet::new_checked(&out[l3..]).unwrap();
            assert!(raw.verify_checksum(), "IPv4 header checksum");
            assert_eq!(usize::from(raw.total_len()), out.len() - l3, "no padding left in the frame");
            assert!(raw.total_len() <= 576, "RFC 1812 4.3.2.3: at most 576 bytes");
            assert!(Icmpv4Packet::new_checked(raw.payload()).unwrap().verify_checksum(), "ICMP checksum");
            assert_eq!(
                icmp.icmp_type(),
                Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit)
            );
            (icmp.payload(), icmp.bytes5to8())
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) => {
            let h = ip.header();
            assert_eq!((IpAddr::V6(h.source_addr()), IpAddr::V6(h.destination_addr())), (from, to));
            assert_eq!(h.hop_limit(), 64);
            let raw = Ipv6Packet::new_checked(&out[l3..]).unwrap();
            assert_eq!(40 + usize::from(raw.payload_len()), out.len() - l3, "no padding left in the frame");
            assert!(40 + raw.payload_len() <= 1280, "RFC 4443 2.4 (c): at most 1280 bytes");
            let icmp6 = Icmpv6Packet::new_checked(raw.payload()).unwrap();
            assert!(icmp6.verify_checksum(&raw.src_addr(), &raw.dst_addr()), "ICMPv6 checksum");
            assert_eq!(
                icmp.icmp_type(),
                Icmpv6Type::TimeExceeded(etherparse::icmpv6::TimeExceededCode::HopLimitExceeded)
            );
            (icmp.payload(), icmp.bytes5to8())
        }
        other => panic!("not ICMP time exceeded: {other:?}"),
    };
    assert_eq!(bytes5to8, [0; 4], "unused, zero");
    let room = if to.is_ipv4() { 576 - 28 } else { 1280 - 48 };
    let sent_ip_len = ip_len(original);
    assert_eq!(quote.len(), sent_ip_len.min(room), "as much of the packet as fits");
    assert_eq!(quote, &original[..quote.len()], "the packet as received, its TTL unchanged");
    quote.len()
}

fn ip_len(ip: &[u8]) -> usize {
    match ip[0] >> 4 {
        4 => usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        _ => 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
    }
}

fn seen_source(ip: &[u8]) -> IpAddr {
    match ip[0] >> 4 {
        4 => IpAddr::V4(std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
        _ => IpAddr::V6(<[u8; 16]>::try_from(&ip[8..24]).unwrap().into()),
    }
}

/// The connection count and new flows of the backend a NAT service's flows go to, summed over its two.
fn nat_backend_counts(w: &lb_core::Worker, v6: bool) -> (u64, u64) {
    let tables = w.tables().clone();
    let name = format!("{}-80-tcp", if v6 { "v6" } else { "v4" });
    let s = tables.services().iter().find(|s| s.name == name).unwrap();
    s.backends.iter().fold((0, 0), |(n, a), b| {
        let c = w.stats().backend(b.slot());
        (n + c.new_flows, a + c.active_conns)
    })
}

#[test]
fn a_nat_packet_whose_ttl_expires_at_a_vip_is_answered_with_time_exceeded() {
    for v6 in [false, true] {
        for ttl in [1, 0] {
            let mut w = worker(&all_modes_config());
            let (client, vip) = ends(v6);
            let sent = with_ttl(tcp(client, 40_123, vip, 80, Tcp::Syn, b"probe"), ttl);
            let (verdict, out) = run(&mut w, &sent, secs(1));
            assert_eq!(verdict, Verdict::Tx, "v6 {v6} ttl {ttl}");
            assert_time_exceeded(&out, &sent, 14, vip);
            let s = w.stats();
            assert_eq!((s.icmp_time_exceeded, s.tx, s.dropped_total()), (1, 1, 0), "v6 {v6} ttl {ttl}");
            // Nothing was scheduled: no flow, no connection, no new flow counted.
            assert_eq!(nat_backend_counts(&w, v6), (0, 0));
            assert_eq!(w.conntrack().len(), 0, "no flow left behind");

            // UDP too (traceroute's default probes), from the first hop's view.
            let sent = with_ttl(udp(client, 33_434, vip, 80, b"traceroute probe"), 1);
            let (verdict, out) = run(&mut w, &sent, secs(1));
            assert_eq!(verdict, Verdict::Tx);
            assert_time_exceeded(&out, &sent, 14, vip);
            assert_eq!(w.stats().icmp_time_exceeded, 2);
        }
    }
}

#[test]
fn a_large_expired_packet_is_quoted_as_far_as_the_error_may_go() {
    for v6 in [false, true] {
        let mut w = worker(&all_modes_config());
        let (client, vip) = ends(v6);
        let sent = with_ttl(udp(client, 33_434, vip, 80, &[0x5a; 1400]), 1);
        let (verdict, out) = run(&mut w, &sent, secs(1));
        assert_eq!(verdict, Verdict::Tx);
        let quoted = assert_time_exceeded(&out, &sent, 14, vip);
        assert_eq!(quoted + if v6 { 48 } else { 28 }, if v6 { 1280 } else { 576 });
    }
}

#[test]
fn an_expired_packet_in_a_vlan_is_answered_in_the_vlan() {
    let (client, vip) = ends(false);
    let mut sent = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
        .single_vlan(etherparse::VlanId::try_new(42).unwrap())
        .ipv4(octets4(client), octets4(vip), 1)
        .tcp(40_123, 80, 1, 65535)
        .syn()
        .write(&mut sent, b"")
        .unwrap();
    let mut w = worker(&all_modes_config());
    let (verdict, out) = run(&mut w, &sent, secs(1));
    assert_eq!(verdict, Verdict::Tx);
    assert_time_exceeded(&out, &sent, 18, vip);
}

fn octets4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("IPv4 only"),
    }
}

/// An established flow's packet that expires is answered too (the established path), and the
/// flow goes on: its next packet is forwarded with its SNAT port.
#[test]
fn an_established_flows_expired_packet_is_answered_and_the_flow_goes_on() {
    for v6 in [false, true] {
        let mut w = worker(&all_modes_config());
        let (client, vip) = ends(v6);
        let (verdict, first) = run(&mut w, &tcp(client, 40_123, vip, 80, Tcp::Syn, b""), secs(1));
        assert_eq!(verdict, Verdict::Tx);
        let sent = with_ttl(tcp(client, 40_123, vip, 80, Tcp::Ack, b"data"), 1);
        let (verdict, out) = run(&mut w, &sent, secs(2));
        assert_eq!(verdict, Verdict::Tx);
        assert_time_exceeded(&out, &sent, 14, vip);
        let (verdict, next) = run(&mut w, &tcp(client, 40_123, vip, 80, Tcp::Ack, b"data"), secs(3));
        assert_eq!(verdict, Verdict::Tx);
        assert_eq!((seen(&next).sport, seen(&next).dst), (seen(&first).sport, seen(&first).dst));
        assert_eq!(w.stats().icmp_time_exceeded, 1);
        assert_eq!(nat_backend_counts(&w, v6), (1, 1), "one flow, kept");
    }
}

/// The packets and bytes the backends of a NAT service's flows were sent, summed over its two.
fn nat_backend_traffic(w: &lb_core::Worker, v6: bool) -> (u64, u64) {
    let tables = w.tables().clone();
    let name = format!("{}-80-tcp", if v6 { "v6" } else { "v4" });
    let s = tables.services().iter().find(|s| s.name == name).unwrap();
    s.backends.iter().fold((0, 0), |(n, b), backend| {
        let c = w.stats().backend(backend.slot());
        (n + c.packets, b + c.bytes)
    })
}

/// A packet that expires at the VIP was not sent to a backend: it counts in none of a backend's
/// packets or bytes, whether it would have started a flow (its first packet is counted with the
/// new flow, then taken back) or belongs to one (on the general path, counted, then taken back);
/// the packets forwarded count, byte for byte.
#[test]
fn an_expired_packet_counts_in_no_backends_traffic() {
    for v6 in [false, true] {
        let mut w = worker(&all_modes_config());
        let (client, vip) = ends(v6);
        let (verdict, _) = run(&mut w, &with_ttl(tcp(client, 40_001, vip, 80, Tcp::Syn, b"probe"), 1), secs(1));
        assert_eq!(verdict, Verdict::Tx, "v6 {v6}");
        assert_eq!(nat_backend_traffic(&w, v6), (0, 0), "v6 {v6}: a new flow's expired first packet");
        let syn = tcp(client, 40_123, vip, 80, Tcp::Syn, b"");
        assert_eq!(run(&mut w, &syn, secs(1)).0, Verdict::Tx);
        // Expired: the SYN again (a known flow on the general path: the established path leaves
        // a SYN to it), and a packet of the flow (the established path).
        for expired in [tcp(client, 40_123, vip, 80, Tcp::Syn, b""), tcp(client, 40_123, vip, 80, Tcp::Ack, b"data")] {
            let (verdict, _) = run(&mut w, &with_ttl(expired, 1), secs(2));
            assert_eq!(verdict, Verdict::Tx, "v6 {v6}");
        }
        let ack = tcp(client, 40_123, vip, 80, Tcp::Ack, b"more data");
        assert_eq!(run(&mut w, &ack, secs(3)).0, Verdict::Tx);
        let bytes = (syn.len() - 14 + ack.len() - 14) as u64;
        assert_eq!(nat_backend_traffic(&w, v6), (2, bytes), "v6 {v6}: the flow's two packets forwarded");
        assert_eq!(w.stats().icmp_time_exceeded, 3, "v6 {v6}");
    }
}

/// A backend's reply to the SNAT address that expires there is answered from the SNAT address.
#[test]
fn an_expired_nat_reply_is_answered_from_the_snat_address() {
    for v6 in [false, true] {
        let mut w = worker(&all_modes_config());
        let (client, vip) = ends(v6);
        let (verdict, out) = run(&mut w, &tcp(client, 40_123, vip, 80, Tcp::Syn, b""), secs(1));
        assert_eq!(verdict, Verdict::Tx);
        let to_backend = seen(&out);
        assert_eq!(to_backend.src, ip(if v6 { SNAT6 } else { SNAT4 }));
        let mut reply = tcp(to_backend.dst, to_backend.dport, to_backend.src, to_backend.sport, Tcp::Ack, b"hello");
        reply[6..12].copy_from_slice(&backend_mac(to_backend.dst));
        let reply = with_ttl(reply, 1);
        let (verdict, out) = run(&mut w, &reply, secs(2));
        assert_eq!(verdict, Verdict::Tx, "v6 {v6}");
        assert_time_exceeded(&out, &reply, 14, to_backend.src);
        let s = w.stats();
        assert_eq!((s.icmp_time_exceeded, s.reverse_nat, s.dropped_total()), (1, 0, 0));
    }
}

/// RFC 1122 3.2.2, RFC 1812 4.3.2.7, RFC 4443 2.4 (e): no error about an ICMP error, to a source
/// that names no single host, for a frame sent to a link-layer broadcast or multicast address, or
/// for a fragment but the first (lb-core drops fragments to a VIP before that); dropped and counted.
#[test]
fn expired_packets_that_must_not_be_answered_are_counted_drops() {
    for v6 in [false, true] {
        let (client, vip) = ends(v6);
        let mut w = worker(&all_modes_config());
        let l3 = 14;

        // An ICMP error about a tracked flow (a router on the client's side telling the backend
        // its reply could not be delivered), itself expiring.
        let (_, out) = run(&mut w, &tcp(client, 40_123, vip, 80, Tcp::Syn, b""), secs(1));
        let to_backend = seen(&out);
        let reply_from_vip = tcp(vip, 80, client, 40_123, Tcp::Ack, b"");
        let mut error = Vec::new();
        let router = if v6 { ip("2001:db8:77::1") } else { ip("203.0.113.1") };
        let quote_len = if v6 { 48 } else { 28 };
        match (router, vip) {
            (IpAddr::V4(r), IpAddr::V4(d)) => PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
                .ipv4(r.octets(), d.octets(), 1)
                .icmpv4(Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Host))
                .write(&mut error, &reply_from_vip[l3..l3 + quote_len]),
            (IpAddr::V6(r), IpAddr::V6(d)) => PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
                .ipv6(r.octets(), d.octets(), 1)
                .icmpv6(Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Address))
                .write(&mut error, &reply_from_vip[l3..l3 + quote_len]),
            _ => unreachable!(),
        }
        .unwrap();
        assert_eq!(run(&mut w, &error, secs(2)).0, Verdict::Drop(DropReason::TtlExpired), "v6 {v6}");
        // The same error with room to go is translated to the backend: it was about the flow.
        let (verdict, out) = run(&mut w, &with_ttl(error, 64), secs(2));
        assert_eq!((verdict, seen_ip_dst(&out)), (Verdict::Tx, to_backend.dst));

        // Sent to the broadcast MAC, or a multicast one.
        for mac in [[0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]] {
            let mut f = with_ttl(tcp(client, 40_124, vip, 80, Tcp::Syn, b""), 1);
            f[..6].copy_from_slice(&mac);
            assert_eq!(run(&mut w, &f, secs(2)).0, Verdict::Drop(DropReason::TtlExpired), "to {mac:02x?}");
        }
        assert_eq!(w.stats().icmp_time_exceeded, 0);
        assert_eq!(w.stats().dropped(DropReason::TtlExpired), 4);
    }

    // IPv4 class E: the worker takes it for a host (a flow starts), but it takes no ICMP error.
    let mut w = worker(&all_modes_config());
    let f = with_ttl(tcp(ip("240.0.0.1"), 40_123, ip(VIP4), 80, Tcp::Syn, b""), 1);
    assert_eq!(run(&mut w, &f, secs(1)).0, Verdict::Drop(DropReason::TtlExpired));
    // A later fragment (dropped as a fragment to a VIP, before any rewrite).
    let mut f = with_ttl(udp(ip(CLIENT4), 33_434, ip(VIP4), 80, &[1; 64]), 1);
    f[14 + 6..14 + 8].copy_from_slice(&185u16.to_be_bytes());
    set_ttl(&mut f, 14, 1);
    assert_eq!(run(&mut w, &f, secs(1)).0, Verdict::Drop(DropReason::Fragment));
    assert_eq!(w.stats().icmp_time_exceeded, 0);
}

fn seen_ip_dst(frame: &[u8]) -> IpAddr {
    worker_common::smoltcp_ip(&frame[14..]).1
}

/// Each core answers at most `TIME_EXCEEDED_PER_SECOND` expired packets a second (a spoofed flood
/// of them must not make the node a reflector at line rate); the rest are counted drops, and the
/// next second it answers again.
#[test]
fn time_exceeded_replies_keep_to_a_budget_per_second() {
    let budget = lb_core::forward::time_exceeded::TIME_EXCEEDED_PER_SECOND as usize;
    let mut w = worker(&all_modes_config());
    let frames: Vec<Vec<u8>> =
        (0..budget + 10).map(|i| with_ttl(udp(ip(CLIENT4), 1024 + i as u16, ip(VIP4), 80, b"probe"), 1)).collect();
    let out = run_burst(&mut w, &frames, secs(5));
    let answered = out.iter().filter(|(v, _)| *v == Verdict::Tx).count();
    assert_eq!(answered, budget);
    assert!(out[budget..].iter().all(|(v, _)| *v == Verdict::Drop(DropReason::TtlExpired)));
    assert_eq!((w.stats().icmp_time_exceeded, w.stats().dropped(DropReason::TtlExpired)), (budget as u64, 10));
    // Later in the same second: still over.
    assert_eq!(run(&mut w, &frames[0], secs(5)).0, Verdict::Drop(DropReason::TtlExpired));
    // The next second: answered again.
    let (verdict, out) = run(&mut w, &frames[0], secs(6));
    assert_eq!(verdict, Verdict::Tx);
    assert_time_exceeded(&out, &frames[0], 14, v4(VIP4));
}

/// The budget is the node's `time_exceeded_per_second`: a node may send fewer (or none, with 0:
/// every expired packet a counted drop) or more than the default, and tables swapped in bring
/// their own budget from the next packet.
#[test]
fn the_time_exceeded_budget_is_the_nodes() {
    let frames: Vec<Vec<u8>> =
        (0..10).map(|i| with_ttl(udp(ip(CLIENT4), 2048 + i as u16, ip(VIP4), 80, b"probe"), 1)).collect();
    let answered = |w: &mut lb_core::worker::Worker, at: u64| {
        run_burst(w, &frames, secs(at)).iter().filter(|(v, _)| *v == Verdict::Tx).count()
    };
    let with_budget = |n: u32| {
        let mut c = all_modes_config();
        c.node.time_exceeded_per_second = n;
        c
    };
    let mut w = worker(&with_budget(3));
    assert_eq!(answered(&mut w, 5), 3);
    assert_eq!((w.stats().icmp_time_exceeded, w.stats().dropped(DropReason::TtlExpired)), (3, 7));
    // None sent under 0, from the next packet of tables that say so.
    w.swap_tables(worker_common::build(&with_budget(0)));
    assert_eq!(answered(&mut w, 6), 0);
    assert_eq!((w.stats().icmp_time_exceeded, w.stats().dropped(DropReason::TtlExpired)), (3, 17));
    w.swap_tables(worker_common::build(&with_budget(4000)));
    assert_eq!(answered(&mut w, 7), 10);
}
