//! Backend selection for new flows, one scheduler per file behind the [`Scheduler`] trait.
//!
//! A scheduler is chosen per service by [`SchedulerKind`] (the `ipvsadm -s` names). Its read-only part
//! (eligible backends, a Maglev table, a weighted round-robin sequence) is built by the control side
//! into the service's [`Tables`](crate::service::Tables); its mutable part is per core and lives in the
//! [`Worker`](crate::Worker): a cursor per service (rr, wrr) and the core's connection count per backend
//! (lc, wlc, sed, nq).
//!
//! **Per core.** "Least connections" means the connections *this core* tracks to each backend (its
//! conntrack entries that point at the backend), not a node-wide count: cores share nothing on the fast
//! path. With RSS spreading flows evenly over cores this approximates the node-wide choice; each core
//! balances its own share. Round-robin cursors are per core too; each core's start at its own index
//! (core k's first rr pick is the k-th eligible backend), so the cores do not all begin with the first.
//!
//! Only backends that take new flows (active, weight above 0) are ever picked; draining backends keep
//! their established flows through conntrack.
//!
//! | kind | file | picks by |
//! |---|---|---|
//! | rr | `round_robin` | cursor over eligible backends |
//! | wrr | `weighted_round_robin` | cursor times a golden-ratio stride over the weights laid end to end: exact shares, interleaved |
//! | lc | `least_connections` | smallest overhead on this core (established x 256 + other entries, as IPVS) |
//! | wlc | `weighted_least_connections` | smallest overhead per unit of weight |
//! | sed | `shortest_expected_delay` | smallest (connections + 1) / weight |
//! | nq | `never_queue` | an idle backend if any, else as sed |
//! | sh | `source_hashing` | Maglev table over the client address hash (lb-hash) |
//! | dh | `destination_hashing` | Maglev table over the destination address hash (lb-hash) |
//! | mh | `maglev` | Maglev table over the 5-tuple hash (lb-hash) |
//! | hrw | `rendezvous` | weighted rendezvous over the 5-tuple hash (lb-hash) |
//! | ecmp | `ecmp` | RFC 2992 hash-threshold over the (source, destination) hash (lb-hash) |
//!
//! lc and wlc weigh connections as IPVS does (`ip_vs_dest_conn_overhead`): an established TCP
//! connection counts 256, every other tracked entry 1. sed and nq count every tracked entry alike;
//! IPVS counts only its active connections there, which never include UDP, so a UDP service under
//! IPVS sed sends every new flow to the heaviest backend: not copied.

mod destination_hashing;
mod ecmp;
mod least_connections;
mod maglev;
mod never_queue;
mod rendezvous;
mod round_robin;
mod shortest_expected_delay;
mod source_hashing;
mod weighted_least_connections;
mod weighted_round_robin;

pub use destination_hashing::DestinationHashing;
pub use ecmp::Ecmp;
pub use least_connections::LeastConnections;
pub use maglev::Maglev;
pub use never_queue::NeverQueue;
pub use rendezvous::Rendezvous;
pub use round_robin::RoundRobin;
pub use shortest_expected_delay::ShortestExpectedDelay;
pub use source_hashing::SourceHashing;
pub use weighted_least_connections::WeightedLeastConnections;
pub use weighted_round_robin::WeightedRoundRobin;

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::net::{IpAddr, SocketAddr};

use lb_hash::{AnySelector, BackendId, BuildError, FlowHasher, Selector};

use crate::config::SchedulerKind;
use crate::service::Backend;
use crate::stats::BackendLine;

/// What a scheduler sees of a new flow.
#[derive(Debug, Clone, Copy)]
pub struct FlowInput {
    /// Client address.
    pub src: IpAddr,
    /// Destination (the VIP).
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Client port.
    pub sport: u16,
    /// Service port.
    pub dport: u16,
    /// The lb-hash 5-tuple hash of the flow (computed once per packet by the worker), what mh and hrw
    /// pick by; for a service with ClientIP affinity, the hash of the client address instead (as sh
    /// hashes), so that cores and nodes without the client's affinity record pick alike.
    pub flow_hash: u64,
    /// The node's flow hasher, for schedulers that hash another key (sh, dh, ecmp).
    pub hasher: FlowHasher,
}

/// The per-core, mutable side of scheduling for one service.
#[derive(Debug)]
pub struct CoreState<'a> {
    /// This core's cursor for the service (rr, wrr).
    pub cursor: &'a mut u32,
    /// This core's counters, indexed by backend slot (lc, wlc, sed, nq read `active_conns`).
    pub(crate) conns: &'a [BackendLine],
}

impl<'a> CoreState<'a> {
    /// A core state with `cursor` and no connection counts (every backend has none), for picking
    /// outside a worker, e.g. to ask which backend a flow would go to.
    pub fn new(cursor: &'a mut u32) -> Self {
        CoreState { cursor, conns: &[] }
    }

    /// Connections this core tracks to `backend`.
    pub fn active(&self, backend: &Backend) -> u64 {
        self.conns.get(backend.slot().index()).map_or(0, |c| c.counters.active_conns)
    }

    /// IPVS's connection overhead for `backend` on this core (`ip_vs_dest_conn_overhead`): an
    /// established TCP connection weighs 256, any other tracked entry (handshake, closing,
    /// time-wait, UDP) weighs 1, so a burst of half-open or short UDP flows does not outweigh long
    /// established ones. What lc and wlc compare.
    pub fn overhead(&self, backend: &Backend) -> u64 {
        self.conns.get(backend.slot().index()).map_or(0, |line| {
            let c = &line.counters;
            let established = c.established_conns.min(c.active_conns);
            (established << 8) + (c.active_conns - established)
        })
    }

    /// Advances the cursor and returns its previous value.
    pub fn next_cursor(&mut self) -> u32 {
        let c = *self.cursor;
        *self.cursor = c.wrapping_add(1);
        c
    }
}

/// Picks a backend for a new flow.
pub trait Scheduler {
    /// Index into `backends` (the service's backends, as the scheduler was built from) of the backend
    /// for a new flow, or `None` when no backend takes new flows. Never allocates, never panics.
    fn pick(&self, flow: &FlowInput, backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize>;
}

/// A service's scheduler, dispatched by `match` (no virtual call on the fast path).
#[derive(Debug, Clone)]
pub enum ServiceScheduler {
    /// rr
    RoundRobin(RoundRobin),
    /// wrr
    WeightedRoundRobin(WeightedRoundRobin),
    /// lc
    LeastConnections(LeastConnections),
    /// wlc
    WeightedLeastConnections(WeightedLeastConnections),
    /// sed
    ShortestExpectedDelay(ShortestExpectedDelay),
    /// nq
    NeverQueue(NeverQueue),
    /// sh
    SourceHashing(SourceHashing),
    /// dh
    DestinationHashing(DestinationHashing),
    /// mh
    Maglev(Maglev),
    /// hrw
    Rendezvous(Rendezvous),
    /// ecmp
    Ecmp(Ecmp),
}

impl ServiceScheduler {
    /// Builds the scheduler of `kind` over `backends` (the control side; allocates).
    /// `maglev_size` is the table size for mh, sh and dh (`None`: [`lb_hash::maglev_table_size_stable_for`], 65 537 up to 655 backends).
    pub fn build(kind: SchedulerKind, backends: &[Backend], maglev_size: Option<u32>) -> Result<Self, BuildError> {
        Ok(match kind {
            SchedulerKind::RoundRobin => Self::RoundRobin(RoundRobin::new(backends)),
            SchedulerKind::WeightedRoundRobin => Self::WeightedRoundRobin(WeightedRoundRobin::new(backends)),
            SchedulerKind::LeastConnections => Self::LeastConnections(LeastConnections::new(backends)),
            SchedulerKind::WeightedLeastConnections => {
                Self::WeightedLeastConnections(WeightedLeastConnections::new(backends))
            }
            SchedulerKind::ShortestExpectedDelay => Self::ShortestExpectedDelay(ShortestExpectedDelay::new(backends)),
            SchedulerKind::NeverQueue => Self::NeverQueue(NeverQueue::new(backends)),
            SchedulerKind::SourceHashing => Self::SourceHashing(SourceHashing::new(backends, maglev_size)?),
            SchedulerKind::DestinationHashing => {
                Self::DestinationHashing(DestinationHashing::new(backends, maglev_size)?)
            }
            SchedulerKind::Maglev => Self::Maglev(Maglev::new(backends, maglev_size)?),
            SchedulerKind::Rendezvous => Self::Rendezvous(Rendezvous::new(backends)?),
            SchedulerKind::Ecmp => Self::Ecmp(Ecmp::new(backends)?),
        })
    }

    /// Which scheduler this is.
    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::RoundRobin(_) => SchedulerKind::RoundRobin,
            Self::WeightedRoundRobin(_) => SchedulerKind::WeightedRoundRobin,
            Self::LeastConnections(_) => SchedulerKind::LeastConnections,
            Self::WeightedLeastConnections(_) => SchedulerKind::WeightedLeastConnections,
            Self::ShortestExpectedDelay(_) => SchedulerKind::ShortestExpectedDelay,
            Self::NeverQueue(_) => SchedulerKind::NeverQueue,
            Self::SourceHashing(_) => SchedulerKind::SourceHashing,
            Self::DestinationHashing(_) => SchedulerKind::DestinationHashing,
            Self::Maglev(_) => SchedulerKind::Maglev,
            Self::Rendezvous(_) => SchedulerKind::Rendezvous,
            Self::Ecmp(_) => SchedulerKind::Ecmp,
        }
    }
}

impl ServiceScheduler {
    /// The Maglev table new flows are picked from (mh, sh and dh), for the control side to compare
    /// one build with the next ([`lb_hash::MaglevTable::changes_from`]); `None` for other schedulers
    /// and when no backend takes new flows.
    pub fn maglev_table(&self) -> Option<&lb_hash::MaglevTable> {
        let selection = match self {
            Self::Maglev(s) => &s.selection,
            Self::SourceHashing(s) => &s.selection,
            Self::DestinationHashing(s) => &s.selection,
            _ => return None,
        };
        match selection.selector.as_ref()? {
            AnySelector::Maglev(t) => Some(t),
            _ => None,
        }
    }
}

impl ServiceScheduler {
    /// For Maglev (mh), reads the table entry and the index map that picking a backend for a flow
    /// with lb-hash 5-tuple hash `flow_hash` will read: loads whose only purpose is to bring those
    /// lines in ahead of [`Scheduler::pick`] (the worker's batch passes). 0 for other schedulers,
    /// whose picks read nothing the batch passes do not (or hash something else: sh, dh).
    #[inline]
    pub fn touch(&self, flow_hash: u64) -> u32 {
        match self {
            Self::Maglev(s) => s.selection.touch(flow_hash),
            _ => 0,
        }
    }

    /// For Maglev (mh), the backend [`Scheduler::pick`] will give a flow with lb-hash 5-tuple hash
    /// `flow_hash` (a pure function of the tables): the worker reads that backend's counters ahead.
    /// `None` for other schedulers.
    #[inline]
    pub fn likely_pick(&self, flow_hash: u64) -> Option<usize> {
        match self {
            Self::Maglev(s) => s.selection.pick(flow_hash),
            _ => None,
        }
    }
}

impl ServiceScheduler {
    /// For Maglev (mh), its table with entries naming backend slots (see [`Maglev`]'s `ring`); `None`
    /// for other schedulers and when no backend takes new flows.
    pub(crate) fn ring(&self) -> Option<&Arc<[u32]>> {
        match self {
            Self::Maglev(s) => s.ring.as_ref(),
            _ => None,
        }
    }
}

/// What a service's ring entries are relative to: its lowest backend slot (0 with no backend). A
/// new flow's backend slot is its ring entry plus its service's base.
pub(crate) fn ring_base(backends: &[Backend]) -> u32 {
    backends.iter().map(|b| b.id.slot).min().unwrap_or(0)
}

impl ServiceScheduler {
    /// This scheduler with its ring (mh) made for `backends` (of the same addresses, ports, weights
    /// and states as those it was built from, on other slots): the Maglev table itself is shared,
    /// not rebuilt. Other schedulers name no slot: a clone.
    pub(crate) fn with_ring_for(&self, backends: &[Backend]) -> Self {
        match self {
            Self::Maglev(s) => {
                Self::Maglev(Maglev { ring: s.selection.slot_ring(backends), selection: s.selection.clone() })
            }
            other => other.clone(),
        }
    }
}

impl Scheduler for ServiceScheduler {
    #[inline]
    fn pick(&self, flow: &FlowInput, backends: &[Backend], core: &mut CoreState<'_>) -> Option<usize> {
        match self {
            Self::RoundRobin(s) => s.pick(flow, backends, core),
            Self::WeightedRoundRobin(s) => s.pick(flow, backends, core),
            Self::LeastConnections(s) => s.pick(flow, backends, core),
            Self::WeightedLeastConnections(s) => s.pick(flow, backends, core),
            Self::ShortestExpectedDelay(s) => s.pick(flow, backends, core),
            Self::NeverQueue(s) => s.pick(flow, backends, core),
            Self::SourceHashing(s) => s.pick(flow, backends, core),
            Self::DestinationHashing(s) => s.pick(flow, backends, core),
            Self::Maglev(s) => s.pick(flow, backends, core),
            Self::Rendezvous(s) => s.pick(flow, backends, core),
            Self::Ecmp(s) => s.pick(flow, backends, core),
        }
    }
}

/// Indices of the backends that take new flows.
fn eligible(backends: &[Backend]) -> Box<[u16]> {
    backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.takes_new_flows())
        .filter_map(|(i, _)| u16::try_from(i).ok())
        .collect()
}

/// The eligible backend with the smallest cost, comparing costs `(numerator, weight)` as fractions by
/// cross-multiplying (no division, no float). Ties go to the earlier backend, as IPVS does.
fn least_cost(eligible: &[u16], backends: &[Backend], cost: impl Fn(&Backend) -> (u64, u64)) -> Option<usize> {
    let mut best: Option<(usize, u64, u64)> = None;
    for &i in eligible {
        let i = usize::from(i);
        let Some(b) = backends.get(i) else { continue };
        let (n, w) = cost(b);
        let better = match best {
            None => true,
            Some((_, bn, bw)) => u128::from(n) * u128::from(bw) < u128::from(bn) * u128::from(w),
        };
        if better {
            best = Some((i, n, w));
        }
    }
    best.map(|(i, _, _)| i)
}

/// An lb-hash selector over the service's backends, with the map from the selector's index (backends
/// sorted by [`BackendId`]) to the service's backend index. `None` when no backend takes new flows.
#[derive(Debug, Clone)]
struct HashedSelection {
    selector: Option<AnySelector>,
    /// `None` when the map is the identity, as it is whenever the service's backends are sorted by
    /// identity as the tables keep them: a new flow's pick then reads no map (a small allocation of
    /// its own, one more cache line per new flow when the services outnumber the cache).
    to_backend: Option<Box<[u16]>>,
}

/// The lb-hash view of the service's backends: identity from address and port, weight 0 when the
/// backend takes no new flows (lb-hash keeps its index but gives it nothing).
fn hash_backends(backends: &[Backend]) -> Vec<lb_hash::Backend> {
    backends
        .iter()
        .map(|b| lb_hash::Backend {
            id: BackendId::from_socket_addr(SocketAddr::new(b.addr, b.port)),
            weight: if b.takes_new_flows() { b.weight } else { 0 },
        })
        .collect()
}

impl HashedSelection {
    /// Over a weighted Maglev table of `size` entries (prime; `None`: lb-hash's size that stays put as
    /// backends come and go, 65 537 up to 655 backends): what mh, sh and dh pick from.
    fn maglev(backends: &[Backend], size: Option<u32>) -> Result<Self, BuildError> {
        Self::new(backends, |hb| {
            let t =
                lb_hash::MaglevTable::new(hb, size.unwrap_or_else(|| lb_hash::maglev_table_size_stable_for(hb.len())))?;
            let order = t.backends().iter().map(|b| b.id).collect();
            Ok((t.into(), order))
        })
    }

    fn new(
        backends: &[Backend],
        build: impl FnOnce(&[lb_hash::Backend]) -> Result<(AnySelector, Vec<BackendId>), BuildError>,
    ) -> Result<Self, BuildError> {
        let hb = hash_backends(backends);
        if !hb.iter().any(lb_hash::Backend::is_serving) {
            return Ok(HashedSelection { selector: None, to_backend: None });
        }
        let (selector, order) = build(&hb)?;
        // Each identity's index by binary search over the sorted identities (a linear search per
        // identity took 1.7 s of a 2.8-s, 65 535-backend build; benches tables one-service/mh).
        let mut by_id: Vec<(BackendId, usize)> = hb.iter().enumerate().map(|(i, b)| (b.id, i)).collect();
        by_id.sort_unstable();
        let to_backend: Box<[u16]> = order
            .iter()
            .map(|id| {
                let found = by_id.binary_search_by_key(id, |&(id, _)| id).ok();
                found.and_then(|k| by_id.get(k)).and_then(|&(_, i)| u16::try_from(i).ok()).unwrap_or(u16::MAX)
            })
            .collect();
        let identity = to_backend.len() == hb.len() && to_backend.iter().enumerate().all(|(i, &b)| usize::from(b) == i);
        Ok(HashedSelection { selector: Some(selector), to_backend: (!identity).then_some(to_backend) })
    }

    /// See [`ServiceScheduler::touch`].
    #[inline]
    fn touch(&self, hash: u64) -> u32 {
        let Some(AnySelector::Maglev(table)) = self.selector.as_ref() else { return 0 };
        let map = self.to_backend.as_ref().and_then(|m| m.first().copied()).unwrap_or(0);
        table.lookup(hash).unwrap_or(0) ^ u32::from(map)
    }

    #[inline]
    fn pick(&self, hash: u64) -> Option<usize> {
        self.backend_of(self.selector.as_ref()?.select(hash)?)
    }

    /// For a Maglev selector, its table with each entry mapped to `backends[i].id.slot` less
    /// [`ring_base`]`(backends)` (`i` the entry's backend index in the service); `None` for other
    /// selectors and when an entry names no backend of `backends`. Relative to the base, the ring
    /// serves every service whose backends have the same slots shifted by one number (see
    /// [`crate::service::TableBuilder`]). One gather through a per-backend array: an update
    /// rebuilding one default-size (65 537-entry) table costs ~0.1 ms more for it, against ~0.37 ms
    /// when each entry was mapped on its own (`cargo bench -p lb-benches --bench tables`, one-changed).
    fn slot_ring(&self, backends: &[Backend]) -> Option<Arc<[u32]>> {
        let Some(AnySelector::Maglev(table)) = self.selector.as_ref() else { return None };
        let base = ring_base(backends);
        let slots: Option<Vec<u32>> = (0..table.backends().len())
            .map(|i| {
                let b = u32::try_from(i).ok().and_then(|i| self.backend_of(i)).and_then(|bi| backends.get(bi));
                b.map(|b| b.id.slot.wrapping_sub(base))
            })
            .collect();
        let slots = slots?;
        table.entries().iter().map(|&e| slots.get(usize::from(e)).copied()).collect()
    }

    /// The service's backend index of the selector's backend `i`.
    #[inline]
    fn backend_of(&self, i: u32) -> Option<usize> {
        let b = match &self.to_backend {
            None => return usize::try_from(i).ok(),
            Some(map) => *map.get(i as usize)?,
        };
        (b != u16::MAX).then_some(usize::from(b))
    }
}

#[cfg(test)]
mod tests;
