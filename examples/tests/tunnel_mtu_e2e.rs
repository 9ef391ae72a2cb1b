//! Path MTU discovery through the IP-in-IP mode with real kernel TCP: the backends' links have no room
//! for the outer header (MTU 1500, the client's too), so a full-size client segment wrapped for a
//! backend (1520 bytes) dies on the way. First without `node.tunnel_mtu`: a bulk exchange stalls (the
//! control: this test can fail). Then with `tunnel_mtu: 1500`: the load balancer answers the first
//! full-size segment with ICMP "fragmentation needed" / "packet too big", the client's kernel lowers
//! its path MTU to the VIP and resends smaller segments, and 64 KiB go through each way, IPv4 and IPv6.
//! Needs root (namespaces, XDP, AF_XDP); skips with the reason otherwise. Runs in CI as root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use lb_core::config::RemovedBackendPolicy;
use lb_core::service::TableBuilder;
use lb_examples::lab::{BACKENDS, Lab, Mode, NO_TUNNELS, PORT, VIP4, VIP6, start_lb, tables};
use lb_io::bpf::AttachMode;
use lb_io::netns::{can_create_namespaces, enter_netns};

const BULK: usize = 64 * 1024;

/// Sends [`BULK`] bytes to `vip` and reads the whole echo back, within `timeout` per read.
fn bulk(vip: IpAddr, timeout: Duration) -> std::io::Result<usize> {
    let mut c = TcpStream::connect_timeout(&SocketAddr::new(vip, PORT), timeout)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    c.write_all(&[b'x'; BULK])?;
    c.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)?;
    // The backend echoes each read it makes as "<name> <bytes>".
    Ok(reply.iter().filter(|&&b| b == b'x').count())
}

#[test]
fn ipip_without_room_on_the_backend_links_works_through_icmp_too_big() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let lab = match Lab::build("lbm", Mode::Ipip, Path::new(env!("CARGO_BIN_EXE_lb"))) {
        Ok(l) => l,
        Err(e) if e.to_string() == NO_TUNNELS => {
            println!("SKIPPED: {e}");
            return;
        }
        Err(e) => panic!("building the lab: {e}"),
    };
    // Take back the room the lab gives the tunnel modes: the backends' links carry 1500 bytes.
    for b in &lab.backends {
        b.ns.ip(&["link", "set", "eth0", "mtu", "1500"]).unwrap();
    }
    let mut builder = TableBuilder::new();
    let mut config = lab.config(&BACKENDS, RemovedBackendPolicy::Reschedule);
    let mut lb = match start_lb(&lab, tables(&mut builder, &config).unwrap(), None, AttachMode::Native) {
        Ok(lb) => lb,
        Err(e) if e.contains("Operation not permitted") || e.contains("not supported") => {
            println!("SKIPPED: the kernel refused XDP / AF_XDP: {e}");
            return;
        }
        Err(e) => panic!("starting the load balancer: {e}"),
    };

    let client_ns = lab.client.name().to_string();
    let (next, go) = mpsc::channel::<()>();
    let (done, phase) = mpsc::channel::<Vec<std::io::Result<usize>>>();
    let client = std::thread::spawn(move || {
        enter_netns(&client_ns).unwrap();
        // Without a path MTU: the wrapped full-size segments are lost at the backends' links.
        done.send(vec![bulk(IpAddr::V4(VIP4), Duration::from_secs(2))]).unwrap();
        go.recv().unwrap();
        done.send([IpAddr::V4(VIP4), IpAddr::V6(VIP6)].map(|vip| bulk(vip, Duration::from_secs(5))).into()).unwrap();
    });

    let without = phase.recv().unwrap();
    assert!(without[0].is_err(), "without tunnel_mtu the exchange should stall: {without:?}");

    config.node.tunnel_mtu = Some(1500);
    lb.update(&tables(&mut builder, &config).unwrap(), Duration::from_secs(10)).unwrap();
    next.send(()).unwrap();
    let with = phase.recv().unwrap();
    client.join().unwrap();
    for (vip, result) in ["IPv4", "IPv6"].iter().zip(&with) {
        assert_eq!(result.as_ref().ok(), Some(&BULK), "{vip}: the whole echo with tunnel_mtu 1500");
    }
    let outcome = lb.stop().unwrap();
    let told = outcome.worker.stats().icmp_too_big;
    assert!(told >= 2, "at least one ICMP error per family, got {told}");
    println!("ICMP too-big errors sent: {told}");
}
