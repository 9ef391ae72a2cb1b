//! The XDP steering program and lb-core's worker must agree. On AF_XDP a frame the program
//! redirects to the socket can no longer reach the kernel: if the worker then passes it, the frame
//! is lost. And a frame the program leaves to the kernel that the worker would have served is a
//! service frame never served.
//!
//! Both sides are run on the same frames (the program with BPF_PROG_TEST_RUN, with its maps holding
//! what the `lb` binary derives from the tables: `examples/src/control.rs`, `steering_for`), and
//! their answers compared. Needs root (bpf(2)); skips with the reason otherwise.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use lb_core::config::{BackendConfig, Config, ForwardMode, NodeConfig, Protocol, ServiceConfig, ServiceKey};
use lb_core::service::{TableBuilder, Tables};
use lb_core::{Frame, Instant, Verdict, Worker, WorkerConfig};
use lb_io::bpf::xdp::{MissingSocket, SteeringConfig, SteeringSet, VipSteering, XdpAction};

/// A full-NAT IPv4 VIP (TCP 80, UDP 53) and a DSR one (TCP 80, Maglev: errors about its flows are
/// forwarded untracked).
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const DSR4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 101);
/// A full-NAT IPv6 VIP (TCP 443) that is a DSR one too (UDP 53).
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100);
/// The node's addresses: SNAT addresses (ports 40000-40999) that serve a NodePort (30080, TCP on
/// IPv4, UDP on IPv6).
const NODE4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 9);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 9);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const SNAT_PORTS: (u16, u16) = (40000, 40999);
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// The tables of the services above, the node's NodePorts among them or not (then the node's
/// addresses are SNAT addresses alone).
fn tables(node_ports: bool) -> Arc<Tables> {
    let backend = |a: IpAddr, port| BackendConfig { mac: Some([2, 0, 0, 0, 0, 0xbe]), ..BackendConfig::new(a, port) };
    let b4 = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1));
    let b6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1));
    let service = |name, vip: IpAddr, port, proto, mode, b| {
        ServiceConfig::new(name, ServiceKey { vip, port, proto }, mode, vec![backend(b, port)])
    };
    let config = Config {
        node: NodeConfig {
            local_mac: MAC,
            snat_v4: Some(NODE4),
            snat_v6: Some(NODE6),
            snat_ports: SNAT_PORTS,
            gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]),
            ..NodeConfig::default()
        },
        services: vec![
            service("nat4", IpAddr::V4(VIP4), 80, Protocol::Tcp, ForwardMode::Nat, b4),
            service("dns4", IpAddr::V4(VIP4), 53, Protocol::Udp, ForwardMode::Nat, b4),
            service("dsr4", IpAddr::V4(DSR4), 80, Protocol::Tcp, ForwardMode::Dsr, b4),
            service("nat6", IpAddr::V6(VIP6), 443, Protocol::Tcp, ForwardMode::Nat, b6),
            service("dns6", IpAddr::V6(VIP6), 53, Protocol::Udp, ForwardMode::Dsr, b6),
        ],
    };
    let mut config = config;
    if node_ports {
        config.services.extend([
            service("nodeport4", IpAddr::V4(NODE4), 30080, Protocol::Tcp, ForwardMode::Nat, b4),
            service("nodeport6", IpAddr::V6(NODE6), 30080, Protocol::Udp, ForwardMode::Nat, b6),
        ]);
    }
    TableBuilder::new().build(&config).unwrap()
}

/// What `lb run` steers for `tables` (`steering_for`), the node's addresses held by the host or
/// not, with the neighbour responder answering for every address (`NeighbourResponder::All`) or off.
fn steering_for(tables: &Tables, host_holds_node: bool, responder: bool) -> SteeringSet {
    let mut set = SteeringSet::default();
    let (mut nat_v4, mut nat_v6) = (false, false);
    for s in tables.services() {
        set.services.insert((s.key.vip, s.key.port, s.key.proto.number()));
        let nat = if s.key.vip.is_ipv6() { &mut nat_v6 } else { &mut nat_v4 };
        *nat |= s.mode == ForwardMode::Nat;
    }
    let node = tables.node();
    let snat = [node.snat_v4.map(IpAddr::V4).filter(|_| nat_v4), node.snat_v6.map(IpAddr::V6).filter(|_| nat_v6)];
    set.snat = snat.into_iter().flatten().map(|a| (a, node.snat_ports)).collect();
    let own: BTreeSet<IpAddr> =
        if host_holds_node { [IpAddr::V4(NODE4), IpAddr::V6(NODE6)].into() } else { BTreeSet::new() };
    set.host =
        set.services.iter().map(|&(a, _, _)| a).chain(set.snat.keys().copied()).filter(|a| own.contains(a)).collect();
    if responder {
        set.neighbour = lb_core::neighbour::addresses(tables).collect();
    }
    set
}

/// The program loaded with frames to a queue without a socket dropped (so "steered" reads as
/// `Drop`), or `None` (printed) where bpf(2) is refused.
fn load() -> Option<VipSteering> {
    let cfg = SteeringConfig { missing_socket: MissingSocket::Drop, ..SteeringConfig::default() };
    match VipSteering::load(cfg) {
        Ok(s) => Some(s),
        Err(e) if e.is_refused() => {
            println!("SKIPPED: bpf(2) refused ({e}); run as root to test the XDP program");
            None
        }
        Err(e) => panic!("loading the steering program failed: {e}"),
    }
}

/// A single-core worker, with the neighbour responder on or off.
fn worker(tables: &Arc<Tables>, responder: bool) -> Worker {
    let mut w = Worker::new(Arc::clone(tables), WorkerConfig::single_core(1024));
    w.set_neighbour_mac(responder.then_some(MAC));
    w
}

/// The worker's verdict for `frame`, with room around it (an advertisement grows).
fn verdict(w: &mut Worker, frame: &[u8]) -> Verdict {
    let mut buf = vec![0u8; 256 + frame.len() + 256];
    buf[256..256 + frame.len()].copy_from_slice(frame);
    let mut frames = [Frame::new(&mut buf, 256, frame.len())];
    let mut verdicts = [Verdict::Pass];
    w.process_burst(&mut frames, Instant::from_nanos(1_000_000_000), &mut verdicts);
    verdicts[0]
}

// ---- Frame builders (checksums right where the receiver checks them: IPv4 headers, ICMPv6) ----

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for pair in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header of `ethertype` behind the VLAN tags `tpids` (outermost first).
fn eth(dst: [u8; 6], tpids: &[u16], ethertype: u16) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    for (i, t) in tpids.iter().enumerate() {
        f.extend_from_slice(&t.to_be_bytes());
        f.extend_from_slice(&(10 + i as u16).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IPv4 header with `ihl` words (options zero), total length `len` and the flags / offset
/// field `frag`.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, frag: u16, ihl: u8, len: u16) -> Vec<u8> {
    let mut h = vec![0x40 | ihl, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.resize(usize::from(ihl.max(5)) * 4, 0);
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// `exts` (type; for a Fragment header its offset / M field) and then `l4` of protocol `proto`:
/// options headers 8 bytes long, every second one 16; an Authentication Header 24 (with the
/// field 0x100: a length byte of 0, which RFC 4302 forbids). Returns the first type and the bytes.
fn ipv6_chain(exts: &[(u8, u16)], proto: u8, l4: &[u8]) -> (u8, Vec<u8>) {
    let mut bytes = Vec::new();
    for (i, &(kind, field)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |e| e.0);
        match kind {
            44 => bytes.extend_from_slice(&[[next, 0].as_slice(), &field.to_be_bytes(), &[0, 0, 0, 1]].concat()),
            51 if field == 0x100 => bytes.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 1]),
            51 => bytes.extend_from_slice(&[[next, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1].as_slice(), &[0; 12]].concat()),
            _ => {
                let units = (i % 2) as u8;
                bytes.extend_from_slice(&[next, units, 1, 4, 0, 0, 0, 0]);
                bytes.resize(bytes.len() + 8 * usize::from(units), 0);
            }
        }
    }
    bytes.extend_from_slice(l4);
    (exts.first().map_or(proto, |e| e.0), bytes)
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop_limit: u8, payload_len: u16) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&payload_len.to_be_bytes());
    h.extend_from_slice(&[next, hop_limit]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

/// The ICMPv6 checksum of `msg` (checksum field zero) from `src` to `dst`.
fn icmp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let len = (msg.len() as u32).to_be_bytes();
    checksum(&[&src.octets(), &dst.octets(), &len, &[0, 0, 0, 58], msg])
}

/// A 20-byte TCP SYN.
fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = sport.to_be_bytes().to_vec();
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// A UDP datagram with 4 bytes of data.
fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&[0, 12, 0, 0, 1, 2, 3, 4]);
    u
}

/// Which address a frame goes to, comes from, or an error's quote comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addr {
    /// The full-NAT VIP of the family (IPv4 `VIP4`, IPv6 `VIP6`).
    Vip,
    /// `DSR4` (on IPv6: `VIP6`).
    Dsr,
    /// The node's address (SNAT address, NodePort).
    Node,
    /// An address of nothing.
    Other,
    /// The client.
    Client,
    /// Broadcast (IPv4) or all-nodes (IPv6).
    Broadcast,
    /// A multicast group (IPv4 224.0.0.1; IPv6 the solicited-node group of the VIP).
    Multicast,
    /// IPv6 only: `::ffff:<VIP4>` (IPv4: the VIP).
    Mapped,
}

const ADDRS: [Addr; 8] =
    [Addr::Vip, Addr::Dsr, Addr::Node, Addr::Other, Addr::Client, Addr::Broadcast, Addr::Multicast, Addr::Mapped];

fn v4(a: Addr) -> Ipv4Addr {
    match a {
        Addr::Vip | Addr::Mapped => VIP4,
        Addr::Dsr => DSR4,
        Addr::Node => NODE4,
        Addr::Other => OTHER4,
        Addr::Client => CLIENT4,
        Addr::Broadcast => Ipv4Addr::BROADCAST,
        Addr::Multicast => Ipv4Addr::new(224, 0, 0, 1),
    }
}

fn v6(a: Addr) -> Ipv6Addr {
    match a {
        Addr::Vip | Addr::Dsr => VIP6,
        Addr::Node => NODE6,
        Addr::Other => OTHER6,
        Addr::Client => CLIENT6,
        Addr::Broadcast => Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        Addr::Multicast => lb_core::neighbour::solicited_node(VIP6),
        Addr::Mapped => VIP4.to_ipv6_mapped(),
    }
}

/// The transport part of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Transport {
    Tcp(u16),
    Udp(u16),
    /// ICMP / ICMPv6 of a type that is no error (echo request, reply, redirect, router advert...).
    Icmp(u8),
    /// An ICMP error of this type quoting a packet.
    Error(u8, Quote),
    /// A Neighbour Solicitation (IPv6) for this address, with the hop limit 255 or not.
    Solicitation(Addr, bool),
    /// Duplicate address detection for this address: a solicitation from `::` (to the frame's
    /// destination, normally the target's solicited-node group), without a link-layer option.
    Dad(Addr),
    /// Another protocol (GRE, ESP, IP-in-IP).
    Proto(u8),
    /// Not IP: an ARP frame of this operation (1 request, 2 reply), from `src` for `dst`.
    Arp(u8),
}

/// The packet an ICMP error quotes: from `src`:`sport` to the client, of `proto`; IPv4 with `ihl`
/// and `frag`, IPv6 behind `exts`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Quote {
    /// `None`: the address the error is sent to (as a router sends it: to the quoted packet's
    /// source).
    src: Option<Addr>,
    proto: u8,
    sport: u16,
    ihl: u8,
    frag: u16,
    exts: Vec<(u8, u16)>,
}

/// One generated frame.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Case {
    tpids: Vec<u16>,
    ipv6: bool,
    dst: Addr,
    src: Addr,
    transport: Transport,
    /// IPv4: header words (4 and 15 are bad); IPv6: unused.
    ihl: u8,
    /// IPv4 flags / offset field.
    frag: u16,
    /// IPv6 extension headers before the transport header.
    exts: Vec<(u8, u16)>,
    /// Added to the IP length field (wrapping).
    len_delta: i16,
    /// Bytes added after the IP packet (Ethernet padding), or (negative) cut from the frame's end.
    tail: i16,
}

/// An ICMP error's message: type and code, 4 bytes of rest, then the quote.
fn error_message(ipv6: bool, kind: u8, q: &Quote, to: Addr) -> Vec<u8> {
    let (sport, dport) = (q.sport, 51000u16);
    let l4 = match q.proto {
        6 | 17 => [sport.to_be_bytes(), dport.to_be_bytes(), [0, 28], [0, 0]].concat(),
        _ => vec![8, 0, 0, 0, 0x12, 0x34, 0, 1],
    };
    let quoted = if ipv6 {
        let (first, bytes) = ipv6_chain(&q.exts, q.proto, &l4);
        // A quoted packet of 1400 bytes of which these are the first.
        [ipv6_header(v6(q.src.unwrap_or(to)), v6(Addr::Client), first, 63, 1360), bytes].concat()
    } else {
        [ipv4_header(v4(q.src.unwrap_or(to)), v4(Addr::Client), q.proto, q.frag, q.ihl, 1400), l4].concat()
    };
    let code = if !ipv6 && kind == 3 { 4 } else { 0 };
    [vec![kind, code, 0, 0, 0, 0, 0x05, 0x78], quoted].concat()
}

impl Case {
    /// The frame's bytes.
    fn frame(&self) -> Vec<u8> {
        if let Transport::Arp(op) = self.transport {
            return self.arp(op);
        }
        let mut f = if self.ipv6 { self.ipv6_frame() } else { self.ipv4_frame() };
        if self.tail >= 0 {
            f.resize(f.len() + self.tail as usize, 0);
        } else {
            f.truncate(f.len().saturating_sub(self.tail.unsigned_abs() as usize).max(14));
        }
        f
    }

    fn arp(&self, op: u8) -> Vec<u8> {
        let mut f = eth([0xff; 6], &self.tpids, 0x0806);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, op, 2, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&v4(self.src).octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&v4(self.dst).octets());
        f.resize(f.len().max(60), 0);
        f
    }

    /// The IP protocol number and the bytes after the IP headers (checksum fields zero).
    fn l4(&self) -> (u8, Vec<u8>) {
        let icmp = if self.ipv6 { 58 } else { 1 };
        match &self.transport {
            Transport::Tcp(port) => (6, tcp(51000, *port)),
            Transport::Udp(port) => (17, udp(51000, *port)),
            Transport::Icmp(kind) => (icmp, vec![*kind, 0, 0, 0, 0x12, 0x34, 0, 1, 0xaa, 0xbb, 0xcc, 0xdd]),
            Transport::Error(kind, q) => (icmp, error_message(self.ipv6, *kind, q, self.dst)),
            Transport::Solicitation(target, _) => {
                let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
                m.extend_from_slice(&v6(*target).octets());
                m.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 2]);
                (icmp, m)
            }
            Transport::Dad(target) => {
                let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
                m.extend_from_slice(&v6(*target).octets());
                (icmp, m)
            }
            Transport::Proto(p) => (*p, vec![0; 24]),
            Transport::Arp(_) => (0, vec![]),
        }
    }

    fn ipv4_frame(&self) -> Vec<u8> {
        let (src, dst) = (v4(self.src), v4(self.dst));
        let (proto, mut l4) = self.l4();
        if proto == 1 {
            let c = checksum(&[&l4]);
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        let header_len = usize::from(self.ihl.max(5)) * 4;
        let len = ((header_len + l4.len()) as u16).wrapping_add_signed(self.len_delta);
        let mac = if self.dst == Addr::Broadcast { [0xff; 6] } else { MAC };
        [eth(mac, &self.tpids, 0x0800), ipv4_header(src, dst, proto, self.frag, self.ihl, len), l4].concat()
    }

    fn ipv6_frame(&self) -> Vec<u8> {
        let src = if matches!(self.transport, Transport::Dad(_)) { Ipv6Addr::UNSPECIFIED } else { v6(self.src) };
        let dst = v6(self.dst);
        let (proto, mut l4) = self.l4();
        if proto == 58 {
            let c = icmp6_checksum(src, dst, &l4);
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
        let hop_limit = match self.transport {
            Transport::Solicitation(_, false) => 64,
            _ => 255,
        };
        let (first, bytes) = ipv6_chain(&self.exts, proto, &l4);
        let len = (bytes.len() as u16).wrapping_add_signed(self.len_delta);
        [eth(MAC, &self.tpids, 0x86dd), ipv6_header(src, dst, first, hop_limit, len), bytes].concat()
    }
}

/// What the two sides made of one frame, when they disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Disagreement {
    /// Steered to the socket, and passed by the worker: lost.
    Lost,
    /// Left to the kernel, and forwarded (or answered) by the worker: never served.
    Unserved,
}

/// Whether the program steers `frame`, and the worker's verdict for it.
fn run(steering: &VipSteering, w: &mut Worker, frame: &[u8]) -> (bool, Verdict) {
    (steering.test_run(frame).unwrap() == XdpAction::Drop, verdict(w, frame))
}

/// How the two answers disagree, if they do.
fn disagreement(steered: bool, v: Verdict) -> Option<Disagreement> {
    match (steered, v) {
        (true, Verdict::Pass) => Some(Disagreement::Lost),
        (false, Verdict::Tx | Verdict::Handoff(_) | Verdict::HandoffAll) => Some(Disagreement::Unserved),
        _ => None,
    }
}

/// Most IPv6 extension headers the program walks (`EXTENSION_STEPS` in `lb_io::bpf::xdp`).
const EXTENSION_STEPS: usize = 4;

/// Why the design accepts a disagreement on `case`, if it does. Each is a frame no host sends, or
/// one the kernel would discard too, or one the program's module docs give up on:
/// - an IPv6 frame to (or a solicitation for) `::ffff:<IPv4 VIP>`: its map key is the IPv4 VIP's,
///   so it is steered as the VIP's would be, and the worker, with no such IPv6 address, passes it
///   (no IPv6 packet carries a mapped address, RFC 4291 2.5.5.2, and the kernel holds none);
/// - ICMPv6 behind more extension headers than the program walks to a service address (steered,
///   as anything with that many is, and passed if it is no error about a flow of ours), and TCP,
///   UDP and ICMPv6 errors behind that many to an address the host holds or a SNAT address (left
///   to the kernel, where the worker would have served them);
/// - an ICMP error or a solicitation whose IP length ends before the frame does: the program reads
///   to the frame's end, the worker to the IP packet's, where the quote (or the solicitation) is
///   too short for the kernel too.
fn accepted(case: &Case, d: Disagreement) -> Option<&'static str> {
    let quote_exts = match &case.transport {
        Transport::Error(_, q) => q.exts.len(),
        _ => 0,
    };
    let icmp = matches!(
        case.transport,
        Transport::Icmp(_) | Transport::Error(..) | Transport::Solicitation(..) | Transport::Dad(_)
    );
    let mapped_target =
        matches!(case.transport, Transport::Solicitation(Addr::Mapped, _) | Transport::Dad(Addr::Mapped));
    if case.ipv6 && (case.dst == Addr::Mapped || mapped_target) {
        Some("an IPv6 frame to ::ffff:<IPv4 VIP> is steered as the VIP's, and lost")
    } else if case.ipv6
        && (case.exts.len() > EXTENSION_STEPS || quote_exts > EXTENSION_STEPS)
        && (icmp || d == Disagreement::Unserved)
    {
        Some("more IPv6 extension headers than the program walks")
    } else if d == Disagreement::Lost && case.len_delta < 0 && icmp {
        Some("an IP length shorter than the frame cuts what the program reads")
    } else {
        None
    }
}

/// An IPv4 header length and flags / offset field, or IPv6 extension headers.
type Shape = (u8, u16, Vec<(u8, u16)>);

/// Every case from the values the two sides care about.
fn cases() -> Vec<Case> {
    let ports = [80u16, 53, 443, 30080, 22, 40000, 40999, 41000];
    let quote_ports = [80u16, 53, 443, 30080, 22, 40500];
    let mut transports: Vec<Transport> = Vec::new();
    transports.extend(ports.iter().map(|&p| Transport::Tcp(p)));
    transports.extend(ports.iter().map(|&p| Transport::Udp(p)));
    for proto in [47u8, 50, 4] {
        transports.push(Transport::Proto(proto));
    }
    let mut out = Vec::new();
    for ipv6 in [false, true] {
        let mut ts = transports.clone();
        let (echo, errors, others): (u8, &[u8], &[u8]) =
            if ipv6 { (128, &[1, 2, 3, 4], &[129, 134, 136, 137]) } else { (8, &[3, 11, 12], &[0, 5, 13]) };
        ts.push(Transport::Icmp(echo));
        ts.extend(others.iter().map(|&t| Transport::Icmp(t)));
        for &kind in errors {
            // From the address the error goes to (about a flow of ours, or the host's own), or from
            // another: the client's packet (no flow of the load balancer's sends from there), or
            // another VIP's (about no flow of the address the error goes to).
            for src in [None, Some(Addr::Client), Some(Addr::Vip), Some(Addr::Dsr)] {
                for proto in [6u8, 17, if ipv6 { 58 } else { 1 }] {
                    for &sport in &quote_ports {
                        let q = Quote { src, proto, sport, ihl: 5, frag: 0x4000, exts: vec![] };
                        ts.push(Transport::Error(kind, q));
                    }
                }
            }
        }
        // Quotes of other shapes, about a NAT flow and a service's flow.
        for sport in [80u16, 40500] {
            let src = None;
            let kind = if ipv6 { 2 } else { 3 };
            let q = |ihl, frag, exts: Vec<(u8, u16)>| Quote { src, proto: 6, sport, ihl, frag, exts };
            if ipv6 {
                for exts in
                    [vec![(60, 0)], vec![(44, 1)], vec![(44, 8)], vec![(0, 0), (60, 0), (43, 0), (60, 0), (60, 0)]]
                {
                    ts.push(Transport::Error(kind, q(5, 0, exts)));
                }
            } else {
                for (ihl, frag) in [(6, 0), (4, 0), (5, 0x2000), (5, 185)] {
                    ts.push(Transport::Error(kind, q(ihl, frag, vec![])));
                }
            }
        }
        if ipv6 {
            for target in [Addr::Vip, Addr::Node, Addr::Other, Addr::Mapped] {
                ts.push(Transport::Solicitation(target, true));
                ts.push(Transport::Solicitation(target, false));
                ts.push(Transport::Dad(target));
            }
        } else {
            ts.push(Transport::Arp(1));
            ts.push(Transport::Arp(2));
        }
        let shapes: Vec<Shape> = if ipv6 {
            [
                vec![],
                vec![(0, 0)],
                vec![(60, 0)],
                vec![(43, 0)],
                vec![(51, 0)],
                vec![(51, 0x100)],
                vec![(44, 0)],
                vec![(44, 1)],
                vec![(44, 8)],
                vec![(44, 9)],
                vec![(0, 0), (60, 0), (44, 0)],
                vec![(0, 0), (43, 0), (44, 1)],
                vec![(60, 0), (0, 0)],
                vec![(0, 0), (60, 0), (43, 0), (60, 0)],
                vec![(0, 0), (60, 0), (43, 0), (60, 0), (60, 0)],
            ]
            .into_iter()
            .map(|e| (5, 0, e))
            .collect()
        } else {
            [(5, 0), (5, 0x4000), (5, 0x2000), (5, 185), (5, 0x20b9), (6, 0x4000), (4, 0), (15, 0), (7, 0x2000)]
                .into_iter()
                .map(|(ihl, frag)| (ihl, frag, vec![]))
                .collect()
        };
        for transport in &ts {
            let arp = matches!(transport, Transport::Arp(_));
            for &dst in &ADDRS {
                if (!ipv6 && dst == Addr::Mapped) || dst == Addr::Client {
                    continue;
                }
                // Each shape with the frame whole and untagged; the first shape (plain) with every
                // length and tagging too.
                let base = |i: usize, len_delta, tail, tpids: Vec<u16>, src| {
                    let (ihl, frag, exts): &Shape = &shapes[i];
                    Case {
                        tpids,
                        ipv6,
                        dst,
                        src,
                        transport: transport.clone(),
                        ihl: *ihl,
                        frag: *frag,
                        exts: exts.clone(),
                        len_delta,
                        tail,
                    }
                };
                let shapes_here = if arp { 1 } else { shapes.len() };
                for i in 0..shapes_here {
                    out.push(base(i, 0, 0, vec![], Addr::Client));
                }
                for (tpids, src) in [(vec![0x8100], Addr::Vip), (vec![0x88a8, 0x8100], Addr::Node)] {
                    out.push(base(0, 0, 0, tpids, src));
                }
                if arp {
                    continue;
                }
                for (len_delta, tail) in [(0, 6), (-4, 0), (4, 0), (0, -4), (0, -20)] {
                    out.push(base(0, len_delta, tail, vec![], Addr::Client));
                }
                // Cut at every length (to the VIP and the node only: the rest is passed whole).
                if matches!(dst, Addr::Vip | Addr::Node) {
                    let whole = base(0, 0, 0, vec![], Addr::Client).frame().len();
                    for cut in 1..whole.saturating_sub(14) {
                        out.push(base(0, 0, -(cut as i16), vec![], Addr::Client));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_program_steers_nothing_the_worker_passes_and_passes_nothing_it_serves() {
    let Some(mut steering) = load() else { return };
    let cases = cases();
    let mut found: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut accepted_seen = BTreeSet::new();
    // (steered, forwarded or answered) over all frames: the comparison is not a vacuous one.
    let mut tally = std::collections::BTreeMap::<(bool, bool), usize>::new();
    for (node_ports, host, responder) in
        [(true, false, true), (true, true, true), (false, false, true), (false, true, true), (true, true, false)]
    {
        let tables = tables(node_ports);
        steering.set(steering_for(&tables, host, responder)).unwrap();
        let mut w = worker(&tables, responder);
        for case in &cases {
            let frame = case.frame();
            let (steered, v) = run(&steering, &mut w, &frame);
            *tally.entry((steered, v == Verdict::Tx)).or_default() += 1;
            let Some(d) = disagreement(steered, v) else { continue };
            if let Some(why) = accepted(case, d) {
                accepted_seen.insert(why);
                continue;
            }
            // One line per kind of case (shapes, lengths and tags vary within a kind).
            let config = format!("node ports {node_ports}, host holds the node {host}, responder {responder}");
            let key = format!("{d:?} ({v:?}), {config}: IPv6 {} to {:?}, {:?}", case.ipv6, case.dst, case.transport);
            if seen.insert(key.clone()) {
                found.push(format!("{key}\n    {case:?}\n    {frame:02x?}"));
            }
        }
    }
    println!("{} frames; (steered, forwarded or answered): {tally:?}", cases.len());
    println!("accepted disagreements: {accepted_seen:?}");
    assert!(tally.get(&(true, true)).is_some_and(|&n| n > 1000), "too few frames served: {tally:?}");
    assert!(
        found.is_empty(),
        "the program and the worker disagree on {} kinds of frame:\n{}",
        found.len(),
        found.join("\n")
    );
}
