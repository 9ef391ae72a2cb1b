//! `lb demo`: the load balancer on a private network, in one command.
//!
//! ```text
//!            ns <tag>-sw: bridge br0
//!   ┌─────────┬──────┴──────┬─────────┬─────────┐
//!  cl         lb            b1        b2        b3        (one namespace each, eth0 on the bridge)
//!  client     AF_XDP on eth0, queue 0; the XDP program steers the VIPs (and the SNAT
//!  10.77.0.10 addresses) to the socket, everything else stays in the lb namespace's kernel
//!  fd77::10   10.77.0.2 / fd77::2                     10.77.0.11-13 / fd77::11-13
//! ```
//! The client opens TCP connections and sends UDP datagrams to the VIP (10.77.0.100 and fd77::100,
//! port 80); each backend answers with its own name, so the client can count how flows spread.
//! Everything is created under a name tag with this process's id and removed on exit, on failure and
//! on Ctrl-C (a guard's Drop); namespaces left by a killed run are swept at the next start.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lb_core::{Frame, Instant, Verdict};
use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{SteeringConfig, VipSteering};
use lb_io::netns::{Netns, can_create_namespaces, enter_netns, format_mac, run};
use lb_io::{
    BurstProcessor, LoopConfig, LoopStats, PollLoop, StopFlag, XskConfig, XskDevice, XskStats,
    update_channel,
};

use super::CmdResult;

/// The VIPs the demo balances.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// The IPv6 VIP.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100);
/// The load balancer's source address for full NAT (steered to the socket like a VIP).
pub const SNAT4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// The IPv6 SNAT address.
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3);
/// Service port.
pub const PORT: u16 = 80;
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];

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
}

/// Arguments of `lb demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Forwarding mode.
    #[arg(long, value_enum, default_value = "nat")]
    pub mode: Mode,
    /// Flows per protocol and address family.
    #[arg(long, default_value_t = 24)]
    pub flows: usize,
    /// Core to pin the poll loop to.
    #[arg(long)]
    pub core: Option<usize>,
    /// Attach the XDP program in generic (SKB) mode instead of native.
    #[arg(long)]
    pub generic: bool,
}

/// Arguments of the hidden `lb demo-backend`.
#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// The name to answer with.
    #[arg(long)]
    pub name: String,
    /// TCP and UDP port to serve.
    #[arg(long, default_value_t = PORT)]
    pub port: u16,
    /// Addresses to serve UDP on, one socket each, so datagrams are answered from the address they
    /// were sent to (the VIP in DSR and tunnel modes; a wildcard socket would answer from the
    /// interface address).
    #[arg(long = "udp-bind")]
    pub udp_bind: Vec<IpAddr>,
}

/// A demo backend: answers every TCP connection and UDP datagram with its name; prints `ready` once
/// both sockets are bound (the parent waits for that line, not for a timer).
pub fn backend_main(args: BackendArgs) -> CmdResult {
    let tcp = TcpListener::bind((Ipv6Addr::UNSPECIFIED, args.port))?;
    let mut udp = Vec::new();
    for addr in &args.udp_bind {
        udp.push(UdpSocket::bind((*addr, args.port))?);
    }
    println!("ready");
    std::io::stdout().flush()?;
    for sock in udp {
        let name = args.name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let reply = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = sock.send_to(reply.as_bytes(), from);
            }
        });
    }
    for conn in tcp.incoming() {
        let Ok(mut conn) = conn else { continue };
        let name = args.name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            // Echo each message prefixed with the name until the client closes.
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let reply = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
                if conn.write_all(reply.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Everything the demo created; dropping it kills the backends and removes the namespaces.
pub struct Lab {
    /// Name tag (`lbd<pid>`).
    pub tag: String,
    /// Backend server processes (killed first on drop).
    children: Vec<Child>,
    /// The client namespace.
    pub client: Netns,
    /// The load balancer's namespace.
    pub lb: Netns,
    /// Backend namespaces, with their IPv4 / IPv6 addresses and MACs.
    pub backends: Vec<(Netns, Ipv4Addr, Ipv6Addr, [u8; 6])>,
    /// The load balancer's MAC on eth0.
    pub lb_mac: [u8; 6],
    /// The bridge namespace (last to go).
    _switch: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Removes namespaces `lbd<pid>-*` whose process no longer exists (a run killed with SIGKILL).
fn sweep_stale(prefix: &str) {
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
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing namespace {name} left by a killed run");
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

impl Lab {
    /// Builds the namespaces, the bridge, the addresses and starts the backends (for `mode`).
    pub fn build(
        tag_prefix: &str,
        mode: Mode,
    ) -> Result<Lab, Box<dyn std::error::Error + Send + Sync>> {
        sweep_stale(tag_prefix);
        let tag = format!("{tag_prefix}{}", std::process::id());
        let sw = Netns::create(&format!("{tag}-sw"))?;
        // No multicast snooping: neighbour solicitations reach every port from the first packet.
        sw.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        let attach = |role: &str,
                      v4: &str,
                      v6: &str|
         -> Result<Netns, Box<dyn std::error::Error + Send + Sync>> {
            let ns = Netns::create(&format!("{tag}-{role}"))?;
            ns.ip(&[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                role,
                "netns",
                sw.name(),
            ])?;
            sw.ip(&["link", "set", role, "master", "br0", "up"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["addr", "add", v4, "dev", "eth0"])?;
            ns.ip(&["addr", "add", v6, "dev", "eth0", "nodad"])?;
            Ok(ns)
        };
        let client = attach("cl", "10.77.0.10/24", "fd77::10/64")?;
        let lb = attach("lb", "10.77.0.2/24", "fd77::2/64")?;
        let lb_mac = lb.mac("eth0")?;
        let mut backends = Vec::new();
        for (i, name) in BACKENDS.iter().enumerate() {
            let v4 = Ipv4Addr::new(10, 77, 0, 11 + i as u8);
            let v6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x11 + i as u16);
            let ns = attach(name, &format!("{v4}/24"), &format!("{v6}/64"))?;
            let mac = ns.mac("eth0")?;
            backends.push((ns, v4, v6, mac));
        }
        // Senders compute full checksums (a forwarded frame with a partial one fails at the receiver).
        client.checksum_offload_off("eth0")?;
        for (ns, ..) in &backends {
            ns.checksum_offload_off("eth0")?;
        }
        // The client reaches the VIPs at the load balancer's MAC (an ARP/NDP responder would do this).
        let mac = format_mac(lb_mac);
        for vip in [VIP4.to_string(), VIP6.to_string()] {
            client.ip(&[
                "neigh",
                "replace",
                &vip,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        for (ns, ..) in &backends {
            match mode {
                Mode::Nat => {
                    for snat in [SNAT4.to_string(), SNAT6.to_string()] {
                        ns.ip(&[
                            "neigh",
                            "replace",
                            &snat,
                            "lladdr",
                            &mac,
                            "dev",
                            "eth0",
                            "nud",
                            "permanent",
                        ])?;
                    }
                }
                Mode::Dsr | Mode::Ipip => {
                    ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
                    ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
                    // A backend answering from the VIP would solicit the client's MAC with the VIP as
                    // source; the client ignores that (it maps the VIP to the load balancer), so the
                    // first IPv6 reply waits out NDP's retries. Real DSR setups pin this the same way.
                    let client_mac = format_mac(client.mac("eth0")?);
                    for addr in ["10.77.0.10", "fd77::10"] {
                        ns.ip(&[
                            "neigh",
                            "replace",
                            addr,
                            "lladdr",
                            &client_mac,
                            "dev",
                            "eth0",
                            "nud",
                            "permanent",
                        ])?;
                    }
                }
            }
            if mode == Mode::Ipip {
                // Fallback tunnel devices take IP-in-IP from any source; relaxed reverse-path filter.
                let _ = run("modprobe", &["ipip"]);
                let _ = run("modprobe", &["ip6_tunnel"]);
                ns.ip(&["link", "set", "tunl0", "up"])?;
                ns.ip(&["link", "set", "ip6tnl0", "up"])?;
                for key in [
                    "net.ipv4.conf.all.rp_filter",
                    "net.ipv4.conf.tunl0.rp_filter",
                ] {
                    ns.exec("sysctl", &["-qw", &format!("{key}=0")])?;
                }
            }
        }
        let mut lab = Lab {
            tag,
            children: Vec::new(),
            client,
            lb,
            backends,
            lb_mac,
            _switch: sw,
        };
        let exe = std::env::current_exe()?;
        let exe = exe.to_string_lossy().into_owned();
        for (i, name) in BACKENDS.iter().enumerate() {
            let ns = lab.backends[i].0.name().to_string();
            let mut cmd_args = vec![
                "netns".to_string(),
                "exec".into(),
                ns,
                exe.clone(),
                "demo-backend".into(),
                "--name".into(),
                name.to_string(),
            ];
            let (_, v4, v6, _) = &lab.backends[i];
            let mut udp = vec![v4.to_string(), v6.to_string()];
            if mode != Mode::Nat {
                udp.extend([VIP4.to_string(), VIP6.to_string()]);
            }
            {
                for vip in udp {
                    cmd_args.extend(["--udp-bind".to_string(), vip]);
                }
            }
            let mut child = Command::new("ip")
                .args(&cmd_args)
                .stdout(Stdio::piped())
                .spawn()?;
            let out = child.stdout.take().ok_or("backend stdout")?;
            lab.children.push(child);
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
            if line.trim() != "ready" {
                return Err(format!("backend {name} did not start (said {line:?})").into());
            }
        }
        Ok(lab)
    }
}

/// Stateless direct server return by flow hash: the trivial processor the demo runs until the lb-core
/// worker is available. Only the Ethernet addresses change.
pub struct HashDsr {
    /// The load balancer's MAC.
    pub local: [u8; 6],
    /// Backend MACs.
    pub backends: Vec<[u8; 6]>,
}

impl BurstProcessor for HashDsr {
    type Update = Vec<[u8; 6]>;

    fn process_burst(&mut self, frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
        for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
            *v = Verdict::Pass;
            let d = f.data_mut();
            let (src, dst, l4) = match d.get(12..14) {
                Some([0x08, 0x00]) if d.len() >= 38 => {
                    (26..30, 30..34, 14 + usize::from(d[14] & 0x0f) * 4)
                }
                Some([0x86, 0xdd]) if d.len() >= 58 => (22..38, 38..54, 54),
                _ => continue,
            };
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            let ports = d.get(l4..l4 + 4).unwrap_or(&[]);
            for &b in d[src].iter().chain(&d[dst]).chain(ports) {
                h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
            let Some(mac) = self
                .backends
                .get((h % self.backends.len().max(1) as u64) as usize)
            else {
                continue;
            };
            d[..6].copy_from_slice(mac);
            d[6..12].copy_from_slice(&self.local);
            *v = Verdict::Tx;
        }
    }

    fn apply(&mut self, update: Vec<[u8; 6]>) -> Vec<[u8; 6]> {
        std::mem::replace(&mut self.backends, update)
    }
}

/// The load balancer thread's result.
struct LbOutcome {
    stats: LoopStats,
    xsk: XskStats,
    zero_copy: bool,
}

/// Starts the load balancer inside the lab's LB namespace; returns once it is attached and polling.
fn start_lb<P>(
    lab: &Lab,
    processor: P,
    core: Option<usize>,
    mode: AttachMode,
    stop: StopFlag,
) -> Result<std::thread::JoinHandle<Result<LbOutcome, String>>, String>
where
    P: BurstProcessor + Send + 'static,
{
    let ns = lab.lb.name().to_string();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let handle = std::thread::Builder::new()
        .name("lb-poll-q0".into())
        .spawn(move || {
            let setup = || -> Result<_, String> {
                enter_netns(&ns).map_err(|e| format!("entering {ns}: {e}"))?;
                if let Some(c) = core {
                    lb_io::pin_to_core(c).map_err(|e| e.to_string())?;
                }
                let mut steering =
                    VipSteering::load(SteeringConfig::default()).map_err(|e| e.to_string())?;
                steering
                    .set_vips([
                        IpAddr::V4(VIP4),
                        IpAddr::V6(VIP6),
                        IpAddr::V4(SNAT4),
                        IpAddr::V6(SNAT6),
                    ])
                    .map_err(|e| e.to_string())?;
                let dev = XskDevice::open(&XskConfig::new("eth0", 0)).map_err(|e| e.to_string())?;
                steering
                    .set_socket(0, dev.fd())
                    .map_err(|e| e.to_string())?;
                let ifindex =
                    lb_io::xsk::ifindex("eth0").ok_or("eth0 missing in the LB namespace")?;
                let link = steering.attach(ifindex, mode).map_err(|e| e.to_string())?;
                Ok((steering, dev, link))
            };
            let (steering, dev, link) = match setup() {
                Ok(parts) => parts,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let zero_copy = dev.is_zero_copy();
            let _ = ready_tx.send(Ok(()));
            let (_updates, rx) = update_channel();
            let report = PollLoop::new(dev, processor, rx, stop, LoopConfig::default())
                .run()
                .map_err(|e| e.to_string());
            drop(link);
            drop(steering);
            let report = report?;
            Ok(LbOutcome {
                stats: report.stats,
                xsk: report.device.stats(),
                zero_copy,
            })
        })
        .map_err(|e| e.to_string())?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the load balancer thread ended during setup".into()),
    }
}

/// Which backend answered each flow, per (protocol, family).
type Spread = BTreeMap<(&'static str, &'static str), BTreeMap<String, usize>>;

/// Runs `flows` TCP connections and UDP exchanges per family from the client namespace.
fn run_client(client_ns: &str, flows: usize) -> Result<(Spread, usize), String> {
    enter_netns(client_ns).map_err(|e| e.to_string())?;
    let mut spread = Spread::new();
    let mut failed = 0;
    let timeout = Some(Duration::from_secs(2));
    for (family, vip) in [("IPv4", IpAddr::V4(VIP4)), ("IPv6", IpAddr::V6(VIP6))] {
        let to = SocketAddr::new(vip, PORT);
        for i in 0..flows {
            if StopFlag::signalled() {
                return Err("interrupted".into());
            }
            let tcp = (|| -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
                s.set_read_timeout(timeout)?;
                s.write_all(format!("hello {i}").as_bytes())?;
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n])
                    .split_whitespace()
                    .next()
                    .unwrap_or("?")
                    .to_string())
            })();
            let udp = (|| -> std::io::Result<String> {
                let local: SocketAddr = if vip.is_ipv4() {
                    "10.77.0.10:0".parse()
                } else {
                    "[fd77::10]:0".parse()
                }
                .map_err(std::io::Error::other)?;
                let s = UdpSocket::bind(local)?;
                s.set_read_timeout(timeout)?;
                s.connect(to)?;
                s.send(format!("hello {i}").as_bytes())?;
                let mut buf = [0u8; 256];
                let n = s.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n])
                    .split_whitespace()
                    .next()
                    .unwrap_or("?")
                    .to_string())
            })();
            for (proto, r) in [("TCP", tcp), ("UDP", udp)] {
                match r {
                    Ok(name) => {
                        *spread
                            .entry((proto, family))
                            .or_default()
                            .entry(name)
                            .or_default() += 1
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!("{proto} {family} flow {i} failed: {e}");
                    }
                }
            }
        }
    }
    Ok((spread, failed))
}

/// `lb demo`.
pub fn main(args: Args) -> CmdResult {
    can_create_namespaces().map_err(|why| format!("lb demo needs root: {why}"))?;
    StopFlag::watch_signals()?;
    println!("building namespaces (client, load balancer, 3 backends, bridge) ...");
    let lab = Lab::build("lbd", args.mode)?;
    println!("namespaces: {}-{{sw,cl,lb,b1,b2,b3}}", lab.tag);
    let stop = StopFlag::new();
    let processor = HashDsr {
        local: lab.lb_mac,
        backends: lab.backends.iter().map(|b| b.3).collect(),
    };
    if args.mode != Mode::Dsr {
        return Err(
            "this build has no lb-core worker yet: only --mode dsr (stateless, by flow hash) runs"
                .into(),
        );
    }
    let attach = if args.generic {
        AttachMode::Generic
    } else {
        AttachMode::Native
    };
    let lb = start_lb(&lab, processor, args.core, attach, stop.clone())?;
    println!(
        "load balancer attached to {}-lb eth0 queue 0 (AF_XDP); sending {} flows per protocol and family",
        lab.tag, args.flows
    );

    let client_ns = lab.client.name().to_string();
    let flows = args.flows;
    let client = std::thread::spawn(move || run_client(&client_ns, flows));
    let client = client.join().map_err(|_| "client thread panicked")?;
    stop.stop();
    let outcome = lb.join().map_err(|_| "load balancer thread panicked")??;
    let (spread, failed) = client?;

    println!();
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10}",
        "backend", "TCP IPv4", "TCP IPv6", "UDP IPv4", "UDP IPv6"
    );
    for name in BACKENDS {
        let cell = |p, f| {
            spread
                .get(&(p, f))
                .and_then(|m: &BTreeMap<String, usize>| m.get(name))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "{name:<10} {:>10} {:>10} {:>10} {:>10}",
            cell("TCP", "IPv4"),
            cell("TCP", "IPv6"),
            cell("UDP", "IPv4"),
            cell("UDP", "IPv6")
        );
    }
    println!("failed flows: {failed}");
    let s = outcome.stats;
    println!();
    println!(
        "poll loop: rx {} tx {} pass {} drop {} bursts {} stalled flushes {}",
        s.rx, s.tx, s.pass, s.drop, s.bursts, s.stalled_flushes
    );
    let x = outcome.xsk;
    println!(
        "AF_XDP ({}): kernel rx_dropped {} rx_ring_full {} fill_ring_empty {} tx_kicks {} rx_wakeups {}",
        if outcome.zero_copy {
            "zero-copy"
        } else {
            "copy mode"
        },
        x.rx_dropped,
        x.rx_ring_full,
        x.rx_fill_ring_empty,
        x.tx_kicks,
        x.rx_wakeups
    );
    println!("removing namespaces ...");
    drop(lab);
    if failed > 0 {
        return Err(format!("{failed} flows failed").into());
    }
    Ok(())
}
