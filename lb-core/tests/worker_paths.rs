//! The per-packet path end to end: every mode and family forwards, NAT replies come back, and what is
//! not ours passes.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use lb_core::stats::DropReason;
use std::net::IpAddr;

use lb_core::{Verdict, Worker, WorkerConfig};
use worker_common::*;

#[test]
fn nat_v4_tcp_forward_and_reply() {
    let mut w = worker(&all_modes_config());
    let client = v4("198.51.100.7");
    let (v, out) = run(&mut w, &tcp(client, 5555, v4("192.0.2.1"), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Tx);
    let s = seen(&out);
    assert_eq!(s.src, v4("10.0.0.100"));
    assert!((40000..=40999).contains(&s.sport), "SNAT port {}", s.sport);
    assert!(s.dst == v4("10.1.0.1") || s.dst == v4("10.1.0.2"));
    assert_eq!(s.dport, 8080);
    assert_eq!(s.ttl, 63);
    assert_eq!((s.src_mac, s.dst_mac), (LOCAL_MAC, backend_mac(s.dst)));

    // The backend answers to SNAT address and port; the reply goes back as VIP -> client.
    let reply = tcp(s.dst, 8080, s.src, s.sport, Tcp::Ack, b"hello");
    let (v, back) = run(&mut w, &reply, secs(2));
    assert_eq!(v, Verdict::Tx);
    let r = seen(&back);
    assert_eq!((r.src, r.sport, r.dst, r.dport), (v4("192.0.2.1"), 80, client, 5555));
    assert_eq!(r.dst_mac, GATEWAY_MAC);
    assert_eq!(w.stats().reverse_nat, 1);
}

#[test]
fn every_mode_and_family_forwards_with_valid_checksums() {
    let mut w = worker(&all_modes_config());
    for vip in ["192.0.2.1", "2001:db8::1"] {
        let vip = v4(vip);
        let client = if vip.is_ipv4() { v4("198.51.100.7") } else { v4("2001:db8:ff::7") };
        for port in 80..=83u16 {
            for is_tcp in [true, false] {
                let frame = if is_tcp {
                    tcp(client, 4000, vip, port, Tcp::Syn, b"x")
                } else {
                    udp(client, 4000, vip, port, b"q")
                };
                let (v, out) = run(&mut w, &frame, secs(1));
                assert_eq!(v, Verdict::Tx, "{vip} port {port} tcp={is_tcp}");
                let s = seen(&out);
                match port {
                    80 => assert_eq!((s.dport, s.outer), (8080, None)),
                    81 => assert_eq!((s.src, s.dst, s.dport, s.outer), (client, vip, 81, None)),
                    82 | 83 => {
                        let (osrc, odst, _) = s.outer.unwrap();
                        assert_eq!((s.src, s.dst, s.dport), (client, vip, port));
                        assert_eq!(osrc, if vip.is_ipv4() { v4("10.0.0.101") } else { v4("fd00::101") });
                        assert_eq!(s.dst_mac, backend_mac(odst));
                        assert_eq!(s.gue_ports.is_some(), port == 83);
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    assert_eq!(w.stats().dropped_total(), 0);
}

#[test]
fn not_ours_passes_and_vip_without_service_drops() {
    let mut w = worker(&all_modes_config());
    let (v, _) = run(&mut w, &tcp(v4("198.51.100.7"), 1, v4("192.0.2.99"), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Pass);
    let (v, _) = run(&mut w, &tcp(v4("198.51.100.7"), 1, v4("192.0.2.1"), 9999, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Drop(DropReason::NoService));
    assert_eq!(w.stats().dropped(DropReason::NoService), 1);
}

#[test]
fn established_flow_keeps_its_backend() {
    let mut w = worker(&all_modes_config());
    let client = v4("198.51.100.7");
    let (_, first) = run(&mut w, &tcp(client, 5000, v4("192.0.2.1"), 81, Tcp::Syn, b""), secs(1));
    for t in 2..20 {
        let (v, out) = run(&mut w, &tcp(client, 5000, v4("192.0.2.1"), 81, Tcp::Ack, b"data"), secs(t));
        assert_eq!(v, Verdict::Tx);
        assert_eq!(out[..6], first[..6]);
    }
}

/// An established flow's packets (the established path, which sends a full-NAT flow to its rewrite
/// apart from `rewrite`'s match on the mode) go out as the flow's first packet did (the general
/// path): every mode and family, TCP and UDP. (Fails when the established path takes a mode to
/// another's rewrite.)
#[test]
fn established_packets_of_every_mode_go_out_as_their_first() {
    let mut w = worker(&all_modes_config());
    for vip in ["192.0.2.1", "2001:db8::1"] {
        let vip = v4(vip);
        let client = if vip.is_ipv4() { v4("198.51.100.7") } else { v4("2001:db8:ff::7") };
        for port in 80..=83u16 {
            for is_tcp in [true, false] {
                let frame = |flags| {
                    if is_tcp {
                        tcp(client, 4000 + port, vip, port, flags, b"x")
                    } else {
                        udp(client, 4000 + port, vip, port, b"x")
                    }
                };
                let (v, first) = run(&mut w, &frame(Tcp::Syn), secs(1));
                assert_eq!(v, Verdict::Tx, "{vip} port {port} tcp={is_tcp}");
                for t in 2..4 {
                    let (v, next) = run(&mut w, &frame(Tcp::Ack), secs(t));
                    assert_eq!(v, Verdict::Tx, "{vip} port {port} tcp={is_tcp}");
                    assert_eq!(seen(&next), seen(&first), "{vip} port {port} tcp={is_tcp}");
                }
            }
        }
    }
    assert_eq!(w.stats().dropped_total(), 0);
}

/// A burst's frames are decided from what its own passes learned, never from what the burst before
/// left in their batch slots: new flows of a service fill every slot, then bursts mixing their
/// established packets, SYNs to a VIP port nobody serves and frames to no VIP take the same slots.
/// (Fails when the service lookup leaves a slot's service from the burst before: the SYNs to the
/// unserved port then go to port 80's backends.)
#[test]
fn each_burst_decides_from_its_own_passes() {
    let mut w = worker(&all_modes_config());
    let (client, vip) = (v4("198.51.100.7"), v4("192.0.2.1"));
    let first: Vec<_> = (0..16).map(|i| tcp(client, 1000 + i, vip, 80, Tcp::Syn, b"")).collect();
    assert!(run_burst(&mut w, &first, secs(1)).iter().all(|(v, _)| *v == Verdict::Tx));
    for round in 0..3u16 {
        let frames: Vec<_> = (0..16u16)
            .map(|i| match (i + round) % 3 {
                0 => tcp(client, 1000 + i, vip, 80, Tcp::Ack, b"data"),
                1 => tcp(client, 3000 + 16 * round + i, vip, 84, Tcp::Syn, b""),
                _ => udp(client, 4000 + i, v4("192.0.2.99"), 53, b"q"),
            })
            .collect();
        for (i, (v, _)) in run_burst(&mut w, &frames, secs(2 + u64::from(round))).into_iter().enumerate() {
            let expected = match (i as u16 + round) % 3 {
                0 => Verdict::Tx,
                1 => Verdict::Drop(DropReason::NoService),
                _ => Verdict::Pass,
            };
            assert_eq!(v, expected, "round {round}, frame {i}");
        }
    }
}

/// A frame the warm-up takes for a likely hit that the established path declines is scheduled by
/// its own flow's hash: SYNs of flows whose entries have expired (still in the table, so likely
/// hits) go to the backends a fresh worker picks for them, not to those of the new flows the burst
/// before had in the same batch slots. (Fails when such a frame keeps the flow hash an earlier
/// burst's frame left in its slot.)
#[test]
fn a_declined_likely_hit_is_scheduled_by_its_own_hash() {
    let cfg = all_modes_config();
    let (client, vip) = (v4("198.51.100.7"), v4("192.0.2.1"));
    let syns = |base: u16| -> Vec<_> { (0..16).map(|i| tcp(client, base + i, vip, 81, Tcp::Syn, b"")).collect() };
    let fresh: Vec<_> = run_burst(&mut worker(&cfg), &syns(5000), secs(1)).into_iter().map(|(_, f)| f).collect();
    let mut w = worker(&cfg);
    run_burst(&mut w, &syns(5000), secs(1));
    // Other flows in the same slots, then the first flows again once their entries have expired.
    run_burst(&mut w, &syns(6000), secs(2));
    let again = run_burst(&mut w, &syns(5000), secs(100_000));
    for (i, ((v, out), expected)) in again.iter().zip(&fresh).enumerate() {
        assert_eq!(*v, Verdict::Tx, "frame {i}");
        assert_eq!(out[..6], expected[..6], "frame {i}: not its own backend");
    }
}

#[test]
fn a_burst_decides_exactly_as_frames_one_by_one() {
    use lb_core::{Frame, Instant};
    let cfg = all_modes_config();
    let mut frames_in = vec![];
    for i in 0..45u16 {
        let (vip, client) = if i % 3 == 0 { ("2001:db8::1", "2001:db8:ff::7") } else { ("192.0.2.1", "198.51.100.7") };
        let port = 80 + i % 5; // 84: no such service
        frames_in.push(match i % 4 {
            0 => tcp(v4(client), 1000 + i % 7, v4(vip), port, Tcp::Syn, b"a"),
            1 => tcp(v4(client), 1000 + i % 7, v4(vip), port, Tcp::Ack, b"b"),
            2 => udp(v4(client), 2000 + i % 3, v4(vip), port, b"c"),
            _ => {
                let mut f = tcp(v4(client), 1, v4(vip), port, Tcp::Syn, b"");
                f.truncate(20 + usize::from(i));
                f
            }
        });
    }
    // One by one. (Both workers run the same tables: their counters name the same generations.)
    let tables = build(&cfg);
    let mut w1 = Worker::new(tables.clone(), WorkerConfig::single_core(4096));
    let one: Vec<_> = frames_in.iter().map(|f| run(&mut w1, f, secs(1))).collect();
    // As one burst of 45 (batches of 16, 16 and 13).
    let mut w2 = Worker::new(tables, WorkerConfig::single_core(4096));
    let mut bufs: Vec<Vec<u8>> =
        frames_in.iter().map(|f| [vec![0; HEADROOM], f.clone(), vec![0; 64]].concat()).collect();
    let mut frames: Vec<Frame<'_>> =
        bufs.iter_mut().zip(&frames_in).map(|(b, f)| Frame::new(b, HEADROOM, f.len())).collect();
    let mut verdicts = vec![Verdict::Pass; frames.len()];
    w2.process_burst(&mut frames, Instant::from_secs(1), &mut verdicts);
    for (i, ((v, out), f)) in one.iter().zip(&frames).enumerate() {
        assert_eq!((*v, out.as_slice()), (verdicts[i], f.data()), "frame {i}");
    }
    assert_eq!(w1.stats(), w2.stats());
}

/// An ICMP error from a router at `from` to `to`, quoting the first bytes of `quoted` (a frame as
/// `tcp` builds it): destination unreachable (port) in IPv4, packet too big in IPv6.
fn icmp_error(from: IpAddr, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4::DestUnreachableHeader};
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC);
    let ip = &quoted[14..];
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(f), IpAddr::V4(t)) => eth
            .ipv4(f.octets(), t.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
            .write(&mut out, &ip[..28]),
        (IpAddr::V6(f), IpAddr::V6(t)) => eth
            .ipv6(f.octets(), t.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut out, &ip[..48]),
        _ => panic!("mixed families"),
    }
    .unwrap();
    out
}

/// The outer destination of an ICMP error as sent, and the (source, destination) of the packet it quotes.
fn icmp_seen(frame: &[u8]) -> (IpAddr, (IpAddr, u16), (IpAddr, u16)) {
    let (_, dst, proto, _, _, payload) = worker_common::smoltcp_ip(&frame[14..]);
    assert!(proto == 1 || proto == 58, "ICMP, not {proto}");
    // The quote is cut short, so its lengths do not hold: read it by hand.
    let q = &payload[8..];
    let (qsrc, qdst, l4): (IpAddr, IpAddr, &[u8]) = match q[0] >> 4 {
        4 => {
            assert_eq!(q[9], 6, "quotes TCP");
            let ip4 = |i: usize| IpAddr::from(<[u8; 4]>::try_from(&q[i..i + 4]).unwrap());
            (ip4(12), ip4(16), &q[usize::from(q[0] & 15) * 4..])
        }
        _ => {
            assert_eq!(q[6], 6, "quotes TCP");
            let ip6 = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&q[i..i + 16]).unwrap());
            (ip6(8), ip6(24), &q[40..])
        }
    };
    let port = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    (dst, (qsrc, port(0)), (qdst, port(2)))
}

/// A SNAT address that is also a VIP (a node address serving NodePorts while NAT flows leave from
/// it, as with kube-proxy's masquerade): frames to it are NAT replies by their port (ICMP errors by
/// their quote's source port), service traffic otherwise, and errors about the host's own
/// connections pass to the kernel.
#[test]
fn a_snat_address_that_is_also_a_vip_serves_both() {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let mut cfg = all_modes_config();
    // The VIPs become the SNAT addresses; the services' ports 80-83 are outside 40000-40999.
    cfg.node.snat_v4 = Some(Ipv4Addr::new(192, 0, 2, 1));
    cfg.node.snat_v6 = Some("2001:db8::1".parse::<Ipv6Addr>().unwrap());
    let mut w = worker(&cfg);
    for (vip, client, router) in [
        (v4("192.0.2.1"), v4("198.51.100.7"), v4("203.0.113.1")),
        (v4("2001:db8::1"), v4("2001:db8:ff::7"), v4("2001:db8:fe::1")),
    ] {
        // A client's NAT flow leaves from the VIP itself, from a port in the range.
        let (v, out) = run(&mut w, &tcp(client, 5555, vip, 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx, "{vip}");
        let s = seen(&out);
        assert_eq!(s.src, vip);
        assert!((40000..=40999).contains(&s.sport), "SNAT port {}", s.sport);
        let (backend, snat_port) = (s.dst, s.sport);

        // The backend's reply to that port is translated back to the client.
        let (v, back) = run(&mut w, &tcp(backend, 8080, vip, snat_port, Tcp::Ack, b"hi"), secs(2));
        assert_eq!(v, Verdict::Tx, "{vip}");
        let r = seen(&back);
        assert_eq!((r.src, r.sport, r.dst, r.dport), (vip, 80, client, 5555));

        // The other services on the address still work (DSR on 81).
        let (v, out) = run(&mut w, &tcp(client, 5556, vip, 81, Tcp::Syn, b""), secs(2));
        assert_eq!((v, seen(&out).dst, seen(&out).dport), (Verdict::Tx, vip, 81));

        // An error about the NAT flow's packet to the backend (quoted source: VIP and SNAT port)
        // goes back to the client, translated: it quotes client -> VIP:80.
        let quoted = tcp(vip, snat_port, backend, 8080, Tcp::Ack, b"");
        let (v, out) = run(&mut w, &icmp_error(router, vip, &quoted), secs(3));
        assert_eq!(v, Verdict::Tx, "{vip}");
        assert_eq!(icmp_seen(&out), (client, (client, 5555), (vip, 80)));

        // An error about the reply VIP:80 -> client (quoted source port outside the range) goes to
        // the flow's backend, translated: it quotes SNAT address and port -> backend.
        let quoted = tcp(vip, 80, client, 5555, Tcp::Ack, b"");
        let (v, out) = run(&mut w, &icmp_error(router, vip, &quoted), secs(3));
        assert_eq!(v, Verdict::Tx, "{vip}");
        assert_eq!(icmp_seen(&out), (backend, (backend, 8080), (vip, snat_port)));

        // An error about the host's own connection (its SSH server's reply) is the kernel's.
        let quoted = tcp(vip, 22, client, 50000, Tcp::Ack, b"");
        assert_eq!(run(&mut w, &icmp_error(router, vip, &quoted), secs(3)).0, Verdict::Pass, "{vip}");

        // A port in the range with no NAT flow, and a port of no service outside it.
        let (v, _) = run(&mut w, &tcp(backend, 8080, vip, snat_port + 1, Tcp::Ack, b""), secs(3));
        assert_eq!(v, Verdict::Drop(DropReason::NoReverseFlow), "{vip}");
        let (v, _) = run(&mut w, &tcp(client, 5557, vip, 9999, Tcp::Syn, b""), secs(3));
        assert_eq!(v, Verdict::Drop(DropReason::NoService), "{vip}");
    }
    assert_eq!(w.stats().reverse_nat, 4);
}

/// An ICMP error is about a packet the address it came to sent: one that quotes a packet from
/// another address (a spoofed error, or one misrouted) names no flow of this address's, whatever its
/// ports, and passes to the kernel, as the XDP program leaves it there. To a SNAT address, with a
/// port of the range in the quote, it was taken for a NAT reply and dropped as `no_reverse_flow`
/// (lb-core alone: replay, an embedder's device); to a VIP it already passed.
#[test]
fn an_icmp_error_quoting_a_packet_from_another_address_passes() {
    let mut w = worker(&all_modes_config());
    for (vip, snat, other, client, router) in [
        (v4("192.0.2.1"), v4("10.0.0.100"), v4("192.0.2.99"), v4("198.51.100.7"), v4("203.0.113.1")),
        (v4("2001:db8::1"), v4("fd00::100"), v4("2001:db8::99"), v4("2001:db8:ff::7"), v4("2001:db8:fe::1")),
    ] {
        // A NAT flow (port 80) and a DSR flow (port 81), each with a quoted packet the LB or the
        // backend sent.
        let (_, out) = run(&mut w, &tcp(client, 5555, vip, 80, Tcp::Syn, b""), secs(1));
        let s = seen(&out);
        let (backend, snat_port) = (s.dst, s.sport);
        assert_eq!(s.src, snat);
        run(&mut w, &tcp(client, 5556, vip, 81, Tcp::Syn, b""), secs(1));
        // As sent: both errors are acted on.
        let to_snat = tcp(snat, snat_port, backend, 8080, Tcp::Ack, b"");
        assert_eq!(run(&mut w, &icmp_error(router, snat, &to_snat), secs(2)).0, Verdict::Tx, "{snat}");
        let from_vip = tcp(vip, 81, client, 5556, Tcp::Ack, b"");
        assert_eq!(run(&mut w, &icmp_error(router, vip, &from_vip), secs(2)).0, Verdict::Tx, "{vip}");
        // Quoting a packet from another address, with the same ports: the kernel's.
        let forged = tcp(other, snat_port, backend, 8080, Tcp::Ack, b"");
        assert_eq!(run(&mut w, &icmp_error(router, snat, &forged), secs(2)).0, Verdict::Pass, "to {snat}");
        let forged = tcp(other, 81, client, 5556, Tcp::Ack, b"");
        assert_eq!(run(&mut w, &icmp_error(router, vip, &forged), secs(2)).0, Verdict::Pass, "to {vip}");
    }
}

/// An ICMP error to one VIP that quotes a packet from another VIP (a spoofed error, or one a
/// middlebox readdressed) is about no flow of the VIP it came to, and passes to the kernel, as the XDP
/// program leaves it there (it steers an error only when its quote comes from the address it is
/// sent to). It was sent to the quoted flow's backend as if the router had sent it to that flow's
/// VIP: a tracked flow of any mode, and an untracked one of a DSR or tunnel service that picks from
/// the flow alone (lb-core alone: replay, an embedder's device).
#[test]
fn an_icmp_error_to_a_vip_quoting_another_vips_packet_passes() {
    let mut cfg = all_modes_config();
    let extra: Vec<_> = cfg
        .services
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.name = format!("{}-b", s.name);
            s.key.vip = match s.key.vip {
                IpAddr::V4(_) => v4("192.0.2.2"),
                IpAddr::V6(_) => v4("2001:db8::2"),
            };
            s
        })
        .collect();
    cfg.services.extend(extra);
    let mut w = worker(&cfg);
    for (vip, other_vip, client, router) in [
        (v4("192.0.2.1"), v4("192.0.2.2"), v4("198.51.100.7"), v4("203.0.113.1")),
        (v4("2001:db8::1"), v4("2001:db8::2"), v4("2001:db8:ff::7"), v4("2001:db8:fe::1")),
    ] {
        for port in [80, 81, 82, 83] {
            // A tracked flow to the other VIP; the service's reply to its client, as quoted.
            let (v, _) = run(&mut w, &tcp(client, 5555, other_vip, port, Tcp::Syn, b""), secs(1));
            assert_eq!(v, Verdict::Tx, "{other_vip}:{port}");
            let quoted = tcp(other_vip, port, client, 5555, Tcp::Ack, b"");
            let (v, _) = run(&mut w, &icmp_error(router, other_vip, &quoted), secs(2));
            assert_eq!(v, Verdict::Tx, "to {other_vip}, about its own flow on {port}");
            let (v, _) = run(&mut w, &icmp_error(router, vip, &quoted), secs(2));
            assert_eq!(v, Verdict::Pass, "to {vip}, about {other_vip}'s tracked flow on {port}");
            // An untracked flow (picked from the flow alone in DSR and tunnel modes).
            let quoted = tcp(other_vip, port, client, 6666, Tcp::Ack, b"");
            let (v, _) = run(&mut w, &icmp_error(router, vip, &quoted), secs(2));
            assert_eq!(v, Verdict::Pass, "to {vip}, about {other_vip}'s untracked flow on {port}");
        }
    }
}

/// A SNAT address that is no VIP is usually the node's own: only frames for the SNAT port range (and
/// errors about packets sent from it) are NAT replies; the node's other traffic to it (its SSH
/// server, an error about its own connection, UDP to a port of its own) passes to the kernel, as the
/// XDP program leaves it there. (It was all taken for NAT replies and dropped as `NoReverseFlow`.)
#[test]
fn the_nodes_own_traffic_to_a_snat_address_passes() {
    let mut w = worker(&all_modes_config());
    for (snat, client, router) in [
        (v4("10.0.0.100"), v4("198.51.100.7"), v4("203.0.113.1")),
        (v4("fd00::100"), v4("2001:db8:ff::7"), v4("2001:db8:fe::1")),
    ] {
        let (v, _) = run(&mut w, &tcp(client, 50000, snat, 22, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Pass, "SSH to {snat}");
        let (v, _) = run(&mut w, &udp(client, 5353, snat, 53, b"q"), secs(1));
        assert_eq!(v, Verdict::Pass, "DNS to {snat}");
        let quoted = tcp(snat, 22, client, 50000, Tcp::Ack, b"");
        assert_eq!(run(&mut w, &icmp_error(router, snat, &quoted), secs(1)).0, Verdict::Pass, "{snat}");
        // In the range, with no NAT flow: a NAT reply that has lost its flow.
        let (v, _) = run(&mut w, &tcp(client, 8080, snat, 40001, Tcp::Ack, b""), secs(1));
        assert_eq!(v, Verdict::Drop(DropReason::NoReverseFlow), "{snat}");
    }
}

/// An ICMP error about the node's own ping from a SNAT address (traceroute's "time exceeded", a
/// "host unreachable") is the kernel's, whatever the ping's identifier: an identifier inside the
/// SNAT port range names no NAT flow (NAT translates TCP and UDP only). It was taken for a NAT
/// reply by its identifier, dropped as `NoReverseFlow` on the owning core and handed over from the
/// others.
#[test]
fn an_error_about_the_nodes_own_ping_from_a_snat_address_passes() {
    use etherparse::PacketBuilder;
    let tables = build(&all_modes_config());
    for core_count in [1, 2] {
        for core_index in 0..core_count {
            let mut w = Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1024, core_index, core_count });
            for (snat, host, router) in [
                (v4("10.0.0.100"), v4("198.51.100.7"), v4("203.0.113.1")),
                (v4("fd00::100"), v4("2001:db8:ff::7"), v4("2001:db8:fe::1")),
            ] {
                for id in [7, 40000, 40700] {
                    let eth = PacketBuilder::ethernet2(LOCAL_MAC, CLIENT_MAC);
                    let mut ping = Vec::new();
                    match (snat, host) {
                        (IpAddr::V4(s), IpAddr::V4(h)) => {
                            eth.ipv4(s.octets(), h.octets(), 1).icmpv4_echo_request(id, 1).write(&mut ping, b"")
                        }
                        (IpAddr::V6(s), IpAddr::V6(h)) => {
                            eth.ipv6(s.octets(), h.octets(), 1).icmpv6_echo_request(id, 1).write(&mut ping, b"")
                        }
                        _ => unreachable!(),
                    }
                    .unwrap();
                    let (v, _) = run(&mut w, &icmp_error(router, snat, &ping), secs(1));
                    assert_eq!(v, Verdict::Pass, "{snat}, ping id {id}, core {core_index} of {core_count}");
                }
            }
        }
    }
}

/// A worker given its interface's MAC ([`Worker::set_source_mac`]) sends every frame from it: each
/// mode and family forwarded, a NAT reply translated back, an ICMP "too big" answer. `lb run` gives
/// each loop its interface's MAC, where `node.local_mac` is one value for every interface of every
/// node that shares the file: switches saw one MAC on several ports, and networks that check a
/// port's source MAC (cloud VPCs, hypervisors refusing forged transmits) dropped the frames.
#[test]
fn a_worker_with_a_source_mac_sends_every_frame_from_it() {
    const IFACE_MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let mut cfg = all_modes_config();
    cfg.node.tunnel_mtu = Some(1400);
    let mut w = worker(&cfg);
    w.set_source_mac(Some(IFACE_MAC));
    for vip in ["192.0.2.1", "2001:db8::1"] {
        let vip = v4(vip);
        let client = if vip.is_ipv4() { v4("198.51.100.7") } else { v4("2001:db8:ff::7") };
        for port in 80..=83u16 {
            let (v, out) = run(&mut w, &tcp(client, 4000, vip, port, Tcp::Syn, b"x"), secs(1));
            assert_eq!(v, Verdict::Tx, "{vip} port {port}");
            assert_eq!(seen(&out).src_mac, IFACE_MAC, "{vip} port {port}");
            if port == 80 {
                let s = seen(&out);
                let (v, back) = run(&mut w, &tcp(s.dst, 8080, s.src, s.sport, Tcp::Ack, b"y"), secs(1));
                assert_eq!(v, Verdict::Tx);
                assert_eq!((back[6..12].to_vec(), back[..6].to_vec()), (IFACE_MAC.to_vec(), GATEWAY_MAC.to_vec()));
            }
        }
        // Too big for the tunnel's path: answered with ICMP from the interface's MAC.
        let mut big = tcp(client, 4001, vip, 82, Tcp::Ack, &[0u8; 1400]);
        if vip.is_ipv4() {
            // Don't fragment: answered rather than dropped.
            big[20] |= 0x40;
            smoltcp::wire::Ipv4Packet::new_unchecked(&mut big[14..34]).fill_checksum();
        }
        let (v, answer) = run(&mut w, &big, secs(2));
        assert_eq!(v, Verdict::Tx, "{vip}: too big");
        assert_eq!(answer[6..12], IFACE_MAC, "{vip}: the ICMP answer's source MAC");
    }
    assert_eq!(w.stats().icmp_too_big, 2);
    // New tables with another node.local_mac: the interface's MAC stays.
    const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];
    let mut other = cfg.clone();
    other.node.local_mac = OTHER_MAC;
    w.swap_tables(build(&other));
    let (_, out) = run(&mut w, &tcp(v4("198.51.100.9"), 4000, v4("192.0.2.1"), 81, Tcp::Syn, b"x"), secs(3));
    assert_eq!(seen(&out).src_mac, IFACE_MAC, "kept across a table swap");
    // Without it, node.local_mac, as before, and the one of the tables swapped in next.
    w.set_source_mac(None);
    let (_, out) = run(&mut w, &tcp(v4("198.51.100.8"), 4000, v4("192.0.2.1"), 81, Tcp::Syn, b"x"), secs(3));
    assert_eq!(seen(&out).src_mac, OTHER_MAC);
    w.swap_tables(build(&cfg));
    let (_, out) = run(&mut w, &tcp(v4("198.51.100.10"), 4000, v4("192.0.2.1"), 81, Tcp::Syn, b"x"), secs(3));
    assert_eq!(seen(&out).src_mac, LOCAL_MAC);
}

/// IPv4 packets without DF leave a tunnel (IP-in-IP, GUE) with outer identifications of the
/// tunnel's own, unique across clients and cores, as RFC 6864 asks of a packet that may be
/// fragmented: they carried the inner packet's, and clients' own identifications collide (here all
/// are 0), so a router fragmenting two of them on the way could have the backend reassemble one
/// from the other's fragments.
#[test]
fn tunnelled_packets_without_df_get_identifications_of_their_own() {
    let tables = build(&all_modes_config());
    let mut cores: Vec<Worker> = (0..2)
        .map(|i| Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1024, core_index: i, core_count: 2 }))
        .collect();
    let mut ids = std::collections::HashSet::new();
    for port in [82u16, 83] {
        for w in &mut cores {
            for client in 1..=4 {
                let mut frame = tcp(v4(&format!("198.51.100.{client}")), 4000, v4("192.0.2.1"), port, Tcp::Syn, b"x");
                frame[20] &= !0x40; // no DF
                smoltcp::wire::Ipv4Packet::new_unchecked(&mut frame[14..34]).fill_checksum();
                assert_eq!(&frame[18..20], &[0, 0], "the inner packet's id");
                let (v, out) = run(w, &frame, secs(1));
                assert_eq!(v, Verdict::Tx, "port {port}");
                assert_eq!(out[20] & 0x40, 0, "port {port}: DF stays clear");
                let id = u16::from_be_bytes([out[18], out[19]]);
                assert!(ids.insert(id), "port {port}, client {client}: outer id {id} given twice");
            }
        }
    }
}

/// `frame` (untagged IPv6) with the extension header `ext` (its next header byte filled in) of type
/// `ext_type` put straight after the IPv6 header, and the IPv6 destination set to `dst`.
fn with_v6_ext(frame: &[u8], ext_type: u8, ext: &[u8], dst: IpAddr) -> Vec<u8> {
    let IpAddr::V6(dst) = dst else { panic!("IPv6 only") };
    let mut out = frame[..14 + 40].to_vec();
    let mut ext = ext.to_vec();
    ext[0] = out[14 + 6];
    out[14 + 6] = ext_type;
    let payload_len = u16::from_be_bytes([out[18], out[19]]) + ext.len() as u16;
    out[18..20].copy_from_slice(&payload_len.to_be_bytes());
    out[14 + 24..14 + 40].copy_from_slice(&dst.octets());
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[14 + 40..]);
    out
}

/// A Segment Routing Header (RFC 8754, routing type 4) listing `segments` (the last segment, the
/// packet's final destination, first) with `left` of them still to visit.
fn srh(segments: &[IpAddr], left: u8) -> Vec<u8> {
    let mut h = vec![0, (2 * segments.len()) as u8, 4, left, segments.len() as u8 - 1, 0, 0, 0];
    for s in segments {
        let IpAddr::V6(s) = s else { panic!("IPv6 only") };
        h.extend_from_slice(&s.octets());
    }
    h
}

/// A packet to a VIP with a routing header that still has segments left is on its way to another
/// destination (the last segment), which its transport header and checksum (RFC 8200 8.1) are for:
/// no mode may balance it (NAT would patch a checksum the VIP is not in and send the backend a
/// packet it must route on). It is dropped and counted; with no segment left the VIP is the final
/// destination and the packet is forwarded, its checksum still valid.
#[test]
fn an_ipv6_routing_header_with_segments_left_to_a_vip_is_not_balanced() {
    let (client, vip, next) = (v4("2001:db8:ff::7"), v4("2001:db8::1"), v4("2001:db8:99::9"));
    for port in 80..=83u16 {
        let mut w = worker(&all_modes_config());
        // In transit: the client's checksum covers `next`, the final destination.
        let syn = tcp(client, 4000, next, port, Tcp::Syn, b"x");
        let f = with_v6_ext(&syn, 43, &srh(&[next, vip], 1), vip);
        let (v, _) = run(&mut w, &f, secs(1));
        assert_eq!(v, Verdict::Drop(DropReason::Unsupported), "port {port}");
        // Arrived: the VIP is the last segment and the destination.
        let syn = tcp(client, 4000, vip, port, Tcp::Syn, b"x");
        let f = with_v6_ext(&syn, 43, &srh(&[vip, next], 0), vip);
        let (v, out) = run(&mut w, &f, secs(1));
        assert_eq!(v, Verdict::Tx, "port {port}");
        if port == 80 {
            // NAT: the checksum is patched for the addresses and ports, behind the routing header.
            let (src, dst, proto, _, _, l4) = smoltcp_ip(&out[14..]);
            assert_eq!(proto, 43);
            let tcp = smoltcp::wire::TcpPacket::new_checked(&l4[40..]).unwrap();
            assert!(tcp.verify_checksum(&src.into(), &dst.into()), "TCP checksum after NAT");
            assert_eq!(tcp.dst_port(), 8080);
        }
        assert_eq!(w.stats().dropped_total(), 1, "port {port}");
    }
}

/// A packet whose source names no single host (unspecified, multicast, loopback, an IPv4-mapped
/// address in IPv6; in IPv4 also 0/8 and broadcast) is one no host sends and no router
/// forwards (RFC 4291 2.5.5.2 and 2.7, RFC 1812 5.3.7; Linux drops it on receipt, so IPVS never
/// sees it): it starts no flow in any mode, so nothing (a NAT-ed reply least of all) is sent to such
/// an address, and it is counted.
#[test]
fn a_source_that_names_no_single_host_starts_no_flow() {
    let sources = [
        ("2001:db8::1", ["::ffff:198.51.100.7", "ff0e::1", "ff02::1", "::", "::1"].as_slice()),
        ("192.0.2.1", ["224.0.0.1", "255.255.255.255", "0.0.0.0", "0.1.2.3", "127.0.0.1"].as_slice()),
    ];
    for (vip, sources) in sources {
        for src in sources {
            for port in 80..=83u16 {
                let mut w = worker(&all_modes_config());
                for frame in
                    [tcp(v4(src), 4000, v4(vip), port, Tcp::Syn, b"x"), udp(v4(src), 4000, v4(vip), port, b"q")]
                {
                    let (v, _) = run(&mut w, &frame, secs(1));
                    assert_eq!(v, Verdict::Drop(DropReason::SourceNotAllowed), "from {src} to {vip}:{port}");
                }
                assert_eq!(w.stats().dropped(DropReason::SourceNotAllowed), 2);
                assert_eq!(w.conntrack().len(), 0, "from {src}");
            }
        }
    }
    // A client that does name one is served, class E included (unicast to Linux; some clusters
    // number their pods in 240.0.0.0/4).
    for (src, vip) in [("2001:db8:ff::7", "2001:db8::1"), ("240.0.0.1", "192.0.2.1"), ("255.255.255.254", "192.0.2.1")]
    {
        let mut w = worker(&all_modes_config());
        assert_eq!(run(&mut w, &tcp(v4(src), 4000, v4(vip), 80, Tcp::Syn, b""), secs(1)).0, Verdict::Tx, "from {src}");
    }
}

/// IPv6 behind extension headers (hop-by-hop options, destination options) end to end: every mode
/// forwards it; in full NAT the backend's reply, with its own destination options, comes back to
/// the client translated, and a router's "packet too big" to the VIP quoting that reply (its
/// extension headers included) reaches the backend translated, every checksum valid (smoltcp).
#[test]
fn ipv6_behind_extension_headers_end_to_end() {
    let (client, vip) = (v4("2001:db8:ff::7"), v4("2001:db8::1"));
    let hop_by_hop = [0, 0, 1, 4, 0, 0, 0, 0];
    let dest_opts = [0, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let behind = |f: &[u8], dst| with_v6_ext(&with_v6_ext(f, 60, &dest_opts, dst), 0, &hop_by_hop, dst);
    let mut w = worker(&all_modes_config());
    for port in 80..=83u16 {
        let (v, out) = run(&mut w, &behind(&tcp(client, 4000, vip, port, Tcp::Syn, b"x"), vip), secs(1));
        assert_eq!(v, Verdict::Tx, "port {port}");
        let inner = if port >= 82 { &out[out.len() - (40 + 24 + 20 + 1)..] } else { &out[14..] };
        let (src, dst, proto, _, _, l4) = smoltcp_ip(inner);
        assert_eq!(proto, 0, "port {port}: the extension headers are kept");
        let tcp = smoltcp::wire::TcpPacket::new_checked(&l4[24..]).unwrap();
        assert!(tcp.verify_checksum(&src.into(), &dst.into()), "port {port}: TCP checksum");
    }
    // Full NAT: the SYN went to a backend from the SNAT address.
    let (_, out) = run(&mut w, &behind(&tcp(client, 4001, vip, 80, Tcp::Syn, b"x"), vip), secs(1));
    let (snat, backend, _, _, _, l4) = smoltcp_ip(&out[14..]);
    let sport = u16::from_be_bytes([l4[24], l4[25]]);
    let reply = with_v6_ext(&tcp(backend, 8080, snat, sport, Tcp::Ack, b"hello"), 60, &dest_opts, snat);
    let (v, back) = run(&mut w, &reply, secs(2));
    assert_eq!(v, Verdict::Tx);
    let (src, dst, proto, _, _, l4) = smoltcp_ip(&back[14..]);
    assert_eq!((src, dst, proto), (vip, client, 60));
    let tcp = smoltcp::wire::TcpPacket::new_checked(&l4[16..]).unwrap();
    assert!(tcp.verify_checksum(&src.into(), &dst.into()), "the reply's TCP checksum");
    assert_eq!((tcp.src_port(), tcp.dst_port()), (80, 4001));
    // A router near the client: "packet too big" about that reply, quoting all of it.
    let router = v4("2001:db8:ff::1");
    let mut ptb = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
        .ipv6(v6_octets(router), v6_octets(vip), 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut ptb, &back[14..])
        .unwrap();
    let (v, err) = run(&mut w, &ptb, secs(3));
    assert_eq!(v, Verdict::Tx);
    let (esrc, edst, proto, _, _, icmp) = smoltcp_ip(&err[14..]);
    assert_eq!((esrc, edst, proto), (snat, backend, 58));
    let packet = smoltcp::wire::Icmpv6Packet::new_checked(&icmp[..]).unwrap();
    let (s6, d6) = (v6_octets(esrc).into(), v6_octets(edst).into());
    assert!(packet.verify_checksum(&s6, &d6), "ICMPv6 checksum");
    // The quote is the backend's reply again, behind its destination options, checksum valid.
    let (qsrc, qdst, proto, _, _, l4) = smoltcp_ip(&icmp[8..]);
    assert_eq!((qsrc, qdst, proto), (backend, snat, 60));
    let tcp = smoltcp::wire::TcpPacket::new_checked(&l4[16..]).unwrap();
    assert!(tcp.verify_checksum(&qsrc.into(), &qdst.into()), "the quoted TCP checksum");
    assert_eq!((tcp.src_port(), tcp.dst_port()), (8080, sport));
    assert_eq!(w.stats().dropped_total(), 0);
}

/// The 16 bytes of an IPv6 address.
fn v6_octets(a: IpAddr) -> [u8; 16] {
    let IpAddr::V6(a) = a else { panic!("IPv6 only") };
    a.octets()
}

/// IPv6 fragments to a VIP, as the worker's documentation says: the first (which has ports, and so
/// names its service) and a later one (which has none) are dropped and counted as fragments in every
/// mode, the first as its service's drop too; an atomic fragment (offset 0, no more) is no fragment
/// and is forwarded.
#[test]
fn ipv6_fragments_to_a_vip_are_counted_drops_and_an_atomic_one_is_forwarded() {
    let (client, vip) = (v4("2001:db8:ff::7"), v4("2001:db8::1"));
    let fragment = |field: u16| [[0u8, 0].as_slice(), &field.to_be_bytes(), &[0, 0, 0, 7]].concat();
    for port in 80..=83u16 {
        let mut w = worker(&all_modes_config());
        let syn = tcp(client, 4000, vip, port, Tcp::Syn, b"x");
        let first = with_v6_ext(&syn, 44, &fragment(0x0001), vip);
        let later = with_v6_ext(&syn, 44, &fragment(0x0008), vip);
        for (name, f) in [("first", &first), ("later", &later)] {
            assert_eq!(run(&mut w, f, secs(1)).0, Verdict::Drop(DropReason::Fragment), "{name}, port {port}");
        }
        assert_eq!(w.stats().dropped(DropReason::Fragment), 2);
        let key = lb_core::config::ServiceKey { vip, port, proto: lb_core::config::Protocol::Tcp };
        let service = w.tables().lookup(&key).unwrap().1.slot;
        assert_eq!(w.stats().service(service).drops, 1, "the first fragment is the service's drop");
        let atomic = with_v6_ext(&syn, 44, &fragment(0), vip);
        assert_eq!(run(&mut w, &atomic, secs(1)).0, Verdict::Tx, "atomic, port {port}");
    }
}

/// A burst counts received exactly the frames it decides: those paired with a verdict, whichever
/// slice is the longer, across batches.
#[test]
fn received_counts_the_frames_with_a_verdict() {
    let mut w = worker(&all_modes_config());
    let mut expected = 0;
    for (n_frames, n_verdicts) in [(20usize, 18usize), (3, 5), (16, 16), (33, 17)] {
        let frames: Vec<Vec<u8>> =
            (0..n_frames).map(|i| udp(v4("198.51.100.7"), 4000 + i as u16, v4("192.0.2.1"), 81, b"q")).collect();
        let mut bufs: Vec<Vec<u8>> = frames.clone();
        let mut burst: Vec<lb_core::Frame<'_>> =
            bufs.iter_mut().zip(&frames).map(|(b, f)| lb_core::Frame::new(b, 0, f.len())).collect();
        let mut verdicts = vec![Verdict::Pass; n_verdicts];
        w.process_burst(&mut burst, secs(1), &mut verdicts);
        let decided = n_frames.min(n_verdicts);
        expected += decided as u64;
        assert_eq!(w.stats().rx, expected, "{n_frames} frames, {n_verdicts} verdicts");
        assert_eq!(w.stats().tx, expected, "{n_frames} frames, {n_verdicts} verdicts");
        assert!(verdicts[..decided].iter().all(|v| *v == Verdict::Tx));
    }
}
