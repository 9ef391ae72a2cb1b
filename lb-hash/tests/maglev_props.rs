//! Property tests for the Maglev table: balance, disruption, determinism, drain.
#![allow(missing_docs)]

use std::collections::BTreeSet;

use lb_hash::{Backend, BackendId, MaglevTable, is_prime, maglev_table_size_for};
use proptest::prelude::*;

#[path = "common/disruption.rs"]
mod disruption;

use disruption::{mean, percentile};

/// The disruption sample of the tests below: a fixed seed per (n, m), so every run checks the same sets.
fn disruption_sample(n: usize, m: u32, sets: usize) -> Vec<f64> {
    disruption::sample(n, m, sets, 0x2545_f491_4f6c_dd1d_u64 ^ (n as u64) << 32 ^ u64::from(m)).expect("valid sets")
}

/// Unique backend identities.
fn ids(n: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::btree_set(any::<u64>(), n).prop_map(|s: BTreeSet<u64>| s.into_iter().collect())
}

/// A prime table size in `[lo, 2 lo]`, picked by `pick`.
fn prime_at_least(lo: u32, pick: u32) -> u32 {
    let mut m = lo + pick % lo;
    while !is_prime(m) {
        m += 1;
    }
    m
}

/// The owner identity of every slot.
fn owners(t: &MaglevTable) -> Vec<BackendId> {
    t.entries().iter().map(|&e| t.backends()[usize::from(e)].id).collect()
}

/// Entries whose owner changed from `before` to `after`, and the fewest that had to: the sum, over
/// identities, of the entries each owned that the new quotas no longer give it.
fn moved_and_needed(before: &MaglevTable, after: &MaglevTable) -> (u32, u32) {
    let (old, new) = (owners(before), owners(after));
    let moved = old.iter().zip(&new).filter(|(a, b)| a != b).count() as u32;
    let mut change = std::collections::BTreeMap::<BackendId, i64>::new();
    for id in &old {
        *change.entry(*id).or_default() += 1;
    }
    for id in &new {
        *change.entry(*id).or_default() -= 1;
    }
    let needed = change.values().filter(|&&d| d > 0).sum::<i64>() as u32;
    (moved, needed)
}

/// At the default size, few entries move between survivors: under 0.5 % on average and under 1 %
/// for 99 % of removals, for small and large sets (the long tail of single removals above 1 % is
/// rarer than one in a hundred; see the `maglev` module comment).
#[test]
fn disruption_at_the_default_size_is_under_one_percent_at_the_99th_percentile() {
    let m = MaglevTable::DEFAULT_SIZE;
    for (n, sets) in [(3, 100), (4, 75), (8, 50), (12, 40), (30, 25), (200, 10)] {
        let s = disruption_sample(n, m, sets);
        let (avg, p99) = (mean(&s), percentile(&s, 0.99));
        println!(
            "N = {n}, M = {m}, {} removals: mean {avg:.3} %, p99 {p99:.3} %, max {:.3} %",
            s.len(),
            s[s.len() - 1]
        );
        assert!(avg <= 0.5, "N = {n}: mean {avg} % of the table moved between survivors");
        assert!(p99 <= 1.0, "N = {n}: 99th percentile {p99} % of the table moved between survivors");
    }
}

/// At the smallest recommended size, `M = 100 N` (`maglev_table_size_for`), the mean stays under 1 %
/// from N = 100 up; at N = 10 (M = 1009) it is above the 1 % no rule with exact quotas can reach
/// there (about 1.1 %; see the `maglev` module comment) and stays under 2 %.
#[test]
fn disruption_at_one_hundred_entries_per_backend() {
    for (n, sets, bound) in [(10, 100, 2.0), (100, 10, 1.0), (200, 5, 1.0)] {
        let m = maglev_table_size_for(n);
        let s = disruption_sample(n, m, sets);
        let avg = mean(&s);
        println!("N = {n}, M = {m}, {} removals: mean {avg:.3} %, max {:.3} %", s.len(), s[s.len() - 1]);
        assert!(avg <= bound, "N = {n}, M = {m}: mean {avg} % of the table moved between survivors");
    }
}

/// Entries moved beyond what the new quotas force (in % of the table) for each of `sets` random sets
/// of `n` backends of weights 1 to 1000 at the default size, under one random change each: a
/// removal, an addition, a weight change, the heaviest's weight change (which changes every other
/// backend's turn rate). Sorted; a fixed seed per `n`, so every run checks the same sets.
fn weighted_excess_sample(n: usize, sets: usize) -> Vec<f64> {
    let m = MaglevTable::DEFAULT_SIZE;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (n as u64) << 40;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut excess = Vec::with_capacity(sets * 4);
    for _ in 0..sets {
        let set: Vec<Backend> = (0..n).map(|_| Backend::new(next(), (next() % 1000 + 1) as u32)).collect();
        let before = MaglevTable::new(&set, m).expect("valid set");
        let k = (next() % n as u64) as usize;
        let heaviest = set.iter().enumerate().max_by_key(|&(_, b)| b.weight).map_or(0, |(i, _)| i);
        for change in 0..4 {
            let mut changed = set.clone();
            let w = (next() % 1000 + 1) as u32;
            match change {
                0 => drop(changed.remove(k)),
                1 => changed.push(Backend::new(next(), w)),
                2 => changed[k].weight = w,
                _ => changed[heaviest].weight = w,
            }
            let after = MaglevTable::new(&changed, m).expect("valid set");
            let (moved, needed) = moved_and_needed(&before, &after);
            excess.push(f64::from(moved - needed) / f64::from(m) * 100.0);
        }
    }
    excess.sort_by(f64::total_cmp);
    excess
}

/// With unequal weights, a removal, an addition or a weight change moves few entries beyond those
/// the new quotas force. Like the equal-weight disruption above this is a distribution, not a
/// bound: pairs of backends with related permutations (equal skips the extreme case) make a long
/// tail, longer with weights, since a weight change moves the boundary between such a pair along
/// their whole shared walk (measured: a 3-backend set whose first and third share skip 14466 at
/// M = 65537 moves 18.5 % of the table for a weight change of 325 to 300 that forces 1.9 %).
#[test]
fn weighted_disruption_beyond_the_forced_moves_is_small_on_average() {
    for (n, sets, mean_bound, p99_bound) in [(3, 60, 1.5, 4.0), (8, 40, 1.5, 2.0), (30, 15, 1.5, 2.0)] {
        let s = weighted_excess_sample(n, sets);
        let (avg, p99) = (mean(&s), percentile(&s, 0.99));
        println!("N = {n}, {} changes: mean {avg:.3} %, p99 {p99:.3} %, max {:.3} %", s.len(), s[s.len() - 1]);
        assert!(avg <= mean_bound, "N = {n}: mean {avg} % of the table moved beyond the forced moves");
        assert!(p99 <= p99_bound, "N = {n}: 99th percentile {p99} % of the table moved beyond the forced moves");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every backend's entry count is within one entry of its weighted ideal M w / W, so for
    /// M >= 100 x N and equal weights within 1 % of M / N.
    #[test]
    fn balance_within_one_entry_of_the_weighted_ideal(
        ids in ids(1..=60),
        weights in prop::collection::vec(0u32..=1000, 60),
        equal in any::<bool>(),
        pick in any::<u32>(),
    ) {
        let mut set: Vec<Backend> = ids
            .iter()
            .zip(&weights)
            .map(|(&id, &w)| Backend::new(id, if equal { 1 } else { w }))
            .collect();
        if set.iter().all(|b| b.weight == 0) {
            set[0].weight = 1;
        }
        let m = prime_at_least(100 * ids.len() as u32, pick);
        let t = MaglevTable::new(&set, m).expect("valid set");
        let total: f64 = t.backends().iter().map(|b| f64::from(b.weight)).sum();
        for (b, &count) in t.backends().iter().zip(&t.entry_counts()) {
            let ideal = f64::from(m) * f64::from(b.weight) / total;
            prop_assert!((f64::from(count) - ideal).abs() < 1.0, "backend {} has {count}, ideal {ideal}", b.id);
            if equal {
                prop_assert!((f64::from(count) / ideal - 1.0).abs() <= 0.01, "backend {} has {count}, ideal {ideal}", b.id);
            }
            if b.weight == 0 {
                prop_assert_eq!(count, 0);
            }
        }
    }

    /// Any order of the same backends gives a byte-identical table.
    #[test]
    fn any_order_gives_the_same_table(ids in ids(1..=50), seed in any::<u64>(), weighted in any::<bool>()) {
        let set: Vec<Backend> = ids
            .iter()
            .map(|&id| Backend::new(id, if weighted { (id % 7) as u32 + 1 } else { 1 }))
            .collect();
        let mut shuffled = set.clone();
        // Fisher-Yates with a fixed generator driven by the case's seed.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let m = maglev_table_size_for(set.len());
        let a = MaglevTable::new(&set, m).expect("valid set");
        let b = MaglevTable::new(&shuffled, m).expect("valid set");
        prop_assert_eq!(a.entries(), b.entries());
        prop_assert_eq!(a.backends(), b.backends());
    }

    /// Removing a backend moves all of its entries (to survivors only), and adding it back restores
    /// the table exactly, for any set. How many other entries move is a distribution, checked on
    /// fixed samples below.
    #[test]
    fn removing_a_backend_moves_its_entries_and_adding_it_back_restores(
        ids in ids(2..=200),
        which in any::<prop::sample::Index>(),
        pick in any::<u32>(),
    ) {
        let set: Vec<Backend> = ids.iter().map(|&id| Backend::new(id, 1)).collect();
        let m = prime_at_least(100 * set.len() as u32, pick);
        let removed = set[which.index(set.len())].id;
        let survivors: Vec<Backend> = set.iter().copied().filter(|b| b.id != removed).collect();

        let before = MaglevTable::new(&set, m).expect("valid set");
        let after = MaglevTable::new(&survivors, m).expect("valid set");
        let changes = after.changes_from(&before);
        let own = before.entry_counts()[before.position(removed).expect("in set") as usize];
        prop_assert_eq!(changes.departed, own);
        prop_assert_eq!(changes.arrived, 0);
        prop_assert!(changes.between_stayed < m);

        let mut back = survivors.clone();
        back.push(Backend::new(removed.0, 1));
        let restored = MaglevTable::new(&back, m).expect("valid set");
        prop_assert_eq!(restored.entries(), before.entries());
    }

    /// Draining (weight 0) gives exactly the table without the backend, by owner identity, while
    /// the drained backend keeps its index.
    #[test]
    fn drain_equals_removal(ids in ids(2..=40), which in any::<prop::sample::Index>()) {
        let set: Vec<Backend> = ids.iter().map(|&id| Backend::new(id, 3)).collect();
        let k = which.index(set.len());
        let mut drained = set.clone();
        drained[k].weight = 0;
        let without: Vec<Backend> = set.iter().copied().filter(|b| b.id != set[k].id).collect();
        let m = maglev_table_size_for(set.len());
        let a = MaglevTable::new(&drained, m).expect("valid set");
        let b = MaglevTable::new(&without, m).expect("valid set");
        prop_assert_eq!(owners(&a), owners(&b));
        prop_assert_eq!(a.position(set[k].id).map(|i| a.backends()[i as usize].weight), Some(0));
    }

    /// Bad input is an error value, never a panic.
    #[test]
    fn any_input_builds_or_errs(
        raw in prop::collection::vec((0u64..8, 0u32..3), 0..8),
        m in 0u32..3000,
    ) {
        let set: Vec<Backend> = raw.iter().map(|&(id, w)| Backend::new(id, w)).collect();
        if let Ok(t) = MaglevTable::new(&set, m) {
            prop_assert_eq!(t.entries().len(), m as usize);
            prop_assert!(t.entries().iter().all(|&e| t.backends()[usize::from(e)].weight > 0));
        }
    }
}

proptest! {
    // A fixed seed: this bounds a distribution with a long tail, not an exact property. How often a
    // random change exceeds the bound is not known (the worst of 20 000 at N = 3 came to four fifths
    // of it), and with a new seed each run any rate above zero fails CI now and then. These 48
    // changes pass on every run, and permutations that depend on the weights fail them.
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d61_676c_6576_7774),
        ..ProptestConfig::default()
    })]

    /// With unequal weights, removing a backend, adding one or changing one's weight (the heaviest's
    /// too, which changes every other backend's turn rate) never reshuffles the table: the entries
    /// that move beyond those the new quotas force stay under a quarter of those plus a quarter of
    /// the table. Not tighter: pairs of backends with related permutations make a long tail (see
    /// `weighted_disruption_beyond_the_forced_moves_is_small_on_average`; over 20 000 random changes
    /// at N = 3, one set with two equal skips moved 24 % beyond 22 % forced). Permutations that
    /// depended on the weights would move about half the table and fail this.
    #[test]
    fn weighted_changes_move_little_beyond_what_the_quotas_force(
        ids in ids(3..=31),
        weights in prop::collection::vec(1u32..=1000, 31),
        which in any::<prop::sample::Index>(),
        change in 0u8..4,
        new_weight in 1u32..=1000,
    ) {
        let mut set: Vec<Backend> = ids.iter().zip(&weights).map(|(&id, &w)| Backend::new(id, w)).collect();
        // The last identity is the one added; the others make the set before.
        let newcomer = set.pop().expect("at least 3 identities");
        let k = which.index(set.len());
        let heaviest = set.iter().enumerate().max_by_key(|&(_, b)| b.weight).map(|(i, _)| i).expect("not empty");
        let mut changed = set.clone();
        match change {
            0 => { changed.remove(k); }
            1 => changed.push(Backend::new(newcomer.id.0, new_weight)),
            2 => changed[k].weight = new_weight,
            _ => changed[heaviest].weight = new_weight,
        }
        let m = MaglevTable::DEFAULT_SIZE;
        let before = MaglevTable::new(&set, m).expect("valid set");
        let after = MaglevTable::new(&changed, m).expect("valid set");
        let (moved, needed) = moved_and_needed(&before, &after);
        let bound = needed + needed / 4 + m / 4;
        prop_assert!(
            moved <= bound,
            "{moved} entries moved where {needed} had to (bound {bound}); weights {:?}, change {change}",
            set.iter().map(|b| b.weight).collect::<Vec<_>>()
        );
    }
}
