//! The configuration the control side hands to lb-core: virtual services, their backends, and the
//! node-wide settings the rewrite needs. Plain data with no I/O; a YAML file, a Kubernetes feed or a test
//! builds it, and the table builder (see `service`) validates it whole before any worker sees it.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::str::FromStr;
use core::time::Duration;

/// Transport protocol of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The protocol for an IP protocol number, if it is one a service can carry.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// What identifies a virtual service: the VIP, the port and the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Virtual IP address the clients connect to.
    pub vip: IpAddr,
    /// Destination port on the VIP.
    pub port: u16,
    /// Transport protocol.
    pub proto: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        match self.vip {
            IpAddr::V4(a) => write!(f, "{proto} {a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "{proto} [{a}]:{}", self.port),
        }
    }
}

/// How a forwarded frame reaches its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardMode {
    /// Full NAT: destination rewritten to the backend, source to the node's SNAT address and a port
    /// the node owns; replies are translated back. The backend needs no special routing.
    Nat,
    /// Direct server return (IPVS "DR"): only the Ethernet destination changes to the backend's MAC.
    /// The backend holds the VIP on a loopback and answers the client directly.
    Dsr,
    /// IP-in-IP (IPVS "TUN"): the frame is wrapped in an outer IP header of the same family, from the
    /// node's tunnel address to the backend.
    IpIp,
    /// GUE (Generic UDP Encapsulation, variant 0) to the given UDP port on the backend; the outer UDP
    /// source port comes from the flow hash so the backend's NIC spreads flows across queues.
    Gue {
        /// Destination UDP port of the outer header.
        port: u16,
    },
}

/// A backend-selection algorithm, chosen per service by name as `ipvsadm -s` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// Weighted Maglev consistent hashing over the 5-tuple ("mh", "maglev").
    Maglev,
    /// Weighted rendezvous (highest random weight) hashing ("hrw", "rendezvous").
    Rendezvous,
    /// L3 ECMP next-hop selection over (source, destination), hash-threshold ("ecmp").
    Ecmp,
    /// Round robin ("rr").
    RoundRobin,
    /// Weighted round robin ("wrr").
    WeightedRoundRobin,
    /// Least connections, counted per core ("lc").
    LeastConnections,
    /// Weighted least connections, counted per core ("wlc").
    WeightedLeastConnections,
    /// Source hashing ("sh").
    SourceHashing,
    /// Destination hashing ("dh").
    DestinationHashing,
    /// Shortest expected delay ("sed").
    ShortestExpectedDelay,
    /// Never queue ("nq").
    NeverQueue,
}

impl SchedulerKind {
    /// Every scheduler, in the order `ipvsadm` documents its names.
    pub const ALL: [SchedulerKind; 11] = [
        SchedulerKind::RoundRobin,
        SchedulerKind::WeightedRoundRobin,
        SchedulerKind::LeastConnections,
        SchedulerKind::WeightedLeastConnections,
        SchedulerKind::DestinationHashing,
        SchedulerKind::SourceHashing,
        SchedulerKind::ShortestExpectedDelay,
        SchedulerKind::NeverQueue,
        SchedulerKind::Maglev,
        SchedulerKind::Rendezvous,
        SchedulerKind::Ecmp,
    ];

    /// True when the scheduler picks from a Maglev table (mh, sh, dh), the only ones a service's
    /// `maglev_table_size` applies to.
    pub const fn uses_maglev_table(self) -> bool {
        matches!(self, SchedulerKind::Maglev | SchedulerKind::SourceHashing | SchedulerKind::DestinationHashing)
    }

    /// True when the scheduler's pick is a function of the flow and the tables alone (mh, sh, dh,
    /// hrw, ecmp): every core, and every load balancer with the same tables, gives a flow the same
    /// backend. The others (rr, wrr, lc, wlc, sed, nq) also read per-core state.
    pub const fn picks_from_flow_alone(self) -> bool {
        matches!(
            self,
            SchedulerKind::Maglev
                | SchedulerKind::Rendezvous
                | SchedulerKind::Ecmp
                | SchedulerKind::SourceHashing
                | SchedulerKind::DestinationHashing
        )
    }

    /// The short name, as `ipvsadm -Ln` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            SchedulerKind::Maglev => "mh",
            SchedulerKind::Rendezvous => "hrw",
            SchedulerKind::Ecmp => "ecmp",
            SchedulerKind::RoundRobin => "rr",
            SchedulerKind::WeightedRoundRobin => "wrr",
            SchedulerKind::LeastConnections => "lc",
            SchedulerKind::WeightedLeastConnections => "wlc",
            SchedulerKind::SourceHashing => "sh",
            SchedulerKind::DestinationHashing => "dh",
            SchedulerKind::ShortestExpectedDelay => "sed",
            SchedulerKind::NeverQueue => "nq",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scheduler name that is not one of [`SchedulerKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scheduler {0:?}: expected one of rr, wrr, lc, wlc, dh, sh, sed, nq, mh (maglev), hrw (rendezvous), ecmp"
)]
pub struct UnknownScheduler(pub String);

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kind = match s.to_ascii_lowercase().as_str() {
            "mh" | "maglev" => SchedulerKind::Maglev,
            "hrw" | "rendezvous" => SchedulerKind::Rendezvous,
            "ecmp" => SchedulerKind::Ecmp,
            "rr" => SchedulerKind::RoundRobin,
            "wrr" => SchedulerKind::WeightedRoundRobin,
            "lc" => SchedulerKind::LeastConnections,
            "wlc" => SchedulerKind::WeightedLeastConnections,
            "sh" => SchedulerKind::SourceHashing,
            "dh" => SchedulerKind::DestinationHashing,
            "sed" => SchedulerKind::ShortestExpectedDelay,
            "nq" => SchedulerKind::NeverQueue,
            _ => return Err(UnknownScheduler(String::from(s))),
        };
        Ok(kind)
    }
}

/// Whether a backend takes new flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendState {
    /// Takes new flows in proportion to its weight.
    #[default]
    Active,
    /// Keeps the flows it has and takes no new ones (Kubernetes "serving but terminating", a failed
    /// health check with a keep policy, or weight 0).
    Draining,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendConfig {
    /// The backend's address, of the VIP's family in every mode (NAT and the tunnels rewrite to one
    /// family; a DSR backend holds the VIP itself).
    pub addr: IpAddr,
    /// The backend's port; for DSR and tunnel modes it must equal the service port.
    pub port: u16,
    /// Relative weight; 0 takes no new flows, as [`BackendState::Draining`].
    pub weight: u32,
    /// The backend's (or its next hop's) MAC address. `None` uses the node's gateway MAC, except in
    /// DSR, which needs the backend's own (the frame stays addressed to the VIP, so a router would
    /// send it back): a DSR backend without one is a configuration error.
    pub mac: Option<[u8; 6]>,
    /// Active or draining.
    pub state: BackendState,
}

impl BackendConfig {
    /// An active backend of weight 1 reached through the node's gateway MAC.
    pub fn new(addr: IpAddr, port: u16) -> Self {
        BackendConfig { addr, port, weight: 1, mac: None, state: BackendState::Active }
    }

    /// True if the backend takes new flows: active, with a weight above 0 (as the built tables'
    /// `Backend::takes_new_flows` says).
    pub fn takes_new_flows(&self) -> bool {
        self.state == BackendState::Active && self.weight > 0
    }
}

/// What happens to an established flow whose backend left the service. A service switched into or
/// out of NAT counts as having new backends: its flows cannot continue in the other mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RemovedBackendPolicy {
    /// Pick a new backend for the flow's next packet (right for UDP and for stateless backends).
    #[default]
    Reschedule,
    /// Drop the flow's packets (counted) so the client sees the failure quickly. A UDP flow's packets
    /// are dropped for the UDP timeout, however often they come; then they start a new flow.
    Drop,
}

/// An address prefix, as in `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// A prefix that does not parse or whose length is too long for its family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}: expected ADDRESS/LENGTH with length at most 32 (IPv4) or 128 (IPv6)")]
pub struct InvalidCidr(pub String);

impl Cidr {
    /// The prefix `addr/prefix_len`, with host bits cleared; `None` if the length is too long.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if prefix_len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix_len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Cidr { addr, prefix_len })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The IPv4 prefix an IPv4-mapped IPv6 prefix stands for (`::ffff:10.0.0.0/104` is
    /// `10.0.0.0/8`), as Go's `net` and so kube-proxy take it; `None` for any other prefix. No
    /// packet comes from a mapped address: as an IPv6 prefix it contains no client.
    pub fn ipv4_mapped(&self) -> Option<Cidr> {
        match self.addr {
            IpAddr::V6(a) if self.prefix_len >= 96 => Cidr::new(IpAddr::V4(a.to_ipv4_mapped()?), self.prefix_len - 96),
            _ => None,
        }
    }

    /// True if `ip` lies inside this prefix (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match Cidr::new(ip, self.prefix_len) {
            Some(c) => c.addr == self.addr,
            None => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = InvalidCidr;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidCidr(String::from(s));
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>().map_err(|_| bad())?, l.parse::<u8>().map_err(|_| bad())?),
            None => {
                let a = s.parse::<IpAddr>().map_err(|_| bad())?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        Cidr::new(addr, len).ok_or_else(bad)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An address that cannot be a VIP, a backend or a node's source address: no packet to or from it
/// travels the wire between two hosts as unicast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialAddress {
    /// `0.0.0.0` or `::`: "no address", never a destination.
    Unspecified,
    /// `255.255.255.255`: every host of the link.
    Broadcast,
    /// `224.0.0.0/4` or `ff00::/8`: a group, not a host.
    Multicast,
    /// `127.0.0.0/8` or `::1`: a host's own loopback, dropped as a martian when it comes off the wire.
    Loopback,
    /// `::ffff:0:0/96`: an IPv4 address written as IPv6, which no IPv6 packet carries; inside the
    /// load balancer (flow keys, steering) it is the IPv4 address itself.
    Ipv4Mapped,
}

impl SpecialAddress {
    /// What keeps `addr` from being a VIP, a backend or a node address; `None` if nothing does.
    pub const fn of(addr: IpAddr) -> Option<Self> {
        match addr {
            IpAddr::V4(a) if a.is_unspecified() => Some(SpecialAddress::Unspecified),
            IpAddr::V4(a) if a.is_broadcast() => Some(SpecialAddress::Broadcast),
            IpAddr::V4(a) if a.is_multicast() => Some(SpecialAddress::Multicast),
            IpAddr::V4(a) if a.is_loopback() => Some(SpecialAddress::Loopback),
            IpAddr::V6(a) if a.is_unspecified() => Some(SpecialAddress::Unspecified),
            IpAddr::V6(a) if a.is_multicast() => Some(SpecialAddress::Multicast),
            IpAddr::V6(a) if a.is_loopback() => Some(SpecialAddress::Loopback),
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some(SpecialAddress::Ipv4Mapped),
            _ => None,
        }
    }
}

impl fmt::Display for SpecialAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpecialAddress::Unspecified => "the unspecified address",
            SpecialAddress::Broadcast => "the broadcast address",
            SpecialAddress::Multicast => "a multicast address",
            SpecialAddress::Loopback => "a loopback address",
            SpecialAddress::Ipv4Mapped => "an IPv4-mapped IPv6 address (write the IPv4 address)",
        })
    }
}

/// One virtual service and everything about how it balances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// A name for logs, metrics and errors (e.g. `default/web:http`).
    pub name: String,
    /// VIP, port and protocol.
    pub key: ServiceKey,
    /// The backends; may be empty (then new flows are dropped and counted as `NoBackend`).
    pub backends: Vec<BackendConfig>,
    /// Backend selection for new flows.
    pub scheduler: SchedulerKind,
    /// How frames reach the chosen backend. Flows keep their backend across a change among DSR and
    /// the tunnels; a change into or out of NAT gives them to `on_backend_removed`.
    pub mode: ForwardMode,
    /// ClientIP session affinity: while a client has started a flow within this time, its new flows
    /// go to the same backend (up to a second longer: conntrack counts whole seconds). Each new flow
    /// renews it; packets of flows already open do not (as kube-proxy's iptables mode, whose `recent`
    /// match sees only new connections; IPVS persistence also holds while the client has connections
    /// open). `None` disables it. Kubernetes' default
    /// timeout is 10800 s. Records are per core, and RSS spreads a client's flows over the queues:
    /// under mh and hrw a client's first pick therefore hashes its address, not the 5-tuple, so every
    /// core and node picks the same backend for it (sh, dh and ecmp hash addresses anyway) while the
    /// backends stay the same; under rr, wrr, lc, wlc, sed and nq each core picks on its own, so a
    /// client's flows may reach one backend per queue. Once the backends change, a core holding the
    /// client's record keeps it on its backend and one holding none picks from the new set: a client
    /// whose pick moved may reach two backends until its records idle out. Records share the
    /// connection table and never push a flow out: one whose bucket holds only live entries is not
    /// kept (the client's next flow is picked afresh), and counted in
    /// [`Stats::affinity_not_recorded`](crate::stats::Stats::affinity_not_recorded).
    pub affinity_timeout: Option<Duration>,
    /// When non-empty, only clients inside one of these prefixes reach the service; others are
    /// dropped and counted as `SourceNotAllowed`. Every packet is checked, so tables that narrow
    /// the list cut the established flows of the clients they leave out (kube-proxy checks new
    /// connections only); their entries stay, and a list widened again lets them go on. Each is of
    /// the VIP's family and not IPv4-mapped: a table build refuses a range no client can be in.
    pub source_ranges: Vec<Cidr>,
    /// Maglev table size (prime) for mh, sh and dh. `None`: 65 537 up to 655 backends (then 655 373,
    /// 6 553 621), a size that stays put as backends come and go, so a change moves few flows; 128 KiB
    /// per table, and for mh 256 KiB more for the ring of backend slots new flows pick from (see
    /// the worker). Services of equal [`ServiceConfig::scheduler_inputs`] share one table and ring;
    /// the sizes of the distinct tables summed are bounded by
    /// [`Limits::max_maglev_entries`](crate::service::Limits::max_maglev_entries). With many services of few backends, a smaller prime (at least 100 per backend:
    /// `lb_hash::maglev_table_size_for`) saves memory, but then keep it fixed as the set changes.
    pub maglev_table_size: Option<u32>,
    /// What to do with established flows whose backend was removed.
    pub on_backend_removed: RemovedBackendPolicy,
    /// Whether clients on the segment ask for the VIP (ARP, IPv6 neighbour solicitation), so the
    /// neighbour responder answers and announces it ([`crate::neighbour`]): true for an address
    /// that lives on the segment (MetalLB-L2's load-balancer IPs, a Service's external IPs); false
    /// for one reached through a route (a Kubernetes cluster IP, in the cluster's service range) or
    /// that the node holds and its kernel answers for (a NodePort's node address). A VIP is
    /// answered for when any of its services says so.
    pub answer_neighbours: bool,
}

/// What a service's scheduler is built from: its kind, Maglev table size and backends (address,
/// port, weight, state; in a canonical order). Services with equal inputs (in Kubernetes, one
/// Service port's cluster IP, NodePorts and load-balancer IPs) get one scheduler from the table
/// builder, so one Maglev table and one ring of backend slots between them:
/// [`Limits::max_maglev_entries`](crate::service::Limits::max_maglev_entries) counts such a table
/// once. Nothing else of the service (its key, mode, affinity, source ranges, MACs) goes into it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchedulerInputs {
    kind: SchedulerKind,
    maglev_table_size: Option<u32>,
    /// Sorted by address and port (the builder refuses a backend listed twice).
    backends: Vec<(IpAddr, u16, u32, BackendState)>,
}

impl SchedulerInputs {
    /// The entries of the Maglev table built from these inputs: see [`ServiceConfig::maglev_entries`].
    pub fn maglev_entries(&self) -> usize {
        if !self.kind.uses_maglev_table() {
            return 0;
        }
        let size = self.maglev_table_size.unwrap_or_else(|| lb_hash::maglev_table_size_stable_for(self.backends.len()));
        usize::try_from(size).unwrap_or(usize::MAX)
    }
}

impl ServiceConfig {
    /// What the table builder builds this service's scheduler from; see [`SchedulerInputs`].
    pub fn scheduler_inputs(&self) -> SchedulerInputs {
        let mut backends: Vec<(IpAddr, u16, u32, BackendState)> =
            self.backends.iter().map(|b| (b.addr, b.port, b.weight, b.state)).collect();
        backends.sort_unstable_by_key(|&(addr, port, ..)| (addr, port));
        SchedulerInputs { kind: self.scheduler, maglev_table_size: self.maglev_table_size, backends }
    }

    /// The entries of the Maglev table this service picks from: `maglev_table_size`, else the size
    /// that stays put for its backends; 0 for a scheduler without one (not mh, sh or dh). Counted
    /// while no backend takes new flows too (when the service has no table), so that a backend
    /// turning ready never takes the sum over
    /// [`Limits::max_maglev_entries`](crate::service::Limits::max_maglev_entries). The table is
    /// shared with every service of the same [`ServiceConfig::scheduler_inputs`], and that sum
    /// counts it once: the entries held are those of the distinct tables, not this summed over services.
    pub fn maglev_entries(&self) -> usize {
        if !self.scheduler.uses_maglev_table() {
            return 0;
        }
        let size = self.maglev_table_size.unwrap_or_else(|| lb_hash::maglev_table_size_stable_for(self.backends.len()));
        usize::try_from(size).unwrap_or(usize::MAX)
    }

    /// A service with the defaults: Maglev scheduling, no session affinity, every client allowed, the
    /// Maglev table size that stays put as backends come and go, flows of a removed backend rescheduled,
    /// and ARP / NDP for the VIP answered (when the neighbour responder runs).
    pub fn new(name: impl Into<String>, key: ServiceKey, mode: ForwardMode, backends: Vec<BackendConfig>) -> Self {
        ServiceConfig {
            name: name.into(),
            key,
            backends,
            scheduler: SchedulerKind::Maglev,
            mode,
            affinity_timeout: None,
            source_ranges: Vec::new(),
            maglev_table_size: None,
            on_backend_removed: RemovedBackendPolicy::Reschedule,
            answer_neighbours: true,
        }
    }
}

/// Idle timeouts for conntrack entries, IPVS-like by default. Conntrack counts whole seconds, so each
/// must be 1 s to `u32::MAX` s (fractions are dropped); a table build rejects others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP after the first SYN, before the handshake completes.
    pub tcp_syn: Duration,
    /// Established TCP.
    pub tcp_established: Duration,
    /// TCP after a FIN.
    pub tcp_fin: Duration,
    /// TCP after both FINs or an RST.
    pub tcp_time_wait: Duration,
    /// UDP.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(900),
            tcp_fin: Duration::from_secs(120),
            tcp_time_wait: Duration::from_secs(120),
            udp: Duration::from_secs(300),
        }
    }
}

/// Why a VIP cannot be on one of the node's source addresses ([`NodeConfig::vip_conflict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipConflict {
    /// The VIP is the tunnel source address `field` (`tunnel_src_v4` or `tunnel_src_v6`).
    TunnelSource {
        /// The node field holding the address.
        field: &'static str,
    },
    /// The VIP is the SNAT address `field` (`snat_v4` or `snat_v6`) and the service's port is in
    /// `snat_ports`, where the address's NAT replies arrive.
    PortInSnatRange {
        /// The node field holding the address.
        field: &'static str,
        /// `NodeConfig::snat_ports`.
        ports: (u16, u16),
    },
}

impl fmt::Display for VipConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VipConflict::TunnelSource { field } => write!(
                f,
                "the address is node.{field}, and a tunnel source address cannot be a VIP (errors about tunnelled frames come back to it)"
            ),
            VipConflict::PortInSnatRange { field, ports: (first, last) } => write!(
                f,
                "the address is node.{field} and the port is in node.snat_ports {first}-{last}, where NAT replies arrive; \
                 a VIP on the SNAT address needs a port outside that range"
            ),
        }
    }
}

/// Node-wide settings the rewrite needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// MAC address of the port frames leave by (Ethernet source of every transmitted frame), for a
    /// worker not given its interface's own ([`crate::worker::Worker::set_source_mac`]; `lb run`
    /// gives each its interface's, as one value cannot be every interface's and every node's).
    pub local_mac: [u8; 6],
    /// Next-hop MAC for destinations with no MAC of their own (backends without `mac`, in every mode
    /// but DSR; NAT's replies to clients).
    pub gateway_mac: Option<[u8; 6]>,
    /// Source address for full NAT of IPv4 services. A NAT flow does not cross a change of it in
    /// tables swapped in while it is live (its entry holds its SNAT port, not the address, and its
    /// backend would see another 4-tuple): its backend gets a new generation, and the flow follows
    /// its service's `on_backend_removed`, as when a backend leaves (see [`crate::service`]).
    pub snat_v4: Option<Ipv4Addr>,
    /// Source address for full NAT of IPv6 services (NAT flows do not cross a change of it, as for
    /// `snat_v4`).
    pub snat_v6: Option<Ipv6Addr>,
    /// Source ports the node owns for full NAT, inclusive. Each worker owns a share
    /// (`worker::snat_port_share`) and gives its ports to each backend in turn, the port after the
    /// last one that backend was given, skipping ports still in use (RFC 6056's per-destination
    /// counter), so a port returns to a backend only after the rest of the share has. Changing it
    /// while NAT flows are live breaks them: the shares move, so with several workers replies are
    /// steered to a worker that does not hold their flow, which may give its port to a new flow to
    /// the same backend. An embedder drains the NAT flows first or restarts the workers.
    pub snat_ports: (u16, u16),
    /// Outer source address for IPv4 tunnels.
    pub tunnel_src_v4: Option<Ipv4Addr>,
    /// Outer source address for IPv6 tunnels.
    pub tunnel_src_v6: Option<Ipv6Addr>,
    /// MTU of the path to tunnel-mode backends. A packet that would exceed it once encapsulated is
    /// answered with ICMP "fragmentation needed" / "packet too big" for the headers' room (see
    /// `forward::too_big`). `None`: no check; then give the backends' links room for the outer
    /// headers (up to 52 bytes), or full-size packets are lost on the way. At least 1332 (IPv6's 1280
    /// plus GUE over IPv6).
    pub tunnel_mtu: Option<u16>,
    /// The most ICMP time exceeded errors each worker sends in a second, answering full-NAT packets
    /// whose TTL / hop limit expired ([`crate::forward::time_exceeded`]); expired packets beyond it
    /// are dropped and counted as `TtlExpired`. 0: none is sent (every expired packet is such a
    /// drop, as where routers stay silent). Default
    /// [`TIME_EXCEEDED_PER_SECOND`](crate::forward::time_exceeded::TIME_EXCEEDED_PER_SECOND), 1000.
    pub time_exceeded_per_second: u32,
    /// Seed of the flow hash; give every node behind one ECMP router the same seed.
    pub hash_seed: u64,
    /// Conntrack idle timeouts.
    pub timeouts: Timeouts,
}

impl NodeConfig {
    /// The full-NAT source address for frames to a backend at `backend`: `snat_v4` or `snat_v6`
    /// by its family, if set.
    pub fn snat_addr_for(&self, backend: IpAddr) -> Option<IpAddr> {
        match backend {
            IpAddr::V4(_) => self.snat_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.snat_v6.map(IpAddr::V6),
        }
    }

    /// The node's own source addresses by field name (`snat_v4`, `snat_v6`, `tunnel_src_v4`,
    /// `tunnel_src_v6`), set or not. Which of them a service may use as its VIP:
    /// [`NodeConfig::vip_conflict`].
    pub fn source_addresses(&self) -> [(&'static str, Option<IpAddr>); 4] {
        let ([s4, s6], [t4, t6]) = (self.snat_addresses(), self.tunnel_sources());
        [s4, s6, t4, t6]
    }

    fn snat_addresses(&self) -> [(&'static str, Option<IpAddr>); 2] {
        [("snat_v4", self.snat_v4.map(IpAddr::V4)), ("snat_v6", self.snat_v6.map(IpAddr::V6))]
    }

    fn tunnel_sources(&self) -> [(&'static str, Option<IpAddr>); 2] {
        [("tunnel_src_v4", self.tunnel_src_v4.map(IpAddr::V4)), ("tunnel_src_v6", self.tunnel_src_v6.map(IpAddr::V6))]
    }

    /// Why a service at `key` cannot have its VIP on one of the node's source addresses, if it
    /// cannot. A SNAT address may be a VIP for ports outside `snat_ports` (a node address that
    /// serves NodePorts and is the source of NAT flows, as with kube-proxy's masquerade): a frame to
    /// it is then a NAT reply by its destination port (an ICMP error by its quote's source port) and
    /// service traffic otherwise. A port inside the range could be either. A tunnel source address
    /// may not be a VIP at all: the ICMP errors about tunnelled frames that come back to it could not
    /// be told from errors about service flows.
    pub fn vip_conflict(&self, key: &ServiceKey) -> Option<VipConflict> {
        let on = |(_, a): &(&'static str, Option<IpAddr>)| *a == Some(key.vip);
        if let Some((field, _)) = self.tunnel_sources().into_iter().find(on) {
            return Some(VipConflict::TunnelSource { field });
        }
        let (field, _) = self.snat_addresses().into_iter().find(on)?;
        self.is_snat_port(key.port).then_some(VipConflict::PortInSnatRange { field, ports: self.snat_ports })
    }

    /// True if `port` is in `snat_ports`, where NAT replies arrive.
    #[inline]
    pub fn is_snat_port(&self, port: u16) -> bool {
        (self.snat_ports.0..=self.snat_ports.1).contains(&port)
    }

    /// The outer source address of a tunnelled frame (IP-in-IP, GUE) to a backend at `backend`:
    /// `tunnel_src_v4` or `tunnel_src_v6` by its family, if set.
    pub fn tunnel_src_for(&self, backend: IpAddr) -> Option<IpAddr> {
        match backend {
            IpAddr::V4(_) => self.tunnel_src_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.tunnel_src_v6.map(IpAddr::V6),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            local_mac: [0x02, 0, 0, 0, 0, 1],
            gateway_mac: None,
            snat_v4: None,
            snat_v6: None,
            snat_ports: (32768, 60999),
            tunnel_src_v4: None,
            tunnel_src_v6: None,
            tunnel_mtu: None,
            time_exceeded_per_second: crate::forward::time_exceeded::TIME_EXCEEDED_PER_SECOND,
            hash_seed: 0,
            timeouts: Timeouts::default(),
        }
    }
}

/// The whole configuration: node settings and services. Validated whole by the table builder.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Node-wide settings.
    pub node: NodeConfig,
    /// The virtual services.
    pub services: Vec<ServiceConfig>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn cidr_parse_contains_and_errors() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.200.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::a01:203".parse().unwrap()));
        let c6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c6.contains("2001:db8:1::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().prefix_len(), 32);
    }

    #[test]
    fn scheduler_names_round_trip() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
        }
        assert_eq!("Maglev".parse::<SchedulerKind>().unwrap(), SchedulerKind::Maglev);
        let err = "lblc".parse::<SchedulerKind>().unwrap_err();
        assert!(err.to_string().contains("lblc"));
    }

    #[test]
    fn special_addresses_are_told_from_unicast_ones() {
        use SpecialAddress::*;
        for (addr, want) in [
            ("0.0.0.0", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("255.255.255.255", Some(Broadcast)),
            ("224.0.0.5", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:10.0.0.1", Some(Ipv4Mapped)),
            ("10.0.0.1", None),
            ("192.0.2.255", None),
            ("223.255.255.255", None),
            ("240.0.0.1", None),
            ("2001:db8::1", None),
            ("fe80::1", None),
            ("::2", None),
        ] {
            assert_eq!(SpecialAddress::of(addr.parse().unwrap()), want, "{addr}");
        }
    }
}
