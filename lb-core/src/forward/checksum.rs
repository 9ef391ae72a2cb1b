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
/// Words are big-endian and must sit at even offsets from the start of what the checksum covers
/// (true of every address, port and TTL/protocol word the rewrite touches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChecksumDelta(u64);

impl ChecksumDelta {
    /// Records that the word `old` became `new`.
    #[inline]
    pub fn replace16(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Records that `old` became `new`, word by word. The slices have the same, even length (an odd
    /// last byte counts as the high byte of a word, as in the checksum itself).
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

    /// True if nothing changed.
    pub fn is_empty(self) -> bool {
        fold(self.0) == 0 || fold(self.0) == 0xffff
    }
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, unfolded (an odd last byte is padded
/// with zero). Summing 32-bit words into a 64-bit accumulator gives the same folded result (RFC 1071
/// §2(C)) at half the additions.
#[inline]
pub fn sum(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut words = bytes.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut rest = words.remainder().chunks(2);
    for w in &mut rest {
        let hi = w.first().copied().unwrap_or(0);
        let lo = w.get(1).copied().unwrap_or(0);
        acc += u64::from(u16::from_be_bytes([hi, lo]));
    }
    acc
}

/// Folds an unfolded sum to 16 bits (end-around carry).
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 0xffff.
    u16::try_from(acc).unwrap_or(0xffff)
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
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
            0xa8, 0x00, 0xc7,
        ];
        assert_eq!(finish(sum(&h)), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(fold(sum(&h)), 0xffff, "a correct header sums to all ones");
    }

    /// Incremental update equals recomputation, including the RFC 1624 corner where the old
    /// checksum is 0xffff-equivalent.
    #[test]
    fn incremental_matches_full_recompute() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
            0xa8, 0x00, 0xc7,
        ];
        let mut d = ChecksumDelta::default();
        let new_src = [10, 1, 2, 3];
        d.replace(&h[12..16], &new_src);
        d.replace16(0x4011, 0x3f11); // TTL 64 -> 63
        h[12..16].copy_from_slice(&new_src);
        h[8] = 0x3f;
        let patched = d.apply(0xb861);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(patched, finish(sum(&h)));
        assert!(!d.is_empty());
        assert!(ChecksumDelta::default().is_empty());
    }
}
