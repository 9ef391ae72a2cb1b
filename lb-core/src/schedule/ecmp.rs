//! L3 ECMP ("ecmp"): RFC 2992 hash-threshold over the (source, destination) address hash, from lb-hash,
//! as a router spreads flows over equal-cost next hops: ports do not matter, so all of a client's flows
//! to a VIP take one backend.

use lb_hash::{BuildError, EcmpHashThreshold};

use super::{CoreState, FlowInput, HashedSelection, Scheduler};
use crate::service::Backend;

/// Hash-threshold next-hop choice.
#[derive(Debug, Clone)]
pub struct Ecmp {
    selection: HashedSelection,
}

impl Ecmp {
    /// Built from the service's backends.
    pub fn new(backends: &[Backend]) -> Result<Self, BuildError> {
        let selection = HashedSelection::new(backends, |hb| {
            let e = EcmpHashThreshold::new(hb)?;
            let order = e.backends().iter().map(|b| b.id).collect();
            Ok((e.into(), order))
        })?;
        Ok(Ecmp { selection })
    }
}

impl Scheduler for Ecmp {
    #[inline]
    fn pick(&self, flow: &FlowInput, _backends: &[Backend], _core: &mut CoreState<'_>) -> Option<usize> {
        self.selection.pick(flow.hasher.src_dst(flow.src, flow.dst))
    }
}
