//! A private network for the demo, the integration tests and anyone trying the load balancer: a
//! bridge, a client, the load balancer and three backends, each in its own network namespace, and the
//! load balancer running over AF_XDP inside its namespace.
//!
//! ```text
//!            ns <tag>-sw: bridge br0 (no multicast snooping)
//!   ┌─────────┬──────┴──────┬─────────┬─────────┐
//!  cl         lb            b1        b2        b3        (one namespace each, eth0 on the bridge)
//!  client     AF_XDP on eth0 queue 0; the XDP program steers the services and NAT replies to the
//!  10.77.0.10 socket, everything else stays in the lb namespace's kernel
//!  fd77::10   10.77.0.2 / fd77::2                     10.77.0.11-13 / fd77::11-13
//! ```
//! VIPs 10.77.0.100 and fd77::100, TCP and UDP port 80. [`Lab::add_router`] also makes the bridge a
//! router (10.77.0.1 / fd77::1), the next hop for backends known by address only. Names carry a
//! tag with the process id; the [`Lab`] guard kills the backends and removes every namespace on
//! drop, and namespaces left by a killed run are swept at the next start.
//!
//! In the tunnel modes (IP-in-IP, GUE) the backends decapsulate with the kernel's `tunl0` /
//! `ip6tnl0` devices (and `fou` for GUE) where the kernel has them, and otherwise with the lab's
//! userspace [`decap::Decapsulator`] (raw / UDP sockets feeding a TUN interface in each backend
//! namespace). [`Lab::decap`] says which one a run uses; the tests and the demo print it. The load
//! balancer's and the backends' links then get an MTU of [`TUNNEL_MTU`], room for the outer headers.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};

use lb_core::config::{
    BackendConfig, BackendState, Config, ForwardMode, NodeConfig, Protocol, RemovedBackendPolicy, SchedulerKind,
    ServiceConfig, ServiceKey,
};
use lb_core::conntrack::ConntrackSeed;
use lb_core::schedule::{CoreState, FlowInput, Scheduler};
use lb_core::service::{TableBuilder, Tables};
use lb_core::worker::{Worker, WorkerConfig};
use lb_hash::FlowHasher;
use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{SteeringConfig, VipSteering};

use crate::control::NeighbourResponder;
use lb_io::netns::{Netns, enter_netns, format_mac, run};
use lb_io::{LoopConfig, LoopStats, PollLoop, StopFlag, UpdateSender, XskConfig, XskDevice, XskStats, update_channel};

pub mod decap;
use decap::{DecapStats, Decapsulator, TunnelEnds};

use crate::control::TablesSink;

/// The IPv4 VIP.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// The IPv6 VIP.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100);
/// The load balancer's source address for full NAT (steered to the socket like a VIP).
pub const SNAT4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// The IPv6 SNAT address.
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3);
/// The client's addresses.
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
/// The client's IPv6 address.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x10);
/// Service port.
pub const PORT: u16 = 80;
/// The bridge's MAC once [`Lab::add_router`] made it a router.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
/// Backend names (each answers with its name).
pub const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
/// The load balancer's IPv4 tunnel source (its eth0 address).
pub const TUNNEL_SRC4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The load balancer's IPv6 tunnel source.
pub const TUNNEL_SRC6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
/// The UDP port backends take GUE on.
pub const GUE_PORT: u16 = 6080;
/// MTU of the load balancer's and the backends' links in the tunnel modes: the client's 1500 plus
/// the largest encapsulation, GUE over IPv6 (40 + 8 + 4 bytes).
pub const TUNNEL_MTU: u16 = 1500 + 52;

/// The error of a tunnel-mode lab on a kernel that can decapsulate neither itself nor through a TUN
/// device (tests skip on it).
pub const NO_TUNNELS: &str = "this kernel can neither decapsulate (no tunl0 / ip6tnl0 device) nor give the lab a TUN device (/dev/net/tun) to do it in userspace";

/// Boxed error of lab setup, with a message naming the step.
pub type LabError = Box<dyn std::error::Error + Send + Sync>;

/// How the load balancer reaches the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Full NAT: backends see the load balancer's SNAT address and answer through it.
    Nat,
    /// Direct server return: only the Ethernet destination changes; backends hold the VIP and answer
    /// the client directly.
    Dsr,
    /// IP-in-IP: frames are wrapped towards the backend, which decapsulates and answers directly.
    Ipip,
    /// GUE (variant 0) to UDP port 6080 (`GUE_PORT`): as IP-in-IP, behind an outer UDP + GUE header.
    Gue,
}

impl Mode {
    /// lb-core's forwarding mode.
    pub fn forward_mode(self) -> ForwardMode {
        match self {
            Mode::Nat => ForwardMode::Nat,
            Mode::Dsr => ForwardMode::Dsr,
            Mode::Ipip => ForwardMode::IpIp,
            Mode::Gue => ForwardMode::Gue { port: GUE_PORT },
        }
    }

    /// True for the modes whose backends decapsulate (IP-in-IP, GUE).
    pub fn is_tunnel(self) -> bool {
        matches!(self, Mode::Ipip | Mode::Gue)
    }
}

/// Who takes the tunnel headers off at the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecapPath {
    /// The backend kernel's tunnel devices (`tunl0` / `ip6tnl0`, behind `fou` for GUE).
    Kernel,
    /// The lab's [`decap::Decapsulator`]: sockets in each backend namespace feeding a TUN interface.
    Userspace,
}

impl std::fmt::Display for DecapPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecapPath::Kernel => f.write_str("the kernel's tunnel devices (tunl0 / ip6tnl0)"),
            DecapPath::Userspace => write!(
                f,
                "the lab's userspace decapsulator (this kernel has no tunl0 / ip6tnl0): raw / UDP sockets -> TUN {} in each backend namespace",
                decap::TUN_NAME
            ),
        }
    }
}

/// One backend of the lab.
#[derive(Debug)]
pub struct LabBackend {
    /// Its name (`b1`...), also what it answers with.
    pub name: &'static str,
    /// Its namespace.
    pub ns: Netns,
    /// IPv4 address on eth0.
    pub v4: Ipv4Addr,
    /// IPv6 address on eth0.
    pub v6: Ipv6Addr,
    /// MAC of eth0.
    pub mac: [u8; 6],
}

/// Everything the lab created; dropping it kills the backends and removes the namespaces.
#[derive(Debug)]
pub struct Lab {
    /// Name tag (`<prefix><pid>`).
    pub tag: String,
    /// The forwarding mode the backends were set up for.
    pub mode: Mode,
    /// Who decapsulates at the backends (tunnel modes only).
    pub decap: Option<DecapPath>,
    /// The userspace decapsulators, one per backend, named by backend (stopped first on drop).
    decapsulators: Vec<(&'static str, Decapsulator)>,
    /// The backend servers; the pipe to each one's stdin stays open here, and a backend exits when it closes.
    children: Vec<Child>,
    /// The client namespace.
    pub client: Netns,
    /// The client's MAC.
    pub client_mac: [u8; 6],
    /// The load balancer's namespace.
    pub lb: Netns,
    /// The load balancer's MAC on eth0.
    pub lb_mac: [u8; 6],
    /// The backends.
    pub backends: Vec<LabBackend>,
    /// The bridge namespace (dropped last).
    _switch: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(mut live) = LIVE_TAGS.lock() {
            live.retain(|t| *t != self.tag);
        }
        self.decapsulators.clear();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The tags of this process's labs that are built (their namespaces are not stale).
static LIVE_TAGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Removes namespaces `<prefix><pid>-*` whose process no longer exists (a run killed with SIGKILL),
/// and those with this process's own id that no lab of it holds: a killed run's whose id this
/// process was given again (a container, where `lb` is always the same process id).
fn sweep_stale(prefix: &str) {
    let own = std::process::id().to_string();
    let live = LIVE_TAGS.lock().map(|t| t.clone()).unwrap_or_default();
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        let gone = !Path::new(&format!("/proc/{pid}")).exists();
        let ours_unheld = pid == own && !live.contains(&format!("{prefix}{pid}"));
        if pid.parse::<u32>().is_ok() && (gone || ours_unheld) {
            tracing::info!("removing namespace {name} left by a killed run");
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

impl Lab {
    /// Builds the namespaces, bridge and addresses for `mode`, and starts a backend server in each
    /// backend namespace with `backend_exe demo-backend` (the `lb` binary). `prefix` must be unique
    /// per kind of caller (e.g. `lbd` for the demo, one per test) so parallel runs do not clash.
    pub fn build(prefix: &str, mode: Mode, backend_exe: &Path) -> Result<Lab, LabError> {
        Lab::build_with_queues(prefix, mode, backend_exe, 1)
    }

    /// As [`Lab::build`], with `lb_queues` receive and transmit queues on the load balancer's link
    /// (both ends), for [`start_lb_on_queues`]: frames reach its queues by the bridge port's flow
    /// hash, as a NIC's RSS spreads them.
    pub fn build_with_queues(prefix: &str, mode: Mode, backend_exe: &Path, lb_queues: u32) -> Result<Lab, LabError> {
        sweep_stale(prefix);
        let tag = format!("{prefix}{}", std::process::id());
        let sw = Netns::create(&format!("{tag}-sw"))?;
        // No multicast snooping: neighbour solicitations reach every port from the first packet.
        sw.ip(&["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        let attach_queues = |role: &str, v4: &str, v6: &str, queues: u32| -> Result<Netns, LabError> {
            let ns = Netns::create(&format!("{tag}-{role}"))?;
            let q = queues.max(1).to_string();
            let queues = ["numtxqueues", q.as_str(), "numrxqueues", q.as_str()];
            let mut args = vec!["link", "add", "eth0"];
            args.extend(queues);
            args.extend(["type", "veth", "peer", "name", role]);
            args.extend(queues);
            args.extend(["netns", sw.name()]);
            ns.ip(&args)?;
            sw.ip(&["link", "set", role, "master", "br0", "up"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["addr", "add", v4, "dev", "eth0"])?;
            ns.ip(&["addr", "add", v6, "dev", "eth0", "nodad"])?;
            Ok(ns)
        };
        let attach = |role: &str, v4: &str, v6: &str| attach_queues(role, v4, v6, 1);
        let client = attach("cl", &format!("{CLIENT4}/24"), &format!("{CLIENT6}/64"))?;
        let lb = attach_queues("lb", "10.77.0.2/24", "fd77::2/64", lb_queues)?;
        let lb_mac = lb.mac("eth0")?;
        let client_mac = client.mac("eth0")?;
        let mut backends = Vec::new();
        for (i, name) in BACKENDS.iter().enumerate() {
            let v4 = Ipv4Addr::new(10, 77, 0, 11 + i as u8);
            let v6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x11 + i as u16);
            let ns = attach(name, &format!("{v4}/24"), &format!("{v6}/64"))?;
            let mac = ns.mac("eth0")?;
            backends.push(LabBackend { name, ns, v4, v6, mac });
        }
        // Senders compute full checksums (a forwarded frame with a partial one fails at the receiver).
        client.checksum_offload_off("eth0")?;
        for b in &backends {
            b.ns.checksum_offload_off("eth0")?;
        }
        if mode.is_tunnel() {
            // Room for the outer headers on the load balancer -> backend links, as any IPVS TUN or
            // Katran setup needs: a full-size client segment grows past 1500 bytes when wrapped.
            let mtu = TUNNEL_MTU.to_string();
            lb.ip(&["link", "set", "eth0", "mtu", &mtu])?;
            sw.ip(&["link", "set", "lb", "mtu", &mtu])?;
            for b in &backends {
                b.ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
                sw.ip(&["link", "set", b.name, "mtu", &mtu])?;
            }
        }
        // No static neighbour entries for the VIPs (on the client) or the SNAT addresses (on the
        // backends): the load balancer's ARP / NDP responder answers for them, as in an L2 deployment.
        let client_mac_s = format_mac(client_mac);
        let mut decap = None;
        let mut decapsulators = Vec::new();
        for b in &backends {
            match mode {
                Mode::Nat => {}
                Mode::Dsr | Mode::Ipip | Mode::Gue => {
                    b.ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
                    b.ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
                    // The backends hold the VIP too, but must not answer ARP for it (only the load
                    // balancer does), nor announce it as the source of their own ARP requests: the
                    // classic LVS-DR settings. (IPv6 answers only for the receiving interface's
                    // addresses, so the VIP on lo stays silent there.)
                    for key in ["net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"] {
                        b.ns.exec("sysctl", &["-qw", key])?;
                    }
                    // A backend answering from the VIP would solicit the client's MAC with the VIP as
                    // source; the client ignores that (it maps the VIP to the load balancer), so the
                    // first IPv6 reply waits out NDP's retries. Real DSR setups pin this the same way.
                    for addr in [CLIENT4.to_string(), CLIENT6.to_string()] {
                        b.ns.static_neighbour(&addr, &client_mac_s, "eth0")?;
                    }
                }
            }
            if mode.is_tunnel() {
                let path = if kernel_decap(&b.ns, mode)? {
                    DecapPath::Kernel
                } else {
                    let ends =
                        TunnelEnds { local_v4: b.v4, local_v6: b.v6, remote_v4: TUNNEL_SRC4, remote_v6: TUNNEL_SRC6 };
                    let d = Decapsulator::start(&b.ns, mode.forward_mode(), ends)
                        .map_err(|e| if Path::new("/dev/net/tun").exists() { e } else { LabError::from(NO_TUNNELS) })?;
                    decapsulators.push((b.name, d));
                    DecapPath::Userspace
                };
                decap = Some(path);
            }
        }
        if let Some(path) = decap {
            tracing::debug!("backends decapsulate with {path}");
        }
        let mut lab = Lab {
            tag,
            mode,
            decap,
            decapsulators,
            children: Vec::new(),
            client,
            client_mac,
            lb,
            lb_mac,
            backends,
            _switch: sw,
        };
        if let Ok(mut live) = LIVE_TAGS.lock() {
            live.push(lab.tag.clone());
        }
        let exe = backend_exe.to_string_lossy().into_owned();
        for i in 0..lab.backends.len() {
            let b = &lab.backends[i];
            let mut args = vec!["netns".to_string(), "exec".into(), b.ns.name().to_string(), exe.clone()];
            args.extend(["demo-backend".to_string(), "--name".into(), b.name.to_string()]);
            let mut udp = vec![b.v4.to_string(), b.v6.to_string()];
            if mode != Mode::Nat {
                udp.extend([VIP4.to_string(), VIP6.to_string()]);
            }
            for addr in udp {
                args.extend(["--udp-bind".to_string(), addr]);
            }
            let name = b.name;
            // Its stdin stays open in `children`: the backend exits when it closes, with this process.
            let mut child = Command::new("ip").args(&args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
            let out = child.stdout.take().ok_or("backend stdout")?;
            lab.children.push(child);
            // Readiness: the backend prints `ready` once its sockets are bound.
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
            if line.trim() != "ready" {
                return Err(format!("backend {name} did not start (said {line:?})").into());
            }
        }
        Ok(lab)
    }

    /// The load balancer's configuration: TCP and UDP port 80 on both VIPs, Maglev over the three
    /// backends, in the lab's mode, with `policy` for flows whose backend is removed.
    pub fn config(&self, backends: &[&str], policy: RemovedBackendPolicy) -> Config {
        let node = NodeConfig {
            local_mac: self.lb_mac,
            gateway_mac: Some(self.client_mac),
            snat_v4: Some(SNAT4),
            snat_v6: Some(SNAT6),
            tunnel_src_v4: Some(TUNNEL_SRC4),
            tunnel_src_v6: Some(TUNNEL_SRC6),
            ..NodeConfig::default()
        };
        let mut services = Vec::new();
        for (proto, pname) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
            for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
                let fam = if vip.is_ipv4() { "v4" } else { "v6" };
                services.push(ServiceConfig {
                    name: format!("demo-{pname}-{fam}"),
                    key: ServiceKey { vip, port: PORT, proto },
                    backends: self
                        .backends
                        .iter()
                        .filter(|b| backends.contains(&b.name))
                        .map(|b| BackendConfig {
                            addr: if vip.is_ipv4() { IpAddr::V4(b.v4) } else { IpAddr::V6(b.v6) },
                            port: PORT,
                            weight: 1,
                            mac: Some(b.mac),
                            state: BackendState::Active,
                        })
                        .collect(),
                    scheduler: SchedulerKind::Maglev,
                    mode: self.mode.forward_mode(),
                    affinity_timeout: None,
                    source_ranges: Vec::new(),
                    maglev_table_size: None,
                    on_backend_removed: policy,
                    answer_neighbours: true,
                });
            }
        }
        Config { node, services }
    }

    /// Makes the bridge a router for the lab's subnets (10.77.0.1 / fd77::1, MAC [`ROUTER_MAC`]) and
    /// returns its MAC: the `node.gateway_mac` for backends with no MAC of their own, as the
    /// Kubernetes feed's endpoints (addresses only; a node's gateway routes to pod IPs). Frames the
    /// load balancer sends there are routed to the backend or client their IP names. Call once.
    pub fn add_router(&self) -> Result<[u8; 6], LabError> {
        let sw = &self._switch;
        // Pinned, so it does not follow the lowest port MAC as bridges do.
        sw.ip(&["link", "set", "br0", "address", &format_mac(ROUTER_MAC)])?;
        sw.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"])?;
        sw.ip(&["addr", "add", "fd77::1/64", "dev", "br0", "nodad"])?;
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // Routed out of the port it came in on: no redirects towards the SNAT addresses or VIPs.
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.br0.send_redirects=0",
        ] {
            sw.exec("sysctl", &["-qw", key])?;
        }
        Ok(ROUTER_MAC)
    }

    /// What each backend's userspace decapsulator did so far, by backend name (empty unless
    /// [`Lab::decap`] is [`DecapPath::Userspace`]).
    pub fn decap_stats(&self) -> Vec<(&'static str, DecapStats)> {
        self.decapsulators.iter().map(|(name, d)| (*name, d.stats())).collect()
    }

    /// The backend called `name` (`b1`...).
    pub fn backend_named(&self, name: &str) -> Option<&LabBackend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The backend (`b1`...) `tables` send a new `proto` flow from `client` to `vip`'s service
    /// port to: lb-core's own scheduler over the same hash the worker computes, so a test can
    /// check that the backend which answered is the one the load balancer had to pick. Only for
    /// schedulers that depend on nothing but the flow (mh, as [`Lab::config`] sets, sh, dh, hrw,
    /// ecmp), and with ClientIP affinity for a client without an affinity record; `None` when no
    /// service or backend matches.
    pub fn scheduled_backend(
        &self,
        tables: &Tables,
        proto: Protocol,
        client: SocketAddr,
        vip: IpAddr,
    ) -> Option<&'static str> {
        let (_, service) = tables.lookup(&ServiceKey { vip, port: PORT, proto })?;
        let hasher = FlowHasher::new(tables.node().hash_seed);
        let (src, sport, proto) = (client.ip(), client.port(), proto.number());
        // With ClientIP affinity the worker's first pick hashes the client address.
        let flow_hash = match service.affinity_timeout_secs {
            Some(_) => hasher.source(src),
            None => hasher.five_tuple(src, vip, proto, sport, PORT),
        };
        let flow = FlowInput { src, dst: vip, proto, sport, dport: PORT, flow_hash, hasher };
        let mut cursor = 0;
        let mut core = CoreState::new(&mut cursor);
        let picked = service.backends.get(service.scheduler.pick(&flow, &service.backends, &mut core)?)?;
        self.backends
            .iter()
            .find(|b| IpAddr::V4(b.v4) == picked.addr || IpAddr::V6(b.v6) == picked.addr)
            .map(|b| b.name)
    }
}

/// `GET path` over HTTP/1.0 from `addr` (the metrics endpoint), inside namespace `ns`: the whole
/// response, head and body.
pub fn http_get_in(ns: &str, addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let (ns, addr, path) = (ns.to_string(), addr.to_string(), path.to_string());
    std::thread::spawn(move || {
        enter_netns(&ns).unwrap_or_else(|e| panic!("entering {ns}: {e}"));
        let mut c = std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        c.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap_or_else(|e| panic!("{e}"));
        write!(c, "GET {path} HTTP/1.0\r\nHost: lb\r\n\r\n").unwrap_or_else(|e| panic!("{addr}: {e}"));
        let mut response = String::new();
        c.read_to_string(&mut response).unwrap_or_else(|e| panic!("{addr}: {e}"));
        response
    })
    .join()
    .unwrap_or_else(|_| panic!("the GET thread panicked"))
}

/// The first IPv4 frame to `dst_mac` seen on `iface` in namespace `ns` while a UDP datagram goes to
/// `vip:port` from there every half second (until the load balancer's steering is in place), for
/// up to 10 s; `None` if none came. The tests of `lb run` and `lb bench-forward` that check what a
/// forwarded frame carries (its source MAC, its NAT-ed address) read it from this.
pub fn first_forwarded_frame(ns: &Netns, iface: &str, vip: Ipv4Addr, port: u16, dst_mac: [u8; 6]) -> Option<Vec<u8>> {
    let dst = dst_mac.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let probe = format!(
        r"
import socket, time
r = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
r.bind(('{iface}', 0))
r.settimeout(0.5)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.time() + 10
while time.time() < end:
    s.sendto(b'q', ('{vip}', {port}))
    try:
        while True:
            f = r.recv(2048)
            if f[:6] == bytes.fromhex('{dst}') and f[12:14] == b'\x08\x00':
                print(f.hex())
                raise SystemExit
    except socket.timeout:
        pass
"
    );
    let out = ns.exec("python3", &["-c", &probe]).unwrap_or_else(|e| panic!("the probe in {}: {e}", ns.name()));
    let hex = out.trim();
    (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

/// The value of the Prometheus line of `text` that starts with `name` (labels included), if present.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

/// A TCP port for a test's server (a metrics or health check port) that nothing holds now on any
/// address, and that no other call in this process has handed out. It is taken from 20000-32767,
/// below Linux's default ephemeral range (32768-60999): a port bound and released by `bind(:0)` is
/// an ephemeral one, which the kernel may give next to an outgoing connection (a watch on the API
/// server) that then holds it while the test's server tries to bind it.
pub fn unused_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20000;
    const SPAN: u16 = 12768;
    // Processes start at different places (a test binary's and a concurrent run's).
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) % SPAN;
        let bind = |a: IpAddr| std::net::TcpListener::bind(SocketAddr::new(a, port)).map(drop);
        // (A host with IPv6 disabled refuses `::` with another error than "in use".)
        let v6_free = || match bind(Ipv6Addr::UNSPECIFIED.into()) {
            Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
            Ok(()) => true,
        };
        if bind(Ipv4Addr::UNSPECIFIED.into()).is_ok() && v6_free() {
            return port;
        }
    }
    panic!("no TCP port free in {FIRST}-{}", FIRST + SPAN - 1)
}

/// An address on 127.0.0.1 with no listener, which nothing else takes while the test runs, so that
/// a test can also listen there later ([`unused_port`]). A port bound with `:0` and closed is an
/// ephemeral one: the kernel may give it to the next `bind(:0)` of a test running beside, which then
/// answers.
pub fn unused_loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, unused_port()))
}

/// Runs `io` again while it fails with `Interrupted`. A socket read with a timeout
/// (`set_read_timeout`, SO_RCVTIMEO) is never restarted after a signal, whatever the handler's
/// SA_RESTART says (signal(7)), nor after the process is stopped and continued: the read fails
/// with EINTR, which is no answer from the load balancer. `read_exact` and `write_all` retry on their own.
pub fn retrying<T>(mut io: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match io() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Sends `msg` on `conn` to a lab backend and returns the answering backend's name (a backend
/// answers each read with its name and what it read). An answer that does not echo `msg` is an
/// `InvalidData` error.
pub fn ask(conn: &mut std::net::TcpStream, msg: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    conn.write_all(msg.as_bytes())?;
    let mut buf = [0u8; 256];
    let n = retrying(|| conn.read(&mut buf))?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (name, echoed) = reply.split_once(' ').unwrap_or((&reply, ""));
    if echoed != msg {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the backend answered {reply:?} to {msg:?}"),
        ));
    }
    Ok(name.to_string())
}

/// Sets up the kernel's own decapsulation for `mode` in a backend namespace: the fallback tunnel
/// devices `tunl0` / `ip6tnl0` (they take IP-in-IP from any source) and, for GUE, `fou` on
/// [`GUE_PORT`] handing the inner packets to them. False when this kernel lacks any of it.
fn kernel_decap(ns: &Netns, mode: Mode) -> Result<bool, LabError> {
    let _ = run("modprobe", &["ipip"]);
    let _ = run("modprobe", &["ip6_tunnel"]);
    if ns.ip(&["link", "show", "tunl0"]).is_err() || ns.ip(&["link", "show", "ip6tnl0"]).is_err() {
        return Ok(false);
    }
    if mode == Mode::Gue {
        let _ = run("modprobe", &["fou"]);
        let _ = run("modprobe", &["fou6"]);
        let port = GUE_PORT.to_string();
        if ns.ip(&["fou", "add", "port", &port, "gue"]).is_err()
            || ns.ip(&["-6", "fou", "add", "port", &port, "gue"]).is_err()
        {
            return Ok(false);
        }
    }
    ns.ip(&["link", "set", "tunl0", "up"])?;
    ns.ip(&["link", "set", "ip6tnl0", "up"])?;
    // No reverse-path filter: the inner source, the client, is not reachable through the tunnel.
    for key in ["net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter", "net.ipv4.conf.tunl0.rp_filter"] {
        ns.exec("sysctl", &["-qw", &format!("{key}=0")])?;
    }
    Ok(true)
}

/// Builds the fast path's tables with `builder`. Keep one builder for the life of a load balancer:
/// it keeps backend slots stable across builds, which is what lets established flows keep their
/// backend when the tables are swapped (a fresh builder renumbers them).
pub fn tables(builder: &mut TableBuilder, config: &Config) -> Result<Arc<Tables>, LabError> {
    Ok(builder.build(config)?)
}

/// What the load balancer thread hands back when it stops.
#[derive(Debug)]
pub struct LbOutcome {
    /// The poll loop's counters.
    pub stats: LoopStats,
    /// The AF_XDP socket's counters.
    pub xsk: XskStats,
    /// Whether the socket ran in zero-copy mode.
    pub zero_copy: bool,
    /// The worker, with its counters and connection table.
    pub worker: Worker,
    /// Frames other loops handed to this one that were still in its inbox when every loop had
    /// stopped (with several queues): none, as a loop takes what waits in its inbox as it stops and
    /// refuses what comes later (counted by the sender in `handoff_refused`).
    pub left_in_inbox: usize,
}

/// A running load balancer: its thread, its update channel and its stop flag.
#[derive(Debug)]
pub struct RunningLb {
    /// The worker's update sender and the XDP program's steering maps. Steers the first tables'
    /// services; [`RunningLb::update`] keeps both in step with new tables, as `lb run` does. A test
    /// that runs its own control plane takes it as the plane's [`TablesSink`] (`None` after).
    pub sink: Option<LabSink>,
    stop: StopFlag,
    /// `None` once [`RunningLb::stop`] has joined it. Runs the first queue's loop, then joins the
    /// others'; returns every loop's outcome, in queue order.
    thread: Option<std::thread::JoinHandle<Result<Vec<LbOutcome>, String>>>,
}

/// Hands tables to the lab's poll loops, waits (up to `wait`) until every worker has swapped them in,
/// then steers their services, as `lb run` orders it: before the tables go out, only what both the
/// running and the new tables serve stays steered, so no frame reaches a worker whose tables would
/// pass it (lost on AF_XDP), and a removed service's frames go to the kernel.
#[derive(Debug)]
pub struct LabSink {
    /// One per poll loop.
    updates: Vec<UpdateSender<Arc<Tables>>>,
    steering: VipSteering,
    /// How long the worker may take to apply tables.
    pub wait: std::time::Duration,
    /// The connection table seed of the tables the workers started on, which they keep.
    conntrack_seed: ConntrackSeed,
}

impl TablesSink for LabSink {
    fn conntrack_seed(&self) -> ConntrackSeed {
        self.conntrack_seed
    }

    fn publish(&mut self, tables: &Arc<Tables>) -> Result<(), String> {
        let want = crate::control::steering_for(tables, NeighbourResponder::All);
        let during = self.steering.steering().intersection(&want);
        self.steering.set(during).map_err(|e| format!("steering: {e}"))?;
        for updates in &self.updates {
            updates.send(tables.clone()).map_err(|e| e.to_string())?;
            updates.wait_retired(self.wait).ok_or("the worker did not apply the tables")?;
        }
        self.steering.set(want).map_err(|e| format!("steering: {e}"))
    }
}

impl RunningLb {
    /// Publishes `tables` through [`LabSink`], letting the worker take up to `wait`.
    pub fn update(&mut self, tables: &Arc<Tables>, wait: std::time::Duration) -> Result<(), String> {
        let sink = self.sink.as_mut().ok_or("the sink was taken")?;
        sink.wait = wait;
        sink.publish(tables)
    }

    /// Stops the poll loop and returns what it did (the first queue's, with several).
    pub fn stop(self) -> Result<LbOutcome, String> {
        self.stop_all()?.into_iter().next().ok_or_else(|| "no poll loop ran".to_string())
    }

    /// Stops every poll loop and returns what each did, in queue order.
    pub fn stop_all(mut self) -> Result<Vec<LbOutcome>, String> {
        self.stop.stop();
        let thread = self.thread.take().ok_or("the load balancer was already stopped")?;
        thread.join().map_err(|_| "the load balancer thread panicked".to_string())?
    }
}

impl Drop for RunningLb {
    /// A test that fails before calling [`RunningLb::stop`] still stops the poll loop (and closes its
    /// socket) before the lab's namespaces go away, instead of leaving it polling a deleted veth.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.stop();
            let _ = thread.join();
        }
    }
}

/// Starts the load balancer in the lab's LB namespace with `tables` (steering every VIP and SNAT
/// address to the socket, and ARP / NDP for them to its responder); returns once it is attached and
/// polling.
pub fn start_lb(lab: &Lab, tables: Arc<Tables>, core: Option<usize>, mode: AttachMode) -> Result<RunningLb, String> {
    start_lb_on_queues(lab, tables, core, mode, 1)
}

/// As [`start_lb`], with a poll loop on each of the first `queues` queues (a lab built with as many,
/// [`Lab::build_with_queues`]), as `lb run` serves several: worker `i` of `queues` on queue `i`
/// (pinned to `core + i` when `core` is given), the loops joined by a handoff mesh.
pub fn start_lb_on_queues(
    lab: &Lab,
    tables: Arc<Tables>,
    core: Option<usize>,
    mode: AttachMode,
    queues: u32,
) -> Result<RunningLb, String> {
    let ns = lab.lb.name().to_string();
    // Neither the VIPs nor the SNAT addresses are on the LB namespace's interfaces: answer for all.
    let steer = crate::control::steering_for(&tables, NeighbourResponder::All);
    let conntrack_seed = tables.conntrack_seed();
    let stop = StopFlag::new();
    let loop_stop = stop.clone();
    let queues = queues.max(1);
    let (mut updates, mut updates_rx) = (Vec::new(), Vec::new());
    for _ in 0..queues {
        let (tx, rx) = update_channel();
        updates.push(tx);
        updates_rx.push(rx);
    }
    let (ready_tx, ready_rx) = mpsc::channel::<Result<VipSteering, String>>();
    let thread = std::thread::Builder::new()
        .name("lb-poll-q0".into())
        .spawn(move || {
            let setup = || -> Result<_, String> {
                enter_netns(&ns).map_err(|e| format!("entering {ns}: {e}"))?;
                if let Some(c) = core {
                    lb_io::pin_to_core(c).map_err(|e| e.to_string())?;
                }
                let mut steering = VipSteering::load(SteeringConfig { queues, ..SteeringConfig::default() })
                    .map_err(|e| e.to_string())?;
                steering.set(steer).map_err(|e| e.to_string())?;
                let mut devs = Vec::new();
                for q in 0..queues {
                    let dev = XskDevice::open(&XskConfig::new("eth0", q)).map_err(|e| e.to_string())?;
                    steering.set_socket(q, dev.fd()).map_err(|e| e.to_string())?;
                    devs.push(dev);
                }
                let ifindex = lb_io::xsk::ifindex("eth0").ok_or("eth0 missing in the LB namespace")?;
                let link = steering.attach(ifindex, mode).map_err(|e| e.to_string())?;
                // The MAC as this thread's namespace reports it: the one ARP / NDP answers carry.
                let mac = lb_io::interface::mac_address("eth0").map_err(|e| format!("eth0: {e}"))?;
                let handoff = if queues > 1 {
                    lb_io::handoff::mesh(queues as usize, lb_io::HandoffConfig::default()).map_err(|e| e.to_string())?
                } else {
                    Vec::new()
                };
                Ok((steering, devs, link, mac, handoff))
            };
            let (steering, devs, link, mac, handoff) = match setup() {
                Ok(parts) => parts,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let core_count = u16::try_from(queues).map_err(|_| "too many queues".to_string())?;
            let mesh = handoff.clone();
            let mut loops = Vec::new();
            let mut handoff = handoff.into_iter();
            for (i, (dev, rx)) in devs.into_iter().zip(updates_rx).enumerate() {
                let core_index = u16::try_from(i).map_err(|_| "too many queues".to_string())?;
                let zero_copy = dev.is_zero_copy();
                let mut worker =
                    Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1 << 16, core_index, core_count });
                worker.set_neighbour_mac(Some(mac));
                let mut lp = PollLoop::new(dev, worker, rx, loop_stop.clone(), LoopConfig::default());
                if let Some(end) = handoff.next() {
                    lp = lp.with_handoff(end);
                }
                loops.push((lp, zero_copy));
            }
            let outcome = |report: lb_io::LoopReport<XskDevice, Worker>, zero_copy| LbOutcome {
                stats: report.stats,
                xsk: report.device.stats(),
                zero_copy,
                worker: report.processor,
                left_in_inbox: 0,
            };
            let mut loops = loops.into_iter();
            let (first, first_zero_copy) = loops.next().ok_or("no queue")?;
            // The other loops on threads of their own (pinned to the next cores), the first on this one.
            // `spawn` returns once a loop is pinned, before the caller hears that the load balancer
            // runs, and a loop that fails later stops the rest, as in `lb run`: a loop left serving
            // alone would lose its dead neighbour's queue and every reply it hands there.
            let mut others = Vec::new();
            let mut failed = None;
            for (i, (lp, zero_copy)) in loops.enumerate() {
                match lp.spawn(format!("lb-poll-q{}", i + 1), core.map(|c| c + i + 1)) {
                    Ok(h) => others.push((h, zero_copy)),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                loop_stop.stop();
                for (h, _) in others {
                    let _ = h.join();
                }
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
            // The maps go to the caller; the program stays attached while `link` lives here.
            let _ = ready_tx.send(Ok(steering));
            let report = first.run();
            // The first loop ended (asked to, or failed): the others stop too.
            loop_stop.stop();
            let mut outcomes = Vec::new();
            let first = report.map_err(|e| e.to_string()).map(|r| outcome(r, first_zero_copy));
            outcomes.push(first);
            for (h, zero_copy) in others {
                let r =
                    h.join().map_or_else(|_| Err("a poll loop panicked".to_string()), |r| r.map_err(|e| e.to_string()));
                outcomes.push(r.map(|r| outcome(r, zero_copy)));
            }
            drop(link);
            let mut outcomes = outcomes.into_iter().collect::<Result<Vec<_>, String>>()?;
            // Every loop has stopped: nothing is handed over any more.
            for (o, end) in outcomes.iter_mut().zip(&mesh) {
                o.left_in_inbox = end.pending();
            }
            Ok(outcomes)
        })
        .map_err(|e| e.to_string())?;
    match ready_rx.recv() {
        Ok(Ok(steering)) => Ok(RunningLb {
            sink: Some(LabSink { updates, steering, wait: std::time::Duration::from_secs(10), conntrack_seed }),
            stop,
            thread: Some(thread),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the load balancer thread ended during setup".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::retrying;
    use std::io::{Error, ErrorKind};

    /// A namespace named with this process's own id that no lab of it holds is a killed run's whose
    /// id this process was given again (in a container, `lb` is always the same process id): the
    /// sweep removes it, where it was left, and the next lab failed with "File exists". One a live
    /// lab holds stays.
    #[test]
    fn a_leftover_with_this_process_id_is_swept_unless_a_lab_holds_it() {
        use lb_io::netns::{Netns, can_create_namespaces};
        if let Err(reason) = can_create_namespaces() {
            return println!("SKIPPED: {reason}");
        }
        let exists = |name: &str| super::run("ip", &["netns", "list"]).unwrap().lines().any(|l| l.starts_with(name));
        let tag = format!("lbsw{}", std::process::id());
        let leftover = Netns::create(&format!("{tag}-sw")).expect("namespace");
        let name = leftover.name().to_string();
        std::mem::forget(leftover); // left as a killed run leaves it
        super::LIVE_TAGS.lock().unwrap().push(tag.clone());
        super::sweep_stale("lbsw");
        assert!(exists(&name), "a live lab's namespace was swept");
        super::LIVE_TAGS.lock().unwrap().retain(|t| *t != tag);
        super::sweep_stale("lbsw");
        let left = exists(&name);
        let _ = super::run("ip", &["netns", "del", &name]);
        assert!(!left, "{name} was left");
    }

    /// An interrupted read is tried again until it gives an answer or another error; nothing else is.
    #[test]
    fn retrying_tries_again_only_what_a_signal_interrupted() {
        let mut calls = 0;
        let got = retrying(|| {
            calls += 1;
            if calls < 3 { Err(Error::from(ErrorKind::Interrupted)) } else { Ok(calls) }
        });
        assert_eq!(got.unwrap(), 3);
        let mut calls = 0;
        let got: std::io::Result<()> = retrying(|| {
            calls += 1;
            Err(Error::from(ErrorKind::WouldBlock))
        });
        assert_eq!((got.unwrap_err().kind(), calls), (ErrorKind::WouldBlock, 1), "a timeout is no interruption");
    }
}
