//! Jump consistent hash (Lamping & Veach, 2014): maps a key to one of `n` numbered buckets with no
//! table at all; growing from `n` to `n + 1` buckets moves only the keys that land in the new one.
//!
//! Buckets are numbers, not identities: the caller keeps the numbering (bucket `n` must stay bucket `n`
//! on every node), and only the last bucket can be removed without moving others. Weights do not apply.
//! For sets that change in the middle, use [`crate::MaglevTable`] or [`crate::Rendezvous`].

use crate::error::BuildError;
use crate::selector::Selector;

/// The bucket in `0..buckets` for `key`, exactly as the paper's code computes it (IEEE f64 arithmetic,
/// the same on every architecture); `None` when `buckets` is 0.
#[must_use]
#[inline]
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> Option<u32> {
    if buckets == 0 {
        return None;
    }
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        #[expect(clippy::cast_precision_loss, reason = "the paper's algorithm converts to double")]
        let step = (1u64 << 31) as f64 / ((key >> 33) + 1) as f64;
        #[expect(clippy::cast_possible_truncation, reason = "the paper truncates towards zero")]
        #[expect(clippy::cast_precision_loss, reason = "the paper's algorithm converts to double")]
        {
            j = ((b + 1) as f64 * step) as i64;
        }
    }
    u32::try_from(b).ok()
}

/// Jump consistent hash over `buckets` numbered buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JumpHash {
    buckets: u32,
}

impl JumpHash {
    /// A selector over buckets `0..buckets`.
    ///
    /// # Errors
    /// [`BuildError::NoBackends`] when `buckets` is 0.
    pub fn new(buckets: u32) -> Result<Self, BuildError> {
        if buckets == 0 {
            return Err(BuildError::NoBackends);
        }
        Ok(Self { buckets })
    }

    /// The number of buckets.
    #[must_use]
    pub const fn buckets(&self) -> u32 {
        self.buckets
    }
}

impl Selector for JumpHash {
    #[inline]
    fn select(&self, hash: u64) -> Option<u32> {
        jump_consistent_hash(hash, self.buckets)
    }

    fn len(&self) -> usize {
        self.buckets as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers_from_the_reference_implementation() {
        // Answers published with other implementations of the paper's code (Rust jumphash crates,
        // the Python `jump` package, a TypeScript port), so ours agrees with the rest of the world.
        assert_eq!(jump_consistent_hash(123_456, 1000), Some(984));
        assert_eq!(jump_consistent_hash(256, 1024), Some(520));
        assert_eq!(jump_consistent_hash(10_863_919_174_838_991, 11), Some(6));
        assert_eq!(jump_consistent_hash(2_016_238_256_797_177_309, 11), Some(3));
        assert_eq!(jump_consistent_hash(0, 1), Some(0));
        assert_eq!(jump_consistent_hash(0, 0), None);
        assert_eq!(JumpHash::new(0), Err(BuildError::NoBackends));
    }
}
