//! Full NAT over two queues, end to end: real kernel TCP and UDP clients talk to three backends
//! through two AF_XDP poll loops, one per receive queue of the load balancer's link. The bridge port
//! in front of that link spreads frames over its two queues by their flow hash, as a NIC's RSS does,
//! so a backend's replies (backend to SNAT address and port) mostly land on a queue other than the
//! one whose loop tracks the connection and owns its SNAT port. That loop hands them over
//! (`lb_io::handoff`) and the owner translates them back; before, such replies were dropped as
//! `no_reverse_flow` and `lb run` refused NAT over several queues for that reason.
//!
//! Every connection must open, be answered, keep its backend, and carry a bulk exchange; the loops
//! must both have received frames (else the lab did not spread them and the test proves nothing),
//! must have handed replies over, and must have lost none.
//!
//! Synchronisation is by events only (backends print `ready`; the load balancer signals when it is
//! attached). Needs root (namespaces, XDP, AF_XDP); skips with the reason otherwise. Runs in CI as root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use lb_core::config::RemovedBackendPolicy;
use lb_core::service::TableBuilder;
use lb_examples::lab::{
    BACKENDS, CLIENT4, CLIENT6, Lab, Mode, PORT, VIP4, VIP6, ask, http_get_in, metric_value, retrying,
    start_lb_on_queues, tables,
};
use lb_io::bpf::AttachMode;
use lb_io::netns::{can_create_namespaces, enter_netns};

/// TCP connections per address family, held open together.
const CONNS_PER_FAMILY: usize = 24;
/// UDP flows per address family.
const UDP_PER_FAMILY: usize = 12;
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// 64 KiB each way on a new connection: many full-size segments, many replies to hand over.
fn bulk(vip: IpAddr) -> std::io::Result<usize> {
    let mut c = TcpStream::connect_timeout(&SocketAddr::new(vip, PORT), IO_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.write_all(&[b'x'; 64 * 1024])?;
    c.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)?;
    Ok(reply.iter().filter(|b| **b == b'x').count())
}

/// From the lab's client namespace: [`CONNS_PER_FAMILY`] held TCP connections per family, each
/// answered twice by the same backend, bulk exchanges, and UDP flows; returns the connections
/// answered (any failure panics, naming the flow).
fn client_traffic(lab: &Lab) -> usize {
    let client_ns = lab.client.name().to_string();
    let client = std::thread::spawn(move || {
        enter_netns(&client_ns).unwrap();
        let mut answered = 0;
        for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
            let mut conns = Vec::new();
            for i in 0..CONNS_PER_FAMILY {
                let mut c = TcpStream::connect_timeout(&SocketAddr::new(vip, PORT), IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect to {vip} #{i}: {e}"));
                c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let name = ask(&mut c, &format!("hello {i}")).unwrap_or_else(|e| panic!("answer {vip} #{i}: {e}"));
                conns.push((c, name));
            }
            for (i, (c, name)) in conns.iter_mut().enumerate() {
                assert_eq!(&ask(c, &format!("again {i}")).unwrap(), name, "{vip} #{i} changed backend");
                answered += 1;
            }
            for i in 0..4 {
                let echoed = bulk(vip).unwrap_or_else(|e| panic!("bulk exchange {i} through {vip}: {e}"));
                assert_eq!(echoed, 64 * 1024, "{vip}: bulk exchange {i} echoed in full");
            }
            let local = if vip.is_ipv4() { SocketAddr::from((CLIENT4, 0)) } else { SocketAddr::from((CLIENT6, 0)) };
            for i in 0..UDP_PER_FAMILY {
                let s = UdpSocket::bind(local).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.connect((vip, PORT)).unwrap();
                s.send(format!("datagram {i}").as_bytes()).unwrap();
                let mut buf = [0u8; 256];
                retrying(|| s.recv(&mut buf)).unwrap_or_else(|e| panic!("UDP {vip} #{i}: {e}"));
            }
        }
        answered
    });
    client.join().expect("client thread")
}

#[test]
fn nat_over_two_queues_hands_replies_to_the_loop_that_owns_their_snat_port() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let lab = Lab::build_with_queues("lbnq", Mode::Nat, Path::new(env!("CARGO_BIN_EXE_lb")), 2)
        .unwrap_or_else(|e| panic!("building the lab: {e}"));
    let mut builder = TableBuilder::new();
    let tables = tables(&mut builder, &lab.config(&BACKENDS, RemovedBackendPolicy::Reschedule)).unwrap();
    let lb = match start_lb_on_queues(&lab, tables, None, AttachMode::Native, 2) {
        Ok(lb) => lb,
        Err(e) if e.contains("Operation not permitted") || e.contains("not supported") => {
            println!("SKIPPED: the kernel refused XDP / AF_XDP: {e}");
            return;
        }
        Err(e) => panic!("starting the load balancer: {e}"),
    };

    let answered = client_traffic(&lab);
    assert_eq!(answered, 2 * CONNS_PER_FAMILY);

    let outcomes = lb.stop_all().unwrap();
    assert_eq!(outcomes.len(), 2);
    for (q, o) in outcomes.iter().enumerate() {
        let (s, w) = (o.stats, o.worker.stats());
        println!(
            "queue {q}: rx {} handed in {} handed off {} lost {} (refused {}) tx {} drop {} left in inbox {}; worker reverse NAT {} handed off {}",
            s.rx,
            s.handed_in,
            s.handed_off,
            s.handoff_lost,
            s.handoff_refused,
            s.tx,
            s.drop,
            o.left_in_inbox,
            w.reverse_nat,
            w.handed_off
        );
        assert!(s.rx > 0, "queue {q} received nothing: the lab did not spread frames over the queues");
        // Replies to connections closing as the loops stop may be handed to one that has left.
        assert_eq!(s.handoff_lost, s.handoff_refused, "queue {q} lost handoffs to a running loop");
        assert_eq!(s.rx + s.handed_in, w.rx, "queue {q}: the worker saw every frame received or handed in");
        assert_eq!(
            s.handed_off + s.handoff_refused,
            w.handed_off,
            "queue {q}: every handoff the worker asked for was made, or refused by a loop that had left"
        );
        assert_eq!(s.rx + s.handed_in, s.tx + s.pass + s.drop + s.handed_off, "queue {q}: every frame accounted");
        assert_eq!(w.dropped(lb_core::stats::DropReason::NoReverseFlow), 0, "queue {q}: a reply found no flow");
    }
    let handed_off: u64 = outcomes.iter().map(|o| o.stats.handed_off).sum();
    let handed_in: u64 = outcomes.iter().map(|o| o.stats.handed_in).sum();
    let left: usize = outcomes.iter().map(|o| o.left_in_inbox).sum();
    assert!(handed_off > 0, "no reply landed on the other queue: nothing was handed over");
    assert_eq!((handed_in, left), (handed_off, 0), "every frame handed over was taken, none left in an inbox");
    drop(lab);
}

/// A poll loop that cannot start (here: pinned to a core that does not exist) fails the start and
/// names why. The lab used to report the load balancer running while the first loop served alone:
/// the other queue's frames and the replies handed to its loop were lost, and the error came only
/// when the test stopped it.
#[test]
fn a_loop_that_cannot_start_fails_the_start_naming_why() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    // The last core this process may use takes queue 0's loop; queue 1's would go on the next.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let last = cores - 1;
    let pins = |core: usize| std::thread::spawn(move || lb_io::pin_to_core(core).is_ok()).join().unwrap();
    if !pins(last) || pins(last + 1) {
        println!("SKIPPED: core {last} is not the last core this process may use");
        return;
    }
    let lab = Lab::build_with_queues("lbnp", Mode::Nat, Path::new(env!("CARGO_BIN_EXE_lb")), 2)
        .unwrap_or_else(|e| panic!("building the lab: {e}"));
    let mut builder = TableBuilder::new();
    let tables = tables(&mut builder, &lab.config(&BACKENDS, RemovedBackendPolicy::Reschedule)).unwrap();
    match start_lb_on_queues(&lab, tables, Some(last), AttachMode::Native, 2) {
        Ok(lb) => panic!("started with queue 1's loop unable to run; stopping it says {:?}", lb.stop_all().err()),
        Err(e) if e.contains("Operation not permitted") || e.contains("not supported") => {
            println!("SKIPPED: the kernel refused XDP / AF_XDP: {e}");
        }
        Err(e) => assert!(e.contains(&format!("cannot pin the poll loop to core {}", last + 1)), "{e}"),
    }
    drop(lab);
}

/// The lab's NAT services as an `lb run` configuration file, serving queues 0 and 1 of `eth0`,
/// with the metrics endpoint on the load balancer namespace's loopback.
fn run_config(lab: &Lab, metrics: &str) -> String {
    let mac = lb_io::netns::format_mac;
    let cfg = lab.config(&BACKENDS, RemovedBackendPolicy::Reschedule);
    let node = &cfg.node;
    let mut text = format!(
        "node:\n  local_mac: \"{}\"\n  gateway_mac: \"{}\"\n  snat_v4: {}\n  snat_v6: \"{}\"\n",
        mac(node.local_mac),
        mac(node.gateway_mac.unwrap()),
        node.snat_v4.unwrap(),
        node.snat_v6.unwrap()
    );
    text +=
        &format!("interfaces: [{{ name: eth0, queues: [0, 1] }}]\nmetrics: {{ listen: \"{metrics}\" }}\nservices:\n");
    for s in &cfg.services {
        let proto = if s.key.proto == lb_core::config::Protocol::Udp { "udp" } else { "tcp" };
        text += &format!(
            "  - {{ name: {}, vip: \"{}\", port: {}, protocol: {proto}, mode: nat, scheduler: mh, backends: [",
            s.name, s.key.vip, s.key.port
        );
        let backends: Vec<String> = s
            .backends
            .iter()
            .map(|b| format!("{{ addr: \"{}\", port: {}, mac: \"{}\" }}", b.addr, b.port, mac(b.mac.unwrap())))
            .collect();
        text += &backends.join(", ");
        text += "] }\n";
    }
    text
}

/// The same through the `lb` binary: `lb run` with NAT services on two queues starts (it refused
/// them before), serves the traffic through both loops, and its metrics count the handoffs.
#[test]
fn lb_run_serves_nat_over_two_queues() {
    use std::io::BufRead;
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let lab = Lab::build_with_queues("lbnr", Mode::Nat, Path::new(env!("CARGO_BIN_EXE_lb")), 2)
        .unwrap_or_else(|e| panic!("building the lab: {e}"));
    lab.lb.ip(&["link", "set", "lo", "up"]).unwrap();
    let metrics = "127.0.0.1:9100";
    let config = std::env::temp_dir().join(format!("lb-nat-queues-{}.yaml", std::process::id()));
    std::fs::write(&config, run_config(&lab, metrics)).unwrap();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", lab.lb.name(), env!("CARGO_BIN_EXE_lb"), "--log", "info", "run"])
        .args(["--neighbour-responder", "all", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut child = Kill(child);
    // Both loops run the tables and their services are steered before the log says so: an event,
    // not a delay.
    let mut log = Vec::new();
    let published = lines.by_ref().map_while(Result::ok).any(|l| {
        let done = l.contains("every poll loop runs the new tables: their services are steered");
        log.push(l);
        done
    });
    if !published {
        let _ = child.0.wait();
        let log = log.join("\n");
        if log.contains("Operation not permitted") || log.contains("not supported") {
            println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
            return;
        }
        panic!("lb run did not publish its tables:\n{log}");
    }
    // The log goes on being read, so lb run never blocks on a full pipe.
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    assert_eq!(client_traffic(&lab), 2 * CONNS_PER_FAMILY);
    // The loops publish their counters once a second; the handoffs show once they have.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = http_get_in(lab.lb.name(), metrics, "/metrics");
        if metric_value(&text, "lb_nat_replies_handed_off_total").unwrap_or(0) > 0
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::yield_now();
    };
    let handed = metric_value(&text, "lb_nat_replies_handed_off_total");
    let no_flow = metric_value(&text, "lb_dropped_packets_total{reason=\"no_reverse_flow\"}");
    println!("lb run over two queues: handed off {handed:?}, no_reverse_flow {no_flow:?}");
    assert!(handed.unwrap_or(0) > 0, "no handoff counted:\n{text}");
    assert_eq!(no_flow, Some(0), "a reply found no flow");
    let _ = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    let status = child.0.wait().unwrap();
    let rest = reader.join().unwrap();
    let _ = std::fs::remove_file(&config);
    assert!(status.success(), "lb run ended with {status}:\n{}\n{}", log.join("\n"), rest.join("\n"));
}
