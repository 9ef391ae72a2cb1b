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
use lb_examples::lab::{BACKENDS, CLIENT4, CLIENT6, Lab, Mode, PORT, VIP4, VIP6, start_lb_on_queues, tables};
use lb_io::bpf::AttachMode;
use lb_io::netns::{can_create_namespaces, enter_netns};

/// TCP connections per address family, held open together.
const CONNS_PER_FAMILY: usize = 24;
/// UDP flows per address family.
const UDP_PER_FAMILY: usize = 12;
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends `msg` and returns the answering backend's name.
fn ask(conn: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    conn.write_all(msg.as_bytes())?;
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (name, echoed) = reply.split_once(' ').unwrap_or((&reply, ""));
    assert_eq!(echoed, msg, "the backend echoes what it got");
    Ok(name.to_string())
}

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
                s.recv(&mut buf).unwrap_or_else(|e| panic!("UDP {vip} #{i}: {e}"));
            }
        }
        answered
    });
    let answered = client.join().expect("client thread");
    assert_eq!(answered, 2 * CONNS_PER_FAMILY);

    let outcomes = lb.stop_all().unwrap();
    assert_eq!(outcomes.len(), 2);
    for (q, o) in outcomes.iter().enumerate() {
        let (s, w) = (o.stats, o.worker.stats());
        println!(
            "queue {q}: rx {} handed in {} handed off {} lost {} tx {} drop {}; worker reverse NAT {} handed off {}",
            s.rx, s.handed_in, s.handed_off, s.handoff_lost, s.tx, s.drop, w.reverse_nat, w.handed_off
        );
        assert!(s.rx > 0, "queue {q} received nothing: the lab did not spread frames over the queues");
        assert_eq!(s.handoff_lost, 0, "queue {q} lost handoffs");
        assert_eq!(s.rx + s.handed_in, w.rx, "queue {q}: the worker saw every frame received or handed in");
        assert_eq!(s.handed_off, w.handed_off, "queue {q}: every handoff the worker asked for was made");
        assert_eq!(s.rx + s.handed_in, s.tx + s.pass + s.drop + s.handed_off, "queue {q}: every frame accounted");
        assert_eq!(w.dropped(lb_core::stats::DropReason::NoReverseFlow), 0, "queue {q}: a reply found no flow");
    }
    let handed_off: u64 = outcomes.iter().map(|o| o.stats.handed_off).sum();
    let handed_in: u64 = outcomes.iter().map(|o| o.stats.handed_in).sum();
    assert!(handed_off > 0, "no reply landed on the other queue: nothing was handed over");
    assert_eq!(handed_in, handed_off, "every frame handed over was taken");
    drop(lab);
}
