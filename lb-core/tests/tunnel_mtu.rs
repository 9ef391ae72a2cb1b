//! Path MTU in the tunnel modes (`NodeConfig::tunnel_mtu`): a packet the outer headers would push
//! past it is answered with ICMP "fragmentation needed" (IPv4, DF) or "packet too big" (IPv6), read
//! back with smoltcp (checksums verified) and compared with the packet it quotes; a packet that fits
//! is encapsulated as before; one that cannot be signalled is a counted drop.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use std::net::IpAddr;

use lb_core::config::{Config, ForwardMode, Protocol};
use lb_core::service::ConfigError;
use lb_core::stats::DropReason;
use lb_core::{Verdict, Worker, WorkerConfig};
use smoltcp::wire::{
    EthernetFrame, Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpProtocol,
    Ipv4Packet, Ipv6Packet,
};
use worker_common::{CLIENT_MAC, LOCAL_MAC, Tcp, backend, node, run, secs, seen, service, tcp, udp, v4};

const VIP4: &str = "192.0.2.1";
const VIP6: &str = "2001:db8::1";
const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:c::7";

/// IP-in-IP on port 82 and GUE on port 83, both families, with a 1500-byte path MTU (or none).
fn config(mtu: Option<u16>) -> Config {
    let mut services = vec![];
    for (port, mode) in [(82, ForwardMode::IpIp), (83, ForwardMode::Gue { port: 6080 })] {
        services.push(service(&format!("v4-{port}"), VIP4, port, Protocol::Tcp, mode, vec![backend("10.1.0.1", port)]));
        services.push(service(
            &format!("v4u-{port}"),
            VIP4,
            port,
            Protocol::Udp,
            mode,
            vec![backend("10.1.0.1", port)],
        ));
        services.push(service(
            &format!("v6-{port}"),
            VIP6,
            port,
            Protocol::Tcp,
            mode,
            vec![backend("fd00:1::1", port)],
        ));
    }
    let mut node = node();
    node.tunnel_mtu = mtu;
    Config { node, services }
}

fn worker(mtu: Option<u16>) -> Worker {
    Worker::new(worker_common::table_builder().build(&config(mtu)).unwrap(), WorkerConfig::single_core(1024))
}

/// A TCP segment of `ip_len` bytes of IP packet from the client to `vip:port`, with DF as given.
fn segment(vip: &str, port: u16, ip_len: usize, df: bool) -> Vec<u8> {
    let (client, header) = if vip.contains(':') { (CLIENT6, 40 + 20) } else { (CLIENT4, 20 + 20) };
    let payload: Vec<u8> = (0..ip_len - header).map(|i| i as u8).collect();
    let mut f = tcp(client.parse().unwrap(), 40000, vip.parse().unwrap(), port, Tcp::Ack, &payload);
    if !vip.contains(':') {
        set_df(&mut f, df);
    }
    f
}

/// Sets or clears DF in an untagged IPv4 frame and fixes the header checksum.
fn set_df(frame: &mut [u8], df: bool) {
    let ip = &mut frame[14..34];
    ip[6] = if df { ip[6] | 0x40 } else { ip[6] & !0x40 };
    let mut p = Ipv4Packet::new_unchecked(ip);
    p.fill_checksum();
}

/// The ICMP error in `out`, checked against the packet `sent` it answers: (type, code, MTU field).
fn icmp_error(out: &[u8], sent: &[u8]) -> (u8, u8, u32) {
    let eth = EthernetFrame::new_checked(out).unwrap();
    assert_eq!(eth.dst_addr().0, CLIENT_MAC, "back to the sender's router");
    assert_eq!(eth.src_addr().0, LOCAL_MAC);
    let quoted_from = &sent[14..];
    match [out[12], out[13]] {
        [0x08, 0x00] => {
            let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!((ip.src_addr().to_string(), ip.dst_addr().to_string()), (VIP4.into(), CLIENT4.into()));
            assert_eq!(ip.next_header(), IpProtocol::Icmp);
            assert_eq!(usize::from(ip.total_len()), 576, "RFC 1812: as much as fits in 576 bytes");
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum(), "ICMP checksum");
            assert_eq!(icmp.data(), &quoted_from[..576 - 28], "quotes the packet from its IP header on");
            // smoltcp has no accessor for the next-hop MTU (RFC 1191): bytes 6-7 of the header.
            let raw = ip.payload();
            (u8::from(icmp.msg_type()), icmp.msg_code(), u32::from(u16::from_be_bytes([raw[6], raw[7]])))
        }
        [0x86, 0xdd] => {
            let ip = Ipv6Packet::new_checked(&out[14..]).unwrap();
            assert_eq!((ip.src_addr().to_string(), ip.dst_addr().to_string()), (VIP6.into(), CLIENT6.into()));
            assert_eq!(ip.next_header(), IpProtocol::Icmpv6);
            assert_eq!(40 + usize::from(ip.payload_len()), 1280, "RFC 4443: as much as fits in 1280 bytes");
            let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()), "ICMPv6 checksum");
            assert_eq!(icmp.payload(), &quoted_from[..1280 - 48]);
            (u8::from(icmp.msg_type()), icmp.msg_code(), icmp.pkt_too_big_mtu())
        }
        other => panic!("ethertype {other:02x?}"),
    }
}

#[test]
fn too_big_for_the_tunnel_gets_icmp_with_the_mtu_left_for_the_inner_packet() {
    // (VIP, port, headers the tunnel adds): IP-in-IP 20 / 40, GUE 32 / 52.
    for (vip, port, overhead) in [(VIP4, 82, 20), (VIP4, 83, 32), (VIP6, 82, 40), (VIP6, 83, 52)] {
        let mut w = worker(Some(1500));
        let sent = segment(vip, port, 1500, true);
        let (verdict, out) = run(&mut w, &sent, secs(1));
        assert_eq!(verdict, Verdict::Tx, "{vip}:{port}");
        let (kind, code, mtu) = icmp_error(&out, &sent);
        let want = if vip == VIP4 {
            (u8::from(Icmpv4Message::DstUnreachable), u8::from(Icmpv4DstUnreachable::FragRequired))
        } else {
            (u8::from(Icmpv6Message::PktTooBig), 0)
        };
        assert_eq!((kind, code), want, "{vip}:{port}");
        assert_eq!(mtu, 1500 - overhead, "{vip}:{port}");
        assert_eq!(w.stats().icmp_too_big, 1);

        // The sender obeys: a packet of the reported size is encapsulated to exactly the path MTU.
        let (verdict, out) = run(&mut w, &segment(vip, port, mtu as usize, true), secs(2));
        assert_eq!(verdict, Verdict::Tx);
        assert_eq!(out.len(), 14 + 1500, "{vip}:{port}");
        assert!(seen(&out).outer.is_some(), "encapsulated");
        assert_eq!(w.stats().icmp_too_big, 1);
    }
}

#[test]
fn without_a_path_mtu_large_packets_are_encapsulated_as_before() {
    let mut w = worker(None);
    let (verdict, out) = run(&mut w, &segment(VIP4, 82, 1500, true), secs(1));
    assert_eq!(verdict, Verdict::Tx);
    assert_eq!(out.len(), 14 + 1520);
    assert_eq!(w.stats().icmp_too_big, 0);
}

#[test]
fn a_packet_that_cannot_be_told_to_shrink_is_a_counted_drop() {
    let mut w = worker(Some(1500));
    // IPv4 without DF: may be fragmented, which one frame in / one frame out cannot do.
    let (verdict, _) = run(&mut w, &segment(VIP4, 82, 1500, false), secs(1));
    assert_eq!(verdict, Verdict::Drop(DropReason::TooBig));
    // UDP with DF is told like TCP.
    let client: IpAddr = CLIENT4.parse().unwrap();
    let mut big = udp(client, 5353, v4(VIP4), 82, &[7; 1500 - 28]);
    set_df(&mut big, true);
    let (verdict, out) = run(&mut w, &big, secs(1));
    assert_eq!(verdict, Verdict::Tx);
    assert_eq!(icmp_error(&out, &big).2, 1480);
    assert_eq!(w.stats().dropped(DropReason::TooBig), 1);
    assert_eq!(w.stats().icmp_too_big, 1);
    // The dropped first packet left no flow behind, and none counted as scheduled: the TCP one's
    // backend got nothing, the UDP one's (told to shrink, the flow kept) one new flow.
    let tables = w.tables().clone();
    let counted = |name: &str| {
        let s = tables.services().iter().find(|s| s.name == name).unwrap();
        let c = w.stats().backend(s.backends[0].slot());
        (c.new_flows, c.active_conns)
    };
    assert_eq!(counted("v4-82"), (0, 0), "the dropped TCP flow");
    assert_eq!(counted("v4u-82"), (1, 1), "the UDP flow told to shrink");
}

#[test]
fn a_path_mtu_below_ipv6_minimum_plus_headers_is_rejected() {
    let err = worker_common::table_builder().build(&config(Some(1331))).unwrap_err();
    assert!(matches!(err, ConfigError::TunnelMtuTooSmall { mtu: 1331, min: 1332 }), "{err}");
    assert!(worker_common::table_builder().build(&config(Some(1332))).is_ok());
}

/// RFC 1122 3.2.2 and RFC 4443 2.4 (e): no ICMP error to a source that names no single host
/// (unspecified, broadcast, multicast, loopback, IPv4 class E), which a spoofed packet can carry.
/// The worker starts no flow from such a source (`SourceNotAllowed`; class E, which Linux takes as
/// unicast, aside), and the rewrite would not signal it either.
#[test]
fn no_icmp_error_to_a_source_that_names_no_single_host() {
    let sources = [
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.5",
        "239.1.2.3",
        "240.0.0.1",
        "127.0.0.1",
        "::",
        "ff02::1",
        "ff0e::5",
        "::1",
    ];
    for src in sources {
        let client: IpAddr = src.parse().unwrap();
        let (vip, header): (IpAddr, usize) =
            if client.is_ipv4() { (v4(VIP4), 40) } else { (VIP6.parse().unwrap(), 60) };
        let mut w = worker(Some(1500));
        let mut big = tcp(client, 40000, vip, 82, Tcp::Ack, &vec![7; 1500 - header]);
        if client.is_ipv4() {
            set_df(&mut big, true);
        }
        let (verdict, _) = run(&mut w, &big, secs(1));
        // Class E names hosts (a flow starts) but takes no ICMP error: the packet is dropped as too big.
        let want = if src == "240.0.0.1" { DropReason::TooBig } else { DropReason::SourceNotAllowed };
        assert_eq!(verdict, Verdict::Drop(want), "from {src}");
        assert_eq!(w.stats().icmp_too_big, 0, "from {src}");
        let mut buf = big.clone();
        let frame = lb_core::Frame::whole(&mut buf);
        let parsed = lb_core::packet::parse(frame.data()).unwrap();
        assert!(!lb_core::forward::too_big::can_signal(&frame, &parsed), "from {src}");
    }
    // A unicast sender is still told.
    let mut w = worker(Some(1500));
    let (verdict, out) = run(&mut w, &segment(VIP4, 82, 1500, true), secs(1));
    assert_eq!((verdict, out.len()), (Verdict::Tx, 14 + 576));
}

/// RFC 1812 4.3.2.7: no ICMP error about an IPv4 packet sent to a link-layer broadcast or multicast
/// address (a host sending to every station on the link does not learn from each). RFC 4443 2.4
/// (e.3, e.4) lets Packet Too Big answer an IPv6 link-layer multicast, so that one is answered.
#[test]
fn no_fragmentation_needed_about_an_ipv4_packet_sent_to_a_link_layer_group() {
    for (dst_mac, family) in [([0xff; 6], 4), ([0x01, 0x00, 0x5e, 0, 0, 1], 4), ([0x33, 0x33, 0, 0, 0, 1], 6)] {
        let mut w = worker(Some(1500));
        let mut big = if family == 4 { segment(VIP4, 82, 1500, true) } else { segment(VIP6, 82, 1500, true) };
        big[..6].copy_from_slice(&dst_mac);
        let (verdict, _) = run(&mut w, &big, secs(1));
        if family == 4 {
            assert_eq!(verdict, Verdict::Drop(DropReason::TooBig), "to {dst_mac:02x?}");
            assert_eq!(w.stats().icmp_too_big, 0, "to {dst_mac:02x?}");
        } else {
            assert_eq!(verdict, Verdict::Tx, "to {dst_mac:02x?}");
            assert_eq!(w.stats().icmp_too_big, 1, "to {dst_mac:02x?}");
        }
    }
}
