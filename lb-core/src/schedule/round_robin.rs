//! Round robin ("rr"): each new flow to the next eligible backend, per core.

use alloc::boxed::Box;

use super::{CoreState, FlowInput, Scheduler, eligible};
use crate::service::Backend;

/// Round robin over the backends that take new flows.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    eligible: Box<[u16]>,
}

impl RoundRobin {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Self {
        RoundRobin { eligible: eligible(backends) }
    }
}

impl Scheduler for RoundRobin {
    fn pick(&self, _flow: &FlowInput, _backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize> {
        if self.eligible.is_empty() {
            return None;
        }
        let i = core.next_cursor() as usize % self.eligible.len();
        self.eligible.get(i).map(|&b| usize::from(b))
    }
}
