//! Full NAT's source ports: each core's share of the node's range, and the search for a free port
//! for a new flow to a backend (with the batch warm-up's guess at its first probe).

use super::{BATCH, Core};
use crate::conntrack::{ConnKey, ConntrackTable, EntryKind, InsertHint, PortKeys};
use crate::packet::FlowKey;
use crate::service::{Backend, Tables};

/// Candidate SNAT ports tried for a new NAT flow before giving up with
/// [`DropReason::NoSnatPort`](crate::stats::DropReason::NoSnatPort).
const SNAT_PORT_TRIES: u32 = 32;

/// The SNAT ports (inclusive) that worker `core_index` of `core_count` allocates from: the node's range
/// cut into equal, disjoint slices (the last takes the remainder). `None` when the slice is empty.
pub fn snat_port_share(ports: (u16, u16), core_index: u16, core_count: u16) -> Option<(u16, u16)> {
    let (first, last) = ports;
    if first == 0 || first > last || core_count == 0 || core_index >= core_count {
        return None;
    }
    let total = u32::from(last) - u32::from(first) + 1;
    let per = total / u32::from(core_count);
    if per == 0 {
        return None;
    }
    let lo = u32::from(first) + per * u32::from(core_index);
    let hi = if core_index + 1 == core_count { u32::from(last) } else { lo + per - 1 };
    Some((u16::try_from(lo).ok()?, u16::try_from(hi).ok()?))
}

/// The worker that owns SNAT port `port` (whose [`snat_port_share`] holds it), for steering NAT
/// replies to the right core; `None` for a port outside `ports` or with no share. O(1): a worker
/// hands every reply it does not own to the owner (see [`crate::Verdict::Handoff`]).
pub fn snat_port_owner(ports: (u16, u16), core_count: u16, port: u16) -> Option<u16> {
    let (first, last) = ports;
    if first == 0 || first > last || core_count == 0 || !(first..=last).contains(&port) {
        return None;
    }
    let per = (u32::from(last) - u32::from(first) + 1) / u32::from(core_count);
    if per == 0 {
        return None;
    }
    // The last share takes the remainder.
    let owner = ((u32::from(port) - u32::from(first)) / per).min(u32::from(core_count) - 1);
    u16::try_from(owner).ok()
}

/// A full-NAT flow's first SNAT probe as the warm-up guessed it: the reply key's hash, and the
/// conntrack's [`InsertHint`] for it (the key absent, and the way its insert takes).
pub(super) type ReplyHint = (u64, InsertHint);

/// The insert hint of a reply hint, if the guess was the key of `hash` (the port search may have
/// moved on to another port).
#[inline]
pub(super) fn hint_for(reply_hint: Option<ReplyHint>, hash: u64) -> Option<InsertHint> {
    reply_hint.filter(|(h, _)| *h == hash).map(|(_, hint)| hint)
}

/// `x % span` (`span` not 0), dividing only when `x` is not below `span`: a port search's offsets
/// pass `span` only where they go round the share (a start plus a few ports), once in `span`
/// flows to a backend. A new full-NAT flow took three 32-bit divisions (20-40 cycles each) for
/// what a compare decides.
#[inline(always)]
pub(super) fn wrap(x: u32, span: u32) -> u32 {
    if x < span { x } else { x % span }
}

/// Where a SNAT port search in the share `(lo, hi)` (`lo <= hi`, as [`snat_port_share`] makes
/// it) starts from offset `next` (the core's `snat_next` for the backend, plus the flows ahead for
/// the warm-up's guess): the share's span, the start's offset into it and the first port tried.
/// Both [`Core::pick_snat_port`] and the warm-up's guess ([`snat_probe`]) start here, so a guess
/// names the port the search tries first.
#[inline(always)]
fn search_start((lo, hi): (u16, u16), next: u32) -> (u32, u32, u16) {
    debug_assert!(lo <= hi, "a share's ports are in order");
    let span = u32::from(hi) - u32::from(lo) + 1;
    let start = wrap(next, span);
    // (`lo + start` is at most `hi`: the cast keeps it whole. Checked, it was a compare and a
    // branch a new full-NAT flow, twice.)
    (span, start, (u32::from(lo) + start) as u16)
}

/// `x % span` as a search start's offset into a share of `span` ports (`Core::snat_next`): below
/// `span`, at most 2^16, so it is a `u16` whole (the cast truncates nothing; checked, it was ~3
/// instructions a new full-NAT flow).
#[inline(always)]
fn offset_in(x: u32, span: u32) -> u16 {
    wrap(x, span) as u16
}

/// A full-NAT flow's SNAT port with the hash of the conntrack key its replies arrive under (the key
/// itself is left in `Core::reply_keys`: see [`Core::pick_snat_port`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplyPort {
    pub(super) port: u16,
    pub(super) hash: u64,
}

/// The flow a NAT flow's client-to-backend frames leave with: the SNAT address and the flow's SNAT
/// port (from its conntrack entry) to the backend.
pub(super) fn nat_target_of(tables: &Tables, proto: u8, snat_port: u16, backend: &Backend) -> Option<FlowKey> {
    let snat = tables.node().snat_addr_for(backend.addr)?;
    FlowKey::from_ips(snat, backend.addr, proto, snat_port, backend.port)
}

/// For the live reverse entry at `r` whose port a new flow's search found taken: the eviction rank
/// and index of its forward entry if that flow may give its port up, which [`Core::evict_for_port`]
/// may then do: a half-open flow (`SynSeen`, `UdpNew`) before a closing one (`Closing`,
/// `TimeWait`), the sooner to expire first within each, as conntrack evicts for room (see
/// [`ConnState`](crate::conntrack::ConnState)); an established flow never. Out of line: only a
/// taken port (most new flows' first probe is free) reads the forward entry.
#[cold]
#[inline(never)]
fn yielding_holder(conntrack: &ConntrackTable, r: u32) -> Option<(u64, u32)> {
    let reverse = conntrack.get(r).filter(|e| e.kind == EntryKind::Reverse)?;
    let forward = conntrack.get(reverse.link)?;
    let class = forward.state.eviction_class();
    let rank = (u64::from(class) << 32) | u64::from(forward.expires);
    (forward.kind == EntryKind::Forward && forward.link == r && class < 2).then_some((rank, reverse.link))
}

impl Core {
    /// A free SNAT port from this core's share for a flow to `backend`: free means no live reply key
    /// (backend, SNAT address, backend port, port) is tracked; the reverse entry of a flow that has
    /// expired (which the sweep may not reach for many bursts) is removed to free its port. Probes from the port after the last
    /// one this core gave a flow to this backend, as RFC 6056's per-destination counter does (its
    /// algorithm 4, the backend being the destination): a port comes back to a backend only after
    /// every other port of the share has gone to it, so the first probe is free while the backend
    /// holds fewer of this core's flows than the share has ports, and a backend's old connection on
    /// a port (its TIME-WAIT) is as long gone as it can be. (A start from the flow hash met one of a
    /// busy backend's flows as often as the share was in use, ~40 % of new flows in the NAT flood
    /// benchmark, each collision a cache miss in another bucket, and reused a port at random.)
    ///
    /// The port's reply key is left at `slot` of `Core::reply_keys` (a right guess's is there
    /// already), where the flow's reverse entry takes it: returned, the 38-byte key was copied out
    /// and again into the entry (~20 instructions a new full-NAT flow, callgrind).
    pub(super) fn pick_snat_port(
        &mut self,
        tables: &Tables,
        proto: u8,
        backend: &Backend,
        (hint, slot): (Option<ReplyHint>, usize),
        now: u32,
    ) -> Option<ReplyPort> {
        let (lo, hi) = self.snat_ports?;
        // The backend's search start, looked up once for its read and its write (looked up for
        // each, its bounds were checked twice).
        let mut next_start = self.snat_next.get_mut(backend.slot().index());
        let next = next_start.as_deref().copied().unwrap_or(0);
        let (span, start, first) = search_start((lo, hi), u32::from(next));
        // The warm-up's guess (the frame at `slot` of the batch), when it is of this very key
        // (this backend's first probe: the batch's earlier flows to the backend took the ports it
        // counted them to take), gives the key (the warm-up built it from this frame's backend and
        // protocol and these tables: [`snat_probe`]) and its hash and, while the bucket is
        // unchanged, says the port is free, with no key built, hashed or looked up. The search
        // below finds the same (it builds the key, hashes it to the guess's hash and takes the
        // same hint); it runs for any other outcome.
        if let Some((hash, insert)) = hint
            && self.reply_guesses.get(slot) == Some(&(backend.slot().index() as u32, first))
            && let Some(key) = self.reply_keys.get(slot)
            && self.conntrack.find_hinted(key, hash, Some(insert)).is_none()
        {
            if let Some(n) = next_start {
                *n = offset_in(start + 1, span);
            }
            return Some(ReplyPort { port: first, hash });
        }
        // The flow's reply keys ([`Backend::reply_keys`]): the key is made once and only its port
        // changes between probes, its addresses hashed once.
        let keys = backend.reply_keys(self.conntrack.seed(), tables.node().snat_addr_for(backend.addr)?);
        let mut key = keys.to(first, proto);
        let tries = SNAT_PORT_TRIES.min(span);
        let conntrack = &self.conntrack;
        // The flow holding a port tried that gives its port up first: (rank, port, hash, forward
        // entry), see `yielding_holder`.
        let mut oldest: Option<(u64, u16, u64, u32)> = None;
        let found = (0..tries).find_map(|i| {
            let port = u16::try_from(u32::from(lo) + wrap(start + i, span)).ok()?;
            key.dport = port;
            let hash = keys.hash(port, proto);
            // The warm-up's guess, if this is the key it guessed, may spare the lookup.
            match conntrack.find_hinted(&key, hash, hint_for(hint, hash)) {
                None => Some((i, port, hash, None)),
                // An expired flow's reverse entry: the port is free once it goes.
                Some(r)
                    if !conntrack.is_live(r, now) && conntrack.get(r).is_some_and(|e| e.kind == EntryKind::Reverse) =>
                {
                    Some((i, port, hash, Some(r)))
                }
                Some(r) => {
                    if let Some((rank, forward)) = yielding_holder(conntrack, r)
                        && oldest.is_none_or(|(x, ..)| rank < x)
                    {
                        oldest = Some((rank, port, hash, forward));
                    }
                    None
                }
            }
        });
        // (A reverse entry needs no accounting; its expired forward entry, which goes in its turn,
        // no longer finds it.)
        if let Some((.., Some(stale))) = found {
            self.conntrack.remove(stale);
        }
        // Past the port given out, or past every port tried.
        let next = start + found.map_or(tries, |(i, ..)| i + 1);
        if let Some(n) = next_start.take() {
            *n = offset_in(next, span);
        }
        let (port, hash) = match found {
            Some((_, port, hash, _)) => (port, hash),
            None => {
                // Every port tried is held by a live flow: the oldest half-open one gives its port
                // up (else the oldest closing one).
                let (_, port, hash, forward) = oldest?;
                self.evict_for_port(forward);
                (port, hash)
            }
        };
        // The reply key made afresh rather than copied from `key`, whose copy's loads would span
        // the port store just made (a store-forwarding stall). (`slot` is below `BATCH`: the `%`
        // only says so.)
        self.reply_keys[slot % BATCH] = keys.to(port, proto);
        Some(ReplyPort { port, hash })
    }

    /// Evicts the flow whose forward entry is at `forward` for its SNAT port, when every port
    /// [`Core::pick_snat_port`] tried is held by a live flow. The oldest (soonest to expire)
    /// half-open flow among them goes, else the oldest closing one, as conntrack evicts for room;
    /// none goes when established flows hold them all (the new flow is dropped as out of ports).
    /// So a flood of SYNs (each holds a port for the SYN timeout) or of stray FINs or RSTs (the FIN
    /// or time-wait timeout) to a full-NAT service cannot shut new connections out, nor take a port
    /// an established connection holds. Counted in
    /// [`Stats::snat_port_evictions`](crate::stats::Stats::snat_port_evictions). The evicted flow's
    /// late replies (a backend's SYN-ACK) then reach the new flow's client, whose TCP answers them
    /// with a reset, as after a conntrack eviction that freed the port.
    #[cold]
    #[inline(never)]
    fn evict_for_port(&mut self, forward: u32) {
        // The forward entry, with its backend's connection count and its reverse entry (the port).
        self.remove(forward);
        self.stats.snat_port_evictions += 1;
    }

    /// The reply hint of the frame at `slot` of the batch being decided, if the warm-up made one.
    #[inline]
    pub(super) fn reply_hint(&self, slot: usize) -> Option<ReplyHint> {
        if self.reply_hints_live { self.reply_hints.get(slot).copied().flatten() } else { None }
    }
}

/// The reply key of the first probe of a SNAT port search for a flow to the backend in `slot`, whose
/// reply keys are `keys`, `ahead` flows to the same backend later (the warm-up's guess for the later flows of a batch; see
/// [`Core::pick_snat_port`]), from the core's SNAT ports and search starts (`Core::snat_ports`,
/// `Core::snat_next`), for [`Core::warm_nat`], which writes other fields of the core meanwhile.
/// Made in `key` (the frame's cell of `Core::reply_keys`), `None` leaving it as it was: returned,
/// it was made on the stack and then copied there (~3 instructions a new full-NAT flow). Returns
/// the key's hash. From the backend's reply keys as the tables keep them
/// ([`Tables::nat_reply_keys`], [`Backend::reply_keys`]): the key copied and hashed in
/// two multiplies of four, not made from two `IpAddr`s and hashed whole (~20 instructions a new
/// full-NAT flow, callgrind).
#[inline]
pub(super) fn snat_probe(
    (ports, next): (Option<(u16, u16)>, &[u16]),
    (slot, keys): (usize, &PortKeys),
    proto: u8,
    ahead: u32,
    key: &mut ConnKey,
) -> Option<u64> {
    let ports = ports?;
    let next = next.get(slot).copied().unwrap_or(0);
    let (.., port) = search_start(ports, u32::from(next) + ahead);
    Some(keys.key(port, proto, key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    use super::{offset_in, search_start, wrap};
    use crate::config::BackendState;
    use crate::conntrack::{ConnKey, ConntrackSeed};
    use crate::service::{Backend, BackendRef};
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    proptest::proptest! {
        /// A reply key made from the backend's reply keys ([`Backend::reply_keys`], as the tables
        /// keep them per backend) is the key of the flow from the backend to the SNAT address and
        /// port, with its hash, for backends and SNAT addresses of either family, any backend port,
        /// SNAT port and protocol.
        #[test]
        fn reply_keys_make_the_reply_key(
            (v4, a4, s4) in (proptest::prelude::any::<bool>(), proptest::prelude::any::<u32>(), proptest::prelude::any::<u32>()),
            (a6, s6) in (proptest::prelude::any::<u128>(), proptest::prelude::any::<u128>()),
            (port, snat_port, proto) in (proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>()),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let seed = ConntrackSeed::new(seed);
            let (addr, snat) = if v4 {
                (IpAddr::V4(Ipv4Addr::from(a4)), IpAddr::V4(Ipv4Addr::from(s4)))
            } else {
                (IpAddr::V6(Ipv6Addr::from(a6)), IpAddr::V6(Ipv6Addr::from(s6)))
            };
            let id = BackendRef { slot: 3, generation: 1 };
            let backend = Backend { addr, port, weight: 1, state: BackendState::Active, mac: [2; 6], id };
            let want = ConnKey::flow(addr, snat, port, snat_port, proto);
            let mut key = ConnKey::default();
            let hash = backend.reply_keys(seed, snat).key(snat_port, proto, &mut key);
            proptest::prop_assert_eq!(key, want);
            proptest::prop_assert_eq!(hash, want.hash(seed));
            proptest::prop_assert_eq!(backend.reply_keys(seed, snat).hash(snat_port, proto), want.hash(seed));
            proptest::prop_assert_eq!(backend.reply_keys(seed, snat).to(snat_port, proto), want);
        }
    }

    /// A search from offset `next` of the share `lo..=hi` starts `next` modulo the share's size
    /// past `lo`: every offset below, at and past one and several spans, in shares of one port to
    /// the whole port range, at either end.
    #[test]
    fn search_start_is_next_modulo_the_share() {
        for (lo, hi) in
            [(1, 1), (40000, 40000), (40000, 40999), (1024, 65535), (1, 65535), (65535, 65535), (60000, 65535)]
        {
            let span = u32::from(hi) - u32::from(lo) + 1;
            let nexts = (0..100u32).chain([
                span - 1,
                span,
                span + 1,
                3 * span + 7,
                u32::from(u16::MAX),
                u32::from(u16::MAX) + 31,
            ]);
            for next in nexts {
                let start = next % span;
                let first = u16::try_from(u32::from(lo) + start).unwrap();
                assert_eq!(search_start((lo, hi), next), (span, start, first), "{next} in {lo}..={hi}");
                assert!((lo..=hi).contains(&first));
            }
        }
    }

    /// `offset_in` is `x % span` as a `u16`, whole, for every span a share has (one port to all
    /// 2^16) and offsets below, at and beyond one and two spans.
    #[test]
    fn offset_in_is_the_remainder_whole() {
        for span in (1..=70u32).chain([1023, 1024, 28_232, 65_534, 65_535, 65_536]) {
            for x in (0..200u32).chain([span - 1, span, span + 1, 2 * span - 1, 2 * span, 3 * span + 7, u32::MAX]) {
                assert_eq!(Some(offset_in(x, span)), u16::try_from(x % span).ok(), "{x} % {span}");
            }
        }
    }

    /// `wrap` is `%` for every span and every offset, below, between and beyond one and two spans.
    #[test]
    fn wrap_is_remainder() {
        for span in (1..=70u32).chain([1023, 1024, 28_232, 65_535, 65_536, u32::MAX / 2, u32::MAX / 2 + 1, u32::MAX]) {
            let offsets = (0..200u32).chain([span - 1, span, span.saturating_add(1), 2 * span.min(u32::MAX / 2) - 1]);
            for x in offsets.chain([2 * span.min(u32::MAX / 2), u32::MAX - 1, u32::MAX]) {
                assert_eq!(wrap(x, span), x % span, "{x} % {span}");
            }
        }
    }
}
