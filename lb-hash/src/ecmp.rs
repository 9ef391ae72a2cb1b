//! L3 ECMP next-hop selection: which of several equal-cost next hops carries a flow.
//!
//! - [`EcmpHashThreshold`] (RFC 2992): the 64-bit hash space is cut into one contiguous region per
//!   next hop, sized by weight; a flow goes to the region its hash falls in. Adding or removing a next
//!   hop moves only flows near region boundaries (about half as many as modulo-N in the worst case).
//! - [`EcmpModulo`] (modulo-N): next hop `hash % n`. Cheapest, but a change of `n` moves most flows.
//!
//! Both sort next hops by identity, skip weight-0 (draining) ones, and return indices into the sorted
//! slice, so every router computes the same choice.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::backend::{Backend, BackendId, position_of, sorted_backends};
use crate::error::BuildError;
use crate::selector::Selector;

fn serving_indices(backends: &[Backend]) -> Result<Box<[u32]>, BuildError> {
    if u32::try_from(backends.len()).is_err() {
        return Err(BuildError::TooManyBackends { count: backends.len(), max: u32::MAX as usize, selector: "ECMP" });
    }
    Ok(backends.iter().zip(0u32..).filter(|(b, _)| b.is_serving()).map(|(_, i)| i).collect())
}

/// Hash-threshold next-hop selection (RFC 2992), weighted.
///
/// With total weight `W`, the hash is scaled to `s = hash * W >> 64` (in `0..W`) and the next hop is the
/// one whose cumulative-weight range holds `s`. With equal weights that is `hash * n >> 64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcmpHashThreshold {
    backends: Box<[Backend]>,
    serving: Box<[u32]>,
    /// Cumulative weight at the end of each serving next hop's range.
    ends: Box<[u64]>,
    total: u64,
    equal_weights: bool,
}

impl EcmpHashThreshold {
    /// Builds the selector for `next_hops`, given in any order.
    ///
    /// # Errors
    /// An empty set, a duplicate identity, all weights 0, more than `u32::MAX` next hops.
    pub fn new(next_hops: &[Backend]) -> Result<Self, BuildError> {
        let backends = sorted_backends(next_hops)?;
        let serving = serving_indices(&backends)?;
        let mut total = 0u64;
        let ends: Vec<u64> = serving
            .iter()
            .filter_map(|&i| backends.get(i as usize))
            .map(|b| {
                total += u64::from(b.weight);
                total
            })
            .collect();
        let equal_weights = serving
            .windows(2)
            .all(|p| backends.get(p[0] as usize).map(|b| b.weight) == backends.get(p[1] as usize).map(|b| b.weight));
        Ok(Self { backends, serving, ends: ends.into_boxed_slice(), total, equal_weights })
    }

    /// The next hops the selector was built from, sorted by identity.
    #[must_use]
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The index of the next hop with identity `id`.
    #[must_use]
    pub fn position(&self, id: BackendId) -> Option<u32> {
        position_of(&self.backends, id)
    }

    /// The next hop's index for a flow hash.
    #[must_use]
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        let region = if self.equal_weights {
            (u128::from(hash) * self.serving.len() as u128) >> 64
        } else {
            let scaled = (u128::from(hash) * u128::from(self.total)) >> 64;
            self.ends.partition_point(|&end| u128::from(end) <= scaled) as u128
        };
        usize::try_from(region).ok().and_then(|r| self.serving.get(r)).copied()
    }
}

impl Selector for EcmpHashThreshold {
    #[inline]
    fn select(&self, hash: u64) -> Option<u32> {
        self.lookup(hash)
    }

    fn len(&self) -> usize {
        self.backends.len()
    }
}

/// Modulo-N next-hop selection: serving next hop number `hash % n`. Weights other than 0 are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcmpModulo {
    backends: Box<[Backend]>,
    serving: Box<[u32]>,
}

impl EcmpModulo {
    /// Builds the selector for `next_hops`, given in any order.
    ///
    /// # Errors
    /// An empty set, a duplicate identity, all weights 0, more than `u32::MAX` next hops.
    pub fn new(next_hops: &[Backend]) -> Result<Self, BuildError> {
        let backends = sorted_backends(next_hops)?;
        let serving = serving_indices(&backends)?;
        Ok(Self { backends, serving })
    }

    /// The next hops the selector was built from, sorted by identity.
    #[must_use]
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The index of the next hop with identity `id`.
    #[must_use]
    pub fn position(&self, id: BackendId) -> Option<u32> {
        position_of(&self.backends, id)
    }

    /// The next hop's index for a flow hash.
    #[must_use]
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        let n = self.serving.len() as u64;
        if n == 0 {
            return None;
        }
        usize::try_from(hash % n).ok().and_then(|r| self.serving.get(r)).copied()
    }
}

impl Selector for EcmpModulo {
    #[inline]
    fn select(&self, hash: u64) -> Option<u32> {
        self.lookup(hash)
    }

    fn len(&self) -> usize {
        self.backends.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_threshold_regions_follow_the_rfc() {
        // Four equal next hops: regions are quarters of the hash space, in identity order.
        let e = EcmpHashThreshold::new(&[
            Backend::new(40, 1),
            Backend::new(10, 1),
            Backend::new(30, 1),
            Backend::new(20, 1),
        ])
        .expect("valid");
        assert_eq!(e.lookup(0), Some(0));
        assert_eq!(e.lookup((1 << 62) - 1), Some(0));
        assert_eq!(e.lookup(1 << 62), Some(1));
        assert_eq!(e.lookup(1 << 63), Some(2));
        assert_eq!(e.lookup(u64::MAX), Some(3));
    }

    #[test]
    fn hash_threshold_weights_and_drain() {
        // Weights 1, 0 (drained), 3: the first quarter goes to index 0, the rest to index 2.
        let e = EcmpHashThreshold::new(&[Backend::new(1, 1), Backend::new(2, 0), Backend::new(3, 3)]).expect("valid");
        assert_eq!(e.lookup((1 << 62) - 1), Some(0));
        assert_eq!(e.lookup(1 << 62), Some(2));
        assert_eq!(e.lookup(u64::MAX), Some(2));
    }

    #[test]
    fn modulo_skips_drained_next_hops() {
        let e = EcmpModulo::new(&[Backend::new(9, 1), Backend::new(5, 0), Backend::new(7, 4)]).expect("valid");
        // Sorted: 5 (drained), 7, 9; serving are indices 1 and 2.
        assert_eq!(e.lookup(10), Some(1));
        assert_eq!(e.lookup(11), Some(2));
        assert_eq!(EcmpModulo::new(&[]), Err(BuildError::NoBackends));
    }
}
