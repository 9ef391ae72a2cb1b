//! Maglev's disruption as a distribution over random backend sets: the sampler behind the
//! `maglev_disruption` example and the distribution tests in `maglev_props.rs`.

use lb_hash::{Backend, BuildError, MaglevTable};

/// The share of the table (in %) that moved between survivors, for each of up to four removals (one
/// at a time) from each of `sets` sets of `n` random identities, sorted. The identities come from
/// xorshift64 started at `seed` (not 0), so a sample is the same on every run and machine.
///
/// # Errors
/// A table that cannot be built (`m` not a prime >= `n`, more backends than a table indexes).
pub(crate) fn sample(n: usize, m: u32, sets: usize, seed: u64) -> Result<Vec<f64>, BuildError> {
    let mut state = seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut shares = Vec::with_capacity(sets * n.min(4));
    for _ in 0..sets {
        let set: Vec<Backend> = (0..n).map(|_| Backend::new(next(), 1)).collect();
        let before = MaglevTable::new(&set, m)?;
        for removed in set.iter().take(4).map(|b| b.id) {
            let survivors: Vec<Backend> = set.iter().copied().filter(|b| b.id != removed).collect();
            let after = MaglevTable::new(&survivors, m)?;
            let changes = after.changes_from(&before);
            shares.push(f64::from(changes.between_stayed) / f64::from(m) * 100.0);
        }
    }
    shares.sort_by(f64::total_cmp);
    Ok(shares)
}

/// The value below which `q` of the sorted sample lies.
#[must_use]
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The sample's mean.
#[must_use]
pub(crate) fn mean(sample: &[f64]) -> f64 {
    sample.iter().sum::<f64>() / sample.len() as f64
}
