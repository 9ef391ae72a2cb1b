//! Per-core counters: one per drop reason, per service and per backend, as plain integers.
//!
//! A [`Worker`](crate::Worker) owns one [`Stats`] and bumps it on the fast path with no atomics and no
//! allocation (every array is sized when the worker is built). The control side reads a copy (for
//! example a `Stats::clone` sent back on request) and sums the cores with [`Stats::merge`]. Every path
//! that drops a frame has its own [`DropReason`], so no packet disappears without a number going up.
//!
//! Service and backend counters are indexed by the stable slot numbers that
//! [`TableBuilder`](crate::service::TableBuilder) hands out ([`ServiceSlot`](crate::service::ServiceSlot),
//! [`BackendSlot`](crate::service::BackendSlot)), so they survive table swaps. A slot with a new
//! generation (a newcomer's, or any slot of tables from another builder) starts at zero, but for a
//! backend whose service switched into or out of NAT: the same backend, whose packets, bytes and new
//! flows carry on (its connections, which cannot cross the switch, start at zero).
//!
//! A forwarded packet or a new flow is counted once, at its backend: a service's packets, bytes
//! and new flows are the sums over its backends, added up when [`Stats::service`] is asked (plus
//! what backends that have since left the service had counted, folded into the service when the
//! worker installed the tables without them). Counting at the service too cost the fast path a
//! cache line per packet (with 100 000 services, a miss). Drops are counted at the service.

use alloc::boxed::Box;
use alloc::vec;
use core::fmt;

use crate::service::BackendRef;

/// Why a frame was dropped. One counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DropReason {
    /// Headers that contradict themselves (bad IHL, length fields past the frame, bad version).
    Malformed,
    /// The frame ends inside a header the load balancer needs.
    Truncated,
    /// Addressed to a VIP but with a protocol or header chain the load balancer does not handle.
    Unsupported,
    /// An IPv4 or IPv6 fragment addressed to a VIP. Without reassembly the non-first fragments carry
    /// no ports, so they cannot follow their flow; like Katran we drop every fragment and count it.
    Fragment,
    /// Addressed to a VIP on a port and protocol that no service uses.
    NoService,
    /// The service has no backend that takes new flows.
    NoBackend,
    /// The client is outside the service's allowed source ranges, or a new flow's source names no
    /// single host (unspecified, loopback, multicast, IPv4 `0/8` and broadcast,
    /// IPv4-mapped in IPv6), as no host sends from and no router forwards from.
    SourceNotAllowed,
    /// The flow's backend left the service and the service's policy is to drop such flows.
    BackendRemoved,
    /// No conntrack slot could be freed for a new flow without evicting a live established one.
    ConntrackFull,
    /// Full NAT found no free source port in this core's share of the node's SNAT ports.
    NoSnatPort,
    /// IPv4 TTL or IPv6 hop limit would reach zero on a routed (NAT) rewrite, and the packet is
    /// not answered with ICMP time exceeded (an ICMP error, a source that names no single host, a
    /// frame sent to a link-layer broadcast or multicast address, or past the worker's budget of
    /// errors a second): see `forward::time_exceeded`.
    TtlExpired,
    /// The frame lacks the room its rewrite needs: headroom for a tunnel header (see
    /// [`Frame::HEADROOM_NEEDED`](crate::Frame::HEADROOM_NEEDED)), or tailroom for a neighbour
    /// advertisement longer than the solicitation it answers.
    NoHeadroom,
    /// A reply to the SNAT address that matches no tracked NAT flow.
    NoReverseFlow,
    /// An ICMP error about a flow the load balancer does not track.
    IcmpNoFlow,
    /// The encapsulated packet would be longer than an IP length field holds, or, with
    /// `NodeConfig::tunnel_mtu`, than the path to the backend, and its sender cannot be told to send
    /// less (an IPv4 packet without DF, an ICMP error, a packet from a source that names no single
    /// host): see `forward::too_big`.
    TooBig,
    /// A copy of an ICMP error about a full-NAT flow, handed to every core
    /// ([`Verdict::HandoffAll`](crate::Verdict::HandoffAll)), on a core that does not track the
    /// flow either: the core that does, if any, translates its own copy. Counted apart from
    /// [`DropReason::IcmpNoFlow`], which would otherwise count every error such a core handled once
    /// for each core but two.
    IcmpCopyUntracked,
    /// An ARP request or reply from another host claiming an address the neighbour responder
    /// answers for, which it defended less than 10 s ago (RFC 5227's DEFEND_INTERVAL): not defended
    /// again, so two defenders cannot loop (see [`crate::neighbour`]).
    ArpConflict,
}

impl DropReason {
    /// The number of reasons (length of [`Stats::drops`]).
    pub const COUNT: usize = 17;

    /// Every reason, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Malformed,
        DropReason::Truncated,
        DropReason::Unsupported,
        DropReason::Fragment,
        DropReason::NoService,
        DropReason::NoBackend,
        DropReason::SourceNotAllowed,
        DropReason::BackendRemoved,
        DropReason::ConntrackFull,
        DropReason::NoSnatPort,
        DropReason::TtlExpired,
        DropReason::NoHeadroom,
        DropReason::NoReverseFlow,
        DropReason::IcmpNoFlow,
        DropReason::TooBig,
        DropReason::IcmpCopyUntracked,
        DropReason::ArpConflict,
    ];

    /// A short snake_case name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Truncated => "truncated",
            DropReason::Unsupported => "unsupported",
            DropReason::Fragment => "fragment",
            DropReason::NoService => "no_service",
            DropReason::NoBackend => "no_backend",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::BackendRemoved => "backend_removed",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::NoSnatPort => "no_snat_port",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::NoHeadroom => "no_headroom",
            DropReason::NoReverseFlow => "no_reverse_flow",
            DropReason::IcmpNoFlow => "icmp_no_flow",
            DropReason::TooBig => "too_big",
            DropReason::IcmpCopyUntracked => "icmp_copy_untracked",
            DropReason::ArpConflict => "arp_conflict",
        }
    }

    /// Index into [`Stats::drops`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<crate::forward::RewriteError> for DropReason {
    fn from(e: crate::forward::RewriteError) -> Self {
        use crate::forward::RewriteError;
        match e {
            RewriteError::TtlExpired { .. } => DropReason::TtlExpired,
            RewriteError::NoHeadroom { .. } => DropReason::NoHeadroom,
            RewriteError::TooBig { .. } => DropReason::TooBig,
            RewriteError::FamilyMismatch { .. }
            | RewriteError::MixedTunnelFamilies
            | RewriteError::Untranslatable { .. } => DropReason::Unsupported,
            RewriteError::Inconsistent => DropReason::Malformed,
        }
    }
}

/// Traffic of one virtual service on one core (summed over its backends, see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Frames forwarded to a backend (client to backend direction).
    pub packets: u64,
    /// Bytes of those frames, as received.
    pub bytes: u64,
    /// Flows scheduled to a backend.
    pub new_flows: u64,
    /// Frames addressed to the service and dropped (any reason).
    pub drops: u64,
}

impl ServiceCounters {
    /// Adds another core's counters for the same service into these.
    pub fn add(&mut self, other: &ServiceCounters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.drops += other.drops;
    }
}

/// Traffic of one backend on one core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// Frames forwarded to the backend.
    pub packets: u64,
    /// Bytes of those frames, as received.
    pub bytes: u64,
    /// Flows scheduled to the backend.
    pub new_flows: u64,
    /// Conntrack entries of this core that point at the backend now (what the lc family reads).
    pub active_conns: u64,
    /// Of those, TCP connections in the established state: ipvsadm's ActiveConn. The others
    /// (handshake, closing, time-wait, UDP) are its InActConn.
    pub established_conns: u64,
}

/// One backend slot's counters on one core, with the generation of the backend they count
/// ([`BackendRef::generation`]): the worker sets it, and zeroes the counters, when it installs
/// tables that hand the slot to another backend, and a conntrack entry naming another generation is
/// not counted here.
///
/// One cache line a slot (`align(64)`; 44 bytes used). A new flow writes its backend's counters, and
/// forgetting the flow it displaces reads the generation of that flow's backend and takes from its
/// counters: with 40-byte records (half of them across two lines) and the generations in an array
/// of their own, those were ~2.6 cache misses a new flow at 100 000 services, now ~2
/// (callgrind's cache simulation, BENCHMARKS.md, lb-core, session 19).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct BackendLine {
    pub(crate) counters: BackendCounters,
    pub(crate) generation: u32,
}

impl BackendCounters {
    /// Adds another core's counters for the same backend into these.
    pub fn add(&mut self, other: &BackendCounters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.active_conns += other.active_conns;
        self.established_conns += other.established_conns;
    }
}

/// All counters of one core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Frames seen.
    pub rx: u64,
    /// Frames given [`Verdict::Tx`](crate::Verdict::Tx).
    pub tx: u64,
    /// Frames given [`Verdict::Pass`](crate::Verdict::Pass).
    pub passed: u64,
    /// NAT replies translated back to the client.
    pub reverse_nat: u64,
    /// Frames given [`Verdict::Handoff`](crate::Verdict::Handoff) (NAT replies for another core) or
    /// [`Verdict::HandoffAll`](crate::Verdict::HandoffAll) (ICMP errors about a NAT flow, a copy
    /// for every other core). The cores handed them count them in their `rx` again, one per copy:
    /// a node's frames received from the wire are the sum of `rx` less what the others were handed.
    pub handed_off: u64,
    /// Packets too big for the tunnel path (`NodeConfig::tunnel_mtu`) answered with ICMP
    /// "fragmentation needed" / "packet too big" (each also counts at the backend it was headed for).
    pub icmp_too_big: u64,
    /// Full-NAT packets whose TTL / hop limit expired answered with ICMP "time exceeded" (see
    /// `forward::time_exceeded`; counted in `tx`, neither a drop of their service nor a packet of
    /// a backend).
    pub icmp_time_exceeded: u64,
    /// Conntrack entries evicted to make room for a new flow.
    pub conntrack_evictions: u64,
    /// Full-NAT flows (half-open, else closing) evicted for their SNAT port: a new flow found every
    /// port it tried held by a live flow (a SYN flood, or a SNAT port range too small for the load).
    pub snat_port_evictions: u64,
    /// ClientIP affinity records not stored: the bucket of the client's record held only live
    /// entries, which a record never evicts, so the client's next flow may go to another backend.
    pub affinity_not_recorded: u64,
    /// ARP requests for the load balancer's addresses answered (see [`crate::neighbour`]).
    pub arp_replies: u64,
    /// IPv6 Neighbour Solicitations for the load balancer's addresses answered.
    pub ndp_adverts: u64,
    /// ARP requests and replies from another host that claim an address the responder answers for (RFC 5227
    /// conflicts: a gratuitous ARP of another owner), each defended with a broadcast announcement
    /// unless that address was defended in the last 10 s (see [`crate::neighbour`]).
    pub arp_conflicts: u64,
    /// Tables [`Worker::swap_tables`](crate::Worker::swap_tables) refused because their
    /// [`Limits`](crate::service::Limits) exceed those the worker was built with (it kept serving
    /// its tables).
    pub tables_refused: u64,
    /// Frames dropped, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
    /// Per service slot: its drops, and the packets, bytes and new flows of backends that have left
    /// it (the rest is summed from `backends` when asked).
    services: Box<[ServiceCounters]>,
    backends: Box<[BackendLine]>,
    /// Per service slot, the range of `members` that lists its backends' slots in the tables the
    /// worker runs.
    spans: Box<[(u32, u32)]>,
    members: Box<[u32]>,
    /// True once `spans` and `members` describe installed tables.
    mapped: bool,
}

impl Stats {
    /// Zeroed counters with room for `services` service slots and `backends` backend slots.
    pub fn new(services: usize, backends: usize) -> Self {
        Stats {
            rx: 0,
            tx: 0,
            passed: 0,
            reverse_nat: 0,
            handed_off: 0,
            icmp_too_big: 0,
            icmp_time_exceeded: 0,
            conntrack_evictions: 0,
            snat_port_evictions: 0,
            affinity_not_recorded: 0,
            arp_replies: 0,
            ndp_adverts: 0,
            arp_conflicts: 0,
            tables_refused: 0,
            drops: [0; DropReason::COUNT],
            services: vec![ServiceCounters::default(); services].into_boxed_slice(),
            backends: vec![BackendLine::default(); backends].into_boxed_slice(),
            spans: vec![(0, 0); services].into_boxed_slice(),
            members: vec![0; backends].into_boxed_slice(),
            mapped: false,
        }
    }

    /// The count of one drop reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops, every reason.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Counters of a service slot (zero for a slot out of range): its drops, and its backends'
    /// packets, bytes and new flows summed (including backends that have left it). Merged stats
    /// sum the backends of the merging copy's tables (a total started with [`Stats::new`] takes the
    /// first merged core's): exact once every core runs the same tables.
    pub fn service(&self, slot: crate::service::ServiceSlot) -> ServiceCounters {
        let mut c = self.services.get(slot.index()).copied().unwrap_or_default();
        for b in self.service_backends(slot.index()) {
            if let Some(BackendLine { counters: bc, .. }) = self.backends.get(*b as usize) {
                c.packets += bc.packets;
                c.bytes += bc.bytes;
                c.new_flows += bc.new_flows;
            }
        }
        c
    }

    /// The backend slots of service slot `slot` in the tables the worker runs.
    fn service_backends(&self, slot: usize) -> &[u32] {
        let (start, len) = self.spans.get(slot).copied().unwrap_or_default();
        self.members.get(start as usize..(start as usize).saturating_add(len as usize)).unwrap_or_default()
    }

    /// Counters of a backend slot (zero for a slot out of range).
    pub fn backend(&self, slot: crate::service::BackendSlot) -> BackendCounters {
        self.backends.get(slot.index()).map(|b| b.counters).unwrap_or_default()
    }

    /// Brings a backend slot's counter record (one line) into the cache where a packet or a new flow
    /// will write it, or a displaced flow read its generation and take from it, ahead of the
    /// accesses (the worker's warm-up, a prefetch hint).
    #[inline]
    pub(crate) fn touch_backend(&self, slot: crate::service::BackendSlot) {
        lb_prefetch::element(&self.backends, slot.index());
    }

    /// Adds another core's counters into these (the control side's sum across cores).
    pub fn merge(&mut self, other: &Stats) {
        self.rx += other.rx;
        self.tx += other.tx;
        self.passed += other.passed;
        self.reverse_nat += other.reverse_nat;
        self.handed_off += other.handed_off;
        self.icmp_too_big += other.icmp_too_big;
        self.icmp_time_exceeded += other.icmp_time_exceeded;
        self.conntrack_evictions += other.conntrack_evictions;
        self.snat_port_evictions += other.snat_port_evictions;
        self.affinity_not_recorded += other.affinity_not_recorded;
        self.arp_replies += other.arp_replies;
        self.ndp_adverts += other.ndp_adverts;
        self.arp_conflicts += other.arp_conflicts;
        self.tables_refused += other.tables_refused;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
        for (a, b) in self.services.iter_mut().zip(other.services.iter()) {
            a.add(b);
        }
        for (a, b) in self.backends.iter_mut().zip(other.backends.iter()) {
            a.counters.add(&b.counters);
        }
        // A total started from `Stats::new` takes the first core's map of services to backends.
        if !self.mapped && other.mapped {
            self.spans.iter_mut().zip(other.spans.iter()).for_each(|(a, b)| *a = *b);
            self.members.iter_mut().zip(other.members.iter()).for_each(|(a, b)| *a = *b);
            self.mapped = true;
        }
    }

    pub(crate) fn count_drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    pub(crate) fn service_mut(&mut self, slot: usize) -> Option<&mut ServiceCounters> {
        self.services.get_mut(slot)
    }

    pub(crate) fn backend_mut(&mut self, slot: usize) -> Option<&mut BackendCounters> {
        self.backends.get_mut(slot).map(|b| &mut b.counters)
    }

    /// The counters of the backend `r` names, if its slot's counters count that backend (the same
    /// generation); `None` for a backend that has since left the slot.
    #[inline]
    pub(crate) fn backend_of(&mut self, r: BackendRef) -> Option<&mut BackendCounters> {
        self.backends.get_mut(r.slot as usize).filter(|b| b.generation == r.generation).map(|b| &mut b.counters)
    }

    /// Moves a flow of the backend `r` names into (`change` = 1) or out of (-1) the established
    /// count that `lb list` shows as ActiveConn; a backend that has since left (another generation)
    /// is not counted.
    #[inline]
    pub(crate) fn count_established(&mut self, r: BackendRef, change: i8) {
        if change == 0 {
            return;
        }
        if let Some(c) = self.backend_of(r) {
            c.established_conns =
                if change > 0 { c.established_conns + 1 } else { c.established_conns.saturating_sub(1) };
        }
    }

    /// The generation of the backend a slot's counters count.
    pub(crate) fn backend_generation(&self, slot: usize) -> Option<u32> {
        self.backends.get(slot).map(|c| c.generation)
    }

    /// Folds the packets, bytes and new flows of every backend that is no longer one of its
    /// service's backends (`stays(service slot, backend slot, the slot's generation)` says false)
    /// into that service's own counters, so its sums do not drop when a backend leaves. Then
    /// [`Stats::map_backends`].
    pub(crate) fn retire_backends(&mut self, stays: impl Fn(usize, usize, u32) -> bool) {
        for slot in 0..self.spans.len() {
            let (start, len) = self.spans.get(slot).copied().unwrap_or_default();
            for k in start as usize..start as usize + len as usize {
                let Some(&b) = self.members.get(k) else { break };
                let Some(BackendLine { counters: bc, generation }) = self.backends.get(b as usize) else { continue };
                if stays(slot, b as usize, *generation) {
                    continue;
                }
                if let Some(sc) = self.services.get_mut(slot) {
                    sc.packets += bc.packets;
                    sc.bytes += bc.bytes;
                    sc.new_flows += bc.new_flows;
                }
            }
        }
    }

    /// Records which backend slots each service slot has (from the tables being installed);
    /// services or backends beyond the arrays are left out.
    pub(crate) fn map_backends<'a>(
        &mut self,
        services: impl Iterator<Item = (usize, impl Iterator<Item = usize> + 'a)>,
    ) {
        self.spans.iter_mut().for_each(|s| *s = (0, 0));
        self.mapped = true;
        let mut at = 0usize;
        for (slot, backends) in services {
            let start = at;
            for b in backends {
                if let Some(m) = self.members.get_mut(at)
                    && b < self.backends.len()
                {
                    *m = u32::try_from(b).unwrap_or(u32::MAX);
                    at += 1;
                }
            }
            if let Some(span) = self.spans.get_mut(slot) {
                *span = (u32::try_from(start).unwrap_or(u32::MAX), u32::try_from(at - start).unwrap_or(0));
            }
        }
    }

    /// Clears the counters of a backend slot that the table builder handed to a new backend, of
    /// generation `generation`.
    pub(crate) fn reset_backend(&mut self, slot: usize, generation: u32) {
        if let Some(b) = self.backends.get_mut(slot) {
            *b = BackendLine { counters: BackendCounters::default(), generation };
        }
    }

    /// Gives a backend slot's counters to generation `generation` of the same backend (its service
    /// switched into or out of NAT): its packets, bytes and new flows carry on; its connections,
    /// the old generation's flows, are no longer its.
    pub(crate) fn carry_backend(&mut self, slot: usize, generation: u32) {
        if let Some(b) = self.backends.get_mut(slot) {
            let c = b.counters;
            *b = BackendLine {
                counters: BackendCounters {
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    ..Default::default()
                },
                generation,
            };
        }
    }

    /// Clears the counters of a service slot that the table builder handed to a new service.
    pub(crate) fn reset_service(&mut self, slot: usize) {
        if let Some(s) = self.services.get_mut(slot) {
            *s = ServiceCounters::default();
        }
    }

    /// Active connections per backend slot, as the lc family of schedulers reads them.
    pub(crate) fn backends(&self) -> &[BackendLine] {
        &self.backends
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_dense_and_named_uniquely() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r} is out of order");
        }
        for a in DropReason::ALL {
            for b in DropReason::ALL {
                assert!(a == b || a.name() != b.name());
            }
        }
    }

    #[test]
    fn a_service_counts_what_its_backends_count_and_keeps_what_leavers_counted() {
        use crate::service::ServiceSlot;
        let mut a = Stats::new(2, 4);
        a.map_backends([(1usize, vec![0usize, 2])].into_iter().map(|(s, b)| (s, b.into_iter())));
        for (slot, packets) in [(0, 3), (1, 100), (2, 4)] {
            let c = a.backend_mut(slot).unwrap();
            (c.packets, c.bytes, c.new_flows) = (packets, 10 * packets, 1);
        }
        a.service_mut(1).unwrap().drops = 2;
        let expect = ServiceCounters { packets: 7, bytes: 70, new_flows: 2, drops: 2 };
        assert_eq!(a.service(ServiceSlot(1)), expect);
        assert_eq!(a.service(ServiceSlot(0)), ServiceCounters::default());
        // Another core's counters merge into the same sums.
        let b = a.clone();
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.service(ServiceSlot(1)).packets, 14);
        // A total started empty takes the cores' map of services to backends.
        let mut total = Stats::new(2, 4);
        total.merge(&a);
        total.merge(&b);
        assert_eq!(total.service(ServiceSlot(1)), m.service(ServiceSlot(1)));
        // Backend 2 leaves service 1 and its slot is cleared: the service keeps its 4 packets.
        a.retire_backends(|_, backend, _| backend != 2);
        a.reset_backend(2, 1);
        a.map_backends([(1usize, vec![0usize])].into_iter().map(|(s, b)| (s, b.into_iter())));
        assert_eq!(a.service(ServiceSlot(1)), expect);
    }

    #[test]
    fn merge_sums_every_counter() {
        let mut a = Stats::new(2, 2);
        let mut b = Stats::new(2, 2);
        a.count_drop(DropReason::NoBackend);
        b.count_drop(DropReason::NoBackend);
        b.count_drop(DropReason::Malformed);
        b.rx = 5;
        (a.tx, b.tx) = (1, 2);
        b.passed = 3;
        a.reverse_nat = 4;
        (a.handed_off, b.handed_off) = (10, 20);
        b.icmp_too_big = 6;
        (a.icmp_time_exceeded, b.icmp_time_exceeded) = (5, 6);
        (a.conntrack_evictions, b.conntrack_evictions) = (8, 1);
        (a.snat_port_evictions, b.snat_port_evictions) = (3, 4);
        (a.affinity_not_recorded, b.affinity_not_recorded) = (2, 9);
        b.arp_replies = 2;
        a.ndp_adverts = 1;
        (a.arp_conflicts, b.arp_conflicts) = (1, 12);
        (a.tables_refused, b.tables_refused) = (2, 5);
        b.service_mut(1).unwrap().packets = 7;
        a.backend_mut(0).unwrap().active_conns = 3;
        b.backend_mut(0).unwrap().active_conns = 4;
        a.merge(&b);
        // Naming every field makes a new counter fail to compile here until this test (and so
        // `merge`) considers it.
        let Stats {
            rx,
            tx,
            passed,
            reverse_nat,
            handed_off,
            icmp_too_big,
            icmp_time_exceeded,
            conntrack_evictions,
            snat_port_evictions,
            affinity_not_recorded,
            arp_replies,
            ndp_adverts,
            arp_conflicts,
            tables_refused,
            drops: _,
            services: _,
            backends: _,
            spans: _,
            members: _,
            mapped: _,
        } = a;
        assert_eq!(a.dropped(DropReason::NoBackend), 2);
        assert_eq!(a.dropped(DropReason::Malformed), 1);
        assert_eq!(a.dropped_total(), 3);
        assert_eq!((rx, tx, passed, reverse_nat, handed_off), (5, 3, 3, 4, 30));
        assert_eq!((icmp_too_big, icmp_time_exceeded, conntrack_evictions, snat_port_evictions), (6, 11, 9, 7));
        assert_eq!((arp_replies, ndp_adverts, tables_refused, affinity_not_recorded), (2, 1, 7, 11));
        assert_eq!(arp_conflicts, 13);
        assert_eq!(a.services[1].packets, 7);
        assert_eq!(a.backends[0].counters.active_conns, 7);
    }
}
