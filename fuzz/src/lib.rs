//! What both fuzz targets share: a configuration with a service per forwarding mode and family,
//! structured frames the fuzzer can steer towards those services (random bytes rarely hit a VIP), and
//! the worker invariants checked after every step.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use etherparse::PacketBuilder;
use lb_core::config::{
    BackendConfig, BackendState, Config, ForwardMode, NodeConfig, Protocol, RemovedBackendPolicy, SchedulerKind,
    ServiceConfig, ServiceKey,
};
use lb_core::conntrack::{ConnState, EntryKind};
use lb_core::service::{Limits, TableBuilder};
use lb_core::{Frame, Instant, Verdict, Worker, WorkerConfig};

/// Small limits so a worker is cheap to build per fuzz input (every service at the 251 Maglev entries
/// `config` gives them).
pub const LIMITS: Limits = Limits { max_services: 64, max_backends: 256, max_maglev_entries: 64 * 251 };
/// Conntrack entries per worker: small, so eviction and "full" paths are reached.
pub const CONNTRACK: usize = 64;

pub const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const SNAT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);

pub fn backend_addr(v6: bool, i: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, u16::from(i) + 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 1, 0, i + 1))
    }
}

pub const MODES: [ForwardMode; 4] =
    [ForwardMode::Nat, ForwardMode::Dsr, ForwardMode::IpIp, ForwardMode::Gue { port: 6080 }];

/// Port 80 + mode index, TCP and UDP, IPv4 and IPv6, two backends each.
pub fn config() -> Config {
    let node = NodeConfig {
        gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]),
        snat_v4: Some(SNAT4),
        snat_v6: Some(SNAT6),
        snat_ports: (40000, 40015),
        tunnel_src_v4: Some(Ipv4Addr::new(10, 0, 0, 101)),
        tunnel_src_v6: Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101)),
        tunnel_mtu: Some(1400),
        ..NodeConfig::default()
    };
    let mut services = Vec::new();
    for (m, mode) in MODES.iter().enumerate() {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            for v6 in [false, true] {
                let port = 80 + m as u16;
                let bport = if *mode == ForwardMode::Nat { 8080 } else { port };
                services.push(ServiceConfig {
                    name: format!("s{m}-{proto:?}-{v6}"),
                    key: ServiceKey { vip: if v6 { IpAddr::V6(VIP6) } else { IpAddr::V4(VIP4) }, port, proto },
                    backends: (0..2)
                        .map(|i| BackendConfig {
                            addr: backend_addr(v6, i),
                            port: bport,
                            weight: 1,
                            // Its own MAC, which DSR needs.
                            mac: Some([2, 0, 0, 0, 1, i]),
                            state: BackendState::Active,
                        })
                        .collect(),
                    scheduler: SchedulerKind::Maglev,
                    mode: *mode,
                    affinity_timeout: None,
                    source_ranges: vec![],
                    // Small tables: lb-core's default (65 537 entries) would spend most of each
                    // run building them (40x fewer runs a minute).
                    maglev_table_size: Some(251),
                    on_backend_removed: RemovedBackendPolicy::Reschedule,
                    answer_neighbours: true,
                });
            }
        }
    }
    Config { node, services }
}

/// A builder for one run: a clone of one that has already built [`config`] once in this process, so a
/// run's first build reuses the 16 Maglev tables instead of building them again (that was about half of
/// every run's time, perf).
pub fn builder() -> TableBuilder {
    thread_local! {
        static WARM: TableBuilder = {
            let mut b = TableBuilder::with_limits(LIMITS);
            b.build(&config()).expect("the base fuzz config is valid");
            b
        };
    }
    WARM.with(TableBuilder::clone)
}

pub fn worker(builder: &mut TableBuilder, cfg: &Config) -> Worker {
    let tables = builder.build(cfg).expect("the base fuzz config is valid");
    let mut w = Worker::new(tables, WorkerConfig::single_core(CONNTRACK));
    // ARP and NDP bytes reach the neighbour responder too.
    w.set_neighbour_mac(Some([0x02, 0, 0, 0, 0, 0x01]));
    w
}

/// A frame the fuzzer describes: to a VIP (or the SNAT address, or elsewhere), then byte mutations.
#[derive(Debug, Clone, Arbitrary)]
pub struct FrameSpec {
    pub v6: bool,
    pub tcp: bool,
    pub flags: u8,
    /// 0..=3: a service port; 4: a VIP port nobody serves; 5: to the SNAT address; 6: an ARP request
    /// (IPv4) or a Neighbour Solicitation (IPv6, hop limit 255 for an odd `ttl`) for the VIP (even
    /// `client`) or the SNAT address (odd); else: not ours.
    pub target: u8,
    pub client: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub payload_len: u8,
    /// 1300 more bytes of payload: with the tunnel modes, past [`config`]'s `tunnel_mtu` (ICMP too big).
    pub big: bool,
    pub headroom: u8,
    /// VLAN tags (0x8100) inserted after the Ethernet addresses: `vlan % 4` of them (3 is one more
    /// than lb-core takes).
    pub vlan: u8,
    /// Instead of the packet, an ICMP error ("fragmentation needed" / "packet too big") from a router
    /// to its destination, quoting the packet of the reverse direction: to a VIP about a VIP ->
    /// client packet, to a SNAT address about a NAT flow's packet to its backend.
    pub icmp_error: bool,
    /// (offset, xor) pairs applied after building.
    pub mutations: Vec<(u16, u8)>,
    /// Cut the frame to this length, if set.
    pub truncate: Option<u16>,
}

impl FrameSpec {
    pub fn bytes(&self) -> Vec<u8> {
        let client = if self.v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, u16::from(self.client)))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, self.client))
        };
        let (src, dst, dport) = match self.target {
            t @ 0..=3 => (client, if self.v6 { IpAddr::V6(VIP6) } else { IpAddr::V4(VIP4) }, 80 + u16::from(t)),
            4 => (client, if self.v6 { IpAddr::V6(VIP6) } else { IpAddr::V4(VIP4) }, self.dport),
            5 => (
                backend_addr(self.v6, self.client % 2),
                if self.v6 { IpAddr::V6(SNAT6) } else { IpAddr::V4(SNAT4) },
                40000 + self.dport % 16,
            ),
            _ => (client, backend_addr(self.v6, 9), self.dport),
        };
        let payload = usize::from(self.payload_len) + if self.big { 1300 } else { 0 };
        let mut out = if self.target == 6 {
            let vip = self.client.is_multiple_of(2);
            let ours = if vip { IpAddr::V4(VIP4) } else { IpAddr::V4(SNAT4) };
            let ours6 = if vip { VIP6 } else { SNAT6 };
            match (src, ours) {
                (IpAddr::V4(s), IpAddr::V4(t)) if !self.v6 => arp_request(s, t),
                (IpAddr::V6(s), _) => solicitation(s, ours6, if self.ttl % 2 == 1 { 255 } else { self.ttl }),
                _ => Vec::new(),
            }
        } else if self.icmp_error {
            let quote = build(dst, dport, src, self.sport, self.tcp, self.flags, self.ttl, payload % 64);
            icmp_error(dst, quote.get(14..).unwrap_or_default())
        } else {
            build(src, self.sport, dst, dport, self.tcp, self.flags, self.ttl, payload)
        };
        if out.len() >= 14 {
            for _ in 0..self.vlan % 4 {
                out.splice(12..12, [0x81, 0x00, 0x00, self.vlan]);
            }
        }
        for &(at, x) in &self.mutations {
            let n = out.len();
            if n > 0 {
                out[usize::from(at) % n] ^= x;
            }
        }
        if let Some(t) = self.truncate {
            out.truncate(usize::from(t));
        }
        out
    }
}

/// Ethernet + IP + TCP/UDP, built by etherparse.
#[allow(clippy::too_many_arguments, reason = "one argument per header field the fuzzer controls")]
pub fn build(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    tcp: bool,
    flags: u8,
    ttl: u8,
    payload: usize,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xc1], [2, 0, 0, 0, 0, 1]);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => return Vec::new(),
    };
    let body = vec![0x5a; payload];
    let mut out = Vec::new();
    let written = if tcp {
        let mut b = ip.tcp(sport, dport, 1, 1024);
        if flags & 0x02 != 0 {
            b = b.syn();
        }
        if flags & 0x10 != 0 {
            b = b.ack(1);
        }
        if flags & 0x01 != 0 {
            b = b.fin();
        }
        if flags & 0x04 != 0 {
            b = b.rst();
        }
        b.write(&mut out, &body)
    } else {
        ip.udp(sport, dport).write(&mut out, &body)
    };
    if written.is_err() {
        out.clear();
    }
    out
}

/// An ARP request from `sender` for `target`, broadcast.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend([2, 0, 0, 0, 0, 0xc1, 0x08, 0x06]);
    out.extend([0, 1, 0x08, 0x00, 6, 4, 0, 1, 2, 0, 0, 0, 0, 0xc1]);
    out.extend(sender.octets());
    out.extend([0; 6]);
    out.extend(target.octets());
    out
}

/// An ICMPv6 Neighbour Solicitation from `src` for `target` with a source link-layer address
/// option, to the target's solicited-node group.
pub fn solicitation(src: Ipv6Addr, target: Ipv6Addr, hop_limit: u8) -> Vec<u8> {
    let t = target.octets();
    let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xc1], [0x33, 0x33, 0xff, t[13], t[14], t[15]]);
    let mut body = t.to_vec();
    body.extend([1, 1, 2, 0, 0, 0, 0, 0xc1]);
    let mut out = Vec::new();
    if eth.ipv6(src.octets(), group.octets(), hop_limit).icmpv6_raw(135, 0, [0; 4]).write(&mut out, &body).is_err() {
        out.clear();
    }
    out
}

/// Ethernet + IP + an ICMP error from a router to `dst` quoting the IP packet `quote`.
pub fn icmp_error(dst: IpAddr, quote: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4::DestUnreachableHeader};
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xc1], [2, 0, 0, 0, 0, 1]);
    let mut out = Vec::new();
    let written = match dst {
        IpAddr::V4(d) => eth
            .ipv4([203, 0, 113, 1], d.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1200,
            }))
            .write(&mut out, quote),
        IpAddr::V6(d) => eth
            .ipv6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1).octets(), d.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut out, quote),
    };
    if written.is_err() {
        out.clear();
    }
    out
}

/// Runs one frame with `headroom` bytes in front; returns the verdict and the bytes after.
pub fn run(w: &mut Worker, bytes: &[u8], headroom: usize, now: Instant) -> (Verdict, Vec<u8>) {
    run_burst(w, &[(bytes.to_vec(), headroom)], now, false).remove(0)
}

/// Runs `frames` (bytes, headroom) as one burst, as frames handed over by another core when
/// `handed`; returns each frame's verdict and bytes after.
pub fn run_burst(w: &mut Worker, frames: &[(Vec<u8>, usize)], now: Instant, handed: bool) -> Vec<(Verdict, Vec<u8>)> {
    let mut bufs: Vec<Vec<u8>> = frames
        .iter()
        .map(|(bytes, headroom)| {
            let mut buf = vec![0u8; headroom + bytes.len()];
            buf[*headroom..].copy_from_slice(bytes);
            buf
        })
        .collect();
    let mut fs: Vec<Frame<'_>> =
        bufs.iter_mut().zip(frames).map(|(buf, (bytes, headroom))| Frame::new(buf, *headroom, bytes.len())).collect();
    let mut verdicts = vec![Verdict::Pass; fs.len()];
    if handed {
        w.process_handed_burst(&mut fs, now, &mut verdicts);
    } else {
        w.process_burst(&mut fs, now, &mut verdicts);
    }
    fs.iter().zip(verdicts).map(|(f, v)| (v, f.data().to_vec())).collect()
}

/// The worker invariants: the verdict counters add up, conntrack stays within its capacity, every
/// NAT reverse entry has its forward entry and every live forward entry's link its reverse entry (an
/// expired flow's reverse entry may go first, to free its port for a new flow), each
/// backend's connection counts equal its forward entries (all, and established), a transmitted
/// frame parses, and a passed one is unchanged. `now` is the latest time the worker was given.
pub fn check(w: &Worker, verdict: Verdict, input: &[u8], out: &[u8], now: Instant) {
    check_state(w, now);
    check_verdict(verdict, input, out);
}

/// A transmitted frame parses (or is an ARP reply); a frame passed to the kernel or handed to another
/// core is unchanged (`input` its bytes before).
pub fn check_verdict(verdict: Verdict, input: &[u8], out: &[u8]) {
    if matches!(verdict, Verdict::Pass | Verdict::Handoff(_) | Verdict::HandoffAll) {
        assert_eq!(input, out, "a frame with verdict {verdict:?} was changed");
    }
    if verdict == Verdict::Tx {
        let parsed = lb_core::packet::parse(out);
        assert!(
            parsed.is_ok() || parsed == Err(lb_core::packet::ParseError::Arp),
            "a transmitted frame does not parse: {out:02x?}"
        );
    }
}

/// The invariants of [`check`] that read the worker only.
pub fn check_state(w: &Worker, now: Instant) {
    let now = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
    let s = w.stats();
    assert_eq!(
        s.tx + s.passed + s.dropped_total() + s.handed_off,
        s.rx,
        "every frame gets exactly one counted verdict"
    );
    let ct = w.conntrack();
    assert!(ct.len() <= ct.capacity());
    for (i, e) in ct.iter() {
        match e.kind {
            EntryKind::Reverse => {
                assert!(ct.get(e.link).is_some_and(|f| f.link == i), "orphan reverse entry");
            }
            EntryKind::Forward if e.link != lb_core::conntrack::NO_LINK && !e.is_expired(now) => {
                assert!(
                    ct.get(e.link).is_some_and(|r| r.kind == EntryKind::Reverse && r.link == i),
                    "a forward entry's link names no reverse entry of it: {e:?}"
                );
            }
            _ => {}
        }
    }
    // Per backend reference: its forward entries, and how many of them are established.
    let mut conns = std::collections::HashMap::<_, (u64, u64)>::new();
    for (_, e) in ct.iter() {
        if e.kind == EntryKind::Forward && e.state != ConnState::BackendGone {
            let c = conns.entry(e.backend).or_default();
            c.0 += 1;
            c.1 += u64::from(e.state == ConnState::Established);
        }
    }
    for b in w.tables().services().iter().flat_map(|s| s.backends.iter()) {
        let c = s.backend(b.slot());
        let (all, established) = conns.get(&b.id).copied().unwrap_or_default();
        assert_eq!(c.active_conns, all, "active connections of {:?}", b.id);
        assert_eq!(c.established_conns, established, "established connections of {:?}", b.id);
    }
}
