//! Frames the XDP program steers to an RX queue whose slot holds no AF_XDP socket (a queue no loop
//! serves, a socket not yet bound) fall back to the kernel and are counted
//! (`SteeringCounters::no_socket`, which `lb run` publishes as `lb_xdp_no_socket_total`); once a
//! socket fills the slot, the frames go to it and the count stays. A client namespace sends UDP to
//! a VIP over a veth pair. Needs root; skips with the reason otherwise.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb_core::Frame;
use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{SteeringConfig, VipSteering};
use lb_io::netns::{can_create_namespaces, enter_netns};
use lb_io::{Device, XskConfig, XskDevice};

mod common;

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// Frames sent in each round.
const FRAMES: u64 = 20;

#[test]
fn frames_steered_to_a_queue_with_no_socket_are_counted() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let (client, lb) = common::client_and_lb("lbn", VIP4);

    // The program is attached with queue 0's slot empty.
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let (counted_tx, counted_rx) = mpsc::channel::<u64>();
    let lb_name = lb.name().to_string();
    let lb_thread = std::thread::spawn(move || -> Result<(u64, u64), String> {
        let setup = || -> Result<_, String> {
            enter_netns(&lb_name).map_err(|e| e.to_string())?;
            let mut steering = VipSteering::load(SteeringConfig { queues: 1, ..SteeringConfig::default() })
                .map_err(|e| e.to_string())?;
            steering.set_vips([IpAddr::V4(VIP4)]).map_err(|e| e.to_string())?;
            let ifindex = lb_io::xsk::ifindex("l0").ok_or("no l0")?;
            let link = steering.attach(ifindex, AttachMode::Native).map_err(|e| e.to_string())?;
            let counters = steering.counters().map_err(|e| e.to_string())?;
            Ok((steering, link, counters))
        };
        let (steering, _link, counters) = match setup() {
            Ok(parts) => parts,
            Err(e) => {
                ready_tx.send(Err(e.clone())).unwrap();
                return Err(e);
            }
        };
        let no_socket = || counters.no_socket().map_err(|e| e.to_string());
        // The veth delivers asynchronously: read until every frame is counted, or the deadline.
        let until = |want: u64| -> Result<u64, String> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut n = no_socket()?;
            while n < want && Instant::now() < deadline {
                std::thread::yield_now();
                n = no_socket()?;
            }
            Ok(n)
        };
        ready_tx.send(Ok(())).unwrap();
        sent_rx.recv().map_err(|e| e.to_string())?;
        let without = until(FRAMES)?;
        // A socket fills the slot: the next frames reach it and are not counted.
        let mut dev = XskDevice::open(&XskConfig::new("l0", 0)).map_err(|e| e.to_string())?;
        steering.set_socket(0, dev.fd()).map_err(|e| e.to_string())?;
        counted_tx.send(without).unwrap();
        sent_rx.recv().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut received = 0u64;
        while received < FRAMES && Instant::now() < deadline {
            let mut bufs = [[0u8; 1]; 32];
            let n = {
                let mut frames: Vec<Frame<'_>> = bufs.iter_mut().map(|b| Frame::new(b, 0, 0)).collect();
                dev.receive(&mut frames).map_err(|e| e.to_string())?.count
            };
            dev.settle(&vec![None; n]).map_err(|e| e.to_string())?;
            received += n as u64;
        }
        if received < FRAMES {
            return Err(format!("the socket received {received} of {FRAMES} frames"));
        }
        Ok((without, no_socket()?))
    });
    match ready_rx.recv().unwrap() {
        Ok(()) => {}
        Err(e) if e.contains("Operation not permitted") || e.contains("not supported") => {
            println!("SKIPPED: the kernel refused XDP / AF_XDP: {e}");
            return;
        }
        Err(e) => panic!("load balancer setup failed: {e}"),
    }
    let send = |client_name: String| {
        std::thread::spawn(move || {
            enter_netns(&client_name).unwrap();
            let s = UdpSocket::bind("10.77.0.1:0").unwrap();
            s.connect((VIP4, 7000)).unwrap();
            for i in 0..FRAMES {
                s.send(&i.to_be_bytes()).unwrap();
            }
        })
        .join()
        .unwrap();
    };
    send(client.name().to_string());
    sent_tx.send(()).unwrap();
    if counted_rx.recv().is_ok() {
        send(client.name().to_string());
        sent_tx.send(()).unwrap();
    }
    let (without, with) = lb_thread.join().unwrap().unwrap();
    assert_eq!(without, FRAMES, "every frame to the VIP found queue 0's slot empty");
    assert_eq!(with, FRAMES, "frames that reached the socket are not counted");
}
