//! Shared by the worker tests: a node and services to test against, frame builders (etherparse's
//! `PacketBuilder`, an implementation independent of lb-core's rewrite) and a checksum verifier
//! (smoltcp's, also independent).
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "a test helper module: each test binary uses a different part"
)]
#![allow(clippy::unwrap_used, clippy::missing_panics_doc, reason = "tests fail loudly")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use etherparse::PacketBuilder;
use lb_core::config::{
    BackendConfig, BackendState, Config, ForwardMode, NodeConfig, Protocol, ServiceConfig, ServiceKey,
};
use lb_core::conntrack::ConntrackSeed;
use lb_core::service::{TableBuilder, Tables};
use lb_core::{Frame, Instant, Verdict, Worker, WorkerConfig};

pub const LOCAL_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const HEADROOM: usize = Frame::HEADROOM_NEEDED;

pub fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn node() -> NodeConfig {
    NodeConfig {
        local_mac: LOCAL_MAC,
        gateway_mac: Some(GATEWAY_MAC),
        snat_v4: Some(Ipv4Addr::new(10, 0, 0, 100)),
        snat_v6: Some("fd00::100".parse::<Ipv6Addr>().unwrap()),
        snat_ports: (40000, 40999),
        tunnel_src_v4: Some(Ipv4Addr::new(10, 0, 0, 101)),
        tunnel_src_v6: Some("fd00::101".parse::<Ipv6Addr>().unwrap()),
        hash_seed: 7,
        ..NodeConfig::default()
    }
}

/// The MAC a test gives backend `addr`: derived from its last byte, so expected frames can name it.
pub fn backend_mac(addr: IpAddr) -> [u8; 6] {
    let last = match addr {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [0x02, 0xbb, 0, 0, 0, last]
}

pub fn backend(addr: &str, port: u16) -> BackendConfig {
    let addr: IpAddr = addr.parse().unwrap();
    BackendConfig { addr, port, weight: 1, mac: Some(backend_mac(addr)), state: BackendState::Active }
}

pub fn service(
    name: &str,
    vip: &str,
    port: u16,
    proto: Protocol,
    mode: ForwardMode,
    backends: Vec<BackendConfig>,
) -> ServiceConfig {
    ServiceConfig::new(name, ServiceKey { vip: vip.parse().unwrap(), port, proto }, mode, backends)
}

/// One service per mode x family x protocol, each with two backends:
/// VIP 192.0.2.1 / 2001:db8::1, ports 80 (NAT), 81 (DSR), 82 (IP-in-IP), 83 (GUE to 6080).
pub fn all_modes_config() -> Config {
    let mut services = vec![];
    let modes = [
        (80, ForwardMode::Nat),
        (81, ForwardMode::Dsr),
        (82, ForwardMode::IpIp),
        (83, ForwardMode::Gue { port: 6080 }),
    ];
    for (port, mode) in modes {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let bport = if mode == ForwardMode::Nat { 8080 } else { port };
            let p = if proto == Protocol::Tcp { "tcp" } else { "udp" };
            services.push(service(
                &format!("v4-{port}-{p}"),
                "192.0.2.1",
                port,
                proto,
                mode,
                vec![backend("10.1.0.1", bport), backend("10.1.0.2", bport)],
            ));
            services.push(service(
                &format!("v6-{port}-{p}"),
                "2001:db8::1",
                port,
                proto,
                mode,
                vec![backend("fd00:1::1", bport), backend("fd00:1::2", bport)],
            ));
        }
    }
    Config { node: node(), services }
}

/// The connection table seed of the tests' tables: not 0, so every worker test runs under a seed.
pub const SEED: ConntrackSeed = ConntrackSeed::new(0x7e57_5eed_c0ff_ee01);

/// A table builder of the tests' seed ([`SEED`]): the builder every worker test builds with.
pub fn table_builder() -> TableBuilder {
    TableBuilder::new().with_conntrack_seed(SEED)
}

pub fn build(cfg: &Config) -> Arc<Tables> {
    table_builder().build(cfg).unwrap()
}

pub fn worker(cfg: &Config) -> Worker {
    Worker::new(build(cfg), WorkerConfig::single_core(4096))
}

/// TCP flag sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tcp {
    Syn,
    Ack,
    Fin,
    Rst,
}

fn ip_step(src: IpAddr, dst: IpAddr, ttl: u8) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => panic!("mixed families"),
    }
}

/// An Ethernet + IP + TCP frame from the client side.
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: Tcp, payload: &[u8]) -> Vec<u8> {
    let b = ip_step(src, dst, 64).tcp(sport, dport, 1000, 65535);
    let b = match flags {
        Tcp::Syn => b.syn(),
        Tcp::Ack => b.ack(1),
        Tcp::Fin => b.fin().ack(1),
        Tcp::Rst => b.rst(),
    };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// An Ethernet + IP + UDP frame.
pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ip_step(src, dst, 64).udp(sport, dport).write(&mut out, payload).unwrap();
    out
}

/// Runs one frame (with full headroom) through the worker; returns the verdict and the frame after.
pub fn run(w: &mut Worker, bytes: &[u8], now: Instant) -> (Verdict, Vec<u8>) {
    run_burst(w, &[bytes.to_vec()], now).pop().unwrap()
}

/// Runs `frames` through the worker as one burst (full headroom each); returns each verdict and
/// frame after.
pub fn run_burst(w: &mut Worker, frames: &[Vec<u8>], now: Instant) -> Vec<(Verdict, Vec<u8>)> {
    let mut bufs: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut buf = vec![0u8; HEADROOM + f.len() + 64];
            buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
            buf
        })
        .collect();
    let mut burst: Vec<Frame<'_>> =
        bufs.iter_mut().zip(frames).map(|(buf, f)| Frame::new(buf, HEADROOM, f.len())).collect();
    let mut verdicts = vec![Verdict::Pass; frames.len()];
    w.process_burst(&mut burst, now, &mut verdicts);
    verdicts.into_iter().zip(burst.iter().map(|f| f.data().to_vec())).collect()
}

/// The parsed view of a frame, with smoltcp verifying every checksum on the way: outer IPv4 header,
/// and the transport checksum of the innermost TCP/UDP (and of an outer UDP carrying GUE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Outer addresses and protocol when tunnelled.
    pub outer: Option<(IpAddr, IpAddr, u8)>,
    /// Outer UDP ports of a GUE frame.
    pub gue_ports: Option<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
}

pub fn smoltcp_ip(bytes: &[u8]) -> (IpAddr, IpAddr, u8, u8, usize, Vec<u8>) {
    use smoltcp::wire::{Ipv4Packet, Ipv6Packet};
    match bytes[0] >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(bytes).unwrap();
            assert!(p.verify_checksum(), "IPv4 header checksum");
            let hl = usize::from(p.header_len());
            let total = usize::from(p.total_len());
            (
                IpAddr::V4(p.src_addr()),
                IpAddr::V4(p.dst_addr()),
                u8::from(p.next_header()),
                p.hop_limit(),
                total,
                bytes[hl..total].to_vec(),
            )
        }
        6 => {
            let p = Ipv6Packet::new_checked(bytes).unwrap();
            let total = 40 + usize::from(p.payload_len());
            (
                IpAddr::V6(p.src_addr()),
                IpAddr::V6(p.dst_addr()),
                u8::from(p.next_header()),
                p.hop_limit(),
                total,
                bytes[40..total].to_vec(),
            )
        }
        v => panic!("IP version {v}"),
    }
}

fn smoltcp_l4(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> (u16, u16) {
    use smoltcp::wire::{IpAddress, TcpPacket, UdpPacket};
    let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
    match proto {
        6 => {
            let t = TcpPacket::new_checked(l4).unwrap();
            assert!(t.verify_checksum(&s, &d), "TCP checksum");
            (t.src_port(), t.dst_port())
        }
        17 => {
            let u = UdpPacket::new_checked(l4).unwrap();
            let zero_v4 = u.checksum() == 0 && src.is_ipv4();
            assert!(zero_v4 || u.verify_checksum(&s, &d), "UDP checksum");
            (u.src_port(), u.dst_port())
        }
        p => panic!("protocol {p}"),
    }
}

/// Parses and verifies a frame as transmitted (no VLAN tags in these tests).
pub fn seen(frame: &[u8]) -> Seen {
    let dst_mac: [u8; 6] = frame[..6].try_into().unwrap();
    let src_mac: [u8; 6] = frame[6..12].try_into().unwrap();
    let (src, dst, proto, ttl, total, payload) = smoltcp_ip(&frame[14..]);
    assert_eq!(14 + total, frame.len(), "frame length matches the IP length");
    match proto {
        4 | 41 => {
            let inner = seen_inner(&payload);
            Seen { dst_mac, src_mac, outer: Some((src, dst, proto)), gue_ports: None, ..inner }
        }
        17 if payload.len() >= 12 && is_gue(&payload) => {
            let (gs, gd) = smoltcp_l4(src, dst, 17, &payload);
            let inner = seen_inner(&payload[12..]);
            Seen { dst_mac, src_mac, outer: Some((src, dst, proto)), gue_ports: Some((gs, gd)), ..inner }
        }
        _ => {
            let (sport, dport) = smoltcp_l4(src, dst, proto, &payload);
            Seen { dst_mac, src_mac, outer: None, gue_ports: None, src, dst, sport, dport, ttl }
        }
    }
}

fn is_gue(udp: &[u8]) -> bool {
    // Our GUE: destination port 6080 in these tests.
    u16::from_be_bytes([udp[2], udp[3]]) == 6080
}

fn seen_inner(ip: &[u8]) -> Seen {
    let (src, dst, proto, ttl, _, payload) = smoltcp_ip(ip);
    let (sport, dport) = smoltcp_l4(src, dst, proto, &payload);
    Seen { dst_mac: [0; 6], src_mac: [0; 6], outer: None, gue_ports: None, src, dst, sport, dport, ttl }
}

pub fn secs(s: u64) -> Instant {
    Instant::from_secs(s)
}

pub fn dur(s: u64) -> Duration {
    Duration::from_secs(s)
}
