//! The promise Maglev-style balancers make across nodes: load-balancer nodes behind one ECMP router,
//! given the same services, backends and hash seed, pick the same backend for every new flow without
//! talking to each other, whatever each node's history (the order its configuration arrived in, the
//! updates before it, its slot numbering, its connection table, its core). So a flow that the router
//! moves to another node keeps its backend. With another seed the nodes disagree (this test can fail).
//! When a backend leaves, a flow that moves to a node without its conntrack entry keeps its backend
//! unless its own table entry moved: for Maglev almost every flow of the backends that stayed.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use std::net::IpAddr;

use lb_core::config::{BackendConfig, Config, ForwardMode, Protocol, SchedulerKind, ServiceConfig};
use lb_core::{Verdict, Worker, WorkerConfig};
use worker_common::{Tcp, backend, node, run, secs, seen, service, tcp, udp, v4};

/// Three services: Maglev over TCP (DSR, v4), source hashing over UDP (DSR, v4), Maglev over TCP
/// with full NAT (v6), each with `n` backends.
fn config(n: u8) -> Config {
    let v4s = |port: u16| -> Vec<BackendConfig> { (1..=n).map(|i| backend(&format!("10.2.0.{i}"), port)).collect() };
    let v6s: Vec<BackendConfig> = (1..=n).map(|i| backend(&format!("fd00:2::{i}"), 8080)).collect();
    let mut sh = service("sh", "192.0.2.10", 53, Protocol::Udp, ForwardMode::Dsr, v4s(53));
    sh.scheduler = SchedulerKind::SourceHashing;
    Config {
        node: node(),
        services: vec![
            service("mh", "192.0.2.10", 80, Protocol::Tcp, ForwardMode::Dsr, v4s(80)),
            sh,
            service("mh6", "2001:db8::10", 443, Protocol::Tcp, ForwardMode::Nat, v6s),
        ],
    }
}

/// The first packet of `flow` (0..) to each service, as (service index, frame).
fn first_packets(flow: u32) -> [Vec<u8>; 3] {
    let client4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::from(0x6440_0000 + flow * 7919));
    let client6 = IpAddr::V6(std::net::Ipv6Addr::from(0x2001_0db8_000c_u128 << 80 | u128::from(flow * 7919 + 1)));
    let port = 1024 + (flow * 131 % 60000) as u16;
    [
        tcp(client4, port, v4("192.0.2.10"), 80, Tcp::Syn, b""),
        udp(client4, port, v4("192.0.2.10"), 53, b"q"),
        tcp(client6, port, "2001:db8::10".parse().unwrap(), 443, Tcp::Syn, b""),
    ]
}

/// The backend a forwarded frame goes to: its destination MAC for DSR, its destination for NAT.
fn backend_of(w: &mut Worker, frame: &[u8]) -> String {
    let (verdict, out) = run(w, frame, secs(10));
    assert_eq!(verdict, Verdict::Tx, "every first packet is forwarded");
    let s = seen(&out);
    if s.dst.is_ipv6() { s.dst.to_string() } else { format!("{:02x?}", s.dst_mac) }
}

/// For `flows` flows, the backend each node picks for each service, and how many differ.
fn disagreements(a: &mut Worker, b: &mut Worker, flows: u32) -> usize {
    (0..flows).flat_map(first_packets).filter(|frame| backend_of(a, frame) != backend_of(b, frame)).count()
}

/// Node B: a builder that saw other configurations first (more backends, another service, services and
/// backends in other orders), a smaller connection table already holding other flows, and core 1 of 2.
fn node_with_a_past(cfg: &Config) -> Worker {
    let mut builder = worker_common::table_builder();
    let mut earlier = config(6);
    earlier.services.reverse();
    earlier.services.push(service(
        "other",
        "192.0.2.99",
        8443,
        Protocol::Tcp,
        ForwardMode::Dsr,
        vec![backend("10.9.0.1", 8443)],
    ));
    let first = builder.build(&earlier).unwrap();
    let mut w = Worker::new(first, WorkerConfig { conntrack_capacity: 1024, core_index: 1, core_count: 2 });
    for flow in 5000..5200 {
        for frame in first_packets(flow) {
            run(&mut w, &frame, secs(1));
        }
    }
    let mut same = cfg.clone();
    same.services.reverse();
    for s in &mut same.services {
        s.backends.reverse();
    }
    w.swap_tables(builder.build(&same).unwrap());
    w
}

#[test]
fn nodes_with_different_histories_pick_the_same_backends() {
    let cfg = config(4);
    let mut a = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1 << 16));
    let mut b = node_with_a_past(&cfg);
    assert_eq!(disagreements(&mut a, &mut b, 400), 0);
}

#[test]
fn nodes_with_different_seeds_disagree() {
    let cfg = config(4);
    let mut other = cfg.clone();
    other.node.hash_seed ^= 1;
    let mut a = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1 << 16));
    let mut b = Worker::new(worker_common::table_builder().build(&other).unwrap(), WorkerConfig::single_core(1 << 16));
    // With 4 backends, a flow agrees by chance a quarter of the time.
    let differ = disagreements(&mut a, &mut b, 400);
    assert!(differ > 1200 / 2, "{differ} of 1200 first packets went elsewhere");
}

/// A backend leaves. Node A built its tables before and tracks the flows; node B (new, or after a
/// restart) only knows the new tables. Flows whose backend stayed reach the same backend on B, except
/// the few whose Maglev entry moved between kept backends; the leaving backend's flows go elsewhere.
#[test]
fn after_a_backend_leaves_a_flow_moving_node_keeps_its_backend() {
    let before = config(5);
    let mut after = before.clone();
    let mut sh_and_mh =
        |s: &mut ServiceConfig| s.backends.retain(|b| !matches!(b.addr.to_string().as_str(), "10.2.0.5" | "fd00:2::5"));
    after.services.iter_mut().for_each(&mut sh_and_mh);
    let mut a = Worker::new(worker_common::table_builder().build(&before).unwrap(), WorkerConfig::single_core(1 << 16));
    let mut b = Worker::new(worker_common::table_builder().build(&after).unwrap(), WorkerConfig::single_core(1 << 16));
    let gone = |backend: &str| backend.ends_with("05]") || backend == "fd00:2::5";
    let (mut kept, mut moved) = (0, 0);
    for frame in (0..2000).flat_map(first_packets) {
        let (on_a, on_b) = (backend_of(&mut a, &frame), backend_of(&mut b, &frame));
        if gone(&on_a) {
            assert!(!gone(&on_b), "B never picks the backend that left");
            continue;
        }
        kept += 1;
        moved += usize::from(on_a != on_b);
    }
    // Maglev moves well under 2 % of the table between kept backends (lb-hash's `maglev` module).
    assert!(kept > 4000 && moved * 50 < kept, "{moved} of {kept} flows of kept backends changed backend");
}
