//! AF_XDP end to end, without any load balancing: a client namespace sends UDP to a VIP; the XDP
//! program steers it to the AF_XDP socket in the LB namespace; the poll loop reflects it (swaps
//! Ethernet, IP addresses and ports) and transmits it back; the client's kernel socket receives the
//! echo from the VIP. Traffic to the LB's own address must still reach the kernel (XDP_PASS).
//! Needs root; skips with the reason otherwise.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use lb_core::{Frame, Instant, Verdict};
use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{SteeringConfig, VipSteering};
use lb_io::netns::{Netns, can_create_namespaces, enter_netns, format_mac, veth_pair};
use lb_io::{BurstProcessor, LoopConfig, PollLoop, StopFlag, XskConfig, XskDevice, update_channel};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100);

/// Sends every IPv4/IPv6 UDP frame back where it came from.
struct Reflect;

fn swap(d: &mut [u8], a: usize, b: usize, n: usize) {
    for i in 0..n {
        d.swap(a + i, b + i);
    }
}

impl BurstProcessor for Reflect {
    type Update = ();
    fn process_burst(&mut self, frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
        for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
            let d = f.data_mut();
            *v = Verdict::Pass;
            if d.len() < 14 {
                continue;
            }
            let (addr, alen, l4) = match (d[12], d[13]) {
                (0x08, 0x00) if d.len() >= 42 && d[23] == 17 => (26, 4, 14 + usize::from(d[14] & 0x0f) * 4),
                (0x86, 0xdd) if d.len() >= 62 && d[20] == 17 => (22, 16, 54),
                _ => continue,
            };
            if d.len() < l4 + 8 {
                continue;
            }
            swap(d, 0, 6, 6);
            swap(d, addr, addr + alen, alen);
            swap(d, l4, l4 + 2, 2);
            *v = Verdict::Tx;
        }
    }
    fn apply(&mut self, u: ()) {
        u
    }
}

#[test]
fn udp_to_the_vip_is_reflected_through_af_xdp_and_other_traffic_stays_in_the_kernel() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbx{}", std::process::id());
    let client = Netns::create(&format!("{tag}c")).unwrap();
    let lb = Netns::create(&format!("{tag}l")).unwrap();
    veth_pair(&client, "c0", &lb, "l0").unwrap();
    client.ip(&["addr", "add", "10.77.0.1/24", "dev", "c0"]).unwrap();
    client.ip(&["addr", "add", "fd77::1/64", "dev", "c0", "nodad"]).unwrap();
    lb.ip(&["addr", "add", "10.77.0.2/24", "dev", "l0"]).unwrap();
    lb.ip(&["addr", "add", "fd77::2/64", "dev", "l0", "nodad"]).unwrap();
    client.checksum_offload_off("c0").unwrap();
    let lb_mac = format_mac(lb.mac("l0").unwrap());
    client.static_neighbour(&VIP4.to_string(), &lb_mac, "c0").unwrap();
    client.static_neighbour(&VIP6.to_string(), &lb_mac, "c0").unwrap();

    // The load balancer's side: program, socket and loop, in its own thread inside its namespace.
    let stop = StopFlag::new();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let lb_thread = {
        let stop = stop.clone();
        let lb_name = lb.name().to_string();
        std::thread::spawn(move || {
            let setup = || -> Result<_, String> {
                enter_netns(&lb_name).map_err(|e| e.to_string())?;
                let mut steering = VipSteering::load(SteeringConfig::default()).map_err(|e| e.to_string())?;
                steering.set_vips([IpAddr::V4(VIP4), IpAddr::V6(VIP6)]).map_err(|e| e.to_string())?;
                let dev = XskDevice::open(&XskConfig::new("l0", 0)).map_err(|e| e.to_string())?;
                steering.set_socket(0, dev.fd()).map_err(|e| e.to_string())?;
                let ifindex = lb_io::xsk::ifindex("l0").ok_or("no l0")?;
                let link = steering.attach(ifindex, AttachMode::Native).map_err(|e| e.to_string())?;
                Ok((steering, dev, link))
            };
            let (steering, dev, link) = match setup() {
                Ok(parts) => parts,
                Err(e) => {
                    ready_tx.send(Err(e)).unwrap();
                    return None;
                }
            };
            ready_tx.send(Ok(())).unwrap();
            let (_updates, rx) = update_channel();
            let report = PollLoop::new(dev, Reflect, rx, stop, LoopConfig::default()).run().unwrap();
            drop(link);
            drop(steering);
            Some(report.stats)
        })
    };
    if let Err(e) = ready_rx.recv().unwrap() {
        stop.stop();
        lb_thread.join().unwrap();
        if e.contains("Operation not permitted") || e.contains("not supported") {
            println!("SKIPPED: the kernel refused XDP / AF_XDP: {e}");
            return;
        }
        panic!("load balancer setup failed: {e}");
    }

    // The client, in its namespace: UDP to both VIPs, each answered by the reflector.
    let client_name = client.name().to_string();
    let echoes = std::thread::spawn(move || {
        enter_netns(&client_name).unwrap();
        let mut got = Vec::new();
        for (local, vip) in [
            (SocketAddr::from((Ipv4Addr::new(10, 77, 0, 1), 0)), SocketAddr::from((VIP4, 7000))),
            (SocketAddr::from((Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1), 0)), SocketAddr::from((VIP6, 7000))),
        ] {
            let s = UdpSocket::bind(local).unwrap();
            s.connect(vip).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for i in 0..20u8 {
                s.send(&[i; 100]).unwrap();
                let mut buf = [0u8; 200];
                let n = s.recv(&mut buf).expect("echo through AF_XDP");
                got.push((vip, buf[..n].to_vec()));
            }
        }
        got
    })
    .join()
    .unwrap();
    assert_eq!(echoes.len(), 40);
    assert!(echoes.iter().all(|(_, b)| b.len() == 100));

    // Non-VIP traffic (the LB's own address, and ARP for it) still reaches the LB's kernel: a kernel
    // UDP socket there answers.
    let (bound_tx, bound_rx) = mpsc::channel();
    let lb_name = lb.name().to_string();
    let kernel_echo = std::thread::spawn(move || {
        enter_netns(&lb_name).unwrap();
        let s = UdpSocket::bind("10.77.0.2:7001").unwrap();
        bound_tx.send(()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf).expect("datagram to the LB's own address");
        s.send_to(&buf[..n], from).unwrap();
    });
    bound_rx.recv().unwrap();
    let client_name = client.name().to_string();
    std::thread::spawn(move || {
        enter_netns(&client_name).unwrap();
        let s = UdpSocket::bind("10.77.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"host traffic", "10.77.0.2:7001").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).expect("the LB's kernel answered");
        assert_eq!(&buf[..n], b"host traffic");
    })
    .join()
    .unwrap();
    kernel_echo.join().unwrap();

    stop.stop();
    let stats = lb_thread.join().unwrap().unwrap();
    assert_eq!(stats.tx, 40, "{stats:?}");
    assert_eq!(stats.rx, 40, "only VIP frames reach the socket: {stats:?}");
}
