//! Shortest expected delay ("sed"): the eligible backend with the smallest `(connections + 1) / weight`,
//! the delay a new flow would see if every backend served its connections at a rate set by its weight.

use alloc::boxed::Box;

use super::{CoreState, FlowInput, Scheduler, eligible, least_cost};
use crate::service::Backend;

/// Smallest `(connections + 1) / weight`.
#[derive(Debug, Clone)]
pub struct ShortestExpectedDelay {
    eligible: Box<[u16]>,
}

impl ShortestExpectedDelay {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Self {
        ShortestExpectedDelay { eligible: eligible(backends) }
    }
}

impl Scheduler for ShortestExpectedDelay {
    fn pick(&self, _flow: &FlowInput, backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize> {
        least_cost(&self.eligible, backends, |b| (core.active(b) + 1, u64::from(b.weight)))
    }
}
