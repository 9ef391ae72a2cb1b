//! Frames the XDP program steers to an AF_XDP socket whose receive ring is full (its loop fell
//! behind) are dropped by the kernel before the loop sees them; `Device::kernel_rx_dropped` reads
//! the kernel's count, which `lb run` publishes as `lb_xsk_rx_dropped_total`. A client namespace
//! sends UDP to a VIP; the socket in the LB namespace never receives. Needs root; skips with the
//! reason otherwise.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{SteeringConfig, VipSteering};
use lb_io::netns::{can_create_namespaces, enter_netns};
use lb_io::{Device, XskConfig, XskDevice};

mod common;

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);

#[test]
fn frames_dropped_by_the_kernel_at_a_full_socket_are_counted() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let (client, lb) = common::client_and_lb("lbk", VIP4);

    // The socket: 64 chunks, so at most 64 frames wait in it; it is never read.
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (sent_tx, sent_rx) = mpsc::channel::<u64>();
    let lb_name = lb.name().to_string();
    let lb_thread = std::thread::spawn(move || -> Result<(u64, u64), String> {
        let setup = || -> Result<_, String> {
            enter_netns(&lb_name).map_err(|e| e.to_string())?;
            let mut steering = VipSteering::load(SteeringConfig::default()).map_err(|e| e.to_string())?;
            steering.set_vips([IpAddr::V4(VIP4)]).map_err(|e| e.to_string())?;
            let config = XskConfig { frames: 64, ring_size: 64, fill_ring_size: 64, ..XskConfig::new("l0", 0) };
            let dev = XskDevice::open(&config).map_err(|e| e.to_string())?;
            steering.set_socket(0, dev.fd()).map_err(|e| e.to_string())?;
            let ifindex = lb_io::xsk::ifindex("l0").ok_or("no l0")?;
            let link = steering.attach(ifindex, AttachMode::Native).map_err(|e| e.to_string())?;
            Ok((steering, dev, link))
        };
        let (_steering, dev, _link) = match setup() {
            Ok(parts) => parts,
            Err(e) => {
                ready_tx.send(Err(e.clone())).unwrap();
                return Err(e);
            }
        };
        let before = dev.kernel_rx_dropped();
        ready_tx.send(Ok(())).unwrap();
        let sent = sent_rx.recv().map_err(|e| e.to_string())?;
        // The veth delivers asynchronously: read until every frame beyond the socket's 64 chunks
        // is counted, or the deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut dropped = dev.kernel_rx_dropped() - before;
        while dropped < sent - 64 && Instant::now() < deadline {
            std::thread::yield_now();
            dropped = dev.kernel_rx_dropped() - before;
        }
        Ok((sent, dropped))
    });
    match ready_rx.recv().unwrap() {
        Ok(()) => {}
        Err(e) if e.contains("Operation not permitted") || e.contains("not supported") => {
            println!("SKIPPED: the kernel refused XDP / AF_XDP: {e}");
            return;
        }
        Err(e) => panic!("load balancer setup failed: {e}"),
    }
    let client_name = client.name().to_string();
    let sent = std::thread::spawn(move || {
        enter_netns(&client_name).unwrap();
        let s = UdpSocket::bind("10.77.0.1:0").unwrap();
        s.connect((VIP4, 7000)).unwrap();
        let mut sent = 0u64;
        for i in 0..500u32 {
            s.send(&i.to_be_bytes()).unwrap();
            sent += 1;
        }
        sent
    })
    .join()
    .unwrap();
    sent_tx.send(sent).unwrap();
    let (sent, dropped) = lb_thread.join().unwrap().unwrap();
    assert!(
        dropped >= sent - 64 && dropped <= sent,
        "{sent} frames to the VIP, at most 64 of them in the socket: the kernel's drops read {dropped}"
    );
}
