//! Frames for the rewrite tests, written with etherparse's header types and checksum code (an
//! implementation independent of lb-core's): a readable [`Spec`] of a TCP or UDP packet, and the
//! expected tunnel encapsulations.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    reason = "shared by several test binaries; unwraps fail the test"
)]

use std::net::IpAddr;

use etherparse::{
    EtherType, Ethernet2Header, IpDscp, IpEcn, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header,
    SingleVlanHeader, TcpHeader, UdpHeader, VlanId,
};
use lb_core::Frame;

/// The client, the VIP, the node's SNAT and tunnel addresses, and a backend, per family.
pub mod addr {
    use std::net::IpAddr;
    pub fn client4() -> IpAddr {
        "198.51.100.7".parse().unwrap()
    }
    pub fn vip4() -> IpAddr {
        "192.0.2.10".parse().unwrap()
    }
    pub fn snat4() -> IpAddr {
        "10.0.0.1".parse().unwrap()
    }
    pub fn tunnel4() -> IpAddr {
        "10.0.0.2".parse().unwrap()
    }
    pub fn backend4() -> IpAddr {
        "10.1.0.5".parse().unwrap()
    }
    pub fn client6() -> IpAddr {
        "2001:db8:c::7".parse().unwrap()
    }
    pub fn vip6() -> IpAddr {
        "2001:db8:f::10".parse().unwrap()
    }
    pub fn snat6() -> IpAddr {
        "fd00::1".parse().unwrap()
    }
    pub fn tunnel6() -> IpAddr {
        "fd00::2".parse().unwrap()
    }
    pub fn backend6() -> IpAddr {
        "fd00:1::5".parse().unwrap()
    }
}

/// The upstream router, this node, and a backend.
pub const MAC_ROUTER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const MAC_BACKEND: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

/// Transport layer of a [`Spec`].
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// TCP with these flags (etherparse field names: syn, ack, fin, rst, psh).
    Tcp { sport: u16, dport: u16, seq: u32, syn: bool, ack: bool, fin: bool },
    /// UDP; `zero_checksum` sends no checksum (IPv4 only).
    Udp { sport: u16, dport: u16, zero_checksum: bool },
}

/// One TCP or UDP frame, readable.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// VLAN ids, outermost first (0, 1 or 2; two make an 802.1ad + 802.1Q stack).
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// DSCP and ECN (IPv4 TOS / IPv6 traffic class).
    pub tos: u8,
    /// IPv4 options, a multiple of 4 bytes up to 40.
    pub options: Vec<u8>,
    pub flow_label: u32,
    /// IPv4: `None` sets DF with identification 0 (etherparse's default); `Some(id)` clears DF and
    /// uses `id`.
    pub fragmentable_id: Option<u16>,
    /// IPv6 extension headers between the IPv6 header and the transport header, in order: each its
    /// type and its bytes, whose first (the next header) [`Spec::ip_packet`] fills in. None may
    /// change the transport checksum's pseudo-header (a routing header has no segments left).
    pub v6_exts: Vec<(u8, Vec<u8>)>,
    pub transport: Transport,
    pub payload: Vec<u8>,
}

impl Spec {
    /// A TCP SYN from the client to the VIP, port 80.
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Spec {
        Spec {
            src_mac: MAC_ROUTER,
            dst_mac: MAC_NODE,
            vlans: vec![],
            src,
            dst,
            ttl: 64,
            tos: 0,
            options: vec![],
            flow_label: 0,
            fragmentable_id: None,
            v6_exts: vec![],
            transport: Transport::Tcp { sport, dport, seq: 1000, syn: true, ack: false, fin: false },
            payload: b"GET / HTTP/1.1\r\n".to_vec(),
        }
    }

    /// A UDP datagram.
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Spec {
        Spec {
            transport: Transport::Udp { sport, dport, zero_checksum: false },
            payload: b"\x12\x34\x01\x00\x00\x01".to_vec(),
            ..Spec::tcp(src, dst, sport, dport)
        }
    }

    pub fn ports(&self) -> (u16, u16) {
        match self.transport {
            Transport::Tcp { sport, dport, .. } | Transport::Udp { sport, dport, .. } => (sport, dport),
        }
    }

    /// The same packet with other addresses and ports (what a NAT should produce).
    pub fn translated(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Spec {
        let mut s = self.clone();
        s.src = src;
        s.dst = dst;
        s.transport = match s.transport {
            Transport::Tcp { seq, syn, ack, fin, .. } => Transport::Tcp { sport, dport, seq, syn, ack, fin },
            Transport::Udp { zero_checksum, .. } => Transport::Udp { sport, dport, zero_checksum },
        };
        s
    }

    /// The IP packet: header, transport header and payload, with etherparse's checksums.
    pub fn ip_packet(&self) -> Vec<u8> {
        let (proto, l4) = self.transport_bytes();
        let mut out = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                self.ipv4_header(s.octets(), d.octets(), proto, l4.len()).write(&mut out).unwrap()
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let exts = self.v6_ext_bytes(proto);
                let mut h = self.ipv6_header(s.octets(), d.octets(), proto, exts.len() + l4.len());
                h.next_header = self.v6_exts.first().map_or(proto, |e| IpNumber(e.0));
                h.write(&mut out).unwrap();
                out.extend_from_slice(&exts);
            }
            _ => panic!("mixed families"),
        }
        out.extend_from_slice(&l4);
        out
    }

    /// Length of the IPv6 extension headers.
    pub fn v6_exts_len(&self) -> usize {
        self.v6_exts.iter().map(|e| e.1.len()).sum()
    }

    /// The IPv6 extension headers chained: each names the next, the last `proto`.
    fn v6_ext_bytes(&self, proto: IpNumber) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (_, bytes)) in self.v6_exts.iter().enumerate() {
            let next = self.v6_exts.get(i + 1).map_or(proto.0, |e| e.0);
            out.push(next);
            out.extend_from_slice(&bytes[1..]);
        }
        out
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut out = self.l2_header(self.ether_type());
        out.extend_from_slice(&self.ip_packet());
        out
    }

    /// Ethernet header and VLAN tags, the last announcing `ether_type`.
    pub fn l2_header(&self, ether_type: EtherType) -> Vec<u8> {
        l2(self.src_mac, self.dst_mac, &self.vlans, ether_type)
    }

    pub fn ether_type(&self) -> EtherType {
        if self.src.is_ipv4() { EtherType::IPV4 } else { EtherType::IPV6 }
    }

    fn ipv4_header(&self, s: [u8; 4], d: [u8; 4], proto: IpNumber, l4_len: usize) -> Ipv4Header {
        let mut h = Ipv4Header::new(0, self.ttl, proto, s, d).unwrap();
        h.dscp = IpDscp::try_new(self.tos >> 2).unwrap();
        h.ecn = IpEcn::try_new(self.tos & 3).unwrap();
        h.options = Ipv4Options::try_from(&self.options[..]).unwrap();
        if let Some(id) = self.fragmentable_id {
            h.dont_fragment = false;
            h.identification = id;
        }
        h.set_payload_len(l4_len).unwrap();
        h.header_checksum = h.calc_header_checksum();
        h
    }

    fn ipv6_header(&self, s: [u8; 16], d: [u8; 16], proto: IpNumber, l4_len: usize) -> Ipv6Header {
        let mut h = Ipv6Header {
            traffic_class: self.tos,
            flow_label: Ipv6FlowLabel::try_new(self.flow_label & 0xfffff).unwrap(),
            payload_length: 0,
            next_header: proto,
            hop_limit: self.ttl,
            source: s,
            destination: d,
        };
        h.set_payload_length(l4_len).unwrap();
        h
    }

    /// Transport header and payload, checksummed by etherparse.
    fn transport_bytes(&self) -> (IpNumber, Vec<u8>) {
        let mut out = Vec::new();
        let (proto, hdr_len) = match &self.transport {
            Transport::Tcp { .. } => (IpNumber::TCP, 20),
            Transport::Udp { .. } => (IpNumber::UDP, 8),
        };
        let (v4, v6) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                (Some(self.ipv4_header(s.octets(), d.octets(), proto, hdr_len + self.payload.len())), None)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                (None, Some(self.ipv6_header(s.octets(), d.octets(), proto, hdr_len + self.payload.len())))
            }
            _ => panic!("mixed families"),
        };
        match self.transport {
            Transport::Tcp { sport, dport, seq, syn, ack, fin } => {
                let mut t = TcpHeader::new(sport, dport, seq, 64240);
                t.syn = syn;
                t.ack = ack;
                t.fin = fin;
                if ack {
                    t.acknowledgment_number = 1;
                }
                t.checksum = match (&v4, &v6) {
                    (Some(h), _) => t.calc_checksum_ipv4(h, &self.payload).unwrap(),
                    (_, Some(h)) => t.calc_checksum_ipv6(h, &self.payload).unwrap(),
                    _ => unreachable!(),
                };
                t.write(&mut out).unwrap();
            }
            Transport::Udp { sport, dport, zero_checksum } => {
                let mut u = match (&v4, &v6) {
                    (Some(h), _) => UdpHeader::with_ipv4_checksum(sport, dport, h, &self.payload).unwrap(),
                    (_, Some(h)) => UdpHeader::with_ipv6_checksum(sport, dport, h, &self.payload).unwrap(),
                    _ => unreachable!(),
                };
                if zero_checksum && v4.is_some() {
                    u.checksum = 0;
                }
                u.write(&mut out).unwrap();
            }
        }
        out.extend_from_slice(&self.payload);
        (proto, out)
    }
}

/// Ethernet header and VLAN tags (802.1ad outer, 802.1Q inner), the last announcing `ether_type`.
pub fn l2(src_mac: [u8; 6], dst_mac: [u8; 6], vlans: &[u16], ether_type: EtherType) -> Vec<u8> {
    let mut out = Vec::new();
    let first = match vlans.len() {
        0 => ether_type,
        1 => EtherType::VLAN_TAGGED_FRAME,
        _ => EtherType::PROVIDER_BRIDGING,
    };
    Ethernet2Header { source: src_mac, destination: dst_mac, ether_type: first }.write(&mut out).unwrap();
    for (i, id) in vlans.iter().enumerate() {
        let next = if i + 1 == vlans.len() { ether_type } else { EtherType::VLAN_TAGGED_FRAME };
        SingleVlanHeader {
            pcp: Default::default(),
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(*id).unwrap(),
            ether_type: next,
        }
        .write(&mut out)
        .unwrap();
    }
    out
}

/// How the tests expect a tunnel's outer headers to look.
pub struct Outer {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `Some((source port, destination port))` for GUE.
    pub gue: Option<(u16, u16)>,
    /// The IPv6 flow label.
    pub flow_label: u32,
    /// The outer IPv4 identification of an inner IPv4 packet without DF (the tunnel's counter).
    pub ip_id: u16,
}

/// The expected encapsulation of `inner`: its L2 header (MACs replaced) and VLAN tags, an outer IP
/// header as lb-core documents it (TOS copied, DF copied, id 0 with DF and `outer.ip_id` without, TTL 64), the UDP and GUE headers for
/// GUE (UDP checksum 0 over IPv4, etherparse's over IPv6), then `inner`'s IP packet unchanged.
pub fn encapsulated(inner: &Spec, outer: &Outer, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let inner_ip = inner.ip_packet();
    let inner_proto = if inner.src.is_ipv4() { IpNumber::IPV4 } else { IpNumber::IPV6 };
    let mut after_ip = Vec::new();
    if let Some((sport, dport)) = outer.gue {
        after_ip.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // UDP, filled below
        after_ip.extend_from_slice(&[0, inner_proto.0, 0, 0]); // GUE variant 0, no options
        after_ip.extend_from_slice(&inner_ip);
        let udp_payload = after_ip[8..].to_vec();
        let u = match (outer.src, outer.dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let mut u = UdpHeader { source_port: sport, destination_port: dport, length: 0, checksum: 0 };
                u.length = (8 + udp_payload.len()) as u16;
                u
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = Ipv6Header {
                    payload_length: (8 + udp_payload.len()) as u16,
                    next_header: IpNumber::UDP,
                    source: s.octets(),
                    destination: d.octets(),
                    ..Default::default()
                };
                UdpHeader::with_ipv6_checksum(sport, dport, &h, &udp_payload).unwrap()
            }
            _ => panic!("mixed outer families"),
        };
        let mut hdr = Vec::new();
        u.write(&mut hdr).unwrap();
        after_ip[..8].copy_from_slice(&hdr);
    } else {
        after_ip.extend_from_slice(&inner_ip);
    }
    let proto = if outer.gue.is_some() { IpNumber::UDP } else { inner_proto };
    let mut out;
    match (outer.src, outer.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out = l2(src_mac, dst_mac, &inner.vlans, EtherType::IPV4);
            let mut h = Ipv4Header::new(0, 64, proto, s.octets(), d.octets()).unwrap();
            h.dscp = IpDscp::try_new(inner.tos >> 2).unwrap();
            h.ecn = IpEcn::try_new(inner.tos & 3).unwrap();
            // DF copied from an IPv4 inner packet (set for IPv6); without DF the tunnel's identification.
            if let (Some(_), true) = (inner.fragmentable_id, inner.src.is_ipv4()) {
                h.dont_fragment = false;
                h.identification = outer.ip_id;
            }
            h.set_payload_len(after_ip.len()).unwrap();
            h.write(&mut out).unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out = l2(src_mac, dst_mac, &inner.vlans, EtherType::IPV6);
            let mut h = Ipv6Header {
                traffic_class: inner.tos,
                flow_label: Ipv6FlowLabel::try_new(outer.flow_label & 0xfffff).unwrap(),
                payload_length: 0,
                next_header: proto,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            };
            h.set_payload_length(after_ip.len()).unwrap();
            h.write(&mut out).unwrap();
        }
        _ => panic!("mixed outer families"),
    }
    out.extend_from_slice(&after_ip);
    out
}

/// A buffer holding `frame` after `headroom` bytes of headroom (filled with 0xee to show stray
/// writes), with 64 bytes of tailroom.
pub fn buffer(frame: &[u8], headroom: usize) -> Vec<u8> {
    let mut buf = vec![0xee; headroom];
    buf.extend_from_slice(frame);
    buf.extend_from_slice(&[0xdd; 64]);
    buf
}

/// A frame over `buf` whose packet starts after `headroom` bytes and is `len` long.
pub fn frame(buf: &mut [u8], headroom: usize, len: usize) -> Frame<'_> {
    Frame::new(buf, headroom, len)
}
