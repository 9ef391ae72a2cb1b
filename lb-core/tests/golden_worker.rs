//! Golden fixtures at the worker level, as Katran keeps them: for each forwarding mode x family x
//! protocol an input frame, the expected verdict and the expected output bytes; for each drop reason an
//! input frame (and the state that provokes it), the expected verdict and its counter.
//!
//! Expected frames are built independently of lb-core, with etherparse (headers and full checksums);
//! where the output depends on the flow hash (GUE source port, IPv6 outer flow label) the expected
//! value comes from lb-hash's documented flow hash and the forward module's documented formulas.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use std::net::IpAddr;

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, UdpHeader};
use lb_core::config::{BackendState, Config, RemovedBackendPolicy};
use lb_core::stats::DropReason;
use lb_core::{Frame, Verdict, Worker, WorkerConfig};
use worker_common::*;

const VIP4: &str = "192.0.2.1";
const VIP6: &str = "2001:db8::1";
const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:ff::7";
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

/// One backend per service and a single SNAT port, so every output is determined.
fn golden_config() -> Config {
    let mut cfg = all_modes_config();
    for s in &mut cfg.services {
        s.backends.truncate(1);
    }
    cfg.node.snat_ports = (40000, 40000);
    cfg
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client_frame(v6: bool, is_tcp: bool, port: u16) -> Vec<u8> {
    let (c, vip) = if v6 { (ip(CLIENT6), ip(VIP6)) } else { (ip(CLIENT4), ip(VIP4)) };
    if is_tcp { tcp(c, 40_123, vip, port, Tcp::Syn, PAYLOAD) } else { udp(c, 40_123, vip, port, PAYLOAD) }
}

fn backend_of(v6: bool) -> IpAddr {
    if v6 { ip("fd00:1::1") } else { ip("10.1.0.1") }
}

/// An Ethernet + IP + TCP/UDP frame built by etherparse with the given header values.
fn frame(macs: ([u8; 6], [u8; 6]), src: IpAddr, sport: u16, dst: IpAddr, dport: u16, ttl: u8, is_tcp: bool) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let ipb = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => unreachable!(),
    };
    let mut out = Vec::new();
    if is_tcp {
        ipb.tcp(sport, dport, 1000, 65535).syn().write(&mut out, PAYLOAD).unwrap();
    } else {
        ipb.udp(sport, dport).write(&mut out, PAYLOAD).unwrap();
    }
    out
}

fn flow_hash32(v6: bool, is_tcp: bool, port: u16) -> u32 {
    let (c, vip) = if v6 { (ip(CLIENT6), ip(VIP6)) } else { (ip(CLIENT4), ip(VIP4)) };
    let h = lb_hash::FlowHasher::new(node().hash_seed).five_tuple(c, vip, if is_tcp { 6 } else { 17 }, 40_123, port);
    (h >> 32) as u32
}

/// Ethernet header + outer IP header (+ UDP/GUE) + the client's IP packet unchanged.
fn tunnelled(input: &[u8], v6: bool, gue: Option<u32>, flow_hash: u32) -> Vec<u8> {
    let inner = &input[14..];
    let b = backend_of(v6);
    let mut out = Vec::new();
    out.extend_from_slice(&backend_mac(b));
    out.extend_from_slice(&LOCAL_MAC);
    out.extend_from_slice(&input[12..14]);
    let mut udp_and_gue = Vec::new();
    let inner_proto = if v6 { 41 } else { 4 };
    let extra = if gue.is_some() { 12 } else { 0 };
    let next = if gue.is_some() { IpNumber::UDP } else { IpNumber(inner_proto) };
    let sport = 0xc000 | (flow_hash & 0x3fff) as u16;
    let mut gue_payload = vec![0, inner_proto, 0, 0];
    gue_payload.extend_from_slice(inner);
    if v6 {
        let IpAddr::V6(src) = ip("fd00::101") else { unreachable!() };
        let IpAddr::V6(dst) = b else { unreachable!() };
        let h = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::try_new(flow_hash & 0xfffff).unwrap(),
            payload_length: (inner.len() + extra) as u16,
            next_header: next,
            hop_limit: 64,
            source: src.octets(),
            destination: dst.octets(),
        };
        if gue.is_some() {
            UdpHeader::with_ipv6_checksum(sport, 6080, &h, &gue_payload).unwrap().write(&mut udp_and_gue).unwrap();
        }
        h.write(&mut out).unwrap();
    } else {
        let IpAddr::V4(dst) = b else { unreachable!() };
        let mut h = Ipv4Header::new((inner.len() + extra) as u16, 64, next, [10, 0, 0, 101], dst.octets()).unwrap();
        h.dont_fragment = inner[6] & 0x40 != 0;
        h.header_checksum = h.calc_header_checksum();
        h.write(&mut out).unwrap();
        if gue.is_some() {
            let u = UdpHeader {
                source_port: sport,
                destination_port: 6080,
                length: (8 + gue_payload.len()) as u16,
                checksum: 0,
            };
            u.write(&mut udp_and_gue).unwrap();
        }
    }
    if gue.is_some() {
        out.extend_from_slice(&udp_and_gue);
        out.extend_from_slice(&gue_payload);
    } else {
        out.extend_from_slice(inner);
    }
    out
}

#[test]
fn every_mode_family_and_protocol_matches_its_golden_frame() {
    let mut w = worker(&golden_config());
    let mut checked = 0;
    for v6 in [false, true] {
        for is_tcp in [true, false] {
            for (port, mode) in [(80, "nat"), (81, "dsr"), (82, "ipip"), (83, "gue")] {
                let input = client_frame(v6, is_tcp, port);
                let b = backend_of(v6);
                let expected = match mode {
                    "nat" => {
                        let snat = if v6 { ip("fd00::100") } else { ip("10.0.0.100") };
                        frame((LOCAL_MAC, backend_mac(b)), snat, 40000, b, 8080, 63, is_tcp)
                    }
                    "dsr" => {
                        let (c, vip) = if v6 { (ip(CLIENT6), ip(VIP6)) } else { (ip(CLIENT4), ip(VIP4)) };
                        frame((LOCAL_MAC, backend_mac(b)), c, 40_123, vip, port, 64, is_tcp)
                    }
                    "ipip" => tunnelled(&input, v6, None, flow_hash32(v6, is_tcp, port)),
                    _ => tunnelled(&input, v6, Some(6080), flow_hash32(v6, is_tcp, port)),
                };
                let (v, out) = run(&mut w, &input, secs(1));
                let what = format!("{mode} v6={v6} tcp={is_tcp}");
                assert_eq!(v, Verdict::Tx, "{what}");
                assert_eq!(out, expected, "{what}: output differs from the golden frame");
                checked += 1;

                if mode == "nat" {
                    // The backend's reply, translated back to VIP -> client, to the gateway.
                    let snat = if v6 { ip("fd00::100") } else { ip("10.0.0.100") };
                    let reply = frame((backend_mac(b), LOCAL_MAC), b, 8080, snat, 40000, 64, is_tcp);
                    let (c, vip) = if v6 { (ip(CLIENT6), ip(VIP6)) } else { (ip(CLIENT4), ip(VIP4)) };
                    let expected = frame((LOCAL_MAC, GATEWAY_MAC), vip, port, c, 40_123, 63, is_tcp);
                    let (v, out) = run(&mut w, &reply, secs(1));
                    assert_eq!((v, out), (Verdict::Tx, expected), "{what}: reply");
                }
            }
        }
    }
    assert_eq!(checked, 16);
}

/// Runs `input` after `setup` and checks the verdict is `Drop(reason)` and that exactly that counter
/// moved by one.
fn assert_drop(w: &mut Worker, input: &[u8], headroom: usize, reason: DropReason) {
    assert_drop_of(w, input, headroom, reason, false);
}

/// [`assert_drop`], for a frame another core handed over (`handed`: through
/// `Worker::process_handed_burst`).
fn assert_drop_of(w: &mut Worker, input: &[u8], headroom: usize, reason: DropReason, handed: bool) {
    let before = w.stats().drops;
    let mut buf = vec![0u8; headroom + input.len()];
    buf[headroom..].copy_from_slice(input);
    let mut frames = [Frame::new(&mut buf, headroom, input.len())];
    let mut verdicts = [Verdict::Pass];
    if handed {
        w.process_handed_burst(&mut frames, secs(10), &mut verdicts);
    } else {
        w.process_burst(&mut frames, secs(10), &mut verdicts);
    }
    assert_eq!(verdicts[0], Verdict::Drop(reason));
    let after = w.stats().drops;
    for r in DropReason::ALL {
        let want = u64::from(r == reason);
        assert_eq!(after[r.index()] - before[r.index()], want, "counter {r} while dropping for {reason}");
    }
}

#[test]
fn every_drop_reason_has_a_golden_frame() {
    let vip = ip(VIP4);
    let c = ip(CLIENT4);
    let mut covered = vec![];
    let mut check = |w: &mut Worker, input: &[u8], headroom: usize, r: DropReason| {
        assert_drop(w, input, headroom, r);
        covered.push(r);
    };

    let mut w = worker(&golden_config());
    let mut f = client_frame(false, true, 80);
    f[14] = 0x43; // IHL 3
    check(&mut w, &f, HEADROOM, DropReason::Malformed);
    let f = client_frame(false, true, 80);
    check(&mut w, &f[..14 + 20 + 10], HEADROOM, DropReason::Truncated);
    let mut g = Vec::new();
    let mut h = Ipv4Header::new(4, 64, IpNumber(47), [198, 51, 100, 7], [192, 0, 2, 1]).unwrap();
    h.header_checksum = h.calc_header_checksum();
    g.extend_from_slice(&GATEWAY_MAC);
    g.extend_from_slice(&CLIENT_MAC);
    g.extend_from_slice(&[0x08, 0x00]);
    h.write(&mut g).unwrap();
    g.extend_from_slice(&[0, 0, 0x08, 0x00]);
    check(&mut w, &g, HEADROOM, DropReason::Unsupported);
    let mut f = client_frame(false, false, 81);
    let mut h = Ipv4Header::from_slice(&f[14..]).unwrap().0;
    h.more_fragments = true;
    h.header_checksum = h.calc_header_checksum();
    let mut hb = Vec::new();
    h.write(&mut hb).unwrap();
    f[14..34].copy_from_slice(&hb);
    check(&mut w, &f, HEADROOM, DropReason::Fragment);
    check(&mut w, &tcp(c, 1, vip, 9999, Tcp::Syn, b""), HEADROOM, DropReason::NoService);
    // TTL 1 (checksum no longer matters: the TTL check comes first), sent to the broadcast MAC:
    // not answered with time exceeded (RFC 1812 4.3.2.7).
    let mut t = tcp(c, 1, vip, 80, Tcp::Syn, b"");
    t[22] = 1;
    t[..6].copy_from_slice(&[0xff; 6]);
    check(&mut w, &t, HEADROOM, DropReason::TtlExpired);
    check(&mut w, &tcp(c, 2, vip, 82, Tcp::Syn, b""), 10, DropReason::NoHeadroom);
    check(
        &mut w,
        &tcp(ip("10.1.0.1"), 8080, ip("10.0.0.100"), 40000, Tcp::Ack, b""),
        HEADROOM,
        DropReason::NoReverseFlow,
    );
    // NoSnatPort: the one SNAT port is taken by an established flow to the same backend (a
    // half-open one would be evicted for it).
    run(&mut w, &tcp(c, 3, vip, 80, Tcp::Syn, b""), secs(10));
    run(&mut w, &tcp(c, 3, vip, 80, Tcp::Ack, b""), secs(10));
    check(&mut w, &tcp(c, 4, vip, 80, Tcp::Syn, b""), HEADROOM, DropReason::NoSnatPort);
    // An error about an untracked flow of the NAT service (an untracked flow of a DSR Maglev
    // service has a backend any core knows, and its error goes there).
    let quoted = &tcp(vip, 80, ip("198.51.100.99"), 1000, Tcp::Ack, b"")[14..];
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
        .ipv4([203, 0, 113, 1], [192, 0, 2, 1], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Host))
        .write(&mut icmp, &quoted[..28])
        .unwrap();
    check(&mut w, &icmp, HEADROOM, DropReason::IcmpNoFlow);
    // IcmpCopyUntracked: the same error on a core of two, which hands it to the other core; that
    // core, not tracking the flow either, drops its copy.
    let two = |i| {
        Worker::new(build(&golden_config()), WorkerConfig { conntrack_capacity: 1024, core_index: i, core_count: 2 })
    };
    assert_eq!(run(&mut two(0), &icmp, secs(10)).0, Verdict::HandoffAll);
    assert_drop_of(&mut two(1), &icmp, HEADROOM, DropReason::IcmpCopyUntracked, true);
    let handed_covered = [DropReason::IcmpCopyUntracked];
    // TooBig: a 65 535-byte IPv4 datagram cannot get a 20-byte outer header.
    let big = udp(c, 5, vip, 82, &vec![0u8; 65_535 - 28]);
    check(&mut w, &big, HEADROOM, DropReason::TooBig);

    // NoBackend and SourceNotAllowed.
    let mut cfg = golden_config();
    cfg.services[0].backends[0].state = BackendState::Draining;
    cfg.services[4].source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let mut w = worker(&cfg);
    check(&mut w, &tcp(c, 1, vip, 80, Tcp::Syn, b""), HEADROOM, DropReason::NoBackend);
    check(&mut w, &tcp(c, 1, vip, 81, Tcp::Syn, b""), HEADROOM, DropReason::SourceNotAllowed);

    // BackendRemoved: an established flow whose backend left a service with the drop policy.
    let mut cfg = golden_config();
    cfg.services[4].backends = vec![backend("10.1.0.1", 81), backend("10.1.0.2", 81)];
    cfg.services[4].on_backend_removed = RemovedBackendPolicy::Drop;
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let (_, out) = run(&mut w, &tcp(c, 1, vip, 81, Tcp::Syn, b""), secs(1));
    let used = if out[5] == 1 { "10.1.0.1" } else { "10.1.0.2" };
    cfg.services[4].backends.retain(|x| x.addr != ip(used));
    w.swap_tables(b.build(&cfg).unwrap());
    check(&mut w, &tcp(c, 1, vip, 81, Tcp::Ack, b""), HEADROOM, DropReason::BackendRemoved);

    // ConntrackFull: one 8-way bucket full of established flows.
    let mut w = Worker::new(build(&golden_config()), WorkerConfig::single_core(8));
    for port in 1..=8 {
        run(&mut w, &tcp(c, port, vip, 81, Tcp::Syn, b""), secs(1));
        run(&mut w, &tcp(c, port, vip, 81, Tcp::Ack, b""), secs(1));
    }
    check(&mut w, &tcp(c, 100, vip, 81, Tcp::Syn, b""), HEADROOM, DropReason::ConntrackFull);

    // ArpConflict: another host's gratuitous ARP for the VIP, defended once, then within 10 s not.
    let mut w = worker(&golden_config());
    w.set_neighbour_mac(Some(LOCAL_MAC));
    let mut claim = Vec::new();
    claim.extend_from_slice(&[0xff; 6]);
    claim.extend_from_slice(&CLIENT_MAC);
    claim.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    claim.extend_from_slice(&CLIENT_MAC);
    claim.extend_from_slice(&[192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 192, 0, 2, 1]);
    claim.resize(60, 0);
    assert_eq!(run(&mut w, &claim, secs(10)).0, Verdict::Tx, "the first claim is defended");
    check(&mut w, &claim, HEADROOM, DropReason::ArpConflict);

    covered.extend(handed_covered);
    covered.sort();
    covered.dedup();
    assert_eq!(covered, DropReason::ALL.to_vec(), "a drop reason has no golden frame");
}
