//! SourceHashing ("sh"): a weighted Maglev table from lb-hash, indexed by the hash of the client address, so one client always reaches one backend while the set is stable.

use lb_hash::BuildError;

use super::{CoreState, FlowInput, HashedSelection, Scheduler};
use crate::service::Backend;

/// SourceHashing over a weighted Maglev table.
#[derive(Debug, Clone)]
pub struct SourceHashing {
    pub(super) selection: HashedSelection,
}

impl SourceHashing {
    /// Built from the service's backends; `size` is the Maglev table size (prime), `None` for
    /// lb-hash's size that stays put as backends come and go (65 537 up to 655 backends).
    pub fn new(backends: &[Backend], size: Option<u32>) -> Result<Self, BuildError> {
        let selection = HashedSelection::maglev(backends, size)?;
        Ok(SourceHashing { selection })
    }
}

impl Scheduler for SourceHashing {
    #[inline]
    fn pick(&self, flow: &FlowInput, _backends: &[Backend], _core: &mut CoreState<'_>) -> Option<usize> {
        self.selection.pick(flow.hasher.source(flow.src))
    }
}
