//! Property tests of the worker: established flows keep their backend whatever backends are added or
//! re-weighted, conntrack never exceeds its capacity and its per-backend counts stay exact, and a bad
//! configuration is rejected whole while the old tables keep serving.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use lb_core::config::{Config, ForwardMode, Protocol, SchedulerKind};
use lb_core::conntrack::EntryKind;
use lb_core::service::TableBuilder;
use lb_core::{Verdict, Worker, WorkerConfig};
use proptest::prelude::*;
use worker_common::*;

const VIP: &str = "192.0.2.1";

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xc633_0000 + i))
}

fn backend_addr(i: u8) -> String {
    format!("10.1.0.{}", i + 1)
}

/// The service's backend a forwarded frame went to: DSR keeps the IP packet, the MAC says.
fn backend_of(out: &[u8]) -> u8 {
    out[5]
}

#[derive(Debug, Clone)]
enum Change {
    AddBackend,
    Weight { backend: usize, weight: u32 },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        Just(Change::AddBackend),
        (0usize..16, 0u32..10).prop_map(|(backend, weight)| Change::Weight { backend, weight })
    ]
}

fn scheduler() -> impl Strategy<Value = SchedulerKind> {
    proptest::sample::select(SchedulerKind::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn established_flows_keep_their_backend(
        kind in scheduler(),
        initial in 1u8..5,
        flows in 1u32..40,
        udp_flows in any::<bool>(),
        changes in proptest::collection::vec(change(), 1..12),
    ) {
        let proto = if udp_flows { Protocol::Udp } else { Protocol::Tcp };
        let mut s = service("web", VIP, 80, proto, ForwardMode::Dsr, (0..initial).map(|i| backend(&backend_addr(i), 80)).collect());
        s.scheduler = kind;
        let mut cfg = Config { node: node(), services: vec![s] };
        let mut b = TableBuilder::new();
        let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(4096));
        let send = |w: &mut Worker, i: u32, first: bool, t: u64| {
            let f = if udp_flows {
                udp(client(i), 1000, v4(VIP), 80, b"x")
            } else {
                tcp(client(i), 1000, v4(VIP), 80, if first { Tcp::Syn } else { Tcp::Ack }, b"")
            };
            run(w, &f, secs(t))
        };
        let mut chosen = HashMap::new();
        for i in 0..flows {
            let (v, out) = send(&mut w, i, true, 1);
            prop_assert_eq!(v, Verdict::Tx);
            chosen.insert(i, backend_of(&out));
            send(&mut w, i, false, 1); // establish
        }
        let mut next = initial;
        for (t, c) in changes.iter().enumerate() {
            match *c {
                Change::AddBackend => {
                    cfg.services[0].backends.push(backend(&backend_addr(next), 80));
                    next += 1;
                }
                Change::Weight { backend, weight } => {
                    let n = cfg.services[0].backends.len();
                    cfg.services[0].backends[backend % n].weight = weight;
                }
            }
            w.swap_tables(b.build(&cfg).unwrap());
            for i in 0..flows {
                let (v, out) = send(&mut w, i, false, 2 + t as u64);
                prop_assert_eq!(v, Verdict::Tx);
                prop_assert_eq!(backend_of(&out), chosen[&i], "flow {} moved after {:?}", i, c);
            }
        }
    }

    #[test]
    fn conntrack_stays_within_capacity_and_counts_stay_exact(
        capacity in 8usize..200,
        ops in proptest::collection::vec((0u32..300, 0u8..4, 0u64..3), 1..400),
    ) {
        let mut cfg = all_modes_config();
        cfg.node.timeouts.tcp_syn = dur(5);
        cfg.node.timeouts.udp = dur(20);
        let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(capacity));
        let cap = w.conntrack().capacity();
        prop_assert!(cap >= capacity);
        let mut now = 1;
        for (flow, what, step) in ops {
            now += step * 3;
            let port = 80 + (flow % 4) as u16;
            let f = match what {
                0 => tcp(client(flow), 1000, v4(VIP), port, Tcp::Syn, b""),
                1 => tcp(client(flow), 1000, v4(VIP), port, Tcp::Ack, b""),
                2 => tcp(client(flow), 1000, v4(VIP), port, Tcp::Fin, b""),
                _ => udp(client(flow), 1000, v4(VIP), port, b"u"),
            };
            run(&mut w, &f, secs(now));
            prop_assert!(w.conntrack().len() <= cap);
            prop_assert_eq!(w.conntrack().capacity(), cap, "the table never grows");
            prop_assert_eq!(w.conntrack().iter().count(), w.conntrack().len());
            // Every forward entry is counted once on its backend, and nothing else is.
            let forward = w.conntrack().iter().filter(|(_, e)| e.kind == EntryKind::Forward).count() as u64;
            let counted: u64 = w.tables().services().iter()
                .flat_map(|s| s.backends.iter())
                .map(|b| w.stats().backend(b.slot()).active_conns)
                .sum();
            prop_assert_eq!(counted, forward);
            // Every NAT forward entry has its reverse entry and the other way round.
            for (i, e) in w.conntrack().iter() {
                if e.kind == EntryKind::Reverse {
                    let f = w.conntrack().get(e.link);
                    prop_assert!(f.is_some_and(|f| f.link == i), "orphan reverse entry {:?}", e);
                }
            }
        }
    }

    #[test]
    fn bad_config_is_rejected_whole_and_old_tables_keep_serving(
        flows in 1u32..30,
        defect in 0usize..12,
        also_add in any::<bool>(),
    ) {
        let cfg = all_modes_config();
        let mut b = TableBuilder::new();
        let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        let mut before = vec![];
        for i in 0..flows {
            let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 81, Tcp::Syn, b""), secs(1));
            prop_assert_eq!(v, Verdict::Tx);
            before.push(backend_of(&out));
        }
        let mut bad = cfg.clone();
        if also_add {
            // A valid change in the same update must not be applied either.
            bad.services[4].backends.push(backend("10.1.0.9", 81));
        }
        match defect {
            0 => { let d = bad.services[4].backends[0].clone(); bad.services[4].backends.push(d); }
            1 => bad.services[4].backends.push(backend("fd00::9", 81)),
            2 => bad.services[0].backends[0].addr = v4("fd00::9"),
            3 => bad.node.snat_v4 = None,
            4 => bad.services[4].backends[0].port = 8081,
            // Whole seconds only: a shorter timeout would expire every entry at once.
            5 => bad.node.timeouts.tcp_established = std::time::Duration::from_millis(900),
            // Port 0: a NAT service (backends on 8080, so no port remap to report), a NAT backend.
            6 => bad.services[0].key.port = 0,
            7 => bad.services[0].backends[1].port = 0,
            // Addresses no packet can carry to one host: multicast backend, loopback VIP, and a
            // node source address that is unspecified.
            8 => bad.services[4].backends[0].addr = v4("224.0.0.9"),
            9 => bad.services[2].key.vip = v4("127.0.0.1"),
            10 => bad.node.snat_v4 = Some(Ipv4Addr::UNSPECIFIED),
            _ => { let d = bad.services[4].clone(); bad.services.push(d); }
        }
        let old_version = w.tables().version();
        let err = b.build(&bad);
        prop_assert!(err.is_err());
        prop_assert_eq!(w.tables().version(), old_version);
        for i in 0..flows {
            // Established and new flows are served by the old tables exactly as before.
            let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 81, Tcp::Ack, b""), secs(2));
            prop_assert_eq!(backend_of(&out), before[i as usize]);
        }
        let again = b.build(&cfg).unwrap();
        let slots = |t: &lb_core::service::Tables| t.services().iter().map(|s| (s.slot, s.backends.iter().map(|b| b.id).collect::<Vec<_>>())).collect::<Vec<_>>();
        prop_assert_eq!(slots(&again), slots(w.tables()));
    }
}
