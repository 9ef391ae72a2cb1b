//! Golden rewrite fixtures, as Katran keeps them: for each forwarding mode x family x protocol an input
//! frame, the rewrite, and the expected output frame, both written independently with etherparse
//! (see `test_frames`), compared byte for byte. Then the translated ICMP errors and the refusals.
#![allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]

mod test_frames;

use std::net::IpAddr;

use etherparse::PacketBuilder;
use lb_core::forward::{self, Macs, RewriteError, TunnelTarget, nat::NatTarget};
use lb_core::packet::{self, FlowKey, L4};
use test_frames::{MAC_BACKEND, MAC_NODE, MAC_ROUTER, Outer, Spec, addr, buffer, encapsulated};

const HEADROOM: usize = 64;
const TO_BACKEND: Macs = Macs { src: MAC_NODE, dst: MAC_BACKEND };
const TO_ROUTER: Macs = Macs { src: MAC_NODE, dst: MAC_ROUTER };
const CPORT: u16 = 40000;
const VPORT: u16 = 80;
const SNAT_PORT: u16 = 50000;
const BPORT: u16 = 8080;
const HASH: u32 = 0x1234_5678;
const GUE_PORT: u16 = 6080;

/// Which rewrite a fixture applies.
#[derive(Clone, Copy, Debug)]
enum Mode {
    NatToBackend,
    NatToClient,
    Dsr,
    IpIp,
    Gue,
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

struct Family {
    client: IpAddr,
    vip: IpAddr,
    snat: IpAddr,
    tunnel: IpAddr,
    backend: IpAddr,
}

fn v4() -> Family {
    Family {
        client: addr::client4(),
        vip: addr::vip4(),
        snat: addr::snat4(),
        tunnel: addr::tunnel4(),
        backend: addr::backend4(),
    }
}

fn v6() -> Family {
    Family {
        client: addr::client6(),
        vip: addr::vip6(),
        snat: addr::snat6(),
        tunnel: addr::tunnel6(),
        backend: addr::backend6(),
    }
}

fn spec(proto: Proto, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Spec {
    match proto {
        Proto::Tcp => Spec::tcp(src, dst, sport, dport),
        Proto::Udp => Spec::udp(src, dst, sport, dport),
    }
}

fn proto_number(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    }
}

fn flow(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    FlowKey::from_ips(src, dst, proto, sport, dport).unwrap()
}

/// Runs `rewrite` on `input` (with headroom) and returns the resulting frame bytes.
fn run(
    input: &[u8],
    rewrite: impl FnOnce(&mut lb_core::Frame<'_>, &packet::Parsed) -> Result<(), RewriteError>,
) -> Result<Vec<u8>, RewriteError> {
    let mut buf = buffer(input, HEADROOM);
    let mut frame = lb_core::Frame::new(&mut buf, HEADROOM, input.len());
    let parsed = packet::parse(frame.data()).unwrap();
    rewrite(&mut frame, &parsed)?;
    Ok(frame.data().to_vec())
}

/// Compares frames, printing both as hex with the first differing offset.
fn assert_frame(name: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{name}: frames differ at byte {at} (got {} bytes, want {})\n got: {}\nwant: {}",
            got.len(),
            want.len(),
            hex(got),
            hex(want)
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// One fixture: the input frame, the rewrite and the expected frame, all spelled out.
fn golden(mode: Mode, f: &Family, proto: Proto) {
    let name = format!("{mode:?} {} {proto:?}", if f.client.is_ipv4() { "IPv4" } else { "IPv6" });
    let p = proto_number(proto);
    let from_client = spec(proto, f.client, f.vip, CPORT, VPORT);
    let (input, expected, result) = match mode {
        Mode::NatToBackend => {
            let target = NatTarget { flow: flow(f.snat, SNAT_PORT, f.backend, BPORT, p), macs: TO_BACKEND };
            let mut want = from_client.translated(f.snat, SNAT_PORT, f.backend, BPORT);
            want.ttl -= 1;
            (want.src_mac, want.dst_mac) = (MAC_NODE, MAC_BACKEND);
            let input = from_client.frame();
            let got = run(&input, |fr, pa| forward::nat::rewrite(fr, pa, &target));
            (input, want.frame(), got)
        }
        Mode::NatToClient => {
            let mut reply = spec(proto, f.backend, f.snat, BPORT, SNAT_PORT);
            (reply.src_mac, reply.dst_mac) = (MAC_BACKEND, MAC_NODE);
            let target = NatTarget { flow: flow(f.vip, VPORT, f.client, CPORT, p), macs: TO_ROUTER };
            let mut want = reply.translated(f.vip, VPORT, f.client, CPORT);
            want.ttl -= 1;
            (want.src_mac, want.dst_mac) = (MAC_NODE, MAC_ROUTER);
            let input = reply.frame();
            let got = run(&input, |fr, pa| forward::nat::rewrite(fr, pa, &target));
            (input, want.frame(), got)
        }
        Mode::Dsr => {
            let mut want = from_client.clone();
            (want.src_mac, want.dst_mac) = (MAC_NODE, MAC_BACKEND);
            let input = from_client.frame();
            let got = run(&input, |fr, _| forward::dsr::rewrite(fr, &TO_BACKEND));
            (input, want.frame(), got)
        }
        Mode::IpIp | Mode::Gue => {
            let t = TunnelTarget { src: f.tunnel, dst: f.backend, macs: TO_BACKEND, flow_hash: HASH, ip_id: 0 };
            let gue = matches!(mode, Mode::Gue).then_some((forward::gue::source_port(HASH), GUE_PORT));
            let outer = Outer { src: f.tunnel, dst: f.backend, gue, flow_label: HASH & 0xfffff, ip_id: 0 };
            let want = encapsulated(&from_client, &outer, MAC_NODE, MAC_BACKEND);
            let input = from_client.frame();
            let got = match mode {
                Mode::IpIp => run(&input, |fr, pa| forward::ipip::encap(fr, pa, &t)),
                _ => run(&input, |fr, pa| forward::gue::encap(fr, pa, &t, GUE_PORT)),
            };
            (input, want, got)
        }
    };
    assert_ne!(input, expected, "{name}: the fixture must change something");
    assert_frame(&name, &result.unwrap(), &expected);
}

#[test]
fn every_mode_family_and_protocol() {
    for mode in [Mode::NatToBackend, Mode::NatToClient, Mode::Dsr, Mode::IpIp, Mode::Gue] {
        for f in [v4(), v6()] {
            for proto in [Proto::Tcp, Proto::Udp] {
                golden(mode, &f, proto);
            }
        }
    }
}

#[test]
fn gue_source_port_is_ephemeral_and_follows_the_hash() {
    assert_eq!(forward::gue::source_port(0), 0xc000);
    assert_eq!(forward::gue::source_port(0x1234_5678), 0xc000 | 0x1678);
    assert_eq!(forward::gue::source_port(u32::MAX), 0xffff);
}

/// QinQ tags and IPv4 options stay where they are; only the NAT-ed fields change.
#[test]
fn nat_keeps_qinq_tags_and_ipv4_options() {
    let f = v4();
    let mut input = Spec::tcp(f.client, f.vip, CPORT, VPORT);
    input.vlans = vec![100, 200];
    input.options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
    input.tos = 0xb8;
    let target = NatTarget { flow: flow(f.snat, SNAT_PORT, f.backend, BPORT, 6), macs: TO_BACKEND };
    let mut want = input.translated(f.snat, SNAT_PORT, f.backend, BPORT);
    want.ttl -= 1;
    (want.src_mac, want.dst_mac) = (MAC_NODE, MAC_BACKEND);
    let got = run(&input.frame(), |fr, pa| forward::nat::rewrite(fr, pa, &target)).unwrap();
    assert_frame("NAT QinQ + options", &got, &want.frame());
}

/// An 802.1Q-tagged IPv6 frame tunnelled over IPv6: the tag moves to the new front, the outer
/// EtherType is IPv6.
#[test]
fn tunnels_keep_vlan_tags() {
    let f = v6();
    let mut input = Spec::udp(f.client, f.vip, CPORT, VPORT);
    input.vlans = vec![42];
    input.tos = 0x2e;
    let t = TunnelTarget { src: f.tunnel, dst: f.backend, macs: TO_BACKEND, flow_hash: 7, ip_id: 0 };
    let outer = Outer { src: f.tunnel, dst: f.backend, gue: None, flow_label: 7, ip_id: 0 };
    let got = run(&input.frame(), |fr, pa| forward::ipip::encap(fr, pa, &t)).unwrap();
    assert_frame("IPIP v6 VLAN", &got, &encapsulated(&input, &outer, MAC_NODE, MAC_BACKEND));
}

/// IPv4 in an IPv6 GUE tunnel: the outer family is the backend's, the GUE header names IPv4.
#[test]
fn gue_carries_ipv4_over_ipv6() {
    let f4 = v4();
    let f6 = v6();
    let input = Spec::tcp(f4.client, f4.vip, CPORT, VPORT);
    let t = TunnelTarget { src: f6.tunnel, dst: f6.backend, macs: TO_BACKEND, flow_hash: HASH, ip_id: 0 };
    let outer = Outer {
        src: f6.tunnel,
        dst: f6.backend,
        gue: Some((forward::gue::source_port(HASH), GUE_PORT)),
        flow_label: HASH,
        ip_id: 0,
    };
    let got = run(&input.frame(), |fr, pa| forward::gue::encap(fr, pa, &t, GUE_PORT)).unwrap();
    assert_frame("GUE 4in6", &got, &encapsulated(&input, &outer, MAC_NODE, MAC_BACKEND));
}

/// Ethernet padding of a short frame is not carried into the tunnel.
#[test]
fn tunnel_drops_ethernet_padding() {
    let f = v4();
    let mut input = Spec::udp(f.client, f.vip, CPORT, VPORT);
    input.payload = vec![1];
    let mut padded = input.frame();
    assert!(padded.len() < 60);
    padded.resize(60, 0);
    let t = TunnelTarget { src: f.tunnel, dst: f.backend, macs: TO_BACKEND, flow_hash: 0, ip_id: 0 };
    let outer = Outer { src: f.tunnel, dst: f.backend, gue: None, flow_label: 0, ip_id: 0 };
    let got = run(&padded, |fr, pa| forward::ipip::encap(fr, pa, &t)).unwrap();
    assert_frame("IPIP padded", &got, &encapsulated(&input, &outer, MAC_NODE, MAC_BACKEND));
}

/// An IPv4 UDP datagram without checksum keeps checksum 0 through NAT.
#[test]
fn nat_keeps_ipv4_udp_zero_checksum() {
    let f = v4();
    let mut input = Spec::udp(f.client, f.vip, CPORT, VPORT);
    input.transport = test_frames::Transport::Udp { sport: CPORT, dport: VPORT, zero_checksum: true };
    let target = NatTarget { flow: flow(f.snat, SNAT_PORT, f.backend, BPORT, 17), macs: TO_BACKEND };
    let mut want = input.translated(f.snat, SNAT_PORT, f.backend, BPORT);
    want.ttl -= 1;
    (want.src_mac, want.dst_mac) = (MAC_NODE, MAC_BACKEND);
    let got = run(&input.frame(), |fr, pa| forward::nat::rewrite(fr, pa, &target)).unwrap();
    assert_frame("NAT UDP csum 0", &got, &want.frame());
    let l4 = 14 + 20;
    assert_eq!(&got[l4 + 6..l4 + 8], &[0, 0]);
}

/// An IPv6 UDP datagram with checksum 0 (allowed for tunnels, RFC 6935) keeps 0 through NAT, as
/// Linux's NAT keeps it: patching 0 would give a checksum certain to be wrong.
#[test]
fn nat_keeps_ipv6_udp_zero_checksum() {
    let f = v6();
    let input = Spec::udp(f.client, f.vip, CPORT, VPORT);
    let target = NatTarget { flow: flow(f.snat, SNAT_PORT, f.backend, BPORT, 17), macs: TO_BACKEND };
    let mut want = input.translated(f.snat, SNAT_PORT, f.backend, BPORT);
    want.ttl -= 1;
    (want.src_mac, want.dst_mac) = (MAC_NODE, MAC_BACKEND);
    let csum = 14 + 40 + 6;
    let zeroed = |mut frame: Vec<u8>| {
        frame[csum..csum + 2].copy_from_slice(&[0, 0]);
        frame
    };
    let got = run(&zeroed(input.frame()), |fr, pa| forward::nat::rewrite(fr, pa, &target)).unwrap();
    assert_frame("NAT UDP6 csum 0", &got, &zeroed(want.frame()));
}

/// An ICMPv4 "fragmentation needed" from a router on the backend side, about a packet the node sent
/// (SNAT -> backend), translated for the client: outer VIP -> client, quote client -> VIP.
fn frag_needed_case(quote_len: Option<usize>) {
    let f = v4();
    let router: IpAddr = "10.1.0.254".parse().unwrap();
    // What the node sent to the backend, and what the client had sent.
    let mut sent = Spec::tcp(f.snat, f.backend, SNAT_PORT, BPORT);
    sent.ttl = 63;
    let mut original = Spec::tcp(f.client, f.vip, CPORT, VPORT);
    original.ttl = 63;
    let cut = |p: Vec<u8>| match quote_len {
        Some(n) => p[..n].to_vec(),
        None => p,
    };
    let icmp = |src: IpAddr, dst: IpAddr, ttl: u8, macs: ([u8; 6], [u8; 6]), quote: &[u8]| {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else { unreachable!() };
        let mut v = Vec::new();
        PacketBuilder::ethernet2(macs.0, macs.1)
            .ipv4(s.octets(), d.octets(), ttl)
            .icmpv4_raw(3, 4, [0, 0, 0x05, 0x78])
            .write(&mut v, quote)
            .unwrap();
        v
    };
    let input = icmp(router, f.snat, 60, (MAC_BACKEND, MAC_NODE), &cut(sent.ip_packet()));
    let want = icmp(f.vip, f.client, 59, (MAC_NODE, MAC_ROUTER), &cut(original.ip_packet()));
    let parsed = packet::parse(&input).unwrap();
    let L4::IcmpError(e) = parsed.l4 else { panic!("{:?}", parsed.l4) };
    // The worker finds the connection by the reversed quote: the backend's reply direction.
    assert_eq!(e.inner.reverse(), flow(f.backend, BPORT, f.snat, SNAT_PORT, 6));
    let target = NatTarget { flow: flow(f.vip, VPORT, f.client, CPORT, 6), macs: TO_ROUTER };
    let got = run(&input, |fr, pa| forward::nat::rewrite(fr, pa, &target)).unwrap();
    assert_frame(&format!("ICMPv4 frag-needed, quote {quote_len:?}"), &got, &want);
}

#[test]
fn nat_translates_icmpv4_frag_needed_with_full_quote() {
    frag_needed_case(None);
}

/// A quote of only the IP header and 8 transport bytes (RFC 792's minimum): the ports change, the
/// quoted TCP checksum is not in it, and the outer checksum still matches.
#[test]
fn nat_translates_icmpv4_frag_needed_with_minimal_quote() {
    frag_needed_case(Some(28));
}

/// An ICMPv6 "packet too big" from a router on the client side, about a reply the node sent
/// (VIP -> client), translated for the backend: outer SNAT -> backend, quote backend -> SNAT.
#[test]
fn nat_translates_icmpv6_packet_too_big() {
    let f = v6();
    let router: IpAddr = "2001:db8:c::1".parse().unwrap();
    let mut sent = Spec::udp(f.vip, f.client, VPORT, CPORT);
    sent.ttl = 63;
    let mut original = Spec::udp(f.backend, f.snat, BPORT, SNAT_PORT);
    original.ttl = 63;
    let icmp = |src: IpAddr, dst: IpAddr, ttl: u8, macs: ([u8; 6], [u8; 6]), quote: &[u8]| {
        let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else { unreachable!() };
        let mut v = Vec::new();
        PacketBuilder::ethernet2(macs.0, macs.1)
            .ipv6(s.octets(), d.octets(), ttl)
            .icmpv6_raw(2, 0, 1280u32.to_be_bytes())
            .write(&mut v, quote)
            .unwrap();
        v
    };
    let input = icmp(router, f.vip, 50, (MAC_ROUTER, MAC_NODE), &sent.ip_packet());
    let want = icmp(f.snat, f.backend, 49, (MAC_NODE, MAC_BACKEND), &original.ip_packet());
    let target = NatTarget { flow: flow(f.snat, SNAT_PORT, f.backend, BPORT, 17), macs: TO_BACKEND };
    let got = run(&input, |fr, pa| forward::nat::rewrite(fr, pa, &target)).unwrap();
    assert_frame("ICMPv6 packet too big", &got, &want);
}

#[test]
fn refusals() {
    let f = v4();
    let target = NatTarget { flow: flow(f.snat, SNAT_PORT, f.backend, BPORT, 6), macs: TO_BACKEND };
    // TTL 1: a router must not forward it.
    let mut s = Spec::tcp(f.client, f.vip, CPORT, VPORT);
    s.ttl = 1;
    let err = run(&s.frame(), |fr, pa| forward::nat::rewrite(fr, pa, &target)).unwrap_err();
    assert_eq!(err, RewriteError::TtlExpired { ttl: 1 });
    // An IPv6 target for an IPv4 packet.
    let f6 = v6();
    let t6 = NatTarget { flow: flow(f6.snat, SNAT_PORT, f6.backend, BPORT, 6), macs: TO_BACKEND };
    let err = run(&Spec::tcp(f.client, f.vip, CPORT, VPORT).frame(), |fr, pa| forward::nat::rewrite(fr, pa, &t6))
        .unwrap_err();
    assert!(matches!(err, RewriteError::FamilyMismatch { .. }), "{err:?}");
    // ICMP echo has no ports to translate.
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(MAC_ROUTER, MAC_NODE)
        .ipv4([198, 51, 100, 7], [192, 0, 2, 10], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"x")
        .unwrap();
    let err = run(&echo, |fr, pa| forward::nat::rewrite(fr, pa, &target)).unwrap_err();
    assert_eq!(err, RewriteError::Untranslatable { proto: 1 });
}

/// With too little headroom the tunnel refuses and the frame is left exactly as it was.
#[test]
fn tunnel_without_headroom_leaves_the_frame_alone() {
    let f = v6();
    let input = Spec::tcp(f.client, f.vip, CPORT, VPORT).frame();
    let t = TunnelTarget { src: f.tunnel, dst: f.backend, macs: TO_BACKEND, flow_hash: 0, ip_id: 0 };
    let mut buf = buffer(&input, 51);
    let before = buf.clone();
    let mut frame = lb_core::Frame::new(&mut buf, 51, input.len());
    let parsed = packet::parse(frame.data()).unwrap();
    let err = forward::gue::encap(&mut frame, &parsed, &t, GUE_PORT).unwrap_err();
    assert_eq!(err, RewriteError::NoHeadroom { needed: 52, have: 51 });
    assert_eq!((frame.start(), frame.len()), (51, input.len()));
    assert_eq!(buf, before);
    // Mixed tunnel endpoint families are refused too.
    let bad = TunnelTarget { src: addr::tunnel4(), dst: f.backend, macs: TO_BACKEND, flow_hash: 0, ip_id: 0 };
    let err = run(&input, |fr, pa| forward::ipip::encap(fr, pa, &bad)).unwrap_err();
    assert_eq!(err, RewriteError::MixedTunnelFamilies);
}

/// An inner IPv4 packet without DF: the outer header leaves DF clear too and carries the tunnel's
/// own identification (`TunnelTarget::ip_id`), not the inner one: many clients' packets share the
/// tunnel's addresses, and a fragmenting router's reassembly needs one unique per those.
#[test]
fn ipip_leaves_df_clear_with_the_tunnels_identification() {
    let f = v4();
    let mut input = Spec::tcp(f.client, f.vip, CPORT, VPORT);
    input.fragmentable_id = Some(0xbeef);
    let t = TunnelTarget { src: f.tunnel, dst: f.backend, macs: TO_BACKEND, flow_hash: 0, ip_id: 0x1234 };
    let outer = Outer { src: f.tunnel, dst: f.backend, gue: None, flow_label: 0, ip_id: 0x1234 };
    let got = run(&input.frame(), |fr, pa| forward::ipip::encap(fr, pa, &t)).unwrap();
    let want = encapsulated(&input, &outer, MAC_NODE, MAC_BACKEND);
    assert_eq!(&want[14 + 4..14 + 8], &[0x12, 0x34, 0, 0], "the expectation itself: the tunnel's id, DF clear");
    assert_frame("IPIP without DF", &got, &want);
}
