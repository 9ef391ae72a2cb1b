//! Virtual services and their backends, as the fast path reads them: [`Tables`], built whole by the
//! control side's [`TableBuilder`] and swapped into each worker between bursts.
//!
//! ```text
//!   Config ──► TableBuilder::build ──► validate whole ──► Arc<Tables> ──► Worker::swap_tables
//!                (keeps slot numbers          │ error: nothing changes, old tables keep serving
//!                 across builds)              ▼
//!              Tables: (VIP, port, proto) ─► Service { backends, scheduler, mode, affinity, ranges }
//!                      VIP set (VIP but no such port: counted drop; not a VIP: pass to the kernel;
//!                      lb-io's XDP program already leaves both to the kernel)
//!                      backend slot ─► (service, backend) for conntrack entries
//! ```
//!
//! **Slots.** Every service and every backend (a service key plus the backend's address and port, and
//! whether the service uses full NAT, from which SNAT address) gets a slot number that the builder
//! keeps across builds, with a generation. Conntrack entries name their backend by [`BackendRef`]
//! (slot + generation), so a flow keeps its backend across any table swap that keeps the backend
//! (weight changes, other backends added or removed), and a flow whose backend left is recognised as
//! such even if the slot went to a newcomer. A service switched into or out of NAT has new backends
//! in this sense: its flows, which NAT and the other modes track differently, follow its
//! [`RemovedBackendPolicy`]; so has a NAT service whose backends' SNAT address changed (see
//! `BackendKey`). Each keeps its slot number with a new generation, and its counters carry on (the
//! same backend to the metrics).
//! Per-core counters are indexed by slot; [`Limits`] bound the slot numbers so a worker sizes its
//! arrays once.
//!
//! **Generations are unique in the process.** One counter, shared by every builder, hands out the
//! generation of each slot a service or backend gets, so a (slot, generation) pair names the one key
//! it was made for in tables of any builder: a worker may take tables from a fresh builder (`lb run`
//! starts its workers on empty tables of its own) or from a clone, and a flow can never land on
//! another backend, or another service, that another builder numbered alike; nor can that backend's
//! counters take over its connections. What another builder numbered differently is a departed
//! backend to the flow, which follows its service's [`RemovedBackendPolicy`]; to keep flows, keep one
//! builder (or clones of it: a clone keeps the pairs of the keys it has).
//!
//! The counter is a `u32`: after about 4.3 billion slot assignments in one process it wraps
//! (skipping 0), and only then can a pair recur. A recurring pair misleads a worker only if what was
//! made under the old one is still there when tables giving that slot number that generation
//! arrive: a conntrack or affinity entry (its flow would go to the newcomer, on the established
//! path even of another service) or the slot's counters (not zeroed for the newcomer). That takes
//! 4.3 billion assignments within one entry's idle life (a hundred a second for 16 months) and then
//! that very slot number: too remote to pay for a wider conntrack entry.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::net::IpAddr;

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use hashbrown::{HashMap, HashSet};

use crate::conntrack::{ConntrackSeed, PortKeys, addr_bytes};
use crate::packet::{Family, FlowKey};

use crate::config::{
    BackendConfig, BackendState, Cidr, Config, ForwardMode, NodeConfig, RemovedBackendPolicy, SchedulerInputs,
    SchedulerKind, ServiceConfig, ServiceKey, SpecialAddress, Timeouts, VipConflict,
};
use crate::schedule::{ServiceScheduler, ring_base};

/// A service's stable slot number (index of its per-core counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceSlot(pub u32);

impl ServiceSlot {
    /// As an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A backend's stable slot number (index of its per-core counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendSlot(pub u32);

impl BackendSlot {
    /// As an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// How a conntrack entry names its backend: slot and generation. Generation 0 names nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BackendRef {
    /// The backend's slot.
    pub slot: u32,
    /// The slot's generation when the backend got it.
    pub generation: u32,
}

/// Upper bounds on what one [`Tables`] holds, each summed over its services. The slot numbers
/// (`max_services`, `max_backends`) size a worker's per-slot arrays once, from its first tables; it
/// refuses later tables with a larger bound in either of those two
/// ([`Worker::swap_tables`](crate::Worker::swap_tables)), so every builder feeding a worker needs
/// those no larger than the builder that made its first tables. `max_maglev_entries` sizes nothing
/// in a worker (the tables are shared by every core), which takes tables of any such budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Services at most.
    pub max_services: usize,
    /// Backends (summed over services) at most.
    pub max_backends: usize,
    /// Maglev table entries (mh, sh, dh; summed over the distinct tables, each as
    /// [`ServiceConfig::maglev_entries`] counts it) at most: each service's table size is bounded,
    /// their sum only by this. Services of equal [`ServiceConfig::scheduler_inputs`] (in Kubernetes,
    /// one Service port's cluster IP, NodePorts and load-balancer IPs) share one table, counted once.
    /// Up to 6 bytes an entry (mh: 2 in the table, 4 in its ring of backend slots; sh, dh: 2), held
    /// once for all cores (the workers share one `Arc<Tables>`), and twice for a table an update
    /// rebuilds until every worker has let the old one go.
    pub max_maglev_entries: usize,
}

impl Default for Limits {
    /// 131 072 services and 262 144 backends: about 20 MiB of counters per core (32 bytes a service
    /// slot, a 64-byte cache line a backend slot: its counters and its backend's generation); and
    /// 268 439 552 Maglev entries: 4 096 tables of the default 65 537 entries, 1.5 GiB under mh.
    fn default() -> Self {
        let maglev_entries = 4096 * lb_hash::MaglevTable::DEFAULT_SIZE as usize;
        Limits { max_services: 1 << 17, max_backends: 1 << 18, max_maglev_entries: maglev_entries }
    }
}

/// The most backends one service may have (backend indices are `u16`).
pub const MAX_BACKENDS_PER_SERVICE: usize = u16::MAX as usize;

/// One backend of a built service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Address.
    pub addr: IpAddr,
    /// Port (equal to the service port except in NAT mode).
    pub port: u16,
    /// Weight; 0 takes no new flows.
    pub weight: u32,
    /// Active or draining.
    pub state: BackendState,
    /// Ethernet destination for frames to this backend (its own MAC or the node's gateway).
    pub mac: [u8; 6],
    /// Slot and generation.
    pub id: BackendRef,
}

impl Backend {
    /// True when the backend takes new flows (active and weight above 0).
    pub fn takes_new_flows(&self) -> bool {
        self.state == BackendState::Active && self.weight > 0
    }

    /// The backend's slot.
    pub fn slot(&self) -> BackendSlot {
        BackendSlot(self.id.slot)
    }

    /// The conntrack keys a full-NAT flow's replies from this backend arrive under, from SNAT
    /// address `snat`: from the backend's address and port to `snat`, to any SNAT port, hashed
    /// under `seed` (the connection table's).
    pub(crate) fn reply_keys(&self, seed: ConntrackSeed, snat: IpAddr) -> PortKeys {
        PortKeys::flow(seed, self.addr, snat, self.port)
    }
}

/// One built virtual service.
///
/// `repr(C)`, line-aligned, laid out for a flow's first packet, this record's reader on the fast path
/// (an established flow's packets find what they need in their backend's location): line 0 holds all
/// that a new flow reads besides its scheduler (backends, key, slot, affinity, mode, policy), the
/// scheduler starts line 1, and what the per-packet path never reads comes last. The worker's batch
/// warm-up reads lines 0 and 1 (the scheduler's, through [`ServiceScheduler::touch`]) ahead of the
/// decision; with 100 000 services the line holding the affinity timeout, when it sat apart, was a
/// DRAM miss of its own per new flow. A test holds the offsets.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub struct Service {
    /// The backends, sorted by lb-hash identity (address and port).
    pub backends: Vec<Backend>,
    /// VIP, port, protocol.
    pub key: ServiceKey,
    /// Stable slot.
    pub slot: ServiceSlot,
    /// ClientIP affinity timeout in seconds, if enabled.
    pub affinity_timeout_secs: Option<u32>,
    /// Forwarding mode.
    pub mode: ForwardMode,
    /// What happens to flows whose backend left.
    pub on_backend_removed: RemovedBackendPolicy,
    /// New-flow selection.
    pub scheduler: ServiceScheduler,
    /// The slot's generation when the service got it.
    pub generation: u32,
    /// Allowed client prefixes; empty allows all (the worker reads this only when it is not).
    pub source_ranges: Vec<Cidr>,
    /// Name for logs and errors.
    pub name: String,
    /// Whether the neighbour responder answers ARP / NDP for the VIP
    /// ([`ServiceConfig::answer_neighbours`](crate::config::ServiceConfig::answer_neighbours)).
    pub answer_neighbours: bool,
}

impl Service {
    /// True when `client` may use the service.
    #[inline]
    pub fn allows(&self, client: IpAddr) -> bool {
        self.source_ranges.is_empty() || self.source_ranges.iter().any(|c| c.contains(client))
    }
}

/// Where a backend slot lives in one version of the tables, with a copy of the backend itself and
/// its service's [`ServiceSummary`]: a packet of an established flow finds everything its decision
/// and rewrite need in this one line (no service index slot, no service record, no backend array;
/// with 100 000 services each of those was a DRAM miss per packet). Exactly 64 bytes (a test holds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
struct BackendLocation {
    generation: u32,
    backend: u16,
    summary: ServiceSummary,
    record: Backend,
}

impl Default for BackendLocation {
    fn default() -> Self {
        let record = Backend {
            addr: IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
            weight: 0,
            state: BackendState::Active,
            mac: [0; 6],
            id: BackendRef::default(),
        };
        BackendLocation { generation: 0, backend: 0, summary: IndexSlot::default().service, record }
    }
}

/// Everything the fast path reads: read-only, shared by `Arc`, replaced whole.
#[derive(Debug)]
pub struct Tables {
    node: NodeConfig,
    services: Vec<Service>,
    index: ServiceIndex,
    /// Every VIP, and whether a service on it has ARP / NDP answered for it.
    vips: HashMap<IpAddr, bool>,
    backend_locations: Vec<BackendLocation>,
    /// Per backend slot (as `backend_locations`), the backend's full-NAT reply keys (from the
    /// backend and its port to the node's SNAT address of its family; `None` where the node has
    /// none, or the slot no backend), made here with the tables, off the fast path, so that a new
    /// full-NAT flow's SNAT port guess makes its reply key by a copy and hashes it in two multiplies
    /// of four ([`Tables::nat_reply_keys`]). 64 bytes a backend slot (one SNAT address a
    /// backend); apart from the locations, whose 64 bytes have none to spare.
    reply_keys: Vec<Option<PortKeys>>,
    /// The seed of the connection table hash `reply_keys` were hashed under: that of every
    /// worker's table these tables may serve ([`Tables::conntrack_seed`]).
    conntrack_seed: ConntrackSeed,
    limits: Limits,
    /// Entries of the distinct Maglev tables (see [`Limits::max_maglev_entries`]).
    maglev_entries: usize,
    version: u64,
    /// Backend slots whose backend's service switched into or out of NAT or whose SNAT address
    /// changed (in this build or an earlier one), each with the generation the backend had before
    /// (sorted by slot): see [`Tables::carries_counters_of`].
    successions: Box<[(u32, u32)]>,
}

impl Tables {
    /// The service at (VIP, port, protocol), with its index in [`Tables::services`].
    #[inline]
    pub fn lookup(&self, key: &ServiceKey) -> Option<(usize, &Service)> {
        let v6 = key.vip.is_ipv6();
        let i = self.index.get(&addr_bytes(key.vip), v6, key.port, key.proto.number())?.index as usize;
        Some((i, self.services.get(i)?))
    }

    /// The hash [`Tables::lookup_flow`] of `flow` starts from; computed once per frame by the worker,
    /// which passes it to [`Tables::touch_lookup`] and [`Tables::lookup_flow_hashed`] (hashing twice
    /// was about 16 instructions per packet, callgrind).
    #[inline]
    pub fn lookup_hash(&self, flow: &FlowKey) -> u64 {
        index_hash(flow.dst_bytes(), flow.dst_port(), flow.proto())
    }

    /// Brings the index slot where the lookup of a flow with [`Tables::lookup_hash`] `hash` starts,
    /// and the one after it, into the cache ahead of the lookup (prefetch hints, see the worker's
    /// batch passes). The index probes linearly and is at most half full, so ~30 % of lookups read a
    /// second slot (with 100 000 services, ~0.3 misses a new flow outside the warm-up, callgrind).
    #[inline]
    pub fn touch_lookup(&self, hash: u64) {
        let at = hash as usize & self.index.mask;
        for i in [at, at + 1] {
            lb_prefetch::element(&self.index.slots, i & self.index.mask);
        }
    }

    /// The index of the service a parsed flow is addressed to (its destination, destination port and
    /// protocol), for [`Tables::service`]. The fast path's lookup: no `IpAddr` built, one cache line read.
    #[inline]
    pub fn lookup_flow(&self, flow: &FlowKey) -> Option<usize> {
        self.lookup_flow_hashed(flow, self.lookup_hash(flow)).map(|s| s.index as usize)
    }

    /// [`Tables::lookup_flow`] with the flow's [`Tables::lookup_hash`] already computed, giving the
    /// service's [`ServiceSummary`] (its index and what a packet of a known flow needs of it).
    #[inline]
    pub fn lookup_flow_hashed(&self, flow: &FlowKey, hash: u64) -> Option<ServiceSummary> {
        self.lookup_flow_ring(flow, hash).map(|(s, _)| s)
    }

    /// [`Tables::lookup_flow_hashed`], with where the service's ring is (for [`Tables::ring_backend`]).
    #[inline]
    pub(crate) fn lookup_flow_ring(&self, flow: &FlowKey, hash: u64) -> Option<(ServiceSummary, RingRef)> {
        let (at, slot) = self.index.get_hashed(
            hash,
            flow.dst_bytes(),
            flow.family() == Family::V6,
            flow.dst_port(),
            flow.proto(),
        )?;
        let ring = match slot.ring {
            Some(_) => RingRef(u32::try_from(at).unwrap_or(u32::MAX)),
            None => RingRef::NONE,
        };
        Some((slot.service, ring))
    }

    /// The backend slot a new flow with lb-hash 5-tuple hash `flow_hash` gets from `ring` (the
    /// service's Maglev pick: one entry of its ring, found from its index slot), or `None` when the
    /// service has no ring.
    ///
    /// `hash % size` by a hardware division, where [`lb_hash::MaglevTable`] multiplies by a
    /// precomputed 128-bit inverse (Lemire's fastmod): that inverse does not fit the index slot
    /// beside the ring, and keeping it elsewhere would be one more cache line per new flow. A 64-bit
    /// division takes 10-18 cycles on this project's AMD Zen 3/4 machines (Agner Fog's tables; older
    /// Intel cores take up to ~90), once per new flow.
    #[inline]
    pub(crate) fn ring_slot(&self, ring: RingRef, flow_hash: u64) -> Option<u32> {
        let slot = self.index.slots.get(ring.0 as usize)?;
        let entries = slot.ring.as_deref()?;
        // `hash % M` as the scheduler's table computes it. For the default size the divisor is a
        // constant, which compiles to multiplies and shifts rather than a 64-bit division.
        const DEFAULT_SIZE: u64 = lb_hash::MaglevTable::DEFAULT_SIZE as u64;
        let len = entries.len() as u64;
        let at = if len == DEFAULT_SIZE { flow_hash % DEFAULT_SIZE } else { flow_hash.checked_rem(len)? };
        entries.get(usize::try_from(at).ok()?).map(|&e| e.wrapping_add(slot.ring_base))
    }

    /// Brings the location of backend slot `slot` into the cache (the fast path's read-ahead, a
    /// prefetch hint).
    #[inline]
    pub(crate) fn touch_location(&self, slot: u32) {
        lb_prefetch::element(&self.backend_locations, slot as usize);
    }

    /// The backend [`Tables::ring_slot`] names: the copy kept in its location, one cache line.
    #[inline]
    pub(crate) fn ring_backend(&self, ring: RingRef, flow_hash: u64) -> Option<&Backend> {
        self.backend_in_slot(self.ring_slot(ring, flow_hash)?)
    }

    /// The backend in slot `slot` (a ring entry's value), if the slot holds one.
    #[inline]
    pub(crate) fn backend_in_slot(&self, slot: u32) -> Option<&Backend> {
        let loc = self.backend_locations.get(slot as usize)?;
        (loc.generation != 0).then_some(&loc.record)
    }

    /// The full-NAT reply keys of the backend in slot `slot` ([`Tables::backend_in_slot`]):
    /// from the backend to the node's SNAT address of its family (`Tables::reply_keys`), for a new
    /// full-NAT flow's SNAT port guess. `None` where the slot holds no backend, or the node has no
    /// SNAT address of the backend's family.
    #[inline]
    pub(crate) fn nat_reply_keys(&self, slot: u32) -> Option<&PortKeys> {
        self.reply_keys.get(slot as usize)?.as_ref()
    }

    /// True if `ip` is the VIP of some service.
    #[inline]
    pub fn is_vip(&self, ip: IpAddr) -> bool {
        self.vips.contains_key(&ip)
    }

    /// True if `ip` is the VIP of some service that has ARP / NDP answered for it
    /// ([`ServiceConfig::answer_neighbours`](crate::config::ServiceConfig::answer_neighbours)).
    #[inline]
    pub fn answers_neighbours_for(&self, ip: IpAddr) -> bool {
        self.vips.get(&ip) == Some(&true)
    }

    /// True if `ip` is one of the node's SNAT addresses (where NAT replies arrive).
    #[inline]
    pub fn is_snat_addr(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.node.snat_v4 == Some(a),
            IpAddr::V6(a) => self.node.snat_v6 == Some(a),
        }
    }

    /// The (service index, backend index) a conntrack entry's backend has in these tables, or `None`
    /// when that backend is no longer in its service.
    #[inline]
    pub fn resolve(&self, r: BackendRef) -> Option<(usize, usize)> {
        let loc = self.backend_locations.get(r.slot as usize)?;
        (r.generation != 0 && loc.generation == r.generation)
            .then_some((loc.summary.index as usize, usize::from(loc.backend)))
    }

    /// As [`Tables::resolve`], with the backend itself (a copy kept beside its location, so this reads
    /// one cache line): the service index and the backend, or `None` when it left its service.
    #[inline]
    pub fn resolve_backend(&self, r: BackendRef) -> Option<(usize, &Backend)> {
        self.resolve_known(r).map(|(s, b)| (s.index as usize, b))
    }

    /// As [`Tables::resolve_backend`], with the [`ServiceSummary`] of the backend's service: what a
    /// packet of an established flow needs, from one cache line.
    #[inline]
    pub fn resolve_known(&self, r: BackendRef) -> Option<(&ServiceSummary, &Backend)> {
        let loc = self.backend_locations.get(r.slot as usize)?;
        (r.generation != 0 && loc.generation == r.generation).then_some((&loc.summary, &loc.record))
    }

    /// Every service.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The service at an index from [`Tables::lookup`] or [`Tables::resolve`].
    #[inline]
    pub fn service(&self, index: usize) -> Option<&Service> {
        self.services.get(index)
    }

    /// Node settings.
    pub fn node(&self) -> &NodeConfig {
        &self.node
    }

    /// The slot limits of the builder that built these tables.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The connection table seed of the builder that built these tables
    /// ([`TableBuilder::with_conntrack_seed`]): a worker's table hashes under the seed of its first
    /// tables, and it refuses tables of another.
    #[inline]
    pub fn conntrack_seed(&self) -> ConntrackSeed {
        self.conntrack_seed
    }

    /// The Maglev table entries these tables hold: those of the distinct tables, each counted once
    /// however many services share it (what [`Limits::max_maglev_entries`] bounds).
    pub fn maglev_entries(&self) -> usize {
        self.maglev_entries
    }

    /// Counts builds of one builder: 1 for the first.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Backend slots this version uses (for a worker to notice slots handed to new backends).
    pub(crate) fn backend_slot_generations(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.backend_locations.iter().enumerate().filter(|(_, l)| l.generation != 0).map(|(i, l)| (i, l.generation))
    }

    /// Whether the backend in `slot` is the one that held it under `generation` before its service
    /// switched into or out of NAT or its SNAT address changed (see [`BackendKey`]): a new
    /// generation for its flows, which cannot cross the switch, but the same backend for its
    /// counters, which carry on.
    pub(crate) fn carries_counters_of(&self, slot: usize, generation: u32) -> bool {
        let slot = u32::try_from(slot).unwrap_or(u32::MAX);
        self.successions.binary_search_by_key(&slot, |&(s, _)| s).is_ok_and(|k| self.successions[k].1 == generation)
    }
}

/// (VIP, port, protocol) to service index: open addressing with linear probing over a flat array
/// whose slots hold the key itself, at most half full, so a lookup usually reads one cache line and
/// hashes a few machine words (a `HashMap<ServiceKey, _>` read a control line and a bucket line on
/// different pages and hashed the `IpAddr` enum field by field; with 100 000 services both missed the
/// cache on every packet). Built whole by [`TableBuilder::build`]; read-only after.
#[derive(Debug)]
struct ServiceIndex {
    slots: Box<[IndexSlot]>,
    mask: usize,
}

/// One slot of the [`ServiceIndex`], one cache line: the key, the service's [`ServiceSummary`] and its
/// ring, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(C, align(64))]
struct IndexSlot {
    /// The VIP as 16 bytes (IPv4-mapped for IPv4), as a [`FlowKey`] holds it.
    vip: [u8; 16],
    port: u16,
    proto: u8,
    /// 0: empty; 4 or 6: the VIP's IP version.
    family: u8,
    service: ServiceSummary,
    /// What the ring's entries are relative to: the service's lowest backend slot.
    ring_base: u32,
    /// The service's Maglev table with entries naming backend slots (less `ring_base`), when new
    /// flows may pick from it alone (see [`RingRef`]); shared by the services of equal scheduler
    /// inputs whose backend slots are these shifted.
    ring: Option<Arc<[u32]>>,
}

/// Names a service whose new flows pick their backend from its ring: the service's Maglev (mh)
/// table with entries naming backend slots, which its service index slot points to. A new flow's
/// pick then goes index slot (already read by the lookup) -> ring entry -> that backend's location,
/// and reads neither the service record nor its scheduler nor its backends: with 100 000 services
/// each of those was a cache miss per new flow, in a dependent round of its own (Katran's VIP entry
/// leads to its ring of backend ids the same way). Services with ClientIP affinity, other
/// schedulers, or no backend taking new flows have none ([`RingRef::NONE`]) and pick through their
/// record. A ring names exactly the backends the scheduler's own table does (a test holds the two
/// equal). The value is the index slot's position, so the worker's per-frame record holds no
/// pointer. An entry names the slot less the service's ring base (kept beside the ring), so one ring
/// serves every service of the same Maglev inputs whose backends' slots are its own shifted by one
/// number (the builder hands slots out so, see [`TableBuilder`]): one addition per new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingRef(u32);

impl RingRef {
    /// No ring.
    pub(crate) const NONE: RingRef = RingRef(u32::MAX);

    /// True when the service has a ring.
    #[inline]
    pub(crate) fn is_some(self) -> bool {
        self != Self::NONE
    }

    /// True when it has none.
    #[inline]
    pub(crate) fn is_none(self) -> bool {
        self == Self::NONE
    }
}

impl Default for IndexSlot {
    fn default() -> Self {
        let service = ServiceSummary {
            index: 0,
            slot: ServiceSlot(0),
            mode: ForwardMode::Dsr,
            on_backend_removed: RemovedBackendPolicy::Reschedule,
            all_clients: true,
        };
        IndexSlot { vip: [0; 16], port: 0, proto: 0, family: 0, service, ring_base: 0, ring: None }
    }
}

/// What deciding a packet of a known flow needs of its [`Service`], copied into the service index so
/// that such a packet never reads the `Service` record: with 100 000 services that record was a
/// cache miss of its own on every packet (the index slot grew from 32 to 64 bytes for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSummary {
    /// Index in [`Tables::services`].
    pub index: u32,
    /// [`Service::slot`].
    pub slot: ServiceSlot,
    /// [`Service::mode`].
    pub mode: ForwardMode,
    /// [`Service::on_backend_removed`].
    pub on_backend_removed: RemovedBackendPolicy,
    /// True when [`Service::source_ranges`] is empty (every client allowed).
    pub all_clients: bool,
}

impl ServiceSummary {
    fn of(
        index: usize,
        slot: ServiceSlot,
        mode: ForwardMode,
        on_backend_removed: RemovedBackendPolicy,
        ranges: &[Cidr],
    ) -> Self {
        ServiceSummary {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            slot,
            mode,
            on_backend_removed,
            all_clients: ranges.is_empty(),
        }
    }
}

impl ServiceIndex {
    /// The index of `services`, each with the ring its new flows pick from (`rings[i]`, `None`: its
    /// record's scheduler).
    fn new(services: &[Service], rings: Vec<Option<Arc<[u32]>>>) -> Self {
        let len = (services.len() * 2).next_power_of_two().max(2);
        let mut index =
            ServiceIndex { slots: alloc::vec![IndexSlot::default(); len].into_boxed_slice(), mask: len - 1 };
        for ((i, s), ring) in services.iter().enumerate().zip(rings) {
            let slot = IndexSlot {
                vip: addr_bytes(s.key.vip),
                port: s.key.port,
                proto: s.key.proto.number(),
                family: if s.key.vip.is_ipv6() { 6 } else { 4 },
                service: ServiceSummary::of(i, s.slot, s.mode, s.on_backend_removed, &s.source_ranges),
                ring_base: ring_base(&s.backends),
                ring: ring.filter(|r| s.affinity_timeout_secs.is_none() && !r.is_empty()),
            };
            // Keys are unique (the builder rejects duplicates) and the array is at most half full.
            let mut at = index_hash(&slot.vip, slot.port, slot.proto) as usize & index.mask;
            while let Some(s) = index.slots.get_mut(at) {
                if s.family == 0 {
                    *s = slot;
                    break;
                }
                at = (at + 1) & index.mask;
            }
        }
        index
    }

    /// The service index stored for the key, if any. Ends at the first empty slot, which exists
    /// because the array is at most half full.
    #[inline]
    fn get(&self, vip: &[u8; 16], v6: bool, port: u16, proto: u8) -> Option<ServiceSummary> {
        self.get_hashed(index_hash(vip, port, proto), vip, v6, port, proto).map(|(_, s)| s.service)
    }

    /// [`ServiceIndex::get`] with `index_hash(vip, port, proto)` already computed, giving the slot
    /// and its position.
    #[inline]
    fn get_hashed(&self, hash: u64, vip: &[u8; 16], v6: bool, port: u16, proto: u8) -> Option<(usize, &IndexSlot)> {
        let family = if v6 { 6 } else { 4 };
        let mut at = hash as usize & self.mask;
        loop {
            let s = self.slots.get(at)?;
            if s.family == 0 {
                return None;
            }
            if s.vip == *vip && s.port == port && s.proto == proto && s.family == family {
                return Some((at, s));
            }
            at = (at + 1) & self.mask;
        }
    }
}

/// Hash of a service key for the [`ServiceIndex`]: two multiply-folds over the address words and a
/// final avalanche (fmix64), so consecutive VIPs spread over the array.
#[inline]
fn index_hash(vip: &[u8; 16], port: u16, proto: u8) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let v = u128::from_le_bytes(*vip);
    let tail = (u64::from(port) << 8) | u64::from(proto);
    let mut h = ((v as u64) ^ K).wrapping_mul(K);
    h = (h ^ (v >> 64) as u64).wrapping_mul(K);
    h ^= tail;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Why a configuration was rejected. Each message names the service and the value to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Two services share (VIP, port, protocol).
    #[error("services {first} and {second} both use {key}: each VIP, port and protocol may have one service")]
    DuplicateService {
        /// The shared key.
        key: ServiceKey,
        /// The first service's name.
        first: String,
        /// The second service's name.
        second: String,
    },
    /// One backend listed twice in a service.
    #[error("backend {backend} appears twice in service {service}")]
    DuplicateBackend {
        /// Service name.
        service: String,
        /// The backend, `addr:port`.
        backend: String,
    },
    /// Two IPv6 backends of a hashing scheduler (mh, sh, dh, hrw, ecmp) with one lb-hash identity,
    /// which that scheduler cannot tell apart (see [`lb_hash::BackendId::from_socket_addr`]).
    #[error(
        "backends {first} and {second} of service {service} have the same lb-hash identity, which {scheduler} \
         cannot tell apart: change one's address, or use a scheduler that does not hash"
    )]
    SameBackendIdentity {
        /// Service name.
        service: String,
        /// The first backend, `addr:port`.
        first: String,
        /// The second backend, `addr:port`.
        second: String,
        /// The service's scheduler.
        scheduler: SchedulerKind,
    },
    /// A backend of the other family than the VIP (NAT and tunnels rewrite to one family; for DSR a
    /// mixed family is a configuration mistake, the backend must hold the VIP).
    #[error("backend {backend} of service {service} is not of the VIP's family ({vip}); {mode} needs one family")]
    FamilyMismatch {
        /// Service name.
        service: String,
        /// The backend, `addr:port`.
        backend: String,
        /// The VIP.
        vip: IpAddr,
        /// The mode.
        mode: &'static str,
    },
    /// A NAT service whose family has no SNAT address.
    #[error("service {service} uses NAT on {family} VIP {vip} but node.{field} is not set")]
    MissingSnatAddress {
        /// Service name.
        service: String,
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The VIP.
        vip: IpAddr,
        /// `snat_v4` or `snat_v6`.
        field: &'static str,
    },
    /// A tunnel service whose family has no tunnel source address.
    #[error("service {service} uses {mode} on {family} VIP {vip} but node.{field} is not set")]
    MissingTunnelSource {
        /// Service name.
        service: String,
        /// The mode.
        mode: &'static str,
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The VIP.
        vip: IpAddr,
        /// `tunnel_src_v4` or `tunnel_src_v6`.
        field: &'static str,
    },
    /// A DSR or tunnel backend on another port: those modes cannot change the destination port.
    #[error(
        "backend {backend} of service {service} uses port {port}, but {mode} cannot change ports: use {service_port}"
    )]
    PortRemap {
        /// Service name.
        service: String,
        /// The backend, `addr:port`.
        backend: String,
        /// The backend's port.
        port: u16,
        /// The service's port.
        service_port: u16,
        /// The mode.
        mode: &'static str,
    },
    /// A backend with no MAC address and no node gateway MAC to fall back to.
    #[error("backend {backend} of service {service} has no mac and node.gateway_mac is not set")]
    NoMac {
        /// Service name.
        service: String,
        /// The backend, `addr:port`.
        backend: String,
    },
    /// A DSR backend with no MAC of its own. DSR leaves the packet addressed to the VIP and sends it
    /// to the backend's MAC; sent to `node.gateway_mac` instead, a router would route it by the VIP,
    /// back to the load balancer.
    #[error(
        "backend {backend} of service {service} has no mac: DSR sends frames still addressed to the VIP to the \
         backend's own MAC (node.gateway_mac would route them back to the VIP); give its mac, or use ipip, gue or nat"
    )]
    DsrBackendWithoutMac {
        /// Service name.
        service: String,
        /// The backend, `addr:port`.
        backend: String,
    },
    /// A NAT service with nowhere to send the translated replies.
    #[error("service {service} uses NAT, whose replies to clients go to node.gateway_mac, which is not set")]
    NoGatewayForNat {
        /// Service name.
        service: String,
    },
    /// A GUE service with destination port 0.
    #[error("service {service} uses GUE with UDP port 0: give the port the backends decapsulate on")]
    GuePortZero {
        /// Service name.
        service: String,
    },
    /// A service on port 0, which no client can connect to (and no frame can name).
    #[error("service {service} uses {key}: port 0 is not a destination port; give the port clients connect to")]
    ServicePortZero {
        /// Service name.
        service: String,
        /// The service's key.
        key: ServiceKey,
    },
    /// A backend on port 0: NAT would rewrite the destination port to 0, which no backend listens on.
    #[error("backend {backend} of service {service} has port 0: give the port the backend listens on")]
    BackendPortZero {
        /// Service name.
        service: String,
        /// The backend, `addr:port`.
        backend: String,
    },
    /// An unusable SNAT port range.
    #[error("node.snat_ports {first}-{last} is empty or starts at 0: give first <= last, first >= 1")]
    BadSnatPorts {
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// A tunnel path MTU too small for IPv6's minimum packets plus the largest tunnel headers.
    #[error("node.tunnel_mtu {mtu} is below {min} (IPv6's minimum MTU 1280 plus 52 bytes of GUE over IPv6)")]
    TunnelMtuTooSmall {
        /// The MTU given.
        mtu: u16,
        /// The least accepted.
        min: u16,
    },
    /// A service on one of the node's source addresses where replies or errors to the node could
    /// not be told from its traffic ([`NodeConfig::vip_conflict`]).
    #[error("service {service} ({key}): {conflict}")]
    NodeAddressIsVip {
        /// Service name.
        service: String,
        /// The service's key.
        key: ServiceKey,
        /// Which address, and why.
        conflict: VipConflict,
    },
    /// A VIP or backend address that no packet can carry to one host (unspecified, broadcast,
    /// multicast, loopback, IPv4-mapped IPv6).
    #[error("service {service}: {role} {addr} is {kind}; a {role} must be a unicast address a host holds")]
    UnusableAddress {
        /// Service name.
        service: String,
        /// `VIP` or `backend`.
        role: &'static str,
        /// The address.
        addr: IpAddr,
        /// What it is.
        kind: SpecialAddress,
    },
    /// A source range no client of the service can be inside: of the other family than its VIP, or
    /// IPv4-mapped IPv6 (no packet comes from such an address). It would match no client, and as the
    /// service's only range it would refuse every one.
    #[error(
        "service {service}: source range {range} {}, so no client of the service is ever inside it; {}",
        match .ipv4 { Some(_) => alloc::format!("is IPv4-mapped IPv6, which no packet comes from (VIP {vip})"),
                      None => alloc::format!("is not of the family of its VIP {vip}") },
        match .ipv4 { Some(v4) => alloc::format!("write the IPv4 prefix {v4} (on an IPv4 VIP's service)"),
                      None => String::from("give ranges of the VIP's family only") }
    )]
    SourceRangeOfOtherFamily {
        /// Service name.
        service: String,
        /// The range.
        range: Cidr,
        /// The VIP.
        vip: IpAddr,
        /// The IPv4 prefix an IPv4-mapped range stands for.
        ipv4: Option<Cidr>,
    },
    /// A node address (SNAT or tunnel source) that cannot be a packet's source on the wire.
    #[error("node.{field} {addr} is {kind}; it must be a unicast address of this node")]
    UnusableNodeAddress {
        /// `snat_v4`, `snat_v6`, `tunnel_src_v4` or `tunnel_src_v6`.
        field: &'static str,
        /// The address.
        addr: IpAddr,
        /// What it is.
        kind: SpecialAddress,
    },
    /// A conntrack timeout under one second or beyond `u32` seconds. The worker counts whole
    /// seconds, so a shorter timeout expires every entry at once: each packet would be a new flow,
    /// scheduled afresh, and a flow's packets could go to several backends.
    #[error("node.timeouts.{field} is {value:?}: use 1 to 4294967295 s (conntrack counts whole seconds)")]
    BadTimeout {
        /// The timeout's field in `Timeouts`, such as `tcp_established`.
        field: &'static str,
        /// The timeout given.
        value: core::time::Duration,
    },
    /// An affinity timeout of zero or beyond `u32` seconds.
    #[error("service {service} has affinity timeout {secs} s: use 1 to 4294967295 s (Kubernetes' default is 10800)")]
    BadAffinityTimeout {
        /// Service name.
        service: String,
        /// The timeout in seconds.
        secs: u64,
    },
    /// A Maglev table size lb-hash cannot build.
    #[error("service {service}: {source}")]
    Selection {
        /// Service name.
        service: String,
        /// lb-hash's reason.
        source: lb_hash::BuildError,
    },
    /// More backends in one service than backend indices can hold.
    #[error("service {service} has {count} backends; at most {max} are supported")]
    TooManyBackendsInService {
        /// Service name.
        service: String,
        /// Backends given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More services than the builder's limit.
    #[error("{count} services configured; this table builder holds at most {max} (Limits::max_services)")]
    TooManyServices {
        /// Services given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More backends, summed over services, than the builder's limit.
    #[error(
        "{count} backends configured over all services; this table builder holds at most {max} (Limits::max_backends)"
    )]
    TooManyBackends {
        /// Backends given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More Maglev table entries, summed over the distinct tables, than the builder's limit.
    #[error(
        "{count} Maglev table entries configured over all distinct tables (mh, sh, dh: up to 6 bytes an entry; \
         services of the same scheduler, table size and backends share one); this table builder holds at most \
         {max} (Limits::max_maglev_entries): lower maglev_table_size on the largest tables ({largest}), or give \
         them a scheduler without one"
    )]
    TooManyMaglevEntries {
        /// Entries of the distinct tables.
        count: usize,
        /// The limit.
        max: usize,
        /// The largest tables, `service: entries` (`service and N more: entries` for a table N more
        /// services share), largest first.
        largest: String,
    },
}

/// Hands out slot numbers, reusing freed ones (the lowest first), each time with a new generation
/// from [`next_generation`].
#[derive(Debug, Clone, Default)]
struct SlotAllocator {
    /// Slots handed out so far (free or not): the next new slot's number.
    len: u32,
    free: BTreeSet<u32>,
}

/// How many free slots [`SlotAllocator::find_shift`] tries before the slots past the last.
const SHIFT_TRIES: usize = 64;

impl SlotAllocator {
    fn alloc(&mut self, limit: usize) -> Option<(u32, u32)> {
        let slot = match self.free.pop_first() {
            Some(s) => s,
            None if (self.len as usize) < limit => {
                self.len = self.len.checked_add(1)?;
                self.len - 1
            }
            None => return None,
        };
        Some((slot, next_generation()))
    }

    fn release(&mut self, slot: u32) {
        self.free.insert(slot);
    }

    /// True when `slot` may be taken: free, or past the last handed out and within `limit`.
    fn is_free(&self, slot: i64, limit: usize) -> bool {
        let Ok(s) = u32::try_from(slot) else { return false };
        (s as usize) < limit && (s >= self.len || self.free.contains(&s))
    }

    /// Takes `slot`, which [`SlotAllocator::is_free`] says may be taken (the slots skipped past
    /// the last become free ones).
    fn take(&mut self, slot: u32) {
        if slot >= self.len {
            self.free.extend(self.len..slot);
            self.len = slot + 1;
        } else {
            self.free.remove(&slot);
        }
    }

    /// A shift `d` such that every `slots[i] + d` may be taken (`slots` not empty): tried at a few
    /// free slots, then past the last.
    fn find_shift(&self, slots: &[i64], limit: usize) -> Option<i64> {
        let low = *slots.iter().min()?;
        let fits = |d: i64| slots.iter().all(|&s| self.is_free(s + d, limit));
        let tail = i64::from(self.len) - low;
        self.free.iter().take(SHIFT_TRIES).map(|&f| i64::from(f) - low).chain([tail]).find(|&d| fits(d))
    }
}

/// What a backend slot stands for: the service key, the backend's address and port, and, when the
/// service uses full NAT, the node's SNAT address the backend's flows leave from (`None` for DSR
/// and the tunnels). A NAT flow's entry holds a SNAT port and a reverse entry that a DSR or tunnel
/// flow's has not, and its backend sees another 4-tuple, so no flow can cross that change; nor a
/// change of the SNAT address, which its entry does not hold: its packets would leave from the new
/// address with its port, where no reverse entry brings replies back and a new flow may be given
/// that port. Either way the backend gets a new generation of its slot, and its flows follow the
/// service's [`RemovedBackendPolicy`] (rescheduled as new flows, or dropped), while its counters
/// carry on ([`Tables::carries_counters_of`]). DSR and the tunnels deliver the client's own packet,
/// so flows keep their backend across a change among those.
type BackendKey = (ServiceKey, IpAddr, u16, Option<IpAddr>);

/// The slot key of backend `b` of service `s` on node `node`.
fn backend_key(node: &NodeConfig, s: &ServiceConfig, b: &BackendConfig) -> BackendKey {
    let snat = if s.mode == ForwardMode::Nat { node.snat_addr_for(b.addr) } else { None };
    (s.key, b.addr, b.port, snat)
}

/// Builds [`Tables`] from a [`Config`], keeping slot numbers stable across builds.
///
/// A clone keeps the slots and generations of the keys it has; from there on each copy hands out
/// fresh generations (see the module docs), so the two may feed the same workers.
#[derive(Debug, Clone, Default)]
pub struct TableBuilder {
    limits: Limits,
    /// The connection table seed every build carries ([`TableBuilder::with_conntrack_seed`]).
    conntrack_seed: ConntrackSeed,
    service_slots: HashMap<ServiceKey, (u32, u32)>,
    backend_slots: HashMap<BackendKey, (u32, u32)>,
    /// For a backend whose service switched into or out of NAT or whose SNAT address changed, the
    /// generation it had before the last switch, kept as long as the backend is: every later build
    /// names it ([`Tables::carries_counters_of`]), for workers that skip the build of the switch (a
    /// poll loop far behind gets only the latest tables).
    predecessors: HashMap<BackendKey, u32>,
    services: SlotAllocator,
    backends: SlotAllocator,
    version: u64,
    /// The schedulers of the last build, one per distinct [`SchedulerInputs`], each with the
    /// backend slots (less their lowest, see [`ring_base`]) its ring was made for: an update
    /// rebuilds only the schedulers whose inputs changed (a 65 537-entry Maglev table takes about a
    /// millisecond; an EndpointSlice change in a cluster of thousands of Services rebuilds one), and
    /// services of equal inputs share one.
    schedulers: HashMap<SchedulerInputs, (ServiceScheduler, Box<[u32]>)>,
}

/// The generation of a slot just handed to a service or backend, by any builder of the process:
/// each is new, so a (slot, generation) pair names the one key it was made for in any [`Tables`]
/// (see the module docs). 0 is never handed out ([`BackendRef`]'s "nothing").
fn next_generation() -> u32 {
    static NEXT: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(1);
    loop {
        let g = NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        if g != 0 {
            return g;
        }
    }
}

fn backend_name(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn mode_name(mode: ForwardMode) -> &'static str {
    match mode {
        ForwardMode::Nat => "NAT",
        ForwardMode::Dsr => "DSR",
        ForwardMode::IpIp => "IP-in-IP",
        ForwardMode::Gue { .. } => "GUE",
    }
}

/// Checks the whole configuration; the first problem found is returned.
pub fn validate(cfg: &Config) -> Result<(), ConfigError> {
    let node = &cfg.node;
    let mut keys: HashMap<ServiceKey, &str> = HashMap::with_capacity(cfg.services.len());
    let uses_nat = cfg.services.iter().any(|s| s.mode == ForwardMode::Nat);
    let (first, last) = node.snat_ports;
    if uses_nat && (first == 0 || first > last) {
        return Err(ConfigError::BadSnatPorts { first, last });
    }
    let min_mtu = crate::forward::too_big::MIN_TUNNEL_MTU;
    if let Some(mtu) = node.tunnel_mtu.filter(|&m| m < min_mtu) {
        return Err(ConfigError::TunnelMtuTooSmall { mtu, min: min_mtu });
    }
    // Named field by field, so a timeout added to `Timeouts` is checked too (or fails to compile).
    let Timeouts { tcp_syn, tcp_established, tcp_fin, tcp_time_wait, udp } = node.timeouts;
    let timeouts = [
        ("tcp_syn", tcp_syn),
        ("tcp_established", tcp_established),
        ("tcp_fin", tcp_fin),
        ("tcp_time_wait", tcp_time_wait),
        ("udp", udp),
    ];
    for (field, value) in timeouts {
        if value.as_secs() == 0 || value.as_secs() > u64::from(u32::MAX) {
            return Err(ConfigError::BadTimeout { field, value });
        }
    }
    for (field, addr) in node.source_addresses() {
        if let Some((addr, kind)) = addr.and_then(|a| SpecialAddress::of(a).map(|k| (a, k))) {
            return Err(ConfigError::UnusableNodeAddress { field, addr, kind });
        }
    }
    for s in &cfg.services {
        let service = || s.name.clone();
        if let Some(prev) = keys.insert(s.key, &s.name) {
            return Err(ConfigError::DuplicateService { key: s.key, first: String::from(prev), second: service() });
        }
        if s.key.port == 0 {
            return Err(ConfigError::ServicePortZero { service: service(), key: s.key });
        }
        let vip = s.key.vip;
        if let Some(kind) = SpecialAddress::of(vip) {
            return Err(ConfigError::UnusableAddress { service: service(), role: "VIP", addr: vip, kind });
        }
        if let Some(conflict) = node.vip_conflict(&s.key) {
            return Err(ConfigError::NodeAddressIsVip { service: service(), key: s.key, conflict });
        }
        if s.backends.len() > MAX_BACKENDS_PER_SERVICE {
            return Err(ConfigError::TooManyBackendsInService {
                service: service(),
                count: s.backends.len(),
                max: MAX_BACKENDS_PER_SERVICE,
            });
        }
        if let Some(t) = s.affinity_timeout {
            let secs = t.as_secs();
            if secs == 0 || secs > u64::from(u32::MAX) {
                return Err(ConfigError::BadAffinityTimeout { service: service(), secs });
            }
        }
        // (The config file refuses such ranges, and the Kubernetes translation keeps each LB IP's
        // own family's, reading a mapped range as the IPv4 one.)
        if let Some(r) =
            s.source_ranges.iter().find(|r| r.ipv4_mapped().is_some() || r.addr().is_ipv4() != vip.is_ipv4())
        {
            return Err(ConfigError::SourceRangeOfOtherFamily {
                service: service(),
                range: *r,
                vip,
                ipv4: r.ipv4_mapped(),
            });
        }
        match (s.mode, vip) {
            (ForwardMode::Nat, IpAddr::V4(_)) if node.snat_v4.is_none() => {
                return Err(ConfigError::MissingSnatAddress {
                    service: service(),
                    family: "IPv4",
                    vip,
                    field: "snat_v4",
                });
            }
            (ForwardMode::Nat, IpAddr::V6(_)) if node.snat_v6.is_none() => {
                return Err(ConfigError::MissingSnatAddress {
                    service: service(),
                    family: "IPv6",
                    vip,
                    field: "snat_v6",
                });
            }
            (ForwardMode::IpIp | ForwardMode::Gue { .. }, IpAddr::V4(_)) if node.tunnel_src_v4.is_none() => {
                return Err(ConfigError::MissingTunnelSource {
                    service: service(),
                    mode: mode_name(s.mode),
                    family: "IPv4",
                    vip,
                    field: "tunnel_src_v4",
                });
            }
            (ForwardMode::IpIp | ForwardMode::Gue { .. }, IpAddr::V6(_)) if node.tunnel_src_v6.is_none() => {
                return Err(ConfigError::MissingTunnelSource {
                    service: service(),
                    mode: mode_name(s.mode),
                    family: "IPv6",
                    vip,
                    field: "tunnel_src_v6",
                });
            }
            (ForwardMode::Gue { port: 0 }, _) => return Err(ConfigError::GuePortZero { service: service() }),
            (ForwardMode::Nat, _) if node.gateway_mac.is_none() => {
                return Err(ConfigError::NoGatewayForNat { service: service() });
            }
            _ => {}
        }
        let mut seen: HashSet<(IpAddr, u16)> = HashSet::with_capacity(s.backends.len());
        // lb-hash identities of IPv6 backends, for a hashing scheduler (an IPv4 one's is its
        // address and port): checked whatever the backends' states, so that a backend turning
        // ready is never what makes `build` fail.
        let hashes = s.scheduler.picks_from_flow_alone();
        let mut identities: HashMap<lb_hash::BackendId, &BackendConfig> = HashMap::new();
        for b in &s.backends {
            let name = || backend_name(b.addr, b.port);
            if !seen.insert((b.addr, b.port)) {
                return Err(ConfigError::DuplicateBackend { service: service(), backend: name() });
            }
            if hashes && b.addr.is_ipv6() {
                let id = lb_hash::BackendId::from_socket_addr(core::net::SocketAddr::new(b.addr, b.port));
                if let Some(first) = identities.insert(id, b) {
                    return Err(ConfigError::SameBackendIdentity {
                        service: service(),
                        first: backend_name(first.addr, first.port),
                        second: name(),
                        scheduler: s.scheduler,
                    });
                }
            }
            if let Some(kind) = SpecialAddress::of(b.addr) {
                return Err(ConfigError::UnusableAddress { service: service(), role: "backend", addr: b.addr, kind });
            }
            if b.addr.is_ipv4() != vip.is_ipv4() {
                return Err(ConfigError::FamilyMismatch {
                    service: service(),
                    backend: name(),
                    vip,
                    mode: mode_name(s.mode),
                });
            }
            if b.port == 0 {
                return Err(ConfigError::BackendPortZero { service: service(), backend: name() });
            }
            if s.mode != ForwardMode::Nat && b.port != s.key.port {
                return Err(ConfigError::PortRemap {
                    service: service(),
                    backend: name(),
                    port: b.port,
                    service_port: s.key.port,
                    mode: mode_name(s.mode),
                });
            }
            if b.mac.is_none() && s.mode == ForwardMode::Dsr {
                return Err(ConfigError::DsrBackendWithoutMac { service: service(), backend: name() });
            }
            if b.mac.is_none() && node.gateway_mac.is_none() {
                return Err(ConfigError::NoMac { service: service(), backend: name() });
            }
        }
        if let Some(size) = s.maglev_table_size
            && s.scheduler.uses_maglev_table()
        {
            check_maglev_size(size, s.backends.len())
                .map_err(|source| ConfigError::Selection { service: service(), source })?;
        }
    }
    Ok(())
}

/// The `n` largest of the distinct Maglev tables `tables` (each with its first service's name and
/// how many services share it), `name: entries` or `name and N more: entries`, largest first (then
/// by name).
fn largest_maglev_tables(tables: &HashMap<&SchedulerInputs, (&str, usize)>, n: usize) -> String {
    let mut tables: Vec<(usize, &str, usize)> = tables
        .iter()
        .map(|(inputs, &(name, sharing))| (inputs.maglev_entries(), name, sharing))
        .filter(|&(e, ..)| e > 0)
        .collect();
    tables.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let shown: Vec<String> = tables
        .iter()
        .take(n)
        .map(|&(e, name, sharing)| match sharing {
            1 => format!("{name}: {e}"),
            _ => format!("{name} and {} more: {e}", sharing - 1),
        })
        .collect();
    shown.join(", ")
}

/// The size checks lb-hash makes, done even when no backend serves yet (so a bad size is reported
/// when the service is configured, not later when a backend becomes ready).
fn check_maglev_size(size: u32, backends: usize) -> Result<(), lb_hash::BuildError> {
    use lb_hash::{BuildError, MaglevTable, is_prime, maglev_table_size_for};
    if size > MaglevTable::MAX_SIZE {
        return Err(BuildError::TableSizeTooLarge { size, max: MaglevTable::MAX_SIZE });
    }
    if !is_prime(size) {
        let mut next = size.saturating_add(1);
        while !is_prime(next) && next < u32::MAX {
            next += 1;
        }
        return Err(BuildError::TableSizeNotPrime { size, next_prime: next });
    }
    if (size as usize) < backends {
        return Err(BuildError::TableSizeTooSmall { size, backends, min: maglev_table_size_for(backends) });
    }
    Ok(())
}

/// Slots for the new backends of services that share scheduler inputs, taken from `alloc`: placed
/// so that each service's slots are those of the first service of its inputs shifted by one
/// number, where such slots are free, so that they share its ring (see [`ring_base`]): a backend
/// added to every service of the inputs gets a row of slots at their shifts, and a service whose
/// backends are all new (a new key of a Kubernetes Service port) the first one's slots shifted.
/// A backend without a planned slot gets the allocator's next (its service then picks through its
/// scheduler). Groups in configuration order, so the same configuration gets the same slots.
fn plan_shared_slots<'a>(
    cfg: &'a Config,
    members: &HashMap<&SchedulerInputs, Vec<usize>>,
    backend_slots: &HashMap<BackendKey, (u32, u32)>,
    switched: &HashMap<BackendKey, (u32, u32)>,
    alloc: &mut SlotAllocator,
    limits: Limits,
) -> HashMap<BackendKey, u32> {
    let limit = limits.max_backends;
    let mut groups: Vec<&[usize]> = members.values().filter(|of| of.len() > 1).map(Vec::as_slice).collect();
    groups.sort_unstable_by_key(|of| of.first().copied());
    let mut planned: HashMap<BackendKey, u32> = HashMap::new();
    let slot_of = |sc: &ServiceConfig, b: &BackendConfig, planned: &HashMap<BackendKey, u32>| {
        let k = backend_key(&cfg.node, sc, b);
        let held = backend_slots.get(&k).or_else(|| switched.get(&k)).map(|&(s, _)| s);
        held.or_else(|| planned.get(&k).copied()).map(i64::from)
    };
    for of in groups {
        let Some((&lead, others)) = of.split_first() else { continue };
        let lead = &cfg.services[lead];
        // The other services, each with its backends by address and port (the same as the first's)
        // and its shift from the first's slots, from a backend both have one for.
        type ByAddr<'a> = HashMap<(IpAddr, u16), &'a BackendConfig>;
        let by_addr =
            |sc: &'a ServiceConfig| -> ByAddr<'a> { sc.backends.iter().map(|b| ((b.addr, b.port), b)).collect() };
        let of_lead: HashMap<(IpAddr, u16), i64> =
            lead.backends.iter().filter_map(|b| Some(((b.addr, b.port), slot_of(lead, b, &planned)?))).collect();
        let others: Vec<(&ServiceConfig, ByAddr<'_>, Option<i64>)> = others
            .iter()
            .map(|&k| {
                let sc = &cfg.services[k];
                let shift =
                    sc.backends.iter().find_map(|b| Some(slot_of(sc, b, &planned)? - of_lead.get(&(b.addr, b.port))?));
                (sc, by_addr(sc), shift)
            })
            .collect();
        // Each backend a service of a known shift lacks: the first's slot at that shift, if free;
        // one the first lacks too, a row of slots free at each of those shifts.
        for b in &lead.backends {
            let lacking: Vec<(&ServiceConfig, &BackendConfig, i64)> = others
                .iter()
                .filter_map(|(sc, backends, d)| {
                    let theirs = *backends.get(&(b.addr, b.port))?;
                    slot_of(sc, theirs, &planned).is_none().then_some((*sc, theirs, (*d)?))
                })
                .collect();
            let (x, lacking) = match slot_of(lead, b, &planned) {
                Some(x) => {
                    let free: Vec<_> = lacking.into_iter().filter(|&(.., d)| alloc.is_free(x + d, limit)).collect();
                    (x, free)
                }
                None => {
                    let row: Vec<i64> = core::iter::once(0).chain(lacking.iter().map(|&(.., d)| d)).collect();
                    let Some(x) = alloc.find_shift(&row, limit) else { continue };
                    let lead_too = core::iter::once((lead, b, 0)).chain(lacking);
                    (x, lead_too.collect())
                }
            };
            for (sc, theirs, d) in lacking {
                let Ok(slot) = u32::try_from(x + d) else { continue };
                alloc.take(slot);
                planned.insert(backend_key(&cfg.node, sc, theirs), slot);
            }
        }
        // A service with no slot yet: the first's slots shifted where all of them are free.
        let lead_slots: Option<Vec<(i64, &BackendConfig)>> =
            lead.backends.iter().map(|b| Some((slot_of(lead, b, &planned)?, b))).collect();
        let Some(lead_slots) = lead_slots.filter(|l| !l.is_empty()) else { continue };
        let at: Vec<i64> = lead_slots.iter().map(|&(s, _)| s).collect();
        for (sc, backends, _) in &others {
            if sc.backends.iter().any(|b| slot_of(sc, b, &planned).is_some()) {
                continue;
            }
            let Some(d) = alloc.find_shift(&at, limit) else { continue };
            for &(s, lb) in &lead_slots {
                let (Some(&theirs), Ok(slot)) = (backends.get(&(lb.addr, lb.port)), u32::try_from(s + d)) else {
                    continue;
                };
                alloc.take(slot);
                planned.insert(backend_key(&cfg.node, sc, theirs), slot);
            }
        }
    }
    planned
}

impl TableBuilder {
    /// A builder with the default [`Limits`].
    pub fn new() -> Self {
        TableBuilder::default()
    }

    /// A builder with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        TableBuilder { limits, ..TableBuilder::default() }
    }

    /// This builder, building tables for connection tables hashed under `seed` (default
    /// [`ConntrackSeed::UNSEEDED`]): the tables hash full-NAT reply keys ahead under it, and a worker
    /// takes it for its connection table from its first tables and refuses tables of another (see
    /// [`ConntrackSeed`]). Draw it at random once per process and build every table with it.
    pub fn with_conntrack_seed(self, seed: ConntrackSeed) -> Self {
        TableBuilder { conntrack_seed: seed, ..self }
    }

    /// The limits this builder enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The connection table seed of the tables this builder builds.
    pub fn conntrack_seed(&self) -> ConntrackSeed {
        self.conntrack_seed
    }

    /// Validates `cfg` whole and builds its tables. On error nothing changes: the builder's slots stay
    /// as they were and the caller keeps serving its current tables.
    pub fn build(&mut self, cfg: &Config) -> Result<Arc<Tables>, ConfigError> {
        validate(cfg)?;
        if cfg.services.len() > self.limits.max_services {
            return Err(ConfigError::TooManyServices { count: cfg.services.len(), max: self.limits.max_services });
        }
        let total_backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
        if total_backends > self.limits.max_backends {
            return Err(ConfigError::TooManyBackends { count: total_backends, max: self.limits.max_backends });
        }
        // Services of equal inputs share one scheduler, so one Maglev table: each counts once.
        let inputs: Vec<SchedulerInputs> = cfg.services.iter().map(ServiceConfig::scheduler_inputs).collect();
        let mut tables: HashMap<&SchedulerInputs, (&str, usize)> = HashMap::with_capacity(inputs.len());
        for (i, sc) in inputs.iter().zip(&cfg.services) {
            tables.entry(i).or_insert((sc.name.as_str(), 0)).1 += 1;
        }
        let maglev_entries = tables.keys().fold(0usize, |sum, i| sum.saturating_add(i.maglev_entries()));
        if maglev_entries > self.limits.max_maglev_entries {
            return Err(ConfigError::TooManyMaglevEntries {
                count: maglev_entries,
                max: self.limits.max_maglev_entries,
                largest: largest_maglev_tables(&tables, 3),
            });
        }

        // Work on copies of the slot state; commit only on success.
        let mut service_alloc = self.services.clone();
        let mut backend_alloc = self.backends.clone();
        let wanted_services: HashSet<ServiceKey> = cfg.services.iter().map(|s| s.key).collect();
        let wanted_backends: HashSet<BackendKey> =
            cfg.services.iter().flat_map(|s| s.backends.iter().map(move |b| backend_key(&cfg.node, s, b))).collect();
        // Each wanted key by its service, address and port: the key a backend switched to, if it did.
        let wanted_by_backend: HashMap<(ServiceKey, IpAddr, u16), BackendKey> =
            wanted_backends.iter().map(|k| ((k.0, k.1, k.2), *k)).collect();
        let mut service_slots = self.service_slots.clone();
        service_slots.retain(|k, (slot, _)| {
            let keep = wanted_services.contains(k);
            if !keep {
                service_alloc.release(*slot);
            }
            keep
        });
        let mut backend_slots = self.backend_slots.clone();
        // A backend whose service switched into or out of NAT, or whose SNAT address changed, is
        // wanted under another key: it keeps its slot number, with a new generation (its counters
        // carry on, its flows do not).
        let mut switched: HashMap<BackendKey, (u32, u32)> = HashMap::new();
        backend_slots.retain(|k, &mut (slot, generation)| {
            let keep = wanted_backends.contains(k);
            if !keep {
                match wanted_by_backend.get(&(k.0, k.1, k.2)) {
                    Some(other) => {
                        switched.insert(*other, (slot, generation));
                    }
                    None => backend_alloc.release(slot),
                }
            }
            keep
        });
        let mut predecessors = self.predecessors.clone();
        predecessors.retain(|k, _| wanted_backends.contains(k));

        // The services of each inputs, in configuration order (groups by their first service).
        let mut members: HashMap<&SchedulerInputs, Vec<usize>> = HashMap::with_capacity(tables.len());
        for (si, i) in inputs.iter().enumerate() {
            members.entry(i).or_default().push(si);
        }
        let planned = plan_shared_slots(cfg, &members, &backend_slots, &switched, &mut backend_alloc, self.limits);

        let node = cfg.node.clone();
        let mut services = Vec::with_capacity(cfg.services.len());
        let mut vips: HashMap<IpAddr, bool> = HashMap::new();
        let mut backend_locations: Vec<BackendLocation> = Vec::new();
        let mut reply_keys: Vec<Option<PortKeys>> = Vec::new();
        let mut staged: Vec<(u32, u32, Vec<Backend>)> = Vec::with_capacity(cfg.services.len());
        for (si, sc) in cfg.services.iter().enumerate() {
            let (slot, generation) = match service_slots.get(&sc.key) {
                Some(&s) => s,
                None => {
                    let s = service_alloc.alloc(self.limits.max_services).ok_or(ConfigError::TooManyServices {
                        count: cfg.services.len(),
                        max: self.limits.max_services,
                    })?;
                    service_slots.insert(sc.key, s);
                    s
                }
            };
            let mut backends = Vec::with_capacity(sc.backends.len());
            for bc in &sc.backends {
                let bkey = backend_key(&cfg.node, sc, bc);
                let (bslot, bgen) = match backend_slots.get(&bkey) {
                    Some(&s) => s,
                    None => {
                        let s = match switched.get(&bkey) {
                            Some(&(slot, before)) => {
                                predecessors.insert(bkey, before);
                                (slot, next_generation())
                            }
                            None if let Some(&slot) = planned.get(&bkey) => (slot, next_generation()),
                            None => {
                                backend_alloc.alloc(self.limits.max_backends).ok_or(ConfigError::TooManyBackends {
                                    count: total_backends,
                                    max: self.limits.max_backends,
                                })?
                            }
                        };
                        backend_slots.insert(bkey, s);
                        s
                    }
                };
                backends.push(Backend {
                    addr: bc.addr,
                    port: bc.port,
                    weight: bc.weight,
                    state: bc.state,
                    mac: bc.mac.or(node.gateway_mac).unwrap_or_default(),
                    id: BackendRef { slot: bslot, generation: bgen },
                });
            }
            backends.sort_by_key(|b| lb_hash::BackendId::from_socket_addr(core::net::SocketAddr::new(b.addr, b.port)));
            for (bi, b) in backends.iter().enumerate() {
                let i = b.id.slot as usize;
                if backend_locations.len() <= i {
                    backend_locations.resize(i + 1, BackendLocation::default());
                    reply_keys.resize(i + 1, None);
                }
                if let Some(keys) = reply_keys.get_mut(i) {
                    *keys = node.snat_addr_for(b.addr).map(|snat| b.reply_keys(self.conntrack_seed, snat));
                }
                if let Some(loc) = backend_locations.get_mut(i) {
                    *loc = BackendLocation {
                        generation: b.id.generation,
                        backend: u16::try_from(bi).unwrap_or(u16::MAX),
                        summary: ServiceSummary::of(
                            si,
                            ServiceSlot(slot),
                            sc.mode,
                            sc.on_backend_removed,
                            &sc.source_ranges,
                        ),
                        record: *b,
                    };
                }
            }
            *vips.entry(sc.key.vip).or_default() |= sc.answer_neighbours;
            staged.push((slot, generation, backends));
        }

        // One scheduler per distinct inputs: the last build's when it had them, else built from the
        // backends of their first service. A ring (mh) names slots less their service's lowest
        // (`ring_base`), so it serves each service of the inputs whose slots are its own shifted
        // (as the builder hands them out to services listed alike), from the service index; any
        // other service of the inputs picks through its scheduler, from the shared table. The last
        // build's ring is kept when it serves a service; else the ring is made for the slots most
        // of the services have.
        let relative = |backends: &[Backend]| -> Box<[u32]> {
            let base = ring_base(backends);
            backends.iter().map(|b| b.id.slot.wrapping_sub(base)).collect()
        };
        let rel: Vec<Box<[u32]>> = staged.iter().map(|(.., backends)| relative(backends)).collect();
        // Keyed by the first service of the inputs.
        let mut built_for: HashMap<usize, (ServiceScheduler, Box<[u32]>)> = HashMap::with_capacity(tables.len());
        let mut shared: Vec<usize> = Vec::with_capacity(cfg.services.len());
        for (si, (i, sc)) in inputs.iter().zip(&cfg.services).enumerate() {
            let of = members.get(i).map_or(&[][..], Vec::as_slice);
            let first = of.first().copied().unwrap_or(si);
            shared.push(first);
            if first != si {
                continue;
            }
            let last = self.schedulers.get(i).filter(|(_, r)| of.iter().any(|&m| rel[m] == *r));
            let built = match last {
                Some(kept) => kept.clone(),
                None => {
                    // The service whose slots most of the inputs' services have (the first on a tie;
                    // counted in one pass, as thousands of services without backends share inputs).
                    let mut count: HashMap<&[u32], (usize, usize)> = HashMap::new();
                    for &m in of {
                        count.entry(&rel[m]).or_insert((0, m)).0 += 1;
                    }
                    let most = count.into_values().max_by_key(|&(n, m)| (n, core::cmp::Reverse(m)));
                    let m = most.map_or(si, |(_, m)| m);
                    let backends = &staged[m].2;
                    let scheduler = match self.schedulers.get(i) {
                        Some((scheduler, _)) => scheduler.with_ring_for(backends),
                        None => ServiceScheduler::build(sc.scheduler, backends, sc.maglev_table_size)
                            .map_err(|source| ConfigError::Selection { service: sc.name.clone(), source })?,
                    };
                    (scheduler, rel[m].clone())
                }
            };
            built_for.insert(si, built);
        }
        let mut rings = Vec::with_capacity(cfg.services.len());
        for (si, (sc, (slot, generation, backends))) in cfg.services.iter().zip(staged).enumerate() {
            let (scheduler, ring_rel) = &built_for[&shared[si]];
            rings.push(scheduler.ring().filter(|_| *ring_rel == rel[si]).cloned());
            services.push(Service {
                name: sc.name.clone(),
                key: sc.key,
                slot: ServiceSlot(slot),
                generation,
                mode: sc.mode,
                affinity_timeout_secs: sc.affinity_timeout.map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX)),
                source_ranges: sc.source_ranges.clone(),
                on_backend_removed: sc.on_backend_removed,
                backends,
                scheduler: scheduler.clone(),
                answer_neighbours: sc.answer_neighbours,
            });
        }

        self.services = service_alloc;
        self.backends = backend_alloc;
        self.service_slots = service_slots;
        let mut successions: Vec<(u32, u32)> = predecessors
            .iter()
            .filter_map(|(k, &before)| backend_slots.get(k).map(|&(slot, _)| (slot, before)))
            .collect();
        successions.sort_unstable();
        self.backend_slots = backend_slots;
        self.predecessors = predecessors;
        self.schedulers = built_for.into_iter().map(|(si, built)| (inputs[si].clone(), built)).collect();
        self.version += 1;
        let index = ServiceIndex::new(&services, rings);
        Ok(Arc::new(Tables {
            node,
            services,
            index,
            vips,
            backend_locations,
            reply_keys,
            conntrack_seed: self.conntrack_seed,
            limits: self.limits,
            maglev_entries,
            version: self.version,
            successions: successions.into_boxed_slice(),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, Protocol, ServiceConfig};
    use alloc::string::ToString;
    use alloc::vec;
    use core::time::Duration;

    fn backend(addr: &str, port: u16) -> BackendConfig {
        BackendConfig {
            addr: addr.parse().unwrap(),
            port,
            weight: 1,
            mac: Some([2, 0, 0, 0, 0, 9]),
            state: BackendState::Active,
        }
    }

    fn service(name: &str, vip: &str, port: u16, mode: ForwardMode, backends: Vec<BackendConfig>) -> ServiceConfig {
        ServiceConfig::new(name, ServiceKey { vip: vip.parse().unwrap(), port, proto: Protocol::Tcp }, mode, backends)
    }

    fn good() -> Config {
        let mut cfg = Config::default();
        cfg.node.gateway_mac = Some([2, 0, 0, 0, 0, 0xfe]);
        cfg.node.snat_v4 = Some("10.0.0.100".parse().unwrap());
        cfg.node.tunnel_src_v4 = Some("10.0.0.101".parse().unwrap());
        cfg.services = vec![
            service(
                "web",
                "192.0.2.1",
                80,
                ForwardMode::Nat,
                vec![backend("10.0.0.7", 8080), backend("10.0.0.8", 8080)],
            ),
            service("dns", "192.0.2.1", 53, ForwardMode::Dsr, vec![backend("10.0.0.9", 53)]),
        ];
        cfg
    }

    /// An update rebuilds only the schedulers whose inputs changed: an untouched service keeps the
    /// very same Maglev entries (shared, not copied); a changed backend set or weight gets a new table.
    #[test]
    fn unchanged_services_keep_their_maglev_table() {
        let entries = |t: &Tables, i: usize| t.services()[i].scheduler.maglev_table().unwrap().entries().as_ptr();
        let mut b = TableBuilder::new();
        let first = b.build(&good()).unwrap();

        let mut cfg = good();
        cfg.services[1].backends.push(backend("10.0.0.10", 53));
        let second = b.build(&cfg).unwrap();
        assert_eq!(entries(&first, 0), entries(&second, 0), "web unchanged: its table is reused");
        let ring = |t: &Tables, i: usize| t.services()[i].scheduler.ring().unwrap().as_ptr();
        assert_eq!(ring(&first, 0), ring(&second, 0), "and its ring of backend slots");
        assert_ne!(ring(&first, 1), ring(&second, 1));
        assert_ne!(entries(&first, 1), entries(&second, 1), "dns gained a backend: rebuilt");
        let fresh = TableBuilder::new().build(&cfg).unwrap();
        for i in 0..2 {
            let (reused, built) = (&second.services()[i].scheduler, &fresh.services()[i].scheduler);
            assert_eq!(reused.maglev_table().unwrap(), built.maglev_table().unwrap(), "service {i}");
        }

        cfg.services[0].backends[0].weight = 3;
        let third = b.build(&cfg).unwrap();
        assert_ne!(entries(&second, 0), entries(&third, 0), "web's weights changed: rebuilt");
        assert_eq!(entries(&second, 1), entries(&third, 1));

        // A rejected update leaves the cache as it was.
        let mut bad = cfg.clone();
        bad.services[1].maglev_table_size = Some(1000);
        assert!(b.build(&bad).is_err());
        assert_eq!(entries(&third, 1), entries(&b.build(&cfg).unwrap(), 1));
    }

    /// One Kubernetes Service port as the feed gives it: a cluster IP, and a NodePort on each of
    /// `nodes` node addresses, all with the same `endpoints` backends (NAT, as NodePorts are).
    fn service_port(cfg: &mut Config, n: u32, nodes: u32, endpoints: u32) {
        let backends: Vec<BackendConfig> = (0..endpoints)
            .map(|e| backend(&core::net::Ipv4Addr::from(0x0AF4_0000 + (n << 8) + e).to_string(), 8080))
            .collect();
        let cluster_ip = core::net::Ipv4Addr::from(0x0A60_0000 + n).to_string(); // 10.96.0.0/16
        cfg.services.push(service(&format!("svc{n}:http"), &cluster_ip, 80, ForwardMode::Nat, backends.clone()));
        for node in 0..nodes {
            let node_ip = core::net::Ipv4Addr::new(192, 168, 1, 10 + node as u8).to_string();
            let port = 30_000 + n as u16;
            cfg.services.push(service(&format!("svc{n}:http"), &node_ip, port, ForwardMode::Nat, backends.clone()));
        }
    }

    /// The backend slot a new flow of service `i` with hash `h` gets: from its ring through the
    /// service index when it has one there, else from its scheduler's pick (what the worker does).
    fn new_flow_backend(t: &Tables, i: usize, h: u64) -> Option<Backend> {
        let s = &t.services()[i];
        let flow = FlowKey::from_ips("198.51.100.1".parse().unwrap(), s.key.vip, 6, 40_000, s.key.port).unwrap();
        let (_, ring) = t.lookup_flow_ring(&flow, t.lookup_hash(&flow)).unwrap();
        if ring.is_some() {
            return t.ring_backend(ring, h).copied();
        }
        s.scheduler.likely_pick(h).map(|bi| s.backends[bi])
    }

    /// The ring service `i`'s new flows pick from, if the service index holds one for it.
    fn index_ring(t: &Tables, i: usize) -> Option<*const u32> {
        let s = &t.services()[i];
        let at = t
            .index
            .get_hashed(
                index_hash(&addr_bytes(s.key.vip), s.key.port, 6),
                &addr_bytes(s.key.vip),
                false,
                s.key.port,
                6,
            )?
            .0;
        t.index.slots[at].ring.as_ref().map(|r| r.as_ptr())
    }

    /// Every service of `t` gives each of many flow hashes the backend (address and port) a table
    /// built for it alone gives, from its own slot.
    fn picks_as_if_alone(t: &Tables, cfg: &Config) {
        for (i, sc) in cfg.services.iter().enumerate() {
            let alone = TableBuilder::new().build(&Config { services: vec![sc.clone()], ..cfg.clone() }).unwrap();
            let slots: HashSet<u32> = t.services()[i].backends.iter().map(|b| b.id.slot).collect();
            for k in 0..4_000u64 {
                let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k << 11);
                let (got, want) = (new_flow_backend(t, i, h), new_flow_backend(&alone, 0, h));
                let addr = |b: Option<Backend>| b.map(|b| (b.addr, b.port));
                assert_eq!(addr(got), addr(want), "{} ({}) hash {h:#x}", sc.name, sc.key);
                let got = got.unwrap();
                assert!(slots.contains(&got.id.slot), "{}: slot {} is not its own", sc.key, got.id.slot);
                assert_eq!(t.resolve_backend(got.id).map(|(si, _)| si), Some(i), "{}", sc.key);
            }
        }
    }

    /// Services of the same scheduler, table size and backends (a Service port's cluster IP and
    /// NodePorts) hold one Maglev table and one ring; each still picks, for every flow, what a table
    /// built for it alone picks, from its own backend slots. A backend changed on one key gives that
    /// key a table of its own, and the others keep theirs; a later build keeps them all.
    #[test]
    fn services_of_equal_inputs_share_one_maglev_table_and_ring() {
        let mut cfg = good();
        cfg.services.clear();
        service_port(&mut cfg, 1, 3, 10);
        service_port(&mut cfg, 2, 3, 10);
        let mut b = TableBuilder::new();
        let t = b.build(&cfg).unwrap();
        let entries = |t: &Tables, i: usize| t.services()[i].scheduler.maglev_table().unwrap().entries().as_ptr();
        for port in [0..4, 4..8] {
            for i in port.clone() {
                assert_eq!(entries(&t, i), entries(&t, port.start), "{}", cfg.services[i].key);
                assert!(index_ring(&t, i).is_some(), "{}", cfg.services[i].key);
                assert_eq!(index_ring(&t, i), index_ring(&t, port.start), "{}", cfg.services[i].key);
            }
        }
        assert_ne!(entries(&t, 0), entries(&t, 4), "two Service ports, two tables");
        assert_eq!(t.maglev_entries(), 2 * 65_537);
        picks_as_if_alone(&t, &cfg);

        // One NodePort loses an endpoint (a Local policy, say): it alone gets a table of its own.
        let mut changed = cfg.clone();
        changed.services[2].backends.pop();
        let t2 = b.build(&changed).unwrap();
        assert_ne!(entries(&t2, 2), entries(&t2, 0));
        for i in [1, 3] {
            assert_eq!(entries(&t2, i), entries(&t, 0), "{}: kept", cfg.services[i].key);
            assert_eq!(index_ring(&t2, i), index_ring(&t, 0), "{}: kept", cfg.services[i].key);
        }
        assert_eq!(t2.maglev_entries(), 3 * 65_537);
        picks_as_if_alone(&t2, &changed);

        // Back as it was: shared again (rebuilt once for the three it had served).
        let t3 = b.build(&cfg).unwrap();
        for i in 0..4 {
            assert_eq!(entries(&t3, i), entries(&t, 0), "{}", cfg.services[i].key);
        }
        picks_as_if_alone(&t3, &cfg);
    }

    /// Services of equal inputs whose backend slots are not their ring's shifted (here, a NodePort
    /// whose node had all but one endpoint, and gets that one when the slot at its shift is taken)
    /// still share the table, and pick through their scheduler exactly as a ring would.
    #[test]
    fn services_of_equal_inputs_on_other_slots_share_the_table_and_pick_alike() {
        let mut cfg = good();
        cfg.services.clear();
        service_port(&mut cfg, 1, 1, 10);
        let last = cfg.services[1].backends.pop().unwrap();
        let mut b = TableBuilder::new();
        b.build(&cfg).unwrap();
        // A newcomer takes the next slot, the one at the NodePort's shift from the cluster IP's.
        cfg.services.push(service("other", "192.0.2.77", 80, ForwardMode::Dsr, vec![backend("10.9.0.1", 80)]));
        b.build(&cfg).unwrap();
        cfg.services[1].backends.push(last);
        let t = b.build(&cfg).unwrap();
        let entries = |i: usize| t.services()[i].scheduler.maglev_table().unwrap().entries().as_ptr();
        assert_eq!(entries(0), entries(1));
        assert!(index_ring(&t, 0).is_some() && index_ring(&t, 1).is_none(), "the premise: slots not shifted alike");
        assert_eq!(t.maglev_entries(), 2 * 65_537, "one table for the port, one for other");
        picks_as_if_alone(&t, &cfg);
    }

    /// The services of a Service port keep sharing one ring through endpoint changes and new keys:
    /// the builder places the slots of a backend added to all of them, and of a key added later, at
    /// the shifts of the port's first key, where other slots were freed meanwhile.
    #[test]
    fn services_of_equal_inputs_keep_one_ring_through_rolling_updates_and_new_keys() {
        let mut cfg = good();
        cfg.services.clear();
        service_port(&mut cfg, 1, 3, 10);
        service_port(&mut cfg, 2, 3, 10);
        let mut b = TableBuilder::new();
        let shared = |t: &Tables, keys: core::ops::Range<usize>| {
            let first = index_ring(t, keys.start);
            first.is_some() && keys.clone().all(|i| index_ring(t, i) == first)
        };
        b.build(&cfg).unwrap();
        // A rolling update of port 1, one endpoint at a time, each on all four keys: one goes, a
        // newcomer elsewhere takes the lowest slot it freed, and its replacement comes.
        for e in 0..10u32 {
            for s in &mut cfg.services[..4] {
                s.backends.remove(0);
            }
            b.build(&cfg).unwrap();
            let vip = core::net::Ipv4Addr::from(0xC000_0264 + e).to_string(); // 192.0.2.100..
            let addr = core::net::Ipv4Addr::from(0x0A09_0000 + e).to_string();
            cfg.services.push(service(&format!("other{e}"), &vip, 80, ForwardMode::Dsr, vec![backend(&addr, 80)]));
            b.build(&cfg).unwrap();
            for s in &mut cfg.services[..4] {
                let addr = core::net::Ipv4Addr::from(0x0AF5_0000 + e).to_string();
                s.backends.push(backend(&addr, 8080));
            }
            let t = b.build(&cfg).unwrap();
            assert!(shared(&t, 0..4), "after replacing endpoint {e}");
            assert!(shared(&t, 4..8));
            if e % 3 == 0 {
                picks_as_if_alone(&t, &cfg);
            }
        }
        // Port 2 loses a key (its slots freed), a newcomer takes the lowest, and it gains two keys
        // on other node addresses.
        let mut np = cfg.services[7].clone();
        cfg.services.remove(5);
        b.build(&cfg).unwrap();
        cfg.services.push(service("late", "192.0.2.99", 80, ForwardMode::Dsr, vec![backend("10.9.1.1", 80)]));
        b.build(&cfg).unwrap();
        for node in [20u8, 21] {
            np.key.vip = core::net::Ipv4Addr::new(192, 168, 1, node).into();
            cfg.services.push(np.clone());
        }
        let t = b.build(&cfg).unwrap();
        assert!(shared(&t, 0..4));
        let port2: Vec<usize> = (4..7).chain(cfg.services.len() - 2..cfg.services.len()).collect();
        let first = index_ring(&t, 4);
        assert!(port2.iter().all(|&i| index_ring(&t, i) == first), "the new keys share port 2's ring");
        picks_as_if_alone(&t, &cfg);
    }

    /// A NodePort whose node had all but one endpoint gets its slot for that one at its shift from
    /// the cluster IP's (not the lowest free one), so it joins the cluster IP's ring.
    #[test]
    fn a_key_gaining_the_endpoint_it_lacked_joins_the_ring() {
        let mut cfg = good();
        cfg.services.clear();
        service_port(&mut cfg, 1, 1, 10);
        let last = cfg.services[1].backends.pop().unwrap();
        let early = service("early", "192.0.2.77", 80, ForwardMode::Dsr, vec![backend("10.9.0.1", 80)]);
        cfg.services.insert(0, early);
        let mut b = TableBuilder::new();
        let t = b.build(&cfg).unwrap();
        assert_ne!(index_ring(&t, 1), index_ring(&t, 2));
        // The early service leaves a lower slot free than the one at the NodePort's shift.
        cfg.services.remove(0);
        cfg.services[1].backends.push(last);
        let t = b.build(&cfg).unwrap();
        assert!(index_ring(&t, 0).is_some() && index_ring(&t, 0) == index_ring(&t, 1));
        picks_as_if_alone(&t, &cfg);
    }

    /// The budget counts a table once however many services share it: a Service port on many
    /// addresses fits a budget of one table, and a second table is refused, named by its first
    /// service with how many more share it.
    #[test]
    fn the_maglev_budget_counts_a_shared_table_once() {
        let mut cfg = good();
        cfg.services.clear();
        service_port(&mut cfg, 1, 7, 10);
        let limits = Limits { max_maglev_entries: 65_537, ..Limits::default() };
        let t = TableBuilder::with_limits(limits).build(&cfg).unwrap();
        assert_eq!(t.maglev_entries(), 65_537);
        service_port(&mut cfg, 2, 2, 10);
        let err = TableBuilder::with_limits(limits).build(&cfg).unwrap_err();
        assert_eq!(
            err,
            ConfigError::TooManyMaglevEntries {
                count: 2 * 65_537,
                max: 65_537,
                largest: "svc1:http and 7 more: 65537, svc2:http and 2 more: 65537".into()
            }
        );
    }

    /// The memory the Maglev tables of a Kubernetes-shaped configuration hold: 1 000 Services of one
    /// port, each on its cluster IP and a NodePort on 3 node addresses, 10 endpoints, default table
    /// size (mh). Tables and rings are counted once each however many services hold them.
    /// `cargo test -p lb-core --lib maglev_memory_of_a_kubernetes_shape -- --nocapture` prints it.
    #[test]
    fn maglev_memory_of_a_kubernetes_shape() {
        extern crate std;
        let mut cfg = good();
        cfg.services.clear();
        for n in 0..1000 {
            service_port(&mut cfg, n, 3, 10);
        }
        let t = TableBuilder::new().build(&cfg).unwrap();
        let (mut tables, mut rings) = (HashSet::new(), HashSet::new());
        let mut bytes = 0usize;
        for s in t.services() {
            let table = s.scheduler.maglev_table().unwrap().entries();
            if tables.insert(table.as_ptr()) {
                bytes += core::mem::size_of_val(table);
            }
            let ring = s.scheduler.ring().unwrap();
            if rings.insert(ring.as_ptr()) {
                bytes += core::mem::size_of_val(&ring[..]);
            }
        }
        std::println!(
            "{} services: {} Maglev tables, {} rings, {bytes} bytes ({:.1} MiB)",
            t.services().len(),
            tables.len(),
            rings.len(),
            bytes as f64 / (1 << 20) as f64
        );
        assert_eq!((tables.len(), rings.len()), (1000, 1000), "one table and one ring a Service port");
        assert_eq!(bytes, 1000 * 65_537 * 6);
        assert_eq!(t.maglev_entries(), 1000 * 65_537);
    }

    /// A Maglev service's ring gives every flow hash the backend its scheduler picks (weights, a
    /// draining backend and a shuffled configuration order included); a service the worker must not
    /// pick from a ring (another scheduler, ClientIP affinity, no backend taking new flows) has none.
    #[test]
    fn rings_give_the_schedulers_pick() {
        let mut cfg = good();
        let web = &mut cfg.services[0];
        web.backends = vec![backend("10.0.0.9", 8080), backend("10.0.0.7", 8080), backend("10.0.0.8", 8080)];
        web.backends[1].weight = 3;
        web.backends[2].state = BackendState::Draining;
        let one = || vec![backend("10.0.0.20", 80)];
        let mut sticky = service("sticky", "192.0.2.2", 80, ForwardMode::Dsr, one());
        sticky.affinity_timeout = Some(Duration::from_secs(60));
        let mut rr = service("rr", "192.0.2.3", 80, ForwardMode::Dsr, one());
        rr.scheduler = crate::config::SchedulerKind::RoundRobin;
        let mut idle = service("idle", "192.0.2.4", 80, ForwardMode::Dsr, one());
        idle.backends[0].state = BackendState::Draining;
        cfg.services.extend([sticky, rr, idle]);
        let t = TableBuilder::new().build(&cfg).unwrap();
        // The worker's lookup, for a client's flow to the service.
        let ring_of = |s: &Service| {
            let client = "198.51.100.1".parse().unwrap();
            let flow = FlowKey::from_ips(client, s.key.vip, s.key.proto.number(), 40_000, s.key.port).unwrap();
            t.lookup_flow_ring(&flow, t.lookup_hash(&flow)).unwrap().1
        };
        for s in &t.services()[..2] {
            let ring = ring_of(s);
            assert!(ring.is_some(), "{}", s.name);
            let mut seen = HashSet::new();
            for i in 0..20_000u64 {
                let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 7);
                let want = s.scheduler.likely_pick(h).map(|bi| s.backends[bi].id);
                assert_eq!(t.ring_backend(ring, h).map(|b| b.id), want, "{} hash {h:#x}", s.name);
                seen.insert(want);
            }
            let serving = s.backends.iter().filter(|b| b.takes_new_flows()).count();
            assert_eq!(seen.len(), serving, "{}: every serving backend is in the ring", s.name);
        }
        for s in &t.services()[2..] {
            assert!(ring_of(s).is_none(), "{} has no ring", s.name);
        }
    }

    #[test]
    fn a_new_flows_service_fields_share_the_first_cache_line() {
        use core::mem::{align_of, offset_of, size_of};
        assert_eq!(align_of::<Service>(), 64);
        for end in [
            offset_of!(Service, backends) + size_of::<Vec<Backend>>(),
            offset_of!(Service, key) + size_of::<ServiceKey>(),
            offset_of!(Service, slot) + size_of::<ServiceSlot>(),
            offset_of!(Service, affinity_timeout_secs) + size_of::<Option<u32>>(),
            offset_of!(Service, mode) + size_of::<ForwardMode>(),
            offset_of!(Service, on_backend_removed) + size_of::<RemovedBackendPolicy>(),
        ] {
            assert!(end <= 64, "a field a new flow reads ends at byte {end} of Service");
        }
        // The scheduler starts the next line (what `ServiceScheduler::touch` warms).
        assert_eq!(offset_of!(Service, scheduler), 64);
        assert_eq!(size_of::<IndexSlot>(), 64);
    }

    #[test]
    fn service_index_finds_every_service_and_nothing_else() {
        // 3 000 services on IPv4 and IPv6 VIPs, several ports and both protocols per VIP, including
        // an IPv6 VIP that ends in an IPv4 one's bits (::a.b.c.d; a different family: a different
        // key). The IPv4-mapped form (::ffff:a.b.c.d, the IPv4 key's own bytes) cannot be a VIP; a
        // lookup of it misses.
        let mut cfg = good();
        cfg.node.snat_v4 = None;
        cfg.services.clear();
        for i in 0..500u32 {
            let v4 = core::net::Ipv4Addr::from(0xc633_0000 + i);
            let v6 = core::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i));
            let compatible = v4.to_ipv6_compatible();
            for (n, vip) in [IpAddr::V4(v4), IpAddr::V6(v6), IpAddr::V6(compatible)].into_iter().enumerate() {
                for (port, proto) in [(80, Protocol::Tcp), (443, Protocol::Tcp)] {
                    let mut sc = service(
                        &alloc::format!("s{i}-{n}-{port}"),
                        "192.0.2.1",
                        port,
                        ForwardMode::Dsr,
                        vec![backend("10.0.0.9", port)],
                    );
                    if vip.is_ipv6() {
                        sc.backends[0].addr = "2001:db8:ffff::9".parse().unwrap();
                    }
                    sc.key = ServiceKey { vip, port, proto };
                    cfg.services.push(sc);
                }
            }
        }
        let t = TableBuilder::new().build(&cfg).unwrap();
        for (i, sc) in cfg.services.iter().enumerate() {
            let (found, s) = t.lookup(&sc.key).unwrap();
            assert_eq!((found, &s.name), (i, &sc.name));
            let flow = FlowKey::from_ips("198.18.0.1".parse().unwrap(), sc.key.vip, 6, 1234, sc.key.port)
                .or_else(|| FlowKey::from_ips("2001:db8:1::1".parse().unwrap(), sc.key.vip, 6, 1234, sc.key.port))
                .unwrap();
            assert_eq!(t.lookup_flow(&flow), Some(i), "{}", sc.key);
            assert!(t.lookup(&ServiceKey { proto: Protocol::Udp, ..sc.key }).is_none());
            assert!(t.lookup(&ServiceKey { port: 8080, ..sc.key }).is_none());
            assert_eq!(t.lookup_flow(&flow.with_ports(1234, 8080)), None);
            if let IpAddr::V4(v4) = sc.key.vip {
                assert!(t.lookup(&ServiceKey { vip: IpAddr::V6(v4.to_ipv6_mapped()), ..sc.key }).is_none());
            }
        }
        let other = core::net::Ipv4Addr::from(0xc633_0000 + 500);
        assert!(t.lookup(&ServiceKey { vip: IpAddr::V4(other), port: 80, proto: Protocol::Tcp }).is_none());
        // No services: every lookup misses (and terminates).
        let empty = TableBuilder::new().build(&Config::default()).unwrap();
        assert!(empty.lookup(&cfg.services[0].key).is_none());
    }

    fn rejects(cfg: &Config, needle: &str) {
        let mut b = TableBuilder::new();
        let err = b.build(cfg).unwrap_err().to_string();
        assert!(err.contains(needle), "error {err:?} should mention {needle:?}");
    }

    /// The tables keep each backend's full-NAT reply keys (from the backend and its port to the
    /// node's SNAT address of its family): the key they make for a port and protocol is that
    /// reply key, with its hash, for backends of both families; tables built again with other SNAT
    /// addresses keep the new addresses' keys, and with none of a family, none for its backends.
    #[test]
    fn tables_keep_each_backends_reply_keys() {
        use crate::conntrack::ConnKey;
        let seed = ConntrackSeed::new(0x5eed);
        let mut cfg = good();
        cfg.node.snat_v6 = Some("fd00::100".parse().unwrap());
        let v6 = vec![backend("fd00::7", 443), backend("fd00::8", 443)];
        cfg.services.push(service("web6", "2001:db8::1", 443, ForwardMode::Dsr, v6));
        let check = |t: &Tables| {
            let mut n = 0;
            for b in t.services().iter().flat_map(|s| &s.backends) {
                assert_eq!(t.backend_in_slot(b.id.slot), Some(b));
                let Some(snat) = t.node().snat_addr_for(b.addr) else {
                    assert!(t.nat_reply_keys(b.id.slot).is_none(), "{}", b.addr);
                    continue;
                };
                let keys = t.nat_reply_keys(b.id.slot).unwrap();
                for (port, proto) in [(40000, 6), (65535, 17), (1, 6)] {
                    let want = ConnKey::flow(b.addr, snat, b.port, port, proto);
                    let mut key = ConnKey::default();
                    let hash = keys.key(port, proto, &mut key);
                    assert_eq!(hash, want.hash(seed), "{} port {port} from {snat}", b.addr);
                    assert_eq!(key, want);
                }
                n += 1;
            }
            n
        };
        // (What the tables' doc comment says they cost a backend slot.)
        assert_eq!(core::mem::size_of::<Option<PortKeys>>(), 64);
        let mut builder = TableBuilder::new().with_conntrack_seed(seed);
        assert_eq!(check(&builder.build(&cfg).unwrap()), 5);
        cfg.node.snat_v4 = Some("10.0.0.200".parse().unwrap());
        cfg.node.snat_v6 = Some("fd00::200".parse().unwrap());
        assert_eq!(check(&builder.build(&cfg).unwrap()), 5);
        cfg.node.snat_v6 = None;
        assert_eq!(check(&builder.build(&cfg).unwrap()), 3);
    }

    #[test]
    fn backend_location_is_one_cache_line() {
        assert_eq!(core::mem::size_of::<BackendLocation>(), 64);
    }

    #[test]
    fn resolve_backend_returns_the_backend_while_it_stays() {
        let mut b = TableBuilder::new();
        let t = b.build(&good()).unwrap();
        for (si, s) in t.services().iter().enumerate() {
            for be in &s.backends {
                assert_eq!(t.resolve_backend(be.id), Some((si, be)));
            }
        }
        let gone = t.services()[0].backends[0];
        let mut cfg = good();
        cfg.services[0].backends.retain(|bc| (bc.addr, bc.port) != (gone.addr, gone.port));
        let t2 = b.build(&cfg).unwrap();
        assert_eq!(t2.resolve_backend(gone.id), None);
        let kept = t.services()[0].backends[1];
        assert_eq!(t2.resolve_backend(kept.id).map(|(si, be)| (si, be.addr)), Some((0, kept.addr)));
    }

    #[test]
    fn good_config_builds_and_looks_up() {
        let t = TableBuilder::new().build(&good()).unwrap();
        let key = ServiceKey { vip: "192.0.2.1".parse().unwrap(), port: 80, proto: Protocol::Tcp };
        assert_eq!(t.lookup(&key).unwrap().1.name, "web");
        assert!(t.is_vip("192.0.2.1".parse().unwrap()));
        assert!(!t.is_vip("192.0.2.2".parse().unwrap()));
        assert!(t.lookup(&ServiceKey { port: 81, ..key }).is_none());
        assert!(t.is_snat_addr("10.0.0.100".parse().unwrap()));
        for s in t.services() {
            for (i, b) in s.backends.iter().enumerate() {
                assert_eq!(t.resolve(b.id).map(|(_, bi)| bi), Some(i));
            }
        }
    }

    #[test]
    fn every_rule_names_service_and_value() {
        let mut c = good();
        c.services[0].backends.push(backend("10.0.0.7", 8080));
        rejects(&c, "backend 10.0.0.7:8080 appears twice in service web");

        let mut c = good();
        c.services[1].key.port = 80;
        rejects(&c, "services web and dns both use tcp 192.0.2.1:80");

        let mut c = good();
        c.services[0].backends.push(backend("fd00::7", 8080));
        rejects(&c, "backend [fd00::7]:8080 of service web is not of the VIP's family");
        // DSR too, though it rewrites no address: its backend holds the VIP.
        let mut c = good();
        c.services[1].backends[0].addr = "fd00::9".parse().unwrap();
        rejects(&c, "backend [fd00::9]:53 of service dns is not of the VIP's family (192.0.2.1); DSR needs one family");

        let mut c = good();
        c.node.snat_v4 = None;
        rejects(&c, "service web uses NAT on IPv4 VIP 192.0.2.1 but node.snat_v4 is not set");

        let mut c = good();
        c.services[1].mode = ForwardMode::IpIp;
        c.node.tunnel_src_v4 = None;
        rejects(&c, "service dns uses IP-in-IP on IPv4 VIP 192.0.2.1 but node.tunnel_src_v4 is not set");

        let mut c = good();
        c.services[1].backends[0].port = 5353;
        rejects(&c, "backend 10.0.0.9:5353 of service dns uses port 5353, but DSR cannot change ports: use 53");

        // A DSR backend needs its own MAC, gateway or not; other modes may go through the gateway.
        let mut c = good();
        c.services[1].backends[0].mac = None;
        assert!(c.node.gateway_mac.is_some());
        rejects(&c, "backend 10.0.0.9:53 of service dns has no mac: DSR sends frames still addressed to the VIP");
        c.services[1].mode = ForwardMode::IpIp;
        TableBuilder::new().build(&c).expect("an IP-in-IP backend without a mac goes through the gateway");
        c.node.gateway_mac = None;
        c.services.remove(0);
        rejects(&c, "backend 10.0.0.9:53 of service dns has no mac and node.gateway_mac is not set");

        let mut c = good();
        c.services[0].maglev_table_size = Some(1000);
        rejects(&c, "service web: Maglev table size 1000 is not prime: use a prime such as 1009");

        let mut c = good();
        c.services[0].affinity_timeout = Some(Duration::ZERO);
        rejects(&c, "service web has affinity timeout 0 s");

        let mut c = good();
        c.node.timeouts.tcp_fin = Duration::from_millis(500);
        rejects(&c, "node.timeouts.tcp_fin is 500ms: use 1 to 4294967295 s");
        let mut c = good();
        c.node.timeouts.udp = Duration::ZERO;
        rejects(&c, "node.timeouts.udp is 0ns");
        let mut c = good();
        c.node.timeouts.tcp_established = Duration::from_secs(u64::from(u32::MAX) + 1);
        rejects(&c, "node.timeouts.tcp_established is 4294967296s");
        let mut c = good();
        c.node.timeouts.tcp_syn = Duration::from_secs(1);
        c.node.timeouts.tcp_time_wait = Duration::from_secs(u64::from(u32::MAX));
        TableBuilder::new().build(&c).unwrap();

        let mut c = good();
        c.services[0].key.port = 0;
        rejects(&c, "service web uses tcp 192.0.2.1:0: port 0 is not a destination port");
        // A DSR service whose backends match its port 0 (so no port remap to report).
        let mut c = good();
        c.services[1].key.port = 0;
        c.services[1].backends[0].port = 0;
        rejects(&c, "service dns uses tcp 192.0.2.1:0: port 0");
        let mut c = good();
        c.services[0].backends[1].port = 0;
        rejects(&c, "backend 10.0.0.8:0 of service web has port 0");

        let mut c = good();
        c.node.snat_ports = (5000, 4000);
        rejects(&c, "node.snat_ports 5000-4000");

        // A VIP on the SNAT address: only for ports outside snat_ports (a NAT reply is told by its port).
        let mut c = good();
        c.node.snat_v4 = Some("192.0.2.1".parse().unwrap());
        TableBuilder::new().build(&c).expect("ports 80 and 53 are outside 32768-60999");
        c.node.snat_ports = (50, 60);
        rejects(
            &c,
            "service dns (tcp 192.0.2.1:53): the address is node.snat_v4 and the port is in node.snat_ports 50-60",
        );
        // A VIP on a tunnel source address: never, whatever its port (and though it is the SNAT address too).
        let mut c = good();
        (c.node.snat_v4, c.node.tunnel_src_v4) =
            (Some("192.0.2.1".parse().unwrap()), Some("192.0.2.1".parse().unwrap()));
        rejects(&c, "service web (tcp 192.0.2.1:80): the address is node.tunnel_src_v4, and a tunnel source address");

        let mut c = good();
        c.node.gateway_mac = None;
        c.services[1].backends[0].mac = Some([2, 0, 0, 0, 0, 1]);
        rejects(&c, "service web uses NAT, whose replies to clients go to node.gateway_mac, which is not set");

        let mut c = good();
        c.services[1].mode = ForwardMode::Gue { port: 0 };
        rejects(&c, "service dns uses GUE with UDP port 0");

        for (vip, kind) in [
            ("0.0.0.0", "the unspecified address"),
            ("255.255.255.255", "the broadcast address"),
            ("224.0.0.5", "a multicast address"),
            ("127.0.0.1", "a loopback address"),
        ] {
            let mut c = good();
            c.services[1].key.vip = vip.parse().unwrap();
            rejects(&c, &format!("service dns: VIP {vip} is {kind}; a VIP must be a unicast address a host holds"));
        }
        for (vip, backend, kind) in [
            ("192.0.2.1", "0.0.0.0", "the unspecified address"),
            ("192.0.2.1", "239.1.1.1", "a multicast address"),
            ("192.0.2.1", "127.0.0.2", "a loopback address"),
            ("2001:db8::1", "::", "the unspecified address"),
            ("2001:db8::1", "ff02::1", "a multicast address"),
            ("2001:db8::1", "::1", "a loopback address"),
            ("2001:db8::1", "::ffff:10.0.0.9", "an IPv4-mapped IPv6 address"),
        ] {
            let mut c = good();
            c.services[1].key.vip = vip.parse().unwrap();
            c.services[1].backends[0].addr = backend.parse().unwrap();
            rejects(&c, &format!("service dns: backend {backend} is {kind}"));
        }
        let mut c = good();
        c.services[1].key.vip = "::ffff:192.0.2.9".parse().unwrap();
        c.services[1].backends[0].addr = "fd00::9".parse().unwrap();
        rejects(&c, "service dns: VIP ::ffff:192.0.2.9 is an IPv4-mapped IPv6 address (write the IPv4 address)");
        let mut c = good();
        c.node.snat_v4 = Some("0.0.0.0".parse().unwrap());
        rejects(&c, "node.snat_v4 0.0.0.0 is the unspecified address; it must be a unicast address of this node");
        let mut c = good();
        c.node.tunnel_src_v6 = Some("ff02::2".parse().unwrap());
        rejects(&c, "node.tunnel_src_v6 ff02::2 is a multicast address");
        let mut c = good();
        c.node.snat_v6 = Some("::ffff:10.0.0.100".parse().unwrap());
        rejects(&c, "node.snat_v6 ::ffff:10.0.0.100 is an IPv4-mapped IPv6 address");
    }

    /// Two IPv6 backends whose lb-hash identities collide (this interface ID zeroes the identity
    /// hash's state whatever the prefix; see `lb_hash::BackendId::from_socket_addr`): a hashing
    /// scheduler cannot tell them apart, so `validate` refuses them, naming both, as `build` would
    /// (the control side screens each Kubernetes Service with `validate` alone, and one that passed
    /// it but failed `build` failed every later update), and whatever their state (so a backend
    /// turning ready is not what fails). Schedulers that hash nothing keep them.
    #[test]
    fn backends_a_hashing_scheduler_cannot_tell_apart_are_refused() {
        let (a, b) = ("fd00:1::7b8e:3c9:bc7b:b0ad", "fd00:2::7b8e:3c9:bc7b:b0ad");
        let id =
            |addr: &str| lb_hash::BackendId::from_socket_addr(core::net::SocketAddr::new(addr.parse().unwrap(), 53));
        assert_eq!(id(a), id(b), "the test's premise: the two identities collide");
        let mut c = good();
        c.services.remove(0);
        c.services[0].key.vip = "2001:db8::53".parse().unwrap();
        c.services[0].backends = vec![backend(a, 53), backend(b, 53)];
        for kind in SchedulerKind::ALL {
            for state in [BackendState::Active, BackendState::Draining] {
                c.services[0].scheduler = kind;
                c.services[0].backends.iter_mut().for_each(|be| be.state = state);
                let built = TableBuilder::new().build(&c);
                if !kind.picks_from_flow_alone() {
                    assert!(built.is_ok(), "{kind}, {state:?}: {built:?}");
                    continue;
                }
                let err = validate(&c).map(|()| "accepted".to_string()).unwrap_or_else(|e| e.to_string());
                assert_eq!(
                    err,
                    format!(
                        "backends [{a}]:53 and [{b}]:53 of service dns have the same lb-hash identity, which {kind} \
                         cannot tell apart: change one's address, or use a scheduler that does not hash"
                    ),
                    "{kind}, {state:?}"
                );
            }
        }
    }

    #[test]
    fn limits_are_enforced() {
        let mut b = TableBuilder::with_limits(Limits { max_services: 1, max_backends: 10, ..Limits::default() });
        assert!(matches!(b.build(&good()), Err(ConfigError::TooManyServices { count: 2, max: 1 })));
        let mut b = TableBuilder::with_limits(Limits { max_services: 10, max_backends: 2, ..Limits::default() });
        assert!(matches!(b.build(&good()), Err(ConfigError::TooManyBackends { count: 3, max: 2 })));
    }

    /// The Maglev table entries summed over services are bounded: a configuration over the budget is
    /// refused whole, naming the total, the budget and the largest tables; a scheduler without a
    /// table counts nothing, and a service with no backend taking new flows counts its table.
    #[test]
    fn maglev_entries_over_all_services_are_bounded() {
        // Room for web's default table, dns's 1009 entries and not one table more.
        let limits = Limits { max_maglev_entries: 2 * 65_537 + 1008, ..Limits::default() };
        let mut cfg = good();
        cfg.services[1].maglev_table_size = Some(1009);
        TableBuilder::with_limits(limits).build(&cfg).unwrap();

        let mut over = cfg.clone();
        let mut big = service("big", "192.0.2.9", 80, ForwardMode::Dsr, vec![backend("10.0.0.9", 80)]);
        big.backends[0].state = BackendState::Draining;
        over.services.push(big);
        let mut b = TableBuilder::with_limits(limits);
        let Err(err) = b.build(&over) else { panic!("a configuration over the Maglev budget was built") };
        let msg = err.to_string();
        assert_eq!(
            err,
            ConfigError::TooManyMaglevEntries {
                count: 2 * 65_537 + 1009,
                max: limits.max_maglev_entries,
                largest: "big: 65537, web: 65537, dns: 1009".into()
            },
            "{msg}"
        );
        assert!(msg.contains("lower maglev_table_size") && msg.contains("Limits::max_maglev_entries"), "{msg}");

        over.services[2].scheduler = SchedulerKind::RoundRobin;
        b.build(&over).unwrap();
    }

    /// The default budget holds 4 096 distinct tables at the default size, and refuses one more (no
    /// backend serves, so no table is built, but each is counted: one could serve at any time).
    #[test]
    fn the_default_maglev_budget_holds_4096_default_tables() {
        let mut cfg = good();
        cfg.services = (0..4097u32)
            .map(|i| {
                let vip = core::net::Ipv4Addr::from(0xC633_0000 + i).to_string(); // 198.51.0.0/16
                // A backend of its own, so that no two services share a table.
                let addr = core::net::Ipv4Addr::from(0x0A00_0000 + i).to_string();
                let mut s = service(&format!("s{i}"), &vip, 80, ForwardMode::Dsr, vec![backend(&addr, 80)]);
                s.backends[0].state = BackendState::Draining;
                s
            })
            .collect();
        let Err(err) = TableBuilder::new().build(&cfg) else { panic!("4 097 default tables were built") };
        assert!(matches!(err, ConfigError::TooManyMaglevEntries { count, .. } if count == 4097 * 65_537), "{err}");
        cfg.services.pop();
        TableBuilder::new().build(&cfg).unwrap();
    }

    #[test]
    fn failed_build_changes_no_slot() {
        let mut b = TableBuilder::new();
        let t1 = b.build(&good()).unwrap();
        let mut bad = good();
        bad.services.push(service("new", "192.0.2.9", 80, ForwardMode::Dsr, vec![backend("10.9.9.9", 80)]));
        bad.services[0].backends.push(backend("10.0.0.7", 8080));
        assert!(b.build(&bad).is_err());
        let t2 = b.build(&good()).unwrap();
        let ids = |t: &Tables| -> Vec<(ServiceSlot, Vec<BackendRef>)> {
            t.services().iter().map(|s| (s.slot, s.backends.iter().map(|b| b.id).collect())).collect()
        };
        assert_eq!(ids(&t1), ids(&t2));
        assert_eq!(t2.version(), 2);
    }

    #[test]
    fn slots_are_stable_and_reused_with_a_new_generation() {
        let mut b = TableBuilder::new();
        let t1 = b.build(&good()).unwrap();
        let old =
            t1.services()[0].backends.iter().find(|x| x.addr == "10.0.0.7".parse::<IpAddr>().unwrap()).unwrap().id;
        // Weight change: same slot and generation.
        let mut c = good();
        c.services[0].backends[0].weight = 5;
        let t2 = b.build(&c).unwrap();
        assert_eq!(t2.resolve(old).map(|(s, _)| s), Some(0));
        // Removed: the reference no longer resolves, and a newcomer that gets the slot has a new generation.
        c.services[0].backends.remove(0);
        let t3 = b.build(&c).unwrap();
        assert_eq!(t3.resolve(old), None);
        c.services[0].backends.push(backend("10.0.0.77", 8080));
        let t4 = b.build(&c).unwrap();
        let newcomer =
            t4.services()[0].backends.iter().find(|x| x.addr == "10.0.0.77".parse::<IpAddr>().unwrap()).unwrap().id;
        assert_eq!(newcomer.slot, old.slot);
        assert_ne!(newcomer.generation, old.generation);
        assert_eq!(t4.resolve(old), None);
    }

    /// A backend reference resolves only in tables that have the backend it was made for, whichever
    /// builder made them: a fresh builder numbers the same config alike, but with other
    /// generations; a clone keeps the references of the keys it has, and after the fork the two hand
    /// the same slot number to different newcomers, again with other generations.
    #[test]
    fn a_backend_reference_resolves_only_to_its_own_backend_in_tables_of_any_builder() {
        let refs = |t: &Tables| -> Vec<(usize, BackendRef, IpAddr, u16)> {
            t.services()
                .iter()
                .enumerate()
                .flat_map(|(si, s)| s.backends.iter().map(move |b| (si, b.id, b.addr, b.port)))
                .collect()
        };
        let mut a = TableBuilder::new();
        let t1 = a.build(&good()).unwrap();
        let fresh = TableBuilder::new().build(&good()).unwrap();
        assert_eq!(
            refs(&t1).iter().map(|r| r.1.slot).collect::<Vec<_>>(),
            refs(&fresh).iter().map(|r| r.1.slot).collect::<Vec<_>>(),
            "the same config gets the same slot numbers"
        );
        for (_, r, ..) in refs(&t1) {
            assert_eq!(fresh.resolve(r), None, "{r:?} of the first builder resolves in a fresh builder's tables");
        }
        for (_, r, ..) in refs(&fresh) {
            assert_eq!(t1.resolve(r), None, "{r:?}");
        }
        let services =
            |t: &Tables| -> Vec<(ServiceSlot, u32)> { t.services().iter().map(|s| (s.slot, s.generation)).collect() };
        for (x, y) in services(&t1).into_iter().zip(services(&fresh)) {
            assert_ne!(x, y, "service slots of two builders alike");
        }

        let mut c = a.clone();
        let tc = c.build(&good()).unwrap();
        for (si, r, addr, port) in refs(&t1) {
            let (sj, be) = tc.resolve_backend(r).unwrap();
            assert_eq!((sj, be.addr, be.port), (si, addr, port));
        }
        let (mut ca, mut cc) = (good(), good());
        ca.services[1].backends.push(backend("10.0.0.10", 53));
        cc.services[1].backends.push(backend("10.0.0.11", 53));
        let (ta, tc) = (a.build(&ca).unwrap(), c.build(&cc).unwrap());
        let newcomer = |t: &Tables, addr: &str| {
            t.services()[1].backends.iter().find(|b| b.addr == addr.parse::<IpAddr>().unwrap()).unwrap().id
        };
        let (na, nc) = (newcomer(&ta, "10.0.0.10"), newcomer(&tc, "10.0.0.11"));
        assert_eq!(na.slot, nc.slot);
        assert_eq!((ta.resolve(nc), tc.resolve(na)), (None, None));
    }

    /// A service switched into or out of NAT gets new backend generations (its flows cannot cross the
    /// switch) of the same slots (its counters carry on), even when a newcomer takes a free slot in
    /// the same build, and its Maglev ring names those slots; a switch among DSR and the tunnels
    /// keeps slots and generations.
    #[test]
    fn a_switch_into_or_out_of_nat_gives_the_backends_new_slots_and_ring() {
        let ids = |t: &Tables, i: usize| -> Vec<BackendRef> { t.services()[i].backends.iter().map(|b| b.id).collect() };
        let mut b = TableBuilder::new();
        let mut c = good();
        for be in &mut c.services[0].backends {
            be.port = 80;
        }
        let t1 = b.build(&c).unwrap();
        c.services[1].mode = ForwardMode::IpIp;
        let t2 = b.build(&c).unwrap();
        assert_eq!((ids(&t1, 0), ids(&t1, 1)), (ids(&t2, 0), ids(&t2, 1)));

        // Web leaves NAT, and a new service listed first takes a slot.
        c.services[0].mode = ForwardMode::Dsr;
        c.services.insert(0, service("new", "192.0.2.9", 80, ForwardMode::Dsr, vec![backend("10.9.9.9", 80)]));
        let t3 = b.build(&c).unwrap();
        for (old, new) in ids(&t2, 0).into_iter().zip(ids(&t3, 1)) {
            assert_eq!(t3.resolve(old), None, "{old:?}");
            assert_eq!(new.slot, old.slot, "{old:?}");
            assert!(t3.carries_counters_of(new.slot as usize, old.generation), "{old:?}");
        }
        let newcomer = t3.services()[0].backends[0].id;
        assert!(ids(&t2, 0).iter().all(|old| old.slot != newcomer.slot));
        assert!(!t3.carries_counters_of(newcomer.slot as usize, newcomer.generation));
        let slots: HashSet<u32> = t3.services()[1].backends.iter().map(|b| b.id.slot).collect();
        let base = ring_base(&t3.services()[1].backends);
        let ring: Vec<u32> = t3.services()[1].scheduler.ring().unwrap().iter().map(|&e| e + base).collect();
        assert!(ring.iter().all(|s| slots.contains(s)), "ring names slots {:?}, web has {slots:?}", {
            let mut named: Vec<u32> = ring.clone();
            named.sort_unstable();
            named.dedup();
            named
        });

        // And back into NAT.
        c.services[1].mode = ForwardMode::Nat;
        let t4 = b.build(&c).unwrap();
        for (old, new) in ids(&t3, 1).into_iter().zip(ids(&t4, 1)) {
            assert_eq!(t4.resolve(old), None, "{old:?}");
            assert!(t4.carries_counters_of(new.slot as usize, old.generation), "{old:?}");
        }
        // A later build still names the succession (for a worker that skipped t4), and nothing else.
        let t5 = b.build(&c).unwrap();
        for ((before, old), new) in ids(&t3, 1).into_iter().zip(ids(&t4, 1)).zip(ids(&t5, 1)) {
            assert_eq!(old, new);
            assert!(t5.carries_counters_of(new.slot as usize, before.generation), "{old:?}");
            assert!(!t5.carries_counters_of(new.slot as usize, old.generation), "{old:?}");
        }
        // A backend that leaves takes its succession with it: a newcomer on its slot carries nothing.
        let gone = t5.services()[1].backends[0];
        let before = ids(&t3, 1).into_iter().find(|r| r.slot == gone.id.slot).unwrap().generation;
        c.services[1].backends.retain(|b| b.addr != gone.addr);
        b.build(&c).unwrap();
        c.services.push(service("later", "192.0.2.10", 80, ForwardMode::Dsr, vec![backend("10.9.9.10", 80)]));
        let t7 = b.build(&c).unwrap();
        let newcomer = t7.services()[3].backends[0].id;
        assert_eq!(newcomer.slot, gone.id.slot, "the freed slot is reused");
        assert!(!t7.carries_counters_of(newcomer.slot as usize, before));
    }

    /// A change of the node's SNAT address gives the NAT services' backends of its family new
    /// generations of their slots, as a switch out of NAT does (their flows, whose entries hold a
    /// SNAT port but not the address, cannot cross it), with their counters carried on; backends of
    /// other modes, and a build that changes nothing, keep theirs. (The NAT backends kept theirs, so
    /// their flows went on from the new address with no reverse entry under it.)
    #[test]
    fn a_snat_address_change_gives_the_nat_backends_new_generations() {
        let ids = |t: &Tables, i: usize| -> Vec<BackendRef> { t.services()[i].backends.iter().map(|b| b.id).collect() };
        let mut b = TableBuilder::new();
        let mut c = good();
        let t1 = b.build(&c).unwrap();
        c.node.snat_v4 = Some("10.0.0.200".parse().unwrap());
        let t2 = b.build(&c).unwrap();
        for (old, new) in ids(&t1, 0).into_iter().zip(ids(&t2, 0)) {
            assert_eq!(t2.resolve(old), None, "{old:?}");
            assert_eq!(new.slot, old.slot, "{old:?}");
            assert!(t2.carries_counters_of(new.slot as usize, old.generation), "{old:?}");
        }
        assert_eq!(ids(&t1, 1), ids(&t2, 1), "the DSR service keeps its backends");
        let t3 = b.build(&c).unwrap();
        assert_eq!((ids(&t2, 0), ids(&t2, 1)), (ids(&t3, 0), ids(&t3, 1)), "nothing changed");
    }

    /// A source range of the other family than the VIP, or an IPv4-mapped one, can hold no client:
    /// built, a service whose only range it was refused every client (each packet a
    /// `source_not_allowed` drop) and one with other ranges carried it silently. The table build
    /// refuses it, naming the service and the range.
    #[test]
    fn source_ranges_no_client_can_be_in_are_refused() {
        for (vip, range, says) in [
            ("192.0.2.1", "2001:db8::/32", "is not of the family of its VIP 192.0.2.1"),
            (
                "2001:db8::1",
                "198.51.100.0/24",
                "source range 198.51.100.0/24 is not of the family of its VIP 2001:db8::1",
            ),
            ("192.0.2.1", "::ffff:198.51.100.0/120", "write the IPv4 prefix 198.51.100.0/24"),
            ("2001:db8::1", "::ffff:198.51.100.0/120", "is IPv4-mapped IPv6, which no packet comes from"),
        ] {
            let mut c = good();
            c.node.tunnel_src_v6 = Some("2001:db8:1::101".parse().unwrap());
            c.services[1].key.vip = vip.parse().unwrap();
            c.services[1].mode = ForwardMode::IpIp;
            c.services[1].backends[0].addr =
                if vip.contains(':') { "2001:db8:1::9" } else { "10.0.0.9" }.parse().unwrap();
            assert!(TableBuilder::new().build(&c).is_ok(), "{vip}");
            // Alone, and beside a range of the VIP's family.
            let ok: Cidr = if vip.contains(':') { "2001:db8:2::/48" } else { "203.0.113.0/24" }.parse().unwrap();
            for ranges in [vec![range.parse().unwrap()], vec![ok, range.parse().unwrap()]] {
                c.services[1].source_ranges = ranges;
                let err = TableBuilder::new().build(&c).unwrap_err().to_string();
                assert!(err.starts_with(&alloc::format!("service dns: source range {range} ")), "{err}");
                assert!(err.contains(says), "{err}");
            }
        }
    }

    #[test]
    fn source_ranges_filter_clients() {
        let mut c = good();
        c.services[0].source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let t = TableBuilder::new().build(&c).unwrap();
        let s = &t.services()[0];
        assert!(s.allows("198.51.100.9".parse().unwrap()));
        assert!(!s.allows("203.0.113.9".parse().unwrap()));
        assert!(t.services()[1].allows("203.0.113.9".parse().unwrap()));
    }
}
