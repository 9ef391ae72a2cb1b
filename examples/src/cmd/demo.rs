//! `lb demo`: the load balancer on a private network, in one command.
//!
//! The network is [`lb_examples::lab`]: a bridge, a client, the load balancer (lb-core's worker over
//! AF_XDP) and three backends, each in its own namespace.
//! The client opens TCP connections and sends UDP datagrams to the VIP (10.77.0.100 and fd77::100,
//! port 80); each backend answers with its own name, so the client can count how flows spread.
//! Everything is created under a name tag with this process's id and removed on exit, on failure,
//! on Ctrl-C, SIGTERM and SIGHUP (a guard's Drop); namespaces left by a killed run are swept at the
//! next start.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use lb_core::config::RemovedBackendPolicy;
use lb_examples::lab::{BACKENDS, CLIENT4, CLIENT6, Lab, Mode, PORT, VIP4, VIP6, retrying, start_lb_on_queues, tables};
use lb_io::StopFlag;
use lb_io::bpf::AttachMode;
use lb_io::netns::{can_create_namespaces, enter_netns};

use super::CmdResult;

/// Arguments of `lb demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Forwarding mode.
    #[arg(long, value_enum, default_value = "nat")]
    pub mode: Mode,
    /// Flows per protocol and address family.
    #[arg(long, default_value_t = 24)]
    pub flows: usize,
    /// Core to pin the (first) poll loop to; loop i goes to CORE+i.
    #[arg(long)]
    pub core: Option<usize>,
    /// Receive queues on the load balancer's link, one poll loop each (full-NAT replies that land on
    /// another loop's queue are handed to the loop that owns their SNAT port).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub queues: u32,
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
/// both sockets are bound (the parent waits for that line, not for a timer). It exits when its
/// standard input ends: the lab holds the other end of that pipe, so a lab that goes without its
/// Drop (`lb demo` killed with SIGKILL) takes its backends with it, and leaves no server running
/// in a namespace the next run's sweep removes the name of.
pub fn backend_main(args: BackendArgs) -> CmdResult {
    let tcp = TcpListener::bind((Ipv6Addr::UNSPECIFIED, args.port))?;
    let mut udp = Vec::new();
    for addr in &args.udp_bind {
        udp.push(UdpSocket::bind((*addr, args.port))?);
    }
    std::thread::spawn(|| {
        // Nothing is written to it: end of file (or an error) means the lab is gone.
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        std::process::exit(0);
    });
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

/// `io`, unless the demo was stopped (Ctrl-C): a read a signal interrupts is tried again
/// ([`retrying`]) only while the demo goes on.
fn unless_stopped<T>(io: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    if StopFlag::signalled() {
        return Err(std::io::Error::other("interrupted"));
    }
    io()
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
                let n = retrying(|| unless_stopped(|| s.read(&mut buf)))?;
                Ok(String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("?").to_string())
            })();
            let udp = (|| -> std::io::Result<String> {
                let local = if vip.is_ipv4() { SocketAddr::from((CLIENT4, 0)) } else { SocketAddr::from((CLIENT6, 0)) };
                let s = UdpSocket::bind(local)?;
                s.set_read_timeout(timeout)?;
                s.connect(to)?;
                s.send(format!("hello {i}").as_bytes())?;
                let mut buf = [0u8; 256];
                let n = retrying(|| unless_stopped(|| s.recv(&mut buf)))?;
                Ok(String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("?").to_string())
            })();
            for (proto, r) in [("TCP", tcp), ("UDP", udp)] {
                match r {
                    Ok(name) => *spread.entry((proto, family)).or_default().entry(name).or_default() += 1,
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
    // A terminal that closes stops the demo as Ctrl-C does: its namespaces are removed.
    StopFlag::watch_signals_and_hangup()?;
    println!("building namespaces (client, load balancer, 3 backends, bridge) ...");
    let lab = Lab::build_with_queues("lbd", args.mode, &std::env::current_exe()?, args.queues)?;
    println!("namespaces: {}-{{sw,cl,lb,b1,b2,b3}}, mode {:?}", lab.tag, args.mode);
    if let Some(path) = lab.decap {
        println!("backends decapsulate with {path}");
    }
    let config = lab.config(&BACKENDS, RemovedBackendPolicy::Reschedule);
    let attach = if args.generic { AttachMode::Generic } else { AttachMode::Native };
    // The process's connection table seed, as `lb run` draws one.
    let seed = lb_examples::control::draw_conntrack_seed();
    let mut builder = lb_core::service::TableBuilder::new().with_conntrack_seed(seed);
    let lb = start_lb_on_queues(&lab, tables(&mut builder, &config)?, args.core, attach, args.queues)?;
    println!(
        "load balancer attached to {}-lb eth0, {} (AF_XDP); sending {} flows per protocol and family",
        lab.tag,
        if args.queues == 1 {
            "queue 0".to_string()
        } else {
            format!("queues 0-{}, a poll loop each", args.queues - 1)
        },
        args.flows
    );

    let client_ns = lab.client.name().to_string();
    let flows = args.flows;
    let client = std::thread::spawn(move || run_client(&client_ns, flows));
    let client = client.join().map_err(|_| "client thread panicked")?;
    let outcomes = lb.stop_all()?;
    let (spread, failed) = client?;

    println!();
    println!("{:<10} {:>10} {:>10} {:>10} {:>10}", "backend", "TCP IPv4", "TCP IPv6", "UDP IPv4", "UDP IPv6");
    for name in BACKENDS {
        let cell = |p, f| spread.get(&(p, f)).and_then(|m: &BTreeMap<String, usize>| m.get(name)).copied().unwrap_or(0);
        println!(
            "{name:<10} {:>10} {:>10} {:>10} {:>10}",
            cell("TCP", "IPv4"),
            cell("TCP", "IPv6"),
            cell("UDP", "IPv4"),
            cell("UDP", "IPv6")
        );
    }
    println!("failed flows: {failed}");

    let first = outcomes.first().ok_or("no poll loop ran")?;
    // Every worker runs the same tables: their counters sum slot by slot.
    let mut w = first.worker.stats().clone();
    for o in &outcomes[1..] {
        w.merge(o.worker.stats());
    }
    let w = &w;
    println!();
    println!(
        "worker{}: rx {} tx {} passed {} reverse-NAT {} handed off {} dropped {}; answered ARP {} NDP {}",
        // A frame handed from one loop to another counts in both workers' rx.
        if outcomes.len() > 1 { "s (summed; a handed-over frame counts in rx at both)" } else { "" },
        w.rx,
        w.tx,
        w.passed,
        w.reverse_nat,
        w.handed_off,
        w.dropped_total(),
        w.arp_replies,
        w.ndp_adverts
    );
    for reason in lb_core::stats::DropReason::ALL {
        let n = w.dropped(reason);
        if n > 0 {
            println!("  drop {reason}: {n}");
        }
    }
    let tables = first.worker.tables();
    for svc in tables.services() {
        let sc = w.service(svc.slot);
        let per: Vec<String> = svc
            .backends
            .iter()
            .map(|b| {
                let c = w.backend(b.slot());
                format!("{} {} new / {} pkts", b.addr, c.new_flows, c.packets)
            })
            .collect();
        println!("  {:<14} {} new flows, {} packets: {}", svc.name, sc.new_flows, sc.packets, per.join(", "));
    }
    for (q, outcome) in outcomes.iter().enumerate() {
        let s = outcome.stats;
        println!(
            "poll loop q{q}: rx {} tx {} pass {} drop {} handed off {} handed in {} bursts {} stalled flushes {}",
            s.rx, s.tx, s.pass, s.drop, s.handed_off, s.handed_in, s.bursts, s.stalled_flushes
        );
        let x = outcome.xsk;
        println!(
            "  AF_XDP ({}): kernel rx_dropped {} rx_ring_full {} fill_ring_empty {} tx_kicks {} rx_wakeups {}",
            if outcome.zero_copy { "zero-copy" } else { "copy mode" },
            x.rx_dropped,
            x.rx_ring_full,
            x.rx_fill_ring_empty,
            x.tx_kicks,
            x.rx_wakeups
        );
    }
    println!("removing namespaces ...");
    drop(lab);
    if failed > 0 {
        return Err(format!("{failed} flows failed").into());
    }
    Ok(())
}
