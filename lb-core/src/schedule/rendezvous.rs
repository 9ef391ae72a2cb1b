//! Rendezvous ("hrw"): weighted highest-random-weight hashing of the 5-tuple, from lb-hash. Consistent
//! like Maglev with no table, at a cost per pick that grows with the backend count.

use lb_hash::BuildError;

use super::{CoreState, FlowInput, HashedSelection, Scheduler};
use crate::service::Backend;

/// Weighted rendezvous over the flow hash.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    selection: HashedSelection,
}

impl Rendezvous {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Result<Self, BuildError> {
        let selection = HashedSelection::new(backends, |hb| {
            let r = lb_hash::Rendezvous::new(hb)?;
            let order = r.backends().iter().map(|b| b.id).collect();
            Ok((r.into(), order))
        })?;
        Ok(Rendezvous { selection })
    }
}

impl Scheduler for Rendezvous {
    #[inline]
    fn pick(&self, flow: &FlowInput, _backends: &[Backend], _core: &mut CoreState<'_>) -> Option<usize> {
        self.selection.pick(flow.flow_hash)
    }
}
