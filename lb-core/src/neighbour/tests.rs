//! Real ARP and NDP bytes in, replies checked byte by byte (checksums by an independent RFC 1071 sum).

#![allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::config::{BackendConfig, BackendState, Config, NodeConfig, Protocol, ServiceConfig, ServiceKey};
use crate::service::TableBuilder;
use crate::{Instant, Worker, WorkerConfig};

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ASKER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
const ASKER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const ASKER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// Configured, but no IPv4 service uses NAT: not answered for.
const SNAT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// Used by the IPv6 NAT service: answered for.
const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
const OTHER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);

/// An IPv4 DSR service on VIP4, an IPv6 NAT service on VIP6; SNAT addresses of both families set.
fn tables() -> Arc<Tables> {
    TableBuilder::new().build(&config()).unwrap()
}

/// The configuration of [`tables`].
fn config() -> Config {
    let backend = |addr: IpAddr| BackendConfig {
        addr,
        port: 80,
        weight: 1,
        mac: Some([2, 0xbe, 0, 0, 0, 1]),
        state: BackendState::Active,
    };
    let mut config = Config {
        node: NodeConfig {
            local_mac: MAC,
            gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]),
            snat_v4: Some(SNAT4),
            snat_v6: Some(SNAT6),
            ..NodeConfig::default()
        },
        services: Vec::new(),
    };
    let key = |vip| ServiceKey { vip, port: 80, proto: Protocol::Tcp };
    config.services.push(ServiceConfig::new(
        "v4-dsr",
        key(IpAddr::V4(VIP4)),
        ForwardMode::Dsr,
        vec![backend(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))],
    ));
    config.services.push(ServiceConfig::new(
        "v6-nat",
        key(IpAddr::V6(VIP6)),
        ForwardMode::Nat,
        vec![backend(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)))],
    ));
    config
}

/// An Ethernet header, with an 802.1Q tag `tci` when given.
fn eth(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ether_type: u16) -> Vec<u8> {
    let mut f = [dst, src].concat();
    if let Some(tci) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f
}

/// A broadcast ARP request (operation `op`) from the asker for `target`, padded to 60 bytes as on
/// the wire.
fn arp(op: u16, target: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
    let mut f = eth([0xff; 6], ASKER_MAC, vlan, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&ASKER_MAC);
    f.extend_from_slice(&ASKER4.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(f.len().max(60), 0);
    f
}

/// The RFC 1071 checksum of an ICMPv6 message `body` (its checksum field included as given).
fn icmpv6_sum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut pseudo = [src.octets(), dst.octets()].concat();
    pseudo.extend_from_slice(&(body.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let mut sum = 0u32;
    for chunk in pseudo.chunks(2).chain(body.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv6 packet carrying the ICMPv6 message `icmp`, whose checksum is filled in.
fn ipv6_icmp(src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, mut icmp: Vec<u8>) -> Vec<u8> {
    let sum = icmpv6_sum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.extend_from_slice(&[58, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&icmp);
    p
}

/// The solicited-node group of `a` and its Ethernet group address.
fn solicited(a: Ipv6Addr) -> (Ipv6Addr, [u8; 6]) {
    let o = a.octets();
    let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]));
    (group, [0x33, 0x33, 0xff, o[13], o[14], o[15]])
}

/// A Neighbour Solicitation for `target` from `src` (`::` for duplicate address detection), to the
/// target's solicited-node group, with a source link-layer option when `sllao`.
fn ns(src: Ipv6Addr, target: Ipv6Addr, sllao: bool, hop_limit: u8, vlan: Option<u16>) -> Vec<u8> {
    let (group, group_mac) = solicited(target);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    if sllao {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&ASKER_MAC);
    }
    [eth(group_mac, ASKER_MAC, vlan, 0x86dd), ipv6_icmp(src, group, hop_limit, icmp)].concat()
}

/// The advertisement the responder must send: from `target` to `to` at `to_mac`, with `flags`
/// (0x60 solicited + override, 0x20 override only) and our MAC in a target link-layer option.
fn na(to: Ipv6Addr, to_mac: [u8; 6], target: Ipv6Addr, flags: u8, vlan: Option<u16>) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, flags, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&MAC);
    [eth(to_mac, MAC, vlan, 0x86dd), ipv6_icmp(target, to, 255, icmp)].concat()
}

/// Runs the responder on `bytes` in a buffer with 64 bytes of tailroom; the answer and the frame after.
fn answer(bytes: &[u8]) -> (Answer, Vec<u8>) {
    let tables = tables();
    let mut r = NeighbourResponder::new(MAC, &tables);
    let mut buf = bytes.to_vec();
    buf.resize(bytes.len() + 64, 0xee);
    let mut frame = Frame::new(&mut buf, 0, bytes.len());
    let a = r.answer(&tables, &mut frame, 1);
    let out = frame.data().to_vec();
    (a, out)
}

#[test]
fn arp_request_for_a_vip_becomes_a_reply_untagged_and_tagged() {
    for vlan in [None, Some(0x0123)] {
        let (a, out) = answer(&arp(1, VIP4, vlan));
        assert_eq!(a, Answer::ArpReply, "vlan {vlan:?}");
        let mut want = eth(ASKER_MAC, MAC, vlan, 0x0806);
        // Ethernet / IPv4, reply; sender: our MAC and the VIP; target: the asker.
        want.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        want.extend_from_slice(&MAC);
        want.extend_from_slice(&VIP4.octets());
        want.extend_from_slice(&ASKER_MAC);
        want.extend_from_slice(&ASKER4.octets());
        want.resize(want.len().max(60), 0);
        assert_eq!(out, want, "vlan {vlan:?}");
    }
}

#[test]
fn arp_reply_parses_back_with_etherparse() {
    let (_, out) = answer(&arp(1, VIP4, None));
    let eth = etherparse::Ethernet2Header::from_slice(&out).unwrap().0;
    assert_eq!((eth.destination, eth.source, eth.ether_type), (ASKER_MAC, MAC, etherparse::EtherType::ARP));
    let arp = etherparse::ArpPacket::from_slice(&out[14..]).unwrap();
    assert_eq!(arp.operation, etherparse::ArpOperation::REPLY);
    assert_eq!((arp.sender_hw_addr(), arp.sender_protocol_addr()), (&MAC[..], &VIP4.octets()[..]));
    assert_eq!((arp.target_hw_addr(), arp.target_protocol_addr()), (&ASKER_MAC[..], &ASKER4.octets()[..]));
}

#[test]
fn arp_not_for_us_or_not_a_request_is_left_alone() {
    let mut not_ethernet = arp(1, VIP4, None);
    not_ethernet[15] = 6; // hardware type IEEE 802
    let cases: [(&str, Vec<u8>); 6] = [
        ("another address", arp(1, OTHER4, None)),
        ("the IPv4 SNAT address, which no IPv4 NAT service uses", arp(1, SNAT4, None)),
        ("a reply for the VIP", arp(2, VIP4, None)),
        ("a request cut inside the target address", arp(1, VIP4, None)[..40].to_vec()),
        ("a hardware type other than Ethernet", not_ethernet),
        ("three VLAN tags", {
            let mut f = arp(1, VIP4, Some(1));
            f.splice(12..12, [0x81, 0, 0, 2, 0x81, 0, 0, 3]);
            f
        }),
    ];
    for (name, frame) in cases {
        let (a, out) = answer(&frame);
        assert_eq!(a, Answer::NotOurs, "{name}");
        assert_eq!(out, frame, "{name}: changed");
    }
}

/// A gratuitous ARP request (RFC 5227 announcement: sender and target both `addr`) from `mac`.
fn gratuitous(mac: [u8; 6], addr: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
    let mut f = eth([0xff; 6], mac, vlan, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&addr.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&addr.octets());
    f.resize(f.len().max(60), 0);
    f
}

/// Another host's gratuitous ARP for an address we answer for is defended as RFC 5227 2.4 (c)
/// says: one broadcast ARP announcement of the address at our MAC (tags kept), then none for that
/// address within DEFEND_INTERVAL (10 s: the claim is a counted drop, so two defenders cannot loop),
/// and again after. Before, the claimant alone got a unicast reply, and every neighbour that heard
/// the claim kept sending to the claimant.
#[test]
fn another_hosts_claim_is_defended_by_broadcast_once_per_defend_interval() {
    const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    let tables = tables();
    let mut r = NeighbourResponder::new(MAC, &tables);
    let mut run = |bytes: Vec<u8>, now: u32| {
        let mut buf = bytes.clone();
        let mut frame = Frame::whole(&mut buf);
        let a = r.answer(&tables, &mut frame, now);
        (a, frame.data().to_vec())
    };
    for (vlan, start) in [(None, 100), (Some(0x0123), 1000)] {
        let claim = gratuitous(OTHER_MAC, VIP4, vlan);
        assert_eq!(run(claim.clone(), start), (Answer::ArpDefence, gratuitous(MAC, VIP4, vlan)), "{vlan:?}");
        for later in [0, 1, 9] {
            assert_eq!(run(claim.clone(), start + later), (Answer::ArpConflict, claim.clone()), "{vlan:?} +{later}s");
        }
        assert_eq!(run(claim, start + 10).0, Answer::ArpDefence, "{vlan:?}: again after 10 s");
    }
    // A gratuitous ARP reply (MetalLB sends one with its request) is a claim as well.
    let mut reply = gratuitous(OTHER_MAC, VIP4, None);
    reply[21] = 2;
    assert_eq!(run(reply.clone(), 3000), (Answer::ArpDefence, gratuitous(MAC, VIP4, None)));
    assert_eq!(run(reply.clone(), 3001), (Answer::ArpConflict, reply));
    // An ARP probe (sender 0.0.0.0) is no claim: answered, so the prober sees the address taken.
    let mut probe = arp(1, VIP4, None);
    probe[28..32].fill(0);
    assert_eq!(run(probe, 2000).0, Answer::ArpReply);
    // Nor is another host's request for the address: answered.
    assert_eq!(run(arp(1, VIP4, None), 2000).0, Answer::ArpReply);
    // A claim of an address not ours is the kernel's.
    let other = gratuitous(OTHER_MAC, OTHER4, None);
    assert_eq!(run(other.clone(), 2000), (Answer::NotOurs, other));
}

/// A responder remembers the defences of [`DEFENDED_ADDRESSES`] addresses: a conflict on one more
/// address while all of those are fresh is not defended (a defence it could not remember could
/// loop with another defender), and is once one of them is older than DEFEND_INTERVAL.
#[test]
fn conflicts_on_more_addresses_than_remembered_are_defended_once_a_slot_is_free() {
    let mut config = config();
    let backend = config.services[0].backends.clone();
    let vip = |i: usize| Ipv4Addr::new(198, 51, 100, i as u8);
    for i in 0..=DEFENDED_ADDRESSES {
        let key = ServiceKey { vip: IpAddr::V4(vip(i)), port: 80, proto: Protocol::Tcp };
        config.services.push(ServiceConfig::new("many", key, ForwardMode::Dsr, backend.clone()));
    }
    let tables = TableBuilder::new().build(&config).unwrap();
    let mut r = NeighbourResponder::new(MAC, &tables);
    let mut run = |addr: Ipv4Addr, now: u32| {
        let mut buf = gratuitous([0x02, 0, 0, 0, 0, 0x0b], addr, None);
        r.answer(&tables, &mut Frame::whole(&mut buf), now)
    };
    for i in 0..DEFENDED_ADDRESSES {
        assert_eq!(run(vip(i), 5 + i as u32 % 2), Answer::ArpDefence, "{}", vip(i));
    }
    let last = vip(DEFENDED_ADDRESSES);
    assert_eq!(run(last, 14), Answer::ArpConflict, "every slot defended less than 10 s ago");
    assert_eq!(run(last, 15), Answer::ArpDefence, "the slots of second 5 are free at 15");
    assert_eq!(run(vip(0), 15), Answer::ArpDefence, "its defence at 5 is 10 s old");
}

#[test]
fn solicitation_for_a_vip_becomes_a_solicited_advertisement() {
    for (vlan, sllao) in [(None, true), (None, false), (Some(7), true), (Some(7), false)] {
        let (a, out) = answer(&ns(ASKER6, VIP6, sllao, 255, vlan));
        assert_eq!(a, Answer::NeighbourAdvert, "vlan {vlan:?} sllao {sllao}");
        // To the solicitor (its link-layer option, or without one the frame's source), S and O set.
        assert_eq!(out, na(ASKER6, ASKER_MAC, VIP6, 0x60, vlan), "vlan {vlan:?} sllao {sllao}");
        let l3 = if vlan.is_some() { 18 } else { 14 };
        assert_eq!(icmpv6_sum(VIP6, ASKER6, &out[l3 + 40..]), 0, "checksum");
    }
}

#[test]
fn solicitation_for_the_snat_address_of_a_nat_service_is_answered() {
    let (a, out) = answer(&ns(ASKER6, SNAT6, true, 255, None));
    assert_eq!(a, Answer::NeighbourAdvert);
    assert_eq!(out, na(ASKER6, ASKER_MAC, SNAT6, 0x60, None));
}

#[test]
fn unicast_solicitation_to_the_vip_is_answered() {
    // Neighbour unreachability detection: sent to the address itself, at the MAC it has cached.
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&VIP6.octets());
    let frame = [eth(MAC, ASKER_MAC, None, 0x86dd), ipv6_icmp(ASKER6, VIP6, 255, icmp)].concat();
    let (a, out) = answer(&frame);
    assert_eq!(a, Answer::NeighbourAdvert);
    assert_eq!(out, na(ASKER6, ASKER_MAC, VIP6, 0x60, None));
}

#[test]
fn duplicate_address_detection_is_answered_to_all_nodes() {
    let (a, out) = answer(&ns(Ipv6Addr::UNSPECIFIED, VIP6, false, 255, None));
    assert_eq!(a, Answer::NeighbourAdvert);
    // RFC 4861 7.2.4: Solicited clear, to ff02::1 at 33:33:00:00:00:01.
    assert_eq!(out, na(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), [0x33, 0x33, 0, 0, 0, 1], VIP6, 0x20, None));
}

#[test]
fn solicitations_rfc_4861_discards_are_counted_drops_and_unchanged() {
    let mut bad_sum = ns(ASKER6, VIP6, true, 255, None);
    bad_sum[14 + 40 + 2] ^= 0xff;
    let mut zero_option = ns(ASKER6, VIP6, true, 255, None);
    zero_option[14 + 40 + 24 + 1] = 0; // option length 0
    let mut dad_elsewhere = ns(Ipv6Addr::UNSPECIFIED, VIP6, false, 255, None);
    dad_elsewhere[14 + 24 + 15] ^= 1; // not the target's solicited-node group
    let dad_elsewhere = {
        // Keep the checksum right, so only the destination is wrong.
        let mut icmp = dad_elsewhere[14 + 40..].to_vec();
        icmp[2..4].copy_from_slice(&[0, 0]);
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&dad_elsewhere[14 + 24..14 + 40]).unwrap());
        [dad_elsewhere[..14].to_vec(), ipv6_icmp(Ipv6Addr::UNSPECIFIED, dst, 255, icmp)].concat()
    };
    let cases: [(&str, Vec<u8>); 6] = [
        ("bad checksum", bad_sum),
        ("from a multicast source", ns(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), VIP6, true, 255, None)),
        ("hop limit 64 (routed from elsewhere)", ns(ASKER6, VIP6, true, 64, None)),
        ("an option of length 0", zero_option),
        (
            "duplicate address detection with a source link-layer option",
            ns(Ipv6Addr::UNSPECIFIED, VIP6, true, 255, None),
        ),
        ("duplicate address detection not to the solicited-node group", dad_elsewhere),
    ];
    for (name, frame) in cases {
        let (a, out) = answer(&frame);
        assert_eq!(a, Answer::Invalid(DropReason::Malformed), "{name}");
        assert_eq!(out, frame, "{name}: changed");
    }
}

#[test]
fn solicitations_not_for_us_are_left_alone() {
    let mut advert = ns(ASKER6, VIP6, true, 255, None);
    advert[14 + 40] = 136;
    let cases: [(&str, Vec<u8>); 5] = [
        ("another target", ns(ASKER6, OTHER6, true, 255, None)),
        ("an advertisement, not a solicitation", advert),
        ("cut inside the target", ns(ASKER6, VIP6, true, 255, None)[..14 + 40 + 20].to_vec()),
        ("cut inside the IPv6 header", ns(ASKER6, VIP6, true, 255, None)[..30].to_vec()),
        ("an IPv4 VIP asked for in IPv6 (mapped)", ns(ASKER6, VIP4.to_ipv6_mapped(), true, 255, None)),
    ];
    for (name, frame) in cases {
        let (a, out) = answer(&frame);
        assert_eq!(a, Answer::NotOurs, "{name}");
        assert_eq!(out, frame, "{name}: changed");
    }
}

#[test]
fn an_advertisement_that_does_not_fit_is_dropped_as_no_room() {
    let tables = tables();
    let mut r = NeighbourResponder::new(MAC, &tables);
    let mut bytes = ns(ASKER6, VIP6, false, 255, None);
    let before = bytes.clone();
    let a = r.answer(&tables, &mut Frame::whole(&mut bytes), 1);
    assert_eq!(a, Answer::Invalid(DropReason::NoHeadroom));
    assert_eq!(bytes, before);
}

#[test]
fn addresses_are_the_vips_and_the_snat_address_of_nat_families() {
    let tables = tables();
    let mut got: Vec<IpAddr> = addresses(&tables).collect();
    got.sort();
    assert_eq!(got, [IpAddr::V4(VIP4), IpAddr::V6(SNAT6), IpAddr::V6(VIP6)]);
}

/// Kubernetes cluster IPs (services that do not answer neighbours) get no ARP / NDP answer and are no
/// address to steer, announce or join a group for, while a VIP that one of its services has
/// answered is answered whatever its other services say. Before, every VIP was answered: cluster IPs,
/// which the cluster routes, were claimed on the clients' segment and cost a multicast group each.
#[test]
fn vips_of_services_that_do_not_answer_neighbours_are_not_ours() {
    const CLUSTER4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const CLUSTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
    let mut config = config();
    let not_answered = |vip: IpAddr, port: u16| {
        // DSR: the backend listens on the service port.
        let backend = if vip.is_ipv4() { "10.0.0.1" } else { "fd00::1" };
        let backend = BackendConfig {
            addr: backend.parse().unwrap(),
            port,
            weight: 1,
            mac: Some([2, 0xbe, 0, 0, 0, 1]),
            state: BackendState::Active,
        };
        let key = ServiceKey { vip, port, proto: Protocol::Tcp };
        ServiceConfig {
            answer_neighbours: false,
            ..ServiceConfig::new("cluster-ip", key, ForwardMode::Dsr, vec![backend])
        }
    };
    config.services.push(not_answered(IpAddr::V4(CLUSTER4), 80));
    config.services.push(not_answered(IpAddr::V6(CLUSTER6), 80));
    // Another port of an answered VIP, itself not answered: the VIP stays answered.
    config.services.push(not_answered(IpAddr::V4(VIP4), 443));
    let tables = TableBuilder::new().build(&config).unwrap();
    let mut r = NeighbourResponder::new(MAC, &tables);
    let mut run = |bytes: Vec<u8>| {
        let mut buf = bytes.clone();
        buf.resize(bytes.len() + 64, 0);
        let mut frame = Frame::new(&mut buf, 0, bytes.len());
        let a = r.answer(&tables, &mut frame, 1);
        (a, frame.data() == &bytes[..])
    };
    assert_eq!(run(arp(1, CLUSTER4, None)), (Answer::NotOurs, true), "ARP for a cluster IP");
    assert_eq!(run(ns(ASKER6, CLUSTER6, true, 255, None)), (Answer::NotOurs, true), "NS for a cluster IP");
    assert_eq!(run(arp(1, VIP4, None)).0, Answer::ArpReply, "ARP for a load-balancer IP");
    assert_eq!(run(ns(ASKER6, VIP6, true, 255, None)).0, Answer::NeighbourAdvert);
    let mut got: Vec<IpAddr> = addresses(&tables).collect();
    got.sort();
    got.dedup();
    assert_eq!(got, [IpAddr::V4(VIP4), IpAddr::V6(SNAT6), IpAddr::V6(VIP6)]);
    assert!(tables.is_vip(IpAddr::V4(CLUSTER4)) && tables.is_vip(IpAddr::V6(CLUSTER6)), "still served");
}

#[test]
fn the_worker_answers_when_given_a_mac_and_passes_otherwise() {
    let tables = tables();
    let mut worker = Worker::new(tables.clone(), WorkerConfig::single_core(1024));
    let run = |worker: &mut Worker, bytes: &[u8]| {
        let mut buf = bytes.to_vec();
        buf.resize(bytes.len() + 64, 0);
        let mut frames = [Frame::new(&mut buf, 0, bytes.len())];
        let mut v = [Verdict::Pass];
        worker.process_burst(&mut frames, Instant::from_secs(1), &mut v);
        (v[0], frames[0].data().to_vec())
    };
    let arp_frame = arp(1, VIP4, Some(5));
    let ns_frame = ns(ASKER6, VIP6, true, 255, None);
    assert_eq!(run(&mut worker, &arp_frame), (Verdict::Pass, arp_frame.clone()), "off by default");
    assert_eq!(run(&mut worker, &ns_frame), (Verdict::Pass, ns_frame.clone()), "off by default");

    worker.set_neighbour_mac(Some(MAC));
    assert_eq!(run(&mut worker, &arp_frame).0, Verdict::Tx);
    assert_eq!(run(&mut worker, &ns_frame), (Verdict::Tx, na(ASKER6, ASKER_MAC, VIP6, 0x60, None)));
    assert_eq!(run(&mut worker, &arp(1, OTHER4, None)).0, Verdict::Pass);
    assert_eq!(run(&mut worker, &ns(ASKER6, VIP6, true, 1, None)).0, Verdict::Drop(DropReason::Malformed));
    let s = worker.stats();
    assert_eq!((s.arp_replies, s.ndp_adverts, s.tx, s.passed), (1, 1, 2, 3));
    assert_eq!(s.dropped(DropReason::Malformed), 1);

    // The addresses follow the tables: without the IPv6 NAT service its SNAT address is not ours.
    assert_eq!(run(&mut worker, &ns(ASKER6, SNAT6, true, 255, None)).0, Verdict::Tx);
    let mut config = Config { node: tables.node().clone(), services: Vec::new() };
    config.services.push(ServiceConfig::new(
        "v4-only",
        ServiceKey { vip: IpAddr::V4(VIP4), port: 80, proto: Protocol::Tcp },
        ForwardMode::Dsr,
        vec![BackendConfig {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            port: 80,
            weight: 1,
            mac: Some([2, 0xbe, 0, 0, 0, 1]),
            state: BackendState::Active,
        }],
    ));
    drop(worker.swap_tables(TableBuilder::new().build(&config).unwrap()));
    assert_eq!(run(&mut worker, &ns(ASKER6, SNAT6, true, 255, None)).0, Verdict::Pass);
    assert_eq!(run(&mut worker, &ns(ASKER6, VIP6, true, 255, None)).0, Verdict::Pass);
    assert_eq!(run(&mut worker, &arp_frame).0, Verdict::Tx);
    // Another host's claim of the VIP: defended (broadcast), then, within 10 s, dropped; both counted.
    let claim = gratuitous([0x02, 0, 0, 0, 0, 0x0b], VIP4, None);
    assert_eq!(run(&mut worker, &claim), (Verdict::Tx, gratuitous(MAC, VIP4, None)));
    assert_eq!(run(&mut worker, &claim), (Verdict::Drop(DropReason::ArpConflict), claim.clone()));
    assert_eq!(worker.stats().arp_conflicts, 2);
    assert_eq!(worker.stats().dropped(DropReason::ArpConflict), 1);
    worker.set_neighbour_mac(None);
    assert_eq!(run(&mut worker, &arp_frame).0, Verdict::Pass);
}

#[test]
fn announcements_are_a_gratuitous_arp_and_an_unsolicited_advertisement() {
    let mut buf = [0u8; 128];
    let mut want = eth([0xff; 6], MAC, None, 0x0806);
    want.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    want.extend_from_slice(&MAC);
    want.extend_from_slice(&VIP4.octets());
    want.extend_from_slice(&[0; 6]);
    want.extend_from_slice(&VIP4.octets());
    want.resize(60, 0); // padded to Ethernet's minimum
    buf.fill(0xaa);
    let n = announcement(MAC, IpAddr::V4(VIP4), &mut buf).unwrap();
    assert_eq!(&buf[..n], &want[..]);

    let n = announcement(MAC, IpAddr::V6(VIP6), &mut buf).unwrap();
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    // Override only: nobody solicited it.
    assert_eq!(&buf[..n], &na(all_nodes, [0x33, 0x33, 0, 0, 0, 1], VIP6, 0x20, None)[..]);
    assert_eq!(icmpv6_sum(VIP6, all_nodes, &buf[14 + 40..n]), 0);

    assert_eq!(announcement(MAC, IpAddr::V6(VIP6), &mut [0u8; 85]), None, "one byte short");
    assert_eq!(announcement(MAC, IpAddr::V4(VIP4), &mut [0u8; 59]), None);
}

proptest::proptest! {
    /// Whatever bytes a request turns into (any byte changed, any length), the responder never
    /// panics, and a frame it does not answer is left exactly as it was.
    #[test]
    fn mutated_requests_never_panic_and_unanswered_frames_stay_unchanged(
        which in 0usize..4,
        flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..4),
        cut in proptest::prelude::any::<proptest::sample::Index>(),
        tailroom in 0usize..16,
    ) {
        let mut frame = match which {
            0 => arp(1, VIP4, None),
            1 => arp(1, VIP4, Some(9)),
            2 => ns(ASKER6, VIP6, true, 255, Some(9)),
            _ => ns(Ipv6Addr::UNSPECIFIED, VIP6, false, 255, None),
        };
        for (at, v) in flips {
            let i = at.index(frame.len());
            frame[i] = v;
        }
        frame.truncate(cut.index(frame.len() + 1));
        let tables = tables();
        let mut r = NeighbourResponder::new(MAC, &tables);
        let mut buf = frame.clone();
        buf.resize(frame.len() + tailroom, 0);
        let mut f = Frame::new(&mut buf, 0, frame.len());
        let a = r.answer(&tables, &mut f, 1);
        if matches!(a, Answer::NotOurs | Answer::Invalid(_) | Answer::ArpConflict) {
            proptest::prop_assert_eq!(f.data(), &frame[..]);
        }
    }
}
