//! The per-core connection table: which backend each flow goes to, and in which TCP state it is.
//!
//! ```text
//!   hash(key) ──► bucket (8 ways, 576 bytes) ──► head: tags [u16; 8], expiries [u32; 8], classes (one line)
//!                                               entries [Entry; 8] (one cache line each, compared only
//!                                                                   on a tag hit)
//! ```
//! A set-associative table, like a CPU cache: capacity is fixed when the table is built (rounded up to a
//! power of two number of 8-way buckets) and the storage is one boxed slice of buckets that is never
//! resized, so the table cannot grow and cannot allocate after construction. A bucket keeps its head
//! and its entries together, so a lookup touches two cache lines of one memory page (with 4 KiB pages
//! and a table far larger than the TLB reaches, separate tag, expiry and entry arrays cost a page walk
//! each), and eviction reads only the head. An entry never moves once written, so
//! its index is a stable handle: a NAT flow's forward and reverse entries point at each other by index.
//!
//! The hash is keyed: each table hashes under a seed of its own, fixed for its life
//! ([`ConntrackSeed`], [`ConntrackTable::hash`]), so that a sender who does not know it cannot pick
//! flows that all fall in one bucket.
//!
//! Each key has a *home way*, from hash bits that neither the bucket nor the tag use: an insert takes it
//! when it is free (else the first free way), so in a table that is not nearly full most entries sit
//! at their home way and the worker's warm-up reads the entry's likely line in the same round as its
//! bucket's head, rather than one round later (see [`ConntrackTable::touch_bucket_and_home`]). Lookups
//! try the home way first, then search the head's tags in order, so a key elsewhere is found as well.
//!
//! A NAT flow's reverse entry lives as long as its forward entry. Its way's head expiry holds a
//! *vouch* instead of its own expiry: a second before which the forward entry is known to be live and
//! to link back, which the table keeps a lower bound of the forward entry's expiry on every write
//! (see `Pairing`), so inserts and sweeps judge a reverse way from the head and read the forward
//! entry (in another bucket) only once the vouch has run out.
//!
//! Expired entries are reclaimed lazily: a lookup that finds one removes it, an insert reuses its way,
//! and [`ConntrackTable::sweep_bucket`] (called a few buckets per burst by the worker) reclaims the rest
//! so per-backend connection counts stay honest.
//!
//! When every way of a bucket is live, an insert evicts, in this order: the oldest half-open entry
//! (TCP SYN seen, or UDP seen in one direction once), then the oldest closing entry (FIN, RST, time-wait),
//! affinity record or backend-gone tombstone. "Oldest" is judged by expiry, the one time a bucket's
//! head keeps per way: the entry nearest its timeout goes first. Among entries of one state that is
//! the one idle longest; across states it weighs the state's timeout, so a SYN seen now (60 s by
//! default) goes before a one-way UDP entry idle for less than 240 s (300 s). Such a SYN's flow is
//! not lost: its next segment is scheduled again, to the same backend under a scheduler that picks
//! from the flow. It never evicts a live established flow: then the insert fails and the caller
//! counts [`DropReason::ConntrackFull`](crate::stats::DropReason::ConntrackFull). A SYN flood therefore
//! only ever replaces its own half-open entries and cannot push established connections out. What is
//! best effort (a ClientIP affinity record) goes in only where it evicts nothing
//! ([`ConntrackTable::insert_without_evicting`]).
//!
//! Times are whole seconds (`u32`) to keep an entry within 64 bytes.

use alloc::boxed::Box;
use alloc::vec;
use core::net::IpAddr;

use crate::service::BackendRef;

/// Ways per bucket.
pub const WAYS: usize = 8;

/// What a conntrack entry is keyed by: the 5-tuple as received, addresses as 16 bytes (IPv4 mapped).
#[derive(Debug, Clone, Copy, Eq, Hash, Default)]
#[expect(
    clippy::derived_hash_with_manual_eq,
    reason = "the manual `==` is field-by-field equality (`conn_key_eq_is_field_equality`), as the derived hash takes it"
)]
pub struct ConnKey {
    /// Source address (IPv4 as `::ffff:a.b.c.d`).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port (0 for an affinity record).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Bit 0: IPv6. Bit 1: affinity record (client address to backend, not a flow).
    pub flags: u8,
}

/// Field by field, as derived, with the ports compared as one 32-bit word and protocol and flags as
/// one 16-bit word (each pair adjacent, so each is one load): a bucket search compares a key at
/// every packet, and four compares of two fields each were ~6 instructions more (callgrind).
impl PartialEq for ConnKey {
    #[inline(always)]
    fn eq(&self, other: &ConnKey) -> bool {
        let ports = |k: &ConnKey| u32::from(k.sport) | (u32::from(k.dport) << 16);
        let rest = |k: &ConnKey| u16::from(k.proto) | (u16::from(k.flags) << 8);
        ports(self) == ports(other) && rest(self) == rest(other) && self.src == other.src && self.dst == other.dst
    }
}

const FLAG_V6: u8 = 1;
const FLAG_AFFINITY: u8 = 2;

/// The 16-byte form of an address as a [`ConnKey`] stores it.
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        // `FlowKey`'s mapping, one 128-bit value, rather than `to_ipv6_mapped().octets()`, which
        // wrote the 16 bytes one at a time: a key built so and then read whole (hashed, compared,
        // copied) loaded across several of those byte stores, which the core cannot forward from.
        IpAddr::V4(a) => crate::packet::map_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address a [`ConnKey`] stored, given its family.
pub fn addr_from_bytes(b: [u8; 16], v6: bool) -> IpAddr {
    let a = core::net::Ipv6Addr::from(b);
    if v6 {
        IpAddr::V6(a)
    } else {
        match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(a),
        }
    }
}

impl ConnKey {
    /// The key of a flow.
    pub fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> Self {
        ConnKey {
            src: addr_bytes(src),
            dst: addr_bytes(dst),
            sport,
            dport,
            proto,
            flags: if src.is_ipv6() { FLAG_V6 } else { 0 },
        }
    }

    /// The key of a parsed flow.
    #[inline]
    pub fn from_flow(f: &crate::packet::FlowKey) -> Self {
        ConnKey {
            src: *f.src_bytes(),
            dst: *f.dst_bytes(),
            sport: f.src_port(),
            dport: f.dst_port(),
            proto: f.proto(),
            flags: if f.family() == crate::packet::Family::V6 { FLAG_V6 } else { 0 },
        }
    }

    /// The key of a ClientIP affinity record: one per (client address, service).
    pub fn affinity(client: IpAddr, vip: IpAddr, port: u16, proto: u8) -> Self {
        let mut k = ConnKey::flow(client, vip, 0, port, proto);
        k.flags |= FLAG_AFFINITY;
        k
    }

    /// True for an IPv6 flow.
    pub fn is_v6(&self) -> bool {
        self.flags & FLAG_V6 != 0
    }

    /// Source address.
    pub fn src_ip(&self) -> IpAddr {
        addr_from_bytes(self.src, self.is_v6())
    }

    /// Destination address.
    pub fn dst_ip(&self) -> IpAddr {
        addr_from_bytes(self.dst, self.is_v6())
    }

    /// Source and destination address bytes when both are IPv4 (exactly when [`ConnKey::src_ip`]
    /// and [`ConnKey::dst_ip`] are both `IpAddr::V4`), read where they are: building the two
    /// `IpAddr`s to match them cost a full-NAT reply ~60 instructions (callgrind).
    #[inline]
    pub fn v4_addrs(&self) -> Option<([u8; 4], [u8; 4])> {
        // Each 16-byte address as a 96-bit prefix and the 32-bit IPv4 address after it.
        let split = |a: &[u8; 16]| {
            let v = u128::from_be_bytes(*a);
            (v >> 32, (v as u32).to_be_bytes())
        };
        let ((src_prefix, src), (dst_prefix, dst)) = (split(&self.src), split(&self.dst));
        (!self.is_v6() && src_prefix == 0xffff && dst_prefix == 0xffff).then_some((src, dst))
    }

    /// The key's 64-bit hash under `seed`: a table's hash ([`ConntrackTable::hash`]). Hand-written
    /// rather than a `Hasher` because it is on the fast path and works on whole words: each
    /// address's two 64-bit words, each XORed with a key of the seed's, multiplied together in
    /// full (64 × 64 → 128 bits) and folded to 64 (`folded_multiply`), then the ports, protocol
    /// and flags XORed into the source's product, that multiplied by the destination's, and the
    /// result by a constant: four multiplies, the first two independent. `AddrsHash` makes, and
    /// keeps, the two products for keys that differ only past the addresses. See [`ConntrackSeed`]
    /// for why it is keyed so.
    #[inline]
    pub(crate) fn hash(&self, seed: ConntrackSeed) -> u64 {
        AddrsHash::of(seed, &self.src, &self.dst).finish(self.sport, self.dport, self.proto, self.flags)
    }
}

/// The secret a connection table's hash is keyed by ([`ConntrackTable::hash`]). Unseeded, anyone
/// could compute the hash offline and pick flows (say source addresses of an IPv6 prefix they
/// own) that all fall in one bucket, where they contend and evict each other's half-open entries;
/// seeded at random and kept private, they cannot (as the kernel keys its hash maps, and so
/// Katran's conntrack, with a random `hashrnd`).
///
/// A table's seed is fixed for its life (its entries sit where their hash put them), so a worker
/// takes it from its first tables and refuses tables of another seed
/// ([`Worker::swap_tables`](crate::worker::Worker::swap_tables)); the tables carry it because they
/// hash full-NAT reply keys ahead ([`TableBuilder::with_conntrack_seed`](crate::service::TableBuilder::with_conntrack_seed)).
/// lb-core draws no randomness: the embedder draws one per process and builds every table with it.
/// Unlike `NodeConfig::hash_seed` (the schedulers' flow hash, equal on every node of a cluster), it
/// should differ between processes and never be shown: its `Debug` hides it.
///
/// The hash multiplies words of the key XORed with four keys drawn from the seed
/// ([`ConntrackSeed::new`]), two by two, in full, and folds the 128-bit product to 64 bits (as
/// foldhash and ahash do): every output bit then depends on every bit of both words, and what a
/// change to one word does to the product depends on the other operand, which a key hides (a
/// word's bit 63 flipped adds or takes 2^63 times it). A hash that starts from the seed and
/// multiplies by a constant keeps a difference's structure whatever the seed: its multiply
/// carries a word's bit 63 straight through, so two keys one bit apart there and in the next
/// word collided under every seed. This holds only while the keys are secret: whoever knows
/// them can make a word equal its key, which makes its product 0 whatever the other word is,
/// and so any number of keys that collide ([`ConntrackSeed::UNSEEDED`]'s keys are public). It
/// is not a cryptographic hash; it keeps a sender who sees only whether flows are served from
/// aiming them at one bucket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConntrackSeed {
    /// The keys XORed into the source address's first and last eight bytes and the
    /// destination's, before each address's multiply: drawn from the secret once, here, not per
    /// key.
    keys: [u64; 4],
}

impl ConntrackSeed {
    /// No seed (0): the hash anyone can compute. For tests and tools, not for a node facing clients.
    pub const UNSEEDED: ConntrackSeed = ConntrackSeed::new(0);

    /// The seed `secret` (draw it at random, once per process). Its keys are four steps of
    /// SplitMix64 from `secret`: distinct, and each as unpredictable as the secret.
    pub const fn new(secret: u64) -> Self {
        let mut keys = [0; 4];
        let mut state = secret;
        let mut i = 0;
        while i < keys.len() {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            keys[i] = z ^ (z >> 31);
            i += 1;
        }
        ConntrackSeed { keys }
    }
}

impl Default for ConntrackSeed {
    fn default() -> Self {
        ConntrackSeed::UNSEEDED
    }
}

impl core::fmt::Debug for ConntrackSeed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if *self == ConntrackSeed::UNSEEDED { "ConntrackSeed(unseeded)" } else { "ConntrackSeed(..)" })
    }
}

/// `a` × `b` in full (64 × 64 → 128 bits), its two halves XORed: the folded multiply of
/// foldhash and ahash, one `mul` on x86-64. The product's middle bits depend on every bit of both
/// operands; the fold brings them to both ends of the result.
#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// [`ConnKey::hash`]'s last multiplier ([`AddrsHash::finish`]): any constant with bits spread
/// over its width (the golden ratio's).
const HASH_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// [`ConnKey::hash`]'s last word: the ports, protocol and flags.
#[inline(always)]
fn hash_tail(sport: u16, dport: u16, proto: u8, flags: u8) -> u64 {
    (u64::from(sport) << 32) | (u64::from(dport) << 16) | (u64::from(proto) << 8) | u64::from(flags)
}

/// The keys of the flows from one address and port to another address, to any port with any
/// protocol, with their addresses' [`AddrsHash`]: a key from a copy and its hash in two multiplies
/// (of the hash's four), for keys made often with only their destination port and protocol new. Such
/// are a full-NAT backend's reply keys, from the backend to the node's SNAT address, one a new
/// flow (see [`Backend::reply_keys`](crate::service::Backend::reply_keys); the tables keep them
/// per backend). 56 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortKeys {
    /// The key to destination port 0 with protocol 0.
    base: ConnKey,
    /// The addresses' hash with the base's source port and flags in ([`AddrsHash::with`]).
    addrs: AddrsHash,
}

impl PortKeys {
    /// The keys of flows from `src` port `sport` to `dst` ([`ConnKey::flow`]'s), hashed under `seed`.
    pub(crate) fn flow(seed: ConntrackSeed, src: IpAddr, dst: IpAddr, sport: u16) -> Self {
        let base = ConnKey::flow(src, dst, sport, 0, 0);
        PortKeys { base, addrs: AddrsHash::flow(seed, src, dst).with(base.sport, base.flags) }
    }

    /// Makes in `key` the key to port `dport` with protocol `proto`, and returns its hash (under
    /// the seed these keys were made with).
    #[inline(always)]
    pub(crate) fn key(&self, dport: u16, proto: u8, key: &mut ConnKey) -> u64 {
        // Copied whole, then the two fields set: built as one value, the key went through a
        // stack copy first (~5 instructions a new full-NAT flow, callgrind).
        *key = self.base;
        key.dport = dport;
        key.proto = proto;
        self.hash(dport, proto)
    }

    /// The key to port `dport` with protocol `proto`.
    #[inline(always)]
    pub(crate) fn to(&self, dport: u16, proto: u8) -> ConnKey {
        ConnKey { dport, proto, ..self.base }
    }

    /// The hash of the key to port `dport` with protocol `proto` ([`ConnKey::hash`] under the seed
    /// these keys were made with).
    #[inline(always)]
    pub(crate) fn hash(&self, dport: u16, proto: u8) -> u64 {
        // (The source port and flags are in `addrs` already: 0 here.)
        self.addrs.finish(0, dport, proto, 0)
    }
}

/// [`ConnKey::hash`] part done: its two address products under one seed, the same for every key
/// with those addresses. [`AddrsHash::finish`] takes the rest of a key and gives its hash, two
/// multiplies, fewer instructions than hashing the whole key ([`PortKeys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddrsHash {
    /// The source address's product, and then whatever of the last word [`AddrsHash::with`] put in.
    src: u64,
    /// The destination address's product.
    dst: u64,
}

impl AddrsHash {
    /// The address products of [`ConnKey::hash`] under `seed` for keys from `src` to `dst` (as a
    /// [`ConnKey`] stores them: [`addr_bytes`]). [`ConnKey::hash`] itself starts here: inlined,
    /// one form costs nothing over reading the words where the key holds them (callgrind).
    #[inline(always)]
    pub(crate) fn of(seed: ConntrackSeed, src: &[u8; 16], dst: &[u8; 16]) -> Self {
        let [k0, k1, k2, k3] = seed.keys;
        let (s, d) = (u128::from_le_bytes(*src), u128::from_le_bytes(*dst));
        AddrsHash {
            src: folded_multiply(s as u64 ^ k0, (s >> 64) as u64 ^ k1),
            dst: folded_multiply(d as u64 ^ k2, (d >> 64) as u64 ^ k3),
        }
    }

    /// The address products of [`ConnKey::hash`] under `seed` for the keys of flows from `src` to
    /// `dst` ([`ConnKey::flow`]'s).
    pub(crate) fn flow(seed: ConntrackSeed, src: IpAddr, dst: IpAddr) -> Self {
        Self::of(seed, &addr_bytes(src), &addr_bytes(dst))
    }

    /// This state with a key's source port and flags folded into it, which [`AddrsHash::finish`]
    /// then takes as 0: the last word is the ports, protocol and flags side by side, and the hash
    /// takes it by `xor` into the source's product, so a part of it may go in ahead of the rest.
    /// Spares a key whose port and protocol alone change loading and placing the other two: ~16
    /// instructions a new full-NAT flow (callgrind), in a warm-up loop short of registers.
    pub(crate) fn with(self, sport: u16, flags: u8) -> Self {
        AddrsHash { src: self.src ^ hash_tail(sport, 0, 0, flags), ..self }
    }

    /// [`ConnKey::hash`] of the key with these addresses and these ports, protocol and flags (under
    /// this state's seed): the last word XORed into the source's product, multiplied by the
    /// destination's, and that multiplied by `HASH_MIX`. Keys apart only in a few bits of the last
    /// word (one client's source ports, a backend's reply keys to each SNAT port) went, without
    /// the last multiply, through one product with one fixed operand, the destination's: linear in
    /// those bits at the bucket's and the tag's bits, and for some seeds (several of 40 tried)
    /// bunched in a few buckets (`keys_that_differ_little_spread_evenly`). foldhash's quality
    /// variant ends so too.
    #[inline(always)]
    pub(crate) fn finish(self, sport: u16, dport: u16, proto: u8, flags: u8) -> u64 {
        folded_multiply(folded_multiply(self.src ^ hash_tail(sport, dport, proto, flags), self.dst), HASH_MIX)
    }
}

/// Where a flow is in its life, which sets its idle timeout and how readily it is evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum ConnState {
    /// TCP: only the client has spoken (a SYN, or a mid-stream segment of a flow we had not seen).
    /// Half-open: evicted first.
    #[default]
    SynSeen,
    /// TCP: the client acknowledged (the handshake completed, or a second mid-stream segment).
    Established,
    /// TCP: one side sent a FIN.
    Closing,
    /// TCP: both sides sent a FIN, or either sent an RST.
    TimeWait,
    /// UDP seen once in one direction. Half-open: evicted first.
    UdpNew,
    /// UDP seen twice or answered.
    UdpAssured,
    /// A ClientIP affinity record; lives for the service's affinity timeout.
    Affinity,
    /// A tombstone: the flow's backend left a service whose policy is
    /// [`RemovedBackendPolicy::Drop`](crate::config::RemovedBackendPolicy::Drop). Every packet of the
    /// flow is dropped until the flow ends or idles out, so its retransmissions are not scheduled
    /// elsewhere. Holds no backend connection and no reverse entry; evicted like a closing entry.
    BackendGone,
}

impl ConnState {
    /// Every state, in `repr(u8)` order.
    pub const ALL: [ConnState; 8] = [
        ConnState::SynSeen,
        ConnState::Established,
        ConnState::Closing,
        ConnState::TimeWait,
        ConnState::UdpNew,
        ConnState::UdpAssured,
        ConnState::Affinity,
        ConnState::BackendGone,
    ];

    /// Eviction class: 0 = half-open, 1 = closing or affinity, 2 = never evicted while live.
    pub(crate) fn eviction_class(self) -> u8 {
        match self {
            ConnState::SynSeen | ConnState::UdpNew => 0,
            ConnState::Closing | ConnState::TimeWait | ConnState::Affinity | ConnState::BackendGone => 1,
            ConnState::Established | ConnState::UdpAssured => 2,
        }
    }
}

/// Whether an entry is a client flow, the reply side of a NAT flow, or an affinity record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum EntryKind {
    /// Keyed by the client's 5-tuple towards the VIP.
    #[default]
    Forward,
    /// Keyed by the backend's reply 5-tuple towards the SNAT address; `link` is the forward entry.
    /// It lives exactly as long as its forward entry.
    Reverse,
    /// Keyed by [`ConnKey::affinity`].
    Affinity,
}

/// One tracked flow (or affinity record). At most 64 bytes (a test holds this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// The key the entry was inserted under.
    pub key: ConnKey,
    /// TCP/UDP state.
    pub state: ConnState,
    /// Forward, reverse or affinity.
    pub kind: EntryKind,
    /// Bit 0: the client sent a FIN; bit 1: the backend sent a FIN (seen only in NAT mode);
    /// [`GONE_CLOSED`]: a [`ConnState::BackendGone`] flow saw the client's FIN or RST.
    pub fins: u8,
    /// Second (of the caller's clock) at which the entry expires.
    pub expires: u32,
    /// The backend the flow goes to.
    pub backend: BackendRef,
    /// Full NAT: the source port this core chose for the flow (0 otherwise).
    pub snat_port: u16,
    /// Index of the paired entry (forward <-> reverse), [`NO_LINK`] if none.
    pub link: u32,
}

/// `Entry::fins` bit of a [`ConnState::BackendGone`] tombstone whose client sent a FIN or RST: it
/// lives only for the close timeout, and a new SYN on its 5-tuple starts a new flow.
pub const GONE_CLOSED: u8 = 4;

/// `Entry::link` of an entry with no pair.
pub const NO_LINK: u32 = u32::MAX;

impl Entry {
    /// True when the entry has expired at `now` (seconds).
    pub fn is_expired(&self, now: u32) -> bool {
        now >= self.expires
    }
}

/// An insert that found no way it may use: every entry of the bucket is a live established flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackFull;

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// Index of the new entry.
    pub index: u32,
    /// The entry that was there before (expired, or evicted), which the caller must account for
    /// (connection counts, its paired entry).
    pub displaced: Option<Displaced>,
}

/// An insert's way choice made ahead of it (see [`ConntrackTable::insert_hinted`]): the version of
/// its bucket's head the choice was made from, and the choice. Made only for a key whose tag no
/// way of the bucket held ([`ConntrackTable::likely`]), so while the version holds it also says the
/// key is absent ([`ConntrackTable::find_hinted`]). Eight bytes (it rides in the worker's per-frame
/// batch record); the bucket is the hash's, which the insert is given again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InsertHint {
    version: u32,
    way: u8,
    evicted: Option<bool>,
    /// Always 0: the hint's last two bytes, so that it is one word with no padding. With padding,
    /// LLVM kept the bytes a stack copy of the previous hint had there when it made one (a load,
    /// a mask and a store a hint: -5 a new DSR flow, -8 a new full-NAT one, callgrind).
    zero: u16,
}

/// What [`ConntrackTable::likely`] expects for a key.
pub(crate) enum Likely<'a> {
    /// An entry with the key's tag, most likely the key's own.
    Hit(&'a Entry),
    /// No entry with the key's tag: the entry at the way its insert will take (and whether the
    /// insert displaces it), and that choice.
    Insert { entry: &'a Entry, displaces: bool, hint: InsertHint },
    /// No entry with the key's tag, and an insert's way that needs more than the head to choose.
    Unknown,
}

/// An entry removed to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Displaced {
    /// Its index (now reused).
    pub index: u32,
    /// The entry as it was.
    pub entry: Entry,
    /// True if it was live and evicted, false if it had expired.
    pub evicted: bool,
}

/// What a way's head expiry says, given what it held before and the entry now there: a forward or
/// affinity entry's own expiry; for a reverse entry, its *vouch*, kept across the reverse entry's own
/// updates (and dropped if it is re-linked).
#[inline]
fn head_expiry(e: &Entry, current: u32, before: Pairing) -> u32 {
    match (e.kind, before) {
        (EntryKind::Reverse, Pairing::Reverse { link }) if link == e.link => current,
        (EntryKind::Reverse, _) => 0,
        _ => e.expires,
    }
}

/// An entry's part in a NAT pair, as far as the vouch goes.
///
/// A reverse entry lives as long as its forward entry (the one its `link` names) is live and links
/// back. Checking that reads the forward entry, in another bucket: an insert into a bucket of
/// reverse entries did it for each, two dependent cache misses apiece, on every NAT flow's two
/// inserts. So a reverse way's head expiry holds instead a *vouch*: a second before which its
/// forward entry is known live and linked back, kept a lower bound of that entry's expiry. The table
/// keeps it so on every write: a reverse entry goes in unvouched (0); a forward entry that links to
/// it vouches with its expiry, and again whenever that expiry falls (a FIN, an RST; a rising expiry
/// leaves the old vouch true); one that unlinks, is removed or is displaced withdraws it. So
/// `now < vouch` proves liveness without the remote read, and only an expired vouch (a forward entry
/// older than its first expiry, or gone) takes it. A property test holds the vouch to the definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pairing {
    /// A forward entry linked to the reverse entry at `link`, with its expiry.
    Forward { link: u32, expires: u32 },
    /// A reverse entry of the forward entry at `link`.
    Reverse { link: u32 },
    /// Anything else.
    None,
}

impl Pairing {
    /// True when a change from `self` to `after` may leave a vouch untrue (see
    /// [`ConntrackTable::repair_vouch`]); false for the common write, a forward entry's expiry rising.
    #[inline]
    fn needs_repair(self, after: Pairing) -> bool {
        match (self, after) {
            (Pairing::Forward { link: a, expires: x }, Pairing::Forward { link: b, expires: y }) => a != b || y < x,
            (Pairing::Forward { .. }, _) | (_, Pairing::Forward { .. }) => true,
            _ => false,
        }
    }

    #[inline]
    fn of(e: &Entry) -> Pairing {
        Pairing::from_parts(e.kind, e.link, e.expires)
    }

    /// The pairing of an entry of this kind, link and expiry.
    #[inline]
    fn from_parts(kind: EntryKind, link: u32, expires: u32) -> Pairing {
        match kind {
            EntryKind::Forward if link != NO_LINK => Pairing::Forward { link, expires },
            EntryKind::Reverse => Pairing::Reverse { link },
            _ => Pairing::None,
        }
    }
}

/// True when writing `e`, whose kind and link are unchanged and whose expiry was `old_expires`,
/// leaves no vouch to keep: its head expiry is then simply its own. The common write, a packet
/// refreshing a flow, takes this test alone; every other goes to `ConntrackTable::rewrite_paired`.
#[inline]
fn plain_head_write(e: &Entry, old_expires: u32) -> bool {
    e.kind != EntryKind::Reverse && (e.link == NO_LINK || e.expires >= old_expires)
}

/// The per-core connection table. See the module docs.
#[derive(Debug)]
pub struct ConntrackTable {
    buckets: Box<[Bucket]>,
    bucket_mask: usize,
    /// The seed of every hash the table is given ([`ConntrackTable::hash`]).
    seed: ConntrackSeed,
    len: usize,
    sweep_cursor: usize,
}

/// One bucket: its head line, then its ways' entries, one cache line each. An entry's index (its stable
/// handle) is `bucket * WAYS + way`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct Bucket {
    head: BucketHead,
    entries: [Way; WAYS],
}

impl Bucket {
    /// The way holding `key` (`hash` is [`ConntrackTable::hash`] of `key`): its home way first, where most keys are,
    /// then the tags in order.
    // The home way's test inlined, the search out of line: as one function LLVM called it out of
    // line, ~5 instructions of call an established packet (callgrind).
    #[inline(always)]
    fn way_of(&self, key: &ConnKey, hash: u64) -> Option<usize> {
        let tag = tag_of(hash);
        let home = home_way(hash);
        if self.at_home(key, tag, home) {
            return Some(home);
        }
        self.search(key, tag)
    }

    /// Whether `key` (under `tag`) is at way `home`.
    #[inline(always)]
    fn at_home(&self, key: &ConnKey, tag: u16, home: usize) -> bool {
        self.head.tags[home] == tag && self.entries[home].0.key == *key
    }

    /// The way holding `key` under `tag`, searched in way order.
    #[inline(never)]
    fn search(&self, key: &ConnKey, tag: u16) -> Option<usize> {
        self.head.tags.iter().zip(&self.entries).position(|(t, e)| *t == tag && e.0.key == *key)
    }
}

/// What lookup, expiry and eviction read first, in one cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct BucketHead {
    /// One per way; 0 means empty.
    tags: [u16; WAYS],
    /// Per way, the entry's `expires`: with `classes`, what eviction and expiry read without
    /// touching the entries.
    expiries: [u32; WAYS],
    /// The ways of each eviction class (see [`class_bits`]), a byte per class: bit `w` of byte `c`
    /// is set when way `w` is occupied and its entry is of class `c`; an empty way has no bit set.
    /// Kept as bit sets rather than bits in each tag so an insert's way choice reads them in one
    /// word (computing them from per-tag class bits was ~80 instructions a choice, callgrind).
    classes: u32,
    /// Counts the writes to this head (any tag, expiry or class): an insert's way choice made ahead
    /// ([`InsertHint`]) holds while it is unchanged, since the choice is a function of the head.
    version: u32,
}

/// Bit 0 of each byte of a word: way 0 of every class in [`BucketHead::classes`].
const CLASS_LANES: u32 = 0x0101_0101;

impl BucketHead {
    /// Eviction class of way `w` (of an occupied way; 4 for an empty one).
    #[inline]
    fn class(&self, w: usize) -> u16 {
        (((self.classes >> (w % WAYS)) & CLASS_LANES).trailing_zeros() / 8) as u16
    }

    /// Whether way `w` is in [`CLASS_REVERSE`]: `class(w) == CLASS_REVERSE` as one bit test (a way is
    /// in one class at most), for a reply's liveness check (`class`'s bit scan was ~3 instructions
    /// more a reply, callgrind).
    #[inline]
    fn is_reverse(&self, w: usize) -> bool {
        self.classes & (1 << (8 * usize::from(CLASS_REVERSE) + w % WAYS)) != 0
    }

    /// Whether any way holds `tag`: the eight compares made together, without branches (LLVM
    /// makes them one vector compare, ~7 instructions), where a search that stops at the first
    /// match compares the ways one at a time, 16 instructions when none holds it, as for most
    /// new flows' keys.
    #[inline(always)]
    fn holds_tag(&self, tag: u16) -> bool {
        let mut any = false;
        for t in &self.tags {
            any |= *t == tag;
        }
        any
    }

    /// Whether any occupied way's head expiry is at or before `now`: every way
    /// [`ConntrackTable::sweep_bucket`] reclaims is one. Tested for all ways at once, without
    /// branches.
    #[inline]
    fn any_expired(&self, now: u32) -> bool {
        let mut any = false;
        for (t, x) in self.tags.iter().zip(&self.expiries) {
            any |= (*t != 0) & (now >= *x);
        }
        any
    }

    /// Puts way `w` in eviction class `class` (0 to 3), out of any other.
    #[inline]
    fn set_class(&mut self, w: usize, class: u16) {
        let w = w % WAYS;
        self.classes = (self.classes & !(CLASS_LANES << w)) | (1 << (8 * usize::from(class & 3) + w));
        self.version = self.version.wrapping_add(1);
    }

    /// Takes way `w` out of every class (it is being emptied).
    #[inline]
    fn clear_class(&mut self, w: usize) {
        self.classes &= !(CLASS_LANES << (w % WAYS));
        self.version = self.version.wrapping_add(1);
    }

    /// Brings way `w`'s class and expiry in step with its entry `e` after a write that changed
    /// neither its kind nor its link, `old_state` its state before: one version step, and the class
    /// rewritten only when the state changed (kind and state are all [`class_bits`] reads, and the
    /// head held the old ones' class). A packet refreshing an established flow keeps its state:
    /// rewriting its unchanged class was ~8 instructions a packet (callgrind).
    #[inline]
    fn refresh(&mut self, w: usize, e: &Entry, old_state: ConnState) {
        if e.state != old_state {
            self.set_class(w, class_bits(e));
        } else {
            self.version = self.version.wrapping_add(1);
        }
        if let Some(x) = self.expiries.get_mut(w) {
            *x = e.expires;
        }
    }

    /// Sets way `w`'s head expiry (its entry's, or a reverse entry's vouch).
    #[inline]
    fn set_expiry(&mut self, w: usize, expiry: u32) {
        if let Some(x) = self.expiries.get_mut(w) {
            *x = expiry;
        }
        self.version = self.version.wrapping_add(1);
    }

    /// Occupies way `w` with a tag and an entry of class `class`: the tag, class and head expiry.
    #[inline]
    fn fill(&mut self, w: usize, tag: u16, class: u16, expiry: u32) {
        if let (Some(t), Some(x)) = (self.tags.get_mut(w), self.expiries.get_mut(w)) {
            (*t, *x) = (tag, expiry);
        }
        self.set_class(w, class);
    }
}

/// An entry alone in its cache line (an [`Entry`] is 60 bytes; packed, most would straddle two lines).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Way(Entry);

/// Bucket and way of an entry index.
fn split(index: usize) -> (usize, usize) {
    (index / WAYS, index % WAYS)
}

/// A way's tag: bit 0 set when occupied, bits 1-15 from the hash.
fn tag_of(hash: u64) -> u16 {
    (hash >> 48) as u16 | 1
}

/// The way an insert under `hash` takes when it is free: hash bits 45-47, which neither the bucket
/// index (the low bits; a table would need 2^45 buckets to reach them) nor the tag (bits 49-63) uses.
fn home_way(hash: u64) -> usize {
    ((hash >> 45) as usize) & (WAYS - 1)
}

/// The way of `ways` (a bit set, not empty) an insert under `hash` takes: its home way if in the
/// set, else the first.
fn home_or_first(ways: u32, hash: u64) -> usize {
    let home = home_way(hash);
    if ways & (1 << home) != 0 { home } else { ways.trailing_zeros() as usize }
}

/// Class bits of a reverse entry (never evicted on its own).
const CLASS_REVERSE: u16 = 3;

fn class_bits(e: &Entry) -> u16 {
    match e.kind {
        EntryKind::Reverse => CLASS_REVERSE,
        _ => u16::from(e.state.eviction_class()),
    }
}

/// Every way of a bucket, as a bit set.
const WAY_BITS: u32 = (1 << WAYS) - 1;

/// The ways of a bucket head by class, as bit sets (bit `w` for way `w`), from its class bytes.
struct WayMasks {
    empty: u32,
    /// Reverse entries.
    reverse: u32,
    /// Occupied, eviction class 0 (half-open) or 1 (closing).
    half_open: u32,
    closing: u32,
}

impl WayMasks {
    #[inline(always)]
    fn of(head: &BucketHead) -> WayMasks {
        let c = head.classes;
        // The four class bytes ORed, as their sum: a way is in one class at most, so the bytes
        // share no bit and their sum carries nothing (the ORs and shifts were ~5 instructions
        // more a way choice, callgrind).
        let occupied = (c.wrapping_mul(CLASS_LANES) >> 24) & WAY_BITS;
        WayMasks {
            empty: !occupied & WAY_BITS,
            reverse: c >> (8 * CLASS_REVERSE),
            half_open: c & WAY_BITS,
            closing: (c >> 8) & WAY_BITS,
        }
    }
}

/// The ways of a bucket head whose expiry (for a reverse way, its vouch) is after `now`, as a bit set.
#[inline(always)]
fn live_ways(head: &BucketHead, now: u32) -> u32 {
    let mut live = 0;
    for w in 0..WAYS {
        live |= u32::from(now < head.expiries[w]) << w;
    }
    live
}

/// The lowest (expiry, way) of the ways of `ways` (a bit set) in a bucket head, as one word: the
/// expiry above the way's three bits; `u64::MAX` for no way. A minimum taken as a tree, three
/// compares deep rather than eight in a row.
#[inline(always)]
fn oldest_key(head: &BucketHead, ways: u32) -> u64 {
    let key = |w: usize| {
        let k = (u64::from(head.expiries[w]) << 3) | w as u64;
        if ways & (1 << w) != 0 { k } else { u64::MAX }
    };
    let min4 = |w: usize| key(w).min(key(w + 1)).min(key(w + 2).min(key(w + 3)));
    min4(0).min(min4(4))
}

/// The eviction candidate of a bucket: the way with the lowest (class, expiry), among classes 0
/// and 1. Kept as one word, class above expiry, so each way costs one compare (comparing the pair
/// as a tuple in an `Option` was about a tenth of a new flow's instructions, callgrind).
struct Victim {
    key: u64,
    way: usize,
}

impl Victim {
    const NONE: Victim = Victim { key: u64::MAX, way: WAYS };

    #[inline]
    fn consider(&mut self, class: u16, expires: u32, way: usize) {
        let key = (u64::from(class) << 32) | u64::from(expires);
        if class < 2 && key < self.key {
            *self = Victim { key, way };
        }
    }

    fn way(&self) -> Option<usize> {
        (self.way < WAYS).then_some(self.way)
    }
}

impl ConntrackTable {
    /// A table with room for at least `capacity` entries (rounded up to a power of two times 8 ways,
    /// at least one bucket), hashing keys under `seed` ([`ConntrackTable::hash`]). All memory is
    /// allocated here, once.
    pub fn with_capacity(capacity: usize, seed: ConntrackSeed) -> Self {
        let buckets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        ConntrackTable {
            buckets: vec![Bucket::default(); buckets].into_boxed_slice(),
            bucket_mask: buckets - 1,
            seed,
            len: 0,
            sweep_cursor: 0,
        }
    }

    /// Bytes [`ConntrackTable::with_capacity`] allocates for `capacity` entries (its rounding, whole
    /// buckets with their heads), so a caller can check that the tables fit before it builds them;
    /// `None` beyond any address space.
    pub fn bytes_for(capacity: usize) -> Option<usize> {
        capacity.div_ceil(WAYS).max(1).checked_next_power_of_two()?.checked_mul(core::mem::size_of::<Bucket>())
    }

    /// The seed the table hashes keys under, fixed for its life.
    #[inline]
    pub fn seed(&self) -> ConntrackSeed {
        self.seed
    }

    /// The hash of `key` in this table: what every method taking a key's `hash` wants. Under the
    /// table's seed, so only a table makes it (a hash made with another seed finds nothing and
    /// puts an entry where no lookup finds it).
    #[inline(always)]
    pub fn hash(&self, key: &ConnKey) -> u64 {
        key.hash(self.seed)
    }

    /// Entries the table holds at most. Fixed for the table's life.
    pub fn capacity(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// Occupied entries, including expired ones not yet reclaimed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is occupied.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bucket a hash maps to.
    #[inline]
    fn bucket_of(&self, hash: u64) -> Option<&Bucket> {
        self.buckets.get((hash as usize) & self.bucket_mask)
    }

    /// The index of the entry with this key, if any (expired or not). `hash` is [`ConntrackTable::hash`] of `key`.
    #[inline]
    pub fn find(&self, key: &ConnKey, hash: u64) -> Option<u32> {
        let b = (hash as usize) & self.bucket_mask;
        let bucket = self.buckets.get(b)?;
        let way = bucket.way_of(key, hash)?;
        Some((b * WAYS + way) as u32)
    }

    /// Finds the entry with this key (`hash` is [`ConntrackTable::hash`] of `key`) and offers it to `f`, which either
    /// declines (`None`, and must then leave the entry as it was) or changes it (state, expiry; not
    /// its key, kind or link) and returns a value. Returns the entry's index and that value; keeps the way's class
    /// and the head's expiry in step, as [`ConntrackTable::update`]. One bucket search for what
    /// `find`, `get` and `update` did in three (the established-flow fast path).
    /// When `f` declines, `declined` is set to the entry's index (left as it was when there is no
    /// such entry), so a caller that goes on with that entry does not search its bucket again.
    #[inline]
    pub(crate) fn find_update<R>(
        &mut self,
        key: &ConnKey,
        hash: u64,
        f: impl FnOnce(&mut Entry) -> Option<R>,
        declined: &mut u32,
    ) -> Option<(u32, R)> {
        let b = (hash as usize) & self.bucket_mask;
        let bucket = self.buckets.get_mut(b)?;
        // `Bucket::way_of` spelled out: a key at its home way goes straight on, not through the
        // `Option` that joins that way with the search's (~1-3 instructions an established packet,
        // callgrind).
        let (tag, home) = (tag_of(hash), home_way(hash));
        let way = if bucket.at_home(key, tag, home) { home } else { bucket.search(key, tag)? };
        let Bucket { head, entries } = bucket;
        let e = &mut entries.get_mut(way)?.0;
        let (old_state, old_expires) = (e.state, e.expires);
        #[cfg(debug_assertions)]
        let pairing = (e.kind, e.link);
        let Some(r) = f(e) else {
            *declined = (b * WAYS + way) as u32;
            return None;
        };
        #[cfg(debug_assertions)]
        debug_assert!((e.kind, e.link) == pairing, "find_update changes neither kind nor link");
        let index = (b * WAYS + way) as u32;
        if plain_head_write(e, old_expires) {
            head.refresh(way, e, old_state);
        } else {
            head.set_class(way, class_bits(e));
            let before = (e.kind, e.link, old_expires);
            self.rewrite_paired(index, before);
        }
        Some((index, r))
    }

    /// Brings the head of the bucket of `hash` into the cache ahead of [`ConntrackTable::find`] (a
    /// prefetch hint, see the worker's batch passes); changes nothing.
    #[inline]
    pub fn touch_bucket(&self, hash: u64) {
        // (The head is the bucket's first line. `element`: the index is in bounds by its mask.)
        lb_prefetch::element(&self.buckets, (hash as usize) & self.bucket_mask);
    }

    /// As [`ConntrackTable::touch_bucket`], and the home way's entry too, so both lines come in
    /// together: for a key that is likely present. Its line is the entry's whenever the key sits at
    /// its home way, which is most keys of a table that is not nearly full (see the module docs);
    /// otherwise it is a wasted read, and the entry comes one round later, as without this.
    #[inline]
    pub fn touch_bucket_and_home(&self, hash: u64) {
        self.touch_head_and_way((hash as usize) & self.bucket_mask, home_way(hash));
    }

    /// Prefetch hints for the head line of bucket `b` and the entry line of its way `way`, with no
    /// bounds check (`lb_prefetch::element`: a hint past the table's end does nothing; each caller's
    /// bucket is in bounds by the mask or by the index's making). The check was a compare and a
    /// branch a hint, ~2 instructions a packet (callgrind).
    #[inline(always)]
    fn touch_head_and_way(&self, b: usize, way: usize) {
        lb_prefetch::element(&self.buckets, b);
        let line = core::mem::offset_of!(Bucket, entries) + (way % WAYS) * core::mem::size_of::<Way>();
        lb_prefetch::element_at(&self.buckets, b, line);
    }

    /// The entry of the bucket of `hash` whose tag matches, the home way's first (the key is not
    /// compared): a likely hit, read ahead of [`ConntrackTable::find`] so its cache miss overlaps others.
    #[inline]
    pub fn likely_entry(&self, hash: u64) -> Option<&Entry> {
        let tag = tag_of(hash);
        let bucket = self.bucket_of(hash)?;
        let home = home_way(hash);
        let way = if bucket.head.tags[home] == tag { home } else { bucket.head.tags.iter().position(|t| *t == tag)? };
        bucket.entries.get(way).map(|w| &w.0)
    }

    /// [`ConntrackTable::likely_entry`] for a key most likely absent (a new flow's reply key): every
    /// tag is compared first, at once ([`BucketHead::holds_tag`]; a miss, most such keys, is then
    /// ~7 instructions, where comparing each way in turn was 16: -11 a new full-NAT flow,
    /// callgrind), and the ways one by one, the home way's first, only when one holds it.
    #[inline]
    fn likely_entry_of_new(&self, hash: u64) -> Option<&Entry> {
        let tag = tag_of(hash);
        let bucket = self.bucket_of(hash)?;
        if !bucket.head.holds_tag(tag) {
            return None;
        }
        let first = bucket.head.tags.iter().position(|t| *t == tag)?;
        let home = home_way(hash);
        let way = if bucket.head.tags[home] == tag { home } else { first };
        bucket.entries.get(way).map(|w| &w.0)
    }

    /// [`ConntrackTable::likely`] for a key most likely absent ([`ConntrackTable::likely_entry_of_new`]).
    #[inline]
    pub(crate) fn likely_new(&self, hash: u64, now: u32) -> Likely<'_> {
        self.hit_or_insert(self.likely_entry_of_new(hash), hash, now)
    }

    /// The way an insert under `hash` at `now` would take, judged from the bucket's head alone as
    /// the insert judges it: its entry (the one it would displace, or a free way's old contents)
    /// and whether it displaces one (an expired entry, or the oldest half-open, else closing,
    /// entry). `None` when nothing may go or the choice needs a reverse entry's forward entry. Read
    /// ahead of an insert for a new flow, so the line the insert reads and writes is in the cache by
    /// then, as [`ConntrackTable::likely_entry`] is for a hit.
    #[inline]
    pub fn likely_insert(&self, hash: u64, now: u32) -> Option<(&Entry, bool)> {
        self.likely_insert_hint(hash, now).map(|(e, displaces, _)| (e, displaces))
    }

    /// What the warm-up reads ahead for a key under `hash` at `now`: the entry of its likely hit
    /// ([`ConntrackTable::likely_entry`]), else the way its insert will take, with that choice as an
    /// [`InsertHint`] that a lookup and an insert of the same key at the same `now` may take instead
    /// of searching and choosing again.
    #[inline]
    pub(crate) fn likely(&self, hash: u64, now: u32) -> Likely<'_> {
        self.hit_or_insert(self.likely_entry(hash), hash, now)
    }

    /// [`Likely::Hit`] of `hit`, else the way an insert under `hash` at `now` will take
    /// ([`ConntrackTable::likely`] and [`ConntrackTable::likely_new`], which find `hit` apart).
    #[inline(always)]
    fn hit_or_insert<'a>(&'a self, hit: Option<&'a Entry>, hash: u64, now: u32) -> Likely<'a> {
        if let Some(e) = hit {
            return Likely::Hit(e);
        }
        match self.likely_insert_hint(hash, now) {
            Some((entry, displaces, hint)) => Likely::Insert { entry, displaces, hint },
            None => Likely::Unknown,
        }
    }

    /// [`ConntrackTable::find`], or `None` at once when `hint` (from [`ConntrackTable::likely`] for
    /// this key) still holds: the bucket has not changed since it held no entry with the key's tag.
    /// Saves a new flow's search of every way (~40 instructions).
    #[inline]
    pub(crate) fn find_hinted(&self, key: &ConnKey, hash: u64, hint: Option<InsertHint>) -> Option<u32> {
        let bucket = self.bucket_of(hash)?;
        if hint.is_some_and(|h| h.version == bucket.head.version) {
            debug_assert!(bucket.way_of(key, hash).is_none(), "a key present under an insert hint");
            return None;
        }
        self.find(key, hash)
    }

    /// [`ConntrackTable::likely_insert`], with the choice as an [`InsertHint`] (see
    /// [`ConntrackTable::likely`]). Always inlined, with the choice: LLVM had left it a call from
    /// the warm-up's loops, ~20 instructions a new DSR flow and ~50 a new full-NAT one (callgrind).
    #[inline(always)]
    fn likely_insert_hint(&self, hash: u64, now: u32) -> Option<(&Entry, bool, InsertHint)> {
        let bucket = self.bucket_of(hash)?;
        let (way, evicted) = Self::choose_way(&bucket.head, now, WAYS, hash)?;
        let hint = InsertHint { version: bucket.head.version, way: way as u8, evicted, zero: 0 };
        bucket.entries.get(way).map(|w| (&w.0, evicted.is_some(), hint))
    }

    /// Brings the head line and the entry line of the way at `index` into the cache (prefetch
    /// hints) ahead of a write that reads them (a NAT flow's reverse entry, unlinked when its
    /// forward entry is displaced).
    #[inline]
    pub fn touch_index(&self, index: u32) {
        let (b, w) = split(index as usize);
        self.touch_head_and_way(b, w);
    }

    /// The entry at `index`, if occupied.
    #[inline]
    pub fn get(&self, index: u32) -> Option<&Entry> {
        let (b, w) = split(index as usize);
        let bucket = self.buckets.get(b)?;
        if *bucket.head.tags.get(w)? == 0 {
            return None;
        }
        bucket.entries.get(w).map(|e| &e.0)
    }

    /// Changes the entry at `index` with `f` (state, expiry, link; not its key) and returns what `f`
    /// returns, or `None` if the way is empty. Keeps the way's class and the head's expiry (or a
    /// reverse entry's vouch, see `Pairing`) in step.
    #[inline]
    pub fn update<R>(&mut self, index: u32, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let (b, w) = split(index as usize);
        let Bucket { head, entries } = self.buckets.get_mut(b)?;
        let e = &mut entries.get_mut(w)?.0;
        if *head.tags.get(w)? == 0 {
            return None;
        }
        let (before, old_state) = ((e.kind, e.link, e.expires), e.state);
        let r = f(e);
        if (e.kind, e.link) == (before.0, before.1) && plain_head_write(e, before.2) {
            head.refresh(w, e, old_state);
        } else {
            head.set_class(w, class_bits(e));
            self.rewrite_paired(index, before);
        }
        Some(r)
    }

    /// A full-NAT reply's write: when the entry at `reverse` is a reverse entry live at `now`,
    /// changes the entry its link names with `f` (state, expiry; not its key, kind or link) and
    /// returns what `f` returns with that entry. Exactly `is_live(reverse, now)`, `get(reverse)`'s
    /// link, `update` of it and `get` of it again (a test holds them equal), in one pass: `update`'s
    /// check that the write kept kind and link, its copy of them and the second `get` cost a reply
    /// ~10 instructions (callgrind). `None` for any other entry: a swap may leave a forward entry
    /// keyed by what is now a reply flow (a service gone from a VIP and port that became the SNAT
    /// address and a SNAT port), which is no reply.
    #[inline]
    pub(crate) fn update_linked<R>(
        &mut self,
        reverse: u32,
        now: u32,
        f: impl FnOnce(&mut Entry) -> R,
    ) -> Option<(R, &Entry)> {
        if !self.is_live(reverse, now) {
            return None;
        }
        let index = self.get(reverse)?.link;
        let (b, w) = split(index as usize);
        let Bucket { head, entries } = self.buckets.get_mut(b)?;
        let e = &mut entries.get_mut(w)?.0;
        // Only a reverse entry's write: its link names a forward entry that links back to it. (A
        // forward entry's names its reverse entry; a link that outlived its entry, whatever took
        // the way.) Tested as one compare: as two, LLVM left the state change and the head refresh
        // out of line (~50 instructions a reply; the entry's own kind tested ~7, callgrind).
        if *head.tags.get(w)? == 0 || ((e.link ^ reverse) | u32::from(e.kind as u8 ^ EntryKind::Forward as u8)) != 0 {
            return None;
        }
        let (old_state, old_expires) = (e.state, e.expires);
        #[cfg(debug_assertions)]
        let pairing = (e.kind, e.link);
        let r = f(e);
        #[cfg(debug_assertions)]
        debug_assert!((e.kind, e.link) == pairing, "update_linked changes neither kind nor link");
        if plain_head_write(e, old_expires) {
            head.refresh(w, e, old_state);
        } else {
            head.set_class(w, class_bits(e));
            let before = (e.kind, e.link, old_expires);
            self.rewrite_paired(index, before);
        }
        Some((r, self.get(index)?))
    }

    /// Links the forward entry at `forward`, just inserted unlinked, to its NAT flow's reverse entry
    /// at `reverse` (inserted since, linking back) and vouches for the reverse entry until the
    /// forward entry's expiry: what `update(forward, |e| e.link = reverse)` does there, without the
    /// general write's pairing repair (`rewrite_paired`, out of line: ~80 instructions a new
    /// full-NAT flow, callgrind). The forward way's head is not written: its tag, class and expiry
    /// stay as they were. `None`, changing nothing, if the way at `forward` is empty or not an
    /// unlinked forward entry. (For tests, where pairs are made so and it defines what
    /// [`ConntrackTable::insert_reverse`] does in one step; the worker takes that.)
    #[cfg(test)]
    pub(crate) fn link_reverse(&mut self, forward: u32, reverse: u32) -> Option<()> {
        let (b, w) = split(forward as usize);
        let Bucket { head, entries } = self.buckets.get_mut(b)?;
        let e = &mut entries.get_mut(w)?.0;
        if *head.tags.get(w)? == 0 || e.kind != EntryKind::Forward || e.link != NO_LINK {
            return None;
        }
        e.link = reverse;
        let expires = e.expires;
        self.vouch(forward, reverse, expires);
        Some(())
    }

    /// The head expiry of the way at `index` after a write that changed its entry from `before`
    /// (kind, link, expiry), for an entry that is or was part of a NAT pair, and the vouch repairs
    /// that write needs (see [`Pairing`]).
    #[cold]
    #[inline(never)]
    fn rewrite_paired(&mut self, index: u32, before: (EntryKind, u32, u32)) {
        let (b, w) = split(index as usize);
        let Some(Bucket { head, entries }) = self.buckets.get_mut(b) else { return };
        let (Some(&x), Some(e)) = (head.expiries.get(w), entries.get(w)) else { return };
        let e = e.0;
        let before = Pairing::from_parts(before.0, before.1, before.2);
        head.set_expiry(w, head_expiry(&e, x, before));
        let after = Pairing::of(&e);
        if before.needs_repair(after) {
            self.repair_vouch(index, before, after);
        }
    }

    /// Keeps the vouch of a forward entry's reverse entry true after the forward entry at `index`
    /// changed from `before` to `after` (see [`Pairing`]): a reverse entry it no longer points at
    /// loses its vouch; the one it points at is vouched for until the forward entry's new expiry when
    /// it is new or that expiry fell (a later expiry leaves the old vouch a true lower bound).
    fn repair_vouch(&mut self, index: u32, before: Pairing, after: Pairing) {
        if let Pairing::Forward { link, .. } = before
            && !matches!(after, Pairing::Forward { link: l, .. } if l == link)
        {
            self.vouch(index, link, 0);
        }
        if let Pairing::Forward { link, expires } = after {
            let new_link = !matches!(before, Pairing::Forward { link: l, .. } if l == link);
            let fell = matches!(before, Pairing::Forward { expires: old, .. } if expires < old);
            if new_link || fell {
                self.vouch(index, link, expires);
            }
        }
    }

    /// Sets the vouch of the reverse entry at `reverse` to `until` if it is a reverse entry paired
    /// with the forward entry at `forward`.
    fn vouch(&mut self, forward: u32, reverse: u32, until: u32) {
        let (b, w) = split(reverse as usize);
        let Some(Bucket { head, entries }) = self.buckets.get_mut(b) else { return };
        // An empty way is in no class.
        if head.class(w) == CLASS_REVERSE && entries.get(w).is_some_and(|e| e.0.link == forward) {
            head.set_expiry(w, until);
        }
    }

    /// True if the entry at `index` is occupied and live at `now`. A reverse entry is live while its
    /// forward entry is live and still points back at it.
    pub fn is_live(&self, index: u32, now: u32) -> bool {
        let (b, w) = split(index as usize);
        let Some(bucket) = self.buckets.get(b) else { return false };
        match bucket.head.tags.get(w) {
            None | Some(0) => false,
            // Before its head expiry (an entry's own, a reverse entry's vouch: see `Pairing`), or a
            // reverse entry whose forward entry answers. (The head expiry first: a vouched reply
            // takes no class test, and the two arms no second compare, ~4 instructions, callgrind.)
            Some(_) => {
                bucket.head.expiries.get(w).is_some_and(|x| now < *x)
                    || (bucket.head.is_reverse(w) && self.forward_is_live(index, now))
            }
        }
    }

    /// The definition of a reverse entry's liveness: its forward entry is live and links back.
    fn forward_is_live(&self, index: u32, now: u32) -> bool {
        let (b, w) = split(index as usize);
        let Some(e) = self.buckets.get(b).and_then(|bucket| bucket.entries.get(w)) else { return false };
        match self.get(e.0.link) {
            Some(f) => f.kind == EntryKind::Forward && f.link == index && !f.is_expired(now),
            None => false,
        }
    }

    /// Removes the entry at `index` and returns it.
    pub fn remove(&mut self, index: u32) -> Option<Entry> {
        let (b, w) = split(index as usize);
        let bucket = self.buckets.get_mut(b)?;
        let tag = bucket.head.tags.get_mut(w)?;
        if *tag == 0 {
            return None;
        }
        *tag = 0;
        bucket.head.clear_class(w);
        self.len -= 1;
        if let Pairing::Forward { link, .. } = Pairing::of(&bucket.entries.get(w)?.0) {
            self.vouch(index, link, 0);
        }
        // Copied from the table once the vouch is done (which leaves this entry alone): a copy
        // taken before it was spilled around the call and read back across its own stores, which
        // the core cannot forward from (a store-forwarding stall a displaced NAT flow).
        self.buckets.get(b)?.entries.get(w).map(|e| e.0)
    }

    /// What the worker's inserts do for a displaced NAT flow's forward entry (at `forward`) and its
    /// reverse entry (at `reverse`): withdraw the vouch (`vouch(forward, reverse, 0)`), as any
    /// insert does, and then, with the displaced entry accounted for, `remove_reverse(reverse,
    /// forward)`; true if it removed. The two looked at the same way twice, one of them in an out
    /// of line call (~15 instructions a new full-NAT flow in a full table, callgrind): here the way
    /// is looked at once. The test `worker_inserts_are_insert_then_remove_reverse` holds it to them.
    #[inline(always)]
    fn unpair(&mut self, reverse: u32, forward: u32) -> bool {
        let (b, w) = split(reverse as usize);
        let Some(Bucket { head, entries }) = self.buckets.get_mut(b) else { return false };
        let (Some(&tag), Some(e)) = (head.tags.get(w), entries.get(w)) else { return false };
        if tag == 0 || e.0.kind != EntryKind::Reverse || e.0.link != forward {
            return false;
        }
        if let (Some(t), Some(x)) = (head.tags.get_mut(w), head.expiries.get_mut(w)) {
            (*t, *x) = (0, 0);
        }
        head.clear_class(w);
        self.len -= 1;
        true
    }

    /// Removes the entry at `reverse` if it is the reverse entry of the forward entry at `forward`
    /// (links back to it); true if it did. What `get` with that test and then `remove` do, with one
    /// look at the way and no copy of the entry: a displaced full-NAT flow's forward entry takes its
    /// reverse entry with it so (~30 instructions a new full-NAT flow in a full table, callgrind).
    #[inline(never)]
    pub(crate) fn remove_reverse(&mut self, reverse: u32, forward: u32) -> bool {
        let (b, w) = split(reverse as usize);
        let Some(Bucket { head, entries }) = self.buckets.get_mut(b) else { return false };
        let (Some(tag), Some(e)) = (head.tags.get_mut(w), entries.get(w)) else { return false };
        if *tag == 0 || e.0.kind != EntryKind::Reverse || e.0.link != forward {
            return false;
        }
        // (A reverse entry vouches for nothing: `remove` would call no `vouch`.)
        *tag = 0;
        head.clear_class(w);
        self.len -= 1;
        true
    }

    /// Inserts `entry` under `entry.key` (which must not be present; the caller looked it up).
    /// Takes an empty way, else an expired one, else evicts as the module docs say.
    pub fn insert(&mut self, entry: Entry, hash: u64, now: u32) -> Result<Inserted, ConntrackFull> {
        self.insert_sparing(entry, hash, now, NO_LINK)
    }

    /// As [`ConntrackTable::insert`], but never displaces the entry at `spare` (the caller's other half
    /// of a pair being inserted, e.g. a NAT flow's forward entry while its reverse entry goes in).
    #[inline]
    pub fn insert_sparing(&mut self, entry: Entry, hash: u64, now: u32, spare: u32) -> Result<Inserted, ConntrackFull> {
        self.insert_into(entry, hash, now, (spare, None), (true, false))
    }

    /// As [`ConntrackTable::insert_sparing`], taking the way `hint` names when it still holds: made by
    /// [`ConntrackTable::likely_insert_hint`] for the same `hash` and `now` (the caller's promise,
    /// checked in debug builds, where the choice is made again and compared) and the bucket's head
    /// unchanged since (its version). A new flow's way choice (~100 instructions) then runs once, in
    /// the warm-up, rather than twice. A displaced NAT flow's forward entry takes its reverse entry
    /// with it, and is reported unlinked (see `ConntrackTable::unpair`).
    #[inline]
    pub(crate) fn insert_hinted(
        &mut self,
        entry: Entry,
        hash: u64,
        now: u32,
        spare: u32,
        hint: Option<InsertHint>,
    ) -> Result<Inserted, ConntrackFull> {
        self.insert_into(entry, hash, now, (spare, hint), (true, true))
    }

    /// Inserts a NAT flow's reverse entry `reverse` (under `hash`, taking the way `hint` names as
    /// [`ConntrackTable::insert_hinted`] does) and links its forward entry (the one its `link`
    /// names, just inserted unlinked, which the insert never displaces) to it, vouched for until
    /// the forward entry's expiry: what `insert_hinted` and then `link_reverse` (tests) do, the
    /// vouch written at the way just filled with no second test of its class and link (~25
    /// instructions a new full-NAT flow, callgrind). A forward entry `link_reverse` would refuse
    /// (an empty way, not a forward entry, linked already) is left alone, and the reverse entry
    /// unvouched, as there. A displaced NAT flow's forward entry takes its reverse entry with it, as
    /// in `insert_hinted`.
    pub(crate) fn insert_reverse(
        &mut self,
        reverse: Entry,
        hash: u64,
        now: u32,
        hint: Option<InsertHint>,
    ) -> Result<Inserted, ConntrackFull> {
        let forward = reverse.link;
        let ins = self.insert_into(reverse, hash, now, (forward, hint), (true, true))?;
        // (The insert spared the forward entry and changed nothing else of its way.)
        let (b, w) = split(forward as usize);
        let Some(Bucket { head, entries }) = self.buckets.get_mut(b) else { return Ok(ins) };
        let Some(e) = entries.get_mut(w) else { return Ok(ins) };
        if *head.tags.get(w).unwrap_or(&0) == 0 || e.0.kind != EntryKind::Forward || e.0.link != NO_LINK {
            return Ok(ins);
        }
        e.0.link = ins.index;
        let expires = e.0.expires;
        // The reverse entry's vouch, at the way just filled (the insert stepped its head version).
        let (b, w) = split(ins.index as usize);
        if let Some(x) = self.buckets.get_mut(b).and_then(|bucket| bucket.head.expiries.get_mut(w)) {
            *x = expires;
        }
        Ok(ins)
    }

    /// As [`ConntrackTable::insert_sparing`], but only into a free way or an expired entry's: it never
    /// evicts a live entry, and fails instead. For what is best effort (a ClientIP affinity record),
    /// which must not cost another flow its entry.
    pub fn insert_without_evicting(
        &mut self,
        entry: Entry,
        hash: u64,
        now: u32,
        spare: u32,
    ) -> Result<Inserted, ConntrackFull> {
        self.insert_into(entry, hash, now, (spare, None), (false, false))
    }

    /// [`ConntrackTable::insert_hinted`], evicting a live entry only when `evict`. A displaced NAT
    /// flow's forward entry withdraws its vouch from its reverse entry; with `unpair`, it takes that
    /// entry with it instead, and is reported unlinked (see `ConntrackTable::unpair`).
    #[inline(always)]
    fn insert_into(
        &mut self,
        entry: Entry,
        hash: u64,
        now: u32,
        (spare, hint): (u32, Option<InsertHint>),
        (evict, unpair): (bool, bool),
    ) -> Result<Inserted, ConntrackFull> {
        let b = (hash as usize) & self.bucket_mask;
        let Some(bucket) = self.buckets.get(b) else { return Err(ConntrackFull) };
        // The head by reference, not copied: a 64-byte copy was ~9 instructions an insert.
        let head = &bucket.head;
        let spare_way = if spare as usize / WAYS == b { spare as usize % WAYS } else { WAYS };
        let choice = match hint {
            Some(h) if h.version == head.version && spare_way == WAYS => {
                let choice = (usize::from(h.way), h.evicted);
                debug_assert_eq!(Self::choose_way(head, now, WAYS, hash), Some(choice), "a stale insert hint");
                Some(choice)
            }
            _ => Self::choose_way(head, now, spare_way, hash),
        };
        let (way, evicted) = match choice {
            Some(choice) => choice,
            None => self.choose_way_with_reverse(b, head, now, spare_way, hash).ok_or(ConntrackFull)?,
        };
        if way >= WAYS || (!evict && evicted == Some(true)) {
            return Err(ConntrackFull);
        }
        let index = b * WAYS + way;
        let Bucket { head, entries } = self.buckets.get_mut(b).ok_or(ConntrackFull)?;
        let Some(e) = entries.get_mut(way) else { return Err(ConntrackFull) };
        let mut displaced = evicted.map(|evicted| Displaced { index: index as u32, entry: e.0, evicted });
        // A reverse entry starts unvouched: its forward entry vouches when it links to it.
        let expiry = if entry.kind == EntryKind::Reverse { 0 } else { entry.expires };
        head.fill(way, tag_of(hash), class_bits(&entry), expiry);
        e.0 = entry;
        if displaced.is_none() {
            self.len += 1;
        }
        if let Some(Pairing::Forward { link, .. }) = displaced.map(|d| Pairing::of(&d.entry)) {
            if !unpair {
                self.vouch(index as u32, link, 0);
            } else if self.unpair(link, index as u32)
                && let Some(d) = &mut displaced
            {
                d.entry.link = NO_LINK;
            }
        }
        Ok(Inserted { index: index as u32, displaced })
    }

    /// The way an insert under `hash` takes and whether it displaces a live entry: an empty way,
    /// the home way if empty (`None`), else an expired one, likewise (`Some(false)`), else the eviction victim
    /// (`Some(true)`); way `WAYS` when nothing may go (full). A reverse entry is never a victim, and
    /// one whose vouch holds (see [`Pairing`]) is live, so it is passed over here. Returns `None`
    /// instead when the bucket is full and holds a reverse entry whose vouch has run out, whose life
    /// is then its forward entry's, in another bucket: [`ConntrackTable::choose_way_with_reverse`]
    /// decides.
    ///
    /// No branch depends on a single way: the head's class bytes are bit sets of ways ([`WayMasks`]),
    /// the live ways another, and the oldest candidate is a minimum over words holding each way's
    /// expiry and index. A pass testing each way in turn (and the sequential scan before it) took
    /// a branch or two a way, which a head of mixed empty, expired and live ways makes
    /// unpredictable: new flows into a half-full table measured ~260 -> ~140 ns with this form
    /// (BENCHMARKS.md, lb-core, session 13).
    ///
    /// A full bucket whose oldest way (of all, reverse ones by their vouch) is live, as in a SYN
    /// flood, holds no expired way nor lapsed vouch: the oldest candidate goes, which is that way
    /// itself when it is a candidate, with no way's liveness worked out and, mostly, no key masked.
    /// (Masking each way's key by the candidates and the live ways was ~100 of a new DSR flow's
    /// ~1 100 instructions, callgrind.) The rest take [`ConntrackTable::choose_way_by_classes`].
    #[inline(always)]
    fn choose_way(head: &BucketHead, now: u32, spare_way: usize, hash: u64) -> Option<(usize, Option<bool>)> {
        let m = WayMasks::of(head);
        // An empty way wins over anything.
        if m.empty != 0 {
            return Some((home_or_first(m.empty, hash), None));
        }
        let oldest = oldest_key(head, WAY_BITS);
        if oldest >> 3 <= u64::from(now) {
            return Self::choose_way_by_classes(head, now, spare_way, hash);
        }
        // Every way is live: the oldest candidate goes, the oldest way itself when it is one.
        let candidates = Self::candidates(&m, spare_way);
        let victim = if candidates & (1 << (oldest & 7)) != 0 { oldest } else { oldest_key(head, candidates) };
        Some((if victim == u64::MAX { WAYS } else { (victim & 7) as usize }, Some(true)))
    }

    /// The ways an eviction may take (see [`ConntrackTable::choose_way`]): the half-open ones but
    /// reverse entries and `spare_way`, else the closing ones.
    #[inline(always)]
    fn candidates(m: &WayMasks, spare_way: usize) -> u32 {
        let others = !m.reverse & !(1u32 << spare_way) & WAY_BITS;
        let half_open = m.half_open & others;
        if half_open != 0 { half_open } else { m.closing & others }
    }

    /// [`ConntrackTable::choose_way`] by each way's class and liveness, for every head.
    #[inline(never)]
    fn choose_way_by_classes(
        head: &BucketHead,
        now: u32,
        spare_way: usize,
        hash: u64,
    ) -> Option<(usize, Option<bool>)> {
        let m = WayMasks::of(head);
        if m.empty != 0 {
            return Some((home_or_first(m.empty, hash), None));
        }
        let live = live_ways(head, now);
        if m.reverse & !live != 0 {
            return None;
        }
        let others = !m.reverse & !(1u32 << spare_way) & WAY_BITS;
        let stale = others & !live;
        if stale != 0 {
            return Some((home_or_first(stale, hash), Some(false)));
        }
        // The oldest live half-open entry, else the oldest live closing one; the first of equals.
        let oldest = oldest_key(head, Self::candidates(&m, spare_way));
        Some((if oldest == u64::MAX { WAYS } else { (oldest & 7) as usize }, Some(true)))
    }

    /// [`ConntrackTable::choose_way`] for a head holding a reverse entry: the sequential scan, which
    /// asks [`ConntrackTable::is_live`] about reverse entries. `None` when nothing may go.
    fn choose_way_with_reverse(
        &self,
        b: usize,
        head: &BucketHead,
        now: u32,
        spare_way: usize,
        hash: u64,
    ) -> Option<(usize, Option<bool>)> {
        let home = home_way(hash);
        if head.tags[home] == 0 {
            return Some((home, None));
        }
        let mut expired = WAYS;
        let mut victim = Victim::NONE;
        for way in 0..WAYS {
            let (t, expires) = (head.tags[way], head.expiries[way]);
            if t == 0 {
                return Some((way, None));
            }
            // Once an expired way is found, only the home way can still beat it.
            if way == spare_way || (expired < WAYS && way != home) {
                continue;
            }
            // `is_live` from the head words already in hand; only a reverse entry whose vouch has run
            // out needs its forward entry (calling `is_live` for every way was a fifth of a new
            // flow's instructions).
            let class = head.class(way);
            let live = if class == CLASS_REVERSE {
                now < expires || self.forward_is_live((b * WAYS + way) as u32, now)
            } else {
                now < expires
            };
            if !live {
                if expired == WAYS || way == home {
                    expired = way;
                }
                continue;
            }
            victim.consider(class, expires, way);
        }
        if expired < WAYS { Some((expired, Some(false))) } else { victim.way().map(|w| (w, Some(true))) }
    }

    /// Reclaims the expired entries of the next bucket (round robin over the table), writing them
    /// to `out` with their indices; returns how many. Reverse entries whose forward entry is gone are
    /// reclaimed too.
    pub fn sweep_bucket(&mut self, now: u32, out: &mut [(u32, Entry); WAYS]) -> usize {
        let b = self.sweep_cursor & self.bucket_mask;
        self.sweep_cursor = self.sweep_cursor.wrapping_add(1);
        // Liveness from a copy of the head, as `choose_way_with_reverse` judges it: only a reverse
        // entry needs its forward entry (`get` and `is_live` for every way cost ~150 instructions a
        // bucket). A removal below clears only its own way's tag, so the copy stays right for the
        // ways after it; a reverse entry is judged after its forward entry's removal, if earlier.
        let Some(bucket) = self.buckets.get(b) else { return 0 };
        // Nearly every sweep finds nothing to reclaim, and every way it reclaims is occupied and at
        // or past its head expiry: one test of the head for such a way first (judging each way
        // below was ~100 instructions a bucket, 4 buckets a burst; callgrind).
        if !bucket.head.any_expired(now) {
            return 0;
        }
        let head = bucket.head;
        let mut n = 0;
        for way in 0..WAYS {
            let (t, expires) = (head.tags[way], head.expiries[way]);
            let idx = (b * WAYS + way) as u32;
            let dead = t != 0
                && if head.class(way) == CLASS_REVERSE {
                    now >= expires && !self.forward_is_live(idx, now)
                } else {
                    now >= expires
                };
            if dead {
                // Forward entries first take their reverse entry with them in the caller; a lone
                // reverse entry is reclaimed here.
                if let (Some(e), Some(slot)) = (self.remove(idx), out.get_mut(n)) {
                    *slot = (idx, e);
                    n += 1;
                }
            }
        }
        n
    }

    /// Every occupied entry with its index (for the control side and tests; not the fast path).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Entry)> + '_ {
        self.buckets.iter().enumerate().flat_map(|(b, bucket)| {
            bucket
                .head
                .tags
                .iter()
                .zip(&bucket.entries)
                .enumerate()
                .filter(|(_, (t, _))| **t != 0)
                .map(move |(w, (_, e))| ((b * WAYS + w) as u32, &e.0))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    use super::*;
    use alloc::format;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// The seed of the tests' tables and hashes: not 0, so they hold under a seed.
    const SEED: ConntrackSeed = ConntrackSeed::new(0x0123_4567_89ab_cdef);

    proptest::proptest! {
        /// `any_expired` is true exactly when some way is occupied and at or past its head expiry
        /// (what `sweep_bucket` requires of every way it reclaims, so its early return loses none),
        /// for any tags, expiries and `now`, around each expiry.
        #[test]
        fn any_expired_is_some_occupied_way_at_or_past_its_expiry(
            ways in proptest::collection::vec((proptest::prelude::any::<bool>(), 0u32..8, proptest::prelude::any::<u32>()), WAYS),
            (pick, offset) in (0usize..WAYS, 0u32..3),
        ) {
            let mut head = BucketHead::default();
            for (w, (occupied, small, expiry)) in ways.iter().enumerate() {
                head.tags[w] = if *occupied { (*small as u16) * 2 + 1 } else { 0 };
                // Small expiries half the time, so `now` below often lands on and around them.
                head.expiries[w] = if *small % 2 == 0 { *small } else { *expiry };
            }
            for now in [0, u32::MAX, head.expiries[pick].wrapping_add(offset).wrapping_sub(1)] {
                let want = (0..WAYS).any(|w| head.tags[w] != 0 && now >= head.expiries[w]);
                proptest::prop_assert_eq!(head.any_expired(now), want, "now {}", now);
            }
        }

        /// `ConnKey`'s `==` (ports and protocol-and-flags compared as words) is field-by-field
        /// equality: for any key against itself, against the key with any one bit of any one field
        /// flipped, and against the key with its ports or its protocol and flags swapped.
        #[test]
        fn conn_key_eq_is_field_equality(
            (src, dst) in (proptest::prelude::any::<[u8; 16]>(), proptest::prelude::any::<[u8; 16]>()),
            (sport, dport, proto, flags) in (proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>(), proptest::prelude::any::<u8>()),
            (field, bit) in (0usize..8, 0usize..128),
        ) {
            let fields = |k: &ConnKey| (k.src, k.dst, k.sport, k.dport, k.proto, k.flags);
            let a = ConnKey { src, dst, sport, dport, proto, flags };
            let mut b = a;
            match field {
                0 => b.src[bit / 8] ^= 1 << (bit % 8),
                1 => b.dst[bit / 8] ^= 1 << (bit % 8),
                2 => b.sport ^= 1 << (bit % 16),
                3 => b.dport ^= 1 << (bit % 16),
                4 => b.proto ^= 1 << (bit % 8),
                5 => b.flags ^= 1 << (bit % 8),
                6 => (b.sport, b.dport) = (a.dport, a.sport),
                _ => (b.proto, b.flags) = (a.flags, a.proto),
            }
            proptest::prop_assert!(a == a);
            proptest::prop_assert_eq!(a == b, fields(&a) == fields(&b));
            proptest::prop_assert_eq!(b == a, fields(&a) == fields(&b));
        }

        /// `WayMasks::of`'s occupied ways (the class bytes summed) are the class bytes ORed, on any
        /// head the class writes make (fills, moves between classes, emptied ways).
        #[test]
        fn occupied_ways_are_the_class_bytes_ored(ops in proptest::collection::vec((0usize..WAYS, 0u16..5), 0..40)) {
            let mut head = BucketHead::default();
            for (w, c) in ops {
                if c == 4 { head.clear_class(w) } else { head.set_class(w, c) }
                let x = head.classes;
                let ored = (x | x >> 8 | x >> 16 | x >> 24) & WAY_BITS;
                proptest::prop_assert_eq!(WayMasks::of(&head).empty, !ored & WAY_BITS, "classes {:#x}", x);
            }
        }

        /// `holds_tag` (the eight compares at once) is whether the search in way order finds the
        /// tag, for heads whose tags are drawn from a few values (so most tags asked for are held,
        /// by one way or several, at any way) and for any tag.
        #[test]
        fn holds_tag_is_a_way_with_the_tag(
            tags in proptest::prelude::any::<[u16; WAYS]>(),
            few in proptest::collection::vec(0u16..4, WAYS),
            tag in 0u16..4,
            any_tag in proptest::prelude::any::<u16>(),
        ) {
            for tags in [tags, core::array::from_fn(|w| few[w])] {
                let head = BucketHead { tags, ..BucketHead::default() };
                for t in [tag, any_tag, tags[usize::from(tag) % WAYS]] {
                    let found = head.tags.iter().position(|x| *x == t).is_some();
                    proptest::prop_assert_eq!(head.holds_tag(t), found, "tag {} in {:?}", t, tags);
                }
            }
        }

        /// `is_reverse` answers as `class(w) == CLASS_REVERSE` for every way of any head the class
        /// writes make (fills, moves between classes, emptied ways).
        #[test]
        fn is_reverse_is_the_class_test(ops in proptest::collection::vec((0usize..WAYS, 0u16..5), 0..40)) {
            let mut head = BucketHead::default();
            for (w, c) in ops {
                if c == 4 { head.clear_class(w) } else { head.set_class(w, c) }
                for v in 0..WAYS {
                    proptest::prop_assert_eq!(head.is_reverse(v), head.class(v) == CLASS_REVERSE, "way {}", v);
                }
            }
        }

        /// A key's hash made in two parts, its addresses' [`AddrsHash`] (kept for keys that differ
        /// past them) finished with the rest, is the whole key's hash, for any key of either family
        /// (IPv4-mapped addresses or any 16 bytes, the IPv6 flag set or not, an affinity record's).
        #[test]
        fn addrs_hash_finished_is_the_key_hash(
            (src, dst) in (proptest::prelude::any::<[u8; 16]>(), proptest::prelude::any::<[u8; 16]>()),
            (v4, src4, dst4) in (proptest::prelude::any::<bool>(), proptest::prelude::any::<u32>(), proptest::prelude::any::<u32>()),
            (sport, dport, proto, flags) in (proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>(), 0u8..4),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let seed = ConntrackSeed::new(seed);
            let (src, dst) = if v4 {
                (Ipv4Addr::from(src4).to_ipv6_mapped().octets(), Ipv4Addr::from(dst4).to_ipv6_mapped().octets())
            } else {
                (src, dst)
            };
            let flags = if v4 { flags & !FLAG_V6 } else { flags | FLAG_V6 };
            let k = ConnKey { src, dst, sport, dport, proto, flags };
            proptest::prop_assert_eq!(AddrsHash::of(seed, &src, &dst).finish(sport, dport, proto, flags), k.hash(seed));
            // The same from the addresses as a flow's key holds them (`ConnKey::flow`).
            let f = ConnKey::flow(k.src_ip(), k.dst_ip(), sport, dport, proto);
            proptest::prop_assert_eq!(AddrsHash::flow(seed, k.src_ip(), k.dst_ip()).finish(sport, dport, proto, f.flags), f.hash(seed));
            // And with the source port and flags folded in first, any part of them.
            let (sport_in, flags_in) = (sport & src4 as u16, flags & dst4 as u8);
            let early = AddrsHash::of(seed, &src, &dst).with(sport_in, flags_in);
            proptest::prop_assert_eq!(early.finish(sport ^ sport_in, dport, proto, flags ^ flags_in), k.hash(seed));
        }

        /// `update_linked` is, for a reverse entry, `is_live`, `get`'s link, `update` and `get` in
        /// one, and `None` for any other index: on twin tables given the same NAT pairs, expiry
        /// writes, unlinks, removals of either half and time steps, a write through any index
        /// (reverse entries, forward entries, empty ways, none) that moves the state and the expiry
        /// either way gives the same answer and leaves the same table.
        #[test]
        fn update_linked_is_is_live_get_update_get(
            ops in proptest::collection::vec((0u8..7, 0u32..12, 0u32..8, 0u8..8), 1..150),
        ) {
            let (mut a, mut b) = (ConntrackTable::with_capacity(2 * WAYS, SEED), ConntrackTable::with_capacity(2 * WAYS, SEED));
            let mut now = 0u32;
            for (op, n, x, s) in ops {
                let state = ConnState::ALL[usize::from(s) % ConnState::ALL.len()];
                let (fk, rk) = (key(n), key(n + 100));
                for t in [&mut a, &mut b] {
                    let forward = t.find(&fk, fk.hash(SEED));
                    match op {
                        0 if forward.is_none() && t.find(&rk, rk.hash(SEED)).is_none() => {
                            nat_pair(t, (fk, rk), (now + x, now + x), now);
                        }
                        1 => {
                            forward.map(|i| t.update(i, |e| e.expires = now + x));
                        }
                        2 => {
                            forward.map(|i| t.update(i, |e| e.link = NO_LINK));
                        }
                        3 => {
                            forward.map(|i| t.remove(i));
                        }
                        4 => {
                            t.find(&rk, rk.hash(SEED)).map(|i| t.remove(i));
                        }
                        _ => {}
                    }
                }
                match op {
                    5 => {
                        let index = if x == 7 { NO_LINK } else { (n + 12 * x) % (2 * WAYS as u32) };
                        let write = |e: &mut Entry| {
                            e.state = state;
                            e.expires = now + x;
                            e.backend
                        };
                        let fast = a.update_linked(index, now, write).map(|(r, e)| (r, *e));
                        let reverse = b.get(index).is_some_and(|e| e.kind == EntryKind::Reverse);
                        let slow = if reverse && b.is_live(index, now) {
                            let link = b.get(index).map(|e| e.link);
                            link.and_then(|l| b.update(l, write).and_then(|r| b.get(l).map(|e| (r, *e))))
                        } else {
                            None
                        };
                        proptest::prop_assert_eq!(fast, slow);
                    }
                    6 => now += x,
                    _ => {}
                }
                proptest::prop_assert_eq!(format!("{:?}", a.buckets), format!("{:?}", b.buckets));
            }
        }

        /// A reverse entry's vouch (see `Pairing`) never says live what the definition (its forward
        /// entry live and linked back) does not: NAT pairs made as the worker makes them, forward
        /// expiries that rise and fall, unlinks, removals of either half, lone inserts that
        /// displace, sweeps and time steps, on a two-bucket table, checked after every step, and
        /// `is_live` answers for every way as that definition (an entry's own expiry for the rest)
        /// does. (Fails when a removal, a displacement, an unlink or a falling expiry leaves the
        /// vouch alone, or when `is_live` takes a reverse entry's lapsed vouch for its answer.)
        #[test]
        fn a_vouch_never_outlives_its_forward_entry(
            ops in proptest::collection::vec((0u8..8, 0u32..12, 0u32..8), 1..200),
        ) {
            let mut t = ConntrackTable::with_capacity(2 * WAYS, SEED);
            let mut now = 0u32;
            let mut out = [(0u32, Entry::default()); WAYS];
            let forward = |t: &ConntrackTable, n: u32| t.find(&key(n), key(n).hash(SEED));
            for (op, n, x) in ops {
                match op {
                    0 => {
                        let (fk, rk) = (key(n), key(n + 100));
                        if forward(&t, n).is_none() && t.find(&rk, rk.hash(SEED)).is_none() {
                            nat_pair(&mut t, (fk, rk), (now + x, now + x), now);
                        }
                    }
                    1 => {
                        if let Some(i) = forward(&t, n) {
                            t.update(i, |e| e.expires = now + x);
                        }
                    }
                    2 => {
                        t.find_update(
                            &key(n),
                            key(n).hash(SEED),
                            |e| {
                                e.expires = now + x;
                                Some(())
                            },
                            &mut NO_LINK.clone(),
                        );
                    }
                    3 => {
                        if let Some(i) = forward(&t, n) {
                            t.update(i, |e| e.link = NO_LINK);
                        }
                    }
                    4 => {
                        if let Some(i) = forward(&t, n) {
                            t.remove(i);
                        }
                    }
                    5 => {
                        let rk = key(n + 100);
                        if let Some(i) = t.find(&rk, rk.hash(SEED)) {
                            t.remove(i);
                        }
                    }
                    6 => {
                        let k = key(n + 200);
                        if t.find(&k, k.hash(SEED)).is_none() {
                            let _ = t.insert(entry(k, ConnState::SynSeen, now + x), k.hash(SEED), now);
                        }
                        t.sweep_bucket(now, &mut out);
                    }
                    _ => now += x,
                }
                for (b, bucket) in t.buckets.iter().enumerate() {
                    for w in 0..WAYS {
                        let (tag, vouch) = (bucket.head.tags[w], bucket.head.expiries[w]);
                        let index = (b * WAYS + w) as u32;
                        // Liveness by its definition: a reverse entry's is its forward entry's.
                        let live = tag != 0
                            && if bucket.head.class(w) == CLASS_REVERSE {
                                t.forward_is_live(index, now)
                            } else {
                                !bucket.entries[w].0.is_expired(now)
                            };
                        proptest::prop_assert_eq!(t.is_live(index, now), live, "way {} at {}", index, now);
                        if tag != 0 && bucket.head.class(w) == CLASS_REVERSE && now < vouch {
                            proptest::prop_assert!(
                                t.forward_is_live(index, now),
                                "way {} vouched until {} at {}",
                                index,
                                vouch,
                                now
                            );
                        }
                    }
                }
            }
        }

        /// The one-pass choice agrees with the sequential scan on every head it decides (same way,
        /// same displacement, same refusal), and leaves to the scan exactly the full heads holding a
        /// reverse entry whose vouch has run out.
        #[test]
        fn one_pass_way_choice_matches_the_sequential_scan(
            ways in proptest::collection::vec((0u16..5, 0u32..6, proptest::prelude::any::<u16>()), WAYS),
            now in 0u32..6,
            spare_way in 0usize..=WAYS,
            hash in proptest::prelude::any::<u64>(),
        ) {
            let mut head = BucketHead::default();
            for (way, &(class, expires, bits)) in ways.iter().enumerate() {
                // 3 stands for an empty way here, 4 for a reverse entry vouched for until `expires`
                // (the table below holds no forward entries: once its vouch runs out, it is dead).
                match class {
                    3 => {}
                    4 => head.fill(way, bits | 1, CLASS_REVERSE, expires),
                    _ => head.fill(way, bits | 1, class, expires),
                }
            }
            let table = ConntrackTable::with_capacity(WAYS, SEED);
            let slow = table.choose_way_with_reverse(0, &head, now, spare_way, hash);
            let full = ways.iter().all(|&(class, ..)| class != 3);
            let lapsed = ways.iter().any(|&(class, expires, _)| class == 4 && now >= expires);
            match ConntrackTable::choose_way(&head, now, spare_way, hash) {
                Some(fast) => {
                    proptest::prop_assert!(!(full && lapsed));
                    proptest::prop_assert_eq!(Some(fast).filter(|(w, _)| *w < WAYS), slow);
                }
                None => proptest::prop_assert!(full && lapsed),
            }
        }

        /// The oldest-way shortcut of `choose_way` agrees with the choice by classes and liveness
        /// on full heads of every mix of half-open, closing, established and reverse ways, expiries
        /// (ties among them) and spare ways.
        #[test]
        fn oldest_way_shortcut_matches_the_choice_by_classes(
            ways in proptest::collection::vec((0u16..4, 0u32..8), WAYS),
            now in 0u32..8,
            spare_way in 0usize..=WAYS,
            hash in proptest::prelude::any::<u64>(),
        ) {
            let mut head = BucketHead::default();
            for (way, &(class, expires)) in ways.iter().enumerate() {
                head.fill(way, 1, class, expires);
            }
            proptest::prop_assert_eq!(
                ConntrackTable::choose_way(&head, now, spare_way, hash),
                ConntrackTable::choose_way_by_classes(&head, now, spare_way, hash)
            );
        }

        /// `likely_insert` names the way an insert then takes and whether it displaces an entry, for
        /// a bucket of any mix of free, expired, half-open, closing and established ways.
        #[test]
        fn likely_insert_names_the_way_an_insert_takes(
            ways in proptest::collection::vec((0u8..4, 0u32..6), 0..=WAYS),
            now in 0u32..6,
            n in 1000u32..,
        ) {
            let mut t = ConntrackTable::with_capacity(WAYS, SEED); // one bucket
            for (i, &(class, expires)) in ways.iter().enumerate() {
                let state = [ConnState::SynSeen, ConnState::Closing, ConnState::Affinity, ConnState::Established];
                let k = key(i as u32);
                // At most eight entries into eight ways: each takes a free one.
                let ins = t.insert(entry(k, state[usize::from(class)], expires), k.hash(SEED), 0).unwrap();
                proptest::prop_assert!(ins.displaced.is_none());
            }
            let k = key(n);
            let likely = t.likely_insert(k.hash(SEED), now).map(|(e, displaces)| (e as *const Entry, displaces));
            match t.insert(entry(k, ConnState::SynSeen, now + 60), k.hash(SEED), now) {
                Ok(ins) => {
                    let taken = t.get(ins.index).map(|e| e as *const Entry);
                    proptest::prop_assert_eq!(likely, taken.map(|e| (e, ins.displaced.is_some())));
                }
                Err(ConntrackFull) => proptest::prop_assert_eq!(likely, None),
            }
        }

        /// Any sequence of inserts (some displacing), removals, in-place updates (by key and by
        /// index) and sweeps keeps the table in step with a model: an occupied way's head mirrors its
        /// entry's class and expiry (eviction and sweeping read only the head, and an update rewrites
        /// the class only when the state changed); every key the model holds is found at the
        /// index its insert returned, every key it dropped is not; the count agrees.
        #[test]
        fn lookups_and_heads_agree_with_a_model(
            ops in proptest::collection::vec((0u8..6, 0u32..40, 0u32..8, 0u8..8), 1..300),
        ) {
            let mut t = ConntrackTable::with_capacity(4 * WAYS, SEED);
            // The model: the index each of the 40 keys is at, if present.
            let mut model = [None::<u32>; 40];
            let number_of = |k: &ConnKey| (0..40).position(|m| key(m) == *k).unwrap();
            let mut now = 0u32;
            for (op, n, x, s) in ops {
                let k = key(n);
                let h = k.hash(SEED);
                let state = ConnState::ALL[usize::from(s) % ConnState::ALL.len()];
                match op {
                    0 if model[n as usize].is_none() => {
                        if let Ok(ins) = t.insert(entry(k, state, now + x), h, now) {
                            if let Some(d) = ins.displaced {
                                proptest::prop_assert_eq!(model[number_of(&d.entry.key)].take(), Some(d.index));
                            }
                            model[n as usize] = Some(ins.index);
                        }
                    }
                    1 => {
                        if let Some(i) = model[n as usize].take() {
                            proptest::prop_assert_eq!(t.remove(i).map(|e| e.key), Some(k));
                        }
                    }
                    2 => {
                        // Declined, it gives the index `find` gives, and changes nothing.
                        let mut declined = NO_LINK;
                        proptest::prop_assert!(t.find_update(&k, h, |_| None::<()>, &mut declined).is_none());
                        proptest::prop_assert_eq!((declined != NO_LINK).then_some(declined), model[n as usize]);
                        let mut declined = NO_LINK;
                        let r = t.find_update(
                            &k,
                            h,
                            |e| {
                                e.state = state;
                                e.expires = now + x;
                                Some(())
                            },
                            &mut declined,
                        );
                        proptest::prop_assert_eq!(r.map(|(i, ())| i), model[n as usize]);
                        proptest::prop_assert_eq!(declined, NO_LINK);
                    }
                    5 => {
                        // An in-place write by index, as a NAT reply's to its forward entry.
                        let r = model[n as usize].and_then(|i| {
                            t.update(i, |e| {
                                e.state = state;
                                e.expires = now + x;
                            })
                        });
                        proptest::prop_assert_eq!(r.is_some(), model[n as usize].is_some());
                    }
                    3 => {
                        // A sweep takes exactly the expired entries of its bucket.
                        let mut out = [(0u32, Entry::default()); WAYS];
                        let b = t.sweep_cursor & t.bucket_mask;
                        let expired = (0..40u32)
                            .filter(|&m| model[m as usize].is_some_and(|i| i as usize / WAYS == b))
                            .filter(|&m| t.get(model[m as usize].unwrap()).unwrap().is_expired(now))
                            .count();
                        let swept = t.sweep_bucket(now, &mut out);
                        proptest::prop_assert_eq!(swept, expired);
                        for (i, e) in &out[..swept] {
                            proptest::prop_assert!(e.is_expired(now));
                            proptest::prop_assert_eq!(model[number_of(&e.key)].take(), Some(*i));
                        }
                    }
                    _ => now += x,
                }
                for bucket in t.buckets.iter() {
                    for w in 0..WAYS {
                        let (tag, e) = (bucket.head.tags[w], &bucket.entries[w].0);
                        if tag != 0 {
                            proptest::prop_assert_eq!(bucket.head.class(w), class_bits(e));
                            proptest::prop_assert_eq!(bucket.head.expiries[w], e.expires);
                        } else {
                            proptest::prop_assert_eq!((bucket.head.classes >> w) & CLASS_LANES, 0, "empty way {} in a class", w);
                        }
                    }
                }
                for n in 0..40 {
                    let k = key(n);
                    proptest::prop_assert_eq!(t.find(&k, k.hash(SEED)), model[n as usize], "key {}", n);
                }
                proptest::prop_assert_eq!(t.len(), model.iter().flatten().count());
            }
        }
    }

    proptest::proptest! {
        /// Hints taken ahead (`likely`, `likely_new`), held while other keys' flows go in and out of
        /// the same buckets, change no outcome: on twin tables given the same steps, one finds and
        /// inserts with the hints it took last (the worker's `find_hinted`, `insert_hinted` and
        /// `insert_reverse`), the other with none (`find`, then the general insert, unpairing and
        /// link), and both give the same answers and keep the same entries, tags, head expiries
        /// (vouches) and classes. The steps: NAT flows and lone flows of any state and expiry
        /// (some expired at the time, some never live), each found first as the worker does;
        /// removals; expiry writes; sweeps; hints taken for every key at once; time steps (after
        /// which the hints are dropped: a hint holds for its time only). Two buckets, so most
        /// hints go stale and many inserts evict or take expired ways. (Fails when a hint outlives
        /// a write to its bucket's head: a displaced NAT flow's reverse entry removed, a way
        /// filled or emptied.)
        #[test]
        fn stale_hints_change_nothing(
            ops in proptest::collection::vec((0u8..7, 0u32..16, 0u32..12, 0u8..8), 1..200),
        ) {
            let (mut a, mut b) = (ConntrackTable::with_capacity(2 * WAYS, SEED), ConntrackTable::with_capacity(2 * WAYS, SEED));
            // Per key (16 flows' forward keys, then their reply keys), the hint `a` took for it.
            let mut hints = [None::<InsertHint>; 32];
            let mut now = 5u32;
            let mut out = [(0u32, Entry::default()); WAYS];
            let k = |n: u32| key(n * 7 + 3);
            for (op, n, x, s) in ops {
                let state = ConnState::ALL[usize::from(s) % ConnState::ALL.len()];
                let (fk, rk) = (k(n), k(n + 16));
                let (fh, rh) = (fk.hash(SEED), rk.hash(SEED));
                // Expiries from before now (expired) to well after it.
                let expires = now + x - 4;
                match op {
                    0 | 1 => {
                        let found = a.find_hinted(&fk, fh, hints[n as usize]);
                        proptest::prop_assert_eq!(found, b.find(&fk, fh));
                        if found.is_some() {
                            continue;
                        }
                        let e = entry(fk, state, expires);
                        let fast = a.insert_hinted(e, fh, now, NO_LINK, hints[n as usize]);
                        let (general, _) = general_worker_insert(&mut b, e, fh, now, NO_LINK);
                        proptest::prop_assert_eq!(fast, general);
                        // A NAT flow: its reverse entry, if its reply key is free, linked.
                        if let (Ok(f), 1) = (fast, op) {
                            let found = a.find_hinted(&rk, rh, hints[n as usize + 16]);
                            proptest::prop_assert_eq!(found, b.find(&rk, rh));
                            if found.is_none() {
                                let r = Entry { kind: EntryKind::Reverse, link: f.index, ..entry(rk, state, expires) };
                                let fast = a.insert_reverse(r, rh, now, hints[n as usize + 16]);
                                let (general, _) = general_worker_insert(&mut b, r, rh, now, f.index);
                                proptest::prop_assert_eq!(fast, general);
                                if let Ok(r) = general {
                                    b.link_reverse(f.index, r.index);
                                }
                            }
                        }
                    }
                    2 => {
                        for t in [&mut a, &mut b] {
                            if let Some(i) = t.find(&fk, fh) {
                                t.remove(i);
                            }
                        }
                    }
                    3 => {
                        for t in [&mut a, &mut b] {
                            if let Some(i) = t.find(&fk, fh) {
                                t.update(i, |e| (e.state, e.expires) = (state, expires));
                            }
                        }
                    }
                    4 => {
                        let (x, y) = (a.sweep_bucket(now, &mut out), b.sweep_bucket(now, &mut out));
                        proptest::prop_assert_eq!(x, y);
                    }
                    5 => {
                        for (m, hint) in hints.iter_mut().enumerate() {
                            let h = k(m as u32).hash(SEED);
                            let likely = if m < 16 { a.likely(h, now) } else { a.likely_new(h, now) };
                            *hint = match likely {
                                Likely::Insert { hint, .. } => Some(hint),
                                _ => None,
                            };
                        }
                    }
                    _ => {
                        now += x % 3;
                        hints = [None; 32];
                    }
                }
                proptest::prop_assert_eq!(a.len, b.len);
                for (x, y) in a.buckets.iter().zip(b.buckets.iter()) {
                    proptest::prop_assert_eq!(
                        (x.head.tags, x.head.expiries, x.head.classes),
                        (y.head.tags, y.head.expiries, y.head.classes)
                    );
                    for (e, g) in x.entries.iter().zip(y.entries.iter()) {
                        proptest::prop_assert_eq!(e.0, g.0);
                    }
                }
            }
        }
    }

    fn key(n: u32) -> ConnKey {
        ConnKey::flow(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            (n % 60000) as u16 + 1024,
            80,
            6,
        )
    }

    fn entry(k: ConnKey, state: ConnState, expires: u32) -> Entry {
        Entry { key: k, state, expires, link: NO_LINK, ..Entry::default() }
    }

    /// A NAT pair made as the worker makes it: the forward entry under `fk`, the reverse entry under
    /// `rk` pointing at it (never displacing it), then the forward entry's link. Their indices, or
    /// `None` if either insert found no room (a forward entry already in stays).
    fn nat_pair(
        t: &mut ConntrackTable,
        (fk, rk): (ConnKey, ConnKey),
        (fx, rx): (u32, u32),
        now: u32,
    ) -> Option<(u32, u32)> {
        let f = t.insert(entry(fk, ConnState::SynSeen, fx), fk.hash(SEED), now).ok()?.index;
        let mut r = entry(rk, ConnState::SynSeen, rx);
        r.kind = EntryKind::Reverse;
        r.link = f;
        let r = t.insert_sparing(r, rk.hash(SEED), now, f).ok()?.index;
        t.link_reverse(f, r)?;
        Some((f, r))
    }

    /// `v4_addrs` holds a key's addresses exactly when `src_ip` and `dst_ip` are both IPv4, and
    /// then holds theirs: for IPv4 and IPv6 keys, IPv4-mapped IPv6 keys, and IPv4 keys with any one
    /// byte of either address's mapped prefix changed.
    #[test]
    fn v4_addrs_are_both_addresses_when_ipv4() {
        let v4 = |a: [u8; 4]| IpAddr::V4(a.into());
        let mut keys = alloc::vec![
            ConnKey::flow(v4([10, 0, 0, 1]), v4([192, 0, 2, 1]), 40000, 80, 6),
            ConnKey::flow(v4([255, 255, 255, 255]), v4([0, 0, 0, 0]), 1, 2, 17),
            ConnKey::flow(IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST), 1, 2, 6),
            ConnKey::flow(
                IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()),
                IpAddr::V6(Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped()),
                1,
                2,
                6,
            ),
        ];
        for at in 0..12 {
            for dst in [false, true] {
                let mut k = keys[0];
                let a = if dst { &mut k.dst } else { &mut k.src };
                a[at] ^= 0x21;
                keys.push(k);
            }
        }
        for k in keys {
            let both = match (k.src_ip(), k.dst_ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => Some((s.octets(), d.octets())),
                _ => None,
            };
            assert_eq!(k.v4_addrs(), both, "{k:?}");
        }
    }

    /// An insert hint's fields fill its eight bytes, with no padding between or after them (see
    /// `InsertHint::zero`), and an `Option` of one is no bigger.
    #[test]
    fn insert_hint_is_one_word_without_padding() {
        use core::mem::{offset_of, size_of};
        let mut fields = [
            (offset_of!(InsertHint, version), size_of::<u32>()),
            (offset_of!(InsertHint, way), size_of::<u8>()),
            (offset_of!(InsertHint, evicted), size_of::<Option<bool>>()),
            (offset_of!(InsertHint, zero), size_of::<u16>()),
        ];
        fields.sort_unstable();
        let end = fields.iter().try_fold(0, |at, &(offset, size)| (offset == at).then_some(at + size));
        assert_eq!(end, Some(size_of::<InsertHint>()), "fields at {fields:?}");
        assert_eq!(size_of::<InsertHint>(), 8);
        assert_eq!(size_of::<Option<InsertHint>>(), 8);
    }

    #[test]
    fn entry_fits_a_cache_line() {
        assert!(core::mem::size_of::<Entry>() <= 64, "Entry is {} bytes", core::mem::size_of::<Entry>());
        // A bucket is its head line plus one line per way, each line-aligned.
        assert_eq!(core::mem::size_of::<BucketHead>(), 64);
        assert_eq!(core::mem::size_of::<Way>(), 64);
        assert_eq!(core::mem::size_of::<Bucket>(), 64 * (WAYS + 1));
        assert_eq!(core::mem::align_of::<Bucket>(), 64);
    }

    #[test]
    fn all_states_are_listed_in_repr_order() {
        for (i, s) in ConnState::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn key_round_trips_addresses_of_both_families() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9));
        let k = ConnKey::flow(v4, v4, 1, 2, 17);
        assert_eq!(k.src_ip(), v4);
        let k6 = ConnKey::flow(v6, v6, 1, 2, 17);
        assert_eq!(k6.dst_ip(), v6);
        assert_ne!(k.hash(SEED), ConnKey::flow(v4, v4, 2, 1, 17).hash(SEED));
    }

    #[test]
    fn insert_find_remove() {
        let mut t = ConntrackTable::with_capacity(64, SEED);
        assert_eq!(t.capacity(), 64);
        let k = key(1);
        let ins = t.insert(entry(k, ConnState::Established, 100), k.hash(SEED), 0).unwrap();
        assert_eq!(ins.displaced, None);
        assert_eq!(t.find(&k, k.hash(SEED)), Some(ins.index));
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(ins.index).unwrap().key, k);
        assert_eq!(t.find(&k, k.hash(SEED)), None);
        assert!(t.is_empty());
    }

    #[test]
    fn expired_way_is_reused_and_reported() {
        let mut t = ConntrackTable::with_capacity(8, SEED); // one bucket
        for n in 0..8 {
            let k = key(n);
            t.insert(entry(k, ConnState::Established, 10 + n), k.hash(SEED), 0).unwrap();
        }
        let k = key(100);
        let ins = t.insert(entry(k, ConnState::SynSeen, 60), k.hash(SEED), 11).unwrap();
        let d = ins.displaced.unwrap();
        assert!(!d.evicted);
        assert!(d.entry.expires <= 11, "reused a live entry: {d:?}");
        assert_eq!(t.len(), 8);
    }

    #[test]
    fn syn_flood_never_evicts_established() {
        // One bucket: 6 established flows and a flood of SYNs from other clients.
        let mut t = ConntrackTable::with_capacity(8, SEED);
        for n in 0..6 {
            let k = key(n);
            t.insert(entry(k, ConnState::Established, 1000), k.hash(SEED), 0).unwrap();
        }
        for n in 1000..3000 {
            let k = key(n);
            let ins = t.insert(entry(k, ConnState::SynSeen, 60 + n), k.hash(SEED), 1).unwrap();
            if let Some(d) = ins.displaced {
                assert_eq!(d.entry.state, ConnState::SynSeen, "a SYN pushed out {d:?}");
            }
        }
        for n in 0..6 {
            let k = key(n);
            assert!(t.find(&k, k.hash(SEED)).is_some(), "established flow {n} was evicted");
        }
    }

    /// Keys a sender picked offline to share one bucket of the unseeded hash (sources of one IPv6
    /// /64 to one service) fill that bucket in an unseeded table, and a ninth cannot go in; in a
    /// seeded table they spread, every one goes in and is found under the table's hash. The same
    /// key hashes apart under two seeds, and a seed's `Debug` does not show it.
    #[test]
    fn a_seed_spreads_keys_aimed_at_one_bucket() {
        let buckets = 1024;
        let vip = IpAddr::V6("2001:db8::80".parse().unwrap());
        let aimed: alloc::vec::Vec<ConnKey> = (0u128..)
            .map(|n| ConnKey::flow(IpAddr::V6(Ipv6Addr::from((0x2001_0db8_0bad_0001 << 64) | n)), vip, 40000, 443, 6))
            .filter(|k| (k.hash(ConntrackSeed::UNSEEDED) as usize).is_multiple_of(buckets))
            .take(64)
            .collect();
        let mut unseeded = ConntrackTable::with_capacity(buckets * WAYS, ConntrackSeed::UNSEEDED);
        let inserted = aimed
            .iter()
            .take_while(|k| unseeded.insert(entry(**k, ConnState::Established, 100), unseeded.hash(k), 0).is_ok())
            .count();
        assert_eq!(inserted, WAYS, "the aimed keys share one bucket unseeded");
        let mut t = ConntrackTable::with_capacity(buckets * WAYS, SEED);
        assert_eq!(t.seed(), SEED);
        let mut per_bucket = alloc::vec![0; buckets];
        for k in &aimed {
            per_bucket[(t.hash(k) as usize) % buckets] += 1;
            let i = t.insert(entry(*k, ConnState::Established, 100), t.hash(k), 0).unwrap().index;
            assert_eq!(t.find(k, t.hash(k)), Some(i));
        }
        assert!(per_bucket.iter().all(|&n| n <= 4), "the aimed keys spread: {per_bucket:?}");
        assert!(aimed.iter().all(|k| t.find(k, t.hash(k)).is_some()), "each found after all went in");
        let other = ConntrackSeed::new(0x0123_4567_89ab_cdee);
        assert!(aimed.iter().all(|k| k.hash(SEED) != k.hash(other) && k.hash(SEED) != k.hash(ConntrackSeed::UNSEEDED)));
        let shown = format!("{SEED:?} {:?}", crate::service::TableBuilder::new().with_conntrack_seed(SEED));
        assert!(!shown.contains("89ab") && !shown.contains("81985529216486895"), "{shown}");
    }

    /// `key` with `d` XORed into word `word` of its hash's input: 0 and 1 the source address's
    /// first and last eight bytes (little-endian, as `ConnKey::hash` reads them), 2 and 3 the
    /// destination's, 4 the ports, protocol and flags as `hash_tail` lays them out (`d` below 1 << 48).
    fn with_word_flipped(mut key: ConnKey, word: usize, d: u64) -> ConnKey {
        let flip = |a: &mut [u8; 16], at: usize| {
            for (b, x) in a[at..at + 8].iter_mut().zip(d.to_le_bytes()) {
                *b ^= x;
            }
        };
        match word {
            0 => flip(&mut key.src, 0),
            1 => flip(&mut key.src, 8),
            2 => flip(&mut key.dst, 0),
            3 => flip(&mut key.dst, 8),
            _ => {
                key.sport ^= (d >> 32) as u16;
                key.dport ^= (d >> 16) as u16;
                key.proto ^= (d >> 8) as u8;
                key.flags ^= d as u8;
            }
        }
        key
    }

    /// The key differences the collision tests try, as two (word, XOR) pairs (see
    /// [`with_word_flipped`]): one or two bits of one word, and one bit of each of two words.
    fn low_weight_differences() -> alloc::vec::Vec<[(usize, u64); 2]> {
        let width = |word: usize| if word == 4 { 48 } else { 64 };
        let mut diffs = alloc::vec::Vec::new();
        for w in 0..5 {
            for i in 0..width(w) {
                diffs.push([(w, 1u64 << i), (w, 0)]);
                for j in 0..i {
                    diffs.push([(w, (1u64 << i) | (1u64 << j)), (w, 0)]);
                }
                for v in w + 1..5 {
                    for j in 0..width(v) {
                        diffs.push([(w, 1u64 << i), (v, 1u64 << j)]);
                    }
                }
            }
        }
        diffs
    }

    /// Under several seeds (and unseeded), no key a few bits from another hashes as it does: every
    /// key that differs from a flow's key of either family, or an affinity record's, in one or two
    /// bits of one word of the hash's input, or in one bit of each of two words, hashes apart from
    /// it. Under a seed an attacker does not know, each such pair should collide with chance
    /// 2^-64, so one that collides here shows structure the seed does not hide: the hash once
    /// started from the seed and then multiplied each word by a constant, which carries a
    /// difference in a word's bit 63 through unchanged, so keys apart in bit 63 of the source's
    /// first word and in bit 28 (where the round's rotation moved bit 63) of its second shared a
    /// hash under every seed.
    #[test]
    fn keys_a_few_bits_apart_hash_apart_under_any_seed() {
        let diffs = low_weight_differences();
        assert!(diffs.contains(&[(0, 1 << 63), (1, (1u64 << 63).rotate_left(29))]));
        let v4 = |a: u32| IpAddr::V4(Ipv4Addr::from(a));
        let bases = [
            ConnKey::flow(v4(0x0a01_0203), v4(0xc000_0250), 40000, 443, 6),
            ConnKey::flow(
                IpAddr::V6("2001:db8:bad::1".parse().unwrap()),
                IpAddr::V6("2001:db8::80".parse().unwrap()),
                40000,
                443,
                17,
            ),
            ConnKey::affinity(v4(0xc633_6407), v4(0xc000_0250), 80, 6),
        ];
        let seeds = [0x243f_6a88_85a3_08d3, 0x1319_8a2e_0370_7344, 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89];
        for seed in seeds.map(ConntrackSeed::new).into_iter().chain([SEED, ConntrackSeed::UNSEEDED]) {
            for base in bases {
                let h = base.hash(seed);
                for [(w, d), (v, e)] in &diffs {
                    let k = with_word_flipped(with_word_flipped(base, *w, *d), *v, *e);
                    assert_ne!(k.hash(seed), h, "{seed:?}, {base:?}: word {w} ^ {d:#x}, word {v} ^ {e:#x}");
                }
            }
        }
    }

    /// No difference of a few bits keeps a pair of keys in one bucket, or under one tag, whatever
    /// the seed: over 64 seeds, each pair of [`low_weight_differences`] from an IPv4 flow's key
    /// shares its low twelve bits (a table's bucket, up to 4 096 buckets) or its top twelve (the
    /// tag's) at most three times, where chance has it once in 64 and three times about once
    /// in ten thousand tests. A difference the seed does not hide, as the hash's once did (bit
    /// 63 of the source's first word and bit 28 of its second), keeps its pair together under
    /// every seed, so an attacker could aim pairs at one bucket without knowing the seed.
    #[test]
    fn no_key_difference_keeps_its_pair_in_one_bucket_across_seeds() {
        let v4 = |a: u32| IpAddr::V4(Ipv4Addr::from(a));
        let base = ConnKey::flow(v4(0x0a01_0203), v4(0xc000_0250), 40000, 443, 6);
        let seeds: alloc::vec::Vec<ConntrackSeed> =
            (1..=64u64).map(|i| ConntrackSeed::new(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))).collect();
        let hashes: alloc::vec::Vec<u64> = seeds.iter().map(|s| base.hash(*s)).collect();
        for [(w, d), (v, e)] in low_weight_differences() {
            let k = with_word_flipped(with_word_flipped(base, w, d), v, e);
            let (mut bucket, mut tag) = (0, 0);
            for (s, h) in seeds.iter().zip(&hashes) {
                let apart = k.hash(*s) ^ h;
                bucket += u32::from(apart & 0xfff == 0);
                tag += u32::from(apart >> 52 == 0);
            }
            assert!(
                bucket <= 3 && tag <= 3,
                "word {w} ^ {d:#x}, word {v} ^ {e:#x}: {bucket} buckets, {tag} tags of 64 seeds"
            );
        }
    }

    /// Pearson's chi-square statistic of `counts` against an even spread, and the bound a
    /// uniform spread stays under all but about once in a billion (its mean, `counts.len() - 1`,
    /// plus six of its standard deviations).
    fn chi_square(counts: &[u32]) -> (f64, f64) {
        let n: u32 = counts.iter().sum();
        let expected = f64::from(n) / counts.len() as f64;
        let chi = counts.iter().map(|&c| (f64::from(c) - expected) * (f64::from(c) - expected) / expected).sum();
        let dof = (counts.len() - 1) as f64;
        (chi, dof + 6.0 * libm_sqrt(2.0 * dof))
    }

    /// `x.sqrt()` (lb-core is `no_std`): Newton's method, enough for a test's bound.
    fn libm_sqrt(x: f64) -> f64 {
        (0..60).fold(x.max(1.0), |r, _| 0.5 * (r + x / r))
    }

    /// Keys that differ little spread evenly over a table's buckets, home ways and tags, under the
    /// unseeded hash and 39 seeds: 65 536 sequential IPv4 sources (a /16) to one service, one
    /// client's 65 536 source ports, 65 536 sources of one IPv6 /64 numbered from 1, and a
    /// backend's reply keys to every SNAT port ([`PortKeys`]). Each set's counts over 1 024
    /// buckets (the low ten bits, as a table of 1 024 buckets takes them), over the eight home
    /// ways, and over 1 024 values of the top ten bits (where the tag lives) stay under a
    /// chi-square bound that a hash leaving some key bits out of some of those bits exceeds, as
    /// did one whose last word went through a single product with a fixed operand, under several
    /// of these seeds (see [`AddrsHash::finish`]).
    #[test]
    fn keys_that_differ_little_spread_evenly() {
        let v4 = |a: u32| IpAddr::V4(Ipv4Addr::from(a));
        let (vip, client) = (v4(0xc000_0250), v4(0xc633_6407));
        let v6_vip = IpAddr::V6("2001:db8::80".parse().unwrap());
        let seeds = (1..=38u64).map(|i| ConntrackSeed::new(i.wrapping_mul(0x2545_f491_4f6c_dd1d)));
        for seed in [ConntrackSeed::UNSEEDED, SEED].into_iter().chain(seeds) {
            let replies = PortKeys::flow(seed, v4(0x0a00_0007), v4(0x0a00_0001), 8080);
            let v6 = |n: u32| {
                let src = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_0bad_0001u128 << 64) | u128::from(n + 1)));
                ConnKey::flow(src, v6_vip, 40000, 443, 6).hash(seed)
            };
            let sets: [(&str, &dyn Fn(u32) -> u64); 4] = [
                ("sources", &|n| ConnKey::flow(v4(0x0a0a_0000 | n), vip, 40000, 443, 6).hash(seed)),
                ("ports", &|n| ConnKey::flow(client, vip, n as u16, 443, 6).hash(seed)),
                ("v6", &v6),
                ("replies", &|n| replies.hash(n as u16, 6)),
            ];
            for (name, hash) in &sets {
                let (mut low, mut home, mut top) = ([0u32; 1024], [0u32; WAYS], [0u32; 1024]);
                for n in 0..1 << 16 {
                    let h = hash(n);
                    low[(h & 1023) as usize] += 1;
                    home[home_way(h)] += 1;
                    top[(h >> 54) as usize] += 1;
                }
                for (part, counts) in [("bucket", &low[..]), ("home way", &home[..]), ("top bits", &top[..])] {
                    let (chi, bound) = chi_square(counts);
                    assert!(chi < bound, "{seed:?} {name}: {part} chi-square {chi:.0} over {bound:.0}");
                }
            }
        }
    }

    #[test]
    fn bytes_for_is_what_with_capacity_allocates() {
        for capacity in [0, 1, 8, 9, 1000, 1 << 16] {
            let t = ConntrackTable::with_capacity(capacity, SEED);
            let bytes = t.buckets.len() * core::mem::size_of::<Bucket>();
            assert_eq!(ConntrackTable::bytes_for(capacity), Some(bytes), "{capacity}");
        }
        assert_eq!(ConntrackTable::bytes_for(usize::MAX), None);
    }

    #[test]
    fn oldest_half_open_goes_first_then_closing_then_full() {
        let mut t = ConntrackTable::with_capacity(8, SEED);
        for n in 0..6 {
            let k = key(n);
            t.insert(entry(k, ConnState::Established, 1000), k.hash(SEED), 0).unwrap();
        }
        let (a, b) = (key(50), key(51));
        t.insert(entry(a, ConnState::Closing, 100), a.hash(SEED), 0).unwrap();
        t.insert(entry(b, ConnState::SynSeen, 200), b.hash(SEED), 0).unwrap();
        let c = key(52);
        let d = t.insert(entry(c, ConnState::Established, 900), c.hash(SEED), 0).unwrap().displaced.unwrap();
        assert_eq!((d.entry.key, d.evicted), (b, true), "half-open goes before closing");
        let e = key(53);
        let d = t.insert(entry(e, ConnState::Established, 900), e.hash(SEED), 0).unwrap().displaced.unwrap();
        assert_eq!(d.entry.key, a);
        let f = key(54);
        assert_eq!(t.insert(entry(f, ConnState::SynSeen, 60), f.hash(SEED), 0), Err(ConntrackFull));
        assert_eq!(t.len(), 8);
    }

    #[test]
    fn inserts_take_their_home_way_when_it_is_free() {
        let mut t = ConntrackTable::with_capacity(WAYS, SEED); // one bucket
        let mut taken = 0u32;
        for n in 0..WAYS as u32 {
            let k = key(n);
            let h = k.hash(SEED);
            let free = !taken;
            let index = t.insert(entry(k, ConnState::Established, 100), h, 0).unwrap().index;
            let expected = if free & (1 << home_way(h)) != 0 { home_way(h) } else { free.trailing_zeros() as usize };
            assert_eq!(index as usize, expected, "key {n}");
            taken |= 1 << index;
            assert_eq!(t.find(&k, h), Some(index));
            assert_eq!(t.likely_entry(h).map(|e| e.key), Some(k));
        }
    }

    #[test]
    fn a_key_whose_home_way_holds_another_with_its_tag_is_still_found() {
        // Two keys of one bucket with the same tag and home way: the second cannot sit at home, and
        // the home way's tag matches it, so only the key comparison tells them apart.
        let mut t = ConntrackTable::with_capacity(WAYS, SEED);
        let sign = |k: &ConnKey| (tag_of(k.hash(SEED)), home_way(k.hash(SEED)));
        let first = key(0);
        let second = (1..1_000_000).map(key).find(|k| sign(k) == sign(&first)).unwrap();
        let a = t.insert(entry(first, ConnState::Established, 100), first.hash(SEED), 0).unwrap().index;
        let b = t.insert(entry(second, ConnState::Established, 100), second.hash(SEED), 0).unwrap().index;
        assert_eq!(a as usize, home_way(first.hash(SEED)));
        assert_ne!(a, b);
        assert_eq!(t.find(&first, first.hash(SEED)), Some(a));
        assert_eq!(t.find(&second, second.hash(SEED)), Some(b));
        let mut declined = NO_LINK;
        let found = t.find_update(&second, second.hash(SEED), |e| Some(e.key), &mut declined);
        assert_eq!((found, declined), (Some((b, second)), NO_LINK));
        assert_eq!(t.find_update(&second, second.hash(SEED), |_| None::<()>, &mut declined), None);
        assert_eq!(declined, b);
    }

    #[test]
    fn update_keeps_eviction_class_and_expiry_in_step() {
        let mut t = ConntrackTable::with_capacity(8, SEED);
        let mut idx = vec![];
        for n in 0..8 {
            let k = key(n);
            idx.push(t.insert(entry(k, ConnState::SynSeen, 100), k.hash(SEED), 0).unwrap().index);
        }
        // Established now: no longer evictable.
        for &i in &idx {
            t.update(i, |e| e.state = ConnState::Established).unwrap();
        }
        let k = key(99);
        assert_eq!(t.insert(entry(k, ConnState::SynSeen, 60), k.hash(SEED), 0), Err(ConntrackFull));
        // A refreshed expiry counts: entry 0 expires at 5, the rest stay live at 50.
        t.update(idx[0], |e| e.expires = 5).unwrap();
        assert!(!t.is_live(idx[0], 50) && t.is_live(idx[1], 50));
        let d = t.insert(entry(k, ConnState::SynSeen, 60), k.hash(SEED), 50).unwrap().displaced.unwrap();
        assert_eq!((d.index, d.evicted), (idx[0], false));
    }

    #[test]
    fn backend_gone_tombstone_yields_to_a_live_flow() {
        let mut t = ConntrackTable::with_capacity(8, SEED);
        let mut idx = vec![];
        for n in 0..8 {
            let k = key(n);
            idx.push(t.insert(entry(k, ConnState::Established, 1000), k.hash(SEED), 0).unwrap().index);
        }
        let k = key(99);
        assert_eq!(t.insert(entry(k, ConnState::SynSeen, 60), k.hash(SEED), 0), Err(ConntrackFull));
        // The same entry, now a tombstone (still live until its own expiry): a new flow may take it.
        t.update(idx[3], |e| e.state = ConnState::BackendGone).unwrap();
        assert!(t.is_live(idx[3], 0));
        let d = t.insert(entry(k, ConnState::SynSeen, 60), k.hash(SEED), 0).unwrap().displaced.unwrap();
        assert_eq!((d.index, d.evicted, d.entry.state), (idx[3], true, ConnState::BackendGone));
    }

    /// The vouch engages: once the forward entry links to its reverse entry, the reverse way's head
    /// holds the forward entry's expiry (so inserts and sweeps judge it without reading the forward
    /// entry), follows it down, and keeps it when it rises; past it the forward entry is asked.
    #[test]
    fn a_forward_entry_vouches_for_its_reverse_entry() {
        let mut t = ConntrackTable::with_capacity(64, SEED);
        let (f, r) = nat_pair(&mut t, (key(1), key(2)), (60, 60), 0).unwrap();
        let vouch = |t: &ConntrackTable| t.buckets[r as usize / WAYS].head.expiries[r as usize % WAYS];
        assert_eq!(vouch(&t), 60, "vouched for once the forward entry links to it");
        t.update(f, |e| e.link = NO_LINK).unwrap();
        assert_eq!(vouch(&t), 0, "and not once it unlinks");
        t.update(f, |e| e.link = r).unwrap();
        assert_eq!(vouch(&t), 60);
        t.update(f, |e| e.expires = 900).unwrap();
        assert_eq!(vouch(&t), 60, "a rising expiry leaves the vouch");
        assert!(t.is_live(r, 100), "past the vouch, the forward entry answers");
        t.update(f, |e| e.expires = 30).unwrap();
        assert_eq!(vouch(&t), 30, "a falling expiry lowers it");
        t.update(r, |e| e.expires = 5000).unwrap();
        assert_eq!(vouch(&t), 30, "the reverse entry's own updates do not touch it");
        t.remove(f);
        assert_eq!(vouch(&t), 0);
        assert!(!t.is_live(r, 0));
    }

    /// `link_reverse` leaves the table as the general write it stands in for does (entries, tags,
    /// classes, head expiries and vouches), only the forward way's head version apart, and
    /// refuses a forward entry that is linked already, a reverse entry and an empty way.
    #[test]
    fn link_reverse_is_the_general_link_write() {
        let pair = |link: fn(&mut ConntrackTable, u32, u32)| {
            let mut t = ConntrackTable::with_capacity(64, SEED);
            let f = t.insert(entry(key(1), ConnState::SynSeen, 60), key(1).hash(SEED), 0).unwrap().index;
            let mut r = entry(key(2), ConnState::SynSeen, 7);
            (r.kind, r.link) = (EntryKind::Reverse, f);
            let r = t.insert_sparing(r, key(2).hash(SEED), 0, f).unwrap().index;
            link(&mut t, f, r);
            (t, f, r)
        };
        let (a, f, r) = pair(|t, f, r| {
            t.update(f, |e| e.link = r).unwrap();
        });
        let (mut b, ..) = pair(|t, f, r| t.link_reverse(f, r).unwrap());
        for (x, y) in a.buckets.iter().zip(b.buckets.iter()) {
            assert_eq!((x.head.tags, x.head.expiries, x.head.classes), (y.head.tags, y.head.expiries, y.head.classes));
            assert!(x.entries.iter().zip(y.entries.iter()).all(|(e, g)| e.0 == g.0));
        }
        assert_eq!(b.buckets[r as usize / WAYS].head.expiries[r as usize % WAYS], 60, "vouched for");
        assert_eq!(b.link_reverse(f, r), None, "linked already");
        assert_eq!(b.link_reverse(r, f), None, "a reverse entry");
        b.remove(f);
        assert_eq!(b.link_reverse(f, r), None, "an empty way");
    }

    /// `insert_reverse` leaves the table as `insert_sparing` (sparing the forward entry), the
    /// `remove_reverse` of a displaced NAT flow's reverse entry (`general_worker_insert`), and then
    /// `link_reverse` do (entries, tags, classes, head expiries and vouches, length; only head
    /// versions apart) and reports the same insert: for a reverse entry of every way of a table
    /// of NAT pairs, plain entries, an orphaned reverse entry and empty ways, full buckets among
    /// them, so forward entries unlinked, linked already, missing or not forward, and inserts into
    /// free ways, stale ways and evictions (of NAT flows' forward entries too).
    #[test]
    fn insert_reverse_is_insert_then_link() {
        let build = |fill: u32| {
            let mut t = ConntrackTable::with_capacity(16, SEED);
            for n in 0..fill {
                nat_pair(&mut t, (key(2 * n), key(2 * n + 1)), (100 + n, 0), 0);
            }
            for n in 20..20 + fill {
                t.insert(entry(key(n), ConnState::SynSeen, 10 + n % 3), key(n).hash(SEED), 0).unwrap();
            }
            let f = t.insert(entry(key(50), ConnState::SynSeen, 70), key(50).hash(SEED), 0).unwrap().index;
            if let Some((f, _)) = nat_pair(&mut t, (key(40), key(41)), (90, 0), 0) {
                t.remove(f);
            }
            (t, f)
        };
        let same = |a: &ConntrackTable, b: &ConntrackTable| {
            assert_eq!(a.len, b.len);
            a.buckets.iter().zip(b.buckets.iter()).all(|(x, y)| {
                (x.head.tags, x.head.expiries, x.head.classes) == (y.head.tags, y.head.expiries, y.head.classes)
                    && x.entries.iter().zip(y.entries.iter()).all(|(e, g)| e.0 == g.0)
            })
        };
        let mut linked = 0;
        for fill in [0, 2, 4] {
            let capacity = build(fill).0.capacity() as u32;
            for forward in (0..capacity).chain([build(fill).1]) {
                for (n, now) in [(60, 0), (61, 11), (62, 200)] {
                    let mut r = entry(key(n), ConnState::SynSeen, 70);
                    (r.kind, r.link) = (EntryKind::Reverse, forward);
                    let (mut a, _) = build(fill);
                    let (mut b, _) = build(fill);
                    let general = insert_then_remove_reverse(&mut a, r, key(n).hash(SEED), now, forward);
                    if let Ok(ins) = general {
                        linked += usize::from(a.link_reverse(forward, ins.index).is_some());
                    }
                    assert_eq!(b.insert_reverse(r, key(n).hash(SEED), now, None), general, "{fill} {forward} {n}");
                    assert!(same(&a, &b), "fill {fill}, forward {forward}, key {n}");
                }
            }
        }
        assert!(linked > 0, "no case linked");
    }

    /// What the worker does for an insert (`insert_hinted`, `insert_reverse`) in the general
    /// terms its fast form stands in for: `insert_sparing`, then, for a displaced NAT flow's forward
    /// entry, `remove_reverse` of its reverse entry, reporting the entry unlinked when that removed.
    /// Returns the insert as reported, and whether it removed a reverse entry.
    fn general_worker_insert(
        t: &mut ConntrackTable,
        e: Entry,
        hash: u64,
        now: u32,
        spare: u32,
    ) -> (Result<Inserted, ConntrackFull>, bool) {
        let mut ins = t.insert_sparing(e, hash, now, spare);
        let mut removed = false;
        if let Ok(Inserted { displaced: Some(d), .. }) = &mut ins
            && d.entry.kind == EntryKind::Forward
            && d.entry.link != NO_LINK
            && t.remove_reverse(d.entry.link, d.index)
        {
            d.entry.link = NO_LINK;
            removed = true;
        }
        (ins, removed)
    }

    fn insert_then_remove_reverse(
        t: &mut ConntrackTable,
        e: Entry,
        hash: u64,
        now: u32,
        spare: u32,
    ) -> Result<Inserted, ConntrackFull> {
        general_worker_insert(t, e, hash, now, spare).0
    }

    /// `insert_hinted` (no hint; a hint only names the way `insert_sparing` would choose, as the
    /// tests of hints hold) leaves the table as `insert_sparing` and then `remove_reverse` of a
    /// displaced NAT flow's reverse entry do (entries, tags, classes, head expiries, length; only
    /// head versions apart) and reports the same insert, the displaced entry unlinked when its
    /// reverse entry went: for forward entries of every spare way of tables of NAT pairs, plain
    /// entries, an orphaned reverse entry and empty ways, full buckets among them, inserted into
    /// free ways, stale ways and by eviction (of NAT flows' forward entries too).
    #[test]
    fn worker_inserts_are_insert_then_remove_reverse() {
        let build = |fill: u32| {
            let mut t = ConntrackTable::with_capacity(16, SEED);
            for n in 0..fill {
                nat_pair(&mut t, (key(2 * n), key(2 * n + 1)), (100 + n, 0), 0);
            }
            for n in 20..20 + fill {
                // Established ones, which no insert evicts, leave the NAT flows' forward entries to go.
                let e = if n % 2 == 0 {
                    entry(key(n), ConnState::Established, 500)
                } else {
                    entry(key(n), ConnState::SynSeen, 10 + n % 3)
                };
                t.insert(e, key(n).hash(SEED), 0).unwrap();
            }
            if let Some((f, _)) = nat_pair(&mut t, (key(40), key(41)), (90, 0), 0) {
                t.remove(f);
            }
            t
        };
        let same = |a: &ConntrackTable, b: &ConntrackTable| {
            assert_eq!(a.len, b.len);
            a.buckets.iter().zip(b.buckets.iter()).all(|(x, y)| {
                (x.head.tags, x.head.expiries, x.head.classes) == (y.head.tags, y.head.expiries, y.head.classes)
                    && x.entries.iter().zip(y.entries.iter()).all(|(e, g)| e.0 == g.0)
            })
        };
        let mut unpaired = 0;
        for fill in [0, 2, 4, 6] {
            let capacity = build(fill).capacity() as u32;
            for spare in (0..capacity).chain([NO_LINK]) {
                for (n, now) in [(60, 0), (61, 11), (62, 200), (63, 101), (64, 0), (65, 11), (71, 101)] {
                    let e = entry(key(n), ConnState::SynSeen, 300);
                    let (mut a, mut b) = (build(fill), build(fill));
                    let (general, removed) = general_worker_insert(&mut a, e, key(n).hash(SEED), now, spare);
                    unpaired += usize::from(removed);
                    let fast = b.insert_hinted(e, key(n).hash(SEED), now, spare, None);
                    assert_eq!(fast, general, "fill {fill}, spare {spare}, key {n}");
                    assert!(same(&a, &b), "fill {fill}, spare {spare}, key {n}");
                }
            }
        }
        assert!(unpaired > 0, "no case displaced a NAT flow");
    }

    /// `likely_new` says what `likely` says (the same entry, or the same insert's way and hint) for
    /// every key: hashes of two tags, every home way and both buckets, over tables of 0 to 16
    /// entries under those tags (so a tag held at its home way, at another way, at both, or
    /// nowhere), at a time before and after their expiries.
    #[test]
    fn likely_new_is_likely() {
        let hash = |tag: u64, home: u64, bucket: u64| (tag << 49) | (home << 45) | bucket;
        let mut home_preferred = 0;
        for fill in 0..=16u64 {
            let mut t = ConntrackTable::with_capacity(16, SEED);
            for n in 0..fill {
                let h = hash(n % 2, (n * 3) % 8, n % 3 % 2);
                let _ = t.insert(entry(key(n as u32), ConnState::SynSeen, 10 + n as u32), h, 0);
            }
            for now in [0, 15, 40] {
                for probe in (0..2).flat_map(|tag| (0..8).flat_map(move |home| (0..2).map(move |b| hash(tag, home, b))))
                {
                    match (t.likely(probe, now), t.likely_new(probe, now)) {
                        (Likely::Hit(a), Likely::Hit(b)) => {
                            assert!(core::ptr::eq(a, b), "fill {fill}, hash {probe:x}");
                            let bucket = t.bucket_of(probe).unwrap();
                            let tag = tag_of(probe);
                            home_preferred += usize::from(
                                bucket.head.tags[home_way(probe)] == tag
                                    && bucket.head.tags.iter().position(|x| *x == tag) != Some(home_way(probe)),
                            );
                        }
                        (
                            Likely::Insert { entry: a, displaces: x, hint: h },
                            Likely::Insert { entry: b, displaces: y, hint: g },
                        ) => assert!(core::ptr::eq(a, b) && x == y && h == g, "fill {fill}, hash {probe:x}"),
                        (Likely::Unknown, Likely::Unknown) => {}
                        _ => panic!("fill {fill}, hash {probe:x}: not the same guess"),
                    }
                }
            }
        }
        assert!(home_preferred > 0, "no case had the tag at its home way after another way");
    }

    /// `remove_reverse(i, f)` leaves the table exactly as the test it stands in for with `remove`
    /// does (`get(i)` a reverse entry linking to `f`, then `remove(i)`), and says whether it
    /// removed: for every way of a table of NAT pairs, plain entries, a reverse entry whose forward
    /// entry is gone and empty ways, and every forward index (and `NO_LINK`).
    #[test]
    fn remove_reverse_is_get_then_remove() {
        let build = || {
            let mut t = ConntrackTable::with_capacity(32, SEED);
            for n in 0..6 {
                nat_pair(&mut t, (key(2 * n), key(2 * n + 1)), (100 + n, 0), 0).unwrap();
            }
            for n in 20..26 {
                t.insert(entry(key(n), ConnState::Established, 500), key(n).hash(SEED), 0).unwrap();
            }
            let (f, _) = nat_pair(&mut t, (key(40), key(41)), (90, 0), 0).unwrap();
            t.remove(f);
            t
        };
        let capacity = build().capacity() as u32;
        for i in 0..capacity {
            for f in (0..capacity).chain([NO_LINK]) {
                let (mut a, mut b) = (build(), build());
                let paired = a.get(i).is_some_and(|r| r.kind == EntryKind::Reverse && r.link == f);
                if paired {
                    a.remove(i);
                }
                assert_eq!(b.remove_reverse(i, f), paired, "way {i}, forward {f}");
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "way {i}, forward {f}");
            }
        }
    }

    #[test]
    fn reverse_entry_lives_with_its_forward_entry() {
        let mut t = ConntrackTable::with_capacity(64, SEED);
        let (f, r) = nat_pair(&mut t, (key(1), key(2)), (100, 0), 0).unwrap();
        assert!(t.is_live(r, 50), "reverse entry follows the live forward entry, not its own expiry");
        assert!(!t.is_live(r, 100));
        t.remove(f);
        assert!(!t.is_live(r, 0));
        let mut out = [(0, Entry::default()); WAYS];
        let mut swept = 0;
        for _ in 0..t.capacity() / WAYS {
            swept += t.sweep_bucket(0, &mut out);
        }
        assert_eq!(swept, 1);
        assert!(t.is_empty());
    }

    #[test]
    fn sweep_reclaims_only_expired() {
        // Room for eight times the entries: no bucket of live entries fills, under any seed.
        let mut t = ConntrackTable::with_capacity(4096, SEED);
        for n in 0..500 {
            let k = key(n);
            let exp = if n % 2 == 0 { 10 } else { 1000 };
            t.insert(entry(k, ConnState::UdpAssured, exp), k.hash(SEED), 0).unwrap();
        }
        let mut out = [(0, Entry::default()); WAYS];
        let mut swept = 0;
        for _ in 0..t.capacity() / WAYS {
            let n = t.sweep_bucket(10, &mut out);
            for (_, e) in &out[..n] {
                assert_eq!(e.expires, 10);
            }
            swept += n;
        }
        assert_eq!((swept, t.len()), (250, 250));
    }
}
