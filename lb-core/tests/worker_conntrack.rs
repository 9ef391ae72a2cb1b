//! Conntrack as the worker uses it: flows keep their backends across table swaps, removed and draining
//! backends, affinity, SYN floods, expiry, TCP states, SNAT ports, ICMP errors, fragments.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use lb_core::config::{BackendState, Config, ForwardMode, Protocol, RemovedBackendPolicy, SchedulerKind};
use lb_core::conntrack::{ConnKey, ConnState};
use lb_core::service::TableBuilder;
use lb_core::stats::DropReason;
use lb_core::{Verdict, Worker, WorkerConfig};
use worker_common::*;

fn dsr_config(scheduler: SchedulerKind, backends: &[&str]) -> Config {
    let mut s = service("web", "192.0.2.1", 80, Protocol::Tcp, ForwardMode::Dsr, backends.iter().map(|b| backend(b, 80)).collect());
    s.scheduler = scheduler;
    let mut u = s.clone();
    u.name = "dns".into();
    u.key.proto = Protocol::Udp;
    Config { node: node(), services: vec![s, u] }
}

/// The backend a DSR frame was sent to, from its destination MAC.
fn dsr_backend(out: &[u8]) -> u8 {
    out[5]
}

fn client(i: u32) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400 + i))
}

const VIP: &str = "192.0.2.1";

#[test]
fn removed_backend_policy_reschedule_or_drop() {
    for policy in [RemovedBackendPolicy::Reschedule, RemovedBackendPolicy::Drop] {
        let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
        cfg.services[0].on_backend_removed = policy;
        let mut b = TableBuilder::new();
        let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        let mut on_first = vec![];
        for i in 0..10 {
            let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            if dsr_backend(&out) == 1 {
                on_first.push(i);
            }
        }
        assert_eq!(on_first.len(), 5, "rr alternates");
        cfg.services[0].backends.retain(|b| b.addr != v4("10.1.0.1"));
        w.swap_tables(b.build(&cfg).unwrap());
        for &i in &on_first {
            let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
            match policy {
                RemovedBackendPolicy::Reschedule => assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2)),
                RemovedBackendPolicy::Drop => assert_eq!(v, Verdict::Drop(DropReason::BackendRemoved)),
            }
        }
    }
}

#[test]
fn draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut cfg = dsr_config(SchedulerKind::Maglev, &["10.1.0.1", "10.1.0.2"]);
    let mut b = TableBuilder::new();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let mut first = vec![];
    for i in 0..40 {
        let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        first.push(dsr_backend(&out));
    }
    assert!(first.contains(&1) && first.contains(&2));
    cfg.services[0].backends[0].state = BackendState::Draining;
    w.swap_tables(b.build(&cfg).unwrap());
    for i in 0..40 {
        let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
        assert_eq!(dsr_backend(&out), first[i as usize], "flow {i} moved");
        let (_, out) = run(&mut w, &tcp(client(i), 2000, v4(VIP), 80, Tcp::Syn, b""), secs(2));
        assert_eq!(dsr_backend(&out), 2, "a new flow went to the draining backend");
    }
}

#[test]
fn client_ip_affinity_holds_until_its_timeout() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    cfg.services[0].affinity_timeout = Some(dur(100));
    let mut w = Worker::new(TableBuilder::new().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    let sticky = dsr_backend(&out);
    for port in 1001..1010 {
        let (_, out) = run(&mut w, &tcp(client(1), port, v4(VIP), 80, Tcp::Syn, b""), secs(50));
        assert_eq!(dsr_backend(&out), sticky, "round robin would have moved this flow");
    }
    // Past the timeout (refreshed at 50 s by the last new flow), round robin decides again.
    let mut seen = std::collections::BTreeSet::new();
    for (k, port) in (2000..2006).enumerate() {
        let (_, out) = run(&mut w, &tcp(client(1), port, v4(VIP), 80, Tcp::Syn, b""), secs(200 + 200 * k as u64));
        seen.insert(dsr_backend(&out));
    }
    assert!(seen.len() > 1, "affinity outlived its timeout: {seen:?}");
}

#[test]
fn syn_flood_does_not_push_out_established_flows() {
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    let mut w = Worker::new(TableBuilder::new().build(&cfg).unwrap(), WorkerConfig::single_core(256));
    let mut backends = vec![];
    for i in 0..64 {
        let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
        backends.push(dsr_backend(&out));
    }
    // 20 000 spoofed SYNs into a 256-entry table.
    for i in 0..20_000u32 {
        run(&mut w, &tcp(client(100_000 + i), (i % 60_000) as u16 + 1, v4(VIP), 80, Tcp::Syn, b""), secs(2));
    }
    assert!(w.conntrack().len() <= w.conntrack().capacity());
    assert!(w.stats().conntrack_evictions > 0);
    for i in 0..64u32 {
        let key = ConnKey::flow(client(i), v4(VIP), 1000, 80, 6);
        let e = w.conntrack().iter().find(|(_, e)| e.key == key).map(|(_, e)| *e);
        assert_eq!(e.map(|e| e.state), Some(ConnState::Established), "flow {i} was pushed out");
        let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(3));
        assert_eq!(dsr_backend(&out), backends[i as usize]);
    }
}

#[test]
fn tcp_states_and_timeouts() {
    let mut cfg = all_modes_config();
    cfg.node.timeouts.tcp_syn = dur(10);
    cfg.node.timeouts.tcp_established = dur(900);
    cfg.node.timeouts.tcp_fin = dur(120);
    let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1024));
    let c = client(1);
    let state = |w: &Worker| {
        let key = ConnKey::flow(c, v4(VIP), 1000, 80, 6);
        w.conntrack().iter().find(|(_, e)| e.key == key).map(|(_, e)| (e.state, e.expires))
    };
    let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(100));
    assert_eq!(state(&w), Some((ConnState::SynSeen, 110)));
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(101));
    assert_eq!(state(&w), Some((ConnState::Established, 1001)));
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Fin, b""), secs(102));
    assert_eq!(state(&w), Some((ConnState::Closing, 222)));
    // The backend's FIN (a NAT reply) completes the close.
    let s = seen(&out);
    let (v, _) = run(&mut w, &tcp(s.dst, 8080, s.src, s.sport, Tcp::Fin, b""), secs(103));
    assert_eq!(v, Verdict::Tx);
    assert_eq!(state(&w).map(|s| s.0), Some(ConnState::TimeWait));
    // A new SYN on the time-wait tuple starts a new flow.
    let before = w.stats().service(w.tables().services()[0].slot).new_flows;
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(104));
    assert_eq!(w.stats().service(w.tables().services()[0].slot).new_flows, before + 1);
    assert_eq!(state(&w).map(|s| s.0), Some(ConnState::SynSeen));
}

#[test]
fn expired_flows_are_reclaimed_and_counts_fall() {
    let cfg = dsr_config(SchedulerKind::LeastConnections, &["10.1.0.1", "10.1.0.2"]);
    let mut w = Worker::new(TableBuilder::new().build(&cfg).unwrap(), WorkerConfig::single_core(64));
    for i in 0..20 {
        run(&mut w, &udp(client(i), 53, v4(VIP), 80, b"q"), secs(1));
    }
    let slots: Vec<_> = w.tables().services()[1].backends.iter().map(|b| b.slot()).collect();
    let active: u64 = slots.iter().map(|&s| w.stats().backend(s).active_conns).sum();
    assert_eq!(active, 20);
    // lc balances this core's connections.
    assert_eq!(w.stats().backend(slots[0]).active_conns, 10);
    // After the UDP timeout, bursts sweep the table (4 buckets each, 8 buckets here).
    for _ in 0..2 {
        run(&mut w, &udp(client(999), 53, v4("192.0.2.99"), 80, b"pass"), secs(1000));
    }
    let active: u64 = slots.iter().map(|&s| w.stats().backend(s).active_conns).sum();
    assert_eq!((active, w.conntrack().len()), (0, 0));
}

#[test]
fn snat_ports_are_unique_per_backend_and_run_out_counted() {
    let mut cfg = all_modes_config();
    cfg.services[0].backends.truncate(1);
    cfg.node.snat_ports = (40000, 40003);
    let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1024));
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..4 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx);
        ports.insert(seen(&out).sport);
    }
    assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![40000, 40001, 40002, 40003]);
    let (v, _) = run(&mut w, &tcp(client(9), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Drop(DropReason::NoSnatPort));
}

#[test]
fn snat_port_shares_are_disjoint_and_cover_the_range() {
    use lb_core::worker::{snat_port_owner, snat_port_share};
    let range = (32768, 60999);
    let mut covered = 0u32;
    let mut prev_hi = range.0 - 1;
    for c in 0..6 {
        let (lo, hi) = snat_port_share(range, c, 6).unwrap();
        assert_eq!(lo, prev_hi + 1);
        prev_hi = hi;
        covered += u32::from(hi - lo) + 1;
        assert_eq!(snat_port_owner(range, 6, lo), Some(c));
        assert_eq!(snat_port_owner(range, 6, hi), Some(c));
    }
    assert_eq!((prev_hi, covered), (range.1, 28232));
    assert_eq!(snat_port_share((1, 2), 0, 3), None);
}

#[test]
fn reply_without_flow_and_fragments_are_counted() {
    let mut w = worker(&all_modes_config());
    let (v, _) = run(&mut w, &tcp(v4("10.1.0.1"), 8080, v4("10.0.0.100"), 40000, Tcp::Ack, b""), secs(1));
    assert_eq!(v, Verdict::Drop(DropReason::NoReverseFlow));
    // An IPv4 fragment (MF set) to the VIP.
    let mut f = udp(client(1), 53, v4(VIP), 81, b"frag");
    f[20] |= 0x20;
    // Recompute the IPv4 header checksum so only the fragment bit is odd about the frame.
    f[24] = 0;
    f[25] = 0;
    let sum: u32 = f[14..34].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !((folded & 0xffff) + (folded >> 16)) as u16;
    f[24..26].copy_from_slice(&csum.to_be_bytes());
    let (v, _) = run(&mut w, &f, secs(1));
    assert_eq!(v, Verdict::Drop(DropReason::Fragment));
}

#[test]
fn icmp_error_follows_its_flow_to_the_backend() {
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    let mut w = Worker::new(TableBuilder::new().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let mut sent_to = vec![];
    for i in 0..2 {
        let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        sent_to.push(dsr_backend(&out));
    }
    // A router on the way back to client 1 reports "fragmentation needed" about VIP:80 -> client:1000.
    let quoted = &tcp(v4(VIP), 80, client(1), 1000, Tcp::Ack, b"")[14..];
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
        .ipv4([203, 0, 113, 1], [192, 0, 2, 1], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }))
        .write(&mut icmp, &quoted[..28])
        .unwrap();
    let (v, out) = run(&mut w, &icmp, secs(2));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, sent_to[1]));
    // About a flow nobody tracks: counted.
    let quoted = &tcp(v4(VIP), 80, client(77), 1000, Tcp::Ack, b"")[14..];
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
        .ipv4([203, 0, 113, 1], [192, 0, 2, 1], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Host))
        .write(&mut icmp, &quoted[..28])
        .unwrap();
    assert_eq!(run(&mut w, &icmp, secs(2)).0, Verdict::Drop(DropReason::IcmpNoFlow));
}
