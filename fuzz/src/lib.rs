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
use lb_core::conntrack::EntryKind;
use lb_core::service::{Limits, TableBuilder};
use lb_core::{Frame, Instant, Verdict, Worker, WorkerConfig};

/// Small limits so a worker is cheap to build per fuzz input.
pub const LIMITS: Limits = Limits { max_services: 64, max_backends: 256 };
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
    /// 0..=3: a service port; 4: a VIP port nobody serves; 5: to the SNAT address; else: not ours.
    pub target: u8,
    pub client: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub payload_len: u8,
    /// 1300 more bytes of payload: with the tunnel modes, past [`config`]'s `tunnel_mtu` (ICMP too big).
    pub big: bool,
    pub headroom: u8,
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
        let mut out = build(src, self.sport, dst, dport, self.tcp, self.flags, self.ttl, payload);
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

/// Runs one frame with `headroom` bytes in front; returns the verdict and the bytes after.
pub fn run(w: &mut Worker, bytes: &[u8], headroom: usize, now: Instant) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; headroom + bytes.len()];
    buf[headroom..].copy_from_slice(bytes);
    let mut frames = [Frame::new(&mut buf, headroom, bytes.len())];
    let mut verdicts = [Verdict::Pass];
    w.process_burst(&mut frames, now, &mut verdicts);
    let out = frames[0].data().to_vec();
    (verdicts[0], out)
}

/// The worker invariants: the verdict counters add up, conntrack stays within its capacity, every
/// NAT reverse entry has its forward entry, per-backend connection counts equal the forward entries,
/// and a transmitted frame parses.
pub fn check(w: &Worker, verdict: Verdict, out: &[u8]) {
    let s = w.stats();
    assert_eq!(s.tx + s.passed + s.dropped_total(), s.rx, "every frame gets exactly one counted verdict");
    let ct = w.conntrack();
    assert!(ct.len() <= ct.capacity());
    let forward = ct.iter().filter(|(_, e)| e.kind == EntryKind::Forward).count() as u64;
    let counted: u64 = w
        .tables()
        .services()
        .iter()
        .flat_map(|s| s.backends.iter())
        .map(|b| w.stats().backend(b.slot()).active_conns)
        .sum();
    assert!(counted <= forward, "connection counts {counted} exceed forward entries {forward}");
    for (i, e) in ct.iter() {
        if e.kind == EntryKind::Reverse {
            assert!(ct.get(e.link).is_some_and(|f| f.link == i), "orphan reverse entry");
        }
    }
    if verdict == Verdict::Tx {
        assert!(lb_core::packet::parse(out).is_ok(), "a transmitted frame does not parse: {out:02x?}");
    }
}
