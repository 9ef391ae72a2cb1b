//! [`FlowKey`]: the 5-tuple that names a flow across lb-core (conntrack key, hash input, NAT target).
//!
//! Addresses of both families live in one `[u8; 16]` so the key is a fixed 38 bytes and needs no
//! enum match to hash or compare: an IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`, RFC 4291
//! §2.5.5.2) and the [`Family`] byte keeps an IPv6 packet that carries mapped addresses apart from an
//! IPv4 one.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Protocol;

/// IP version of a packet or flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub const fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Source and destination address, IP protocol and ports of one direction of a flow.
///
/// For ICMP echo the identifier stands in for both ports (as Linux conntrack does), so a request and
/// its reply have reversed keys. For protocols without ports, and for non-first fragments (see
/// [`crate::packet::Fragment::Later`]), both ports are 0: such frames can only be matched by
/// (source, destination, protocol), see [`FlowKey::three_tuple`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    proto: u8,
    family: Family,
}

/// Whether an IPv4 source address with this first octet names no single host, whatever its other
/// octets: `0.0.0.0/8`, loopback (`127.0.0.0/8`) and multicast (`224.0.0.0/4`).
const fn v4_first_octet_names_no_host(first: u8) -> bool {
    matches!(first, 0 | 127 | 224..=239)
}

/// [`v4_first_octet_names_no_host`] as a bit set: bit `b % 64` of word `b / 64` for octet `b`.
const V4_NO_HOST_FIRST_OCTETS: [u64; 4] = {
    let mut set = [0u64; 4];
    let mut b = 0;
    while b < 256 {
        if v4_first_octet_names_no_host(b as u8) {
            set[b / 64] |= 1 << (b % 64);
        }
        b += 1;
    }
    set
};

/// `::ffff:0:0/96`, the prefix of an IPv4-mapped address.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Built as one 128-bit value rather than byte by byte, so the 16 bytes are written whole and the
/// conntrack hash's 64-bit loads of them are forwarded from the store (byte stores followed by wider
/// loads stall the load until the stores retire; it showed in profiles of the fast path). Built
/// little-endian, the address's bytes taken as they are (`from_le_bytes`, a plain load on
/// x86): built big-endian, the address was byte-swapped in and the whole swapped back out, a `bswap`
/// more for each (~2 instructions a packet, callgrind).
pub(crate) const fn map_v4(a: [u8; 4]) -> [u8; 16] {
    ((u32::from_le_bytes(a) as u128) << 96 | 0xffff << 80).to_le_bytes()
}

const fn unmap_v4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

impl FlowKey {
    /// An IPv4 flow.
    pub const fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, src_port: u16, dst_port: u16) -> Self {
        FlowKey { src: map_v4(src), dst: map_v4(dst), src_port, dst_port, proto, family: Family::V4 }
    }

    /// An IPv6 flow.
    pub const fn v6(src: [u8; 16], dst: [u8; 16], proto: u8, src_port: u16, dst_port: u16) -> Self {
        FlowKey { src, dst, src_port, dst_port, proto, family: Family::V6 }
    }

    /// A flow between two addresses of one family; `None` when the families differ.
    pub fn from_ips(src: IpAddr, dst: IpAddr, proto: u8, src_port: u16, dst_port: u16) -> Option<Self> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Some(FlowKey::v4(s.octets(), d.octets(), proto, src_port, dst_port)),
            (IpAddr::V6(s), IpAddr::V6(d)) => Some(FlowKey::v6(s.octets(), d.octets(), proto, src_port, dst_port)),
            _ => None,
        }
    }

    /// The same flow seen from the other end: addresses and ports swapped.
    #[must_use]
    pub const fn reverse(&self) -> Self {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            family: self.family,
        }
    }

    /// The key with both ports zeroed: what a non-first fragment can be matched by.
    #[must_use]
    pub const fn three_tuple(&self) -> Self {
        FlowKey { src_port: 0, dst_port: 0, ..*self }
    }

    /// The key with the given ports.
    #[must_use]
    pub const fn with_ports(&self, src_port: u16, dst_port: u16) -> Self {
        FlowKey { src_port, dst_port, ..*self }
    }

    /// IP version of the flow.
    pub const fn family(&self) -> Family {
        self.family
    }

    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub const fn proto(&self) -> u8 {
        self.proto
    }

    /// The protocol as a service carries it, if it is TCP or UDP.
    pub const fn protocol(&self) -> Option<Protocol> {
        Protocol::from_number(self.proto)
    }

    /// Source port (ICMP echo identifier; 0 when the packet has no ports).
    pub const fn src_port(&self) -> u16 {
        self.src_port
    }

    /// Destination port (ICMP echo identifier; 0 when the packet has no ports).
    pub const fn dst_port(&self) -> u16 {
        self.dst_port
    }

    /// Source address.
    pub fn src_ip(&self) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(unmap_v4(&self.src))),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.src)),
        }
    }

    /// Destination address.
    pub fn dst_ip(&self) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(unmap_v4(&self.dst))),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.dst)),
        }
    }

    /// Source address as 16 bytes (IPv4-mapped for IPv4), e.g. as hash input.
    pub const fn src_bytes(&self) -> &[u8; 16] {
        &self.src
    }

    /// Destination address as 16 bytes (IPv4-mapped for IPv4), e.g. as hash input.
    pub const fn dst_bytes(&self) -> &[u8; 16] {
        &self.dst
    }

    /// False when the source address names no single host, as no host sends from and no router
    /// forwards from (RFC 1812 5.3.7, RFC 4291 2.5.5.2 and 2.7): in IPv4 `0.0.0.0/8`, loopback,
    /// multicast and broadcast; in IPv6 unspecified, loopback, multicast and IPv4-mapped. Class E
    /// (`240.0.0.0/4`) names hosts: Linux takes it as unicast, and clusters number pods in it
    /// (GKE's class E pod ranges). Read from the key's bytes, without building an address.
    pub const fn src_names_one_host(&self) -> bool {
        let s = &self.src;
        match self.family {
            // (The IPv4 address alone, without the 16-byte swap an IPv6 one needs: each new flow
            // asks, and the swap made this ~21 instructions, callgrind. The first octet's test is
            // one bit of a table, the address read once as a word: a `matches!` on the octet, three
            // compares and branches, and the broadcast test on bytes were ~9 instructions more a
            // new DSR flow, callgrind.)
            Family::V4 => {
                let a = u32::from_be_bytes([s[12], s[13], s[14], s[15]]);
                let first = a >> 24;
                let no_host = V4_NO_HOST_FIRST_OCTETS[(first >> 6) as usize] >> (first & 63) & 1 != 0;
                !(no_host || a == u32::MAX)
            }
            Family::V6 => {
                let a = u128::from_be_bytes(self.src);
                !(a >> 120 == 0xff || a <= 1 || a >> 32 == 0xffff)
            }
        }
    }

    /// Source address bytes in wire form: 4 bytes for IPv4, 16 for IPv6.
    pub fn src_wire(&self) -> &[u8] {
        wire(&self.src, self.family)
    }

    /// Destination address bytes in wire form: 4 bytes for IPv4, 16 for IPv6.
    pub fn dst_wire(&self) -> &[u8] {
        wire(&self.dst, self.family)
    }
}

fn wire(a: &[u8; 16], family: Family) -> &[u8] {
    match family {
        Family::V4 => a.split_at(V4_MAPPED_PREFIX.len()).1,
        Family::V6 => a,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    use super::*;

    #[test]
    fn fits_a_conntrack_entry() {
        assert!(core::mem::size_of::<FlowKey>() <= 40, "{}", core::mem::size_of::<FlowKey>());
    }

    #[test]
    fn v4_is_mapped_and_round_trips() {
        let k = FlowKey::v4([10, 0, 0, 1], [192, 168, 1, 2], 6, 40000, 80);
        assert_eq!(k.src_bytes(), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(k.src_ip(), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(k.dst_ip(), "192.168.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(k.src_wire(), &[10, 0, 0, 1]);
        assert_eq!(k.protocol(), Some(Protocol::Tcp));
        // An IPv6 packet carrying the same mapped addresses is a different flow.
        let m = FlowKey::v6(*k.src_bytes(), *k.dst_bytes(), 6, 40000, 80);
        assert_ne!(k, m);
        assert_eq!(m.src_wire().len(), 16);
    }

    #[test]
    fn sources_that_name_no_single_host() {
        let from = |s: &str| FlowKey::from_ips(s.parse().unwrap(), s.parse().unwrap(), 6, 1, 2).unwrap();
        for s in ["0.0.0.0", "0.255.1.2", "127.0.0.1", "224.0.0.1", "239.1.1.1", "255.255.255.255"] {
            assert!(!from(s).src_names_one_host(), "{s}");
        }
        for s in ["::", "::1", "ff02::1", "ff0e::1", "::ffff:10.0.0.1", "::ffff:0.0.0.0"] {
            assert!(!from(s).src_names_one_host(), "{s}");
        }
        for s in ["1.0.0.0", "10.0.0.1", "126.255.255.255", "128.0.0.1", "223.255.255.255", "::2", "::10.0.0.1"] {
            assert!(from(s).src_names_one_host(), "{s}");
        }
        // Class E, up to the broadcast address: unicast to Linux, and pod ranges on some clusters.
        for s in ["240.0.0.1", "250.1.2.3", "255.255.255.254"] {
            assert!(from(s).src_names_one_host(), "{s}");
        }
        for s in ["fe80::1", "2001:db8::1", "::fffe:10.0.0.1", "64:ff9b::10.0.0.1", "feff::1"] {
            assert!(from(s).src_names_one_host(), "{s}");
        }
    }

    proptest::proptest! {
        /// `map_v4` (built little-endian) is the standard library's IPv4-mapped form, for any address.
        #[test]
        fn map_v4_is_the_ipv4_mapped_address(a in proptest::prelude::any::<[u8; 4]>()) {
            proptest::prop_assert_eq!(map_v4(a), Ipv4Addr::from(a).to_ipv6_mapped().octets());
            proptest::prop_assert_eq!(unmap_v4(&map_v4(a)), a);
        }
    }

    /// The first octet's bit set says what `v4_first_octet_names_no_host` says, and the whole test
    /// what the standard library's address classes do, for every first octet.
    #[test]
    fn v4_sources_naming_no_host_by_first_octet() {
        for first in 0..=255u8 {
            for rest in [[0, 0, 0], [1, 2, 3], [255, 255, 254], [255, 255, 255]] {
                let a = core::net::Ipv4Addr::new(first, rest[0], rest[1], rest[2]);
                let expected = !(first == 0 || a.is_loopback() || a.is_multicast() || a.is_broadcast());
                let k = FlowKey::v4(a.octets(), [10, 0, 0, 1], 6, 1, 2);
                assert_eq!(k.src_names_one_host(), expected, "{a}");
            }
        }
    }

    #[test]
    fn reverse_swaps_ends_and_is_an_involution() {
        let k =
            FlowKey::from_ips("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap(), 17, 5353, 53).unwrap();
        let r = k.reverse();
        assert_eq!((r.src_ip(), r.src_port()), (k.dst_ip(), k.dst_port()));
        assert_eq!((r.dst_ip(), r.dst_port()), (k.src_ip(), k.src_port()));
        assert_eq!(r.reverse(), k);
        assert_eq!(k.three_tuple().src_port(), 0);
        assert!(FlowKey::from_ips("10.0.0.1".parse().unwrap(), "::1".parse().unwrap(), 6, 1, 2).is_none());
    }
}
