//! DestinationHashing ("dh"): a weighted Maglev table from lb-hash, indexed by the hash of the destination address (IPVS's cache-cluster scheduler; for a single VIP every flow has the same destination, so it sends a service's traffic to one backend).

use lb_hash::BuildError;

use super::{CoreState, FlowInput, HashedSelection, Scheduler};
use crate::service::Backend;

/// DestinationHashing over a weighted Maglev table.
#[derive(Debug, Clone)]
pub struct DestinationHashing {
    pub(super) selection: HashedSelection,
}

impl DestinationHashing {
    /// Built from the service's backends; `size` is the Maglev table size (prime), `None` for
    /// lb-hash's size that stays put as backends come and go (65 537 up to 655 backends).
    pub fn new(backends: &[Backend], size: Option<u32>) -> Result<Self, BuildError> {
        let selection = HashedSelection::maglev(backends, size)?;
        Ok(DestinationHashing { selection })
    }
}

impl Scheduler for DestinationHashing {
    #[inline]
    fn pick(&self, flow: &FlowInput, _backends: &[Backend], _core: &mut CoreState<'_>) -> Option<usize> {
        self.selection.pick(flow.hasher.destination(flow.dst))
    }
}
