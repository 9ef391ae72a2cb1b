//! Internet checksums (RFC 1071) and their incremental update (RFC 1624).
//!
//! The rewrite changes a handful of 16-bit words (addresses, ports, TTL) and patches every checksum
//! that covers them with [`ChecksumDelta`], which costs a few additions whatever the payload size.
//! A full sum ([`sum`], [`finish`]) is only taken over headers the rewrite builds itself (the outer
//! IPv4 header of a tunnel) and for the outer UDP checksum of GUE over IPv6, which covers the whole
//! inner packet.

/// The one's-complement difference of the 16-bit words a rewrite replaced, to patch a checksum with
/// RFC 1624 equation 3: `HC' = ~(~HC + ~m + m')`.
///
/// Words are read in one [`WordOrder`] (the checksum patched too: big-endian unless said otherwise)
/// and must sit at even offsets from the start of what the checksum covers (true of every address,
/// port and TTL/protocol word the rewrite touches). Replacing a 32-bit word at once is the same as
/// replacing its two halves, since one's-complement sums fold alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChecksumDelta(u64);

/// The byte order a checksum's words are read and written in. A one's-complement sum of
/// byte-swapped words is the byte-swapped sum (RFC 1071 2(B)), so a checksum patched in either
/// order is the same, as long as its old value, the words a [`ChecksumDelta`] records and the value
/// written all take the same order.
pub trait WordOrder {
    /// The 16-bit word of `bytes`.
    fn word16(bytes: [u8; 2]) -> u16;
    /// The bytes of the 16-bit word `word`.
    fn bytes16(word: u16) -> [u8; 2];
    /// The two 16-bit words of `bytes`, as one.
    fn word32(bytes: [u8; 4]) -> u32;
}

/// Network byte order, the order the checksum is defined in.
#[derive(Debug)]
pub enum BigEndian {}

/// The machine's own order: nothing swapped (on a little-endian machine every big-endian read and
/// write is a byte swap).
#[derive(Debug)]
pub enum NativeEndian {}

impl WordOrder for BigEndian {
    #[inline(always)]
    fn word16(bytes: [u8; 2]) -> u16 {
        u16::from_be_bytes(bytes)
    }
    #[inline(always)]
    fn bytes16(word: u16) -> [u8; 2] {
        word.to_be_bytes()
    }
    #[inline(always)]
    fn word32(bytes: [u8; 4]) -> u32 {
        u32::from_be_bytes(bytes)
    }
}

impl WordOrder for NativeEndian {
    #[inline(always)]
    fn word16(bytes: [u8; 2]) -> u16 {
        u16::from_ne_bytes(bytes)
    }
    #[inline(always)]
    fn bytes16(word: u16) -> [u8; 2] {
        word.to_ne_bytes()
    }
    #[inline(always)]
    fn word32(bytes: [u8; 4]) -> u32 {
        u32::from_ne_bytes(bytes)
    }
}

impl ChecksumDelta {
    /// Records that the word `old` became `new`.
    #[inline]
    pub fn replace16(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Records that a word's first byte, at least 1, fell by one (an IPv4 header's TTL, beside its
    /// protocol), the word read in order `O`: `!old + new` is then `0xffff - O::word16([1, 0])`
    /// whatever the word, so the old word need not be read (the general `replace16` cost ~10
    /// instructions more a full-NAT packet, callgrind).
    #[inline]
    pub fn decrement_first_byte<O: WordOrder>(&mut self) {
        self.0 += u64::from(0xffff - O::word16([1, 0]));
    }

    /// Records that the two words `old` became `new`.
    #[inline]
    pub fn replace32(&mut self, old: u32, new: u32) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Records that the bytes `old` became `new` (an address: `N` is a multiple of 4).
    #[inline]
    pub fn replace_array<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        for (o, n) in old.chunks_exact(4).zip(new.chunks_exact(4)) {
            self.replace32(be32(o), be32(n));
        }
    }

    /// Records that `old` became `new`, word by word. The slices have the same length; an odd last
    /// byte counts as the high byte of a word, as in the checksum itself.
    #[inline]
    pub fn replace(&mut self, old: &[u8], new: &[u8]) {
        self.0 += u64::from(!fold(sum(old))) + u64::from(fold(sum(new)));
    }

    /// Adds the changes recorded in `other`.
    #[inline]
    pub fn add(&mut self, other: ChecksumDelta) {
        self.0 += other.0;
    }

    /// `checksum` patched for the recorded changes.
    #[inline]
    pub fn apply(self, checksum: u16) -> u16 {
        !fold(u64::from(!checksum) + self.0)
    }
}

fn be32(b: &[u8]) -> u32 {
    match b {
        &[a, b, c, d] => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, not yet folded (below 2^35 for any
/// frame; add sums, then [`fold`]). An odd last byte is padded with zero. It adds 64-bit words with
/// end-around carry, which folds to the same 16-bit sum (RFC 1071 §2(C)) at a quarter of the
/// additions: this is the one loop over a whole packet (the outer UDP checksum of GUE over IPv6).
#[inline]
pub fn sum(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut carries = 0u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let v = <[u8; 8]>::try_from(w).map(u64::from_be_bytes).unwrap_or(0);
        let (s, c) = acc.overflowing_add(v);
        acc = s;
        carries += u64::from(c);
    }
    let mut tail = 0u64;
    for pair in words.remainder().chunks(2) {
        let hi = pair.first().copied().unwrap_or(0);
        let lo = pair.get(1).copied().unwrap_or(0);
        tail += u64::from(u16::from_be_bytes([hi, lo]));
    }
    // 2^64 = 1 modulo 0xffff, so each carry out of the 64-bit sum counts as 1.
    (acc >> 32) + (acc & 0xffff_ffff) + carries + tail
}

/// Folds an unfolded sum to 16 bits (end-around carry), in constant time.
///
/// A word plus itself rotated by half its width holds, in its upper half, the sum of its two
/// halves with end-around carry (the carry out of the lower half's sum comes in at the bottom of
/// the upper half's). Two such steps, 64 to 32 and 32 to 16 bits, give what four plain
/// halving steps gave (8 instructions rather than 12, twice a full-NAT packet, callgrind).
#[inline]
pub fn fold(acc: u64) -> u16 {
    let a = (acc.wrapping_add(acc.rotate_left(32)) >> 32) as u32;
    (a.wrapping_add(a.rotate_left(16)) >> 16) as u16
}

/// The checksum field value for an unfolded sum: its folded complement.
#[inline]
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// Unfolded sum of the TCP/UDP pseudo-header: addresses (4 or 16 bytes each), protocol and length.
#[inline]
pub fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u64 {
    sum(src) + sum(dst) + u64::from(proto) + u64::from(len >> 16) + u64::from(len & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `decrement_first_byte` records what `replace16` records, in either byte order, for every word
    /// whose first byte falls by one.
    #[test]
    fn decrement_first_byte_is_replace16_of_the_decrement() {
        fn check<O: WordOrder>() {
            for first in 1..=255u8 {
                for second in 0..=255u8 {
                    let (mut a, mut b) = (ChecksumDelta(7), ChecksumDelta(7));
                    a.replace16(O::word16([first, second]), O::word16([first - 1, second]));
                    b.decrement_first_byte::<O>();
                    assert_eq!(a, b, "{first} {second}");
                }
            }
        }
        check::<BigEndian>();
        check::<NativeEndian>();
    }

    /// The worked example of RFC 1071 §3: words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn rfc1071_example() {
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&b)), 0xddf2);
        assert_eq!(finish(sum(&b)), !0xddf2);
        // Odd length: the last byte is the high byte of a zero-padded word.
        assert_eq!(fold(sum(&[0x00, 0x01, 0xf2])), 0xf201);
    }

    /// A known IPv4 header (Wikipedia's "IPv4 header checksum" example): checksum b861.
    #[test]
    fn ipv4_header_checksum() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(finish(sum(&h)), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(fold(sum(&h)), 0xffff, "a correct header sums to all ones");
    }

    /// The 64-bit sum agrees with a plain 16-bit word sum on every length and alignment of tail.
    #[test]
    fn wide_sum_matches_word_sum() {
        let data: alloc::vec::Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8 | 0x80).collect();
        for n in 0..data.len() {
            let b = &data[..n];
            let mut words = 0u64;
            for pair in b.chunks(2) {
                words += u64::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
            }
            assert_eq!(fold(sum(b)), fold(words), "length {n}");
        }
        assert_eq!(fold(sum(&[0xff; 64])), 0xffff);
        assert_eq!(fold(u64::MAX), 0xffff);
    }

    /// The two rotating steps of `fold` give what repeated halving gives, for every kind of sum:
    /// zero stays 0, any other value lands in 1..=0xffff by its value modulo 0xffff.
    #[test]
    fn fold_matches_halving() {
        fn halving(acc: u64) -> u16 {
            let mut a = acc;
            while a > 0xffff {
                a = (a >> 16) + (a & 0xffff);
            }
            a as u16
        }
        let mut edges = alloc::vec![0, 1, 0xfffe, 0xffff, 0x1_0000, 0x1_fffe, 0xffff_ffff, 0x1_0000_0000, u64::MAX];
        for shift in 0..64 {
            edges.extend([1u64 << shift, (1u64 << shift) - 1, (1u64 << shift).wrapping_add(0xffff)]);
        }
        // And a pseudo-random walk over the whole range (an LCG, reproducible).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            edges.extend([x, x >> 13, x >> 29, x >> 47]);
        }
        for acc in edges {
            assert_eq!(fold(acc), halving(acc), "{acc:#x}");
        }
    }

    /// Incremental update equals recomputation, including the RFC 1624 corner where the old
    /// checksum is 0xffff-equivalent.
    #[test]
    fn incremental_matches_full_recompute() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        let mut d = ChecksumDelta::default();
        let new_src = [10, 1, 2, 3];
        d.replace_array(&[h[12], h[13], h[14], h[15]], &new_src);
        d.replace16(0x4011, 0x3f11); // TTL 64 -> 63
        h[12..16].copy_from_slice(&new_src);
        h[8] = 0x3f;
        let patched = d.apply(0xb861);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(patched, finish(sum(&h)));
    }
}
