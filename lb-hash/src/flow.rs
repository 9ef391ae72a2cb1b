//! Flow hashing: a seedable 64-bit hash of a flow key that is the same on every node, architecture
//! and release, so that load-balancer nodes behind one ECMP router agree on every flow's backend.
//!
//! # The algorithm (version 2; a change is a breaking release)
//!
//! All arithmetic is on unsigned 64-bit words, wrapping; `fold(a, b)` is the 128-bit product `a * b`
//! with its high and low 64-bit halves XORed together; `rotl(s, 23)` rotates `s` left by 23 bits.
//!
//! ```text
//! K0 = 0x243f6a8885a308d3  K1 = 0x13198a2e03707344  K2 = 0xa4093822299f31d0  K3 = 0x082efa98ec4e6c89
//! T  = 0x9e3779b97f4a7c15
//! s  = seed ^ (kind * T)                      kind: the 16-bit tag of the key kind (table below)
//! for each pair (a, b) of key words, in order (an odd last word is paired with b = 0):
//!     s = fold(a ^ s ^ K0, b ^ rotl(s, 23) ^ K1)
//! hash = fold(s ^ K2, K3)
//! ```
//!
//! Key words: an IPv4 address is its 32-bit big-endian value `A`; an IPv6 address is two words, the
//! high and low halves `H, L` of its 128-bit big-endian value; `P = proto << 32 | sport << 16 | dport`.
//!
//! | key | kind (IPv4 / IPv6) | words (IPv4) | words (IPv6) |
//! |---|---|---|---|
//! | 5-tuple (src, dst, proto, sport, dport) | 0x0401 / 0x0601 | `src << 32 \| dst`, `P` | `Hs, Ls, Hd, Ld, P` |
//! | 3-tuple (src, dst, proto), for fragments | 0x0402 / 0x0602 | `src << 32 \| dst`, `proto` | `Hs, Ls, Hd, Ld, proto` |
//! | source only (affinity, "sh") | 0x0403 / 0x0603 | `src` | `Hs, Ls` |
//! | destination only ("dh") | 0x0404 / 0x0604 | `dst` | `Hd, Ld` |
//! | (src, dst), for L3 ECMP | 0x0405 / 0x0605 | `src << 32 \| dst` | `Hs, Ls, Hd, Ld` |
//!
//! The `IpAddr` forms call the IPv4 or IPv6 form; when the two addresses differ in family (no real
//! packet does that) the IPv4 one is taken as its IPv4-mapped IPv6 address `::ffff:a.b.c.d`.
//! The hash is not symmetric: swapping source and destination gives a different answer.
//!
//! # Why this shape
//! One 64x64->128 multiply per two key words (the "folded multiply" of foldhash and wyhash): an IPv4
//! 5-tuple costs two multiplies, an IPv6 one four, a few nanoseconds (BENCHMARKS.md). All output bits
//! depend on all input bits, so both `hash % M` (Maglev, low bits) and `hash * n >> 64` (hash-threshold,
//! high bits) are well spread. It is not a keyed PRF: someone who knows the seed can craft colliding
//! keys, so keep the seed out of reach when that matters.
//!
//! The running state `s` goes into both operands of each product. A product is 0 when either operand
//! is, and a zero state forgets the seed and every word before it; with `s` in both operands that takes
//! `a == s ^ K0` or `b == rotl(s, 23) ^ K1`, values that depend on the seed. The second operand takes
//! `s` rotated, not `s` itself, because the product commutes: with `b ^ s ^ K1` the pairs `(a, b)` and
//! `(b ^ K0 ^ K1, a ^ K0 ^ K1)` would swap operands and collide under every seed. With the rotation the
//! swapped pair is `(b ^ d ^ K0 ^ K1, a ^ d ^ K0 ^ K1)`, `d = s ^ rotl(s, 23)`, again seed-dependent
//! (an odd rotation, so `d` takes 2^63 values, where a 32-bit one would leave 2^32).
//!
//! Version 1 computed `s = fold(a ^ s ^ K0, b ^ K1)`: a second pair word equal to the public `K1`
//! zeroed the state whatever the seed. An IPv6 source with interface ID K1 got a 5-tuple hash that
//! ignored the seed and its prefix (so it could predict which backend each of its source ports
//! reaches), a VIP with that interface ID did the same for every client, and IPv6 backends with that
//! interface ID and one port shared a [`crate::BackendId`].

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x1319_8a2e_0370_7344;
const K2: u64 = 0xa409_3822_299f_31d0;
const K3: u64 = 0x082e_fa98_ec4e_6c89;
const T: u64 = 0x9e37_79b9_7f4a_7c15;

/// Which key a hash is over; the tag keeps different key kinds of the same words apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum KeyKind {
    /// IPv4 5-tuple.
    FiveTupleV4 = 0x0401,
    /// IPv4 3-tuple (fragments).
    ThreeTupleV4 = 0x0402,
    /// IPv4 source address.
    SourceV4 = 0x0403,
    /// IPv4 destination address.
    DestinationV4 = 0x0404,
    /// IPv4 (source, destination).
    SrcDstV4 = 0x0405,
    /// IPv6 5-tuple.
    FiveTupleV6 = 0x0601,
    /// IPv6 3-tuple (fragments).
    ThreeTupleV6 = 0x0602,
    /// IPv6 source address.
    SourceV6 = 0x0603,
    /// IPv6 destination address.
    DestinationV6 = 0x0604,
    /// IPv6 (source, destination).
    SrcDstV6 = 0x0605,
    /// A backend identity derived from an IPv6 address and port ([`crate::BackendId`]).
    BackendV6 = 0x0b06,
    /// A backend identity, hashed into Maglev's permutation offset.
    MaglevOffset = 0x0b10,
    /// A backend identity, hashed into Maglev's permutation skip.
    MaglevSkip = 0x0b11,
    /// A backend identity, hashed into its rendezvous key.
    Rendezvous = 0x0b20,
}

/// `a * b` as 128 bits, high half XOR low half.
#[inline(always)]
const fn fold(a: u64, b: u64) -> u64 {
    let product = (a as u128) * (b as u128);
    #[expect(clippy::cast_possible_truncation, reason = "taking the low half on purpose")]
    let low = product as u64;
    low ^ (product >> 64) as u64
}

#[inline(always)]
fn hash_words(seed: u64, kind: KeyKind, words: &[u64]) -> u64 {
    let mut s = seed ^ (kind as u64).wrapping_mul(T);
    let mut pairs = words.chunks_exact(2);
    for pair in &mut pairs {
        s = fold(pair[0] ^ s ^ K0, pair[1] ^ s.rotate_left(23) ^ K1);
    }
    if let [last] = pairs.remainder() {
        s = fold(last ^ s ^ K0, s.rotate_left(23) ^ K1);
    }
    fold(s ^ K2, K3)
}

#[inline(always)]
fn v6_words(ip: Ipv6Addr) -> [u64; 2] {
    let bits = ip.to_bits();
    #[expect(clippy::cast_possible_truncation, reason = "splitting 128 bits into two words")]
    [(bits >> 64) as u64, bits as u64]
}

#[inline(always)]
fn ports_word(proto: u8, sport: u16, dport: u16) -> u64 {
    u64::from(proto) << 32 | u64::from(sport) << 16 | u64::from(dport)
}

#[inline(always)]
fn pair_v4(src: Ipv4Addr, dst: Ipv4Addr) -> u64 {
    u64::from(src.to_bits()) << 32 | u64::from(dst.to_bits())
}

/// Both addresses in one family: IPv4 if both are, else both as IPv6 (IPv4-mapped where needed).
enum Family {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

#[inline(always)]
fn family(src: IpAddr, dst: IpAddr) -> Family {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Family::V4(s, d),
        (s, d) => Family::V6(to_v6(s), to_v6(d)),
    }
}

#[inline(always)]
fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The flow hash with its seed; cheap to copy, holds nothing else.
///
/// All nodes of one deployment must use the same seed. See the module comment for the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowHasher {
    seed: u64,
}

impl Default for FlowHasher {
    fn default() -> Self {
        Self::new(Self::DEFAULT_SEED)
    }
}

impl FlowHasher {
    /// The seed used when a deployment does not pick one (the ASCII bytes of "lb-flow1").
    pub const DEFAULT_SEED: u64 = 0x6c62_2d66_6c6f_7731;

    /// A hasher with `seed`.
    #[must_use]
    pub const fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The seed.
    #[must_use]
    pub const fn seed(&self) -> u64 {
        self.seed
    }

    /// The hash of raw key words under `kind` (the documented algorithm, for keys not covered below).
    #[must_use]
    #[inline]
    pub fn words(&self, kind: KeyKind, words: &[u64]) -> u64 {
        hash_words(self.seed, kind, words)
    }

    /// IPv4 5-tuple (src, dst, proto, sport, dport).
    #[must_use]
    #[inline]
    pub fn five_tuple_v4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> u64 {
        hash_words(self.seed, KeyKind::FiveTupleV4, &[pair_v4(src, dst), ports_word(proto, sport, dport)])
    }

    /// IPv6 5-tuple (src, dst, proto, sport, dport).
    #[must_use]
    #[inline]
    pub fn five_tuple_v6(&self, src: Ipv6Addr, dst: Ipv6Addr, proto: u8, sport: u16, dport: u16) -> u64 {
        let [hs, ls] = v6_words(src);
        let [hd, ld] = v6_words(dst);
        hash_words(self.seed, KeyKind::FiveTupleV6, &[hs, ls, hd, ld, ports_word(proto, sport, dport)])
    }

    /// 5-tuple of either family.
    #[must_use]
    #[inline]
    pub fn five_tuple(&self, src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> u64 {
        match family(src, dst) {
            Family::V4(s, d) => self.five_tuple_v4(s, d, proto, sport, dport),
            Family::V6(s, d) => self.five_tuple_v6(s, d, proto, sport, dport),
        }
    }

    /// IPv4 3-tuple (src, dst, proto): for fragments, which carry no ports after the first.
    #[must_use]
    #[inline]
    pub fn three_tuple_v4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> u64 {
        hash_words(self.seed, KeyKind::ThreeTupleV4, &[pair_v4(src, dst), u64::from(proto)])
    }

    /// IPv6 3-tuple (src, dst, proto).
    #[must_use]
    #[inline]
    pub fn three_tuple_v6(&self, src: Ipv6Addr, dst: Ipv6Addr, proto: u8) -> u64 {
        let [hs, ls] = v6_words(src);
        let [hd, ld] = v6_words(dst);
        hash_words(self.seed, KeyKind::ThreeTupleV6, &[hs, ls, hd, ld, u64::from(proto)])
    }

    /// 3-tuple of either family.
    #[must_use]
    #[inline]
    pub fn three_tuple(&self, src: IpAddr, dst: IpAddr, proto: u8) -> u64 {
        match family(src, dst) {
            Family::V4(s, d) => self.three_tuple_v4(s, d, proto),
            Family::V6(s, d) => self.three_tuple_v6(s, d, proto),
        }
    }

    /// IPv4 source address only: source-IP affinity ("sh").
    #[must_use]
    #[inline]
    pub fn source_v4(&self, src: Ipv4Addr) -> u64 {
        hash_words(self.seed, KeyKind::SourceV4, &[u64::from(src.to_bits())])
    }

    /// IPv6 source address only.
    #[must_use]
    #[inline]
    pub fn source_v6(&self, src: Ipv6Addr) -> u64 {
        hash_words(self.seed, KeyKind::SourceV6, &v6_words(src))
    }

    /// Source address of either family.
    #[must_use]
    #[inline]
    pub fn source(&self, src: IpAddr) -> u64 {
        match src {
            IpAddr::V4(s) => self.source_v4(s),
            IpAddr::V6(s) => self.source_v6(s),
        }
    }

    /// IPv4 destination address only ("dh").
    #[must_use]
    #[inline]
    pub fn destination_v4(&self, dst: Ipv4Addr) -> u64 {
        hash_words(self.seed, KeyKind::DestinationV4, &[u64::from(dst.to_bits())])
    }

    /// IPv6 destination address only.
    #[must_use]
    #[inline]
    pub fn destination_v6(&self, dst: Ipv6Addr) -> u64 {
        hash_words(self.seed, KeyKind::DestinationV6, &v6_words(dst))
    }

    /// Destination address of either family.
    #[must_use]
    #[inline]
    pub fn destination(&self, dst: IpAddr) -> u64 {
        match dst {
            IpAddr::V4(d) => self.destination_v4(d),
            IpAddr::V6(d) => self.destination_v6(d),
        }
    }

    /// IPv4 (src, dst): L3 ECMP next-hop choice.
    #[must_use]
    #[inline]
    pub fn src_dst_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> u64 {
        hash_words(self.seed, KeyKind::SrcDstV4, &[pair_v4(src, dst)])
    }

    /// IPv6 (src, dst).
    #[must_use]
    #[inline]
    pub fn src_dst_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> u64 {
        let [hs, ls] = v6_words(src);
        let [hd, ld] = v6_words(dst);
        hash_words(self.seed, KeyKind::SrcDstV6, &[hs, ls, hd, ld])
    }

    /// (src, dst) of either family.
    #[must_use]
    #[inline]
    pub fn src_dst(&self, src: IpAddr, dst: IpAddr) -> u64 {
        match family(src, dst) {
            Family::V4(s, d) => self.src_dst_v4(s, d),
            Family::V6(s, d) => self.src_dst_v6(s, d),
        }
    }
}

/// The Murmur3 64-bit finalizer: a bijective mix used to derive per-backend scores from a flow hash.
#[inline(always)]
pub(crate) const fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// The module comment's algorithm written again from the text, independently of the code above:
    /// key words built from octets, the 128-bit product done by 32-bit schoolbook multiplication.
    fn reference(seed: u64, kind: u16, words: &[u64]) -> u64 {
        fn mul_fold(a: u64, b: u64) -> u64 {
            let (a0, a1, b0, b1) = (a & 0xffff_ffff, a >> 32, b & 0xffff_ffff, b >> 32);
            let (p00, p01, p10, p11) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
            let mid = (p00 >> 32) + (p01 & 0xffff_ffff) + (p10 & 0xffff_ffff);
            let low = (p00 & 0xffff_ffff) | (mid << 32);
            let high = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
            low ^ high
        }
        let mut s = seed ^ u64::from(kind).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut i = 0;
        while i < words.len() {
            let a = words[i];
            let b = words.get(i + 1).copied().unwrap_or(0);
            #[expect(clippy::manual_rotate, reason = "spelled out from the text, not with the code's rotate_left")]
            let rotl23 = s << 23 | s >> 41;
            s = mul_fold(a ^ s ^ 0x243f_6a88_85a3_08d3, b ^ rotl23 ^ 0x1319_8a2e_0370_7344);
            i += 2;
        }
        mul_fold(s ^ 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89)
    }

    fn be(octets: &[u8]) -> u64 {
        octets.iter().fold(0, |acc, &o| acc << 8 | u64::from(o))
    }

    fn v6(octets: [u8; 16]) -> Ipv6Addr {
        Ipv6Addr::from(octets)
    }

    #[test]
    fn matches_the_documented_algorithm() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        let mut next = || {
            x = fmix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            x
        };
        for _ in 0..2000 {
            let seed = next();
            let h = FlowHasher::new(seed);
            let r = next().to_be_bytes();
            let (s4, d4) = ([r[0], r[1], r[2], r[3]], [r[4], r[5], r[6], r[7]]);
            let (proto, sport, dport) = (r[0], u16::from_be_bytes([r[1], r[2]]), u16::from_be_bytes([r[3], r[4]]));
            let mut s6 = [0u8; 16];
            let mut d6 = [0u8; 16];
            s6[..8].copy_from_slice(&next().to_be_bytes());
            s6[8..].copy_from_slice(&next().to_be_bytes());
            d6[..8].copy_from_slice(&next().to_be_bytes());
            d6[8..].copy_from_slice(&next().to_be_bytes());
            let ports = be(&[proto, (sport >> 8) as u8, sport as u8, (dport >> 8) as u8, dport as u8]);
            let (src, dst) = (Ipv4Addr::from(s4), Ipv4Addr::from(d4));
            let pair = be(&[s4[0], s4[1], s4[2], s4[3], d4[0], d4[1], d4[2], d4[3]]);
            let w6: Vec<u64> = [&s6[..8], &s6[8..], &d6[..8], &d6[8..]].iter().map(|o| be(o)).collect();

            assert_eq!(h.five_tuple_v4(src, dst, proto, sport, dport), reference(seed, 0x0401, &[pair, ports]));
            assert_eq!(h.three_tuple_v4(src, dst, proto), reference(seed, 0x0402, &[pair, u64::from(proto)]));
            assert_eq!(h.source_v4(src), reference(seed, 0x0403, &[be(&s4)]));
            assert_eq!(h.destination_v4(dst), reference(seed, 0x0404, &[be(&d4)]));
            assert_eq!(h.src_dst_v4(src, dst), reference(seed, 0x0405, &[pair]));

            let (src, dst) = (v6(s6), v6(d6));
            let five = [w6[0], w6[1], w6[2], w6[3], ports];
            assert_eq!(h.five_tuple_v6(src, dst, proto, sport, dport), reference(seed, 0x0601, &five));
            let three = [w6[0], w6[1], w6[2], w6[3], u64::from(proto)];
            assert_eq!(h.three_tuple_v6(src, dst, proto), reference(seed, 0x0602, &three));
            assert_eq!(h.source_v6(src), reference(seed, 0x0603, &w6[..2]));
            assert_eq!(h.destination_v6(dst), reference(seed, 0x0604, &w6[2..]));
            assert_eq!(h.src_dst_v6(src, dst), reference(seed, 0x0605, &w6));
        }
    }

    #[test]
    fn ipaddr_forms_pick_the_family_and_map_mixed_pairs() {
        let h = FlowHasher::default();
        let a4 = Ipv4Addr::new(192, 0, 2, 1);
        let b4 = Ipv4Addr::new(198, 51, 100, 2);
        let b6: Ipv6Addr = "2001:db8::2".parse().expect("literal");
        assert_eq!(h.five_tuple(a4.into(), b4.into(), 6, 1, 2), h.five_tuple_v4(a4, b4, 6, 1, 2));
        assert_eq!(h.five_tuple(a4.into(), b6.into(), 6, 1, 2), h.five_tuple_v6(a4.to_ipv6_mapped(), b6, 6, 1, 2));
        assert_eq!(h.three_tuple(b6.into(), b6.into(), 17), h.three_tuple_v6(b6, b6, 17));
        assert_eq!(h.src_dst(a4.into(), b4.into()), h.src_dst_v4(a4, b4));
        assert_eq!(h.source(b6.into()), h.source_v6(b6));
        assert_eq!(h.destination(a4.into()), h.destination_v4(a4));
    }

    #[test]
    fn direction_kind_and_seed_all_matter() {
        let h = FlowHasher::default();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        assert_ne!(h.five_tuple_v4(a, b, 6, 1000, 80), h.five_tuple_v4(b, a, 6, 80, 1000));
        assert_ne!(h.source_v4(a), h.destination_v4(a));
        assert_ne!(h.three_tuple_v4(a, b, 6), h.five_tuple_v4(a, b, 6, 0, 0));
        assert_ne!(h.source_v4(a), FlowHasher::new(1).source_v4(a));
    }

    /// Seeds and /64 prefixes for the tests below.
    const SEEDS: [u64; 4] = [FlowHasher::DEFAULT_SEED, 0, 1, 0xfedc_ba98_7654_3210];
    const PREFIXES: [u64; 4] =
        [0x2001_0db8_0000_0000, 0x2001_0db8_0000_0001, 0x2001_0db8_ffff_0000, 0xfd00_0000_0000_0000];

    /// The address `prefix::iid`: high 64 bits `prefix`, interface ID (low 64 bits) `iid`.
    fn addr(prefix: u64, iid: u64) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(prefix) << 64 | u128::from(iid))
    }

    /// Asserts that all `hashes` differ: each is over a different (seed, key), so an equal pair means
    /// the hash lost the seed or a key word.
    fn assert_all_differ(what: &str, hashes: &[u64]) {
        let mut sorted = hashes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), hashes.len(), "{what}: equal hashes for different seeds or keys: {hashes:#018x?}");
    }

    /// Version 1 multiplied the second word of a pair by `b ^ K1` alone, so an interface ID equal to the
    /// public K1 zeroed the state: the hash forgot the seed and the prefix, and a client could predict
    /// its backend. The state is now in both operands, so the word values that zero it depend on the seed.
    #[test]
    fn a_source_interface_id_equal_to_k1_keeps_seed_and_prefix() {
        let dst = addr(0x2001_0db8_0001_0000, 0x7);
        let hashes: Vec<u64> = SEEDS
            .iter()
            .flat_map(|&seed| {
                PREFIXES.iter().map(move |&p| FlowHasher::new(seed).five_tuple_v6(addr(p, K1), dst, 6, 40_000, 443))
            })
            .collect();
        assert_all_differ("five_tuple_v6, source ::K1", &hashes);
        let hashes: Vec<u64> = SEEDS
            .iter()
            .flat_map(|&seed| PREFIXES.iter().map(move |&p| FlowHasher::new(seed).source_v6(addr(p, K1))))
            .collect();
        assert_all_differ("source_v6, ::K1", &hashes);
    }

    /// The same for a destination (a VIP) with interface ID K1: in version 1 it zeroed the state for
    /// every client, so the hash ignored the seed, the client's address and the VIP's prefix.
    #[test]
    fn a_destination_interface_id_equal_to_k1_keeps_seed_source_and_prefix() {
        let sources =
            [addr(0x2001_0db8_00ff_0000, 0x7), addr(0x2001_0db8_00ff_0000, 0x8), addr(0x2001_0db8_00fe_0000, 0x7)];
        let mut hashes = Vec::new();
        for seed in SEEDS {
            for p in PREFIXES {
                for src in sources {
                    hashes.push(FlowHasher::new(seed).five_tuple_v6(src, addr(p, K1), 6, 40_000, 443));
                }
            }
        }
        assert_all_differ("five_tuple_v6, destination ::K1", &hashes);
    }

    /// The product commutes, so had both operands taken the state the same way (`a ^ s ^ K0`,
    /// `b ^ s ^ K1`), the pairs `(a, b)` and `(b ^ K0 ^ K1, a ^ K0 ^ K1)` would collide under every seed.
    /// The second operand takes the state rotated, which keeps the swap seed-dependent.
    #[test]
    fn swapping_the_operands_of_a_pair_is_not_a_seed_independent_collision() {
        for seed in SEEDS {
            let h = FlowHasher::new(seed);
            for (p, iid) in [(PREFIXES[0], 0x7), (PREFIXES[3], K1), (0, 0)] {
                let swapped = addr(iid ^ K0 ^ K1, p ^ K0 ^ K1);
                assert_ne!(h.source_v6(addr(p, iid)), h.source_v6(swapped), "seed {seed:#x}, {}", addr(p, iid));
            }
        }
    }

    /// Known answers of version 2, pinned: a change here is a new version and a breaking release, as
    /// nodes running different releases would send the same flow to different backends during an
    /// upgrade. The values agree with a separate (Python) implementation of the module comment.
    #[test]
    fn known_answers_are_stable_across_releases() {
        let h = FlowHasher::default();
        let a = Ipv4Addr::new(192, 0, 2, 10);
        let b = Ipv4Addr::new(203, 0, 113, 7);
        let a6: Ipv6Addr = "2001:db8::a".parse().expect("literal");
        let b6: Ipv6Addr = "2001:db8:1::7".parse().expect("literal");
        let got = [
            h.five_tuple_v4(a, b, 6, 49_152, 443),
            h.three_tuple_v4(a, b, 17),
            h.source_v4(a),
            h.destination_v4(b),
            h.src_dst_v4(a, b),
            h.five_tuple_v6(a6, b6, 6, 49_152, 443),
            h.three_tuple_v6(a6, b6, 17),
            h.source_v6(a6),
            h.destination_v6(b6),
            h.src_dst_v6(a6, b6),
            FlowHasher::new(0).five_tuple_v4(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, 0, 0, 0),
        ];
        assert_eq!(got, PINNED, "flow hash output changed: {got:#018x?}");
    }

    const PINNED: [u64; 11] = [
        0x8b1f_b3eb_ea0e_1ab4,
        0xc083_e437_61c7_c9f6,
        0x8648_6da8_4e48_9303,
        0xf768_0010_ca73_00c7,
        0xc049_8ac0_84f4_3c24,
        0x8a1e_2fe3_df22_0b16,
        0x2c65_80a3_a12b_2050,
        0x413f_5059_b2a4_ad9d,
        0xd613_fe0c_cfcc_db3f,
        0x0f91_7cc8_0b85_159f,
        0x231d_ad88_8848_a27d,
    ];
}
