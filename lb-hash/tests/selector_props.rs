//! Property tests for rendezvous, jump and ECMP selection.
#![allow(missing_docs)]

use std::collections::BTreeSet;

use lb_hash::{AnySelector, Backend, EcmpHashThreshold, JumpHash, Rendezvous, Selector, jump_consistent_hash};
use proptest::prelude::*;

fn ids(n: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::btree_set(any::<u64>(), n).prop_map(|s: BTreeSet<u64>| s.into_iter().collect())
}

proptest! {
    /// Removing a backend moves only the flows that backend had; every other flow stays put.
    #[test]
    fn rendezvous_removal_moves_only_that_backends_keys(
        ids in ids(2..=30),
        weights in prop::collection::vec(1u32..=10, 30),
        equal in any::<bool>(),
        which in any::<prop::sample::Index>(),
        keys in prop::collection::vec(any::<u64>(), 300),
    ) {
        let set: Vec<Backend> =
            ids.iter().zip(&weights).map(|(&id, &w)| Backend::new(id, if equal { 1 } else { w })).collect();
        let removed = set[which.index(set.len())].id;
        let survivors: Vec<Backend> = set.iter().copied().filter(|b| b.id != removed).collect();
        let before = Rendezvous::new(&set).expect("valid set");
        let after = Rendezvous::new(&survivors).expect("valid set");
        for &k in &keys {
            let old = before.backends()[before.lookup(k).expect("serving") as usize].id;
            let new = after.backends()[after.lookup(k).expect("serving") as usize].id;
            prop_assert_ne!(new, removed);
            if old != removed {
                prop_assert_eq!(old, new, "key {:#x} moved though its backend stayed", k);
            }
        }
    }

    /// Growing from n to n + 1 buckets moves only keys that land in the new bucket.
    #[test]
    fn jump_growth_moves_keys_only_into_the_new_bucket(n in 1u32..2000, keys in prop::collection::vec(any::<u64>(), 300)) {
        for &k in &keys {
            let old = jump_consistent_hash(k, n).expect("n > 0");
            let new = jump_consistent_hash(k, n + 1).expect("n > 0");
            prop_assert!(old < n);
            prop_assert!(new == old || new == n, "key {k:#x}: {old} -> {new} with {n} -> {} buckets", n + 1);
        }
    }

    /// Every selector returns an index below its length and never a draining backend.
    #[test]
    fn selectors_return_serving_indices(
        ids in ids(1..=20),
        weights in prop::collection::vec(0u32..=3, 20),
        keys in prop::collection::vec(any::<u64>(), 100),
    ) {
        let mut set: Vec<Backend> = ids.iter().zip(&weights).map(|(&id, &w)| Backend::new(id, w)).collect();
        if set.iter().all(|b| b.weight == 0) {
            set[0].weight = 1;
        }
        let sorted = Rendezvous::new(&set).expect("valid set").backends().to_vec();
        let selectors: Vec<AnySelector> = vec![
            lb_hash::MaglevTable::new(&set, lb_hash::maglev_table_size_for(set.len())).expect("valid set").into(),
            Rendezvous::new(&set).expect("valid set").into(),
            EcmpHashThreshold::new(&set).expect("valid set").into(),
            lb_hash::EcmpModulo::new(&set).expect("valid set").into(),
        ];
        for s in &selectors {
            prop_assert_eq!(s.len(), set.len());
            for &k in &keys {
                let i = s.select(k).expect("a serving backend exists") as usize;
                prop_assert!(i < s.len());
                prop_assert!(sorted[i].weight > 0, "{s:?} picked drained index {i}");
            }
        }
        let jump = AnySelector::from(JumpHash::new(set.len() as u32).expect("buckets"));
        for &k in &keys {
            prop_assert!((jump.select(k).expect("buckets") as usize) < set.len());
        }
    }

    /// Hash-threshold: the next hop's share of the hash space matches its weight (regions are
    /// contiguous, so evenly spaced hashes measure it exactly up to one step per boundary).
    #[test]
    fn hash_threshold_regions_are_weighted(weights in prop::collection::vec(1u32..=50, 1..=12)) {
        let set: Vec<Backend> = weights.iter().enumerate().map(|(i, &w)| Backend::new(i as u64, w)).collect();
        let e = EcmpHashThreshold::new(&set).expect("valid set");
        let steps = 1u64 << 16;
        let mut counts = vec![0u64; set.len()];
        let mut last = 0;
        for i in 0..steps {
            let idx = e.lookup(i << 48).expect("serving") as usize;
            prop_assert!(idx >= last, "regions must be contiguous and in identity order");
            last = idx;
            counts[idx] += 1;
        }
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        for (i, &c) in counts.iter().enumerate() {
            let ideal = steps as f64 * f64::from(weights[i]) / total as f64;
            prop_assert!((c as f64 - ideal).abs() <= 1.0, "next hop {i}: {c} vs {ideal}");
        }
    }
}
