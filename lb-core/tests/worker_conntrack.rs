//! Conntrack as the worker uses it: flows keep their backends across table swaps, removed and draining
//! backends, affinity, SYN floods, expiry, TCP states, SNAT ports, ICMP errors, fragments.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use lb_core::config::{BackendState, Config, ForwardMode, Protocol, RemovedBackendPolicy, SchedulerKind, ServiceKey};
use lb_core::conntrack::{ConnKey, ConnState};
use lb_core::service::TableBuilder;
use lb_core::stats::DropReason;
use lb_core::{Verdict, Worker, WorkerConfig, WorkerConfigError};
use worker_common::*;

fn dsr_config(scheduler: SchedulerKind, backends: &[&str]) -> Config {
    let mut s = service(
        "web",
        "192.0.2.1",
        80,
        Protocol::Tcp,
        ForwardMode::Dsr,
        backends.iter().map(|b| backend(b, 80)).collect(),
    );
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

/// [`all_modes_config`] with its full-NAT service on one backend and SNAT ports 40000 to `last`: a
/// share small enough for a test to use up.
fn one_backend_nat(last: u16) -> Config {
    let mut cfg = all_modes_config();
    cfg.services[0].backends.truncate(1);
    cfg.node.snat_ports = (40000, last);
    cfg
}

const VIP: &str = "192.0.2.1";

/// A worker numbered outside its node (no workers, or an index not below the count) is refused with
/// the reason: such a worker owned no share of the SNAT ports, so it dropped every new full-NAT flow
/// as `no_snat_port`, as if the range were exhausted. Numbered within, each takes its share.
#[test]
fn a_worker_numbered_outside_its_node_is_refused() {
    let tables = worker_common::table_builder().build(&one_backend_nat(40099)).unwrap();
    let at = |core_index, core_count| WorkerConfig { conntrack_capacity: 1024, core_index, core_count };
    let refused = |c| Worker::try_new(tables.clone(), c).err();
    assert_eq!(refused(at(0, 0)), Some(WorkerConfigError::NoCores));
    assert_eq!(refused(at(2, 2)), Some(WorkerConfigError::IndexOutOfRange { index: 2, count: 2 }));
    assert_eq!(refused(at(u16::MAX, 3)), Some(WorkerConfigError::IndexOutOfRange { index: u16::MAX, count: 3 }));
    let msg = WorkerConfigError::IndexOutOfRange { index: 2, count: 2 }.to_string();
    assert!(msg.contains("core_index 2") && msg.contains("core_count 2"), "{msg}");
    for i in 0..2 {
        let mut w = Worker::try_new(tables.clone(), at(i, 2)).unwrap();
        let (v, _) = run(&mut w, &tcp(client(u32::from(i)), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx, "core {i} of 2");
    }
    let panicked = std::panic::catch_unwind(|| Worker::new(tables.clone(), at(2, 2))).err().unwrap();
    let text = panicked.downcast_ref::<String>().unwrap();
    assert!(text.contains("core_index 2 is not below core_count 2"), "{text}");
}

#[test]
fn removed_backend_policy_reschedule_or_drop() {
    for policy in [RemovedBackendPolicy::Reschedule, RemovedBackendPolicy::Drop] {
        let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
        cfg.services[0].on_backend_removed = policy;
        let mut b = worker_common::table_builder();
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
fn tables_of_another_builder_never_send_a_flow_to_another_service() {
    // Builder one: backend 10.1.0.1 of "web" takes the first backend slot.
    let web = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1"]);
    let mut w = Worker::new(worker_common::table_builder().build(&web).unwrap(), WorkerConfig::single_core(1024));
    let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(dsr_backend(&out), 1);
    let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
    assert_eq!(dsr_backend(&out), 1);
    // A second builder numbers slots afresh: the same slot now holds a backend of another service
    // (with another generation). The flow's backend left "web": it is rescheduled there, never sent
    // to "other".
    let mut cfg = web.clone();
    cfg.services[0].backends = vec![backend("10.1.0.2", 80)];
    cfg.services
        .insert(0, service("other", "192.0.2.9", 80, Protocol::Tcp, ForwardMode::Dsr, vec![backend("10.1.0.9", 80)]));
    w.swap_tables(worker_common::table_builder().build(&cfg).unwrap());
    for _ in 0..2 {
        let (v, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
        assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2));
    }
}

/// `lb run` starts its workers on empty tables of a builder of its own, then gets the control
/// plane's: flows made under those keep their backends across the control plane's later builds.
#[test]
fn a_worker_started_on_tables_of_its_own_builder_serves_the_control_planes() {
    let empty = Config { node: dsr_config(SchedulerKind::Maglev, &[]).node, services: vec![] };
    let mut w = Worker::new(worker_common::table_builder().build(&empty).unwrap(), WorkerConfig::single_core(1024));
    let web = dsr_config(SchedulerKind::Maglev, &["10.1.0.1", "10.1.0.2"]);
    let mut control = worker_common::table_builder();
    w.swap_tables(control.build(&web).unwrap());
    let (_, first) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    let (v, again) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
    assert_eq!((v, dsr_backend(&again)), (Verdict::Tx, dsr_backend(&first)));
    w.swap_tables(control.build(&web).unwrap());
    let (v, again) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
    assert_eq!((v, dsr_backend(&again)), (Verdict::Tx, dsr_backend(&first)));
}

/// Tables of another builder (here the same backends listed in the other order, so each gets the
/// other's slot number): a flow's backend is not recognisable there, so the flow follows the
/// service's `RemovedBackendPolicy` and is never silently sent to the other backend; and no backend's
/// counters take over another's connections.
#[test]
fn tables_of_another_builder_never_move_a_flow_to_another_backend_of_its_service() {
    for policy in [RemovedBackendPolicy::Drop, RemovedBackendPolicy::Reschedule] {
        let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
        cfg.services[0].on_backend_removed = policy;
        let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(dsr_backend(&out), 1, "rr's first pick");
        let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
        assert_eq!(dsr_backend(&out), 1);
        assert_eq!(w.stats().service(w.tables().services()[0].slot).packets, 2);

        let mut other = cfg.clone();
        other.services.iter_mut().for_each(|s| s.backends.reverse());
        w.swap_tables(worker_common::table_builder().build(&other).unwrap());
        let web = w.tables().services()[0].clone();
        let counts = |w: &Worker| -> Vec<(u64, u64)> {
            web.backends
                .iter()
                .map(|b| w.stats().backend(b.slot()))
                .map(|c| (c.active_conns, c.established_conns))
                .collect()
        };
        assert_eq!(counts(&w), [(0, 0), (0, 0)], "{policy:?}: a backend counts a connection it does not have");
        // Another builder's service slot is a new slot to the worker (its counters start at zero, as
        // a newly configured service's would), whichever number it has.
        assert_eq!(w.stats().service(web.slot).packets, 0, "{policy:?}");

        let (v, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
        match policy {
            RemovedBackendPolicy::Drop => {
                assert_eq!(v, Verdict::Drop(DropReason::BackendRemoved));
                assert_eq!(counts(&w), [(0, 0), (0, 0)]);
            }
            RemovedBackendPolicy::Reschedule => {
                // Scheduled afresh, as a new flow (half-open until its next segment), and counted
                // once, at the backend it was sent to.
                assert_eq!(v, Verdict::Tx);
                let to = web.backends.iter().position(|b| b.mac[5] == dsr_backend(&out)).unwrap();
                let mut want = [(0, 0), (0, 0)];
                want[to] = (1, 0);
                assert_eq!(counts(&w), want);
            }
        }
    }
}

/// A worker sizes its per-slot arrays from its first tables' slot `Limits`: it refuses tables with larger
/// ones (their slots could lie past those arrays, uncounted and without rr cursors), keeps serving
/// its own, counts the refusal, and hands the refused tables back.
#[test]
fn a_worker_refuses_tables_with_larger_limits_and_keeps_serving_its_own() {
    use lb_core::service::Limits;
    use std::sync::Arc;
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    let mut small = TableBuilder::with_limits(Limits { max_services: 2, max_backends: 4, ..Limits::default() })
        .with_conntrack_seed(worker_common::SEED);
    let first = small.build(&cfg).unwrap();
    let mut w = Worker::new(first.clone(), WorkerConfig::single_core(1024));
    let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(dsr_backend(&out), 1);

    let mut other = cfg.clone();
    other.services[0].backends = vec![backend("10.1.0.3", 80)];
    let larger = worker_common::table_builder().build(&other).unwrap();
    let back = w.swap_tables(larger.clone());
    assert!(Arc::ptr_eq(&back, &larger), "the refused tables come back");
    assert!(Arc::ptr_eq(w.tables(), &first), "the worker keeps its tables");
    assert_eq!(w.stats().tables_refused, 1);
    // Still served from the first tables: the flow keeps its backend, new flows take turns on 1
    // and 2 (never 3, which only the refused tables have), each counted.
    let (v, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 1));
    let picks: Vec<u8> = (2..6)
        .map(|i| dsr_backend(&run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(2)).1))
        .collect();
    assert_eq!(picks, [2, 1, 2, 1]);
    let new_flows: Vec<u64> =
        first.services()[0].backends.iter().map(|b| w.stats().backend(b.slot()).new_flows).collect();
    assert_eq!(new_flows, [3, 2]);

    // Tables within the worker's limits are installed.
    let next = small.build(&other).unwrap();
    drop(w.swap_tables(next.clone()));
    assert!(Arc::ptr_eq(w.tables(), &next));
    assert_eq!(w.stats().tables_refused, 1);
    // The Maglev budget sizes nothing in a worker: a larger one is no reason to refuse tables.
    let budget = Limits { max_maglev_entries: usize::MAX, ..small.limits() };
    let roomier = TableBuilder::with_limits(budget).with_conntrack_seed(worker_common::SEED).build(&cfg).unwrap();
    drop(w.swap_tables(roomier.clone()));
    assert!(Arc::ptr_eq(w.tables(), &roomier));
    assert_eq!(w.stats().tables_refused, 1);
}

/// A worker's connection table hashes under its first tables' conntrack seed for its life: under
/// one it serves full-NAT flows and their replies (whose reply keys the tables hashed ahead, under
/// the same seed) with every entry where the table's hash finds it; it refuses tables of another
/// seed (counted, its own kept, the refused handed back), since its entries would be lost to them,
/// and goes on serving its flows both ways; tables of its seed go in.
#[test]
fn a_worker_refuses_tables_of_another_conntrack_seed() {
    use lb_core::conntrack::ConntrackSeed;
    use std::sync::Arc;
    let cfg = one_backend_nat(40099);
    let mut b = worker_common::table_builder();
    let first = b.build(&cfg).unwrap();
    assert_eq!(first.conntrack_seed(), worker_common::SEED);
    let mut w = Worker::new(first.clone(), WorkerConfig::single_core(1024));
    assert_eq!(w.conntrack().seed(), worker_common::SEED);
    let both_ways = |w: &mut Worker, i: u32, port: u16, at: u64| {
        let (v, out) = run(w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b"q"), secs(at));
        assert_eq!((v, seen(&out).sport), (Verdict::Tx, port), "client {i}");
        let (v, out) = run(w, &tcp(v4("10.1.0.1"), 8080, v4("10.0.0.100"), port, Tcp::Ack, b"r"), secs(at));
        assert_eq!((v, seen(&out).dst, seen(&out).dport), (Verdict::Tx, client(i), 1000), "reply to client {i}");
    };
    let mut ports = vec![];
    for i in 0..8 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx);
        ports.push(seen(&out).sport);
        both_ways(&mut w, i, ports[i as usize], 1);
    }
    assert_eq!(w.conntrack().len(), 16, "eight flows, each with its reverse entry");
    let ct = w.conntrack();
    assert!(ct.iter().all(|(i, e)| ct.find(&e.key, ct.hash(&e.key)) == Some(i)), "each entry where its hash is");

    for other in [ConntrackSeed::UNSEEDED, ConntrackSeed::new(0x00ff_5eed)] {
        let refused = lb_core::service::TableBuilder::new().with_conntrack_seed(other).build(&cfg).unwrap();
        let back = w.swap_tables(refused.clone());
        assert!(Arc::ptr_eq(&back, &refused), "the refused tables come back");
        assert!(Arc::ptr_eq(w.tables(), &first), "the worker keeps its tables");
    }
    assert_eq!(w.stats().tables_refused, 2);
    for i in 0..8 {
        both_ways(&mut w, i, ports[i as usize], 2);
    }
    let next = b.build(&cfg).unwrap();
    drop(w.swap_tables(next.clone()));
    assert!(Arc::ptr_eq(w.tables(), &next));
    assert_eq!(w.stats().tables_refused, 2);
    for i in 0..8 {
        both_ways(&mut w, i, ports[i as usize], 3);
    }
    let (v, _) = run(&mut w, &tcp(client(8), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(3));
    assert_eq!(v, Verdict::Tx);
    both_ways(&mut w, 8, 40008, 3);
}

#[test]
fn draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut cfg = dsr_config(SchedulerKind::Maglev, &["10.1.0.1", "10.1.0.2"]);
    let mut b = worker_common::table_builder();
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
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
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

/// ClientIP affinity holds for the whole timeout after a client's last new flow, whatever the
/// fraction of a second that flow started at (conntrack counts whole seconds): with a 1-s timeout
/// a flow 0.2 s after the first one, or exactly 1 s after it, goes to the same backend; one more
/// than a second after is picked afresh. The record expired at the next whole second, so a flow
/// started at 1.9 s kept its affinity for 0.1 s, and round robin sent the client's next flow elsewhere.
#[test]
fn client_ip_affinity_lasts_its_whole_timeout_from_any_fraction_of_a_second() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    cfg.services[0].affinity_timeout = Some(dur(1));
    let ms = lb_core::Instant::from_millis;
    for (first, later) in [(1900, 2100), (1900, 2900), (1000, 2000), (1999, 2999)] {
        let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), ms(first));
        let sticky = dsr_backend(&out);
        let (_, out) = run(&mut w, &tcp(client(1), 1001, v4(VIP), 80, Tcp::Syn, b""), ms(later));
        assert_eq!(dsr_backend(&out), sticky, "a flow {} ms after the first, at {later} ms", later - first);
        // Renewed at `later`: past a second after it (and the rounding), round robin decides again.
        let (_, out) = run(&mut w, &tcp(client(1), 1002, v4(VIP), 80, Tcp::Syn, b""), ms(later + 2000));
        assert_ne!(dsr_backend(&out), sticky, "affinity outlived its timeout (from {later} ms)");
    }
}

/// ClientIP affinity under a scheduler that picks from the flow alone holds across cores: RSS spreads
/// a client's flows (other source ports) over the queues, and each core keeps its own records, so a
/// core without the client's record must pick the backend the client's first flow went to on another.
#[test]
fn client_ip_affinity_agrees_between_cores_under_hashing_schedulers() {
    let backends: Vec<String> = (1..=8).map(|i| format!("10.1.0.{i}")).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    for scheduler in [SchedulerKind::Maglev, SchedulerKind::Rendezvous] {
        let mut cfg = dsr_config(scheduler, &backends);
        cfg.services[0].affinity_timeout = Some(dur(600));
        let tables = worker_common::table_builder().build(&cfg).unwrap();
        let mut cores: Vec<Worker> = (0..2)
            .map(|i| {
                Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1024, core_index: i, core_count: 2 })
            })
            .collect();
        for c in 0..16 {
            let (_, out) = run(&mut cores[0], &tcp(client(c), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            let sticky = dsr_backend(&out);
            for port in 2000..2004 {
                let (_, out) = run(&mut cores[1], &tcp(client(c), port, v4(VIP), 80, Tcp::Syn, b""), secs(2));
                assert_eq!(dsr_backend(&out), sticky, "{scheduler:?}: client {c}'s flow from port {port} on core 1");
            }
        }
    }
}

/// What the per-core records mean once the backends change: a core that holds a client's record
/// keeps the client's new flows on its backend, while a core without one picks by the client's
/// address from the new set, so until the record idles out (each new flow on its core renews it) the
/// client's flows may reach two backends. The README and `ServiceConfig::affinity_timeout` say so.
#[test]
fn client_ip_affinity_records_are_per_core_so_a_backend_change_can_split_a_client() {
    let backends: Vec<String> = (1..=4).map(|i| format!("10.1.0.{i}")).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let mut cfg = dsr_config(SchedulerKind::Maglev, &backends);
    cfg.services[0].affinity_timeout = Some(dur(600));
    let mut b = worker_common::table_builder();
    let tables = b.build(&cfg).unwrap();
    let mut cores: Vec<Worker> = (0..2)
        .map(|i| Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 4096, core_index: i, core_count: 2 }))
        .collect();
    let mut first = vec![];
    for c in 0..64 {
        first.push(dsr_backend(&run(&mut cores[0], &tcp(client(c), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1)).1));
    }
    cfg.services[0].backends.extend(["10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.8"].map(|a| backend(a, 80)));
    let tables = b.build(&cfg).unwrap();
    cores.iter_mut().for_each(|w| drop(w.swap_tables(tables.clone())));
    let mut split = 0;
    for c in 0..64u32 {
        let on =
            |w: &mut Worker, port| dsr_backend(&run(w, &tcp(client(c), port, v4(VIP), 80, Tcp::Syn, b""), secs(2)).1);
        let (kept, picked) = (on(&mut cores[0], 2000), on(&mut cores[1], 2000));
        assert_eq!(kept, first[c as usize], "client {c}: core 0 holds its record");
        split += usize::from(picked != kept);
    }
    assert!(split > 0, "no client's hash moved to a new backend: the test shows nothing");
}

/// Source ranges apply to every packet, not only to new flows: a list narrowed by an update cuts the
/// established flows of the clients it leaves out at their next packet (kube-proxy checks new
/// connections only, so its established ones go on), while the other clients' flows go on; widened
/// again, a cut flow's entry is still there and it resumes on its backend. The README and
/// `ServiceConfig::source_ranges` say so.
#[test]
fn narrowed_source_ranges_cut_established_flows_of_the_clients_left_out() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    let outside = v4("203.0.113.9");
    cfg.services[0].source_ranges = vec!["198.51.100.0/24".parse().unwrap(), "203.0.113.0/24".parse().unwrap()];
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let mut on = vec![];
    for c in [client(1), outside] {
        let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx, "{c}");
        assert_eq!(run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1)).0, Verdict::Tx, "{c}");
        on.push(dsr_backend(&out));
    }
    cfg.services[0].source_ranges.truncate(1);
    w.swap_tables(b.build(&cfg).unwrap());
    let (v, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b"x"), secs(2));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, on[0]), "a client still inside the ranges");
    let (v, _) = run(&mut w, &tcp(outside, 1000, v4(VIP), 80, Tcp::Ack, b"x"), secs(2));
    assert_eq!(v, Verdict::Drop(DropReason::SourceNotAllowed), "the established flow of a client left out");
    cfg.services[0].source_ranges.clear();
    w.swap_tables(b.build(&cfg).unwrap());
    let (v, out) = run(&mut w, &tcp(outside, 1000, v4(VIP), 80, Tcp::Ack, b"y"), secs(3));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, on[1]), "every client allowed again");
    assert_eq!(state_of(&w, outside, 1000).map(|s| s.0), Some(ConnState::Established));
}

/// A client's affinity follows its backend out: once the backend is removed, drained (a health
/// check's drain) or at weight 0, the client's next new flow is picked afresh, and that pick is its
/// new affinity, kept when the old backend comes back; the client's established flow stays on the
/// drained or weight-0 backend meanwhile.
#[test]
fn client_ip_affinity_moves_once_its_backend_takes_no_new_flows_and_stays_moved() {
    for scheduler in [SchedulerKind::RoundRobin, SchedulerKind::Maglev] {
        for change in ["removed", "drained", "weight 0"] {
            let case = format!("{scheduler:?}, {change}");
            let mut cfg = dsr_config(scheduler, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
            cfg.services[0].affinity_timeout = Some(dur(600));
            let mut b = worker_common::table_builder();
            let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
            let c = client(7);
            let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
            let first = dsr_backend(&out);
            let before = cfg.clone();
            let at = cfg.services[0].backends.iter().position(|be| be.addr == v4(&format!("10.1.0.{first}"))).unwrap();
            match change {
                "removed" => drop(cfg.services[0].backends.remove(at)),
                "drained" => cfg.services[0].backends[at].state = BackendState::Draining,
                _ => cfg.services[0].backends[at].weight = 0,
            }
            w.swap_tables(b.build(&cfg).unwrap());
            if change != "removed" {
                let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"x"), secs(2));
                assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, first), "{case}: the established flow");
            }
            let (v, out) = run(&mut w, &tcp(c, 1001, v4(VIP), 80, Tcp::Syn, b""), secs(3));
            let moved = dsr_backend(&out);
            assert_eq!(v, Verdict::Tx, "{case}");
            assert_ne!(moved, first, "{case}: a new flow went to a backend that takes none");
            w.swap_tables(b.build(&before).unwrap());
            for port in 1002..1006 {
                let (_, out) = run(&mut w, &tcp(c, port, v4(VIP), 80, Tcp::Syn, b""), secs(4));
                assert_eq!(dsr_backend(&out), moved, "{case}: the new affinity, with the old backend back");
            }
        }
    }
}

/// Each core's round-robin cursor starts at its own index: at a low rate of new flows the cores do
/// not all send their first flows to the first backend (they did: each core's first pick was it).
#[test]
fn each_cores_round_robin_starts_at_its_own_backend() {
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    let tables = worker_common::table_builder().build(&cfg).unwrap();
    let mut cores: Vec<Worker> = (0..3)
        .map(|i| Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1024, core_index: i, core_count: 3 }))
        .collect();
    let first = |cores: &mut Vec<Worker>, c: u32, at: u64| -> Vec<u8> {
        cores
            .iter_mut()
            .map(|w| dsr_backend(&run(w, &tcp(client(c), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(at)).1))
            .collect()
    };
    assert_eq!(first(&mut cores, 1, 1), [1, 2, 3]);
    assert_eq!(first(&mut cores, 2, 1), [2, 3, 1]);
}

#[test]
fn syn_flood_does_not_push_out_established_flows() {
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(256));
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

/// An RST ends a flow for good: a FIN that crossed it (the client's, sent before the backend's RST
/// reached it; or the backend's, after the client's RST) leaves the flow in time-wait, as IPVS
/// keeps it, and the client's SYN on the 5-tuple then starts a new flow, with a new SNAT port. (The
/// FIN took it back to closing, with the FIN timeout, where the client's SYN restarted it on the
/// same backend and SNAT port.)
#[test]
fn a_fin_after_an_rst_leaves_the_flow_in_time_wait() {
    let mut cfg = all_modes_config();
    cfg.node.timeouts.tcp_fin = dur(120);
    cfg.node.timeouts.tcp_time_wait = dur(30);
    for client_rst in [false, true] {
        let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1024));
        let c = client(1);
        let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(100));
        run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(100));
        let s = seen(&out);
        let from_backend = |flags| tcp(s.dst, 8080, s.src, s.sport, flags, b"");
        let from_client = |flags| tcp(c, 1000, v4(VIP), 80, flags, b"");
        let (rst, fin) = if client_rst {
            (from_client(Tcp::Rst), from_backend(Tcp::Fin))
        } else {
            (from_backend(Tcp::Rst), from_client(Tcp::Fin))
        };
        assert_eq!(run(&mut w, &rst, secs(101)).0, Verdict::Tx);
        assert_eq!(state_of(&w, c, 1000), Some((ConnState::TimeWait, 131)), "client RST {client_rst}");
        assert_eq!(run(&mut w, &fin, secs(102)).0, Verdict::Tx);
        assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::TimeWait), "client RST {client_rst}");
        // The client's SYN on the tuple: a new flow, from another SNAT port.
        let (v, again) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(103));
        assert_eq!(v, Verdict::Tx);
        assert_ne!(seen(&again).sport, s.sport, "client RST {client_rst}");
        assert_eq!(w.stats().service(w.tables().services()[0].slot).new_flows, 2, "client RST {client_rst}");
    }
}

#[test]
fn expired_flows_are_reclaimed_and_counts_fall() {
    let cfg = dsr_config(SchedulerKind::LeastConnections, &["10.1.0.1", "10.1.0.2"]);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(64));
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

/// With no traffic at all, `Worker::sweep` (which lb-io's poll loop calls before it waits) reclaims
/// expired flows, a given number of buckets at a time, and their counts fall.
#[test]
fn an_idle_worker_reclaims_expired_flows_by_sweep() {
    let cfg = dsr_config(SchedulerKind::LeastConnections, &["10.1.0.1", "10.1.0.2"]);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    for i in 0..40 {
        run(&mut w, &udp(client(i), 53, v4(VIP), 80, b"q"), secs(10));
    }
    let slots: Vec<_> = w.tables().services()[1].backends.iter().map(|b| b.slot()).collect();
    let active = |w: &Worker| -> u64 { slots.iter().map(|&s| w.stats().backend(s).active_conns).sum() };
    assert_eq!((active(&w), w.conntrack().len()), (40, 40));
    // Not yet expired: nothing goes, however much is swept.
    w.sweep(secs(20), 1024);
    assert_eq!(w.conntrack().len(), 40);
    // Expired (UDP: 300 s): one bucket at a time, the table empties within one round of it.
    let buckets = w.conntrack().capacity() / lb_core::conntrack::WAYS;
    let mut swept = 0;
    while !w.conntrack().is_empty() && swept <= buckets {
        w.sweep(secs(1000), 1);
        swept += 1;
    }
    assert_eq!((active(&w), w.conntrack().len()), (0, 0), "after {swept} of {buckets} buckets");
    assert!(swept > 1, "one bucket at a time");
}

/// A sweep of more buckets than the table has goes round it once: `sweep(now, usize::MAX)`, "sweep
/// everything", returns with every expired flow reclaimed (it went round 2^64 buckets, for ever).
#[test]
fn a_sweep_of_more_buckets_than_the_table_has_goes_round_it_once() {
    let cfg = dsr_config(SchedulerKind::LeastConnections, &["10.1.0.1", "10.1.0.2"]);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1 << 16));
    for i in 0..40 {
        run(&mut w, &udp(client(i), 53, v4(VIP), 80, b"q"), secs(10));
    }
    assert_eq!(w.conntrack().len(), 40);
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        w.sweep(secs(1000), usize::MAX);
        let _ = done_tx.send(w);
    });
    let w = done.recv_timeout(std::time::Duration::from_secs(60)).expect("sweep(now, usize::MAX) returns");
    let slots: Vec<_> = w.tables().services()[1].backends.iter().map(|b| b.slot()).collect();
    let active: u64 = slots.iter().map(|&s| w.stats().backend(s).active_conns).sum();
    assert_eq!((active, w.conntrack().len()), (0, 0));
}

#[test]
fn service_counters_keep_what_a_departed_backend_counted_and_start_at_zero_on_a_reused_slot() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let slot = w.tables().services()[0].slot;
    let frame = |i, flags| tcp(client(i), 1000, v4(VIP), 80, flags, b"");
    let mut bytes = 0;
    for i in 0..4 {
        for flags in [Tcp::Syn, Tcp::Ack] {
            let f = frame(i, flags);
            assert_eq!(run(&mut w, &f, secs(1)).0, Verdict::Tx);
            bytes += (f.len() - 14) as u64;
        }
    }
    // A frame the service drops counts as its drop, not as its traffic.
    let mut blocked = cfg.clone();
    blocked.services[0].source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    w.swap_tables(b.build(&blocked).unwrap());
    assert_eq!(run(&mut w, &frame(0, Tcp::Ack), secs(1)).0, Verdict::Drop(DropReason::SourceNotAllowed));
    let counted = w.stats().service(slot);
    assert_eq!((counted.packets, counted.bytes, counted.new_flows, counted.drops), (8, bytes, 4, 1));
    // Backend 10.1.0.1 leaves: what it carried stays the service's.
    cfg.services[0].backends.retain(|b| b.addr != v4("10.1.0.1"));
    w.swap_tables(b.build(&cfg).unwrap());
    assert_eq!(w.stats().service(slot), counted);
    let (v, out) = run(&mut w, &frame(9, Tcp::Syn), secs(2));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2));
    let after = w.stats().service(slot);
    assert_eq!((after.packets, after.new_flows, after.drops), (9, 5, 1));
    // The service goes; a new one takes its slot: its counters start at zero.
    let web = cfg.services.remove(0);
    w.swap_tables(b.build(&cfg).unwrap());
    let mut other = web.clone();
    other.name = "other".into();
    other.key.vip = v4("192.0.2.7");
    cfg.services.push(other);
    w.swap_tables(b.build(&cfg).unwrap());
    let reused = w.tables().services().iter().find(|s| s.name == "other").unwrap();
    assert_eq!(reused.slot, slot, "the builder reuses the freed slot");
    assert_eq!(w.stats().service(slot), Default::default());
}

#[test]
fn a_reused_backend_slot_counts_only_its_new_backends_connections() {
    let mut cfg = dsr_config(SchedulerKind::LeastConnections, &["10.1.0.1", "10.1.0.2"]);
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(64));
    let slot_of = |w: &Worker, addr: &str| {
        w.tables().services()[1].backends.iter().find(|b| b.addr == v4(addr)).map(|b| b.slot())
    };
    // Ten UDP flows, five to each backend (lc).
    for i in 0..10 {
        assert_eq!(run(&mut w, &udp(client(i), 53, v4(VIP), 80, b"q"), secs(1)).0, Verdict::Tx);
    }
    let old = slot_of(&w, "10.1.0.1").unwrap();
    assert_eq!(w.stats().backend(old).active_conns, 5);
    // 10.1.0.1 leaves the UDP service, then 10.1.0.3 joins it and is handed the freed slot. Its
    // five flows stay in the table, naming the slot under the old backend's generation.
    cfg.services[1].backends.retain(|b| b.addr != v4("10.1.0.1"));
    w.swap_tables(b.build(&cfg).unwrap());
    cfg.services[1].backends.push(backend("10.1.0.3", 80));
    w.swap_tables(b.build(&cfg).unwrap());
    assert_eq!(slot_of(&w, "10.1.0.3"), Some(old), "the builder reuses the freed slot");
    let fresh = w.stats().backend(old);
    assert_eq!((fresh.packets, fresh.new_flows, fresh.active_conns), (0, 0, 0), "a new backend starts at zero");
    // Two new flows, both to the new backend (lc: 0 against 5).
    for i in 10..12 {
        assert_eq!(run(&mut w, &udp(client(i), 53, v4(VIP), 80, b"q"), secs(299)).0, Verdict::Tx);
    }
    assert_eq!(w.stats().backend(old).active_conns, 2);
    // The ten first flows time out and are swept (4 buckets a burst, 8 here): the old backend's
    // five leaving must not take from the new backend's count.
    for _ in 0..2 {
        run(&mut w, &udp(client(999), 53, v4("192.0.2.99"), 80, b"pass"), secs(302));
    }
    assert_eq!(w.conntrack().len(), 2);
    assert_eq!(w.stats().backend(old).active_conns, 2);
    assert_eq!(w.stats().backend(slot_of(&w, "10.1.0.2").unwrap()).active_conns, 0);
}

/// Established flows hold their SNAT ports: a new flow that finds every port held by one is dropped
/// (counted), not given an established connection's port.
#[test]
fn snat_ports_are_unique_per_backend_and_run_out_counted() {
    let cfg = one_backend_nat(40003);
    let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1024));
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..4 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx);
        ports.insert(seen(&out).sport);
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1)).0, Verdict::Tx);
    }
    assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![40000, 40001, 40002, 40003]);
    let (v, _) = run(&mut w, &tcp(client(9), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Drop(DropReason::NoSnatPort));
    assert_eq!(w.stats().snat_port_evictions, 0);
    // Every established flow still has its port: its packets go out from it.
    for i in 0..4 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b"x"), secs(2));
        assert_eq!((v, seen(&out).sport), (Verdict::Tx, 40000 + i as u16), "client {i}");
    }
}

/// A SYN flood to a full-NAT service holds a SNAT port per SYN for the SYN timeout; once every port
/// of the share is held, a new flow takes the port of the oldest half-open flow (which is evicted,
/// counted, its backend's connection count with it), never an established flow's, as conntrack
/// evicts the oldest half-open entry for room. Before, every new connection was dropped as out of
/// ports until the flood's entries expired.
#[test]
fn a_syn_flood_holding_every_snat_port_gives_way_oldest_first_to_new_flows() {
    let cfg = one_backend_nat(40007);
    let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1024));
    let slot = w.tables().services()[0].backends[0].slot();
    // Two established connections, then six flooding SYNs a second apart: every port held.
    let mut port_of = std::collections::HashMap::new();
    for i in 0..8u32 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1 + u64::from(i)));
        assert_eq!(v, Verdict::Tx);
        port_of.insert(i, seen(&out).sport);
        if i < 2 {
            let ack = tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b"");
            assert_eq!(run(&mut w, &ack, secs(1 + u64::from(i))).0, Verdict::Tx);
        }
    }
    assert_eq!(w.stats().backend(slot).active_conns, 8);
    // Six new clients: each takes the port of the oldest flooding SYN left, in order.
    for (k, i) in (100..106u32).enumerate() {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(20));
        assert_eq!(v, Verdict::Tx, "client {i}");
        let s = seen(&out);
        let evicted = 2 + k as u32;
        assert_eq!(s.sport, port_of[&evicted], "client {i} took the port of flood SYN {evicted}");
        // Its replies reach it.
        let (v, back) = run(&mut w, &tcp(s.dst, 8080, s.src, s.sport, Tcp::Ack, b""), secs(20));
        assert_eq!(v, Verdict::Tx);
        assert_eq!(seen(&back).dst, client(i), "the reply to port {} went to the new client", s.sport);
        assert_eq!(w.stats().snat_port_evictions, k as u64 + 1);
    }
    // The evicted flows are gone (their next segment is a new flow) and the counts are exact.
    assert_eq!(w.stats().backend(slot).active_conns, 8);
    assert_eq!(w.conntrack().len(), 16, "eight flows, each with its reverse entry");
    // Only established (and the new, half-open, flows') ports are left: the newest half-open flow
    // goes last, and established ones never.
    for i in 0..2 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b"x"), secs(21));
        assert_eq!((v, seen(&out).sport), (Verdict::Tx, port_of[&i]), "established client {i} kept its port");
    }
    for i in 100..106u32 {
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(21)).0, Verdict::Tx);
    }
    let (v, _) = run(&mut w, &tcp(client(200), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(22));
    assert_eq!(v, Verdict::Drop(DropReason::NoSnatPort), "every port held by an established flow");
    assert_eq!(w.stats().snat_port_evictions, 6);
}

/// SNAT ports go to a backend in turn (RFC 6056's per-destination counter): each new flow takes
/// the port after the last one its backend was given, skipping ports still in use, and a port
/// comes back to the backend only after the rest of the range has gone to it.
#[test]
fn snat_ports_go_to_a_backend_in_turn() {
    let cfg = one_backend_nat(40005);
    let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1024));
    let syn = |w: &mut Worker, i: u32, at: u64| {
        let (v, out) = run(w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(at));
        assert_eq!(v, Verdict::Tx, "client {i}");
        seen(&out).sport
    };
    let first: Vec<u16> = (0..4).map(|i| syn(&mut w, i, 1)).collect();
    assert_eq!(first, [40000, 40001, 40002, 40003]);
    // The flows of 40001 and 40003 are established; those of 40000 and 40002 never are, and once
    // their entries expire the sweep (a few buckets each burst, empty bursts too) reclaims them.
    for i in [1, 3] {
        run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
    }
    let later = 600;
    for _ in 0..1024 {
        w.process_burst(&mut [], secs(later), &mut []);
    }
    assert_eq!(w.conntrack().len(), 4, "two NAT flows, two entries each");
    // The two never-used ports first, then the freed ones, passing over those in use.
    let next: Vec<u16> = (10..14).map(|i| syn(&mut w, i, later)).collect();
    assert_eq!(next, [40004, 40005, 40000, 40002]);
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
    // Every port's owner is the core whose share holds it, for ranges that divide evenly and that
    // leave a remainder to the last share; none outside the range or without shares.
    for (range, cores) in [((40000, 40999), 2), ((1, 7), 3), ((60000, 65535), 7), ((5, 5), 1), ((1, 65535), 64)] {
        for port in 0..=u16::MAX {
            let holder = (0..cores)
                .find(|&c| snat_port_share(range, c, cores).is_some_and(|(lo, hi)| (lo..=hi).contains(&port)));
            assert_eq!(snat_port_owner(range, cores, port), holder, "{range:?} over {cores}, port {port}");
        }
    }
    assert_eq!(snat_port_owner((1, 2), 3, 1), None);
    assert_eq!(snat_port_owner((0, 100), 2, 50), None);
    assert_eq!(snat_port_owner((40000, 40999), 0, 40000), None);
}

/// RSS spreads NAT replies over the queues by the backend's address and ports, so a reply mostly
/// lands on a core that does not track its flow. That core hands it, unchanged, to the core whose
/// SNAT port share holds its destination port (an ICMP error about the flow too, by its quote's
/// source port), and the owner translates it as if it had arrived there. A reply to a port of the
/// core's own share that it has no flow for stays a drop, as does one outside `snat_ports`.
#[test]
fn a_nat_reply_on_another_core_is_handed_to_the_owner_of_its_snat_port() {
    let cfg = all_modes_config();
    let tables = build(&cfg);
    let core = |i| Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1024, core_index: i, core_count: 2 });
    let mut cores = [core(0), core(1)];
    let (lo1, _) = lb_core::worker::snat_port_share(cfg.node.snat_ports, 1, 2).unwrap();
    for (owner, client_port) in [(0usize, 1000u16), (1, 2000)] {
        let c = client(u32::from(client_port));
        let (v, out) = run(&mut cores[owner], &tcp(c, client_port, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx);
        let s = seen(&out);
        assert_eq!(s.sport >= lo1, owner == 1, "core {owner} took SNAT port {} from its own share", s.sport);
        let reply = tcp(s.dst, s.dport, s.src, s.sport, Tcp::Ack, b"");
        let other = 1 - owner;
        let (handed_before, tracked_before) = (cores[other].stats().handed_off, cores[other].conntrack().len());
        let (v, unchanged) = run(&mut cores[other], &reply, secs(1));
        assert_eq!(v, Verdict::Handoff(u16::try_from(owner).unwrap()), "core {other} hands the reply on");
        assert_eq!(unchanged, reply, "a handed-off frame is not touched");
        assert_eq!(cores[other].stats().handed_off, handed_before + 1);
        assert_eq!(cores[other].conntrack().len(), tracked_before, "the other core tracks nothing of it");
        let (v, out) = run(&mut cores[owner], &unchanged, secs(1));
        assert_eq!(v, Verdict::Tx, "the owner translates it");
        let back = seen(&out);
        assert_eq!((back.src, back.sport, back.dst, back.dport), (v4(VIP), 80, c, client_port));
    }
    // The owner's own port with no flow: a drop; a port outside snat_ports: the host's. No handoffs.
    for port in [lo1, 39999] {
        let (v, _) = run(&mut cores[1], &tcp(v4("10.1.0.1"), 8080, v4("10.0.0.100"), port, Tcp::Ack, b""), secs(2));
        let expected = if port == lo1 { Verdict::Drop(DropReason::NoReverseFlow) } else { Verdict::Pass };
        assert_eq!(v, expected, "port {port}");
    }
    let total: u64 = cores.iter().map(|w| w.stats().handed_off).sum();
    assert_eq!(total, 2);
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
    // The first fragment names the service by its ports: the drop is the service's too.
    let key = ServiceKey { vip: v4(VIP), port: 81, proto: Protocol::Udp };
    let service = w.tables().lookup(&key).unwrap().1.slot;
    assert_eq!(w.stats().service(service).drops, 1);
}

/// A router's "fragmentation needed" about the VIP:80 -> `client`:1000 segment a DSR backend sent.
fn frag_needed_about(client: std::net::IpAddr) -> Vec<u8> {
    let quoted = &tcp(v4(VIP), 80, client, 1000, Tcp::Ack, b"")[14..];
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
        .ipv4([203, 0, 113, 1], [192, 0, 2, 1], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut icmp, &quoted[..28])
        .unwrap();
    icmp
}

#[test]
fn icmp_error_follows_its_flow_to_the_backend() {
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let mut sent_to = vec![];
    for i in 0..2 {
        let (_, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        sent_to.push(dsr_backend(&out));
    }
    // A router on the way back to client 1 reports "fragmentation needed" about VIP:80 -> client:1000.
    let (v, out) = run(&mut w, &frag_needed_about(client(1)), secs(2));
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

/// An ICMP error about a DSR flow reaches the flow's backend on whichever core it arrives. The error
/// (router -> VIP) is spread by RSS on its own addresses, not on the quoted flow's 5-tuple, so with
/// several queues it usually lands on a core that never saw the flow (the README runs DSR and the
/// tunnel modes "on any number of queues"). For a service whose scheduler picks from the flow alone
/// every core knows the flow's backend, as for a mid-stream segment after a restart, and the error
/// goes there (untracked: the other core's table stays empty). The schedulers with per-core state
/// cannot know it: their errors stay counted as `IcmpNoFlow`.
#[test]
fn icmp_error_about_a_dsr_flow_reaches_its_backend_from_any_core() {
    for kind in SchedulerKind::ALL {
        let cfg = dsr_config(kind, &["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]);
        let tables = worker_common::table_builder().build(&cfg).unwrap();
        let core =
            |i| Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1024, core_index: i, core_count: 2 });
        let (mut flow_core, mut other_core) = (core(0), core(1));
        for i in 0..8 {
            let (v, out) = run(&mut flow_core, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            assert_eq!(v, Verdict::Tx);
            let backend = dsr_backend(&out);
            let (v, out) = run(&mut other_core, &frag_needed_about(client(i)), secs(2));
            if kind.picks_from_flow_alone() {
                assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, backend), "{kind}, client {i}");
            } else {
                assert_eq!(v, Verdict::Drop(DropReason::IcmpNoFlow), "{kind}, client {i}");
            }
        }
        assert_eq!(other_core.conntrack().len(), 0, "{kind}: an error is not a flow");
    }
}

/// An ICMP error to a VIP about a full-NAT flow lands on any core (RSS spreads errors by the
/// router's address), and only the core that tracks the flow knows its SNAT port. The others hand
/// it to every other core; the tracking one translates it to the backend, the rest, handed it,
/// count their copy as `icmp_copy_untracked` (not `icmp_no_flow`: the error was handled) and hand
/// nothing on (nor a reply to another core's port).
#[test]
fn an_icmp_error_about_a_nat_flow_on_another_core_is_handed_to_every_core() {
    let cfg = all_modes_config();
    let tables = build(&cfg);
    let core = |i| Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: 1024, core_index: i, core_count: 3 });
    let mut cores = [core(0), core(1), core(2)];
    let c = client(7);
    let (v, out) = run(&mut cores[1], &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Tx);
    let to_backend = seen(&out);
    let error = frag_needed_about(c);
    let (v, unchanged) = run(&mut cores[0], &error, secs(2));
    assert_eq!(v, Verdict::HandoffAll);
    assert_eq!(unchanged, error, "a handed-off frame is not touched");
    assert_eq!(cores[0].stats().handed_off, 1);
    let handed = |w: &mut Worker, frame: &[u8]| {
        let mut buf = vec![0u8; 64 + frame.len()];
        buf[64..].copy_from_slice(frame);
        let mut frames = [lb_core::Frame::new(&mut buf, 64, frame.len())];
        let mut v = [Verdict::Pass];
        w.process_handed_burst(&mut frames, secs(2), &mut v);
        (v[0], frames[0].data().to_vec())
    };
    // The core that never saw the flow, handed it: a counted drop, not another handoff.
    assert_eq!(handed(&mut cores[2], &error).0, Verdict::Drop(DropReason::IcmpCopyUntracked));
    assert_eq!(cores[2].stats().handed_off, 0);
    assert_eq!(cores.iter().map(|w| w.stats().dropped(DropReason::IcmpNoFlow)).sum::<u64>(), 0);
    // The tracking core sends it to the flow's backend, translated as the flow is (from the SNAT
    // address to the backend).
    let (v, out) = handed(&mut cores[1], &error);
    assert_eq!(v, Verdict::Tx);
    let addr = |b: &[u8]| std::net::IpAddr::from(<[u8; 4]>::try_from(b).unwrap());
    let outer = |f: &[u8]| (addr(&f[26..30]), addr(&f[30..34]));
    assert_eq!(outer(&out), (to_backend.src, to_backend.dst), "the error goes where the flow goes");
    // A NAT reply to core 1's port handed to core 2 (tables disagreeing for a moment): a drop there.
    let reply = tcp(to_backend.dst, to_backend.dport, to_backend.src, to_backend.sport, Tcp::Ack, b"");
    assert_eq!(run(&mut cores[2], &reply, secs(2)).0, Verdict::Handoff(1));
    assert_eq!(handed(&mut cores[2], &reply).0, Verdict::Drop(DropReason::NoReverseFlow));
    // One core of one has no one to ask.
    let mut alone = Worker::new(tables.clone(), WorkerConfig::single_core(1024));
    assert_eq!(run(&mut alone, &error, secs(2)).0, Verdict::Drop(DropReason::IcmpNoFlow));
}

/// An error about an untracked flow is not sent on a guess: not for ClientIP affinity (the client's
/// backend is per-core state), not for NAT (the flow's SNAT port is the tracking core's), and not
/// for a client the service's source ranges refuse.
#[test]
fn icmp_error_about_an_untracked_flow_is_not_sent_on_a_guess() {
    let base = dsr_config(SchedulerKind::Maglev, &["10.1.0.1", "10.1.0.2"]);
    let mut affinity = base.clone();
    affinity.services[0].affinity_timeout = Some(dur(60));
    let mut nat = base.clone();
    nat.services[0].mode = ForwardMode::Nat;
    let mut ranges = base.clone();
    ranges.services[0].source_ranges = vec!["10.9.0.0/16".parse().unwrap()];
    let cases = [
        ("affinity", affinity, DropReason::IcmpNoFlow),
        ("nat", nat, DropReason::IcmpNoFlow),
        ("source ranges", ranges, DropReason::SourceNotAllowed),
    ];
    for (name, cfg, reason) in cases {
        let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        let (v, _) = run(&mut w, &frag_needed_about(client(3)), secs(2));
        assert_eq!(v, Verdict::Drop(reason), "{name}");
    }
    // The base service sends it.
    let mut w = Worker::new(worker_common::table_builder().build(&base).unwrap(), WorkerConfig::single_core(1024));
    assert_eq!(run(&mut w, &frag_needed_about(client(3)), secs(2)).0, Verdict::Tx);
}

/// A DSR service with the Drop policy, two round-robin backends and short timeouts; `flows` TCP flows
/// from clients `0..flows` (port 1000) handshake at 1 s. Returns the worker, the builder's config and
/// the backend (MAC byte) of each flow.
fn drop_policy_setup(capacity: usize, flows: u32) -> (Worker, Config, Vec<u8>, TableBuilder) {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    cfg.services[0].on_backend_removed = RemovedBackendPolicy::Drop;
    cfg.node.timeouts.tcp_established = dur(300);
    cfg.node.timeouts.tcp_time_wait = dur(30);
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(capacity));
    let mut on = vec![];
    for i in 0..flows {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx);
        on.push(dsr_backend(&out));
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1)).0, Verdict::Tx);
    }
    (w, cfg, on, b)
}

/// Removes backend 10.1.0.1 (MAC byte 1) from the TCP service. `b` built the running tables (a
/// builder keeps backend slots stable across builds).
fn remove_first_backend(w: &mut Worker, cfg: &mut Config, b: &mut TableBuilder) {
    cfg.services[0].backends.retain(|b| b.addr != v4("10.1.0.1"));
    w.swap_tables(b.build(cfg).unwrap());
}

fn state_of(w: &Worker, c: std::net::IpAddr, sport: u16) -> Option<(ConnState, u32)> {
    let key = ConnKey::flow(c, v4(VIP), sport, 80, 6);
    w.conntrack().iter().find(|(_, e)| e.key == key).map(|(_, e)| (e.state, e.expires))
}

#[test]
fn drop_policy_drops_every_later_packet_of_the_flow_and_schedules_new_ones() {
    let (mut w, mut cfg, on, mut b) = drop_policy_setup(1024, 2);
    assert_eq!(on, vec![1, 2], "round robin");
    remove_first_backend(&mut w, &mut cfg, &mut b);
    let survivor = w.tables().services()[0].backends[0].slot();
    let before = w.stats().backend(survivor);
    let c = client(0);
    // What a client of the dead backend sends next: its data, the same segment retransmitted, a bare
    // ACK (which for an unknown flow would be picked up mid-stream), a window probe, a SYN.
    let packets = [
        tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"GET / HTTP/1.1\r\n"),
        tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"GET / HTTP/1.1\r\n"),
        tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""),
        tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"x"),
        tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""),
    ];
    for (k, p) in packets.iter().enumerate() {
        let (v, _) = run(&mut w, p, secs(2 + k as u64));
        assert_eq!(v, Verdict::Drop(DropReason::BackendRemoved), "packet {k} of the flow");
    }
    assert_eq!(w.stats().dropped(DropReason::BackendRemoved), packets.len() as u64);
    assert_eq!(w.stats().backend(survivor), before, "a packet of the dead backend's flow reached the survivor");
    assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::BackendGone));
    // The tombstone is nobody's connection; the survivor's own flow is untouched.
    assert_eq!(w.stats().backend(survivor).active_conns, 1);
    assert_eq!(run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b"y"), secs(3)).0, Verdict::Tx);
    // A new connection from the same client is scheduled normally.
    let (v, out) = run(&mut w, &tcp(c, 1001, v4(VIP), 80, Tcp::Syn, b""), secs(10));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2));
    assert_eq!(w.stats().backend(survivor).active_conns, 2);
    // The tombstone keeps dropping beside it.
    assert_eq!(run(&mut w, &packets[0], secs(11)).0, Verdict::Drop(DropReason::BackendRemoved));
}

/// An ICMP error about a tombstoned flow (buried under the Drop policy) is dropped while the policy
/// is Drop. Once tables bring Reschedule, the tombstone stands for nothing (the flow's next packet
/// is scheduled afresh), and the error goes where an untracked flow's goes, as on any other core:
/// for a scheduler that picks from the flow alone, to the backend that next packet will reach.
/// It was dropped as `backend_removed` until that packet came.
#[test]
fn an_icmp_error_about_a_tombstone_follows_the_policy_of_the_tables() {
    let mut cfg = dsr_config(SchedulerKind::Maglev, &["10.1.0.1", "10.1.0.2"]);
    cfg.services[0].on_backend_removed = RemovedBackendPolicy::Drop;
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    // A client whose flow Maglev puts on the backend that will leave.
    let c = (0..64)
        .map(client)
        .find(|&c| dsr_backend(&run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1)).1) == 1)
        .unwrap();
    remove_first_backend(&mut w, &mut cfg, &mut b);
    let data = tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data");
    assert_eq!(run(&mut w, &data, secs(2)).0, Verdict::Drop(DropReason::BackendRemoved));
    assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::BackendGone));
    assert_eq!(run(&mut w, &frag_needed_about(c), secs(3)).0, Verdict::Drop(DropReason::BackendRemoved));

    cfg.services[0].on_backend_removed = RemovedBackendPolicy::Reschedule;
    w.swap_tables(b.build(&cfg).unwrap());
    let (v, error_to) = run(&mut w, &frag_needed_about(c), secs(4));
    assert_eq!((v, dsr_backend(&error_to)), (Verdict::Tx, 2));
    assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::BackendGone), "an error is not a flow's packet");
    let (v, data_to) = run(&mut w, &data, secs(5));
    assert_eq!((v, dsr_backend(&data_to)), (Verdict::Tx, 2), "the flow's next packet goes where its error went");
}

#[test]
fn drop_policy_tombstone_idles_out_then_the_tuple_is_new() {
    let (mut w, mut cfg, _, mut b) = drop_policy_setup(1024, 1);
    remove_first_backend(&mut w, &mut cfg, &mut b);
    let (c, ack) = (client(0), tcp(client(0), 1000, v4(VIP), 80, Tcp::Ack, b"data"));
    assert_eq!(run(&mut w, &ack, secs(2)).0, Verdict::Drop(DropReason::BackendRemoved));
    assert_eq!(state_of(&w, c, 1000), Some((ConnState::BackendGone, 302)));
    // Each packet refreshes the idle timeout (300 s)...
    assert_eq!(run(&mut w, &ack, secs(200)).0, Verdict::Drop(DropReason::BackendRemoved));
    assert_eq!(
        run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(303)).0,
        Verdict::Drop(DropReason::BackendRemoved)
    );
    // ...and after 300 s of silence the tombstone is gone: a SYN on the same tuple is a new flow.
    let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(604));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2));
    assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::SynSeen));
    assert_eq!(w.stats().dropped(DropReason::BackendRemoved), 3);
}

/// Under the drop policy a UDP flow whose backend left is dropped for the UDP timeout from the
/// first packet that found it gone, however often the client sends; then its packets are a new
/// flow, scheduled to a backend that is there (as IPVS drops a flow of a dead destination without
/// restarting its timer). A UDP client has no connection to give up on: one that keeps its port and
/// sends more often than the timeout (NTP from port 123, a resolver or a log shipper on a fixed port)
/// renewed its tombstone with each packet and was cut off for as long as it kept sending, as
/// Kubernetes' stale UDP conntrack entries once cut DNS clients off from a replaced DNS pod.
#[test]
fn drop_policy_udp_tombstone_lasts_the_udp_timeout_however_often_the_client_sends() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    cfg.services[1].on_backend_removed = RemovedBackendPolicy::Drop;
    cfg.node.timeouts.udp = dur(300);
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let c = client(0);
    let datagram = udp(c, 123, v4(VIP), 80, b"ntp");
    let (v, out) = run(&mut w, &datagram, secs(1));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 1), "round robin's first pick");
    assert_eq!(run(&mut w, &datagram, secs(1)).0, Verdict::Tx);
    cfg.services[1].backends.retain(|b| b.addr != v4("10.1.0.1"));
    w.swap_tables(b.build(&cfg).unwrap());
    // The client sends every 60 s: dropped until 300 s after the first datagram that found the
    // backend gone (at 2 s), then scheduled to the backend that is left.
    for t in (2..302).step_by(60) {
        assert_eq!(run(&mut w, &datagram, secs(t)).0, Verdict::Drop(DropReason::BackendRemoved), "at {t} s");
    }
    let (v, out) = run(&mut w, &datagram, secs(302));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2), "at 302 s");
    let (v, out) = run(&mut w, &datagram, secs(303));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2), "at 303 s");
}

#[test]
fn drop_policy_tombstone_closes_on_the_clients_rst() {
    let (mut w, mut cfg, _, mut b) = drop_policy_setup(1024, 1);
    remove_first_backend(&mut w, &mut cfg, &mut b);
    let c = client(0);
    assert_eq!(
        run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(2)).0,
        Verdict::Drop(DropReason::BackendRemoved)
    );
    assert_eq!(
        run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Rst, b""), secs(3)).0,
        Verdict::Drop(DropReason::BackendRemoved)
    );
    // Time-wait (30 s) from the RST, not extended by the stragglers after it.
    assert_eq!(state_of(&w, c, 1000), Some((ConnState::BackendGone, 33)));
    assert_eq!(
        run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(20)).0,
        Verdict::Drop(DropReason::BackendRemoved)
    );
    assert_eq!(state_of(&w, c, 1000), Some((ConnState::BackendGone, 33)));
    // The client reuses its port for a new connection: scheduled.
    let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(21));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2));
}

#[test]
fn drop_policy_tombstones_yield_their_room_to_live_flows() {
    // One 8-way bucket, full of established flows; half lose their backend.
    let (mut w, mut cfg, on, mut b) = drop_policy_setup(8, 8);
    remove_first_backend(&mut w, &mut cfg, &mut b);
    let dead: Vec<u32> = (0..8).filter(|&i| on[i as usize] == 1).collect();
    assert_eq!(dead.len(), 4);
    for &i in &dead {
        assert_eq!(
            run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2)).0,
            Verdict::Drop(DropReason::BackendRemoved)
        );
    }
    // New clients complete their handshakes (a half-open entry would be the next victim itself).
    for i in 100..104 {
        assert_eq!(
            run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(3)).0,
            Verdict::Tx,
            "client {i}"
        );
        assert_eq!(
            run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(3)).0,
            Verdict::Tx,
            "client {i}"
        );
    }
    assert_eq!(w.stats().conntrack_evictions, 4);
    assert!(w.conntrack().iter().all(|(_, e)| e.state != ConnState::BackendGone));
    for i in (0..8).filter(|i| !dead.contains(i)) {
        assert_eq!(state_of(&w, client(i), 1000).map(|s| s.0), Some(ConnState::Established));
    }
}

#[test]
fn drop_policy_nat_flow_keeps_no_reverse_translation() {
    let mut cfg = all_modes_config();
    cfg.services[0].on_backend_removed = RemovedBackendPolicy::Drop;
    cfg.services[0].scheduler = SchedulerKind::RoundRobin;
    let mut b = worker_common::table_builder();
    let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let c = client(5);
    let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Tx);
    let s = seen(&out);
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
    // While the backend serves, its reply translates back to the client.
    assert_eq!(run(&mut w, &tcp(s.dst, 8080, s.src, s.sport, Tcp::Ack, b""), secs(1)).0, Verdict::Tx);
    cfg.services[0].backends.retain(|b| b.addr != s.dst);
    w.swap_tables(b.build(&cfg).unwrap());
    for t in 2..5 {
        let (v, _) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(t));
        assert_eq!(v, Verdict::Drop(DropReason::BackendRemoved));
    }
    // The old backend's late reply (say its RST) reaches no one.
    let (v, _) = run(&mut w, &tcp(s.dst, 8080, s.src, s.sport, Tcp::Rst, b""), secs(5));
    assert_eq!(v, Verdict::Drop(DropReason::NoReverseFlow));
    assert_eq!(w.conntrack().iter().filter(|(_, e)| e.kind == lb_core::conntrack::EntryKind::Reverse).count(), 0);
    assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::BackendGone));
    // A new connection from the client goes to the survivor, with a working reverse path.
    let (v, out) = run(&mut w, &tcp(c, 1001, v4(VIP), 80, Tcp::Syn, b""), secs(6));
    assert_eq!(v, Verdict::Tx);
    let n = seen(&out);
    assert_ne!(n.dst, s.dst);
    assert_eq!(run(&mut w, &tcp(n.dst, 8080, n.src, n.sport, Tcp::Ack, b""), secs(6)).0, Verdict::Tx);
}

/// A service switched into or out of NAT keeps none of its flows: NAT tracks a flow with a SNAT port
/// and a reverse entry that a DSR flow has not, and its backend sees another 4-tuple. The flows
/// follow the removed-backend policy instead: the next packet starts a new flow of the new mode (for
/// NAT with a SNAT port and a working reply path, not the port 0 a DSR entry holds), or is dropped.
#[test]
fn a_switch_into_or_out_of_nat_follows_the_removed_backend_policy() {
    use lb_core::conntrack::EntryKind;
    for policy in [RemovedBackendPolicy::Reschedule, RemovedBackendPolicy::Drop] {
        for (from, to) in [(ForwardMode::Dsr, ForwardMode::Nat), (ForwardMode::Nat, ForwardMode::Dsr)] {
            let ctx = format!("{policy:?}, {from:?} to {to:?}");
            let mut cfg = dsr_config(SchedulerKind::Maglev, &["10.1.0.1"]);
            cfg.services.truncate(1);
            cfg.services[0].mode = from;
            cfg.services[0].on_backend_removed = policy;
            let mut b = worker_common::table_builder();
            let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
            let c = client(1);
            run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
            assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::Established), "{ctx}");

            cfg.services[0].mode = to;
            w.swap_tables(b.build(&cfg).unwrap());
            let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(2));
            let reverse = w.conntrack().iter().filter(|(_, e)| e.kind == EntryKind::Reverse).count();
            if policy == RemovedBackendPolicy::Drop {
                assert_eq!(v, Verdict::Drop(DropReason::BackendRemoved), "{ctx}");
                assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::BackendGone), "{ctx}");
                assert_eq!(reverse, 0, "{ctx}");
                continue;
            }
            assert_eq!(v, Verdict::Tx, "{ctx}");
            // A new flow, half-open until the client's next segment, counted at the backend (after
            // the flow before the switch: its new flows carry on, its connections do not).
            assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::SynSeen), "{ctx}");
            let slot = w.tables().services()[0].backends[0].slot();
            let counts = w.stats().backend(slot);
            assert_eq!((counts.new_flows, counts.active_conns, counts.established_conns), (2, 1, 0), "{ctx}");
            let s = seen(&out);
            if to == ForwardMode::Nat {
                assert_eq!((s.src, s.dst, s.dport), (v4("10.0.0.100"), v4("10.1.0.1"), 80), "{ctx}");
                assert_ne!(s.sport, 0, "{ctx}");
                assert_eq!(reverse, 1, "{ctx}");
                let (v, back) = run(&mut w, &tcp(s.dst, s.dport, s.src, s.sport, Tcp::Ack, b""), secs(2));
                assert_eq!(v, Verdict::Tx, "{ctx}");
                let r = seen(&back);
                assert_eq!((r.src, r.sport, r.dst, r.dport), (v4(VIP), 80, c, 1000), "{ctx}");
            } else {
                assert_eq!((s.src, s.sport, s.dst, s.dport), (c, 1000, v4(VIP), 80), "{ctx}");
                assert_eq!(dsr_backend(&out), 1, "{ctx}");
                assert_eq!(reverse, 0, "the NAT flow's reverse entry went with it: {ctx}");
            }
        }
    }
}

/// A NAT flow does not cross a change of the node's SNAT address either: its entry holds its SNAT
/// port, not the address, so its packets would leave from the new address with that port, where
/// no reverse entry brings the backend's replies back and a new flow to the backend may be given
/// the port. Its backend gets a new generation, as for a switch out of NAT: the flow follows the
/// removed-backend policy (its next packet starts a new flow from the new address, whose replies
/// come back to it, or is dropped), its reverse entry under the old address goes, and new flows'
/// replies reach their own clients. (The flow's packets left from the new address and the old port,
/// and a reply there was dropped as `no_reverse_flow`, or reached the new flow given that port.)
#[test]
fn a_snat_address_change_follows_the_removed_backend_policy() {
    use lb_core::conntrack::EntryKind;
    use std::net::Ipv4Addr;
    for policy in [RemovedBackendPolicy::Reschedule, RemovedBackendPolicy::Drop] {
        let mut cfg = one_backend_nat(40001);
        cfg.services[0].on_backend_removed = policy;
        let mut b = worker_common::table_builder();
        let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        let (old, new) = (v4("10.0.0.100"), v4("10.0.0.200"));
        let send = |w: &mut Worker, c: u32, flags| run(w, &tcp(client(c), 1000, v4(VIP), 80, flags, b""), secs(2));
        let (_, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(seen(&out).src, old);
        run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));

        cfg.node.snat_v4 = Some(Ipv4Addr::new(10, 0, 0, 200));
        w.swap_tables(b.build(&cfg).unwrap());
        let (v, out) = send(&mut w, 1, Tcp::Ack);
        let old_reverse = |w: &Worker| {
            w.conntrack().iter().filter(|(_, e)| e.kind == EntryKind::Reverse && e.key.dst_ip() == old).count()
        };
        // The clients whose flows a reply to each port reaches.
        let mut flows = vec![];
        if policy == RemovedBackendPolicy::Drop {
            assert_eq!(v, Verdict::Drop(DropReason::BackendRemoved));
        } else {
            assert_eq!(v, Verdict::Tx);
            flows.push((1, seen(&out)));
        }
        flows.push((2, seen(&send(&mut w, 2, Tcp::Syn).1)));
        for (c, s) in flows {
            assert_eq!((s.src, s.dst), (new, v4("10.1.0.1")), "{policy:?}, client {c}");
            let (v, back) = run(&mut w, &tcp(s.dst, s.dport, s.src, s.sport, Tcp::Ack, b""), secs(2));
            assert_eq!(v, Verdict::Tx, "{policy:?}: the reply to client {c}'s port {}", s.sport);
            assert_eq!(seen(&back).dst, client(c), "{policy:?}: the reply to client {c}'s port {}", s.sport);
        }
        assert_eq!(old_reverse(&w), 0, "{policy:?}");
    }
}

/// Config with one full-NAT service, TCP `vip`:80 to 10.1.0.1:8080, on the tests' node (SNAT
/// address 10.0.0.100, ports 40000 to 40999).
fn nat_web_on(vip: &str) -> Config {
    let web = service("web", vip, 80, Protocol::Tcp, ForwardMode::Nat, vec![backend("10.1.0.1", 8080)]);
    Config { node: node(), services: vec![web] }
}

/// A router's "fragmentation needed", to `to`, about the segment `from` -> `about` it quotes.
fn frag_needed(to: std::net::IpAddr, from: (std::net::IpAddr, u16), about: (std::net::IpAddr, u16)) -> Vec<u8> {
    let quoted = &tcp(from.0, from.1, about.0, about.1, Tcp::Ack, b"")[14..];
    let std::net::IpAddr::V4(to) = to else { unreachable!("an IPv4 test") };
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LOCAL_MAC)
        .ipv4([203, 0, 113, 1], to.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut icmp, &quoted[..28])
        .unwrap();
    icmp
}

/// The outer addresses of an IPv4 frame (of any protocol), source first.
fn v4_addrs(frame: &[u8]) -> (std::net::IpAddr, std::net::IpAddr) {
    let addr = |b: &[u8]| std::net::IpAddr::from(<[u8; 4]>::try_from(b).unwrap());
    (addr(&frame[26..30]), addr(&frame[30..34]))
}

/// A swap that puts the node's SNAT address and port range over a VIP:port with live full-NAT
/// flows (its service gone or moved; `NodeConfig::vip_conflict` refuses the two together only
/// within one build) leaves the flows' forward entries keyed by what is now a NAT reply flow. The
/// client's next packet is then a frame to the SNAT address and a SNAT port with no reverse flow:
/// dropped as `no_reverse_flow`, as is an ICMP error there about the VIP's segment to the client.
/// (Both took the forward entry for a reverse entry: the client's packet went out "translated
/// back" through its link, from the old SNAT address and port to the backend, counted as a
/// reverse NAT reply, and the error went there too.)
#[test]
fn a_forward_entry_whose_key_becomes_a_nat_reply_flow_translates_nothing() {
    use std::net::Ipv4Addr;
    let c = client(1);
    // (VIP, the node's SNAT address after the swap, the service's VIP after it if it moved.)
    let cases = [
        ("192.0.2.1", Ipv4Addr::new(192, 0, 2, 1), None),
        ("192.0.2.1", Ipv4Addr::new(192, 0, 2, 1), Some("192.0.2.2")),
        ("10.0.0.100", Ipv4Addr::new(10, 0, 0, 100), None),
        ("10.0.0.100", Ipv4Addr::new(10, 0, 0, 100), Some("192.0.2.2")),
    ];
    for (vip, snat, moved) in cases {
        let ctx = format!("VIP {vip}, SNAT address {snat}, the service moved to {moved:?}");
        let mut cfg = nat_web_on(vip);
        let mut b = worker_common::table_builder();
        let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        let (v, _) = run(&mut w, &tcp(c, 1000, v4(vip), 80, Tcp::Syn, b""), secs(1));
        assert_eq!(v, Verdict::Tx, "{ctx}");
        assert_eq!(run(&mut w, &tcp(c, 1000, v4(vip), 80, Tcp::Ack, b""), secs(1)).0, Verdict::Tx, "{ctx}");

        match moved {
            Some(to) => cfg.services[0].key.vip = v4(to),
            None => cfg.services.clear(),
        }
        cfg.node.snat_v4 = Some(snat);
        cfg.node.snat_ports = (80, 40999);
        w.swap_tables(b.build(&cfg).unwrap());
        let (v, out) = run(&mut w, &tcp(c, 1000, v4(vip), 80, Tcp::Ack, b"data"), secs(2));
        assert_eq!(v, Verdict::Drop(DropReason::NoReverseFlow), "{ctx}: sent as {:?}", seen(&out));
        let error = frag_needed(v4(vip), (v4(vip), 80), (c, 1000));
        let (v, out) = run(&mut w, &error, secs(2));
        assert_eq!(v, Verdict::Drop(DropReason::NoReverseFlow), "{ctx}: the error sent as {:?}", v4_addrs(&out));
        assert_eq!(w.stats().reverse_nat, 0, "{ctx}");
        assert_eq!(w.stats().dropped(DropReason::NoReverseFlow), 2, "{ctx}");
    }
}

/// The other way round: a swap that takes a full-NAT flow's SNAT port out of the node's range (or
/// moves the SNAT address) and puts a service on the old SNAT address and that port leaves the
/// flow's reverse entry keyed by a flow to the service. A frame of that flow (its old backend now a
/// client of the service) is the service's: scheduled as a new flow, whatever its removed-backend
/// policy, and an ICMP error about it follows the service's rules for an error about a flow it
/// does not track. (The frame found the reverse entry and took it for a flow whose backend had
/// left: under the Drop policy it was dropped as `backend_removed` and the reverse entry turned
/// into a tombstone; the error went to the NAT flow's backend, translated as its packets are.)
#[test]
fn a_reverse_entry_whose_key_becomes_a_service_flow_is_no_flow_of_the_service() {
    use std::net::Ipv4Addr;
    for policy in [RemovedBackendPolicy::Reschedule, RemovedBackendPolicy::Drop] {
        for move_address in [false, true] {
            let ctx = format!("{policy:?}, the SNAT address moved: {move_address}");
            let mut cfg = nat_web_on(VIP);
            let mut b = worker_common::table_builder();
            let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
            let (v, out) = run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            assert_eq!(v, Verdict::Tx, "{ctx}");
            let s = seen(&out);
            assert_eq!(s.src, v4("10.0.0.100"), "{ctx}");

            if move_address {
                cfg.node.snat_v4 = Some(Ipv4Addr::new(10, 0, 0, 200));
            } else {
                cfg.node.snat_ports = (41000, 41999);
            }
            let backend9 = backend("10.1.0.9", s.sport);
            let mut other = service("other", "10.0.0.100", s.sport, Protocol::Tcp, ForwardMode::Dsr, vec![backend9]);
            other.on_backend_removed = policy;
            cfg.services.push(other);
            w.swap_tables(b.build(&cfg).unwrap());
            // An error about the service's segment to 10.1.0.1:8080: untracked, sent where the
            // service's scheduler sends the flow (it picks from the flow alone).
            let error = frag_needed(s.src, (s.src, s.sport), (s.dst, s.dport));
            let (v, out) = run(&mut w, &error, secs(2));
            assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 9), "{ctx}: the error sent as {:?}", v4_addrs(&out));
            let (v, out) = run(&mut w, &tcp(s.dst, s.dport, s.src, s.sport, Tcp::Syn, b""), secs(2));
            assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 9), "{ctx}");
            let key = ServiceKey { vip: s.src, port: s.sport, proto: Protocol::Tcp };
            let slot = w.tables().lookup(&key).unwrap().1.backends[0].slot();
            assert_eq!((w.stats().backend(slot).new_flows, w.stats().backend(slot).active_conns), (1, 1), "{ctx}");
            assert_eq!(w.stats().dropped(DropReason::BackendRemoved), 0, "{ctx}");
        }
    }
}

/// A backend's counters carry on across a switch of its service into or out of NAT: its flows follow
/// the removed-backend policy (the test above), but it is the same backend, under the same labels in
/// the metrics, whose packets, bytes and new flows are counters that never go down (Prometheus takes
/// a fall for a restart). They started again at zero. Its connections start at zero (the old flows
/// are no longer its), and its service's sums count nothing twice. Also for a worker that skips the
/// build of the switch (a poll loop far behind is given only the latest tables).
#[test]
fn a_backends_counters_carry_on_across_a_switch_into_or_out_of_nat() {
    let cases = [(ForwardMode::Dsr, ForwardMode::Nat), (ForwardMode::Nat, ForwardMode::Dsr)];
    for ((from, to), skip) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
        let ctx = format!("{from:?} to {to:?}, skipping the switch's build: {skip}");
        let mut cfg = dsr_config(SchedulerKind::Maglev, &["10.1.0.1"]);
        cfg.services.truncate(1);
        cfg.services[0].mode = from;
        let mut b = worker_common::table_builder();
        let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
        for i in 0..3 {
            assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1)).0, Verdict::Tx);
            assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1)).0, Verdict::Tx);
        }
        let service = w.tables().services()[0].slot;
        let backend = w.tables().services()[0].backends[0].slot();
        let (before, service_before) = (w.stats().backend(backend), w.stats().service(service));
        assert_eq!((before.packets, before.new_flows, before.active_conns), (6, 3, 3), "{ctx}");

        cfg.services[0].mode = to;
        let switched = b.build(&cfg).unwrap();
        let later = b.build(&cfg).unwrap();
        if !skip {
            w.swap_tables(switched);
        }
        w.swap_tables(later);
        let backend = w.tables().services()[0].backends[0].slot();
        let after = w.stats().backend(backend);
        assert_eq!((after.packets, after.bytes, after.new_flows), (6, before.bytes, 3), "{ctx}");
        assert_eq!((after.active_conns, after.established_conns), (0, 0), "{ctx}");
        assert_eq!(w.stats().service(service), service_before, "{ctx}");

        // A new flow after the switch counts on top, at the backend and once at its service.
        assert_eq!(run(&mut w, &tcp(client(9), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(2)).0, Verdict::Tx);
        let after = w.stats().backend(backend);
        assert_eq!((after.packets, after.new_flows, after.active_conns), (7, 4, 1), "{ctx}");
        let s = w.stats().service(service);
        assert_eq!((s.packets, s.new_flows), (7, 4), "{ctx}");
    }
}

/// DSR never sees the backend's FIN, so a flow the client closed stays closing for `tcp_fin`. A new
/// connection on that 5-tuple (the client reuses its port) restarts the entry half-open on the same
/// backend, as IPVS does: its ACK establishes it (counted once), its idle timeout is then
/// `tcp_established`, and it keeps its backend after idling longer than `tcp_fin`.
#[test]
fn a_syn_on_a_closing_flow_restarts_it_on_the_same_backend() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
    cfg.node.timeouts.tcp_syn = dur(30);
    cfg.node.timeouts.tcp_fin = dur(120);
    cfg.node.timeouts.tcp_established = dur(900);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(1024));
    let c = client(1);
    let established = |w: &Worker| -> Vec<u64> {
        let s = &w.tables().services()[0];
        s.backends.iter().map(|b| w.stats().backend(b.slot()).established_conns).collect()
    };
    let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    let first = dsr_backend(&out);
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Fin, b""), secs(2));
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
    assert_eq!(state_of(&w, c, 1000), Some((ConnState::Closing, 122)));
    assert_eq!(established(&w).iter().sum::<u64>(), 0);

    let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(10));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, first));
    assert_eq!(state_of(&w, c, 1000), Some((ConnState::SynSeen, 40)));
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(10));
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(11));
    assert_eq!(state_of(&w, c, 1000), Some((ConnState::Established, 911)));
    assert_eq!(established(&w).iter().sum::<u64>(), 1, "{:?}", established(&w));
    // Idle 200 s: past tcp_fin, within tcp_established. Round robin would pick the other backend
    // for a new flow, so this shows the flow was kept.
    let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(211));
    assert_eq!(dsr_backend(&out), first);
    assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::Established));
    // Only one new flow was counted: the restart is the same entry.
    let new_flows: u64 = w.tables().services()[0].backends.iter().map(|b| w.stats().backend(b.slot()).new_flows).sum();
    assert_eq!(new_flows, 1);
}

#[test]
fn established_count_follows_tcp_states_as_ipvsadm_active_conn() {
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1"]);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(64));
    let slot = w.tables().services()[0].backends[0].slot();
    let counts = |w: &Worker| (w.stats().backend(slot).active_conns, w.stats().backend(slot).established_conns);
    for i in 0..3 {
        run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
    }
    assert_eq!(counts(&w), (3, 0), "handshakes are inactive");
    for i in 0..3 {
        run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(2));
        run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(2));
    }
    assert_eq!(counts(&w), (3, 3), "an ACK after the SYN establishes, once");
    run(&mut w, &tcp(client(0), 1000, v4(VIP), 80, Tcp::Fin, b""), secs(3));
    run(&mut w, &tcp(client(1), 1000, v4(VIP), 80, Tcp::Rst, b""), secs(3));
    assert_eq!(counts(&w), (3, 1), "closing and time-wait are inactive");
    // Idle out: the established flow and the closing ones leave the table, every count returns to zero.
    for _ in 0..4 {
        run(&mut w, &udp(client(999), 53, v4("192.0.2.99"), 80, b"pass"), secs(10_000));
    }
    assert_eq!(counts(&w), (0, 0));
}

/// A Maglev service's new flows go to the backend its scheduler picks for the flow's lb-hash 5-tuple
/// hash, whether the worker takes it from the flat ring (no affinity) or from the scheduler (with
/// ClientIP affinity, the general path, where the hash is the client address's), with weights and
/// a draining backend in the set; and the flows' packets after the first stay there.
#[test]
fn maglev_new_flows_get_the_schedulers_pick_on_either_path() {
    let backends = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"];
    for affinity in [None, Some(dur(600))] {
        let mut cfg = dsr_config(SchedulerKind::Maglev, &backends);
        cfg.services[0].backends[1].weight = 4;
        cfg.services[0].backends[3].state = BackendState::Draining;
        cfg.services[0].affinity_timeout = affinity;
        let tables = worker_common::table_builder().build(&cfg).unwrap();
        let svc = tables.services()[0].clone();
        let hasher = lb_hash::FlowHasher::new(node().hash_seed);
        let mut w = Worker::new(tables, WorkerConfig::single_core(1 << 14));
        let mut per_backend = [0u32; 5];
        for i in 0..2000 {
            let (c, sport) = (client(i), 1000 + (i % 7) as u16);
            let h = match affinity {
                None => hasher.five_tuple(c, v4(VIP), 6, sport, 80),
                Some(_) => hasher.source(c),
            };
            let want = svc.scheduler.likely_pick(h).map(|bi| svc.backends[bi].mac[5]).unwrap();
            let (v, out) = run(&mut w, &tcp(c, sport, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, want), "flow {i}, affinity {affinity:?}");
            let (_, out) = run(&mut w, &tcp(c, sport, v4(VIP), 80, Tcp::Ack, b""), secs(2));
            assert_eq!(dsr_backend(&out), want);
            per_backend[usize::from(want)] += 1;
        }
        assert_eq!(per_backend[4], 0, "the draining backend takes no new flow");
        assert!(per_backend[2] > 2 * per_backend[1], "weight 4 against 1: {per_backend:?}");
    }
}

/// The frames of one burst see what the frames before them did to conntrack, although the warm-up
/// read every frame's bucket (and chose the way each new flow's insert would take) before any was
/// decided: with a single 8-way bucket, a SYN repeated later in the burst finds the entry its
/// first copy made, an ACK after it finds the flow, and new flows beyond the bucket's ways evict
/// the half-open entries that frames before them inserted. (Debug builds also check every way an
/// insert takes from the warm-up's choice, and every lookup the warm-up's choice spares, against
/// the answer computed again.)
#[test]
fn a_bursts_frames_see_the_conntrack_changes_of_the_frames_before_them() {
    let cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]);
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(8));
    assert_eq!(w.conntrack().capacity(), 8, "one bucket");
    let syn = |i: u32| tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b"");
    let ack = |i: u32| tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b"");
    // Six flows' SYNs, each sent again six frames later, then the first four flows' ACKs.
    let mut burst: Vec<Vec<u8>> = (0..6).chain(0..6).map(syn).collect();
    burst.extend((0..4).map(ack));
    let out = run_burst(&mut w, &burst, secs(1));
    assert!(out.iter().all(|(v, _)| *v == Verdict::Tx), "{:?}", out.iter().map(|o| o.0).collect::<Vec<_>>());
    // Round robin over four backends: a repeated SYN taken for a new flow would get another one.
    for i in 0..6 {
        assert_eq!(dsr_backend(&out[i].1), dsr_backend(&out[i + 6].1), "flow {i}'s repeated SYN");
    }
    for i in 0..4 {
        assert_eq!(dsr_backend(&out[i].1), dsr_backend(&out[i + 12].1), "flow {i}'s ACK");
    }
    assert_eq!(w.conntrack().len(), 6);
    for i in 0..6u32 {
        let want = if i < 4 { ConnState::Established } else { ConnState::SynSeen };
        assert_eq!(state_of(&w, client(i), 1000).map(|(s, _)| s), Some(want), "flow {i}");
    }
    // Four more flows in one burst: two fill the free ways, two evict the two half-open flows
    // (the oldest half-open first; established flows stay).
    let burst: Vec<Vec<u8>> = (6..10).map(syn).collect();
    let out = run_burst(&mut w, &burst, secs(2));
    assert!(out.iter().all(|(v, _)| *v == Verdict::Tx));
    assert_eq!(w.conntrack().len(), 8);
    assert_eq!(w.stats().conntrack_evictions, 2);
    for i in 0..10u32 {
        let want = match i {
            0..4 => Some(ConnState::Established),
            4..6 => None,
            _ => Some(ConnState::SynSeen),
        };
        assert_eq!(state_of(&w, client(i), 1000).map(|(s, _)| s), want, "flow {i}");
    }
}

/// Under the drop policy, a flow the client had already closed (its FIN seen: closing; or
/// time-wait) when its backend left is buried closed: the tombstone lasts the close timeout, which
/// later packets do not extend, and the client's SYN reusing the port starts a new flow, as on a
/// time-wait flow. (The tombstone took the flow's idle timeout, renewed by each straggling ACK, and
/// dropped the client's next connection on that port meanwhile.)
#[test]
fn drop_policy_buries_a_flow_the_client_closed_as_closed() {
    for rst in [false, true] {
        let (mut w, mut cfg, on, mut b) = drop_policy_setup(1024, 1);
        assert_eq!(on, vec![1]);
        let c = client(0);
        let close = if rst { Tcp::Rst } else { Tcp::Fin };
        assert_eq!(run(&mut w, &tcp(c, 1000, v4(VIP), 80, close, b""), secs(2)).0, Verdict::Tx);
        remove_first_backend(&mut w, &mut cfg, &mut b);
        // The client's ACK of the backend's FIN (DSR: never seen here) finds the backend gone.
        let ack = tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"");
        assert_eq!(run(&mut w, &ack, secs(3)).0, Verdict::Drop(DropReason::BackendRemoved));
        let (state, expires) = state_of(&w, c, 1000).unwrap();
        assert_eq!(state, ConnState::BackendGone);
        assert!(expires <= 3 + 30, "rst {rst}: the closed flow's tombstone lives until {expires}");
        assert_eq!(run(&mut w, &ack, secs(20)).0, Verdict::Drop(DropReason::BackendRemoved));
        assert!(state_of(&w, c, 1000).unwrap().1 <= 33, "rst {rst}: a straggler extended the tombstone");
        // The client reuses its port for a new connection: scheduled.
        let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(21));
        assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2), "rst {rst}");
    }
    // The same when that SYN is the first packet after the backend left.
    let (mut w, mut cfg, _, mut b) = drop_policy_setup(1024, 1);
    let c = client(0);
    run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Fin, b""), secs(2));
    remove_first_backend(&mut w, &mut cfg, &mut b);
    let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(3));
    assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, 2));
    assert_eq!(state_of(&w, c, 1000).map(|s| s.0), Some(ConnState::SynSeen));
}

/// A clock that steps back (a replayed capture's timestamps out of order) never brings an expired
/// NAT flow back to life after its reverse entry was reclaimed: the worker keeps its time from going
/// backwards, so a packet of such a flow starts a new flow, whose replies reach the client. (The
/// sweep reclaims the reverse entry of an expired forward entry in another bucket first; the
/// revived flow was then forwarded from a SNAT port whose replies were dropped, or, once the port
/// went to another flow to the same backend, delivered to that flow's client.)
#[test]
fn time_stepping_back_never_revives_an_expired_nat_flow() {
    let mut cfg = all_modes_config();
    cfg.node.timeouts.udp = dur(20);
    for j in 0..16 {
        // Eight buckets, four swept a burst.
        let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(64));
        let c = client(1000 + j);
        assert_eq!(run(&mut w, &udp(c, 1000, v4(VIP), 80, b"q"), secs(100)).0, Verdict::Tx);
        // The flow expires at 120; a burst then sweeps the other half of the table.
        run(&mut w, &udp(client(1), 53, v4("192.0.2.99"), 80, b"pass"), secs(120));
        // The clock steps back a second.
        let (v, out) = run(&mut w, &udp(c, 1000, v4(VIP), 80, b"q"), secs(119));
        assert_eq!(v, Verdict::Tx);
        let s = seen(&out);
        let (v, _) = run(&mut w, &udp(s.dst, s.dport, s.src, s.sport, b"r"), secs(119));
        assert_eq!(v, Verdict::Tx, "client {j}: the reply to the flow's SNAT port {} found no flow", s.sport);
    }
}

/// A client's SYN on a flow it already has goes to a backend that takes new flows: on a half-open
/// flow (its SYN retransmitted: the backend has not answered), an established one (a new connection on
/// the 5-tuple) or a closing one (a new connection), it stays with (or restarts on) the flow's backend
/// while that backend takes new flows; once the backend is draining or at weight 0 (a health check
/// took it down, its pod is not ready), the SYN is scheduled afresh, as on a time-wait flow. Before,
/// SYNs on half-open and established flows stayed with a draining backend, each renewing the flow's
/// entry, so a client whose first SYN reached a backend just before it went down retried there until
/// it gave up.
#[test]
fn a_syn_on_a_known_flow_of_a_draining_backend_is_scheduled_afresh() {
    for state in ["half-open", "established", "closing"] {
        for change in ["none", "drain", "weight 0"] {
            let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2"]);
            let mut b = worker_common::table_builder();
            let mut w = Worker::new(b.build(&cfg).unwrap(), WorkerConfig::single_core(1024));
            let c = client(1);
            let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1));
            assert_eq!(dsr_backend(&out), 1);
            if state != "half-open" {
                run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1));
            }
            if state == "closing" {
                run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Fin, b""), secs(2));
            }
            match change {
                "drain" => cfg.services[0].backends[0].state = BackendState::Draining,
                "weight 0" => cfg.services[0].backends[0].weight = 0,
                _ => {}
            }
            w.swap_tables(b.build(&cfg).unwrap());
            let case = format!("{state}, {change}");
            if state == "closing" {
                // The closing flow's own packets still reach its backend.
                let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(3));
                assert_eq!(dsr_backend(&out), 1, "{case}");
            }
            let want = if change == "none" { 1 } else { 2 };
            let (v, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Syn, b""), secs(3));
            assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, want), "{case}");
            let slots: Vec<_> = w.tables().services()[0].backends.iter().map(|b| b.slot()).collect();
            let counts: Vec<(u64, u64)> = slots
                .iter()
                .map(|&s| (w.stats().backend(s).active_conns, w.stats().backend(s).established_conns))
                .collect();
            let on_first = u64::from(want == 1);
            let kept_established = u64::from(want == 1 && state == "established");
            assert_eq!(counts, vec![(on_first, kept_established), (1 - on_first, 0)], "{case}");
            // The new connection's packets stay where its SYN went.
            run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b""), secs(3));
            let (_, out) = run(&mut w, &tcp(c, 1000, v4(VIP), 80, Tcp::Ack, b"data"), secs(4));
            assert_eq!(dsr_backend(&out), want, "{case}");
        }
    }
}

/// Stray RSTs and FINs to a full-NAT service (a flood of them, spoofed) each open a flow that holds
/// a SNAT port for the time-wait or FIN timeout. Once they hold every port tried, a new flow takes
/// the port of the oldest of them, after any half-open flow's and never an established flow's, as
/// conntrack evicts for room. Before, only half-open flows gave their ports up, and such a flood
/// shut new connections out for two minutes.
#[test]
fn stray_rsts_and_fins_holding_every_snat_port_give_way_after_half_open_flows() {
    let cfg = one_backend_nat(40007);
    let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1024));
    let slot = w.tables().services()[0].backends[0].slot();
    let mut port_of = std::collections::HashMap::new();
    let mut open = |w: &mut Worker, i: u32, flags: Tcp, at: u64| {
        let (v, out) = run(w, &tcp(client(i), 1000, v4(VIP), 80, flags, b""), secs(at));
        assert_eq!(v, Verdict::Tx, "client {i}");
        port_of.insert(i, seen(&out).sport);
    };
    // Two established connections; stray RSTs from clients 2-4, FINs from 5-6, one SYN from 7.
    for i in 0..2 {
        open(&mut w, i, Tcp::Syn, 1);
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1)).0, Verdict::Tx);
    }
    for (i, flags) in [(2, Tcp::Rst), (3, Tcp::Rst), (4, Tcp::Rst), (5, Tcp::Fin), (6, Tcp::Fin), (7, Tcp::Syn)] {
        open(&mut w, i, flags, 1 + u64::from(i));
    }
    assert_eq!(w.stats().backend(slot).active_conns, 8);
    // Each new client (its connection established at once) takes, in turn, the port of the SYN,
    // then of the stray RSTs and FINs, oldest first.
    for (k, (i, evicted)) in [(100, 7), (101, 2), (102, 3), (103, 4), (104, 5), (105, 6)].into_iter().enumerate() {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(20));
        assert_eq!(v, Verdict::Tx, "client {i}");
        assert_eq!(seen(&out).sport, port_of[&evicted], "client {i} took the port of client {evicted}");
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(20)).0, Verdict::Tx);
        assert_eq!(w.stats().snat_port_evictions, k as u64 + 1);
    }
    assert_eq!(w.stats().backend(slot).active_conns, 8);
    // Established flows hold every port now.
    let (v, _) = run(&mut w, &tcp(client(200), 1000, v4(VIP), 80, Tcp::Rst, b""), secs(21));
    assert_eq!(v, Verdict::Drop(DropReason::NoSnatPort));
    for i in 0..2 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b"x"), secs(21));
        assert_eq!((v, seen(&out).sport), (Verdict::Tx, port_of[&i]), "established client {i} kept its port");
    }
}

/// A SNAT port held by a NAT flow that has expired is free for a new flow, whether or not the sweep
/// has reached the flow's entries yet (in a large table it takes many bursts to come round): the
/// port search took the expired flow's reply key for a live one, and with every port of the share
/// so held, new flows were dropped as out of ports while no flow used any.
#[test]
fn snat_ports_of_expired_flows_are_free_before_the_sweep_reclaims_them() {
    let mut cfg = one_backend_nat(40003);
    cfg.node.timeouts.tcp_syn = dur(10);
    cfg.node.timeouts.tcp_established = dur(10);
    // 8192 buckets: the sweep (four a burst) reaches few of them here.
    let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(1 << 16));
    // Established, so that a new flow cannot evict them for their ports.
    for i in 0..4 {
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1)).0, Verdict::Tx);
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(1)).0, Verdict::Tx);
    }
    assert_eq!(
        run(&mut w, &tcp(client(9), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(2)).0,
        Verdict::Drop(DropReason::NoSnatPort),
        "four live flows hold the four ports"
    );
    // Long after those flows expired, new flows take their ports, with working replies.
    let slot = w.tables().services()[0].backends[0].slot();
    for i in 10..14 {
        let (v, out) = run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(100));
        assert_eq!(v, Verdict::Tx, "client {i}");
        let s = seen(&out);
        let (v, _) = run(&mut w, &tcp(s.dst, 8080, s.src, s.sport, Tcp::Ack, b""), secs(100));
        assert_eq!(v, Verdict::Tx, "client {i}: the reply to port {}", s.sport);
        assert_eq!(run(&mut w, &tcp(client(i), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(100)).0, Verdict::Tx);
    }
    assert_eq!(w.stats().snat_port_evictions, 0, "expired flows' ports are free, not evicted for");
    // The expired flows' packets start new flows; none finds a port (four live flows again).
    let (v, _) = run(&mut w, &tcp(client(0), 1000, v4(VIP), 80, Tcp::Ack, b""), secs(101));
    assert_eq!(v, Verdict::Drop(DropReason::NoSnatPort));
    // Once everything is reclaimed, each backend count is exact.
    for _ in 0..4096 {
        w.process_burst(&mut [], secs(100_000), &mut []);
    }
    assert_eq!((w.conntrack().len(), w.stats().backend(slot).active_conns), (0, 0));
}

/// An affinity record left out for want of room (its bucket full of live entries, which a record
/// never evicts) is counted: the client's next flow may then go to another backend, and the
/// counter says why. A record that finds room is not counted.
#[test]
fn an_affinity_record_that_finds_no_room_is_counted() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    cfg.services[0].affinity_timeout = Some(dur(100));
    // One 8-way bucket.
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(8));
    // A first client's flow and its record take two ways.
    assert_eq!(run(&mut w, &tcp(client(100), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(1)).0, Verdict::Tx);
    assert_eq!((w.conntrack().len(), w.stats().affinity_not_recorded), (2, 0));
    // Five UDP flows of the other service, each seen once (half-open), leave one way.
    for i in 0..5 {
        assert_eq!(run(&mut w, &udp(client(i), 1000, v4(VIP), 80, b"q"), secs(1)).0, Verdict::Tx);
    }
    // A second client's flow takes it; its record finds none.
    let (v, out) = run(&mut w, &tcp(client(101), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(2));
    assert_eq!(v, Verdict::Tx);
    let first = dsr_backend(&out);
    assert_eq!(w.stats().affinity_not_recorded, 1);
    assert_eq!(w.stats().conntrack_evictions, 0);
    // Its next flow (room made by evicting a half-open UDP flow) has no record to follow: round
    // robin gives it another backend, and its record is left out again.
    let (v, out) = run(&mut w, &tcp(client(101), 1001, v4(VIP), 80, Tcp::Syn, b""), secs(3));
    assert_eq!(v, Verdict::Tx);
    assert_ne!(dsr_backend(&out), first, "no record kept it on its backend");
    assert_eq!((w.stats().conntrack_evictions, w.stats().affinity_not_recorded), (1, 2));
    // Summed over cores like the other counters.
    let mut total = w.stats().clone();
    total.merge(w.stats());
    assert_eq!(total.affinity_not_recorded, 4);
}

/// A ClientIP affinity record is best effort: in a bucket with no free or expired way it is left
/// out rather than evicting another client's flow (its half-open or closing entry, whose next
/// packet would then be scheduled afresh, perhaps to another backend).
#[test]
fn an_affinity_record_never_evicts_a_flow() {
    let mut cfg = dsr_config(SchedulerKind::RoundRobin, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    cfg.services[0].affinity_timeout = Some(dur(100));
    // One 8-way bucket.
    let mut w = Worker::new(worker_common::table_builder().build(&cfg).unwrap(), WorkerConfig::single_core(8));
    // Seven UDP flows of the other service, each seen once (half-open).
    let mut on = vec![];
    for i in 0..7 {
        let (v, out) = run(&mut w, &udp(client(i), 1000, v4(VIP), 80, b"q"), secs(1));
        assert_eq!(v, Verdict::Tx);
        on.push(dsr_backend(&out));
    }
    // A new TCP flow of the affinity service takes the eighth way.
    assert_eq!(run(&mut w, &tcp(client(100), 1000, v4(VIP), 80, Tcp::Syn, b""), secs(2)).0, Verdict::Tx);
    assert_eq!(w.stats().conntrack_evictions, 0, "the affinity record evicted a flow");
    for i in 0..7 {
        let (v, out) = run(&mut w, &udp(client(i), 1000, v4(VIP), 80, b"q"), secs(3));
        assert_eq!((v, dsr_backend(&out)), (Verdict::Tx, on[i as usize]), "flow {i}");
    }
}
