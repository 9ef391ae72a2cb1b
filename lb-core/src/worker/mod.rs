//! The per-core fast path: a [`Worker`] turns a burst of frames and the time into verdicts, rewriting
//! forwarded frames in place.
//!
//! ```text
//!  frame ─► parse ─┬─ not IP / not ours ─────────────────────────────────────────────► Pass
//!                  ├─ ARP request / IPv6 NS for our address (responder on) ─► answer ─► Tx
//!                  ├─ to a SNAT address: reply of a NAT flow ─► reverse entry ─► un-NAT ─► Tx
//!                  └─ to a VIP ─► service (VIP, port, proto) ─► source ranges ─► conntrack
//!                                   hit: same backend (unless it left: policy)      │ miss: affinity,
//!                                   scheduler pick, SNAT port, insert ◄────────────┘
//!                                 ─► rewrite (NAT / DSR / IP-in-IP / GUE) ─► counters ─► Tx
//!  every other outcome: Drop(reason), counted in Stats::drops
//! ```
//!
//! A frame of an established flow takes a shortcut with the same outcome: its conntrack entry names
//! its backend, and the backend's location in the tables holds what the decision needs of the
//! service ([`ServiceSummary`]), so no service lookup happens (a backend reference names one backend
//! of one service key, in tables of any builder: see [`crate::service`]; tombstones, expired
//! entries, source ranges and departed backends take the full path).
//! A new flow of a Maglev service without ClientIP affinity takes one too: the service's index slot
//! points to its ring (its Maglev table with entries naming backend slots), so the pick reads one
//! ring entry and the backend's location, and neither the service record nor its scheduler nor its
//! backends (the ring names exactly the scheduler's picks).
//!
//! Frames are decided in batches of 16 (32 and 64 measured no faster): one pass parses them,
//! hashes their 5-tuples and issues each frame's first reads as soon as it has its hash; then tight
//! loops of prefetch hints ([`lb_prefetch`]; plain loads where a later round needs the value) pull
//! what the batch will need into the cache in rounds, each needing only the one before (conntrack
//! bucket heads with, but for a lone SYN, the entry at the key's home way, where most keys sit,
//! in the first pass; likely entries (mostly in already), with a likely hit's backend location
//! and counters, or, for a likely new flow, the way its insert will take, and for frames without a
//! likely hit the service index slots; displaced entries' backend counters, and for likely new
//! flows their ring entries or, for services without a ring, the service records, then their
//! schedulers' tables; last the picked backends' locations and counters), with the service lookups
//! after the second, so the misses of a round overlap; then each frame is decided in order, exactly
//! as if alone (a test holds that).
//!
//! Everything a worker touches per packet was allocated in [`Worker::new`]: the conntrack table, the
//! per-slot counters and scheduler cursors (sized by the first tables' [`Limits`]).
//! [`Worker::swap_tables`] installs new [`Tables`] between bursts and hands the old ones back, so
//! they are freed off the fast path; conntrack survives. It refuses tables with larger slot limits.
//!
//! **Choices a network engineer should know.**
//! - Fragments to a VIP (first or later) are dropped and counted as [`DropReason::Fragment`]: without
//!   reassembly the later fragments carry no ports and cannot follow their flow (Katran does the same).
//! - An IPv6 packet to a VIP whose routing header has segments left is on its way through the VIP to
//!   another destination, whose transport header and checksum it carries: dropped and counted as
//!   [`DropReason::Unsupported`], never balanced (see `packet::parse_ipv6_exts`).
//! - A TCP segment of an unknown flow is scheduled even without SYN, so flows survive a restart of the
//!   load balancer (consistent schedulers give the same backend); the entry stays half-open until the
//!   client's next segment, so a stream of random ACKs cannot fill the table with established entries.
//! - A client's SYN on a 5-tuple in time-wait starts a new flow (scheduled afresh); on a closing one
//!   (one FIN seen; in DSR and tunnel modes the backend's never is) it restarts the flow half-open on
//!   the same backend, as IPVS does, so a client reusing its port soon after a close is established
//!   again by its ACK; unless that backend takes no new flows (draining, weight 0): then the SYN is
//!   scheduled afresh, as on a time-wait one. So is a SYN on a half-open flow (retransmitted: a
//!   backend that went down just after the first one never answers) or an established one of such
//!   a backend; while the backend takes new flows, those stay with it.
//! - UDP entries are half-open until a second packet or a reply is seen.
//! - A packet from a source that names no single host (unspecified, loopback, multicast, IPv4
//!   `0/8` and broadcast, IPv4-mapped in IPv6: spoofed or misrouted, as a router sees it,
//!   RFC 1812 5.3.7) starts no flow: [`DropReason::SourceNotAllowed`].
//! - Full NAT: each core takes a disjoint share of `NodeConfig::snat_ports` ([`snat_port_share`]);
//!   a reply is translated back by the core that owns its destination port ([`snat_port_owner`]);
//!   any other core gives it [`Verdict::Handoff`] to that core, for the I/O layer to pass on
//!   (unless the NIC steers replies by port, most land elsewhere: RSS spreads them by the backend's
//!   address and ports). Replies are sent to `NodeConfig::gateway_mac`.
//! - ICMP errors follow the flow they quote: to a VIP, to the flow's backend (DSR and tunnels carry
//!   them unchanged, NAT translates the error and its quote); to a SNAT address, back to the client
//!   translated. An error to a VIP about a flow this core does not track (RSS hands errors to any
//!   core) still reaches the flow's backend when the service picks from the flow alone (mh, sh, dh,
//!   hrw, ecmp; DSR or tunnel; no affinity), as Katran does; about a full-NAT flow it goes to every
//!   other core ([`Verdict::HandoffAll`]), whose tracking one translates it; other errors about
//!   untracked flows are counted as [`DropReason::IcmpNoFlow`] or [`DropReason::NoReverseFlow`]
//!   (so is a handed-over frame that is not the receiving core's either, a copy of an error handed
//!   to every core as [`DropReason::IcmpCopyUntracked`]). An error to a VIP about
//!   a flow of no service (the host's own, on a VIP that is a node address), an error quoting a
//!   packet from another address than the one it came to (another VIP's: spoofed, or readdressed on
//!   its way) and other ICMP to a VIP (echo) pass to the kernel.
//! - A SNAT address may also be a VIP for ports outside `snat_ports` (a node address that serves
//!   NodePorts and masquerades NAT flows): frames to it go to NAT reply translation by their port
//!   (an ICMP error's by its quote's source port), to the services otherwise
//!   ([`crate::config::NodeConfig::vip_conflict`]).
//! - [`RemovedBackendPolicy::Drop`]: the first packet of a flow whose backend left turns its entry
//!   into a [`ConnState::BackendGone`] tombstone, and every packet of that 5-tuple (retransmissions,
//!   ACKs, a SYN) is dropped as [`DropReason::BackendRemoved`] until the tombstone idles out or, after
//!   the client's FIN or RST (before or after the backend left), its time-wait timeout ends (a SYN
//!   then starts a new flow); a UDP flow's, which no client closes, after the UDP timeout from its
//!   burial, however often the client sends (then its next packet starts a new flow). Tombstones
//!   count as no backend's connection, keep no NAT reverse entry, and are evicted like closing flows.
//!   An ICMP error about a tombstone is dropped so too; once tables bring Reschedule, the flow's
//!   next packet is scheduled afresh, and an error about it goes where an untracked flow's goes.
//! - ARP requests and IPv6 neighbour solicitations for the tables' VIPs and NAT source addresses are
//!   answered in place (verdict Tx) once the worker has a MAC ([`Worker::set_neighbour_mac`], off by
//!   default), and an ARP request from another host claiming one of them is defended with a broadcast
//!   announcement (RFC 5227, at most once per 10 s an address); all other ARP / NDP passes. See
//!   [`crate::neighbour`].
//! - Full NAT routes: a packet to a VIP, or a backend's reply to a SNAT address, that arrives with
//!   TTL / hop limit 1 or 0 is answered with ICMP time exceeded from that address (traceroute shows
//!   the hop), as IPVS answers it; not an ICMP error, a source that names no single host or a
//!   link-layer broadcast, nor more than `node.time_exceeded_per_second` (default
//!   [`forward::time_exceeded::TIME_EXCEEDED_PER_SECOND`]) a second per core: those are counted as
//!   [`DropReason::TtlExpired`]. DSR and the tunnels leave
//!   the TTL alone.
//! - Rewrites are lb-core's [`forward`] module; headroom needed: [`Frame::HEADROOM_NEEDED`].
//!
//! **Where the parts are.** This file holds the per-packet path, from [`Worker::process_burst`]
//! through `Core::process_frame` to the rewrite, and the bookkeeping around conntrack entries.
//! Beside it: `batch`, the first passes over a batch (parse, hash, cache warm-up); `snat`, full
//! NAT's port shares and port search; `state`, a conntrack entry's TCP/UDP states and timeouts.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use core::net::IpAddr;

use lb_hash::FlowHasher;

use crate::config::{ForwardMode, RemovedBackendPolicy};
use crate::conntrack::{
    ConnKey, ConnState, ConntrackTable, Entry, EntryKind, GONE_CLOSED, InsertHint, Inserted, NO_LINK, WAYS,
};
use crate::forward::{self, Macs, TunnelTarget, nat::NatTarget};
use crate::frame::{Frame, Verdict};
use crate::neighbour::NeighbourResponder;
use crate::packet::{Disposition, FlowKey, Fragment, L4, ParseError, Parsed, TcpFlags, proto};
use crate::schedule::{CoreState, FlowInput, Scheduler};
use crate::service::{Backend, BackendRef, Limits, RingRef, Service, ServiceSummary, Tables};
use crate::stats::{DropReason, Stats};
use crate::time::Instant;

mod batch;
mod snat;
mod state;

use batch::{BATCH, Lookahead};
use snat::{ReplyHint, hint_for, nat_target_of};
pub use snat::{snat_port_owner, snat_port_share};
use state::{StateTimeouts, advance, advance_any, advance_new, client_closed, entomb, is_renewal, renew};

/// Conntrack buckets swept for expired entries per burst (see [`ConntrackTable::sweep_bucket`]).
const SWEEP_BUCKETS_PER_BURST: usize = 4;

/// How a worker is sized and which share of the node it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Conntrack entries (rounded up to a power of two times 8). A NAT flow takes two.
    pub conntrack_capacity: usize,
    /// This worker's index among the node's workers, `0..core_count`.
    pub core_index: u16,
    /// How many workers share the node (and its SNAT ports).
    pub core_count: u16,
}

impl WorkerConfig {
    /// One worker that owns the whole node.
    pub fn single_core(conntrack_capacity: usize) -> Self {
        WorkerConfig { conntrack_capacity, core_index: 0, core_count: 1 }
    }

    /// Whether the numbering names one worker of a node: `core_count` at least 1, `core_index` below
    /// it. A worker numbered outside its node owns no share of the SNAT ports (every new full-NAT
    /// flow would be dropped as `no_snat_port`, as if the range were exhausted) and no NAT reply.
    pub fn check(&self) -> Result<(), WorkerConfigError> {
        match (self.core_index, self.core_count) {
            (_, 0) => Err(WorkerConfigError::NoCores),
            (index, count) if index >= count => Err(WorkerConfigError::IndexOutOfRange { index, count }),
            _ => Ok(()),
        }
    }
}

/// Why a [`WorkerConfig`] names no worker of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkerConfigError {
    /// `core_count` 0.
    #[error("core_count is 0: a node has at least one worker")]
    NoCores,
    /// `core_index` not below `core_count`.
    #[error("core_index {index} is not below core_count {count} (workers are numbered 0 to core_count - 1)")]
    IndexOutOfRange {
        /// The index given.
        index: u16,
        /// The count given.
        count: u16,
    },
}

/// One core's load balancer. See the module docs.
#[derive(Debug)]
pub struct Worker {
    tables: Arc<Tables>,
    core: Core,
    /// What the first passes learned about the current batch; kept here so a burst neither
    /// re-initialises nor copies it (each is written in place by [`Lookahead::fill`]).
    ahead: [Lookahead; BATCH],
}

/// Everything a worker owns and mutates; kept apart from the shared tables so the per-packet path can
/// borrow both at once (no reference-count traffic per packet).
#[derive(Debug)]
struct Core {
    conntrack: ConntrackTable,
    stats: Stats,
    /// The limits of the first tables, which sized every per-slot array here and in `stats`.
    limits: Limits,
    /// Scheduler cursor per service slot (rr, wrr).
    cursors: Box<[u32]>,
    /// Generation each service slot's counters and cursor belong to.
    service_generations: Box<[u32]>,
    config: WorkerConfig,
    /// This core's SNAT ports, inclusive.
    snat_ports: Option<(u16, u16)>,
    /// Per backend slot, where this core's next SNAT port search for a flow to it starts (an
    /// offset into `snat_ports`; see [`Core::pick_snat_port`]).
    snat_next: Box<[u16]>,
    /// For the batch being decided, when `reply_hints_live`: per frame, the warm-up's guess at a
    /// full-NAT flow's reply key (its hash) with the conntrack's hint for it ([`Core::warm_nat`]).
    reply_hints: [Option<ReplyHint>; BATCH],
    /// With `reply_hints`, per frame: the backend slot and SNAT port of the reply key its hint
    /// guessed, which [`Core::pick_snat_port`] compares to spare hashing that key.
    reply_guesses: [(u32, u16); BATCH],
    /// With `reply_guesses`, per frame: the reply key its hint guessed, which
    /// [`Core::pick_snat_port`] takes for a right guess rather than build it again; after the pick,
    /// the reply key of the port it gave (a search writes it here), which the flow's reverse entry
    /// takes (copied once, not returned and copied again).
    reply_keys: [ConnKey; BATCH],
    /// False for a batch without likely full-NAT new flows, whose `reply_hints` are left as they were.
    reply_hints_live: bool,
    /// Where a full-NAT rewrite's target is built, a field at a time, for the rewrite to read. Built
    /// on the stack and passed by reference, it was copied whole right after its fields were
    /// written, and the copy's loads each spanned two of those stores (a MAC is written as 4 + 2
    /// bytes), which the core cannot forward from: each waited for the stores to reach the cache.
    nat_target: NatTarget,
    /// A tunnel's outer header, built in place for the same reason as `nat_target`.
    tunnel_target: TunnelTarget,
    hasher: FlowHasher,
    timeouts: StateTimeouts,
    sweep_out: [(u32, Entry); WAYS],
    /// Answers ARP / NDP for the tables' addresses when set ([`Worker::set_neighbour_mac`]).
    neighbour: Option<NeighbourResponder>,
    /// The Ethernet source of the frames this worker sends, in place of `node.local_mac` when set
    /// ([`Worker::set_source_mac`]).
    source_mac: Option<[u8; 6]>,
    /// `source_mac`, else the tables' `node.local_mac`: worked out when either changes, so a packet
    /// reads one field, as it read `node.local_mac` before.
    local_mac: [u8; 6],
    /// The latest second a burst came with: a burst from earlier (a replayed capture's timestamps
    /// out of order, a clock stepped back) is decided at this second instead. Conntrack judges
    /// entries by the time it is given; stepping back would bring expired flows back to life,
    /// some without the NAT reverse entry the sweep had already reclaimed.
    clock: u32,
    /// True while deciding frames another core handed over ([`Worker::process_handed_burst`]):
    /// they are never handed on again.
    handed_in: bool,
    /// The second of the last ICMP time exceeded sent, and how many were sent in it (at most
    /// `time_exceeded_budget`).
    time_exceeded_sent: (u32, u32),
    /// The tables' `node.time_exceeded_per_second`.
    time_exceeded_budget: u32,
}

/// A new flow's conntrack key with its hash, its lb-hash 5-tuple hash (for schedulers and GUE), and
/// what the warm-up chose ahead for its inserts.
#[derive(Debug, Clone, Copy)]
struct FlowHashes<'k> {
    key: &'k ConnKey,
    hash: u64,
    flow_hash: u64,
    /// The warm-up's choice of the way the flow's insert takes, if it made one.
    insert_hint: Option<InsertHint>,
    /// The backend slot the flow's ring entry names, if the warm-up read it (see
    /// [`Lookahead::ring_slot`]).
    ring_slot: Option<u32>,
    /// The frame's place in its batch, where [`Core::reply_hints`] keeps a full-NAT flow's reply
    /// hint.
    slot: usize,
}

/// The outcome of the per-packet path before counters: a verdict and the frame's service/backend.
type Outcome = Result<Verdict, DropReason>;

impl Worker {
    /// A worker serving `tables`. Allocates everything the fast path will use, once: per-slot arrays
    /// as `tables.limits()` allows, which bound the tables it will take later.
    ///
    /// # Panics
    /// If `config` names no worker of a node ([`WorkerConfig::check`]); [`Worker::try_new`] returns
    /// the error instead. Both fail as an allocation does (a capacity-overflow panic beyond the
    /// address space, else the allocator's abort) when the connection table
    /// (`config.conntrack_capacity`: check it first with
    /// [`ConntrackTable::bytes_for`](crate::conntrack::ConntrackTable::bytes_for)) or the per-slot
    /// arrays `tables.limits()` asks for do not fit in memory.
    pub fn new(tables: Arc<Tables>, config: WorkerConfig) -> Worker {
        match Worker::try_new(tables, config) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Worker::new`], or why `config` names no worker of a node.
    pub fn try_new(tables: Arc<Tables>, config: WorkerConfig) -> Result<Worker, WorkerConfigError> {
        config.check()?;
        let limits = tables.limits();
        let core = Core {
            conntrack: ConntrackTable::with_capacity(config.conntrack_capacity, tables.conntrack_seed()),
            stats: Stats::new(limits.max_services, limits.max_backends),
            limits,
            // Each core's round-robin cursors start at its own index, so cores do not all send
            // their first flows to the first backend.
            cursors: vec![u32::from(config.core_index); limits.max_services].into_boxed_slice(),
            service_generations: vec![0; limits.max_services].into_boxed_slice(),
            snat_ports: None,
            snat_next: vec![0; limits.max_backends].into_boxed_slice(),
            reply_hints: [None; BATCH],
            reply_guesses: [(u32::MAX, 0); BATCH],
            reply_keys: [ConnKey::default(); BATCH],
            reply_hints_live: false,
            handed_in: false,
            time_exceeded_sent: (0, 0),
            time_exceeded_budget: tables.node().time_exceeded_per_second,
            nat_target: NatTarget { flow: FlowKey::v4([0; 4], [0; 4], 0, 0, 0), macs: Macs::default() },
            tunnel_target: TunnelTarget {
                src: IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
                dst: IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
                macs: Macs::default(),
                flow_hash: 0,
                // Cores count apart (this core's index, then every `core_count`-th), so no two give
                // one outer identification at once.
                ip_id: config.core_index,
            },
            hasher: FlowHasher::new(tables.node().hash_seed),
            timeouts: StateTimeouts::new(&tables.node().timeouts),
            sweep_out: [(0, Entry::default()); WAYS],
            neighbour: None,
            source_mac: None,
            local_mac: tables.node().local_mac,
            clock: 0,
            config,
        };
        let mut w = Worker { tables: tables.clone(), core, ahead: [Lookahead::NONE; BATCH] };
        w.install(tables);
        Ok(w)
    }

    /// Installs new tables between bursts and returns the old ones (drop them off the fast path).
    /// Conntrack survives: flows keep their backends wherever the new tables still have them.
    ///
    /// Refused are tables whose slot [`Limits`] (`max_services`, `max_backends`) exceed those of the
    /// tables the worker was built with (their slots could lie beyond the per-slot arrays sized then,
    /// uncounted and without scheduler cursors), and tables of another
    /// [`conntrack_seed`](Tables::conntrack_seed) than those (the connection table hashes under
    /// the seed of the worker's first tables, for its life, and their full-NAT reply keys are
    /// hashed under theirs: see [`ConntrackSeed`](crate::conntrack::ConntrackSeed)). The worker
    /// keeps its tables, counts [`Stats::tables_refused`], and returns the refused ones (also to
    /// be dropped off the fast path).
    pub fn swap_tables(&mut self, tables: Arc<Tables>) -> Arc<Tables> {
        let (new, have) = (tables.limits(), self.core.limits);
        if new.max_services > have.max_services
            || new.max_backends > have.max_backends
            || tables.conntrack_seed() != self.core.conntrack.seed()
        {
            self.core.stats.tables_refused += 1;
            return tables;
        }
        self.install(tables)
    }

    fn install(&mut self, tables: Arc<Tables>) -> Arc<Tables> {
        self.core.install(&tables);
        core::mem::replace(&mut self.tables, tables)
    }

    /// Answers ARP requests and IPv6 Neighbour Solicitations for the tables' VIPs and NAT source
    /// addresses with `mac` (the interface's own MAC), or stops answering (`None`, the default: they
    /// pass to the kernel). See [`crate::neighbour`].
    pub fn set_neighbour_mac(&mut self, mac: Option<[u8; 6]>) {
        self.core.neighbour = mac.map(|m| NeighbourResponder::new(m, &self.tables));
    }

    /// The MAC ARP / NDP answers carry (`None`: not answering), as [`Worker::set_neighbour_mac`] set it.
    pub fn neighbour_mac(&self) -> Option<[u8; 6]> {
        self.core.neighbour.as_ref().map(NeighbourResponder::mac)
    }

    /// Sends every frame (forwarded, translated back, an ICMP error answering one) from `mac`, this
    /// worker's interface's own MAC, instead of the tables' `node.local_mac`, which is one value for
    /// every interface (`None`, the default: `node.local_mac`). A switch port or a cloud network
    /// that checks source MACs takes only the interface's.
    pub fn set_source_mac(&mut self, mac: Option<[u8; 6]>) {
        self.core.source_mac = mac;
        self.core.local_mac = mac.unwrap_or(self.tables.node().local_mac);
    }

    /// The tables in use.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
    }

    /// This core's counters.
    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// This core's connection table (read-only; for inspection and tests).
    pub fn conntrack(&self) -> &ConntrackTable {
        &self.core.conntrack
    }

    /// Reclaims the expired conntrack entries of up to `buckets` buckets (each burst does a few), so
    /// they stop counting as their backends' connections: for a worker that receives nothing, whose
    /// bursts do not come (lb-io's poll loop calls it before it waits). `now` as for
    /// [`Worker::process_burst`]; a sweep goes round the whole table in `capacity / WAYS` buckets,
    /// and `buckets` beyond that (`usize::MAX`: all of them) go round it once.
    pub fn sweep(&mut self, now: Instant, buckets: usize) {
        let now_s = self.core.tick(now);
        // A second round in one call would find nothing the first left.
        let buckets = buckets.min(self.core.conntrack.capacity() / WAYS);
        self.core.sweep_buckets(now_s, buckets);
    }

    /// As [`Worker::process_burst`], for frames another core's worker handed over
    /// ([`Verdict::Handoff`], [`Verdict::HandoffAll`]): a frame that is not this core's either is
    /// dropped and counted (`no_reverse_flow`, `icmp_copy_untracked`), never handed on again, so a frame
    /// cannot go round between cores whose tables disagree for a moment.
    pub fn process_handed_burst(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
        self.core.handed_in = true;
        self.process_burst(frames, now, verdicts);
        self.core.handed_in = false;
    }

    /// Decides a verdict for each frame (pairs `frames[i]` with `verdicts[i]`; extra entries of the
    /// longer slice are left alone) and rewrites frames to transmit in place. Then reclaims a few
    /// buckets of expired conntrack entries. A `now` earlier than a previous burst's is taken as
    /// that burst's time.
    pub fn process_burst(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
        let tables = &*self.tables;
        let core = &mut self.core;
        let now_s = core.tick(now);
        // The table's seed, read once a burst: read at each frame's fill, from the table, it was
        // ~4-8 instructions a packet of spills around it in the parse loop (callgrind).
        let seed = core.conntrack.seed();
        for (frames, verdicts) in frames.chunks_mut(BATCH).zip(verdicts.chunks_mut(BATCH)) {
            // 1. Parse every frame of the batch and hash its flow, and issue the first reads its
            //    hash decides (prefetch hints, which wait for nothing: in a loop of their own, they
            //    cost the loop and reading each slot back, ~10 instructions a packet, callgrind).
            let ahead = &mut self.ahead[..frames.len().min(BATCH)];
            for (a, frame) in ahead.iter_mut().zip(frames.iter()) {
                let keyed = a.fill(tables, frame.data(), seed);
                core.warm_first(tables, a, keyed);
            }
            // 2. Find each frame's service, and pull what step 3 will read into the cache, all loads
            //    of the batch in flight together rather than one cache miss after another.
            // Per frame, the entry at the way its insert will take, and whether it displaces one.
            // (Filled in place: returned, the 256-byte array was copied, by a `memcpy` call.)
            let mut insert_ways = [None; BATCH];
            let lookups = core.warm_second(&core.conntrack, tables, ahead, &mut insert_ways, now_s);
            // A batch of established flows looks up no service, and then skips this loop and the
            // warm-up's service loops, which would only test each frame for one: -15 and -26
            // instructions an established packet (callgrind, the cache-hot DSR case).
            let mut services = false;
            if lookups {
                for a in ahead.iter_mut() {
                    a.find_service(tables);
                    // A likely new flow of a service: its scheduler's hash, computed here (not among
                    // the warm-up's loads) and kept for the decision.
                    if a.service.is_some() {
                        a.flow_hash = core.likely_new_flow_hash(a);
                        services = true;
                    } else {
                        a.flow_hash = None;
                    }
                }
            }
            let nat = core.warm(tables, ahead, services);
            core.reply_hints_live = nat;
            if nat {
                let snat = (core.snat_ports, &core.snat_next[..]);
                let out = (&mut core.reply_hints, &mut core.reply_guesses, &mut core.reply_keys);
                Core::warm_nat(&core.conntrack, snat, tables, ahead, &insert_ways, now_s, out);
            }
            // 3. Decide each frame: those with a verdict, counted received once a batch (counted in
            // the loop, a load and a store a frame).
            core.stats.rx += ahead.len().min(verdicts.len()) as u64;
            for (i, ((frame, verdict), a)) in frames.iter_mut().zip(verdicts.iter_mut()).zip(ahead.iter()).enumerate() {
                // Each arm writes its own verdict: one write after the match joined the four, and a
                // `Tx` then wrote the bytes of the others' payloads too, kept across the loop (~5
                // instructions a packet, callgrind).
                match core.process_frame(tables, frame, (a, i), now_s) {
                    Ok(Verdict::Tx) => {
                        core.stats.tx += 1;
                        *verdict = Verdict::Tx;
                    }
                    Ok(Verdict::Pass) => {
                        core.stats.passed += 1;
                        *verdict = Verdict::Pass;
                    }
                    Ok(handoff @ (Verdict::Handoff(_) | Verdict::HandoffAll)) => {
                        core.stats.handed_off += 1;
                        *verdict = handoff;
                    }
                    Ok(Verdict::Drop(reason)) | Err(reason) => {
                        core.stats.count_drop(reason);
                        *verdict = Verdict::Drop(reason);
                    }
                }
            }
        }
        core.sweep(now_s);
    }
}

impl Core {
    fn install(&mut self, tables: &Tables) {
        // A service's counters are its backends' sums: what a backend leaving it had counted stays
        // with the service. (A backend whose service switched into or out of NAT stays, under a new
        // generation of its slot, and keeps its counts: see below.)
        self.stats.retire_backends(|service_slot, b, generation| {
            let r = BackendRef { slot: u32::try_from(b).unwrap_or(u32::MAX), generation };
            tables.carries_counters_of(b, generation)
                || tables
                    .resolve(r)
                    .and_then(|(si, _)| tables.service(si))
                    .is_some_and(|s| s.slot.index() == service_slot)
        });
        // Slots handed to a new service or backend start with zeroed counters.
        for s in tables.services() {
            let i = s.slot.index();
            if let Some(g) = self.service_generations.get_mut(i)
                && *g != s.generation
            {
                *g = s.generation;
                self.stats.reset_service(i);
                if let Some(c) = self.cursors.get_mut(i) {
                    *c = u32::from(self.config.core_index);
                }
            }
        }
        for (i, generation) in tables.backend_slot_generations() {
            if let Some(g) = self.stats.backend_generation(i)
                && g != generation
            {
                if tables.carries_counters_of(i, g) {
                    self.stats.carry_backend(i, generation);
                } else {
                    self.stats.reset_backend(i, generation);
                }
            }
        }
        self.stats.map_backends(
            tables.services().iter().map(|s| (s.slot.index(), s.backends.iter().map(|b| b.slot().index()))),
        );
        let node = tables.node();
        self.snat_ports = snat_port_share(node.snat_ports, self.config.core_index, self.config.core_count);
        self.hasher = FlowHasher::new(node.hash_seed);
        self.timeouts = StateTimeouts::new(&node.timeouts);
        self.local_mac = self.source_mac.unwrap_or(node.local_mac);
        self.time_exceeded_budget = node.time_exceeded_per_second;
        if let Some(r) = &mut self.neighbour {
            r.install(tables);
        }
    }

    /// The neighbour responder's answer to an ARP frame or an NDP message, or a pass when it is off.
    fn answer_neighbour(&mut self, tables: &Tables, frame: &mut Frame<'_>, now: u32) -> Outcome {
        match &mut self.neighbour {
            Some(r) => r.answer(tables, frame, now).count(&mut self.stats),
            None => Ok(Verdict::Pass),
        }
    }

    /// The second to decide at for `now`: never earlier than a previous call's (see `Core::clock`).
    #[inline]
    fn tick(&mut self, now: Instant) -> u32 {
        self.clock = secs(now).max(self.clock);
        self.clock
    }

    /// Reclaims expired entries of a few conntrack buckets.
    fn sweep(&mut self, now: u32) {
        self.sweep_buckets(now, SWEEP_BUCKETS_PER_BURST);
    }

    /// Reclaims the expired entries of the next `buckets` conntrack buckets.
    fn sweep_buckets(&mut self, now: u32, buckets: usize) {
        for _ in 0..buckets {
            let n = self.conntrack.sweep_bucket(now, &mut self.sweep_out);
            for k in 0..n.min(WAYS) {
                let (index, entry) = self.sweep_out[k];
                self.forget(index, &entry);
            }
        }
    }

    /// The whole decision for one frame.
    fn process_frame(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        (ahead, slot): (&Lookahead, usize),
        now: u32,
    ) -> Outcome {
        let p = match &ahead.parsed {
            Ok(p) => p,
            Err(ParseError::Arp) => return self.answer_neighbour(tables, frame, now),
            Err(e) => return parse_failure(e),
        };
        // The frame's conntrack entry if the established path found it but declined it (`NO_LINK`:
        // none), for the reply path not to search its bucket again.
        let mut entry = NO_LINK;
        if ahead.likely_hit
            && let Some(hash) = ahead.conn_hash
            && let Some(outcome) = self.forward_established(tables, frame, p, (&ahead.conn_key, hash, &mut entry), now)
        {
            return outcome;
        }
        // A frame the batch passes did not look up (a likely hit off the established path) is
        // mostly a full-NAT reply (its reverse entry): it goes to `nat_reply` here, its own flow
        // being the reply flow (`nat_reply_flow` of a frame with ports), tested once, with the
        // warm-up's key and hash of it. It has no service to look up: `Tables` refuse one on a
        // SNAT address and port (`NodeConfig::vip_conflict`; looking it up cost ~40 instructions
        // a reply, callgrind).
        if !ahead.needs_service && p.has_ports() && is_nat_reply_flow(tables, &p.flow) {
            return self.nat_reply(tables, frame, p, (&ahead.conn_key, ahead.conn_hash, entry), now);
        }
        // `service` is only a reference here: its record is read for new flows only (see
        // `ServiceSummary`).
        let Some((summary, ring, service)) =
            ahead.service(tables, p).and_then(|(s, ring)| Some((s, ring, tables.service(s.index as usize)?)))
        else {
            return self.not_for_a_service(tables, frame, p, ahead.conn_hash, now);
        };
        if p.fragment != Fragment::None {
            return self.fragment_of_a_service(&summary);
        }
        let computed;
        let (key, hash) = match ahead.conn_hash {
            Some(hash) => (&ahead.conn_key, hash),
            None => {
                computed = conn_key(p);
                (&computed, self.conntrack.hash(&computed))
            }
        };
        let hashes = (key, hash, ahead.flow_hash, ahead.ring_slot, ahead.insert_hint, slot);
        let outcome = self.forward_to_service(tables, frame, p, hashes, (&summary, ring, service), now);
        self.count_service_drop(&summary, &outcome);
        outcome
    }

    /// The established-flow path: a frame of a tracked, live flow whose backend is still in its
    /// service. Everything it needs comes from the conntrack entry and the backend's location (which
    /// holds the service's summary), so it neither looks the service up nor reads its record. Gives
    /// exactly the outcome the general path would (the entry's key is the frame's 5-tuple, so its
    /// destination is the service key that the backend's key includes, and a backend reference
    /// resolves only to the key it was made for, in tables of any builder: see [`crate::service`]);
    /// returns `None`, having changed nothing, for every other case (tombstone, expired, SYN on a
    /// closing or closed flow, backend gone, source ranges to check, a NAT flow's reverse entry),
    /// which the general path then takes, the frame's entry's index in `declined` if it found one.
    #[inline(always)]
    fn forward_established(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        (key, hash, declined): (&ConnKey, u64, &mut u32),
        now: u32,
    ) -> Option<Outcome> {
        if p.fragment != Fragment::None {
            return None;
        }
        let flags = p.tcp_flags;
        let timeouts = &self.timeouts;
        let found = self.conntrack.find_update(
            key,
            hash,
            |e| {
                // A client's SYN on a known flow (rare: a retransmitted SYN, a port reused) takes the
                // general path, which keeps it on its backend, restarts a closing flow there or, if that
                // backend takes no new flows, schedules it afresh (`restarts_elsewhere`; checking the
                // backend here, on every packet, cost ~4 instructions: callgrind, session 22). A UDP
                // frame has no TCP flags.
                // A reverse entry (a full-NAT reply's) is declined on its kind alone, first; a renewal
                // (most packets) is usable without the two tests after it, and `advance` of it is
                // `renew` (`a_renewal_passes_the_established_paths_tests`; ~12 instructions a reply,
                // 2-5 a forward packet, callgrind).
                if e.kind != EntryKind::Forward {
                    return None;
                }
                let renewal = is_renewal(e, flags);
                let usable = renewal || (e.state != ConnState::BackendGone && !flags.is_syn_only());
                if !usable || e.is_expired(now) {
                    return None;
                }
                let (summary, backend) = tables.resolve_known(e.backend).filter(|(s, _)| s.all_clients)?;
                let change = if renewal { renew(e, timeouts, now) } else { advance_any(e, flags, true, timeouts, now) };
                Some((summary, backend, change, e.snat_port))
            },
            declined,
        );
        let (_, (summary, backend, change, snat_port)) = found?;
        self.stats.count_established(backend.id, change);
        // A full-NAT flow's mode is tested alone, first: through `rewrite`'s match, a jump table,
        // every established packet took ~5 instructions to find its arm. Each branch makes its own
        // outcome: joined into one `Result` and matched after, the two cost more than the table
        // (established full NAT 490 against 481 instructions, callgrind).
        let outcome = if summary.mode == ForwardMode::Nat {
            let rewritten = self.rewrite_nat(tables, frame, p, backend, snat_port);
            self.forwarded(frame, p, backend, rewritten)
        } else {
            let rewritten = self.rewrite(tables, frame, p, summary.mode, backend, snat_port, None);
            self.forwarded(frame, p, backend, rewritten)
        };
        self.count_service_drop(summary, &outcome);
        Some(outcome)
    }

    /// The outcome of an established packet for `backend` once `rewritten`: sent and counted at
    /// the backend, or refused.
    #[inline(always)]
    fn forwarded(
        &mut self,
        frame: &mut Frame<'_>,
        p: &Parsed,
        backend: &Backend,
        rewritten: Result<(), DropReason>,
    ) -> Outcome {
        match rewritten {
            Ok(()) => {
                self.count_forwarded(backend, p);
                Ok(Verdict::Tx)
            }
            Err(reason) => self.refused(frame, p, reason),
        }
    }

    /// The lb-hash 5-tuple hash of `f` (schedulers for new flows, tunnels for the outer header).
    #[inline]
    fn flow_hash(&self, f: &FlowKey) -> u64 {
        self.hasher.five_tuple(f.src_ip(), f.dst_ip(), f.proto(), f.src_port(), f.dst_port())
    }

    /// A packet forwarded to `backend` counts at the backend only: its service's packets and bytes
    /// are its backends' sums (see `stats`).
    #[inline]
    fn count_forwarded(&mut self, backend: &Backend, p: &Parsed) {
        if let Some(c) = self.stats.backend_mut(backend.slot().index()) {
            c.packets += 1;
            c.bytes += u64::from(p.ip_len);
        }
    }

    /// Takes back [`Core::count_forwarded`] for a packet that could not go after all.
    #[cold]
    #[inline(never)]
    fn uncount_forwarded(&mut self, backend: &Backend, p: &Parsed) {
        if let Some(c) = self.stats.backend_mut(backend.slot().index()) {
            c.packets = c.packets.saturating_sub(1);
            c.bytes = c.bytes.saturating_sub(u64::from(p.ip_len));
        }
    }

    /// A first fragment names the service by its ports: its drop is the service's too. (Cold and out
    /// of line, as the rare branch it is: inlined, a new full-NAT flow took 20 instructions more and a
    /// new DSR flow 3, callgrind.)
    #[cold]
    #[inline(never)]
    fn fragment_of_a_service(&mut self, summary: &ServiceSummary) -> Outcome {
        let outcome = Err(DropReason::Fragment);
        self.count_service_drop(summary, &outcome);
        outcome
    }

    /// A frame of the service that was not forwarded counts as one of its drops.
    #[inline]
    fn count_service_drop(&mut self, summary: &ServiceSummary, outcome: &Outcome) {
        if !matches!(outcome, Ok(Verdict::Tx))
            && let Some(c) = self.stats.service_mut(summary.slot.index())
        {
            c.drops += 1;
        }
    }

    /// A frame that matches no service: ICMP about a flow, a NAT reply, a VIP port nobody serves, or
    /// not load-balancer traffic at all.
    /// `conn_hash` is the warm-up's hash of the frame's own conntrack key, if it made one.
    fn not_for_a_service(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        conn_hash: Option<u64>,
        now: u32,
    ) -> Outcome {
        if p.l4 == L4::Ndp {
            return self.answer_neighbour(tables, frame, now);
        }
        let dst = p.flow.dst_ip();
        if let Some(reply) = nat_reply_flow(tables, p, dst) {
            // (A TCP or UDP reply's flow is the frame's own: `conn_hash` is its key's hash.)
            let hash = conn_hash.filter(|_| matches!(p.l4, L4::Tcp | L4::Udp));
            return self.nat_reply(tables, frame, p, (&ConnKey::from_flow(&reply), hash, NO_LINK), now);
        }
        if tables.is_vip(dst) {
            if p.fragment != Fragment::None {
                return Err(DropReason::Fragment);
            }
            return match p.l4 {
                L4::Tcp | L4::Udp => Err(DropReason::NoService),
                // An error is about a packet the address it came to sent: one quoting a packet from
                // another address (another VIP's, spoofed or readdressed) names no flow of this
                // one's, and the kernel has it, as the XDP program leaves it there.
                L4::IcmpError(e) if e.inner.src_ip() == dst => {
                    self.icmp_error_to_vip(tables, frame, p, &e.inner.reverse(), now)
                }
                L4::IcmpError(_) => Ok(Verdict::Pass),
                L4::IcmpEcho { .. } | L4::Ndp | L4::OtherIcmp => Ok(Verdict::Pass),
                L4::Other => Err(DropReason::Unsupported),
            };
        }
        Ok(Verdict::Pass)
    }

    /// Source check, conntrack, scheduling and rewrite for a frame addressed to `service`.
    fn forward_to_service(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        (key, hash, flow_hash, ring_slot, insert_hint, slot): (
            &ConnKey,
            u64,
            Option<u64>,
            Option<u32>,
            Option<InsertHint>,
            usize,
        ),
        (summary, ring, service): (&ServiceSummary, RingRef, &Service),
        now: u32,
    ) -> Outcome {
        // (Most services allow every client: then no address is built for the check.)
        if !summary.all_clients && !service.allows(p.flow.src_ip()) {
            return Err(DropReason::SourceNotAllowed);
        }
        let flags = p.tcp_flags;

        // Conntrack lookup: an established flow keeps its backend across table swaps.
        let mut known = None;
        if let Some(index) = self.conntrack.find_hinted(key, hash, insert_hint) {
            let entry = self.conntrack.get(index).copied().unwrap_or_default();
            let closed = match entry.state {
                ConnState::TimeWait => true,
                ConnState::BackendGone => entry.fins & GONE_CLOSED != 0,
                _ => false,
            };
            let drop_policy = summary.on_backend_removed == RemovedBackendPolicy::Drop;
            if entry.is_expired(now) || (flags.is_syn_only() && closed) {
                self.remove(index);
            } else if entry.state == ConnState::BackendGone {
                // A tombstone: the flow's backend left; its packets fail here rather than reach
                // another backend (unless the policy became Reschedule since).
                if drop_policy {
                    let timeouts = &self.timeouts;
                    self.conntrack.update(index, |e| advance(e, flags, true, timeouts, now));
                    return Err(DropReason::BackendRemoved);
                }
                self.remove(index);
            } else {
                // (A reference resolves only in its own service, but for generations that wrapped:
                // see `crate::service`. Comparing costs nothing here.)
                match tables.resolve_backend(entry.backend) {
                    Some((si, backend)) if si == summary.index as usize => {
                        if restarts_elsewhere(entry.state, flags, backend) {
                            self.remove(index);
                        } else {
                            known = Some((index, backend));
                        }
                    }
                    // (The client's SYN after its own close is a new connection: scheduled. A NAT
                    // flow's reverse entry under the frame's key, a swap having put the service on
                    // the flow's SNAT address and port, is no flow of the service's, nor is its
                    // backend the service's: it goes, and its forward entry finds no reply path,
                    // as after a displacement. Tested here, off the paths of flows that resolve,
                    // it costs new flows nothing: before the arms, 3 instructions a new DSR flow,
                    // callgrind.)
                    _ if drop_policy
                        && entry.kind == EntryKind::Forward
                        && !(flags.is_syn_only() && client_closed(&entry)) =>
                    {
                        self.bury(index, flags, now);
                        return Err(DropReason::BackendRemoved);
                    }
                    _ => self.remove(index),
                }
            }
        }

        // The lb-hash flow hash: a new flow's scheduler needs it here; a tunnel's outer header gets
        // it from the rewrite, which computes it when it is not passed in.
        let (index, backend, snat_port, flow_hash) = match known {
            Some((index, backend)) => {
                let timeouts = &self.timeouts;
                let change =
                    self.conntrack.update(index, |e| (e.backend, advance(e, flags, true, timeouts, now), e.snat_port));
                let snat_port = match change {
                    Some((backend, change, snat_port)) => {
                        self.stats.count_established(backend, change);
                        snat_port
                    }
                    None => 0,
                };
                // Counted before the rewrite (taken back if it fails), as a new flow counts its
                // first packet with it: the rewrite's success then counts nothing on either arm.
                self.count_forwarded(backend, p);
                (index, backend, snat_port, flow_hash)
            }
            None => {
                // (The warm-up's ring slot comes from its flow hash: both or neither.)
                let (flow_hash, ring_slot) = match flow_hash {
                    Some(h) => (h, ring_slot),
                    None => (self.flow_hash(&p.flow), None),
                };
                let hashes = FlowHashes { key, hash, flow_hash, insert_hint, ring_slot, slot };
                let (index, backend, snat_port) = self.new_flow(tables, p, hashes, (summary, ring, service), now)?;
                (index, backend, snat_port, Some(flow_hash))
            }
        };
        if let Err(reason) = self.rewrite(tables, frame, p, summary.mode, backend, snat_port, flow_hash) {
            if known.is_none() {
                // A flow whose first frame cannot be sent leaves no state behind.
                self.unschedule(index, backend, p);
            } else {
                self.uncount_forwarded(backend, p);
            }
            return self.refused(frame, p, reason);
        }
        Ok(Verdict::Tx)
    }

    /// A flow conntrack does not know: backend, SNAT port, conntrack insert. Returns the forward
    /// entry's index, the backend and the SNAT port (0 but in NAT mode).
    fn new_flow<'t>(
        &mut self,
        tables: &'t Tables,
        p: &Parsed,
        hashes: FlowHashes<'_>,
        (summary, ring, service): (&ServiceSummary, RingRef, &'t Service),
        now: u32,
    ) -> Result<(u32, &'t Backend, u16), DropReason> {
        let FlowHashes { key, hash, flow_hash, insert_hint, ring_slot, slot } = hashes;
        // A spoofed or misrouted source starts nothing: no state, and no reply (a NAT-ed one
        // least of all) to an address that names no host. (A handful of compares on the key's bytes,
        // new flows only.)
        if !p.flow.src_names_one_host() {
            return Err(DropReason::SourceNotAllowed);
        }
        let backend = self.pick_backend(tables, p, (flow_hash, ring_slot), ring, service, now)?;
        // Full NAT: the SNAT port, with the hash of the reply key it frees up (the key is left in
        // `reply_keys`).
        let reply_hint = self.reply_hint(slot);
        let reply = match summary.mode {
            ForwardMode::Nat => {
                let reply = self.pick_snat_port(tables, p.flow.proto(), backend, (reply_hint, slot), now);
                Some(reply.ok_or(DropReason::NoSnatPort)?)
            }
            _ => None,
        };
        let snat_port = reply.map_or(0, |r| r.port);
        let mut entry = Entry {
            key: *key,
            state: if p.l4 == L4::Udp { ConnState::UdpNew } else { ConnState::SynSeen },
            kind: EntryKind::Forward,
            fins: 0,
            expires: 0,
            backend: backend.id,
            snat_port,
            link: NO_LINK,
        };
        advance_new(&mut entry, p.tcp_flags, &self.timeouts, now);
        let index = self.insert(entry, hash, now, NO_LINK, insert_hint)?;
        // Counted as soon as it is in the table, so that any removal below un-counts it exactly;
        // with its first packet, as forwarded (`count_forwarded`), which `unschedule` un-counts if
        // it cannot go: one look at the backend's counters rather than two.
        if let Some(c) = self.stats.backend_mut(backend.slot().index()) {
            c.new_flows += 1;
            c.active_conns += 1;
            c.packets += 1;
            c.bytes += u64::from(p.ip_len);
        }
        if let Some(reply) = reply {
            // (The pick left the reply key at the frame's slot; `slot` is below `BATCH`, the `%`
            // only says so.)
            let reverse = Entry { key: self.reply_keys[slot % BATCH], kind: EntryKind::Reverse, link: index, ..entry };
            // (Inserted linked: `insert_reverse`.)
            match self.insert(reverse, reply.hash, now, index, hint_for(reply_hint, reply.hash)) {
                Ok(_) => {}
                Err(e) => {
                    self.unschedule(index, backend, p);
                    return Err(e);
                }
            }
        }
        // (A service with a ring has no affinity.)
        if ring.is_none()
            && let Some(timeout) = service.affinity_timeout_secs
        {
            self.record_affinity(service, p.flow.src_ip(), backend.id, (index, timeout), now);
        }
        Ok((index, backend, snat_port))
    }

    /// The backend for a new flow: the service's ring entry when it has a ring (Maglev without
    /// affinity: no service record, scheduler or backend array read), else the client's ClientIP
    /// affinity or the service's scheduler.
    #[inline]
    fn pick_backend<'t>(
        &mut self,
        tables: &'t Tables,
        p: &Parsed,
        (flow_hash, ring_slot): (u64, Option<u32>),
        ring: RingRef,
        service: &'t Service,
        now: u32,
    ) -> Result<&'t Backend, DropReason> {
        if ring.is_some() {
            let backend = match ring_slot {
                Some(slot) => tables.backend_in_slot(slot),
                None => tables.ring_backend(ring, flow_hash),
            };
            debug_assert!(
                backend.map(|b| b.id) == tables.ring_backend(ring, flow_hash).map(|b| b.id),
                "the warm-up's ring slot is the flow's ring entry"
            );
            return backend.ok_or(DropReason::NoBackend);
        }
        let client = p.flow.src_ip();
        // ClientIP affinity, when the service has it: kept out of line, as most services do not,
        // and the optional key kept across `new_flow` cost every new flow ~70 instructions
        // (callgrind, 1394 -> 1322 per SYN when it moved out).
        let sticky = match service.affinity_timeout_secs {
            Some(_) => self.sticky_backend(tables, service, client, now),
            None => None,
        };
        let backend_index = match sticky {
            Some(bi) => bi,
            None => {
                // With ClientIP affinity mh and hrw hash the client address, not the 5-tuple: each
                // core keeps its own affinity records while RSS spreads a client's flows over the
                // queues, so a core without the client's record must pick what another core (or node)
                // picked for the client's first flow.
                let flow_hash = match service.affinity_timeout_secs {
                    Some(_) => self.hasher.source(client),
                    None => flow_hash,
                };
                let flow = FlowInput {
                    src: client,
                    dst: p.flow.dst_ip(),
                    proto: p.flow.proto(),
                    sport: p.flow.src_port(),
                    dport: p.flow.dst_port(),
                    flow_hash,
                    hasher: self.hasher,
                };
                let slot = service.slot.index();
                let mut spare = 0;
                let cursor = self.cursors.get_mut(slot).unwrap_or(&mut spare);
                let mut core = CoreState { cursor, conns: self.stats.backends() };
                service.scheduler.pick(&flow, &service.backends, &mut core).ok_or(DropReason::NoBackend)?
            }
        };
        service.backends.get(backend_index).ok_or(DropReason::NoBackend)
    }

    /// The client's affinity record for `service`, if live: the index of the backend it names, when
    /// that backend is still in the service and takes new flows.
    #[inline(never)]
    fn sticky_backend(&self, tables: &Tables, service: &Service, client: IpAddr, now: u32) -> Option<usize> {
        let k = affinity_key(service, client);
        let i = self.conntrack.find(&k, self.conntrack.hash(&k))?;
        let e = self.conntrack.get(i).filter(|e| !e.is_expired(now))?;
        let (si, bi) = tables.resolve(e.backend)?;
        let s = tables.service(si)?;
        (s.backends.get(bi)?.takes_new_flows() && s.slot == service.slot).then_some(bi)
    }

    /// Records (or renews) the client's affinity to `backend` for `timeout` seconds, never
    /// displacing the new flow's own entry at `flow_index`. `now` is the whole second the flow
    /// started in, any fraction of it: the record lasts one second more, so that a flow `timeout`
    /// seconds later still finds it (as kube-proxy's `recent` match counts the timeout itself in),
    /// and affinity lasts at least the timeout, at most a second more. A record that finds no free
    /// or expired way is left out and counted in [`Stats::affinity_not_recorded`].
    #[inline(never)]
    fn record_affinity(
        &mut self,
        service: &Service,
        client: IpAddr,
        backend: BackendRef,
        (flow_index, timeout): (u32, u32),
        now: u32,
    ) {
        let k = affinity_key(service, client);
        let h = self.conntrack.hash(&k);
        if let Some(i) = self.conntrack.find(&k, h) {
            self.remove(i);
        }
        let record = Entry {
            key: k,
            state: ConnState::Affinity,
            kind: EntryKind::Affinity,
            expires: now.saturating_add(timeout).saturating_add(1),
            backend,
            link: NO_LINK,
            ..Entry::default()
        };
        // Affinity is best effort: a bucket without a free or expired way only costs stickiness,
        // never another flow's entry; counted, as the client's next flow may then go elsewhere.
        match self.conntrack.insert_without_evicting(record, h, now, flow_index) {
            Ok(Inserted { displaced: Some(d), .. }) => self.forget(d.index, &d.entry),
            Ok(_) => {}
            Err(_) => self.stats.affinity_not_recorded += 1,
        }
    }

    /// A reply from a backend to the SNAT address (or an ICMP error about a NAT flow), `key` its
    /// reverse entry's key (of the flow [`nat_reply_flow`] gives) with, when known, its hash (for a
    /// TCP or UDP reply, the warm-up's key and hash of the frame's own flow, not built or hashed
    /// again), and `entry` that entry's index if the established path found it (else `NO_LINK`):
    /// find its NAT flow by that entry and translate it back to VIP -> client. (Out of line: inlined into `process_burst` with its IPv4
    /// rewrite, it cost established DSR and full-NAT packets 5 or 6 instructions more, callgrind.)
    #[inline(never)]
    fn nat_reply(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        (key, hash, entry): (&ConnKey, Option<u64>, u32),
        now: u32,
    ) -> Outcome {
        let port = key.dport;
        if p.fragment != Fragment::None {
            return Err(DropReason::Fragment);
        }
        if !self.snat_ports.is_some_and(|(lo, hi)| (lo..=hi).contains(&port)) {
            return self.not_my_snat_port(tables, port);
        }
        let index = match entry {
            NO_LINK => self
                .conntrack
                .find(key, hash.unwrap_or_else(|| self.conntrack.hash(key)))
                .ok_or(DropReason::NoReverseFlow)?,
            index => index,
        };
        let (flags, timeouts) = (p.tcp_flags, &self.timeouts);
        // The forward entry's key is read where it is (the update left it as it was): copied out
        // of the update, it was copied byte by byte, ~45 instructions a reply (callgrind).
        // Only the state change comes out of the update; the backend is read from the entry when
        // there is one to count (rarely: a renewal changes nothing). Taken out with the change, it
        // was read and spilled every reply (~4 instructions, callgrind). An ICMP error changes no
        // state; the test is made in the update, from the frame: made before it, its answer was
        // spilled across it (1 instruction a reply, callgrind).
        let (change, forward) = self
            .conntrack
            .update_linked(index, now, |forward| {
                if matches!(p.l4, L4::IcmpError(_)) { 0 } else { advance(forward, flags, false, timeouts, now) }
            })
            .ok_or(DropReason::NoReverseFlow)?;
        if change != 0 {
            self.stats.count_established(forward.backend, change);
        }
        let src = self.local_mac;
        let dst = tables.node().gateway_mac.unwrap_or(src);
        if let Err(e) = rewrite_reply(frame, p, &forward.key, (&src, &dst), &mut self.nat_target)? {
            return self.refused(frame, p, e.into());
        }
        self.stats.reverse_nat += 1;
        Ok(Verdict::Tx)
    }

    /// A NAT reply to a SNAT port outside this core's share: the owner's, to hand over, or (no
    /// owner, this core's share being empty) a drop. Cold: with several queues, a NIC that steers
    /// replies by SNAT port never sends one here.
    #[cold]
    #[inline(never)]
    fn not_my_snat_port(&self, tables: &Tables, port: u16) -> Outcome {
        match snat_port_owner(tables.node().snat_ports, self.config.core_count, port) {
            Some(owner) if owner != self.config.core_index && !self.handed_in => Ok(Verdict::Handoff(owner)),
            _ => Err(DropReason::NoReverseFlow),
        }
    }

    /// An ICMP error addressed to a VIP, about the flow `flow` (client to VIP): send it where the flow
    /// goes, with the mode's rewrite (NAT translates the error and its quote).
    fn icmp_error_to_vip(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        flow: &FlowKey,
        now: u32,
    ) -> Outcome {
        let key = ConnKey::from_flow(flow);
        // A NAT flow's reverse entry under the flow's key (a swap put the service on the flow's SNAT
        // address and port) is no flow of the service's.
        let tracked = self.conntrack.find(&key, self.conntrack.hash(&key)).filter(|&i| self.conntrack.is_live(i, now));
        let Some(entry) = tracked.and_then(|i| self.conntrack.get(i)).filter(|e| e.kind == EntryKind::Forward).copied()
        else {
            return self.icmp_error_untracked(tables, frame, p, flow);
        };
        if entry.state == ConnState::BackendGone {
            // Buried under the Drop policy. Under Reschedule now (the tables changed it since) the
            // tombstone stands for nothing, as the flow's next packet finds: the error goes where
            // an untracked flow's goes (the tombstone stays for that packet to clear).
            let reschedule = tables
                .lookup_flow(flow)
                .and_then(|i| tables.service(i))
                .is_some_and(|s| s.on_backend_removed == RemovedBackendPolicy::Reschedule);
            return if reschedule {
                self.icmp_error_untracked(tables, frame, p, flow)
            } else {
                Err(DropReason::BackendRemoved)
            };
        }
        let (si, bi) = tables.resolve(entry.backend).ok_or(DropReason::IcmpNoFlow)?;
        let service = tables.service(si).ok_or(DropReason::IcmpNoFlow)?;
        let backend = service.backends.get(bi).ok_or(DropReason::IcmpNoFlow)?;
        let hash = self.flow_hash(flow);
        self.rewrite(tables, frame, p, service.mode, backend, entry.snat_port, Some(hash))?;
        Ok(Verdict::Tx)
    }

    /// An ICMP error about a flow this core does not track. RSS spreads errors over the queues by
    /// the error's own addresses (a router's), not by the flow they quote, so with several queues
    /// most errors about a flow land on a core that never saw it. When the flow's service picks
    /// from the flow alone ([`crate::config::SchedulerKind::picks_from_flow_alone`], no ClientIP affinity) in DSR
    /// or a tunnel mode, every core knows the flow's backend, and the error goes there as Katran
    /// sends it (the backend's path MTU discovery needs the "fragmentation needed" / "packet too
    /// big" its replies to the client cause). Nothing is tracked for it. A flow still on a draining
    /// backend gets its error sent to the backend the scheduler gives new flows instead, which
    /// ignores an error about a connection it does not have. NAT flows need the tracking core's
    /// SNAT port: the error goes to every other core ([`Verdict::HandoffAll`]), where only the
    /// tracking one finds it. The other schedulers keep per-core state: [`DropReason::IcmpNoFlow`].
    #[inline(never)]
    fn icmp_error_untracked(&mut self, tables: &Tables, frame: &mut Frame<'_>, p: &Parsed, flow: &FlowKey) -> Outcome {
        // About no service's flow: the host's own (a VIP that is a node address serving NodePorts
        // also carries the node's connections, whose path MTU discovery needs these errors).
        let Some(service) = tables.lookup_flow(flow).and_then(|i| tables.service(i)) else {
            return Ok(Verdict::Pass);
        };
        if service.mode == ForwardMode::Nat {
            // Only the core that tracks the flow has its SNAT port: ask the others. A copy handed
            // here is one of several, counted apart.
            return if self.handed_in {
                Err(DropReason::IcmpCopyUntracked)
            } else if self.config.core_count > 1 {
                Ok(Verdict::HandoffAll)
            } else {
                Err(DropReason::IcmpNoFlow)
            };
        }
        if service.affinity_timeout_secs.is_some() || !service.scheduler.kind().picks_from_flow_alone() {
            return Err(DropReason::IcmpNoFlow);
        }
        if !service.allows(flow.src_ip()) {
            return Err(DropReason::SourceNotAllowed);
        }
        let flow_hash = self.flow_hash(flow);
        let input = FlowInput {
            src: flow.src_ip(),
            dst: flow.dst_ip(),
            proto: flow.proto(),
            sport: flow.src_port(),
            dport: flow.dst_port(),
            flow_hash,
            hasher: self.hasher,
        };
        // These schedulers read no per-core state: a spare cursor and no connection counts.
        let mut cursor = 0;
        let bi = service.scheduler.pick(&input, &service.backends, &mut CoreState::new(&mut cursor));
        let backend = bi.and_then(|i| service.backends.get(i)).ok_or(DropReason::IcmpNoFlow)?;
        self.rewrite(tables, frame, p, service.mode, backend, 0, Some(flow_hash))?;
        Ok(Verdict::Tx)
    }

    /// Rewrites a frame of the flow at conntrack `index` for `backend`, as the service's mode says.
    // Always inlined: as a call, its prologue, epilogue and argument passing cost more than the DSR
    // rewrite itself (~20 of ~50 instructions per packet, callgrind).
    #[inline(always)]
    #[expect(
        clippy::too_many_arguments,
        reason = "the per-packet context, passed by reference, no struct to build per packet"
    )]
    fn rewrite(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        mode: ForwardMode,
        backend: &Backend,
        snat_port: u16,
        flow_hash: Option<u64>,
    ) -> Result<(), DropReason> {
        // The MACs are written in each arm, into the frame (DSR) or the target the rewrite reads
        // (`Core::nat_target`, `Core::tunnel_target`), never into a copy built before the match (16
        // instructions a DSR packet, callgrind, and a store-forwarding stall a NAT one). DSR reads
        // `self.local_mac` itself: through this copy, made before the match, it went by the stack
        // (10 instructions a DSR packet).
        let local_mac = self.local_mac;
        match mode {
            ForwardMode::Nat => self.rewrite_nat(tables, frame, p, backend, snat_port)?,
            ForwardMode::Dsr => forward::dsr::rewrite_from(frame, &self.local_mac, &backend.mac)?,
            ForwardMode::IpIp | ForwardMode::Gue { .. } if self.too_big_for_tunnel(tables, frame, p, mode)? => {}
            ForwardMode::IpIp | ForwardMode::Gue { .. } => {
                let src = tables.node().tunnel_src_for(backend.addr).ok_or(DropReason::Unsupported)?;
                // The outer source port (GUE) or flow label (IPv6) comes from the flow hash: the
                // caller's, else `p`'s flow's, computed only here.
                let hash = flow_hash.unwrap_or_else(|| self.flow_hash(&p.flow));
                let t = &mut self.tunnel_target;
                (t.src, t.dst, t.flow_hash) = (src, backend.addr, (hash >> 32) as u32);
                (t.macs.src, t.macs.dst) = (local_mac, backend.mac);
                match mode {
                    ForwardMode::Gue { port } => forward::gue::encap(frame, p, &self.tunnel_target, port)?,
                    _ => forward::ipip::encap(frame, p, &self.tunnel_target)?,
                }
                // The next outer identification (used only by a packet without DF).
                let t = &mut self.tunnel_target;
                t.ip_id = t.ip_id.wrapping_add(self.config.core_count.max(1));
            }
        }
        Ok(())
    }

    /// [`Core::rewrite`] of a frame of a full-NAT service (its `ForwardMode::Nat` arm).
    #[inline(always)]
    fn rewrite_nat(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        backend: &Backend,
        snat_port: u16,
    ) -> Result<(), DropReason> {
        // An IPv4 TCP or UDP packet to an IPv4 backend (most of them) is rewritten from the
        // addresses, ports and MACs where they are, with no target built.
        if let IpAddr::V4(to) = backend.addr
            && let Some(snat) = tables.node().snat_v4
            && let Some(done) = forward::nat::rewrite_v4_ports(
                frame,
                p,
                (snat.octets(), snat_port),
                (to.octets(), backend.port),
                (&self.local_mac, &backend.mac),
            )
        {
            return done.map_err(DropReason::from);
        }
        // (`let else` rather than `ok_or(..)?`: the 40-byte key then goes straight into the
        // target rather than through an `Option` and a `Result`.)
        let Some(flow) = nat_target_of(tables, p.flow.proto(), snat_port, backend) else {
            return Err(DropReason::NoSnatPort);
        };
        let local_mac = self.local_mac;
        self.nat_rewrite(frame, p, flow, (local_mac, backend.mac))?;
        Ok(())
    }

    /// [`forward::nat::rewrite`] to `flow` with Ethernet addresses `(src, dst)`, its target built in
    /// place in [`Core::nat_target`] (which says why).
    #[inline(always)]
    fn nat_rewrite(
        &mut self,
        frame: &mut Frame<'_>,
        p: &Parsed,
        flow: FlowKey,
        (src, dst): ([u8; 6], [u8; 6]),
    ) -> Result<(), forward::RewriteError> {
        let t = &mut self.nat_target;
        (t.flow, t.macs.src, t.macs.dst) = (flow, src, dst);
        forward::nat::rewrite(frame, p, &self.nat_target)
    }

    /// The outcome for a frame its rewrite refused for `reason`: a drop, but for a full-NAT frame
    /// refused with its TTL / hop limit expired, unchanged (see [`forward::nat::rewrite`]), which
    /// becomes the ICMP time exceeded error for its sender when it may be answered
    /// ([`forward::time_exceeded::can_answer`]) and this second's budget allows (then neither a
    /// drop of its service nor a packet of a backend). Cold and out of line, called only on the
    /// rewrite's error path. (Answered from `process_burst`'s outcome instead, the frame and its
    /// parse stayed live across the decision: 16 instructions more a new full-NAT flow, callgrind.)
    #[cold]
    #[inline(never)]
    fn refused(&mut self, frame: &mut Frame<'_>, p: &Parsed, reason: DropReason) -> Outcome {
        if reason != DropReason::TtlExpired {
            return Err(reason);
        }
        let now = self.clock;
        let (second, sent) = self.time_exceeded_sent;
        let sent = if second == now { sent } else { 0 };
        // (The TTL the parse saw is still the frame's: nothing was written.)
        if p.ttl > 1 || sent >= self.time_exceeded_budget || !forward::time_exceeded::can_answer(frame, p) {
            return Err(reason);
        }
        forward::time_exceeded::reply(frame, p, self.local_mac)?;
        self.time_exceeded_sent = (now, sent + 1);
        self.stats.icmp_time_exceeded += 1;
        Ok(Verdict::Tx)
    }

    /// With a tunnel path MTU set, whether the packet would exceed it once encapsulated; if so the
    /// frame now holds the ICMP error for its sender (to transmit), or it is a counted drop.
    #[inline]
    fn too_big_for_tunnel(
        &mut self,
        tables: &Tables,
        frame: &mut Frame<'_>,
        p: &Parsed,
        mode: ForwardMode,
    ) -> Result<bool, DropReason> {
        let node = tables.node();
        let Some((mtu, overhead)) = node.tunnel_mtu.zip(forward::too_big::tunnel_overhead(mode, p.family())) else {
            return Ok(false);
        };
        if p.ip_len + u32::from(overhead) <= u32::from(mtu) {
            return Ok(false);
        }
        if !forward::too_big::can_signal(frame, p) {
            return Err(DropReason::TooBig);
        }
        forward::too_big::reply(frame, p, mtu.saturating_sub(overhead), self.local_mac)?;
        self.stats.icmp_too_big += 1;
        Ok(true)
    }

    /// Inserts an entry (never displacing the entry at `spare`; into the way `hint` names if it still
    /// holds), accounting for whatever it displaced; a NAT flow's reverse entry (its `link` and
    /// `spare` the forward entry) links its forward entry to it. Always inlined into `new_flow`'s
    /// two inserts: as a call, each took its 64-byte entry through the stack and LLVM's prologue
    /// (~23 instructions a new DSR flow, ~35 a new full-NAT one, callgrind).
    #[inline(always)]
    fn insert(
        &mut self,
        entry: Entry,
        hash: u64,
        now: u32,
        spare: u32,
        hint: Option<InsertHint>,
    ) -> Result<u32, DropReason> {
        // A reverse entry (spared its forward entry, `spare`) goes in linked to it (see
        // `ConntrackTable::insert_reverse`).
        let ins = if entry.kind == EntryKind::Reverse {
            debug_assert_eq!(entry.link, spare, "a reverse entry spares its forward entry");
            self.conntrack.insert_reverse(entry, hash, now, hint)
        } else {
            self.conntrack.insert_hinted(entry, hash, now, spare, hint)
        };
        let ins = ins.map_err(|_| DropReason::ConntrackFull)?;
        // (A displaced NAT flow's reverse entry went with it, and the entry comes unlinked: `forget`
        // has only its counts to take back.)
        if let Some(d) = ins.displaced {
            if d.evicted {
                self.stats.conntrack_evictions += 1;
            }
            self.forget(d.index, &d.entry);
        }
        Ok(ins.index)
    }

    /// Turns the forward entry at `index`, whose backend left, into a [`ConnState::BackendGone`]
    /// tombstone: it stops counting as a connection of its backend, its NAT reverse entry goes (the
    /// backend's replies then translate to nothing), and `flags` (the packet that found it) apply
    /// (see `state::entomb`: a flow the client had closed is buried closed).
    fn bury(&mut self, index: u32, flags: TcpFlags, now: u32) {
        let Some(e) = self.conntrack.get(index).copied() else { return };
        self.forget(index, &e);
        let timeouts = &self.timeouts;
        self.conntrack.update(index, |e| {
            e.link = NO_LINK;
            entomb(e, flags, timeouts, now);
        });
    }

    /// Removes the entry at `index` and everything that hangs on it.
    fn remove(&mut self, index: u32) {
        if let Some(e) = self.conntrack.remove(index) {
            self.forget(index, &e);
        }
    }

    /// Removes the flow [`Core::new_flow`] just scheduled to `backend` when its first frame
    /// cannot go (no reverse entry, a failed rewrite): its connection, its new-flow count and its
    /// first packet `p` (counted with it) go, so `new_flows` counts only flows a backend was sent and
    /// `packets` and `bytes` only what it was sent.
    fn unschedule(&mut self, index: u32, backend: &Backend, p: &Parsed) {
        self.remove(index);
        if let Some(c) = self.stats.backend_mut(backend.slot().index()) {
            c.new_flows = c.new_flows.saturating_sub(1);
            c.packets = c.packets.saturating_sub(1);
            c.bytes = c.bytes.saturating_sub(u64::from(p.ip_len));
        }
    }

    /// Accounts for an entry that left the table (already removed): the backend's connection count,
    /// and the paired reverse entry of a NAT flow.
    fn forget(&mut self, index: u32, e: &Entry) {
        // A tombstone was forgotten when it was buried.
        if e.kind != EntryKind::Forward || e.state == ConnState::BackendGone {
            return;
        }
        if let Some(c) = self.stats.backend_of(e.backend) {
            c.active_conns = c.active_conns.saturating_sub(1);
            if e.state == ConnState::Established {
                c.established_conns = c.established_conns.saturating_sub(1);
            }
        }
        if e.link != NO_LINK {
            self.conntrack.remove_reverse(e.link, index);
        }
    }
}

/// For a frame to `dst` that belongs to a NAT flow if to any, the flow (backend -> SNAT address
/// and port) its flow's reverse entry is keyed by: the frame's own for a TCP or UDP reply, the
/// quoted packet's reversed for an ICMP error about one (the quote sent from the address). It
/// belongs to one when its SNAT port, that flow's destination port, is in `snat_ports`. Other ports
/// are the address's other users': a VIP's services (for ports outside the range,
/// [`NodeConfig::vip_conflict`]), or the node's own traffic, which passes to the kernel (the SNAT
/// address is usually the node's, and the XDP program leaves those frames to the kernel too).
///
/// [`NodeConfig::vip_conflict`]: crate::config::NodeConfig::vip_conflict
fn nat_reply_flow(tables: &Tables, p: &Parsed, dst: IpAddr) -> Option<FlowKey> {
    if !tables.is_snat_addr(dst) {
        return None;
    }
    let reply = match p.l4 {
        L4::Tcp | L4::Udp => p.flow,
        // Only TCP and UDP are translated: a quoted ICMP echo's identifier (in its ports) is no
        // SNAT port, even inside the range (an error about the node's own ping). And only a quote
        // the address sent: one from another address is about no flow of this one's (the XDP
        // program leaves it to the kernel too).
        L4::IcmpError(e) if matches!(e.inner.proto(), proto::TCP | proto::UDP) && e.inner.src_ip() == dst => {
            e.inner.reverse()
        }
        _ => return None,
    };
    tables.node().is_snat_port(reply.dst_port()).then_some(reply)
}

/// Whether a TCP or UDP frame's own flow `flow` is a NAT flow's reply flow: to a SNAT address and
/// a port in `snat_ports`. For a frame with ports, [`nat_reply_flow`] is `flow` exactly then.
#[inline]
fn is_nat_reply_flow(tables: &Tables, flow: &FlowKey) -> bool {
    tables.is_snat_addr(flow.dst_ip()) && tables.node().is_snat_port(flow.dst_port())
}

/// Rewrites a full-NAT reply back to its flow's client, `client` the flow's forward key (client ->
/// VIP), with Ethernet source `src_mac` and destination `dst_mac`: [`forward::nat::rewrite`] to
/// (VIP, service port) -> (client, client port), its target built in `target`. `Err` (no flow) for a
/// key of no one family; `Ok` holds the rewrite's result. An IPv4 TCP or UDP reply of an IPv4 flow
/// (most of them) is rewritten from the key's addresses and ports where they are, with no target
/// built, as a packet to a backend is (`Core::rewrite`; building the target and calling the general
/// rewrite cost an established full-NAT reply ~90 instructions more, callgrind).
#[inline(always)]
fn rewrite_reply(
    frame: &mut Frame<'_>,
    p: &Parsed,
    client: &ConnKey,
    (src_mac, dst_mac): (&[u8; 6], &[u8; 6]),
    target: &mut NatTarget,
) -> Result<Result<(), forward::RewriteError>, DropReason> {
    if let Some((c, vip)) = client.v4_addrs()
        && let Some(done) =
            forward::nat::rewrite_v4_ports(frame, p, (vip, client.dport), (c, client.sport), (src_mac, dst_mac))
    {
        return Ok(done);
    }
    let to = flow_key(client).ok_or(DropReason::NoReverseFlow)?.reverse();
    (target.flow, target.macs.src, target.macs.dst) = (to, *src_mac, *dst_mac);
    Ok(forward::nat::rewrite(frame, p, target))
}

/// True for the client's SYN on a half-open, established or closing flow whose backend takes no
/// new flows (draining, weight 0): a connection attempt (a retransmitted SYN, the backend having
/// not answered) or a new connection on the 5-tuple, scheduled afresh rather than kept on or
/// restarted on that backend (see `advance`), as IPVS does with `expire_nodest_conn` (which
/// kube-proxy sets) for a destination of weight 0.
#[inline]
fn restarts_elsewhere(state: ConnState, flags: TcpFlags, backend: &Backend) -> bool {
    matches!(state, ConnState::SynSeen | ConnState::Established | ConnState::Closing)
        && flags.is_syn_only()
        && !backend.takes_new_flows()
}

/// The conntrack key of `client`'s ClientIP affinity record for `service`.
fn affinity_key(service: &Service, client: IpAddr) -> ConnKey {
    ConnKey::affinity(client, service.key.vip, service.key.port, service.key.proto.number())
}

/// Pass or drop for a frame that did not parse.
fn parse_failure(e: &ParseError) -> Outcome {
    match e.disposition() {
        Disposition::Pass => Ok(Verdict::Pass),
        Disposition::Drop => Err(match e {
            ParseError::Truncated { .. } | ParseError::TinyFragment { .. } => DropReason::Truncated,
            _ => DropReason::Malformed,
        }),
    }
}

fn secs(now: Instant) -> u32 {
    u32::try_from(now.as_secs()).unwrap_or(u32::MAX)
}

fn conn_key(p: &Parsed) -> ConnKey {
    ConnKey::from_flow(&p.flow)
}

/// The packet-level flow key of a conntrack key.
fn flow_key(k: &ConnKey) -> Option<FlowKey> {
    FlowKey::from_ips(k.src_ip(), k.dst_ip(), k.proto, k.sport, k.dport)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    extern crate std;

    use super::*;
    use crate::packet::parse;
    use alloc::vec::Vec;
    use core::net::{Ipv4Addr, Ipv6Addr};
    use etherparse::PacketBuilder;

    /// The connection table seed of these tests' tables: not 0, so they hold under a seed.
    const SEED: crate::conntrack::ConntrackSeed = crate::conntrack::ConntrackSeed::new(0x9a5e_ed00_1234_5678);

    /// Addresses whose checksum sums carry and wrap every way.
    const ADDRS: [[u8; 4]; 4] = [[172, 16, 0, 1], [10, 1, 2, 3], [255, 255, 255, 255], [0, 0, 0, 1]];
    const MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);

    /// A backend's reply to the SNAT address with TTL `ttl`: IPv4 TCP, UDP, UDP without a checksum,
    /// ICMP echo, or IPv6 TCP.
    fn reply(kind: u8, backend: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        let b = eth.ipv4(backend, [172, 16, 0, 1], ttl);
        let mut v = Vec::new();
        match kind {
            0 => b.tcp(80, 40000, 1, 1000).ack(7).write(&mut v, payload).unwrap(),
            1 | 2 => b.udp(53, 40001).write(&mut v, payload).unwrap(),
            3 => b.icmpv4_echo_reply(7, 1).write(&mut v, payload).unwrap(),
            _ => PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb])
                .ipv6(Ipv4Addr::from(backend).to_ipv6_mapped().octets(), [0xfd; 16], ttl)
                .tcp(80, 40000, 1, 1000)
                .write(&mut v, payload)
                .unwrap(),
        }
        if kind == 2 {
            // A UDP checksum of 0: none (it stays 0).
            v[40] = 0;
            v[41] = 0;
        }
        v
    }

    /// Forward keys (client -> VIP) of every kind a reply may meet: IPv4, IPv6, IPv6 of mapped
    /// addresses, and keys of no one family (bytes not mapped under the IPv4 flag, one of two).
    fn forward_keys() -> Vec<ConnKey> {
        let mut keys = Vec::new();
        for (c, v) in ADDRS.iter().flat_map(|c| ADDRS.iter().map(move |v| (*c, *v))) {
            for (cport, vport) in [(40000, 80), (65535, 0), (0, 65535)] {
                let (c4, v4) = (IpAddr::V4(c.into()), IpAddr::V4(v.into()));
                keys.push(ConnKey::flow(c4, v4, cport, vport, proto::TCP));
                let (c6, v6) = (Ipv4Addr::from(c).to_ipv6_mapped(), Ipv4Addr::from(v).to_ipv6_mapped());
                keys.push(ConnKey::flow(IpAddr::V6(c6), IpAddr::V6(v6), cport, vport, proto::UDP));
            }
        }
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        keys.push(ConnKey::flow(v6, IpAddr::V6(Ipv6Addr::LOCALHOST), 40000, 80, proto::TCP));
        let mut unmapped = ConnKey::flow(IpAddr::V4([10, 0, 0, 1].into()), IpAddr::V4([10, 0, 0, 2].into()), 1, 2, 6);
        unmapped.src[0] = 0x20;
        keys.push(unmapped);
        unmapped.dst[0] = 0x20;
        keys.push(unmapped);
        keys
    }

    /// `rewrite_reply` gives the general rewrite's frame and result (`nat_reply`'s before its IPv4
    /// form: `forward::nat::rewrite` to the forward key's flow reversed, no flow for a key of no
    /// one family) for IPv4 TCP and UDP replies (with and without a checksum) of any TTL (1 and 0
    /// refused unchanged), addresses and ports whose sums carry, payloads, and for what its IPv4
    /// form is not for (ICMP, IPv6, IPv6 keys, family mismatches).
    #[test]
    fn rewrite_reply_is_general_rewrite() {
        let payloads: [&[u8]; 3] = [b"", b"payload", &[0xff, 0xff, 0xff]];
        let keys = forward_keys();
        let mut translated_v4 = 0;
        for kind in 0..5 {
            for ttl in [0, 1, 2, 64] {
                for backend in ADDRS {
                    for payload in payloads {
                        let original = reply(kind, backend, ttl, payload);
                        let p = parse(&original).unwrap();
                        for key in &keys {
                            let (mut a, mut b) = (original.clone(), original.clone());
                            let len = a.len();
                            let general = flow_key(key).ok_or(DropReason::NoReverseFlow).map(|to| {
                                let t = NatTarget { flow: to.reverse(), macs: Macs { src: MACS.0, dst: MACS.1 } };
                                forward::nat::rewrite(&mut Frame::new(&mut a, 0, len), &p, &t)
                            });
                            let mut target =
                                NatTarget { flow: FlowKey::v4([0; 4], [0; 4], 0, 0, 0), macs: Macs::default() };
                            let fast = rewrite_reply(
                                &mut Frame::new(&mut b, 0, len),
                                &p,
                                key,
                                (&MACS.0, &MACS.1),
                                &mut target,
                            );
                            assert_eq!(fast, general, "kind {kind} ttl {ttl} {key:?}");
                            assert_eq!(a, b, "kind {kind} ttl {ttl} {backend:?} {key:?}");
                            translated_v4 += usize::from(kind < 3 && !key.is_v6() && fast == Ok(Ok(())));
                        }
                    }
                }
            }
        }
        assert!(translated_v4 > 0);
    }

    /// A frame the batch passes did not look up (a likely conntrack hit off the established path)
    /// is taken as a NAT reply, without a service lookup, exactly when `nat_reply_flow` gives its
    /// own flow (`is_nat_reply_flow`, for frames to the SNAT address and a port in the SNAT range),
    /// and the lookup finds no service for it; for any other, `Lookahead::service` gives the
    /// lookup's service: a service on the SNAT address (outside the range) is found. Such a reply's
    /// reverse entry key is then the warm-up's key of its own flow.
    #[test]
    fn service_without_a_lookup_for_a_nat_reply_is_the_lookup() {
        use crate::config::{BackendConfig, BackendState, Config, NodeConfig, Protocol, ServiceConfig, ServiceKey};
        use crate::service::TableBuilder;
        let snat = [10, 0, 0, 100];
        let node = NodeConfig {
            gateway_mac: Some([2, 0, 0, 0, 0, 0x99]),
            snat_v4: Some(snat.into()),
            snat_ports: (40000, 40999),
            ..NodeConfig::default()
        };
        let b = BackendConfig {
            addr: IpAddr::V4([10, 1, 0, 1].into()),
            port: 8080,
            weight: 1,
            mac: Some([2, 0xbb, 0, 0, 0, 1]),
            state: BackendState::Active,
        };
        let mut services = Vec::new();
        for (vip, port) in [(snat, 39999), (snat, 41000), ([192, 0, 2, 1], 40000)] {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                let key = ServiceKey { vip: IpAddr::V4(vip.into()), port, proto };
                services.push(ServiceConfig::new(
                    std::format!("s{port}{proto:?}"),
                    key,
                    ForwardMode::Nat,
                    vec![b.clone()],
                ));
            }
        }
        let tables = TableBuilder::new().with_conntrack_seed(SEED).build(&Config { node, services }).unwrap();
        let (mut found, mut replies) = (0, 0);
        for dst in [snat, [192, 0, 2, 1], [10, 0, 0, 101]] {
            for port in [0, 1, 39999, 40000, 40001, 40500, 40998, 40999, 41000, 65535] {
                for udp in [false, true] {
                    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]).ipv4(
                        [10, 1, 0, 1],
                        dst,
                        64,
                    );
                    let mut v = Vec::new();
                    if udp {
                        b.udp(8080, port).write(&mut v, b"a").unwrap();
                    } else {
                        b.tcp(8080, port, 1, 1000).ack(1).write(&mut v, b"a").unwrap();
                    }
                    let mut ahead = Lookahead::NONE;
                    ahead.fill(&tables, &v, SEED);
                    let p = ahead.parsed.unwrap();
                    assert!(!ahead.needs_service);
                    let looked_up = tables.lookup_flow_ring(&p.flow, tables.lookup_hash(&p.flow));
                    let reply = is_nat_reply_flow(&tables, &p.flow);
                    assert_eq!(reply.then_some(p.flow), nat_reply_flow(&tables, &p, p.flow.dst_ip()));
                    // The key and hash such a reply's reverse entry is found by, as the warm-up made them.
                    assert_eq!(ahead.conn_key, ConnKey::from_flow(&p.flow));
                    assert_eq!(ahead.conn_hash, Some(ahead.conn_key.hash(SEED)));
                    assert!(!(reply && looked_up.is_some()), "{dst:?} {port} {udp}");
                    assert_eq!(ahead.service(&tables, &p), looked_up, "{dst:?} {port} {udp}");
                    found += usize::from(looked_up.is_some());
                    replies += usize::from(reply);
                }
            }
        }
        assert_eq!((found, replies), (6, 10));
    }

    proptest::proptest! {
        /// `Lookahead::fill` keys and hashes a frame's flow in each of the fast parser's paths
        /// (untagged and VLAN-tagged IPv4, IPv6; TCP and UDP), the IPv4 ones with the key's zero
        /// words folded away, and in the general parser's (a first fragment): every time the
        /// parsed flow's `ConnKey` and its hash, which it returns with whether the frame is a lone
        /// SYN. A frame without ports (ICMP) has none. (Fails when any path's key or hash differs
        /// from the flow's, or its SYN from the parsed flags.)
        #[test]
        fn fill_keys_and_hashes_the_parsed_flow_on_every_path(
            (src4, dst4) in (proptest::prelude::any::<[u8; 4]>(), proptest::prelude::any::<[u8; 4]>()),
            (src6, dst6) in (proptest::prelude::any::<[u8; 16]>(), proptest::prelude::any::<[u8; 16]>()),
            (sport, dport) in (proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>()),
            (kind, flags) in (0u8..8, proptest::prelude::any::<u8>()),
        ) {
            use etherparse::VlanId;
            let tables = crate::service::TableBuilder::new()
                .with_conntrack_seed(SEED)
                .build(&crate::config::Config::default())
                .unwrap();
            let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
            let mut v = Vec::new();
            match kind {
                0 => eth.ipv4(src4, dst4, 64).tcp(sport, dport, 1, 1000).write(&mut v, b"a").unwrap(),
                1 => eth.ipv4(src4, dst4, 64).udp(sport, dport).write(&mut v, b"a").unwrap(),
                2 => eth
                    .single_vlan(VlanId::try_new(7).unwrap())
                    .ipv4(src4, dst4, 64)
                    .udp(sport, dport)
                    .write(&mut v, b"a")
                    .unwrap(),
                3 => eth.ipv6(src6, dst6, 64).tcp(sport, dport, 1, 1000).write(&mut v, b"a").unwrap(),
                4 => eth
                    .double_vlan(VlanId::try_new(100).unwrap(), VlanId::try_new(200).unwrap())
                    .ipv6(src6, dst6, 64)
                    .udp(sport, dport)
                    .write(&mut v, b"a")
                    .unwrap(),
                5 | 6 => {
                    // A first fragment (more fragments set): the general parser's, with its ports.
                    let b = eth.ipv4(src4, dst4, 64);
                    if kind == 5 {
                        b.tcp(sport, dport, 1, 1000).write(&mut v, b"a").unwrap();
                    } else {
                        b.udp(sport, dport).write(&mut v, b"a").unwrap();
                    }
                    v[20] |= 0x20;
                }
                _ => eth.ipv4(src4, dst4, 64).icmpv4_echo_request(1, 2).write(&mut v, b"a").unwrap(),
            }
            // Any TCP flags (the parse checks no checksum): `fill` says which frames are lone SYNs.
            match kind {
                0 | 5 => v[14 + 20 + 13] = flags,
                3 => v[14 + 40 + 13] = flags,
                _ => {}
            }
            let mut ahead = Lookahead::NONE;
            let keyed = ahead.fill(&tables, &v, SEED);
            let p = ahead.parsed.unwrap();
            proptest::prop_assert_eq!(keyed, ahead.conn_hash.map(|h| (h, p.tcp_flags.is_syn_only())));
            if kind == 7 {
                proptest::prop_assert!(!p.has_ports());
                proptest::prop_assert_eq!(ahead.conn_hash, None);
            } else {
                proptest::prop_assert!(p.has_ports());
                proptest::prop_assert_eq!(p.fragment != Fragment::None, kind == 5 || kind == 6);
                let key = ConnKey::from_flow(&p.flow);
                proptest::prop_assert_eq!(ahead.conn_key, key);
                proptest::prop_assert_eq!(ahead.conn_hash, Some(key.hash(SEED)));
                proptest::prop_assert_eq!((p.flow.src_port(), p.flow.dst_port()), (sport, dport));
            }
        }
    }

    /// The reply key the warm-up keeps for each new full-NAT flow of a batch (`Core::reply_keys`),
    /// which [`Core::pick_snat_port`] takes for a right guess rather than build it, is the key the
    /// flow's replies arrive under: from its backend and port to the SNAT address and the port the
    /// flow was given, of the flow's protocol, and hashes to the guess's hash. A batch of TCP and
    /// UDP flows, several to each backend (so later guesses count the earlier flows); every guess
    /// is right in an empty table.
    #[test]
    fn warm_nat_keeps_each_guess_reply_key() {
        use crate::config::{BackendConfig, BackendState, Config, NodeConfig, Protocol, ServiceConfig, ServiceKey};
        use crate::service::TableBuilder;
        let node = NodeConfig {
            gateway_mac: Some([2, 0, 0, 0, 0, 0x99]),
            snat_v4: Some([10, 0, 0, 100].into()),
            snat_ports: (40000, 40999),
            ..NodeConfig::default()
        };
        let backend = |i: u8| BackendConfig {
            addr: IpAddr::V4([10, 1, 0, i].into()),
            port: 8080 + u16::from(i),
            weight: 1,
            mac: Some([2, 0xbb, 0, 0, 0, i]),
            state: BackendState::Active,
        };
        let services = [Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .map(|proto| {
                let key = ServiceKey { vip: IpAddr::V4([192, 0, 2, 1].into()), port: 80, proto };
                ServiceConfig::new(std::format!("s{proto:?}"), key, ForwardMode::Nat, vec![backend(1), backend(2)])
            })
            .collect();
        let tables = TableBuilder::new().with_conntrack_seed(SEED).build(&Config { node, services }).unwrap();
        let mut w = Worker::new(tables, WorkerConfig::single_core(4096));
        let frames: Vec<Vec<u8>> = (0..BATCH as u16)
            .map(|i| {
                let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]).ipv4(
                    [198, 51, 100, 1 + i as u8],
                    [192, 0, 2, 1],
                    64,
                );
                let mut v = Vec::new();
                if i % 3 == 2 {
                    b.udp(1000 + i, 80).write(&mut v, b"a").unwrap();
                } else {
                    b.tcp(1000 + i, 80, 1, 1000).syn().write(&mut v, b"").unwrap();
                }
                v
            })
            .collect();
        let head = Frame::HEADROOM_NEEDED;
        let mut bufs: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let mut buf = vec![0u8; head + f.len() + 64];
                buf[head..head + f.len()].copy_from_slice(f);
                buf
            })
            .collect();
        let mut burst: Vec<Frame<'_>> =
            bufs.iter_mut().zip(&frames).map(|(buf, f)| Frame::new(buf, head, f.len())).collect();
        let mut verdicts = vec![Verdict::Pass; BATCH];
        w.process_burst(&mut burst, Instant::from_secs(1), &mut verdicts);
        let core = &w.core;
        assert!(core.reply_hints_live);
        let mut backends = Vec::new();
        for (i, f) in burst.iter().enumerate() {
            assert_eq!(verdicts[i], Verdict::Tx, "frame {i}");
            // The flow as it left, from the SNAT address and port to the backend: reversed, its
            // replies' key.
            let out = parse(f.data()).unwrap().flow;
            let (hash, _) = core.reply_hints[i].unwrap();
            let (slot, port) = core.reply_guesses[i];
            assert_eq!(port, out.src_port(), "frame {i}: the guess was right");
            assert_eq!(core.reply_keys[i], ConnKey::from_flow(&out.reverse()), "frame {i}");
            assert_eq!(hash, core.conntrack.hash(&core.reply_keys[i]), "frame {i}");
            backends.push(slot);
        }
        backends.sort_unstable();
        let flows = backends.len();
        backends.dedup();
        assert!(backends.len() > 1 && flows > 2 * backends.len(), "several flows to each of {backends:?}");
    }
}
