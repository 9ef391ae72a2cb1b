//! Never queue ("nq"): an idle eligible backend (no connections on this core) if there is one, the
//! first in order; otherwise as shortest expected delay.

use alloc::boxed::Box;

use super::{CoreState, FlowInput, Scheduler, eligible, least_cost};
use crate::service::Backend;

/// Idle backend first, else smallest `(connections + 1) / weight`.
#[derive(Debug, Clone)]
pub struct NeverQueue {
    eligible: Box<[u16]>,
}

impl NeverQueue {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Self {
        NeverQueue { eligible: eligible(backends) }
    }
}

impl Scheduler for NeverQueue {
    fn pick(&self, _flow: &FlowInput, backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize> {
        let idle = self
            .eligible
            .iter()
            .map(|&i| usize::from(i))
            .find(|&i| backends.get(i).is_some_and(|b| core.active(b) == 0));
        idle.or_else(|| least_cost(&self.eligible, backends, |b| (core.active(b) + 1, u64::from(b.weight))))
    }
}
