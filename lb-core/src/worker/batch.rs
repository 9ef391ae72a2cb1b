//! The first passes over a batch of frames: parse and hash each, then warm the cache for what
//! deciding them will read, in rounds of independent prefetch hints so the batch's misses overlap (see the
//! module docs of [`crate::worker`]). Nothing here changes state; [`Core::process_frame`] then
//! decides each frame exactly as if alone.

use super::{Core, ReplyHint, snat};
use crate::config::ForwardMode;
use crate::conntrack::{ConnKey, ConntrackSeed, ConntrackTable, Entry, EntryKind, InsertHint, Likely};
use crate::packet::{self, L4, ParseError, Parsed, TcpFlags};
use crate::service::{Backend, BackendRef, BackendSlot, RingRef, ServiceSummary, Tables};

/// Frames decided together: the first passes over a batch (parse, hash, service lookup, cache warm-up)
/// let the memory accesses of different frames overlap.
pub(super) const BATCH: usize = 16;

/// Where [`Core::warm_nat`] writes its guesses: the core's `reply_hints`, `reply_guesses` and
/// `reply_keys`.
pub(super) type GuessesOut<'a> =
    (&'a mut [Option<ReplyHint>; BATCH], &'a mut [(u32, u16); BATCH], &'a mut [ConnKey; BATCH]);

/// Cells of [`Core::warm_nat`]'s count of flows per backend: four times the batch, so a probe
/// mostly ends at its first cell.
const SEEN: usize = 4 * BATCH;

/// What the first passes over a batch learned about one frame, before any state changes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lookahead {
    pub(super) parsed: Result<Parsed, ParseError>,
    /// Conntrack hash of the frame's own 5-tuple; `None` when it has no ports.
    pub(super) conn_hash: Option<u64>,
    /// The conntrack key that hash is of (valid with `conn_hash`), built once per frame.
    pub(super) conn_key: ConnKey,
    /// [`Tables::lookup_hash`] of the frame's flow, once `needs_service` is set.
    pub(super) lookup_hash: u64,
    /// True for a frame whose service the batch passes look up: every parsed frame but those with a
    /// likely conntrack hit, which take their service from their backend's location instead.
    pub(super) needs_service: bool,
    /// The service at the frame's (destination, port, protocol), if `needs_service` and any, with
    /// where its ring is (a Maglev service's new flows pick from it). Written for every frame of a
    /// batch that looks services up ([`Lookahead::find_service`]), and read only in such a batch.
    pub(super) service: Option<(ServiceSummary, RingRef)>,
    /// The backend of the conntrack entry a likely new flow's insert will displace, kept so the
    /// later warm-up rounds do not search the bucket again. Written for every frame of a batch that
    /// looks services up ([`Core::warm_second`]), and read only in such a batch.
    pub(super) displaced_backend: Option<BackendRef>,
    /// True when the warm-up found an entry with the frame's tag, i.e. most likely its own flow
    /// (written by [`Core::warm_second`] for a frame with ports, by `fill` for one without).
    pub(super) likely_hit: bool,
    /// The lb-hash 5-tuple hash of a likely new flow of a service (its scheduler's input), computed
    /// in the warm-up to read ahead what the scheduler will read; `None` for any other frame.
    /// Written for every frame of a batch that looks services up, and for a likely hit (which may
    /// reach a service's path if the established path declines it) in every batch.
    pub(super) flow_hash: Option<u64>,
    /// For a likely new flow of a service with a ring, the backend slot its ring entry names, read
    /// in the warm-up (from `flow_hash`) and kept for its pick: the ring entry's remainder and
    /// lookups are then done once rather than three times. Written for every frame with a service
    /// ([`Core::warm`]), and read only with its `flow_hash`.
    pub(super) ring_slot: Option<u32>,
    /// For a likely new flow, the way its insert will take, as the warm-up chose it (to read its
    /// line ahead): the insert takes it rather than choosing again if the bucket is unchanged.
    pub(super) insert_hint: Option<InsertHint>,
}

/// The conntrack key of a parsed flow, and its hash under the connection table's seed
/// (`Lookahead::conn_key`, `conn_hash`).
#[inline(always)]
fn keyed(seed: ConntrackSeed, flow: &packet::FlowKey, flags: TcpFlags) -> (ConnKey, u64, bool) {
    let key = ConnKey::from_flow(flow);
    (key, key.hash(seed), flags.is_syn_only())
}

impl Lookahead {
    pub(super) const NONE: Lookahead = Lookahead {
        parsed: Err(ParseError::Arp),
        conn_hash: None,
        conn_key: ConnKey { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0, flags: 0 },
        lookup_hash: 0,
        needs_service: false,
        service: None,
        displaced_backend: None,
        likely_hit: false,
        flow_hash: None,
        ring_slot: None,
        insert_hint: None,
    };

    /// Parses `frame` into this slot and hashes its flow under `seed` (the worker's connection
    /// table's: [`ConntrackTable::hash`]). Returns the conntrack hash, if any, and whether the
    /// frame is a lone SYN (for [`Core::warm_first`], from registers rather than read back from
    /// this slot).
    #[inline]
    pub(super) fn fill(&mut self, tables: &Tables, frame: &[u8], seed: ConntrackSeed) -> Option<(u64, bool)> {
        // `packet::parse` spelled out, so the result is written straight into this slot: through
        // `parse`'s Option-to-Result step the 116-byte `Parsed` was built, then copied (~29
        // instructions per packet, callgrind), and through `parse_common`'s `Option` once more (14).
        // A frame with ports learns in the second warm-up round whether it needs its service
        // looked up; any other parsed frame does. The fast parser's frames all have ports, and it
        // makes their key and its hash (`keyed`) from registers, in each of its paths. Reading the slot back
        // loaded each address as one 16-byte vector from the two 8-byte stores the parser had just
        // made, and a load spanning two stores cannot be forwarded from them: it waited for both to
        // reach the cache, twice a packet, ahead of the conntrack hash (25-35 % of an established
        // packet's time; BENCHMARKS.md, lb-core, session 16).
        // (`service`, `displaced_backend`, `likely_hit`, `flow_hash` and `ring_slot` are written by
        // the later passes, for every frame of a batch that reads them: here they were five stores
        // an established packet, callgrind.)
        self.insert_hint = None;
        let (key, hash, syn) =
            match packet::parse_common_into(frame, &mut self.parsed, move |f, flags| keyed(seed, f, flags)) {
                Some((_, keyed)) => keyed,
                None => {
                    self.parsed = packet::parse_general(frame);
                    match &self.parsed {
                        Ok(p) if p.has_ports() => keyed(seed, &p.flow, p.tcp_flags),
                        parsed => {
                            self.likely_hit = false;
                            (self.conn_hash, self.needs_service, self.lookup_hash) = match parsed {
                                Ok(p) => (None, true, tables.lookup_hash(&p.flow)),
                                Err(_) => (None, false, 0),
                            };
                            return None;
                        }
                    }
                }
            };
        self.conn_key = key;
        // (`lookup_hash` is left: it is read only once `needs_service` is set, with it.)
        (self.conn_hash, self.needs_service) = (Some(hash), false);
        Some((hash, syn))
    }

    /// Service lookup: O(1) in the number of services.
    /// Writes `service` for every frame (`fill` leaves it), found or not.
    pub(super) fn find_service(&mut self, tables: &Tables) {
        // A found service and `None` are written apart: assigning the lookup's `Option` joined its
        // two paths through a stack copy whose loads spanned two of its stores, which the core
        // cannot forward from (a store-forwarding stall a new flow).
        if let Ok(p) = &self.parsed
            && self.needs_service
            && matches!(p.l4, L4::Tcp | L4::Udp)
            && let Some(found) = tables.lookup_flow_ring(&p.flow, self.lookup_hash)
        {
            self.service = Some(found);
        } else {
            self.service = None;
        }
    }

    /// The frame's service: the batch passes' answer, or (for a frame they did not look up, whose
    /// likely conntrack hit did not take the established path, and which is no NAT reply: see
    /// `Core::process_frame`) a lookup now.
    #[inline]
    pub(super) fn service(&self, tables: &Tables, p: &Parsed) -> Option<(ServiceSummary, RingRef)> {
        if self.needs_service {
            self.service
        } else if matches!(p.l4, L4::Tcp | L4::Udp) {
            tables.lookup_flow_ring(&p.flow, tables.lookup_hash(&p.flow))
        } else {
            None
        }
    }
}

impl Core {
    /// Reads what depends only on a frame's hash, as soon as [`Lookahead::fill`] has it: its
    /// conntrack bucket's head and, for a frame other than a lone SYN, the entry at its key's home
    /// way (its own entry, mostly; see [`crate::conntrack`]), and for a frame without ports the
    /// service index slot where its lookup starts. Prefetch hints ([`lb_prefetch`]), which wait
    /// for nothing, so the batch's cache misses overlap. `keyed` is what `fill` returned (the
    /// lone SYN test read back from the slot was ~5 instructions a packet, callgrind).
    #[inline(always)]
    pub(super) fn warm_first(&self, tables: &Tables, a: &Lookahead, keyed: Option<(u64, bool)>) {
        if let Some((h, syn)) = keyed {
            // A lone SYN most likely starts a flow: its home entry would be a wasted read.
            if syn {
                self.conntrack.touch_bucket(h);
            } else {
                self.conntrack.touch_bucket_and_home(h);
            }
        } else if a.needs_service {
            tables.touch_lookup(a.lookup_hash);
        }
    }

    /// The second round, once the bucket heads are in: the likely conntrack entry of each frame
    /// (its own flow's, or for a new flow the way its insert will take: the entry it displaces, or
    /// the free way's line, which the insert writes). A frame without a likely hit will need its
    /// service: hash its key and read the index slot its lookup starts at. A likely hit needs no
    /// lookup: its backend's location holds its service's summary.
    ///
    /// A likely hit's entry line mostly came with its head (its home way), so it is read at once,
    /// and its backend's location and counters are read from it in the same loop. A
    /// likely new flow's two reads (the insert's way, the index slot) wait for a second loop that
    /// only prefetches, so the way choice and the lookup hash do not stand between them. (A plain
    /// load that misses cannot retire until its line arrives, and the core runs ahead only as far
    /// as its reorder window, a few hundred instructions; a prefetch retires at once. That is the
    /// likely reason prefetches measured 3-17 % faster here than plain loads with 100 000
    /// services: BENCHMARKS.md, lb-core, session 18.)
    /// Sets, per frame, the entry at the way its insert will take and whether it displaces it in
    /// `insert_ways` (all `None` on entry; for [`Core::warm_nat`]), from `conntrack` (the core's, so
    /// borrowed apart: `warm_nat` then writes other fields of the core). Returns whether any frame of
    /// the batch needs its service looked up.
    pub(super) fn warm_second<'c>(
        &self,
        conntrack: &'c ConntrackTable,
        tables: &Tables,
        ahead: &mut [Lookahead],
        insert_ways: &mut [Option<(&'c Entry, bool)>; BATCH],
        now: u32,
    ) -> bool {
        let mut new_flows = false;
        let mut lookups = false;
        for (a, way) in ahead.iter_mut().zip(insert_ways.iter_mut()) {
            let Some(h) = a.conn_hash else {
                // (A parsed frame without ports needs its service, as `fill` set.)
                lookups |= a.needs_service;
                continue;
            };
            match conntrack.likely(h, now) {
                Likely::Hit(e) => {
                    // (A likely hit the established path declines takes a service's path with its
                    // `flow_hash`: in a batch without lookups, only this writes it.)
                    (a.likely_hit, a.flow_hash) = (true, None);
                    // Its backend's location (which holds its service's summary) and counters
                    // (which the packet adds to), read at once: the entry is read already, and
                    // a round of their own cost a loop, ~10 instructions an established packet
                    // (callgrind).
                    tables.touch_location(e.backend.slot);
                    self.stats.touch_backend(BackendSlot(e.backend.slot));
                    continue;
                }
                Likely::Insert { entry, displaces, hint } => {
                    *way = Some((entry, displaces));
                    a.insert_hint = Some(hint);
                }
                Likely::Unknown => {}
            }
            a.likely_hit = false;
            if let Ok(p) = &a.parsed {
                a.needs_service = true;
                a.lookup_hash = tables.lookup_hash(&p.flow);
            }
            new_flows = true;
        }
        if !new_flows {
            // (No frame has its insert's way; `warm` reads `displaced_backend` past a lookup.)
            if lookups {
                for a in ahead.iter_mut() {
                    a.displaced_backend = None;
                }
            }
            return lookups;
        }
        for (a, way) in ahead.iter_mut().zip(insert_ways.iter()) {
            // (Every frame's `displaced_backend` is written here, `fill` leaves it.)
            match way {
                Some((e, true)) => a.displaced_backend = Some(e.backend),
                Some((e, false)) => {
                    a.displaced_backend = None;
                    lb_prefetch::line(*e);
                }
                None => a.displaced_backend = None,
            }
            // (A frame without ports had its index slot read in the first round.)
            if a.needs_service && a.conn_hash.is_some() {
                tables.touch_lookup(a.lookup_hash);
            }
        }
        true
    }

    /// For the likely new full-NAT flows of the batch, reads ahead the lines their second half will
    /// touch, each a miss in another bucket that would otherwise come one after another per flow:
    /// first the reverse entry of the NAT flow the forward insert will displace (unlinked with it)
    /// and the bucket head and home line of the reply key the SNAT port search tries first; then the
    /// line the reverse entry's insert will take in that bucket; then the reverse entry of the NAT
    /// flow that insert will displace. Only Maglev services with a ring (the backend known from its
    /// ring entry without a scheduler). `forward_ways` are [`Core::warm_second`]'s insert ways (the
    /// forward inserts'; their lines are in the cache). Each round's reads are prefetches issued as
    /// soon as their address is known, so the batch's misses are in flight together: the first
    /// round's in the loop that makes the guesses, the next ones' in the loop that chooses the
    /// reverse inserts' ways (whose one plain read, the displaced way's entry, was never read ahead).
    ///
    /// Writes, per frame, its first SNAT probe's reply hash with the conntrack's insert hint for
    /// it, when no entry holds that key's tag (the port is then most likely free), to `hints`, the
    /// backend slot and SNAT port that key was made of to `guesses` (for every probe; read only with
    /// its hint: see [`Core::reply_guesses`]),
    /// and the key itself to `keys` (for a frame without a guess, whatever it was: unread), which
    /// [`Core::pick_snat_port`] then takes rather than build it again. Those are the core's own
    /// (`Core::reply_hints`, `reply_guesses`, `reply_keys`), written in place: returned, the arrays
    /// were copied there (384 bytes without the keys, a `memcpy` call, ~10 instructions a new
    /// full-NAT flow, callgrind). So the core comes in parts: its `conntrack`, and its `snat_ports`
    /// and `snat_next` ([`snat::snat_probe`]).
    #[inline(never)]
    pub(super) fn warm_nat(
        conntrack: &ConntrackTable,
        snat: (Option<(u16, u16)>, &[u16]),
        tables: &Tables,
        ahead: &[Lookahead],
        forward_ways: &[Option<(&Entry, bool)>; BATCH],
        now: u32,
        (hints, guesses, keys): GuessesOut<'_>,
    ) {
        // Per frame: the first SNAT probe's reply hash (valid where `guesses` holds a backend slot:
        // the probe's slot and port, written here at once; a guess without a hint is never read,
        // see `Core::pick_snat_port`). Kept apart as (hash, slot, port) triples, they were written
        // here, read back and copied to `guesses` (~8 instructions a new full-NAT flow, callgrind).
        let mut reply_hashes = [0u64; BATCH];
        *hints = [None; BATCH];
        *guesses = [(u32::MAX, 0); BATCH];
        // How many of the batch's NAT flows so far go to each backend slot: each earlier flow to the
        // same backend moves that backend's first SNAT probe on by one. An open-addressed table of
        // (slot, count), a count of 0 an empty cell, with room for four times the batch: counting
        // the earlier slots in a list for each flow was ~85 instructions a new full-NAT flow.
        let mut seen_slots = [0u32; SEEN];
        let mut seen_counts = [0u8; SEEN];
        let mut nat = 0;
        let frames = ahead.iter().zip(forward_ways).zip(reply_hashes.iter_mut());
        for ((((a, forward_way), reply), key), guess) in frames.zip(keys.iter_mut()).zip(guesses.iter_mut()) {
            // (Only a likely new flow of a ring service has its ring slot.)
            let (Some(ring_slot), Some((s, _)), Ok(p)) = (a.ring_slot, a.service, &a.parsed) else { continue };
            if s.mode != ForwardMode::Nat {
                continue;
            }
            if let Some((e, true)) = forward_way
                && e.kind == EntryKind::Forward
            {
                // (Read ahead here, as the reply key's bucket below: from values in registers, where
                // a loop of their own over the batch kept them in arrays and read them back, ~12
                // instructions a new full-NAT flow, callgrind. A prefetch waits for nothing.)
                conntrack.touch_index(e.link);
            }
            // (The backend in a ring slot is the one whose slot that is: its reply keys are found
            // from the slot alone, its location not read.)
            let slot = ring_slot;
            let Some(keys) = tables.nat_reply_keys(slot) else { continue };
            let mut cell = slot as usize % SEEN;
            while seen_counts[cell] != 0 && seen_slots[cell] != slot {
                cell = (cell + 1) % SEEN;
            }
            let earlier = u32::from(seen_counts[cell]);
            let Some(hash) = snat::snat_probe(snat, (slot as usize, keys), p.flow.proto(), earlier, key) else {
                continue;
            };
            *reply = hash;
            conntrack.touch_bucket_and_home(hash);
            *guess = (slot, key.dport);
            (seen_slots[cell], seen_counts[cell]) = (slot, seen_counts[cell] + 1);
            nat += 1;
        }
        if nat == 0 {
            return;
        }
        for ((&rh, hint), guess) in reply_hashes.iter().zip(hints.iter_mut()).zip(guesses.iter()) {
            if guess.0 != u32::MAX
                && let Likely::Insert { entry, displaces, hint: h } = conntrack.likely_new(rh, now)
            {
                *hint = Some((rh, h));
                // The line the reverse insert will take, or the reverse entry of the NAT flow it
                // displaces, read ahead in the same loop: the way's entry, read for its kind and
                // link, was a plain load in a loop of its own as well (not read ahead before), and
                // two more loops over the batch, with their arrays of ways and links, cost ~15
                // instructions a new full-NAT flow (callgrind).
                if displaces && entry.kind == EntryKind::Forward {
                    conntrack.touch_index(entry.link);
                } else {
                    lb_prefetch::line(entry);
                }
            }
        }
    }

    /// Reads, in up to three more tight loops over the batch, what deciding its frames will read once the
    /// services are known (a likely hit's backend lines were read by [`Core::warm_second`]): the
    /// backend counters of the entry a likely new flow's insert will displace, and for a likely new
    /// flow its ring entry (from the flow's
    /// scheduler hash, computed with its service lookup and kept for the decision) or, for a service
    /// without a ring, its service line, then that service's scheduler line, backends and (Maglev) the
    /// table entry its pick will read; last the picked backend's location and counters.
    /// (Service counters are their backends' sums: a packet adds to its backend's only.) `services`
    /// says whether any frame of the batch has its service: with none, there is nothing to read.
    /// Returns whether the batch holds a likely new flow of a full-NAT service (see
    /// [`Core::warm_nat`]).
    pub(super) fn warm(&self, tables: &Tables, ahead: &mut [Lookahead], services: bool) -> bool {
        if !services {
            // A batch without a service (likely hits, established flows, only): the loops below
            // would test each frame three times for nothing.
            return false;
        }
        let mut fold = 0u64;
        let mut nat = false;
        // Whether a frame's service has no ring: only such frames read their service's scheduler
        // and backends (the second loop), which a batch of ring services' new flows then skips
        // (testing each frame there for nothing was ~7 instructions a new flow, callgrind).
        let mut without_ring = false;
        for a in ahead.iter_mut() {
            if let Some((s, ring)) = a.service {
                nat |= s.mode == ForwardMode::Nat;
                if ring.is_none() {
                    without_ring = true;
                    a.ring_slot = None;
                    fold ^= tables.service(s.index as usize).map_or(0, |s| u64::from(s.slot.0));
                } else {
                    a.ring_slot = a.flow_hash.and_then(|h| tables.ring_slot(ring, h));
                }
            }
            // The displaced entry's backend loses a connection: its counters (with their
            // generation), not its location.
            if let Some(b) = a.displaced_backend {
                self.stats.touch_backend(BackendSlot(b.slot));
            }
        }
        if without_ring {
            for a in ahead.iter_mut() {
                let Some((s, ring)) = a.service else { continue };
                if ring.is_some() {
                    continue;
                }
                if let Some(s) = tables.service(s.index as usize) {
                    fold ^= s.backends.first().map_or(0, |b| u64::from(b.port));
                    // A likely new flow: (Maglev) the table entry and index map the pick will read.
                    if let Some(h) = a.flow_hash {
                        fold ^= u64::from(s.scheduler.touch(h));
                    }
                }
            }
        }
        // Then the location and counters of the backend a likely new flow's pick will give. A ring
        // entry is the backend's slot: its location and counters are read side by side from it, not
        // the counters through the location (one miss after another).
        for a in ahead.iter() {
            let (Some(h), Some((s, ring))) = (a.flow_hash, a.service) else { continue };
            let picked = if ring.is_some() {
                a.ring_slot.map(|slot| {
                    tables.touch_location(slot);
                    BackendSlot(slot)
                })
            } else {
                tables
                    .service(s.index as usize)
                    .and_then(|s| s.scheduler.likely_pick(h).and_then(|i| s.backends.get(i)))
                    .map(Backend::slot)
            };
            if let Some(slot) = picked {
                self.stats.touch_backend(slot);
            }
        }
        core::hint::black_box(fold);
        nat
    }

    /// The lb-hash 5-tuple hash of a frame the warm-up judges a likely new flow (no likely conntrack
    /// hit, ports), its scheduler's input; `None` for any other frame.
    #[inline]
    pub(super) fn likely_new_flow_hash(&self, a: &Lookahead) -> Option<u64> {
        match &a.parsed {
            Ok(p) if !a.likely_hit && p.has_ports() => Some(self.flow_hash(&p.flow)),
            _ => None,
        }
    }
}
