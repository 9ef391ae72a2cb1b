//! Weighted round robin ("wrr"): a cursor over a sequence built once per table, in which each backend
//! appears in proportion to its weight, interleaved smoothly (nginx's smooth weighted round robin), so a
//! heavy backend does not get its whole share in one run. O(1) per pick, unlike IPVS's gcd walk whose
//! cost grows with the weight ratio. The proportion is exact while the weights, divided by their gcd,
//! sum to at most [`MAX_SEQUENCE`]; beyond that it is approximate (see there), where IPVS stays exact.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::{CoreState, FlowInput, Scheduler, eligible};
use crate::service::Backend;

/// The sequence length above which weights (divided by their gcd) are scaled down to sum to about
/// this: each rounded down, but kept at least 1 so every backend still appears. A light backend's share
/// is then off by up to one sequence entry (weights 1 to 100 on 100 backends: weight 2 gets 38 % less
/// than its share, weight 1 23 % more), and the sequence is longer than this when more backends than
/// this take new flows.
const MAX_SEQUENCE: u64 = 4096;

/// Weighted round robin over the backends that take new flows.
#[derive(Debug, Clone)]
pub struct WeightedRoundRobin {
    sequence: Box<[u16]>,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl WeightedRoundRobin {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Self {
        let eligible = eligible(backends);
        let weights: Vec<u64> =
            eligible.iter().map(|&i| backends.get(usize::from(i)).map_or(0, |b| u64::from(b.weight))).collect();
        let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
        let total: u64 = weights.iter().map(|w| w / g).sum();
        let weights: Vec<i64> = weights
            .iter()
            .map(|&w| {
                let w = w / g;
                let scaled = if total > MAX_SEQUENCE { (w * MAX_SEQUENCE / total).max(1) } else { w };
                i64::try_from(scaled).unwrap_or(i64::MAX)
            })
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = alloc::vec![0i64; weights.len()];
        let mut sequence = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            let mut best: Option<(usize, i64)> = None;
            for (i, (c, w)) in current.iter_mut().zip(&weights).enumerate() {
                *c += w;
                if best.is_none_or(|(_, bc)| *c > bc) {
                    best = Some((i, *c));
                }
            }
            let Some((best, _)) = best else { break };
            if let Some(c) = current.get_mut(best) {
                *c -= total;
            }
            if let Some(&b) = eligible.get(best) {
                sequence.push(b);
            }
        }
        WeightedRoundRobin { sequence: sequence.into_boxed_slice() }
    }
}

impl Scheduler for WeightedRoundRobin {
    fn pick(&self, _flow: &FlowInput, _backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize> {
        if self.sequence.is_empty() {
            return None;
        }
        let i = core.next_cursor() as usize % self.sequence.len();
        self.sequence.get(i).map(|&b| usize::from(b))
    }
}
