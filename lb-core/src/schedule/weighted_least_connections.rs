//! Weighted least connections ("wlc"): the eligible backend with the smallest connection overhead
//! (this core's; established TCP 256, other entries 1, as IPVS) per unit of weight.

use alloc::boxed::Box;

use super::{CoreState, FlowInput, Scheduler, eligible, least_cost};
use crate::service::Backend;

/// Smallest `overhead / weight` ([`CoreState::overhead`]).
#[derive(Debug, Clone)]
pub struct WeightedLeastConnections {
    eligible: Box<[u16]>,
}

impl WeightedLeastConnections {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Self {
        WeightedLeastConnections { eligible: eligible(backends) }
    }
}

impl Scheduler for WeightedLeastConnections {
    fn pick(&self, _flow: &FlowInput, backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize> {
        least_cost(&self.eligible, backends, |b| (core.overhead(b), u64::from(b.weight)))
    }
}
