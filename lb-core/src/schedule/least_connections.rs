//! Least connections ("lc"): the eligible backend with the smallest connection overhead on this core,
//! established TCP connections weighing 256 and other entries 1, as IPVS ([`CoreState::overhead`]).

use alloc::boxed::Box;

use super::{CoreState, FlowInput, Scheduler, eligible, least_cost};
use crate::service::Backend;

/// Least connection overhead, counted per core (see the module docs of `schedule`).
#[derive(Debug, Clone)]
pub struct LeastConnections {
    eligible: Box<[u16]>,
}

impl LeastConnections {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Self {
        LeastConnections { eligible: eligible(backends) }
    }
}

impl Scheduler for LeastConnections {
    fn pick(&self, _flow: &FlowInput, backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize> {
        least_cost(&self.eligible, backends, |b| (core.overhead(b), 1))
    }
}
