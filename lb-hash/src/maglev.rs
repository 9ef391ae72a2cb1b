//! Weighted Maglev (Eisenbud et al., NSDI'16): a lookup table of `M` entries, `M` prime, each entry
//! naming a backend; a flow goes to `table[hash % M]`.
//!
//! # Building the table
//! Every serving backend (weight > 0) has a permutation of the table's slots derived from its
//! [`BackendId`] alone, so every node computes the same one:
//!
//! ```text
//! offset = FlowHasher(seed 0).words(MaglevOffset, [id]) % M
//! skip   = FlowHasher(seed 0).words(MaglevSkip,   [id]) % (M - 1) + 1
//! permutation[j] = (offset + j * skip) % M          (a full cycle because M is prime)
//! ```
//!
//! Backends, sorted by identity, take turns in rounds. On its turn a backend **visits the next slot
//! of its permutation and claims it if it is free**; a backend whose quota is met stops. Weights
//! enter in two places:
//! - **quota**: backend `i` ends with exactly `floor(M * w_i / W)` entries, plus one for the
//!   `M - sum(floor)` backends with the largest remainders (ties to the smaller identity), so every
//!   backend is within one entry of its weighted ideal `M * w_i / W`;
//! - **turn rate**: each round a backend gains `ceil(64 * w_i / w_max)` credits and takes a turn per
//!   64 credits, so a light backend walks its permutation more slowly than a heavy one.
//!
//! The paper's rule differs in one point: there a backend walks on, in the same turn, to the first
//! free slot of its permutation. Here a visit to a taken slot uses the turn. This makes the table a
//! stable assignment (a slot goes to the backend that reaches it earliest in its own permutation), and
//! it halves the entries that move between surviving backends when one is removed; measured
//! over random identities (mean / worst of 20 to 60 sets, as `examples/maglev_disruption.rs` counts):
//!
//! | N, M | paper's rule | this rule |
//! |---|---|---|
//! | 10, 1009 | 2.55 % / 3.77 % | 1.45 % / 2.68 % |
//! | 100, 10007 | 1.60 % / 2.25 % | 0.80 % / 1.05 % |
//! | 200, 20011 | 1.54 % / 1.73 % | 0.70 % / 0.82 % |
//! | 1000, 100003 | 0.57 % / 0.61 % | 0.31 % / 0.33 % |
//! | 100, 65537 | 0.58 % / 1.60 % | 0.30 % / 0.37 % |
//!
//! # How much moves, and why not below 1 % in every case
//! `examples/maglev_disruption.rs` removes backends one at a time from many random sets and prints
//! the share of the table that moved between survivors (`cargo run --release -p lb-hash --example
//! maglev_disruption -- N M SETS`; 2026-11-23, up to four removals per set):
//!
//! | N, M | removals | mean | p99 | p99.9 | max |
//! |---|---|---|---|---|---|
//! | 3, 65537 | 6000 | 0.011 % | 0.11 % | 1.15 % | 1.89 % |
//! | 4, 65537 | 8000 | 0.034 % | 0.23 % | 1.03 % | 4.59 % |
//! | 12, 65537 | 4000 | 0.17 % | 0.40 % | 0.84 % | 1.62 % |
//! | 30, 65537 | 3200 | 0.24 % | 0.36 % | 0.70 % | 1.14 % |
//! | 200, 65537 | 240 | 0.34 % | 0.39 % | 0.41 % | 0.41 % |
//! | 10, 1009 | 4000 | 1.42 % | 2.68 % | 5.25 % | 9.12 % |
//! | 100, 10007 | 800 | 0.78 % | 0.96 % | 1.02 % | 1.06 % |
//! | 1000, 100003 | 40 | 0.30 % | 0.32 % | 0.32 % | 0.32 % |
//!
//! Two limits keep this from "at most 1 % for every removal whenever `M >= 100 N`":
//! - **A floor at small `M`.** Balance within one entry forces the removed backend's `M / N` entries
//!   to be shared out exactly evenly. Which survivor comes first for a freed entry is pseudo-random,
//!   so each survivor inherits its share plus or minus about `sigma = sqrt(M / N^2)` entries, and the
//!   ones above their share must hand the excess to the ones below: about `0.4 (N - 1) sigma`, roughly
//!   `0.4 sqrt(M)` entries, move between survivors under *any* rule built on pseudo-random
//!   permutations and exact quotas. That is 1.1 % of the table at N = 10, M = 1009 (this rule: 1.4 %),
//!   and it is below 1 % only from `M` of about 1600 up. So at `M = 100 N` with `N` below ~16 the
//!   1 % cannot be met on average, let alone in every case.
//! - **Correlated permutations.** Permutations `offset + j * skip` are linear, so any two backends'
//!   walks are related by an affine map of their indices; for some pairs (equal skips are the extreme
//!   case, probability about `N^2 / 2M` per set) the two compete for the same runs of slots and a
//!   removal elsewhere shifts the boundary between them. That is the long tail above (up to 4.6 % at
//!   N = 4, M = 65537; for backends 0, 1872500205781721582 and 12988412332294560676 at M = 103651,
//!   the last two sharing skip 97743, removing one moves 3.8 %, 12.2 % and 0.35 %; 23.8 %, 7.6 % and
//!   3.7 % with the paper's rule). An experiment with a non-linear family, `offset + h * g^j` for a
//!   per-backend generator `g` of the multiplicative group, had no removal above 0.44 % at M = 65537
//!   (6600 removals, N = 3 to 8, though with higher means there: 0.06 % against 0.01 % at N = 3;
//!   within 0.03 points of this rule's means for N = 30 to 300), but each step
//!   needs a modular multiply and the tail phase below a discrete logarithm per (backend, free slot),
//!   which would give up the build speed; not adopted. With connection tracking in front (lb-core),
//!   moved entries only affect flows that have no entry on the node.
//!
//! What is tested (`tests/maglev_props.rs`): for any set, removal moves all of the removed backend's
//! entries and adding it back restores the table exactly; on fixed samples of random sets, at
//! `M = 65537` the mean stays under 0.5 % and the 99th percentile under 1 % for N from 3 to 200, and at
//! `M = 100 N` the mean stays under 1 % from N = 100 up and under 2 % at N = 10.
//! With unequal weights (a removal, an addition, a weight change, the heaviest's included), the
//! entries that move beyond those the new quotas force average 0.5 to 1.1 % of the table at
//! `M = 65537` (p99 1.5 % from N = 8 up, 3.6 % at N = 3). The correlated pairs below make the tail
//! longer than with equal weights, since a weight change moves the boundary between such a pair
//! along their whole shared walk: at N = 3 with two equal skips, a weight change of 325 to 300 moved
//! 18.5 % of the table where 1.9 % had to move. Equal turn rates would avoid that but measured worse
//! on average (1.3 to 3.7 %), so the rates stay.
//!
//! # Why it is fast
//! Offsets and skips are computed once per backend; stepping along a permutation is a subtract and
//! a conditional add, chosen without a branch (no `%`); occupancy is a bitset of `M` bits (8 KiB for
//! 65537, in L1) rather than the table; a claim is written straight into the table, and a visit that
//! claims nothing writes to one extra entry, so a visit has no branch that depends on the slot. The
//! turns are simulated in three phases that give the same table (a unit test compares them):
//! 1. rounds, while more than `M / 32` slots are free: every turn visits one slot (finished backends
//!    are parked on an always-taken extra slot); with weights, runs of rounds in which no backend
//!    has credit for a turn are skipped, so a 64-to-1 skew does not cost 64 rounds per light turn;
//! 2. events (equal weights): a backend walks straight to its next free slot, four steps per loop
//!    computed side by side, and sleeps in a ring of per-round buckets until the round its turns
//!    reach it;
//! 3. the last 64 free slots: for each unfinished backend, the round at which its permutation reaches
//!    each free slot, via the inverse of its skip modulo `M`, instead of thousands of idle rounds.
//!
//! Entries are `u16`, so a 65537-entry table is 128 KiB. Lookup replaces the 64-bit division by
//! Lemire's exact "fastmod" (three multiplies), which gives the same `hash % M`.
//!
//! # Guarantees (property tests in `tests/maglev_props.rs`)
//! - the same table whatever order the backends come in;
//! - balance: every backend within one entry of `M * w_i / W` (so within 1 % of its weighted ideal
//!   for `M >= 100 x N` and equal weights);
//! - disruption: removing a backend moves all of its own entries, and adding it back restores the
//!   table exactly; how many others move is a distribution, not a bound (see above);
//! - draining (weight 0) gives the same owners as removing the backend.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::backend::{Backend, BackendId, position_of, sorted_backends};
use crate::error::BuildError;
use crate::flow::{FlowHasher, KeyKind};

/// Credits a backend needs for one turn; the turn rate of the heaviest backend.
const TURN: u8 = 64;

/// When this few slots are free, the fill switches from simulating turns to computing, for each
/// unfinished backend, the turn at which it next reaches a free slot (same result, fewer steps).
const TAIL_FREE_SLOTS: usize = 64;

/// With equal weights, the fill switches from rounds to events once `m / EVENTS_FROM` slots are free.
const EVENTS_FROM: usize = 32;

/// With weights, idle rounds in a row after which the fill skips to the next round with a turn.
/// Not 1: with mixed rates most idle runs are short, and a skip after each idle round made a build
/// of 1000 backends of weights 1 to 64 at M = 655373 50 % slower (measured; 4 is on par).
const IDLE_BEFORE_SKIP: u32 = 4;

/// Rounds of wake-ups held in the event ring (a power of two); later ones wait in a list.
const RING: usize = 4096;

/// Whether `n` is prime (trial division by 6k +- 1; at most ~10^4 steps for a `u32`).
#[must_use]
pub const fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d: u32 = 5;
    // d * d <= n, written without overflow.
    while d <= n / d {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime `>= n`, or the largest `u32` prime if there is none.
const fn next_prime(n: u32) -> u32 {
    let mut p = n;
    while !is_prime(p) {
        if p == u32::MAX {
            return 4_294_967_291;
        }
        p += 1;
    }
    p
}

/// The smallest prime `>= 100 x backends` (at least 101): a table size that keeps every backend
/// within 1 % of its share when weights are equal (within one entry, whatever the weights).
/// `backends` above [`MaglevTable::MAX_BACKENDS`] count as that maximum.
#[must_use]
pub const fn maglev_table_size_for(backends: usize) -> u32 {
    let n = if backends == 0 {
        1
    } else if backends > MaglevTable::MAX_BACKENDS {
        MaglevTable::MAX_BACKENDS
    } else {
        backends
    };
    #[expect(clippy::cast_possible_truncation, reason = "n <= 65536, so 100 n fits a u32")]
    next_prime(100 * n as u32)
}

/// A table size that stays the same while a backend set grows and shrinks: 65 537 (Maglev's and
/// Katran's default) up to 655 backends, 655 373 up to 6 553, 6 553 621 beyond; each keeps at least
/// 100 entries per backend. Prefer it to [`maglev_table_size_for`] when backends come and go: a
/// table of another size shares almost no entries with the old one (`hash % M` changes), so a size
/// that follows the count moves nearly every flow on every change. The price is memory: 128 KiB of
/// entries per table at the first step, however few the backends.
#[must_use]
pub const fn maglev_table_size_stable_for(backends: usize) -> u32 {
    if backends <= 655 {
        65_537
    } else if backends <= 6_553 {
        655_373
    } else {
        6_553_621
    }
}

/// A built Maglev lookup table: read-only, shared by the fast path, replaced whole.
#[derive(Clone, PartialEq, Eq)]
pub struct MaglevTable {
    backends: Box<[Backend]>,
    /// `size + 1` entries, the last always 0 (the fill's spare, see [`Slots`]); shared, so a clone
    /// (a control plane reusing an unchanged service's table) copies none.
    entries: Arc<[u16]>,
    size: u32,
    /// Lemire's `ceil(2^128 / size)`, for the exact `hash % size` without a division.
    fastmod: u128,
}

impl fmt::Debug for MaglevTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaglevTable")
            .field("size", &self.size)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

/// One serving backend's state while the table fills (16 bytes, so 1000 backends stay in L1).
#[derive(Clone, Copy)]
struct Filler {
    /// Next slot of its permutation it will visit.
    next: u32,
    /// `m - skip`: a step is `next - back`, plus `m` if that borrows.
    back: u32,
    /// Entries still to claim (its quota minus claims so far).
    left: u32,
    index: u16,
    /// Credits gained per round, `1..=TURN`; 0 once its quota is met.
    rate: u8,
    /// Credits held, `< TURN` between rounds.
    credit: u8,
}

impl MaglevTable {
    /// The table size used when none is given: prime, 2^16 + 1, good for up to 655 backends.
    pub const DEFAULT_SIZE: u32 = 65_537;
    /// The largest table size accepted (2^27 entries, 256 MiB of `u16`).
    pub const MAX_SIZE: u32 = 1 << 27;
    /// The most backends a table can index (entries are `u16`).
    pub const MAX_BACKENDS: usize = 1 << 16;

    /// Builds the table for `backends` with [`Self::DEFAULT_SIZE`] entries.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn with_default_size(backends: &[Backend]) -> Result<Self, BuildError> {
        Self::new(backends, Self::DEFAULT_SIZE)
    }

    /// Builds the table of `size` entries for `backends`, given in any order.
    ///
    /// # Errors
    /// `size` not prime, above [`Self::MAX_SIZE`] or below the number of serving backends; an empty
    /// backend set, a duplicate identity, all weights 0, more than [`Self::MAX_BACKENDS`] backends.
    pub fn new(backends: &[Backend], size: u32) -> Result<Self, BuildError> {
        if size > Self::MAX_SIZE {
            return Err(BuildError::TableSizeTooLarge { size, max: Self::MAX_SIZE });
        }
        if !is_prime(size) {
            return Err(BuildError::TableSizeNotPrime { size, next_prime: next_prime(size) });
        }
        if backends.len() > Self::MAX_BACKENDS {
            return Err(BuildError::TooManyBackends {
                count: backends.len(),
                max: Self::MAX_BACKENDS,
                selector: "Maglev",
            });
        }
        let backends = sorted_backends(backends)?;
        let serving = backends.iter().filter(|b| b.is_serving()).count();
        if (size as usize) < serving {
            return Err(BuildError::TableSizeTooSmall { size, backends: serving, min: maglev_table_size_for(serving) });
        }
        let entries = fill(&backends, size);
        Ok(Self { backends, entries, size, fastmod: fastmod_multiplier(size) })
    }

    /// The backend index for a flow hash: `entries()[hash % size()]`.
    #[must_use]
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        self.entries.get(self.slot(hash)).map(|&e| u32::from(e))
    }

    /// `hash % size()`, computed with Lemire's fastmod (exact for every 64-bit hash).
    #[must_use]
    #[inline]
    pub fn slot(&self, hash: u64) -> usize {
        // The result is < size <= MAX_SIZE, so it fits any usize of 32 bits or more.
        fastmod(hash, self.fastmod, self.size) as usize
    }

    /// The table size `M`.
    #[must_use]
    pub const fn size(&self) -> u32 {
        self.size
    }

    /// The entries: `entries()[slot]` is an index into [`Self::backends`].
    #[must_use]
    pub fn entries(&self) -> &[u16] {
        self.entries.get(..self.size as usize).unwrap_or_default()
    }

    /// The backends the table was built from, sorted by identity (weight 0 ones included).
    #[must_use]
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The index of the backend with identity `id`.
    #[must_use]
    pub fn position(&self, id: BackendId) -> Option<u32> {
        position_of(&self.backends, id)
    }

    /// How the entries changed owner from `before` to this table, by backend identity. With
    /// connection tracking in front, only flows without an entry feel a moved entry; this is the
    /// figure to log when a control plane swaps a table in.
    ///
    /// Tables of one size are compared entry by entry. Tables of two sizes (a resize, which moves
    /// nearly every flow) are compared flow by flow: both sizes are prime, so a flow's slots in the
    /// two, `hash % M` and `hash % M'`, are independent, and the share of flows that go from backend
    /// `a` to backend `b` is `a`'s share of `before` times `b`'s share of this table. Each count is
    /// then such shares, summed over the pairs of its cause, times this table's size, rounded: the
    /// entries of this table whose flows changed owner, on average over the flows.
    #[must_use]
    pub fn changes_from(&self, before: &Self) -> TableChanges {
        let (still_serving, served_before) = self.serving_in_both(before);
        if before.size != self.size {
            return self.changes_from_resized(before, &still_serving, &served_before);
        }
        let mut changes = TableChanges { departed: 0, arrived: 0, between_stayed: 0 };
        for (&old, &new) in before.entries().iter().zip(self.entries()) {
            let (old, new) = (usize::from(old), usize::from(new));
            if before.backends.get(old).map(|b| b.id) == self.backends.get(new).map(|b| b.id) {
                continue;
            }
            if !still_serving.get(old).copied().unwrap_or(false) {
                changes.departed += 1;
            } else if !served_before.get(new).copied().unwrap_or(false) {
                changes.arrived += 1;
            } else {
                changes.between_stayed += 1;
            }
        }
        changes
    }

    /// As [`Self::changes_from`] when flows are hashed anew for this table (by another key, say the
    /// client address rather than the whole flow, or with another seed): a flow's slots in the two
    /// tables are then independent whatever their sizes, so they are compared flow by flow as for a
    /// resize. Even the same table rehashed moves every flow but the share `sum c^2 / M^2` that
    /// lands on its old backend again (`c` each backend's entries).
    #[must_use]
    pub fn changes_from_rehashed(&self, before: &Self) -> TableChanges {
        let (still_serving, served_before) = self.serving_in_both(before);
        self.changes_from_resized(before, &still_serving, &served_before)
    }

    /// Per backend index, once: of `before`'s, whether each still serves in this table; of this
    /// table's, whether each served in `before`.
    fn serving_in_both(&self, before: &Self) -> (Vec<bool>, Vec<bool>) {
        let serves_in = |t: &Self, id: BackendId| {
            t.position(id).and_then(|i| t.backends.get(i as usize)).is_some_and(Backend::is_serving)
        };
        let still_serving = before.backends.iter().map(|b| serves_in(self, b.id)).collect();
        let served_before = self.backends.iter().map(|b| serves_in(before, b.id)).collect();
        (still_serving, served_before)
    }

    /// [`Self::changes_from`] for a `before` of another size, and [`Self::changes_from_rehashed`],
    /// from the entry counts alone: with `c`
    /// and `c'` a backend's entries in `before` (size `M`) and in this table (size `M'`), a flow goes
    /// from `a` to `b` with probability `c_a c'_b / (M M')`, so this table's entries' worth is
    /// `c_a c'_b / M`, summed over the pairs of each cause (less `sum c c' / M` for a backend kept
    /// with itself).
    fn changes_from_resized(&self, before: &Self, still_serving: &[bool], served_before: &[bool]) -> TableChanges {
        let (old_counts, new_counts) = (before.entry_counts(), self.entry_counts());
        let (m0, m1) = (u128::from(before.size), u128::from(self.size));
        let sum_where = |counts: &[u32], keep: &[bool], want: bool| -> u128 {
            counts.iter().zip(keep).filter(|&(_, &k)| k == want).map(|(&c, _)| u128::from(c)).sum()
        };
        // Entries of `before` whose owner serves on, and of this table whose owner served before.
        let (staying, stayed) =
            (sum_where(&old_counts, still_serving, true), sum_where(&new_counts, served_before, true));
        let unmoved: u128 = self
            .backends
            .iter()
            .zip(&new_counts)
            .filter_map(|(b, &c)| Some(u128::from(*old_counts.get(before.position(b.id)? as usize)?) * u128::from(c)))
            .sum();
        // This table's entries, rounded to the nearest: each is at most m1, a u32.
        let entries = |pairs: u128| u32::try_from((pairs + m0 / 2) / m0).unwrap_or(u32::MAX);
        TableChanges {
            departed: entries((m0 - staying) * m1),
            arrived: entries(staying * (m1 - stayed)),
            between_stayed: entries((staying * stayed).saturating_sub(unmoved)),
        }
    }

    /// How many entries each backend owns, by index into [`Self::backends`].
    #[must_use]
    pub fn entry_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.backends.len()];
        for &e in self.entries() {
            if let Some(c) = counts.get_mut(usize::from(e)) {
                *c += 1;
            }
        }
        counts
    }
}

/// Entries that changed owner between two tables ([`MaglevTable::changes_from`]; between tables of
/// two sizes, or with flows hashed anew ([`MaglevTable::changes_from_rehashed`]), the new table's
/// entries whose flows changed owner, on average). For one removal,
/// `departed` is the removed backend's share and `between_stayed` the disruption the `maglev` module
/// comment measures; for one addition, `arrived` is the new backend's share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableChanges {
    /// Entries whose old owner no longer serves (removed, or drained to weight 0).
    pub departed: u32,
    /// Entries of a kept owner that went to a backend that did not serve before.
    pub arrived: u32,
    /// Entries that moved from one backend serving in both tables to another.
    pub between_stayed: u32,
}

/// Exact weighted quotas: `floor(M w_i / W)` plus one for the largest remainders (ties: first index).
fn quotas(weights: &[u32], m: u32) -> Vec<u32> {
    if let Some(&first) = weights.first()
        && weights.iter().all(|&w| w == first)
        && let Ok(n) = u32::try_from(weights.len())
    {
        // Equal weights: every remainder is the same, so the first `m % n` get the extra entry
        // (what the general rule below gives, without a division and a sort per backend).
        let extra = (m % n) as usize;
        return (0..weights.len()).map(|i| m / n + u32::from(i < extra)).collect();
    }
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let mut quota = Vec::with_capacity(weights.len());
    let mut remainder = Vec::with_capacity(weights.len());
    for &w in weights {
        let share = u128::from(m) * u128::from(w);
        #[expect(clippy::cast_possible_truncation, reason = "share / total <= m, a u32")]
        quota.push((share / total) as u32);
        remainder.push(share % total);
    }
    let given: u32 = quota.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| remainder[b].cmp(&remainder[a]).then(a.cmp(&b)));
    for &i in order.iter().take((m - given) as usize) {
        quota[i] += 1;
    }
    quota
}

/// Lemire's multiplier `ceil(2^128 / d)` for [`fastmod`].
const fn fastmod_multiplier(d: u32) -> u128 {
    u128::MAX / (d as u128) + 1
}

/// `a % d` for any 64-bit `a`, by Lemire, Kaser and Kurz's direct remainder ("Faster remainder by
/// direct computation", 2019): three multiplies instead of a 64-bit division.
#[inline(always)]
const fn fastmod(a: u64, multiplier: u128, d: u32) -> u32 {
    let low = multiplier.wrapping_mul(a as u128);
    let d = d as u128;
    let bottom = ((low & (u64::MAX as u128)) * d) >> 64;
    let top = (low >> 64) * d;
    #[expect(clippy::cast_possible_truncation, reason = "the remainder is below d, a u32")]
    let r = ((bottom + top) >> 64) as u32;
    r
}

/// Fills the table; `backends` is sorted, valid, and `m` is a prime >= the serving count.
fn fill(backends: &[Backend], m: u32) -> Arc<[u16]> {
    fill_with(backends, m, TAIL_FREE_SLOTS, true, RING)
}

/// `c + m - back` modulo `m` (a step of `m - back`), for `c <= m` and `back <= m`, with no branch.
#[inline(always)]
fn step(c: u32, back: u32, m: u32) -> u32 {
    let (t, borrow) = c.overflowing_sub(back);
    core::hint::select_unpredictable(borrow, t.wrapping_add(m), t)
}

/// The slots of the table being filled: who owns each, and a bitset of taken ones that stays in L1.
struct Slots {
    /// One bit per slot, plus slot `m`, always taken, where finished backends are parked.
    occupied: Vec<u64>,
    /// `m + 1` entries; a visit that claims nothing writes to the extra one, so claims need no branch.
    /// Allocated once, as the table keeps it: an `Arc` made from a finished `Vec` would copy it into
    /// fresh pages (measured: 0.80 -> 1.1 ms at N = 1000, M = 65537, most of it page faults).
    entries: Arc<[u16]>,
    /// Slots claimed so far.
    claimed: usize,
}

impl Slots {
    fn new(m: u32) -> Self {
        // A power of two long, so [`walk`] indexes it with a mask and no bounds check.
        let mut occupied = vec![0u64; (m as usize + 1).div_ceil(64).next_power_of_two()];
        occupied[(m >> 6) as usize] |= 1 << (m & 63);
        Self { occupied, entries: core::iter::repeat_n(0u16, m as usize + 1).collect(), claimed: 0 }
    }

    fn is_free(&self, c: u32) -> bool {
        self.occupied[(c >> 6) as usize] >> (c & 63) & 1 == 0
    }

    fn claim(&mut self, c: u32, index: u16) {
        self.occupied[(c >> 6) as usize] |= 1 << (c & 63);
        if let Some(e) = Arc::get_mut(&mut self.entries).and_then(|e| e.get_mut(c as usize)) {
            *e = index;
        }
        self.claimed += 1;
    }
}

/// The fill's state for each serving backend with a quota, in turn order; `backends` is sorted.
fn fillers(backends: &[Backend], m: u32) -> Vec<Filler> {
    let hasher = FlowHasher::new(0);
    let serving: Vec<(u16, Backend)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.is_serving())
        .map(|(i, b)| {
            #[expect(clippy::cast_possible_truncation, reason = "at most MAX_BACKENDS = 2^16 backends")]
            (i as u16, *b)
        })
        .collect();
    let weights: Vec<u32> = serving.iter().map(|(_, b)| b.weight).collect();
    let quota = quotas(&weights, m);
    let w_max = u64::from(weights.iter().copied().max().unwrap_or(1));
    let m64 = u64::from(m);

    serving
        .iter()
        .zip(&quota)
        .filter(|&(_, &q)| q > 0)
        .map(|(&(index, b), &left)| {
            let offset = hasher.words(KeyKind::MaglevOffset, &[b.id.0]) % m64;
            let skip = hasher.words(KeyKind::MaglevSkip, &[b.id.0]) % (m64 - 1).max(1) + 1;
            let rate = (u64::from(b.weight) * u64::from(TURN)).div_ceil(w_max);
            #[expect(clippy::cast_possible_truncation, reason = "offset, skip < m and rate <= TURN")]
            let (next, back, rate) = (offset as u32, (m64 - skip) as u32, rate as u8);
            Filler { next, back, left, index, rate, credit: 0 }
        })
        .collect()
}

/// [`fill`], switching to the tail computation at `tail_free_slots` free slots, and with equal
/// weights simulating by events (with a wake-up ring of `ring` rounds, a power of two) or by rounds
/// (the tests check that all choices agree).
fn fill_with(backends: &[Backend], m: u32, tail_free_slots: usize, events: bool, ring: usize) -> Arc<[u16]> {
    let mut fillers = fillers(backends, m);
    let mut slots = Slots::new(m);
    let stop = tail_free_slots.min(m as usize);
    if fillers.iter().all(|f| f.rate == TURN) {
        if events {
            rounds::<false, true>(&mut fillers, &mut slots, m, (m as usize / EVENTS_FROM).max(stop));
            let wake = events_equal_weights(&mut fillers, &mut slots, m, stop, ring);
            tail::<false>(&fillers, &wake, &mut slots, m);
        } else {
            rounds::<false, true>(&mut fillers, &mut slots, m, stop);
            tail::<false>(&fillers, &vec![0; fillers.len()], &mut slots, m);
        }
    } else {
        rounds::<true, true>(&mut fillers, &mut slots, m, stop);
        tail::<true>(&fillers, &vec![0; fillers.len()], &mut slots, m);
    }
    // The spare slot holds whatever the last idle visit wrote: clear it, so equal tables are equal.
    let mut entries = slots.entries;
    if let Some(spare) = Arc::get_mut(&mut entries).and_then(|e| e.get_mut(m as usize)) {
        *spare = 0;
    }
    entries
}

/// Runs whole rounds of turns while more than `stop` slots are free. On its turn a backend visits
/// the next slot of its permutation and claims it if it is free and its quota is not met. With
/// weights, a run of [`IDLE_BEFORE_SKIP`] rounds in which no backend takes a turn is followed by a
/// jump over the idle rounds after it: a light backend takes a turn only every `TURN / rate` rounds,
/// so once only light ones are left most rounds are idle (weights 1 and 64 at M = 6553621: 1.1 s
/// stepping every round, 0.25 s skipping). `SKIP_IDLE` off steps every round, as the fill did
/// before: the reference the tests compare the skipping fill with.
// Kept out of line: inlined into `fill_with` it loses registers and runs 30 % slower (measured).
#[inline(never)]
fn rounds<const WEIGHTED: bool, const SKIP_IDLE: bool>(
    fillers: &mut Vec<Filler>,
    slots: &mut Slots,
    m: u32,
    stop: usize,
) {
    let mut finished = 0usize;
    // Locals, so the claim count stays in a register rather than round-tripping through memory.
    let occupied = &mut slots.occupied[..];
    let Some(entries) = Arc::get_mut(&mut slots.entries) else {
        return; // Never: the fill holds the only reference.
    };
    let mut claimed = slots.claimed;
    // Idle rounds in a row (rounds in which no backend took a turn).
    let mut idle = 0u32;
    while claimed + stop < m as usize {
        let mut took = false;
        let mut visit = |f: &mut Filler| {
            if WEIGHTED {
                f.credit += f.rate;
                if f.credit < TURN {
                    return;
                }
                f.credit -= TURN;
                took = true;
            }
            let c = f.next;
            let word = &mut occupied[(c >> 6) as usize];
            // Whether the slot was taken, as a number (the compiler then tests the bit only once).
            let taken = u32::from(*word >> (c & 63) & 1 == 1);
            *word |= 1 << (c & 63);
            entries[core::hint::select_unpredictable(taken == 0, c, m) as usize] = f.index;
            claimed += (taken ^ 1) as usize;
            f.left -= taken ^ 1;
            f.next = step(c, f.back, m);
            if f.left == 0 {
                // Park it on the always-occupied slot m: it visits only that from now on.
                f.next = m;
                f.back = 0;
                // And stop its turns, so an idle round is one with no turn at all.
                f.rate = 0;
                finished += 1;
                f.left = u32::MAX;
            }
        };
        // Two visits per loop iteration, in turn order (measured: 5 % faster than one).
        let mut pairs = fillers.chunks_exact_mut(2);
        for pair in &mut pairs {
            visit(&mut pair[0]);
            visit(&mut pair[1]);
        }
        for f in pairs.into_remainder() {
            visit(f);
        }
        if WEIGHTED && SKIP_IDLE {
            idle = if took { 0 } else { idle + 1 };
            if idle >= IDLE_BEFORE_SKIP {
                skip_idle_rounds(fillers);
                idle = 0;
            }
        }
        // Finished backends cost a wasted visit each round (and queue on one word of the bitset);
        // drop them once they are a sixteenth (measured: a quarter made the phase 25 % slower).
        if finished * 16 > fillers.len() {
            fillers.retain(|f| f.next != m);
            finished = 0;
        }
    }
    slots.claimed = claimed;
}

/// After idle rounds: moves every backend on to the last round before the next one in which some
/// backend takes a turn, as running those rounds would (no visits, only credits).
/// Backend `f` takes no turn in the next `(TURN - 1 - credit) / rate` rounds; the fewest over
/// backends with turns left (rate > 0) is how many rounds to skip. Credits stay below `TURN`:
/// `skip * rate <= TURN - 1 - credit` for every backend, so nothing overflows.
fn skip_idle_rounds(fillers: &mut [Filler]) {
    // Often the next round is not idle: say so without dividing.
    if fillers.iter().any(|f| f.credit + f.rate >= TURN) {
        return;
    }
    let Some(skip) = fillers.iter().filter(|f| f.rate > 0).map(|f| (TURN - 1).saturating_sub(f.credit) / f.rate).min()
    else {
        return;
    };
    for f in fillers {
        f.credit += skip * f.rate;
    }
}

/// The weighted [`fill_with`] with [`rounds`] stepping every round (`SKIP_IDLE` off): the table as
/// it was built before idle rounds were skipped.
#[cfg(test)]
fn fill_every_round(backends: &[Backend], m: u32, tail_free_slots: usize) -> Arc<[u16]> {
    let mut fillers = fillers(backends, m);
    let mut slots = Slots::new(m);
    rounds::<true, false>(&mut fillers, &mut slots, m, tail_free_slots.min(m as usize));
    tail::<true>(&fillers, &vec![0; fillers.len()], &mut slots, m);
    let mut entries = slots.entries;
    if let Some(spare) = Arc::get_mut(&mut entries).and_then(|e| e.get_mut(m as usize)) {
        *spare = 0;
    }
    entries
}

/// Walks from `c` along a permutation (step `m - back`) to the next free slot; returns it and the
/// number of steps. Four steps per iteration, each computed from `c` with a precomputed multiple of
/// the step, and one branch for all four, so the loop is bound by throughput, not by a chain.
#[inline(always)]
fn walk(occupied: &[u64], mut c: u32, back: u32, m: u32) -> (u32, u64) {
    // Backs of 1, 2, 3 and 4 steps: m - k skip mod m.
    let s1 = back;
    let s2 = m - step(m - s1, s1, m);
    let s3 = m - step(m - s2, s1, m);
    let s4 = m - step(m - s3, s1, m);
    let mask = occupied.len() - 1;
    // The low bit of the result is 1 if slot c is taken.
    let taken = |c: u32| occupied[(c >> 6) as usize & mask] >> (c & 63);
    let mut d = 0u64;
    loop {
        let c1 = step(c, s1, m);
        let c2 = step(c, s2, m);
        let c3 = step(c, s3, m);
        let c4 = step(c, s4, m);
        let (t1, t2, t3, t4) = (taken(c1), taken(c2), taken(c3), taken(c4));
        if t1 & t2 & t3 & t4 & 1 == 0 {
            let k = (!(t1 & 1 | (t2 & 1) << 1 | (t3 & 1) << 2 | (t4 & 1) << 3)).trailing_zeros();
            let found = match k {
                0 => c1,
                1 => c2,
                2 => c3,
                _ => c4,
            };
            return (found, d + u64::from(k) + 1);
        }
        c = c4;
        d += 4;
    }
}

/// The same turns as [`rounds`] with equal weights, simulated by events: a backend walks straight to
/// the next free slot of its permutation (cheap steps over the bitset) and sleeps until the round in
/// which its turns would reach it; on waking it claims the slot if still free, or walks on. Wake-ups of
/// one round run in turn order. Returns each backend's wake round (for [`tail`]) once at most `stop`
/// slots are free.
// Kept out of line: inlined into `fill_with` it loses registers and runs 30 % slower (measured).
#[inline(never)]
fn events_equal_weights(fillers: &mut [Filler], slots: &mut Slots, m: u32, stop: usize, ring: usize) -> Vec<u64> {
    const NONE: u32 = u32::MAX;
    let n = fillers.len();
    let mut wake = vec![0u64; n];
    let mask = ring as u64 - 1;
    let mut head = vec![NONE; ring];
    let mut link = vec![NONE; n];
    // Wake-ups past the ring's current window of rounds, moved into the ring when theirs comes.
    let mut far: Vec<u32> = Vec::new();
    // Every unfinished backend visits its next slot in round 0 (parked ones sit on slot m).
    for (i, f) in fillers.iter().enumerate() {
        if f.next != m && f.left > 0 {
            #[expect(clippy::cast_possible_truncation, reason = "at most MAX_BACKENDS fillers")]
            let id = i as u32;
            link[i] = head[0];
            head[0] = id;
        }
    }
    let mut due: Vec<u32> = Vec::with_capacity(n);
    let mut t = 0u64;
    while slots.claimed + stop < m as usize {
        #[expect(clippy::cast_possible_truncation, reason = "masked to the ring size")]
        let bucket = (t & mask) as usize;
        if bucket == 0 && !far.is_empty() {
            // A new window of `ring` rounds: bring in the far wake-ups that fall in it.
            far.retain(|&i| {
                let w = wake[i as usize];
                if w < t + ring as u64 {
                    let b = (w & mask) as usize;
                    link[i as usize] = head[b];
                    head[b] = i;
                    false
                } else {
                    true
                }
            });
        }
        if head[bucket] == NONE {
            t += 1;
            continue;
        }
        due.clear();
        let mut i = head[bucket];
        while i != NONE {
            due.push(i);
            i = link[i as usize];
        }
        head[bucket] = NONE;
        due.sort_unstable();
        for &i in &due {
            let f = &mut fillers[i as usize];
            let c = f.next;
            if slots.is_free(c) {
                slots.claim(c, f.index);
                f.left -= 1;
                if f.left == 0 {
                    continue;
                }
            }
            // Walk to the next free slot; one exists since this backend still has entries to claim.
            let (c, d) = walk(&slots.occupied, c, f.back, m);
            f.next = c;
            let w = t + d;
            wake[i as usize] = w;
            // Rounds t+1 .. the end of this window go in the ring; later ones wait in far.
            if w < (t | mask) + 1 {
                #[expect(clippy::cast_possible_truncation, reason = "masked to the ring size")]
                let later = (w & mask) as usize;
                link[i as usize] = head[later];
                head[later] = i;
            } else {
                far.push(i);
            }
        }
        t += 1;
    }
    // Backends due in round t or later keep their wake round; the tail counts from there.
    wake
}

/// The inverse of `a` modulo the prime `m` (extended Euclid); `a` is in `1..m`.
fn inverse_mod(a: u32, m: u32) -> u64 {
    let (mut r0, mut r1) = (i64::from(m), i64::from(a));
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    u64::try_from(t0.rem_euclid(i64::from(m))).unwrap_or(0)
}

/// Finishes the fill from a round boundary with few free slots, with the same outcome as running the
/// rounds on: instead of visiting mostly occupied slots, compute for every unfinished backend the
/// round at which its permutation next reaches each free slot, and apply claims in (round, turn order).
// Kept out of line: inlined into `fill_with` it loses registers and runs 30 % slower (measured).
#[inline(never)]
fn tail<const WEIGHTED: bool>(all: &[Filler], wake: &[u64], slots: &mut Slots, m: u32) {
    // Unfinished backends in turn order, with the round of their next visit.
    let (fillers, wake): (Vec<Filler>, Vec<u64>) =
        all.iter().zip(wake).filter(|(f, _)| f.next != m && f.left > 0).map(|(f, &w)| (*f, w)).unzip();
    if fillers.is_empty() {
        return;
    }
    let mut free: Vec<u32> = Vec::new();
    for (w, &word) in slots.occupied.iter().enumerate().take((m as usize).div_ceil(64)) {
        let mut bits = !word;
        while bits != 0 {
            #[expect(clippy::cast_possible_truncation, reason = "a slot number, below m")]
            let c = (w * 64) as u32 + bits.trailing_zeros();
            if c < m {
                free.push(c);
            }
            bits &= bits - 1;
        }
    }
    let multiplier = fastmod_multiplier(m);
    let inverse: Vec<u64> = fillers.iter().map(|f| inverse_mod(m - f.back, m)).collect();
    // The round at which backend `i` reaches slot `c`: its k-th visit from its next one, where
    // next + k skip = c (mod m), happens k rounds after that one, or with weights when credit allows.
    let round_of = |i: usize, c: u32| -> u64 {
        let f = &fillers[i];
        let distance = if c >= f.next { c - f.next } else { c + m - f.next };
        let k = u64::from(fastmod(u64::from(distance) * inverse[i], multiplier, m));
        if WEIGHTED {
            wake[i] + (u64::from(TURN) * (k + 1) - u64::from(f.credit)).div_ceil(u64::from(f.rate)) - 1
        } else {
            wake[i] + k
        }
    };
    let best_of = |i: usize, free: &[u32]| -> (u64, u32) {
        free.iter().map(|&c| (round_of(i, c), c)).min().unwrap_or((u64::MAX, 0))
    };
    let mut best: Vec<(u64, u32)> = (0..fillers.len()).map(|i| best_of(i, &free)).collect();
    let mut left: Vec<u32> = fillers.iter().map(|f| f.left).collect();
    // The next claim: earliest round, then earliest in turn order.
    while let Some((winner, &(_, slot))) =
        best.iter().enumerate().filter(|&(i, _)| left[i] > 0).min_by_key(|&(i, &(round, _))| (round, i))
    {
        slots.claim(slot, fillers[winner].index);
        left[winner] -= 1;
        free.retain(|&c| c != slot);
        for i in 0..fillers.len() {
            if left[i] > 0 && best[i].1 == slot {
                best[i] = best_of(i, &free);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn equal(n: u64) -> Vec<Backend> {
        (0..n).map(|i| Backend::new(1000 + i, 1)).collect()
    }

    /// `changes_from` sorts every changed entry by why it changed: a removed or drained owner, a new
    /// backend taking it, or a move between backends serving in both tables.
    #[test]
    fn changes_from_sorts_moves_by_cause() {
        let m = 1009;
        let five = MaglevTable::new(&equal(5), m).expect("valid");
        assert_eq!(five.changes_from(&five), TableChanges { departed: 0, arrived: 0, between_stayed: 0 });

        let four = MaglevTable::new(&equal(4), m).expect("valid");
        let share_of_last = five.entry_counts()[4];
        let removal = four.changes_from(&five);
        assert_eq!((removal.departed, removal.arrived), (share_of_last, 0));
        let between = five.entries().iter().zip(four.entries()).filter(|&(&a, &b)| a != 4 && a != b).count();
        assert_eq!(removal.between_stayed as usize, between);

        // Adding it back: the same entries, seen from the other side.
        let addition = five.changes_from(&four);
        assert_eq!(
            addition,
            TableChanges { departed: 0, arrived: share_of_last, between_stayed: removal.between_stayed }
        );

        // Draining is a departure too, though the backend stays in the table.
        let mut drained = equal(5);
        drained[4].weight = 0;
        let drained = MaglevTable::new(&drained, m).expect("valid");
        assert_eq!(drained.changes_from(&five), removal);
    }

    /// Between tables of two sizes, `changes_from` counts what every pair of slots `(hash % M,
    /// hash % M')` gives, all `M M'` of them enumerated here (each pair holds the same share of flow
    /// hashes, the sizes being distinct primes), scaled to the new table's `M'` entries: a removal, an
    /// addition, a drain with weights changed, a whole new set. So does `changes_from_rehashed`, for
    /// tables of one size too (two hashes of a flow are independent): the same table rehashed, a
    /// removal.
    #[test]
    fn changes_between_sizes_count_every_pair_of_slots() {
        let weighted =
            |ids: &[u64]| -> Vec<Backend> { ids.iter().map(|&id| Backend::new(id, 1 + (id % 3) as u32)).collect() };
        let mut drained = weighted(&[1, 2, 3, 4]);
        drained[1].weight = 0;
        drained[3].weight = 9;
        let cases = [
            (weighted(&[1, 2, 3, 4]), weighted(&[1, 2, 4]), 101, 307),
            (weighted(&[1, 2, 3]), weighted(&[1, 2, 3, 4, 5]), 307, 101),
            (weighted(&[1, 2, 3, 4]), drained, 211, 199),
            (weighted(&[1, 2]), weighted(&[3, 4]), 103, 101),
            (equal(5), equal(5), 1009, 211),
            (equal(5), equal(5), 211, 211),
            (weighted(&[1, 2, 3, 4]), weighted(&[1, 2, 4]), 101, 101),
        ];
        for (old, new, m0, m1) in cases {
            let (before, after) =
                (MaglevTable::new(&old, m0).expect("valid"), MaglevTable::new(&new, m1).expect("valid"));
            let serving =
                |t: &MaglevTable, id: BackendId| t.position(id).is_some_and(|i| t.backends()[i as usize].is_serving());
            let mut pairs = [0u64; 3];
            for &a in before.entries() {
                for &b in after.entries() {
                    let (a, b) = (before.backends()[usize::from(a)].id, after.backends()[usize::from(b)].id);
                    if a == b {
                        continue;
                    }
                    let cause = if !serving(&after, a) {
                        0
                    } else if !serving(&before, b) {
                        1
                    } else {
                        2
                    };
                    pairs[cause] += 1;
                }
            }
            // Pairs over M M' in units of M' entries: pairs / M, rounded to the nearest.
            let entries = |p: u64| ((p + u64::from(m0) / 2) / u64::from(m0)) as u32;
            let want = TableChanges {
                departed: entries(pairs[0]),
                arrived: entries(pairs[1]),
                between_stayed: entries(pairs[2]),
            };
            if m0 != m1 {
                assert_eq!(after.changes_from(&before), want, "{m0} -> {m1}: {old:?} -> {new:?}");
            }
            assert_eq!(after.changes_from_rehashed(&before), want, "rehashed {m0} -> {m1}: {old:?} -> {new:?}");
        }
    }

    /// The module comment's example of correlated permutations: two of three backends share a skip
    /// at M = 103651, and removing one of the three moves far more than the usual fraction of a
    /// percent between the other two.
    #[test]
    fn the_module_comments_backends_with_one_skip_share_it() {
        let (m, ids) = (103_651u32, [0u64, 1_872_500_205_781_721_582, 12_988_412_332_294_560_676]);
        let skip = |id: u64| FlowHasher::new(0).words(KeyKind::MaglevSkip, &[id]) % u64::from(m - 1) + 1;
        assert_eq!((skip(ids[1]), skip(ids[2])), (97_743, 97_743));
        assert_ne!(skip(ids[0]), 97_743);
        let set: Vec<Backend> = ids.iter().map(|&id| Backend::new(id, 1)).collect();
        let before = MaglevTable::new(&set, m).expect("valid");
        let moved: Vec<u32> = ids
            .iter()
            .map(|&gone| {
                let rest: Vec<Backend> = set.iter().copied().filter(|b| b.id.0 != gone).collect();
                MaglevTable::new(&rest, m).expect("valid").changes_from(&before).between_stayed
            })
            .collect();
        // 3.8 %, 12.2 % and 0.35 % of the table, as the comment says.
        let percent: Vec<u32> = moved.iter().map(|&e| (u64::from(e) * 10_000 / u64::from(m)) as u32).collect();
        assert_eq!(percent, [382, 1217, 34], "hundredths of a percent moved: {moved:?} entries");
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(65_537) && is_prime(655_373) && is_prime(4_294_967_291));
        assert!(!is_prime(65_535) && !is_prime(25) && !is_prime(4_294_967_295));
        assert!(!is_prime(65_521 * 65_519));
        assert_eq!(maglev_table_size_for(0), 101);
        assert_eq!(maglev_table_size_for(10), 1009);
        assert_eq!(maglev_table_size_for(1000), 100_003);
        for (n, m) in [(0, 65_537), (655, 65_537), (656, 655_373), (6_553, 655_373), (6_554, 6_553_621)] {
            assert_eq!(maglev_table_size_stable_for(n), m, "{n} backends");
            assert!(is_prime(m) && (n == 0 || m as usize >= 100 * n), "{m} for {n} backends");
        }
        let most = MaglevTable::MAX_BACKENDS;
        assert!(maglev_table_size_stable_for(most) as usize >= 100 * most, "the last step serves every count");
    }

    #[test]
    fn bad_sizes_are_refused_with_the_value() {
        let b = equal(3);
        assert_eq!(
            MaglevTable::new(&b, 65_536),
            Err(BuildError::TableSizeNotPrime { size: 65_536, next_prime: 65_537 })
        );
        assert_eq!(MaglevTable::new(&b, 1), Err(BuildError::TableSizeNotPrime { size: 1, next_prime: 2 }));
        assert_eq!(MaglevTable::new(&b, 2), Err(BuildError::TableSizeTooSmall { size: 2, backends: 3, min: 307 }));
        assert!(matches!(MaglevTable::new(&b, MaglevTable::MAX_SIZE + 1), Err(BuildError::TableSizeTooLarge { .. })));
        // Draining backends need no slot.
        let mut drained = equal(3);
        drained[2].weight = 0;
        assert!(MaglevTable::new(&drained, 2).is_ok());
    }

    #[test]
    fn bad_backend_sets_are_refused() {
        assert_eq!(MaglevTable::new(&[], 13), Err(BuildError::NoBackends));
        assert_eq!(
            MaglevTable::new(&[Backend::new(7, 1), Backend::new(7, 2)], 13),
            Err(BuildError::DuplicateBackend { id: BackendId(7) })
        );
        assert_eq!(MaglevTable::new(&[Backend::new(7, 0)], 13), Err(BuildError::AllWeightsZero { count: 1 }));
    }

    #[test]
    fn every_slot_belongs_to_a_serving_backend_and_quotas_hold() {
        let backends = [Backend::new(5, 3), Backend::new(9, 0), Backend::new(1, 1), Backend::new(4, 2)];
        let t = MaglevTable::new(&backends, 601).expect("valid");
        // Sorted: ids 1, 4, 5, 9 with weights 1, 2, 3, 0; W = 6; ideal 100.17, 200.33, 300.5, 0.
        assert_eq!(t.entry_counts(), [100, 200, 301, 0]);
        assert_eq!(t.position(BackendId(9)), Some(3));
    }

    #[test]
    fn lookup_is_the_entry_at_hash_mod_size() {
        let t = MaglevTable::new(&equal(7), 1009).expect("valid");
        let mut x = 0x1234_5678_9abc_def0u64;
        for hash in [0, 1, 1008, 1009, u64::MAX, u64::MAX - 1, 1 << 63] {
            assert_eq!(t.slot(hash), (hash % 1009) as usize);
        }
        for _ in 0..10_000 {
            x = crate::flow::fmix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            assert_eq!(t.slot(x), (x % 1009) as usize);
            assert_eq!(t.lookup(x), Some(u32::from(t.entries()[(x % 1009) as usize])));
        }
    }

    #[test]
    fn the_tail_computation_gives_the_same_table_as_running_every_turn() {
        let mut x = 7u64;
        let mut next = || {
            x = crate::flow::fmix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            x
        };
        for (n, m) in [(1usize, 101u32), (3, 101), (10, 1009), (37, 4001), (200, 20_011)] {
            for weighted in [false, true] {
                let backends: Vec<Backend> =
                    (0..n).map(|_| Backend::new(next(), if weighted { (next() % 5) as u32 } else { 1 })).collect();
                let Ok(sorted) = sorted_backends(&backends) else { continue };
                let every_turn = fill_with(&sorted, m, 0, false, RING);
                for switch in [0, 1, 64, 500] {
                    // Rings of 1 and 4 rounds send most wake-ups through the list of later ones.
                    for (events, ring) in [(false, RING), (true, RING), (true, 1), (true, 4)] {
                        let table = fill_with(&sorted, m, switch, events, ring);
                        assert_eq!(table, every_turn, "n {n} m {m} switch {switch} events {events} ring {ring}");
                    }
                }
            }
        }
    }

    /// Skipping idle rounds gives the tables of stepping every round, bit for bit: 1000 random sets of
    /// 1 to 300 backends (2 in every seventh) with weights from 0 to 1000 (uniform, one of 1000 among
    /// weights 1 to 3, a few heavy among many of 0 and 1, turn rates 1 to 64 mixed, weights 1 to 64),
    /// table sizes from 101 to 65537; up to 4001 also with rounds to the last slot (no tail).
    #[test]
    fn skipping_idle_rounds_gives_the_same_table_as_stepping_every_round() {
        let mut x = 11u64;
        let mut next = || {
            x = crate::flow::fmix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            x
        };
        let sizes = [101u32, 307, 1009, 4001, 10_007, 20_011, 65_537];
        let mut compared = 0;
        for case in 0..1000u64 {
            let m = sizes[(next() % sizes.len() as u64) as usize];
            let most = (m as u64 / 8).clamp(1, 300);
            let n = if case % 7 == 0 { 2 } else { 1 + next() % most };
            let backends: Vec<Backend> = (0..n)
                .map(|i| {
                    let weight = match case % 5 {
                        0 => next() % 1001,
                        1 if i == 0 => 1000,
                        1 => 1 + next() % 3,
                        2 if next() % 16 == 0 => 500 + next() % 501,
                        2 => u64::from(next() % 8 != 0),
                        // Turn rates 1, 1, 2, 3, 7, 20 and 64 side by side, so skips meet uneven credits.
                        3 => [1, 5, 17, 40, 100, 300, 1000][(next() % 7) as usize],
                        _ => 1 + next() % 64,
                    };
                    #[expect(clippy::cast_possible_truncation, reason = "at most 1000")]
                    Backend::new(next(), weight as u32)
                })
                .collect();
            let Ok(sorted) = sorted_backends(&backends) else { continue };
            if sorted.iter().all(|b| !b.is_serving()) {
                continue;
            }
            assert_eq!(fill(&sorted, m), fill_every_round(&sorted, m, TAIL_FREE_SLOTS), "case {case}: n {n} m {m}");
            // Rounds to the last slot (no tail) skip the most; stepping every round is slow beyond
            // a few thousand slots.
            if m <= 4001 {
                let table = fill_with(&sorted, m, 0, true, RING);
                assert_eq!(table, fill_every_round(&sorted, m, 0), "case {case}: n {n} m {m}, no tail");
            }
            compared += 1;
        }
        assert!(compared > 900, "only {compared} sets compared");
    }

    #[test]
    fn fastmod_is_the_remainder() {
        for d in [2u32, 3, 101, 65_537, 655_373, MaglevTable::MAX_SIZE - 1] {
            let mul = fastmod_multiplier(d);
            let mut x = u64::from(d);
            for a in [0, 1, u64::from(d) - 1, u64::from(d), u64::MAX, u64::MAX - 1] {
                assert_eq!(fastmod(a, mul, d), (a % u64::from(d)) as u32);
            }
            for _ in 0..1000 {
                x = crate::flow::fmix64(x.wrapping_add(1));
                assert_eq!(fastmod(x, mul, d), (x % u64::from(d)) as u32);
            }
        }
    }

    #[test]
    fn inverse_mod_inverts() {
        for (a, m) in [(1u32, 101u32), (100, 101), (12_345, 65_537), (65_536, 65_537)] {
            assert_eq!(u64::from(a) * inverse_mod(a, m) % u64::from(m), 1);
        }
    }

    #[test]
    fn quotas_are_within_one_entry() {
        let q = quotas(&[1, 1, 1], 7);
        assert_eq!(q, [3, 2, 2]);
        // Equal weights above 1 take the same shortcut and give the same quotas.
        assert_eq!(quotas(&[5, 5, 5], 7), [3, 2, 2]);
        assert_eq!(quotas(&[5, 5, 6], 7), [2, 2, 3]);
        let q = quotas(&[u32::MAX, 1], 65_537);
        assert_eq!(q, [65_537, 0]);
    }
}
