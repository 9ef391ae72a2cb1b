//! Observability: per-core counter snapshots summed into Prometheus text (`/metrics`) and a JSON view
//! of the live state (`/state`, what `lb list` prints), served over HTTP on the control side.
//!
//! Workers never share counters: each core's [`lb_core::stats::Stats`] is copied out (a
//! [`CoreSnapshot`], taken by whoever owns the workers, through [`StatsSource`]) and the copies are
//! summed here per service slot and backend slot of the current tables. The exposition format is
//! written by hand: every value comes from a snapshot at scrape time, so a metrics registry (which
//! wants to own the values) would only add a copy.
//!
//! The HTTP server is a few lines over tokio: GET only, one request per connection, bounded head,
//! bounded time, renders on blocking threads, two at a time (never on the control runtime's own).
//! It serves four read-only routes, nothing else: `/metrics` to scrapers, `/state` to `lb list`, and
//! [`READY_PATH`] and [`LIVE_PATH`], which render nothing, to the DaemonSet's probes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_core::config::{BackendState, ForwardMode, Protocol};
use lb_core::service::Tables;
use lb_core::stats::{BackendCounters, DropReason, ServiceCounters, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// `lb_icmp_time_exceeded_total`'s help names the budget.
const _: () = assert!(
    lb_core::forward::time_exceeded::TIME_EXCEEDED_PER_SECOND == 1000,
    "update lb_icmp_time_exceeded_total's help"
);
use tokio::sync::watch;

use crate::control::LiveState;
use crate::health::Target;
use crate::list::{BackendView, ServiceView, StateView};

/// A copy of one core's counters, taken outside the fast path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreSnapshot {
    /// Frames received.
    pub rx: u64,
    /// Frames transmitted.
    pub tx: u64,
    /// Frames passed to the kernel.
    pub passed: u64,
    /// NAT replies handed to the core that owns their SNAT port.
    pub handed_off: u64,
    /// ARP requests answered by the neighbour responder.
    pub arp_replies: u64,
    /// IPv6 neighbour solicitations answered by the neighbour responder.
    pub ndp_adverts: u64,
    /// ARP requests and replies from another host claiming an address the neighbour responder answers for.
    pub arp_conflicts: u64,
    /// Full-NAT replies translated back to their clients.
    pub reverse_nat: u64,
    /// Packets too big for the tunnel path answered with ICMP (`node.tunnel_mtu`).
    pub icmp_too_big: u64,
    /// Full-NAT packets whose TTL / hop limit expired answered with ICMP time exceeded.
    pub icmp_time_exceeded: u64,
    /// Tables the worker refused (larger limits than it was built with; it kept serving its own).
    pub tables_refused: u64,
    /// Conntrack entries evicted for room for a new flow.
    pub conntrack_evictions: u64,
    /// Full-NAT flows (half-open, else closing) evicted for their SNAT port.
    pub snat_port_evictions: u64,
    /// ClientIP affinity records not stored for want of room in the connection table.
    pub affinity_not_recorded: u64,
    /// Drops by reason, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
    /// Service counters by service slot and generation.
    pub services: HashMap<SlotKey, ServiceCounters>,
    /// Backend counters by backend slot and generation.
    pub backends: HashMap<SlotKey, BackendCounters>,
    /// Conntrack entries in use on this core.
    pub conntrack_entries: u64,
    /// Conntrack capacity of this core.
    pub conntrack_capacity: u64,
    /// Copies of frames for another core that its poll loop had no room for (its poll loop's count).
    pub handoff_lost: u64,
    /// Frames this core's poll loop gave up on a stuck transmit ring (its poll loop's count).
    pub tx_abandoned: u64,
    /// Frames the worker marked for transmission (and counted in `tx`) that its poll loop's device
    /// could not queue, such as a reply handed over from another core with no free buffer to copy
    /// it into (its poll loop's count).
    pub tx_declined: u64,
    /// Frames the kernel dropped on their way to this core's AF_XDP socket (its receive ring full,
    /// or no fill-ring buffer), as its poll loop last read them.
    pub xsk_rx_dropped: u64,
}

impl CoreSnapshot {
    /// Copies the counters of every slot `tables` uses out of one core's `stats`.
    pub fn from_stats(stats: &Stats, tables: &Tables, conntrack_entries: u64, conntrack_capacity: u64) -> Self {
        let mut s = CoreSnapshot {
            rx: stats.rx,
            tx: stats.tx,
            passed: stats.passed,
            handed_off: stats.handed_off,
            arp_replies: stats.arp_replies,
            ndp_adverts: stats.ndp_adverts,
            arp_conflicts: stats.arp_conflicts,
            reverse_nat: stats.reverse_nat,
            icmp_too_big: stats.icmp_too_big,
            icmp_time_exceeded: stats.icmp_time_exceeded,
            tables_refused: stats.tables_refused,
            conntrack_evictions: stats.conntrack_evictions,
            snat_port_evictions: stats.snat_port_evictions,
            affinity_not_recorded: stats.affinity_not_recorded,
            drops: stats.drops,
            conntrack_entries,
            conntrack_capacity,
            ..Default::default()
        };
        for svc in tables.services() {
            s.services.insert((svc.slot.0, svc.generation), stats.service(svc.slot));
            for b in &svc.backends {
                s.backends.insert((b.id.slot, b.id.generation), stats.backend(b.slot()));
            }
        }
        s
    }
}

/// One core's counters in a buffer sized once, so the poll thread can copy them out without
/// allocating: only the slots the current tables use are copied, into vectors reserved for the
/// builder's [`Limits`](lb_core::service::Limits).
#[derive(Debug, Clone, Default)]
pub struct CoreCounters {
    rx: u64,
    tx: u64,
    passed: u64,
    handed_off: u64,
    arp_replies: u64,
    ndp_adverts: u64,
    arp_conflicts: u64,
    reverse_nat: u64,
    icmp_too_big: u64,
    icmp_time_exceeded: u64,
    tables_refused: u64,
    conntrack_evictions: u64,
    snat_port_evictions: u64,
    affinity_not_recorded: u64,
    drops: [u64; DropReason::COUNT],
    services: Vec<(SlotKey, ServiceCounters)>,
    backends: Vec<(SlotKey, BackendCounters)>,
    conntrack_entries: u64,
    conntrack_capacity: u64,
}

impl CoreCounters {
    /// A buffer with room for every slot `limits` allows.
    pub fn with_capacity(limits: lb_core::service::Limits) -> Self {
        CoreCounters {
            services: Vec::with_capacity(limits.max_services),
            backends: Vec::with_capacity(limits.max_backends),
            ..Default::default()
        }
    }

    /// Copies `stats` for the slots `tables` uses. Never allocates when `tables` is within the
    /// limits this buffer was sized for (the table builder guarantees it).
    pub fn fill(&mut self, stats: &Stats, tables: &Tables, conntrack_entries: usize, conntrack_capacity: usize) {
        self.rx = stats.rx;
        self.tx = stats.tx;
        self.passed = stats.passed;
        self.handed_off = stats.handed_off;
        self.arp_replies = stats.arp_replies;
        self.ndp_adverts = stats.ndp_adverts;
        self.arp_conflicts = stats.arp_conflicts;
        self.reverse_nat = stats.reverse_nat;
        self.icmp_too_big = stats.icmp_too_big;
        self.icmp_time_exceeded = stats.icmp_time_exceeded;
        self.tables_refused = stats.tables_refused;
        self.conntrack_evictions = stats.conntrack_evictions;
        self.snat_port_evictions = stats.snat_port_evictions;
        self.affinity_not_recorded = stats.affinity_not_recorded;
        self.drops = stats.drops;
        self.conntrack_entries = conntrack_entries as u64;
        self.conntrack_capacity = conntrack_capacity as u64;
        self.services.clear();
        self.backends.clear();
        for s in tables.services() {
            if self.services.len() < self.services.capacity() {
                self.services.push(((s.slot.0, s.generation), stats.service(s.slot)));
            }
            for b in &s.backends {
                if self.backends.len() < self.backends.capacity() {
                    self.backends.push(((b.id.slot, b.id.generation), stats.backend(b.slot())));
                }
            }
        }
    }

    /// The snapshot the metrics side sums (allocates; control side only).
    pub fn to_snapshot(&self) -> CoreSnapshot {
        CoreSnapshot {
            rx: self.rx,
            tx: self.tx,
            passed: self.passed,
            handed_off: self.handed_off,
            arp_replies: self.arp_replies,
            ndp_adverts: self.ndp_adverts,
            arp_conflicts: self.arp_conflicts,
            reverse_nat: self.reverse_nat,
            icmp_too_big: self.icmp_too_big,
            icmp_time_exceeded: self.icmp_time_exceeded,
            tables_refused: self.tables_refused,
            conntrack_evictions: self.conntrack_evictions,
            snat_port_evictions: self.snat_port_evictions,
            affinity_not_recorded: self.affinity_not_recorded,
            drops: self.drops,
            services: self.services.iter().copied().collect(),
            backends: self.backends.iter().copied().collect(),
            conntrack_entries: self.conntrack_entries,
            conntrack_capacity: self.conntrack_capacity,
            // The poll loop's, added by `PublishedCounters`.
            handoff_lost: 0,
            tx_abandoned: 0,
            tx_declined: 0,
            xsk_rx_dropped: 0,
        }
    }
}

/// A service or backend slot with the generation of its holder ([`lb_core::service::BackendRef`],
/// `Service::generation`): the builder reuses freed slots, and a core still on older tables (between
/// a publish and its swap, or idle since) reports a slot's former holder's counts under the old
/// generation, which the live tables never ask for, so a newcomer never shows its predecessor's
/// counts (nor goes backwards when that core catches up).
pub type SlotKey = (u32, u32);

/// One interface's counters, read at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceSnapshot {
    /// The interface's name.
    pub interface: String,
    /// Frames its XDP program steered to a receive queue with no AF_XDP socket (passed to the
    /// kernel instead).
    pub xdp_no_socket: u64,
}

/// Per-core counter buffers the poll threads publish into and `/metrics` reads: the workers', and
/// (in the same order, where given) their poll loops' own; and each interface's XDP program's
/// counters, by interface name.
#[derive(Debug, Default)]
pub struct PublishedCounters(
    pub Vec<Arc<Mutex<CoreCounters>>>,
    pub Vec<Arc<lb_io::LoopCounters>>,
    pub Vec<(String, lb_io::bpf::xdp::SteeringCounters)>,
);

impl StatsSource for PublishedCounters {
    /// An interface whose counter map cannot be read is left out (and the failure logged).
    fn interfaces(&self) -> Vec<InterfaceSnapshot> {
        self.2
            .iter()
            .filter_map(|(interface, counters)| match counters.no_socket() {
                Ok(n) => Some(InterfaceSnapshot { interface: interface.clone(), xdp_no_socket: n }),
                Err(e) => {
                    tracing::warn!(interface = %interface, "reading the XDP program's counters: {e}");
                    None
                }
            })
            .collect()
    }

    fn snapshots(&self) -> Vec<CoreSnapshot> {
        let mut cores: Vec<CoreSnapshot> =
            self.0.iter().filter_map(|c| c.lock().ok().map(|c| c.to_snapshot())).collect();
        for (core, counters) in cores.iter_mut().zip(&self.1) {
            let s = counters.snapshot();
            (core.handoff_lost, core.tx_abandoned, core.tx_declined, core.xsk_rx_dropped) =
                (s.handoff_lost, s.tx_abandoned, s.tx_declined, s.kernel_rx_dropped);
        }
        cores
    }
}

/// Where per-core snapshots come from (the owner of the workers).
pub trait StatsSource: Send + Sync {
    /// One snapshot per core, as recent as the source has.
    fn snapshots(&self) -> Vec<CoreSnapshot>;

    /// One snapshot per interface served (none by default).
    fn interfaces(&self) -> Vec<InterfaceSnapshot> {
        Vec::new()
    }
}

impl<F: Fn() -> Vec<CoreSnapshot> + Send + Sync> StatsSource for F {
    fn snapshots(&self) -> Vec<CoreSnapshot> {
        self()
    }
}

/// The sum of all cores.
#[derive(Debug, Clone, Default)]
struct Totals {
    rx: u64,
    tx: u64,
    passed: u64,
    handed_off: u64,
    arp_replies: u64,
    ndp_adverts: u64,
    arp_conflicts: u64,
    reverse_nat: u64,
    icmp_too_big: u64,
    icmp_time_exceeded: u64,
    tables_refused: u64,
    conntrack_evictions: u64,
    snat_port_evictions: u64,
    affinity_not_recorded: u64,
    drops: [u64; DropReason::COUNT],
    services: HashMap<SlotKey, ServiceCounters>,
    backends: HashMap<SlotKey, BackendCounters>,
}

fn sum(cores: &[CoreSnapshot]) -> Totals {
    let mut t = Totals::default();
    for c in cores {
        t.rx += c.rx;
        t.tx += c.tx;
        t.passed += c.passed;
        t.handed_off += c.handed_off;
        t.arp_replies += c.arp_replies;
        t.ndp_adverts += c.ndp_adverts;
        t.arp_conflicts += c.arp_conflicts;
        t.reverse_nat += c.reverse_nat;
        t.icmp_too_big += c.icmp_too_big;
        t.icmp_time_exceeded += c.icmp_time_exceeded;
        t.tables_refused += c.tables_refused;
        t.conntrack_evictions += c.conntrack_evictions;
        t.snat_port_evictions += c.snat_port_evictions;
        t.affinity_not_recorded += c.affinity_not_recorded;
        for (a, b) in t.drops.iter_mut().zip(c.drops) {
            *a += b;
        }
        for (slot, s) in &c.services {
            t.services.entry(*slot).or_default().add(s);
        }
        for (slot, b) in &c.backends {
            t.backends.entry(*slot).or_default().add(b);
        }
    }
    t
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// The forwarding method as `ipvsadm -Ln` names it.
pub fn forward_name(mode: ForwardMode) -> &'static str {
    match mode {
        ForwardMode::Nat => "Masq",
        ForwardMode::Dsr => "Route",
        ForwardMode::IpIp => "Tunnel",
        ForwardMode::Gue { .. } => "GUE",
    }
}

/// The live state with summed counters, as `/state` serves it.
pub fn state_view(live: &LiveState, cores: &[CoreSnapshot]) -> StateView {
    let totals = sum(cores);
    let health = live.health.lock().map(|h| h.clone()).unwrap_or_default();
    let mut view = StateView {
        version: live.tables.as_ref().map_or(0, |t| t.version()),
        applied: live.applied,
        rejected: live.rejected,
        last_error: live.last_error.clone(),
        conntrack_entries: cores.iter().map(|c| c.conntrack_entries).sum(),
        conntrack_capacity: cores.iter().map(|c| c.conntrack_capacity).sum(),
        services: Vec::new(),
    };
    let Some(tables) = &live.tables else { return view };
    for svc in tables.services() {
        let sc = totals.services.get(&(svc.slot.0, svc.generation)).copied().unwrap_or_default();
        view.services.push(ServiceView {
            name: svc.name.clone(),
            proto: proto_name(svc.key.proto).to_string(),
            vip: svc.key.vip,
            port: svc.key.port,
            scheduler: svc.scheduler.kind().name().to_string(),
            forward: forward_name(svc.mode).to_string(),
            persistent_secs: svc.affinity_timeout_secs,
            packets: sc.packets,
            bytes: sc.bytes,
            new_flows: sc.new_flows,
            drops: sc.drops,
            fail_open: live.fail_open.contains(&svc.key),
            backends: svc
                .backends
                .iter()
                .map(|b| {
                    let bc = totals.backends.get(&(b.id.slot, b.id.generation)).copied().unwrap_or_default();
                    let target = Target { service: svc.key, backend: SocketAddr::new(b.addr, b.port) };
                    BackendView {
                        addr: b.addr,
                        port: b.port,
                        weight: b.weight,
                        draining: b.state == BackendState::Draining,
                        healthy: health.get(&target).map(|h| h.healthy),
                        active_conns: bc.active_conns,
                        established_conns: bc.established_conns,
                        packets: bc.packets,
                        bytes: bc.bytes,
                        new_flows: bc.new_flows,
                    }
                })
                .collect(),
        });
    }
    view
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Renders the Prometheus text exposition (format 0.0.4) of the live state and the summed cores.
pub fn render(live: &LiveState, cores: &[CoreSnapshot]) -> String {
    render_with(live, cores, &[])
}

/// [`render`] with the interfaces' counters.
pub fn render_with(live: &LiveState, cores: &[CoreSnapshot], interfaces: &[InterfaceSnapshot]) -> String {
    let totals = sum(cores);
    let view = state_view(live, cores);
    let mut out = String::with_capacity(4096);
    let mut f = Family { out: &mut out };

    for (name, help, v) in [
        ("lb_rx_packets_total", "Frames received by the workers.", totals.rx),
        ("lb_tx_packets_total", "Frames transmitted by the workers.", totals.tx),
        ("lb_passed_packets_total", "Frames passed to the kernel (not for a VIP).", totals.passed),
        (
            "lb_nat_replies_handed_off_total",
            "Frames a core handed to another: NAT replies that arrived on a queue whose core does not own their SNAT port (to the core that does), ICMP errors about NAT flows it does not track (to every other core). Counted once per frame when handed; copies that found no room count in lb_handoff_lost_total; a frame handed over counts in lb_rx_packets_total on both cores.",
            totals.handed_off,
        ),
        ("lb_arp_replies_total", "ARP requests for the load balancer's addresses answered.", totals.arp_replies),
        (
            "lb_ndp_adverts_total",
            "IPv6 neighbour solicitations for the load balancer's addresses answered.",
            totals.ndp_adverts,
        ),
        (
            "lb_arp_conflicts_total",
            "ARP requests and replies from another host claiming an address the load balancer answers for (RFC 5227 conflicts, a gratuitous ARP of another owner: another node answering for the same VIPs, a backend announcing a VIP). Each address is defended with a broadcast ARP announcement at most once per 10 s.",
            totals.arp_conflicts,
        ),
        (
            "lb_nat_replies_total",
            "Full-NAT replies from backends translated back to their clients (on the core that owns their SNAT port).",
            totals.reverse_nat,
        ),
        (
            "lb_icmp_too_big_total",
            "Packets too big for the tunnel path (node.tunnel_mtu) answered with ICMP fragmentation needed / packet too big.",
            totals.icmp_too_big,
        ),
        (
            "lb_icmp_time_exceeded_total",
            "Full-NAT packets whose TTL / hop limit expired at a VIP or a SNAT address answered with ICMP time exceeded (at most node.time_exceeded_per_second, by default 1000, a second per core; the rest count as ttl_expired drops).",
            totals.icmp_time_exceeded,
        ),
        (
            "lb_tables_refused_total",
            "Tables a worker refused because their slot limits exceed its own; it kept serving its tables (an embedder's builder mismatch).",
            totals.tables_refused,
        ),
        (
            "lb_conntrack_evictions_total",
            "Connection-table entries evicted to make room for a new flow (oldest half-open first, then closing; never an established one).",
            totals.conntrack_evictions,
        ),
        (
            "lb_snat_port_evictions_total",
            "Full-NAT flows (half-open, else closing) evicted for their SNAT port: a new flow found every port it tried held by a live flow (a flood of SYNs or stray RSTs, or node.snat_ports too small for the load).",
            totals.snat_port_evictions,
        ),
        (
            "lb_affinity_not_recorded_total",
            "ClientIP affinity records not stored: the client's bucket in the connection table held only live entries, which a record never evicts, so the client's next flow is picked afresh and may reach another backend.",
            totals.affinity_not_recorded,
        ),
    ] {
        f.head(name, "counter", help);
        f.line(name, "", v);
    }
    f.head("lb_dropped_packets_total", "counter", "Frames dropped, by reason.");
    for r in DropReason::ALL {
        f.line("lb_dropped_packets_total", &format!("reason=\"{}\"", r.name()), totals.drops[r.index()]);
    }
    for (name, help, v) in [
        (
            "lb_handoff_lost_total",
            "NAT replies (or ICMP error copies) for another core lost because that core's inbox was full, or (as the \
             loops stop) its loop had left.",
            cores.iter().map(|c| c.handoff_lost).sum::<u64>(),
        ),
        (
            "lb_tx_abandoned_total",
            "Frames given up after the transmit ring made no progress for many flushes.",
            cores.iter().map(|c| c.tx_abandoned).sum(),
        ),
        (
            "lb_tx_declined_total",
            "Frames a worker marked for transmission (counted in lb_tx_packets_total) that its poll loop's device could not queue, and so lost: NAT replies (or ICMP errors) handed over from another core with no free buffer to copy them into (the transmit side backed up), or packets past their buffer.",
            cores.iter().map(|c| c.tx_declined).sum(),
        ),
        (
            "lb_xsk_rx_dropped_total",
            "Frames the kernel steered to the load balancer but dropped before its poll loops saw them: an AF_XDP socket's receive ring was full (a loop fell behind) or had no free buffer.",
            cores.iter().map(|c| c.xsk_rx_dropped).sum(),
        ),
    ] {
        f.head(name, "counter", help);
        f.line(name, "", v);
    }
    if !interfaces.is_empty() {
        let name = "lb_xdp_no_socket_total";
        f.head(
            name,
            "counter",
            "Frames an interface's XDP program steered to the load balancer that found no AF_XDP socket on their receive queue (a queue no poll loop serves, a socket not yet bound), passed to the kernel instead.",
        );
        for i in interfaces {
            f.line(name, &format!("interface=\"{}\"", esc(&i.interface)), i.xdp_no_socket);
        }
    }
    f.head("lb_conntrack_entries", "gauge", "Connection-table entries in use, per core.");
    for (i, c) in cores.iter().enumerate() {
        f.line("lb_conntrack_entries", &format!("core=\"{i}\""), c.conntrack_entries);
    }
    f.head("lb_conntrack_capacity", "gauge", "Connection-table capacity, per core.");
    for (i, c) in cores.iter().enumerate() {
        f.line("lb_conntrack_capacity", &format!("core=\"{i}\""), c.conntrack_capacity);
    }

    let svc_labels = |s: &ServiceView| {
        format!("service=\"{}\",proto=\"{}\",vip=\"{}\",port=\"{}\"", esc(&s.name), s.proto, s.vip, s.port)
    };
    type SvcField = fn(&ServiceView) -> u64;
    let svc_families: [(&str, &str, SvcField); 4] = [
        ("lb_service_packets_total", "Frames forwarded for the service.", |s| s.packets),
        ("lb_service_bytes_total", "Bytes forwarded for the service.", |s| s.bytes),
        ("lb_service_new_flows_total", "Flows scheduled for the service.", |s| s.new_flows),
        ("lb_service_dropped_packets_total", "Frames for the service that were dropped.", |s| s.drops),
    ];
    for (name, help, get) in svc_families {
        f.head(name, "counter", help);
        for s in &view.services {
            f.line(name, &svc_labels(s), get(s));
        }
    }
    f.head("lb_service_backends", "gauge", "Backends of the service taking new flows.");
    for s in &view.services {
        let n = s.backends.iter().filter(|b| !b.draining && b.weight > 0).count();
        f.line("lb_service_backends", &svc_labels(s), n);
    }

    type BackendField = fn(&BackendView) -> u64;
    let backend_families: [(&str, &str, &str, BackendField); 7] = [
        ("lb_backend_packets_total", "counter", "Frames forwarded to the backend.", |b| b.packets),
        ("lb_backend_bytes_total", "counter", "Bytes forwarded to the backend.", |b| b.bytes),
        ("lb_backend_new_flows_total", "counter", "Flows scheduled to the backend.", |b| b.new_flows),
        ("lb_backend_active_connections", "gauge", "Connection-table entries pointing at the backend.", |b| {
            b.active_conns
        }),
        ("lb_backend_established_connections", "gauge", "Of those, TCP connections in the established state.", |b| {
            b.established_conns
        }),
        ("lb_backend_weight", "gauge", "Configured weight.", |b| u64::from(b.weight)),
        ("lb_backend_draining", "gauge", "1 when the backend keeps its flows but takes no new ones.", |b| {
            u64::from(b.draining)
        }),
    ];
    for (name, kind, help, get) in backend_families {
        f.head(name, kind, help);
        for s in &view.services {
            for b in &s.backends {
                f.line(name, &format!("{},backend=\"{}\"", svc_labels(s), SocketAddr::new(b.addr, b.port)), get(b));
            }
        }
    }

    let health = live.health.lock().map(|h| h.clone()).unwrap_or_default();
    let mut targets: Vec<_> = health.iter().collect();
    targets.sort_by_key(|(t, _)| **t);
    let names: HashMap<_, _> =
        view.services.iter().map(|s| ((s.vip, s.port, s.proto.as_str()), s.name.as_str())).collect();
    let target_labels = |t: &Target| {
        let name = names.get(&(t.service.vip, t.service.port, proto_name(t.service.proto))).copied().unwrap_or("");
        format!(
            "service=\"{}\",proto=\"{}\",vip=\"{}\",port=\"{}\",backend=\"{}\"",
            esc(name),
            proto_name(t.service.proto),
            t.service.vip,
            t.service.port,
            t.backend
        )
    };
    f.head("lb_backend_healthy", "gauge", "1 when the backend passes its health check.");
    for (t, s) in &targets {
        f.line("lb_backend_healthy", &target_labels(t), u8::from(s.healthy));
    }
    f.head("lb_health_check_failures_total", "counter", "Failed health probes.");
    for (t, s) in &targets {
        f.line("lb_health_check_failures_total", &target_labels(t), s.failures);
    }
    f.head("lb_health_transitions_total", "counter", "Health changes, by direction.");
    for (t, s) in &targets {
        f.line("lb_health_transitions_total", &format!("{},to=\"down\"", target_labels(t)), s.went_down);
        f.line("lb_health_transitions_total", &format!("{},to=\"up\"", target_labels(t)), s.went_up);
    }

    f.head(
        "lb_health_fail_open",
        "gauge",
        "1 while every backend of the checked service that would take new flows fails its check, so the checks \
         are set aside and all of them take new flows (fail open).",
    );
    for s in live.services.iter().filter(|s| s.health_check.is_some()) {
        let key = s.config.key;
        let labels = format!(
            "service=\"{}\",proto=\"{}\",vip=\"{}\",port=\"{}\"",
            esc(&s.config.name),
            proto_name(key.proto),
            key.vip,
            key.port
        );
        f.line("lb_health_fail_open", &labels, u8::from(live.fail_open.contains(&key)));
    }

    f.head("lb_config_updates_total", "counter", "Configuration updates, by result.");
    f.line("lb_config_updates_total", "result=\"applied\"", live.applied);
    f.line("lb_config_updates_total", "result=\"rejected\"", live.rejected);
    f.head("lb_tables_version", "gauge", "Version of the tables the workers serve.");
    f.line("lb_tables_version", "", view.version);
    if let Some(tables) = &live.tables {
        let limits = tables.limits();
        let held = [
            ("services", live.services.len(), limits.max_services),
            ("backends", live.services.iter().map(|s| s.config.backends.len()).sum(), limits.max_backends),
            ("maglev_entries", tables.maglev_entries(), limits.max_maglev_entries),
        ];
        f.head(
            "lb_tables_held",
            "gauge",
            "What the tables hold, summed over services: services (keys), backends, Maglev table entries (mh, sh, \
             dh; up to 6 bytes each; of the distinct tables, one shared by services of the same scheduler, table \
             size and backends counted once).",
        );
        for (sum, v, _) in held {
            f.line("lb_tables_held", &format!("sum=\"{sum}\""), v);
        }
        f.head(
            "lb_tables_limit",
            "gauge",
            "The most the tables may hold of each sum: a Kubernetes Service that would pass one is left out, a \
             file is rejected.",
        );
        for (sum, _, max) in held {
            f.line("lb_tables_limit", &format!("sum=\"{sum}\""), max);
        }
    }
    f.head(
        "lb_maglev_entries_moved_total",
        "counter",
        "Maglev table entries that changed owner across updates: departed (backend left or drained), arrived \
         (new backend), between_kept (moved between backends serving before and after); and rehashed, the \
         entries' worth of new flows that changed backend because a table was indexed anew (a switch between mh, \
         sh and dh, ClientIP affinity of mh on or off, a new node.hash_seed), that update's departures and \
         arrivals included.",
    );
    let m = live.maglev_moves;
    let causes =
        [("departed", m.departed), ("arrived", m.arrived), ("between_kept", m.between_kept), ("rehashed", m.rehashed)];
    for (cause, v) in causes {
        f.line("lb_maglev_entries_moved_total", &format!("cause=\"{cause}\""), v);
    }
    f.head(
        "lb_kubernetes_skipped",
        "gauge",
        "Kubernetes Services or keys left out of the last tables: by the translation, refused on their own, or beyond a limit of the sums over all services.",
    );
    f.line("lb_kubernetes_skipped", "", live.k8s_skipped);
    if let Some(feed) = &live.feed {
        use std::sync::atomic::Ordering::Relaxed;
        for (name, help, v) in [
            (
                "lb_kubernetes_watch_errors_total",
                "List/watch errors (410 Gone, dropped connections), each followed by back-off and recovery.",
                &feed.watch_errors,
            ),
            ("lb_kubernetes_lists_total", "Complete lists and re-lists applied.", &feed.lists),
            ("lb_kubernetes_translations_total", "Translations sent to the control loop.", &feed.translations),
        ] {
            f.head(name, "counter", help);
            f.line(name, "", v.load(Relaxed));
        }
    }
    out
}

/// The path that answers 200 once the node serves what it was configured to, 503 (saying why)
/// until then: [`LiveState::not_ready`]. The DaemonSet's readiness probe (deploy/), so that a rolling
/// update waits for each node to serve its cluster's Services before it restarts the next.
pub const READY_PATH: &str = "/ready";

/// The path that answers 200 at once, rendering nothing, while the control plane's runtime answers
/// at all: the DaemonSet's liveness probe (deploy/). `/metrics` renders every series of every
/// service and backend (megabytes for a large cluster), which a probe every few seconds must not
/// cost, nor wait its turn for behind Prometheus's scrapes under the kubelet's 1 s timeout.
pub const LIVE_PATH: &str = "/livez";

/// A listening TCP socket on `addr`, for tokio's `TcpListener::from_std`. On the IPv6 unspecified
/// address (`[::]`) it takes IPv4 clients too (`IPV6_V6ONLY` off, as Go's listeners, kube-proxy's,
/// set it), whatever `net.ipv6.bindv6only` the node sets; on a kernel without IPv6 it is the IPv4
/// unspecified address instead. So one `[::]:PORT` serves both families on any node.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol as Proto, Socket, Type};
    let any_v6 = addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
    let socket = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Proto::TCP)) {
        Err(e) if any_v6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return bind_listener(SocketAddr::from(([0, 0, 0, 0], addr.port())));
        }
        socket => socket?,
    };
    if any_v6 {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Requests rendered at once: two, so `lb list` is not queued behind a Prometheus scrape alone.
const RENDERS: usize = 2;

/// Connections one client address may hold open at once; the next is closed as soon as accepted.
const CONNECTIONS_PER_PEER: usize = 16;

/// Serves `GET /metrics`, `GET /state`, [`READY_PATH`] and [`LIVE_PATH`] on `listener` until the task
/// is dropped.
///
/// Each client address holds at most 16 connections (`CONNECTIONS_PER_PEER`) at once: one that opens
/// connections and sends nothing (slowloris) would otherwise hold as many descriptors as it likes,
/// 5 s each, in the process that also probes the backends and watches the cluster.
///
/// Counters are gathered and rendered on tokio's blocking threads, two requests at a time (`RENDERS`):
/// the runtime's own threads also run the control loop, the health probes, the Kubernetes feed and
/// the health check node ports, and a large state's render, or many scrapes at once, would hold
/// them (probes then time out, and healthy backends go down). Further requests wait their turn.
pub async fn serve(listener: TcpListener, live: watch::Receiver<LiveState>, source: Arc<dyn StatsSource>) {
    let renders = Arc::new(tokio::sync::Semaphore::new(RENDERS));
    let open: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors (EMFILE), the waiting connection stays in the backlog and every
                // accept fails at once: retried at once, this would spin a control thread and flood
                // the log. As hyper does, wait a second.
                tracing::warn!(error = %e, "metrics accept failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(held) = PeerConnection::open(&open, peer.ip()) else {
            tracing::debug!(%peer, "metrics client holds {CONNECTIONS_PER_PEER} connections already; closed");
            continue;
        };
        let live = live.clone();
        let source = source.clone();
        let renders = renders.clone();
        tokio::spawn(async move {
            let _held = held;
            if let Err(e) = tokio::time::timeout(Duration::from_secs(5), answer(sock, live, source, renders)).await {
                tracing::debug!(%peer, error = %e, "metrics request timed out");
            }
        });
    }
}

/// One open connection of a client address, counted in the endpoint's table until dropped.
struct PeerConnection {
    open: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    peer: std::net::IpAddr,
}

impl PeerConnection {
    /// Counts a connection of `peer`, unless it holds [`CONNECTIONS_PER_PEER`] already.
    fn open(open: &Arc<Mutex<HashMap<std::net::IpAddr, usize>>>, peer: std::net::IpAddr) -> Option<Self> {
        let mut table = open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = table.entry(peer).or_default();
        if *n >= CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerConnection { open: open.clone(), peer })
    }
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        let mut table = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = table.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.peer);
            }
        }
    }
}

/// What a route answers with: the live state, the cores' and the interfaces' counters, as text.
type Render = fn(&LiveState, &[CoreSnapshot], &[InterfaceSnapshot]) -> String;

/// `render` of the live state and of `source`'s snapshots, on a blocking thread once `renders` has
/// a permit; `None` if that thread panicked. The permit is held until the render ends, even when
/// the request that asked for it has timed out, so renders never pile up.
async fn off_runtime(
    render: Render,
    live: &watch::Receiver<LiveState>,
    source: Arc<dyn StatsSource>,
    renders: Arc<tokio::sync::Semaphore>,
) -> Option<String> {
    let permit = renders.acquire_owned().await.ok()?;
    let live = live.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        // Rendered from a copy, so the control loop's updates never wait on a render.
        let live = live.borrow().clone();
        render(&live, &source.snapshots(), &source.interfaces())
    })
    .await
    .ok()
}

fn state_json(live: &LiveState, cores: &[CoreSnapshot], _interfaces: &[InterfaceSnapshot]) -> String {
    serde_json::to_string(&state_view(live, cores)).unwrap_or_default()
}

async fn answer(
    mut sock: TcpStream,
    live: watch::Receiver<LiveState>,
    source: Arc<dyn StatsSource>,
    renders: Arc<tokio::sync::Semaphore>,
) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 8192 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let route: Option<(Render, &str)> = match (method, path) {
        ("GET", "/metrics") => Some((render_with, "text/plain; version=0.0.4; charset=utf-8")),
        ("GET", "/state") => Some((state_json, "application/json")),
        _ => None,
    };
    let (status, ctype, body) = match (route, method) {
        (Some((f, ctype)), _) => match off_runtime(f, &live, source, renders).await {
            Some(body) => ("200 OK", ctype, body),
            None => ("500 Internal Server Error", "text/plain", "rendering failed\n".to_string()),
        },
        // Nothing to render: answered at once, never queued behind a scrape.
        (None, "GET") if path == READY_PATH => match live.borrow().not_ready() {
            None => ("200 OK", "text/plain", "ready\n".to_string()),
            Some(why) => ("503 Service Unavailable", "text/plain", format!("not ready: {why}\n")),
        },
        (None, "GET") if path == LIVE_PATH => ("200 OK", "text/plain", "alive\n".to_string()),
        (None, "GET") => {
            ("404 Not Found", "text/plain", format!("try /metrics, /state, {READY_PATH} or {LIVE_PATH}\n"))
        }
        (None, _) => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::parse;
    use crate::control::{Control, ControlInput, RecordingSink};

    /// `[::]:PORT` takes IPv4 clients on a node whose `net.ipv6.bindv6only` is 1 (tokio's bind left
    /// the kernel's default, so there the metrics endpoint and the health check node ports took IPv6
    /// alone, and the probes and cloud health checks of IPv4 were refused). In a network namespace
    /// of its own, as root.
    #[test]
    fn the_ipv6_unspecified_address_takes_ipv4_whatever_bindv6only_says() {
        use lb_io::netns::{Netns, can_create_namespaces};
        if let Err(reason) = can_create_namespaces() {
            return println!("SKIPPED: {reason}");
        }
        let ns = Netns::create(&format!("lbv6only{}", std::process::id())).expect("namespace");
        ns.exec("sysctl", &["-qw", "net.ipv6.bindv6only=1"]).expect("bindv6only");
        std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter().expect("enter the namespace");
                let listener = bind_listener("[::]:0".parse().unwrap()).unwrap();
                let port = listener.local_addr().unwrap().port();
                let v4 = std::net::TcpStream::connect(("127.0.0.1", port));
                assert!(v4.is_ok(), "an IPv4 client of [::]:{port}: {v4:?}");
                let v6 = std::net::TcpStream::connect(("::1", port));
                assert!(v6.is_ok(), "an IPv6 client of [::]:{port}: {v6:?}");
            });
        });
    }

    const YAML: &str = r#"
node: { snat_v4: 10.0.0.2, gateway_mac: "02:00:00:00:00:fe" }
services:
  - name: "web \"main\""
    vip: 10.0.0.10
    port: 80
    scheduler: wlc
    affinity_timeout: 600
    backends: [{ addr: 10.1.0.1, port: 8080, weight: 3 }, { addr: 10.1.0.2, port: 8080, state: draining }]
  - { name: dns, vip: 10.0.0.53, port: 53, protocol: udp, scheduler: rr, backends: [{ addr: 10.1.0.9 }] }
"#;

    /// Two cores with different counts for the same slots.
    fn cores(tables: &Tables) -> Vec<CoreSnapshot> {
        let web = &tables.services()[0];
        (1..=2u64)
            .map(|k| {
                let mut c = CoreSnapshot {
                    rx: 100 * k,
                    tx: 90 * k,
                    handed_off: 4 * k,
                    handoff_lost: 5 * k,
                    tx_abandoned: 6 * k,
                    tx_declined: 8 * k,
                    xsk_rx_dropped: 9 * k,
                    arp_replies: 3 * k,
                    ndp_adverts: k,
                    arp_conflicts: 13 * k,
                    icmp_too_big: 2 * k,
                    icmp_time_exceeded: 5 * k,
                    reverse_nat: 11 * k,
                    tables_refused: k,
                    conntrack_evictions: 7 * k,
                    snat_port_evictions: 8 * k,
                    affinity_not_recorded: 12 * k,
                    conntrack_entries: 10 * k,
                    conntrack_capacity: 1000,
                    ..Default::default()
                };
                c.drops[DropReason::NoBackend.index()] = k;
                c.services.insert(
                    (web.slot.0, web.generation),
                    ServiceCounters { packets: 50 * k, bytes: 5000 * k, new_flows: 5 * k, drops: k },
                );
                c.backends.insert(
                    (web.backends[0].id.slot, web.backends[0].id.generation),
                    BackendCounters {
                        packets: 40 * k,
                        bytes: 4000,
                        new_flows: 4,
                        active_conns: 2 * k,
                        established_conns: k,
                    },
                );
                c
            })
            .collect()
    }

    /// The poll loops' own counts (here: frames abandoned on a stuck transmit ring) reach each
    /// core's snapshot beside its worker's.
    #[test]
    fn published_counters_carry_each_poll_loops_counts() {
        use lb_io::{LoopConfig, MemoryConfig, MemoryDevice, PollLoop, StopFlag, update_channel};
        let mut dev = MemoryDevice::new(MemoryConfig { tx_per_flush: 0, ..MemoryConfig::default() });
        for _ in 0..3 {
            dev.push_rx(&[0u8; 60]);
        }
        let (_tx, rx) = update_channel::<lb_io::MacRewrite>();
        let config = LoopConfig { max_stalled_flushes: 2, ..LoopConfig::default() };
        let lp = PollLoop::new(dev, lb_io::MacRewrite { src: [2; 6], dst: [4; 6] }, rx, StopFlag::new(), config);
        let published =
            PublishedCounters(vec![Arc::new(Mutex::new(CoreCounters::default()))], vec![lp.counters()], Vec::new());
        let report = lp.run().unwrap();
        assert_eq!(report.stats.tx_abandoned, 3);
        let cores = published.snapshots();
        assert_eq!((cores.len(), cores[0].tx_abandoned, cores[0].handoff_lost), (1, 3, 0));
        // And what the kernel dropped before the loop's device (an AF_XDP socket's full ring).
        let mut dev = MemoryDevice::new(MemoryConfig::default());
        dev.count_kernel_rx_dropped(4);
        let (_tx, rx) = update_channel::<lb_io::MacRewrite>();
        let lp = PollLoop::new(dev, lb_io::MacRewrite { src: [2; 6], dst: [4; 6] }, rx, StopFlag::new(), config);
        let published =
            PublishedCounters(vec![Arc::new(Mutex::new(CoreCounters::default()))], vec![lp.counters()], Vec::new());
        lp.run().unwrap();
        assert_eq!(published.snapshots()[0].xsk_rx_dropped, 4);
        // And what its device declined: three frames handed over by another loop, which its device
        // (one buffer, the wire stuck) has room to copy once.
        let ends = lb_io::mesh(2, lb_io::HandoffConfig::default()).unwrap();
        for _ in 0..3 {
            assert!(ends[0].send(1, &[0u8; 60]));
        }
        let dev = MemoryDevice::new(MemoryConfig { buffers: 1, tx_per_flush: 0, ..MemoryConfig::default() });
        let (_tx, rx) = update_channel::<lb_io::MacRewrite>();
        let lp = PollLoop::new(dev, lb_io::MacRewrite { src: [2; 6], dst: [4; 6] }, rx, StopFlag::new(), config)
            .with_handoff(ends[1].clone());
        let published =
            PublishedCounters(vec![Arc::new(Mutex::new(CoreCounters::default()))], vec![lp.counters()], Vec::new());
        let report = lp.run().unwrap();
        assert_eq!((report.stats.handed_in, report.stats.tx_declined), (3, 2));
        assert_eq!(published.snapshots()[0].tx_declined, 2);
    }

    /// Frames each interface's XDP program steered to a queue with no AF_XDP socket are in
    /// /metrics, per interface, as the program's counter map reads.
    #[test]
    fn frames_steered_to_a_queue_with_no_socket_are_in_the_metrics_per_interface() {
        use lb_io::bpf::xdp::{SteeringConfig, VipSteering, XdpAction};
        let mut steering = match VipSteering::load(SteeringConfig::default()) {
            Ok(s) => s,
            Err(e) if e.is_refused() => return println!("SKIPPED: bpf(2) refused ({e})"),
            Err(e) => panic!("{e}"),
        };
        steering.set_vips(["10.0.0.10".parse().unwrap()]).unwrap();
        let mut frame = vec![0u8; 14 + 20 + 8];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[14 + 9] = 17;
        frame[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 10]);
        for _ in 0..5 {
            assert_eq!(steering.test_run(&frame).unwrap(), XdpAction::Pass, "no socket in queue 0's slot");
        }
        let published = PublishedCounters(
            Vec::new(),
            Vec::new(),
            vec![("eth1".into(), steering.counters().unwrap()), ("eth2".into(), steering.counters().unwrap())],
        );
        let interfaces = published.interfaces();
        assert_eq!(interfaces.len(), 2);
        assert_eq!((interfaces[0].interface.as_str(), interfaces[0].xdp_no_socket), ("eth1", 5));
        let live = Control::new(RecordingSink::default()).subscribe().borrow().clone();
        let text = render_with(&live, &published.snapshots(), &interfaces);
        for want in [
            "# TYPE lb_xdp_no_socket_total counter",
            "lb_xdp_no_socket_total{interface=\"eth1\"} 5",
            "lb_xdp_no_socket_total{interface=\"eth2\"} 5",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }

    /// What the tables hold of each sum over services, beside the limit the control loop admits
    /// Kubernetes Services and files within.
    #[tokio::test]
    async fn the_sums_over_services_are_shown_beside_their_limits() {
        let limits = lb_core::service::Limits { max_services: 10, max_backends: 20, max_maglev_entries: 5000 };
        let mut control = Control::with_limits(RecordingSink::default(), limits);
        let yaml =
            YAML.replace("scheduler: wlc\n    affinity_timeout: 600", "scheduler: mh\n    maglev_table_size: 1009");
        control.apply(ControlInput::File(Box::new(parse(&yaml).unwrap()))).unwrap();
        let text = render(&control.subscribe().borrow().clone(), &[]);
        for want in [
            "# TYPE lb_tables_held gauge",
            "lb_tables_held{sum=\"services\"} 2",
            "lb_tables_held{sum=\"backends\"} 3",
            "lb_tables_held{sum=\"maglev_entries\"} 1009",
            "lb_tables_limit{sum=\"services\"} 10",
            "lb_tables_limit{sum=\"backends\"} 20",
            "lb_tables_limit{sum=\"maglev_entries\"} 5000",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }

    /// Services of the same scheduler, table size and backends hold one Maglev table: the entries
    /// held count it once.
    #[tokio::test]
    async fn the_maglev_entries_held_count_a_shared_table_once() {
        let limits = lb_core::service::Limits { max_services: 10, max_backends: 20, max_maglev_entries: 5000 };
        let mut control = Control::with_limits(RecordingSink::default(), limits);
        let service = |name: &str, vip: &str| {
            format!(
                "  - {{ name: {name}, vip: {vip}, port: 80, scheduler: mh, maglev_table_size: 1009, \
                 backends: [{{ addr: 10.1.0.1, port: 8080 }}, {{ addr: 10.1.0.2, port: 8080 }}] }}\n"
            )
        };
        let yaml = String::from("node: { snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }\nservices:\n")
            + &service("a", "10.0.0.10")
            + &service("b", "10.0.0.11");
        control.apply(ControlInput::File(Box::new(parse(&yaml).unwrap()))).unwrap();
        let text = render(&control.subscribe().borrow().clone(), &[]);
        let want = "lb_tables_held{sum=\"maglev_entries\"} 1009";
        assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
    }

    /// Each cause of moved Maglev entries has its line, a rehash's too.
    #[test]
    fn maglev_moves_are_exported_by_cause() {
        let maglev_moves = crate::control::MaglevMoves { departed: 1, arrived: 2, between_kept: 3, rehashed: 807 };
        let text = render(&LiveState { maglev_moves, ..Default::default() }, &[]);
        for (cause, v) in [("departed", 1), ("arrived", 2), ("between_kept", 3), ("rehashed", 807)] {
            let want = format!("lb_maglev_entries_moved_total{{cause=\"{cause}\"}} {v}");
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }

    #[tokio::test]
    async fn metrics_sum_cores_and_label_everything() {
        let mut control = Control::new(RecordingSink::default());
        let tables = control.apply(ControlInput::File(Box::new(parse(YAML).unwrap()))).unwrap();
        let live = control.subscribe().borrow().clone();
        let text = render(&live, &cores(&tables));
        let web = r#"service="web \"main\"",proto="tcp",vip="10.0.0.10",port="80""#;
        for want in [
            "lb_rx_packets_total 300".to_string(),
            "lb_arp_replies_total 9".into(),
            "lb_nat_replies_handed_off_total 12".into(),
            "lb_handoff_lost_total 15".into(),
            "lb_tx_abandoned_total 18".into(),
            "lb_tx_declined_total 24".into(),
            "lb_xsk_rx_dropped_total 27".into(),
            "lb_ndp_adverts_total 3".into(),
            "lb_arp_conflicts_total 39".into(),
            "lb_icmp_too_big_total 6".into(),
            "lb_icmp_time_exceeded_total 15".into(),
            "lb_nat_replies_total 33".into(),
            "lb_tables_refused_total 3".into(),
            "lb_conntrack_evictions_total 21".into(),
            "lb_snat_port_evictions_total 24".into(),
            "lb_affinity_not_recorded_total 36".into(),
            "lb_dropped_packets_total{reason=\"no_backend\"} 3".into(),
            "lb_dropped_packets_total{reason=\"conntrack_full\"} 0".into(),
            "lb_conntrack_entries{core=\"1\"} 20".into(),
            format!("lb_service_packets_total{{{web}}} 150"),
            format!("lb_service_backends{{{web}}} 1"),
            format!("lb_backend_active_connections{{{web},backend=\"10.1.0.1:8080\"}} 6"),
            format!("lb_backend_draining{{{web},backend=\"10.1.0.2:8080\"}} 1"),
            format!("lb_backend_weight{{{web},backend=\"10.1.0.1:8080\"}} 3"),
            "lb_config_updates_total{result=\"applied\"} 1".into(),
            "# TYPE lb_backend_active_connections gauge".into(),
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
        // Every sample line is NAME{labels} VALUE or NAME VALUE with a number.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample {l:?}");
        }
    }

    /// A TCP SYN from 192.0.2.8:40000 to 10.0.0.10:80 (checksums are not checked).
    fn web_syn() -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0xc1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 8, 10, 0, 0, 10]);
        f.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
        f
    }

    /// ClientIP affinity records the connection table had no room for reach /metrics, from the
    /// buffer a poll loop publishes into as from a snapshot.
    #[tokio::test]
    async fn affinity_records_left_out_for_want_of_room_are_in_the_metrics() {
        let mut control = Control::new(RecordingSink::default());
        let tables = control.apply(ControlInput::File(Box::new(parse(YAML).unwrap()))).unwrap();
        // One 8-way bucket: three NAT-ed queries (a forward and a reverse entry each) and the web
        // client's flow fill it, and that client's affinity record finds no room.
        let mut w = lb_core::Worker::new(tables, lb_core::WorkerConfig::single_core(8));
        let mut send = |mut buf: Vec<u8>| {
            let mut frames = [lb_core::Frame::whole(&mut buf)];
            let mut verdicts = [lb_core::Verdict::Pass];
            w.process_burst(&mut frames, lb_core::Instant::from_nanos(1_000_000_000), &mut verdicts);
            assert_eq!(verdicts[0], lb_core::Verdict::Tx);
        };
        for sport in 0..3 {
            send(dns_query(40000 + sport));
        }
        send(web_syn());
        assert_eq!((w.conntrack().len(), w.stats().affinity_not_recorded), (8, 1));
        let mut published = CoreCounters::with_capacity(lb_core::service::Limits {
            max_services: 4,
            max_backends: 8,
            ..Default::default()
        });
        published.fill(w.stats(), w.tables(), w.conntrack().len(), w.conntrack().capacity());
        let live = control.subscribe().borrow().clone();
        for cores in [vec![published.to_snapshot()], vec![CoreSnapshot::from_stats(w.stats(), w.tables(), 8, 8)]] {
            let text = render(&live, &cores);
            assert!(text.lines().any(|l| l == "lb_affinity_not_recorded_total 1"), "{text}");
            assert!(text.contains("# TYPE lb_affinity_not_recorded_total counter"), "{text}");
        }
    }

    /// A UDP datagram from 192.0.2.7:`sport` to 10.0.0.53:53 (checksums are not checked).
    fn dns_query(sport: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0xc1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 7, 10, 0, 0, 53]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&[0, 53, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        f
    }

    /// Backend 10.1.0.9 leaves dns and 10.1.0.8 joins (the builder gives it the freed slot). A
    /// core still on the old tables (between the control side's publish and that core's swap, or
    /// whose publish after the swap missed the lock and that has had no traffic since) reports the
    /// slot with the old backend's counts; `sum` adds them by slot number alone, so the newcomer's
    /// series shows packets it never got, and falls back when that core catches up (a counter
    /// going backwards).
    #[tokio::test]
    async fn a_reused_backend_slot_does_not_show_its_former_backends_counts() {
        let before = YAML;
        let after = YAML.replace("backends: [{ addr: 10.1.0.9 }]", "backends: [{ addr: 10.1.0.8 }]");
        let mut control = Control::new(RecordingSink::default());
        let old = control.apply(ControlInput::File(Box::new(parse(before).unwrap()))).unwrap();
        let new = control.apply(ControlInput::File(Box::new(parse(&after).unwrap()))).unwrap();
        let dns = |t: &Arc<Tables>| t.services().iter().find(|s| s.name == "dns").unwrap().backends[0].id.slot;
        let (old_dns, new_dns) = (dns(&old), dns(&new));
        assert_eq!(old_dns, new_dns, "the slot is reused");

        let core = |tables: &Arc<Tables>, queries: u16| {
            let mut w = lb_core::Worker::new(tables.clone(), lb_core::WorkerConfig::single_core(1024));
            for sport in 0..queries {
                let mut buf = dns_query(40000 + sport);
                let mut frames = [lb_core::Frame::whole(&mut buf)];
                let mut verdicts = [lb_core::Verdict::Pass];
                w.process_burst(&mut frames, lb_core::Instant::from_nanos(1_000_000_000), &mut verdicts);
                assert_eq!(verdicts[0], lb_core::Verdict::Tx);
            }
            CoreSnapshot::from_stats(w.stats(), w.tables(), 0, 1024)
        };
        // Core 0 forwarded 5 queries to 10.1.0.9 and still runs the old tables; core 1 runs the new.
        let cores = [core(&old, 5), core(&new, 0)];
        let live = control.subscribe().borrow().clone();
        let text = render(&live, &cores);
        let newcomer =
            r#"lb_backend_packets_total{service="dns",proto="udp",vip="10.0.0.53",port="53",backend="10.1.0.8:53"}"#;
        let line = text.lines().find(|l| l.starts_with(newcomer)).unwrap();
        assert_eq!(line, format!("{newcomer} 0"), "10.1.0.8 was sent nothing");
    }

    /// A scrape whose counters take long to gather and render (a large state, or many scrapes at
    /// once) must not hold the control runtime's threads, which also run the control loop, the
    /// health probes, the Kubernetes feed and the health check node ports: here the runtime has one
    /// thread, the only scrape's snapshot waits until released, and another request on the endpoint
    /// (a path that renders nothing) is answered meanwhile. Before, the snapshot and the render ran
    /// on the runtime's thread: nothing else ran until they were done.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_scrape_does_not_hold_the_control_runtime() {
        use std::io::{Read as _, Write as _};
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let held = gate.clone();
        let entered_tx = Mutex::new(entered_tx);
        let source: Arc<dyn StatsSource> = Arc::new(move || {
            let _ = entered_tx.lock().unwrap().send(());
            let (open, cv) = &*held;
            let _open = cv.wait_while(open.lock().unwrap(), |o| !*o).unwrap();
            Vec::new()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let live = watch::Sender::new(LiveState::default());
        tokio::spawn(serve(listener, live.subscribe(), source));

        // From threads of their own: the runtime's one thread may be held. The read timeout only
        // ends a failing run (the held thread never answers the other request, and the gate opens
        // only once it has its answer or error): generous, so a loaded machine never trips it.
        let get = move |path: &str| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).map(|_| out)
        };
        let scrape = std::thread::spawn(move || get("/metrics"));
        let other = std::thread::spawn(move || {
            entered.recv().unwrap();
            let answer = get("/nope");
            let (open, cv) = &*gate;
            *open.lock().unwrap() = true;
            cv.notify_all();
            answer
        });
        let (other, scrape) =
            tokio::task::spawn_blocking(move || (other.join().unwrap(), scrape.join().unwrap())).await.unwrap();
        let other = other.expect("the other request is answered while the scrape's snapshot waits");
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        assert!(scrape.unwrap().starts_with("HTTP/1.1 200 OK"));
    }

    /// A client that opens connections and sends nothing (slowloris) holds at most
    /// `CONNECTIONS_PER_PEER` of them: the next from its address is closed at once, while another
    /// address (the node's Prometheus, `lb list`) is still answered. Before, each was held until the
    /// 5 s request timeout, as many as the client opened, each a descriptor of the process that also
    /// probes backends and watches the cluster.
    #[tokio::test]
    async fn a_client_holding_idle_connections_gets_no_more_than_its_share() {
        let source: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let live = watch::Sender::new(LiveState::default());
        tokio::spawn(serve(listener, live.subscribe(), source));

        let mut idle = Vec::new();
        for _ in 0..CONNECTIONS_PER_PEER {
            // (Accepted in the order they connect.)
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(3), extra.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0) | Err(_))),
            "a connection beyond the peer's share is closed at once: {closed:?}"
        );

        let other = std::net::SocketAddr::new(std::net::Ipv4Addr::new(127, 0, 0, 2).into(), 0);
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(other).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        s.write_all(b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        drop(idle);
    }

    #[tokio::test]
    async fn http_serves_metrics_and_state() {
        let mut control = Control::new(RecordingSink::default());
        let tables = control.apply(ControlInput::File(Box::new(parse(YAML).unwrap()))).unwrap();
        let snaps = cores(&tables);
        let source: Arc<dyn StatsSource> = Arc::new(move || snaps.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, control.subscribe(), source));

        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n") && m.contains("text/plain; version=0.0.4"));
        assert!(m.contains("lb_tx_packets_total 270"));
        let s = get("/state").await;
        let body = s.split("\r\n\r\n").nth(1).unwrap();
        let view: StateView = serde_json::from_str(body).unwrap();
        assert_eq!(view.services.len(), 2);
        assert_eq!(view.conntrack_entries, 30);
        let web = view.services.iter().find(|s| s.port == 80).unwrap();
        assert_eq!((web.scheduler.as_str(), web.persistent_secs), ("wlc", Some(600)));
        assert_eq!(web.backends[0].active_conns, 6);
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }
}
