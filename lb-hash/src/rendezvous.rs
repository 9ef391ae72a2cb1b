//! Weighted rendezvous hashing (highest random weight, Thaler & Ravishankar 1998): each serving
//! backend scores every flow, the best score wins. Removing a backend moves only the flows it won;
//! nothing else changes. A lookup costs one mix per backend, so it suits small backend sets.
//!
//! # Score
//! ```text
//! key_i = FlowHasher(seed 0).words(Rendezvous, [id_i])          (once, at build)
//! x_i   = fmix64(hash ^ key_i)                                  (Murmur3 finalizer)
//! u_i   = ((x_i >> 11) + 0.5) / 2^53                            (uniform in (0, 1))
//! winner = argmax_i  w_i / -ln(u_i)                             (the logarithmic method)
//! ```
//! With all weights equal the winner is the largest `x_i >> 11` (the same order, with no logarithm).
//! Ties go to the smaller identity. The logarithm is `libm`'s, a pure-Rust IEEE implementation, so the
//! answer is identical on every architecture.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::backend::{Backend, BackendId, position_of, sorted_backends};
use crate::error::BuildError;
use crate::flow::{FlowHasher, KeyKind, fmix64};
use crate::selector::Selector;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Scorer {
    key: u64,
    weight: f64,
    index: u32,
}

/// A built weighted rendezvous selector.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    backends: Box<[Backend]>,
    serving: Box<[Scorer]>,
    equal_weights: bool,
}

impl Rendezvous {
    /// Builds the selector for `backends`, given in any order.
    ///
    /// # Errors
    /// An empty set, a duplicate identity, all weights 0, more than `u32::MAX` backends.
    pub fn new(backends: &[Backend]) -> Result<Self, BuildError> {
        if u32::try_from(backends.len()).is_err() {
            return Err(BuildError::TooManyBackends {
                count: backends.len(),
                max: u32::MAX as usize,
                selector: "rendezvous",
            });
        }
        let backends = sorted_backends(backends)?;
        let hasher = FlowHasher::new(0);
        let serving: Vec<Scorer> = backends
            .iter()
            .zip(0u32..)
            .filter(|(b, _)| b.is_serving())
            .map(|(b, index)| Scorer {
                key: hasher.words(KeyKind::Rendezvous, &[b.id.0]),
                weight: f64::from(b.weight),
                index,
            })
            .collect();
        let equal_weights = serving.windows(2).all(|p| p[0].weight == p[1].weight);
        Ok(Self { backends, serving: serving.into_boxed_slice(), equal_weights })
    }

    /// The backends the selector was built from, sorted by identity (weight 0 ones included).
    #[must_use]
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The index of the backend with identity `id`.
    #[must_use]
    pub fn position(&self, id: BackendId) -> Option<u32> {
        position_of(&self.backends, id)
    }

    /// The winning backend's index for a flow hash.
    #[must_use]
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        if self.equal_weights {
            let mut best: Option<(u64, u32)> = None;
            for s in &*self.serving {
                let x = fmix64(hash ^ s.key) >> 11;
                if best.is_none_or(|(b, _)| x > b) {
                    best = Some((x, s.index));
                }
            }
            best.map(|(_, i)| i)
        } else {
            // Smallest -ln(u) / w is the largest w / -ln(u).
            let mut best: Option<(f64, u32)> = None;
            for s in &*self.serving {
                #[expect(clippy::cast_precision_loss, reason = "a 53-bit integer is exact in f64")]
                let u = ((fmix64(hash ^ s.key) >> 11) as f64 + 0.5) * (1.0 / 9_007_199_254_740_992.0);
                let cost = -libm::log(u) / s.weight;
                if best.is_none_or(|(b, _)| cost < b) {
                    best = Some((cost, s.index));
                }
            }
            best.map(|(_, i)| i)
        }
    }
}

impl Selector for Rendezvous {
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
    fn refuses_bad_sets() {
        assert_eq!(Rendezvous::new(&[]), Err(BuildError::NoBackends));
        assert_eq!(Rendezvous::new(&[Backend::new(1, 0)]), Err(BuildError::AllWeightsZero { count: 1 }));
    }

    #[test]
    fn weights_set_the_share_and_drained_get_nothing() {
        let r = Rendezvous::new(&[Backend::new(30, 1), Backend::new(10, 3), Backend::new(20, 0)]).expect("valid");
        let mut counts = [0u32; 3];
        for i in 0..40_000u64 {
            let idx = r.lookup(fmix64(i)).expect("serving backend exists");
            counts[idx as usize] += 1;
        }
        // Sorted: 10 (w 3), 20 (drained), 30 (w 1): expected 30 000 / 0 / 10 000.
        assert_eq!(counts[1], 0);
        assert!((29_000..31_000).contains(&counts[0]), "{counts:?}");
        assert!((9_000..11_000).contains(&counts[2]), "{counts:?}");
    }
}
