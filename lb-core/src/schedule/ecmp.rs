//! L3 ECMP ("ecmp"): RFC 2992 hash-threshold over the (source, destination) address hash, from lb-hash,
//! as a router spreads flows over equal-cost next hops: ports do not matter, so all of a client's flows
//! to a VIP take one backend.
//!
//! It is not consistent hashing: a backend that joins, leaves or drains shifts every region's
//! boundaries, so flows hashed to backends that stay can move as well (up to a third of them when one
//! of four leaves), where Maglev (mh) moves almost none. Conntrack keeps established flows on their
//! backend; a flow that the router upstream moves to another load-balancer node, which has no entry
//! for it, takes the backend of the new regions there.

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
