//! Maglev ("mh"): a weighted Maglev table from lb-hash, indexed by the hash of the 5-tuple (Maglev, NSDI'16):
//! consistent, so flows move little when backends change and every node agrees.

use alloc::sync::Arc;

use lb_hash::BuildError;

use super::{CoreState, FlowInput, HashedSelection, Scheduler};
use crate::service::Backend;

/// Maglev over a weighted Maglev table.
#[derive(Debug, Clone)]
pub struct Maglev {
    pub(super) selection: HashedSelection,
    /// The table again, each entry naming its backend's slot (`Backend::id`) less the service's
    /// ring base (its lowest backend slot) rather than its index: what a worker's new flows pick
    /// from through the service index, reading neither the service record nor this scheduler (see
    /// [`crate::service::Tables`]). Shared by the clones a builder keeps while the service's
    /// backends stay the same (their slots stay too), and by the services of the same inputs whose
    /// slots are these shifted. `None` when no backend takes new flows.
    pub(super) ring: Option<Arc<[u32]>>,
}

impl Maglev {
    /// Built from the service's backends; `size` is the Maglev table size (prime), `None` for
    /// lb-hash's size that stays put as backends come and go (65 537 up to 655 backends).
    pub fn new(backends: &[Backend], size: Option<u32>) -> Result<Self, BuildError> {
        let selection = HashedSelection::maglev(backends, size)?;
        let ring = selection.slot_ring(backends);
        Ok(Maglev { selection, ring })
    }
}

impl Scheduler for Maglev {
    #[inline]
    fn pick(&self, flow: &FlowInput, _backends: &[Backend], _core: &mut CoreState<'_>) -> Option<usize> {
        self.selection.pick(flow.flow_hash)
    }
}
