//! Property tests of the worker: established flows keep their backend whatever backends are added or
//! re-weighted, conntrack never exceeds its capacity and its per-backend counts stay exact, a bad
//! configuration is rejected whole while the old tables keep serving, full NAT's ports stay unique
//! and paired, and a burst is decided exactly as its frames one by one.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use lb_core::config::{Config, ForwardMode, Protocol, SchedulerKind};
use lb_core::conntrack::{ConnKey, ConnState, Entry, EntryKind};
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
        let mut b = worker_common::table_builder();
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
        let mut b = worker_common::table_builder();
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

/// One step of [`full_nat_ports_stay_unique_and_paired`]: a client's frame (clients of a small
/// pool, each from port 1000), a backend's reply to a SNAT port, a burst of several, or time.
#[derive(Debug, Clone)]
enum NatStep {
    Syn(u32),
    Ack(u32),
    Fin(u32),
    Rst(u32),
    Udp(u32),
    /// From backend `.0` (modulo the backends), to SNAT port offset `.1`, UDP if `.2`, with TCP
    /// flags `.3` (an ACK, a FIN or an RST).
    Reply(usize, u16, bool, Tcp),
    /// Several of the above as one burst.
    Burst(Vec<NatStep>),
    Wait(u64),
}

fn nat_frame() -> impl Strategy<Value = NatStep> {
    let c = 0u32..6;
    prop_oneof![
        4 => c.clone().prop_map(NatStep::Syn),
        3 => c.clone().prop_map(NatStep::Ack),
        1 => c.clone().prop_map(NatStep::Fin),
        1 => c.clone().prop_map(NatStep::Rst),
        2 => c.prop_map(NatStep::Udp),
        3 => (0usize..3, 0u16..8, any::<bool>(), prop_oneof![6 => Just(Tcp::Ack), 1 => Just(Tcp::Fin), 1 => Just(Tcp::Rst)])
            .prop_map(|(b, p, u, f)| NatStep::Reply(b, p, u, f)),
    ]
}

fn nat_step() -> impl Strategy<Value = NatStep> {
    prop_oneof![
        12 => nat_frame(),
        // Up to 20 frames: a burst's second batch too (16 frames are decided together).
        2 => proptest::collection::vec(nat_frame(), 2..20).prop_map(NatStep::Burst),
        // Mostly short; sometimes past the SYN and UDP timeouts, sometimes past every timeout.
        3 => prop_oneof![4 => 0u64..3, 2 => Just(5u64), 1 => Just(15u64)].prop_map(NatStep::Wait),
    ]
}

/// The live forward entries of NAT flows (not tombstones) among `entries` (index and entry).
fn live_nat_flows(w: &Worker, entries: &[(u32, Entry)], now: u32) -> Vec<(u32, Entry)> {
    let forward = |e: &Entry| e.kind == EntryKind::Forward && e.state != ConnState::BackendGone;
    entries.iter().filter(|(i, e)| forward(e) && w.conntrack().is_live(*i, now)).copied().collect()
}

fn entries_of(w: &Worker) -> Vec<(u32, Entry)> {
    w.conntrack().iter().map(|(i, e)| (i, *e)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Full NAT with a share of a few SNAT ports, a few backends and small timeouts, under SYNs
    /// (more than there are ports), ACKs, closes, UDP, the backends' replies to any port, bursts
    /// and time: after every step, no two live flows to one backend hold one SNAT port; every live
    /// NAT flow's reverse entry is keyed by its backend, SNAT address and port and links back; each
    /// backend's counts are its entries; an established flow keeps its backend and port while it
    /// lives; the table stays within its capacity; and a reply to a port reaches exactly the
    /// client whose flow holds it.
    #[test]
    fn full_nat_ports_stay_unique_and_paired(
        v6 in any::<bool>(),
        ports in 4u16..9,
        backends in 1usize..4,
        // Small tables (every bucket swept every few bursts) and one whose sweep comes round
        // rarely, where expired flows keep their entries and ports until a new flow needs them.
        capacity in prop_oneof![8usize..48, Just(4096)],
        steps in proptest::collection::vec(nat_step(), 1..120),
    ) {
        let (vip, bases): (&str, [&str; 3]) = if v6 {
            ("2001:db8::1", ["fd00:1::1", "fd00:1::2", "fd00:1::3"])
        } else {
            (VIP, ["10.1.0.1", "10.1.0.2", "10.1.0.3"])
        };
        let client = |i: u32| if v6 { IpAddr::V6(std::net::Ipv6Addr::from(0x2001_0db8_0000_0000_0000_0000_0000_0100 + u128::from(i))) } else { client(i) };
        let backend_list: Vec<_> = bases[..backends].iter().map(|a| backend(a, 8080)).collect();
        let mut cfg = Config {
            node: node(),
            services: vec![
                service("tcp", vip, 80, Protocol::Tcp, ForwardMode::Nat, backend_list.clone()),
                service("udp", vip, 80, Protocol::Udp, ForwardMode::Nat, backend_list),
            ],
        };
        cfg.node.snat_ports = (40000, 40000 + ports - 1);
        let t = &mut cfg.node.timeouts;
        (t.tcp_syn, t.tcp_established, t.tcp_fin, t.tcp_time_wait, t.udp) = (dur(4), dur(12), dur(4), dur(3), dur(6));
        let snat = if v6 { v4("fd00::100") } else { v4("10.0.0.100") };
        let vip = v4(vip);
        let mut w = Worker::new(build(&cfg), WorkerConfig::single_core(capacity));
        let cap = w.conntrack().capacity();
        // The TCP service's backends, then the UDP service's (the same addresses).
        let backend_refs: Vec<_> = w.tables().services().iter().flat_map(|s| s.backends.iter()).map(|b| (b.id, b.slot(), b.addr, b.port)).collect();
        let frame = |s: &NatStep| -> Vec<u8> {
            match *s {
                NatStep::Syn(c) => tcp(client(c), 1000, vip, 80, Tcp::Syn, b""),
                NatStep::Ack(c) => tcp(client(c), 1000, vip, 80, Tcp::Ack, b""),
                NatStep::Fin(c) => tcp(client(c), 1000, vip, 80, Tcp::Fin, b""),
                NatStep::Rst(c) => tcp(client(c), 1000, vip, 80, Tcp::Rst, b""),
                NatStep::Udp(c) => udp(client(c), 1000, vip, 80, b"u"),
                NatStep::Reply(b, p, u, f) => {
                    let (_, _, addr, port) = backend_refs[b % backends];
                    let dport = 40000 + p % ports;
                    if u { udp(addr, port, snat, dport, b"r") } else { tcp(addr, port, snat, dport, f, b"") }
                }
                NatStep::Burst(_) | NatStep::Wait(_) => unreachable!(),
            }
        };
        let mut now = 1u64;
        // Per client 5-tuple (key), the live established flows' (backend, SNAT port, expiry).
        let mut established: HashMap<ConnKey, (lb_core::service::BackendRef, u16, u32)> = HashMap::new();
        for step in &steps {
            match step {
                NatStep::Wait(s) => {
                    now += s;
                    w.process_burst(&mut [], secs(now), &mut []);
                }
                NatStep::Burst(frames) => {
                    let frames: Vec<Vec<u8>> = frames.iter().map(frame).collect();
                    run_burst(&mut w, &frames, secs(now));
                }
                NatStep::Reply(b, p, u, _) => {
                    // Exactly the flow holding the port (to that backend, of that protocol) gets it.
                    let port = 40000 + p % ports;
                    let proto = if *u { 17 } else { 6 };
                    let (id, ..) = backend_refs[b % backends + if *u { backends } else { 0 }];
                    let holders: Vec<_> = live_nat_flows(&w, &entries_of(&w), now as u32)
                        .into_iter()
                        .filter(|(_, e)| e.backend == id && e.snat_port == port && e.key.proto == proto)
                        .collect();
                    prop_assert!(holders.len() <= 1, "port {} held by {:?}", port, holders);
                    let (v, out) = run(&mut w, &frame(step), secs(now));
                    match holders.first() {
                        Some((_, e)) => {
                            prop_assert_eq!(v, Verdict::Tx, "reply to port {} of {:?}", port, e);
                            let s = seen(&out);
                            prop_assert_eq!((s.src, s.sport, s.dst, s.dport), (vip, 80, e.key.src_ip(), e.key.sport));
                        }
                        None => prop_assert_eq!(v, Verdict::Drop(lb_core::stats::DropReason::NoReverseFlow), "reply to free port {}", port),
                    }
                }
                s => {
                    run(&mut w, &frame(s), secs(now));
                }
            }
            let now = now as u32;
            let ct = w.conntrack();
            let entries = entries_of(&w);
            // (e) The table never grows past its capacity.
            prop_assert!(ct.len() <= cap);
            prop_assert_eq!(entries.len(), ct.len());
            let live = live_nat_flows(&w, &entries, now);
            // (a) No two live flows to one backend (address and port, of one protocol) hold one
            // SNAT port.
            let mut holders = HashMap::new();
            for (i, e) in &live {
                let (_, _, addr, port) = *backend_refs.iter().find(|b| b.0 == e.backend).unwrap();
                if let Some(other) = holders.insert((addr, port, e.key.proto, e.snat_port), *i) {
                    prop_assert!(false, "SNAT port {} held by entries {} and {}", e.snat_port, other, i);
                }
            }
            // (b) Each live NAT flow's reverse entry: keyed by its reply flow, linking back, live.
            for (i, e) in &live {
                let (_, _, addr, port) = *backend_refs.iter().find(|b| b.0 == e.backend).unwrap();
                let r = ct.get(e.link);
                prop_assert!(r.is_some(), "flow {} ({:?}) has no reverse entry", i, e);
                let r = r.unwrap();
                prop_assert_eq!(r.kind, EntryKind::Reverse);
                prop_assert_eq!(r.key, ConnKey::flow(addr, snat, port, e.snat_port, e.key.proto));
                prop_assert_eq!(r.link, *i);
                prop_assert!(ct.is_live(e.link, now));
            }
            // Every reverse entry links to a forward entry that links back (none dangles).
            for (i, e) in &entries {
                let i = *i;
                if e.kind == EntryKind::Reverse {
                    let f = ct.get(e.link);
                    prop_assert!(f.is_some_and(|f| f.kind == EntryKind::Forward && f.link == i), "dangling reverse entry {} {:?}", i, e);
                }
            }
            // (c) Each backend's counts are its forward entries (tombstones and reverse entries aside).
            for (id, slot, ..) in &backend_refs {
                let mine = || entries.iter().filter(|(_, e)| e.kind == EntryKind::Forward && e.state != ConnState::BackendGone && e.backend == *id);
                let c = w.stats().backend(*slot);
                prop_assert_eq!(c.active_conns, mine().count() as u64);
                prop_assert_eq!(c.established_conns, mine().filter(|(_, e)| e.state == ConnState::Established).count() as u64);
            }
            // (d) An established flow that has not expired keeps its backend and SNAT port (unless
            // its client closed it in this step: a closing flow may be evicted for room by a frame
            // after it in the burst, and a SYN after an RST starts a new flow on the 5-tuple).
            // (The same for a flow whose backend's FIN or RST came in this step.)
            let closes = |f: &NatStep| match *f {
                NatStep::Fin(c) | NatStep::Rst(c) => Some(Ok(c)),
                NatStep::Reply(b, p, false, Tcp::Fin | Tcp::Rst) => Some(Err((backend_refs[b % backends].0, 40000 + p % ports))),
                _ => None,
            };
            let closed: Vec<_> = match step {
                NatStep::Burst(frames) => frames.iter().filter_map(closes).collect(),
                s => closes(s).into_iter().collect(),
            };
            for (key, (backend, port, expires)) in &established {
                let by_either = |c: &Result<u32, _>| match *c {
                    Ok(c) => key.src_ip() == client(c),
                    Err(held) => key.proto == 6 && held == (*backend, *port),
                };
                if now < *expires && !closed.iter().any(by_either) {
                    let e = entries.iter().find(|(_, e)| e.kind == EntryKind::Forward && e.key == *key).map(|(_, e)| *e);
                    prop_assert!(e.is_some(), "established flow {:?} lost its entry", key);
                    let e = e.unwrap();
                    prop_assert_eq!((e.backend, e.snat_port), (*backend, *port), "established flow {:?} moved", key);
                }
            }
            established = live
                .iter()
                .filter(|(_, e)| e.state == ConnState::Established)
                .map(|(_, e)| (e.key, (e.backend, e.snat_port, e.expires)))
                .collect();
        }
    }
}

/// A frame of [`a_burst_decides_as_its_frames_one_by_one`]: a client's (client `c` of a small
/// pool, IPv6 if `v6`, from port `1000 + sport`, to the NAT service (port 80) or the DSR one (81);
/// `what`: SYN, ACK, FIN, RST or UDP), or a backend's reply to SNAT port offset `port` (`what`:
/// ACK, FIN, RST or UDP).
#[derive(Debug, Clone)]
enum BurstFrame {
    Client { c: u32, v6: bool, sport: u16, nat: bool, what: u8 },
    Reply { b: usize, v6: bool, port: u16, what: u8 },
}

/// A step of [`a_burst_decides_as_its_frames_one_by_one`].
#[derive(Debug, Clone)]
enum BurstStep {
    Burst(Vec<BurstFrame>),
    /// Time passes (then every expired entry is reclaimed, on both workers).
    Wait(u64),
    /// New tables: see `burst_config`.
    Swap(u8),
}

fn burst_frame() -> impl Strategy<Value = BurstFrame> {
    prop_oneof![
        3 => (0u32..5, any::<bool>(), 0u16..2, prop_oneof![3 => Just(true), 1 => Just(false)], prop_oneof![4 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8), 2 => Just(4u8)])
            .prop_map(|(c, v6, sport, nat, what)| BurstFrame::Client { c, v6, sport, nat, what }),
        2 => (0usize..3, any::<bool>(), 0u16..6, prop_oneof![5 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 2 => Just(3u8)])
            .prop_map(|(b, v6, port, what)| BurstFrame::Reply { b, v6, port, what }),
    ]
}

fn burst_step() -> impl Strategy<Value = BurstStep> {
    prop_oneof![
        // Up to 40 frames: three batches of a burst.
        8 => proptest::collection::vec(burst_frame(), 1..40).prop_map(BurstStep::Burst),
        3 => prop_oneof![3 => 1u64..3, 1 => Just(4u64), 1 => Just(13u64)].prop_map(BurstStep::Wait),
        1 => (0u8..4).prop_map(BurstStep::Swap),
    ]
}

/// The tables of [`a_burst_decides_as_its_frames_one_by_one`]: NAT (port 80) and DSR (81)
/// services, TCP and UDP, IPv4 and IPv6, of three backends each, a few SNAT ports and short
/// timeouts. `variant` 0: every backend, reschedule; 1: the first backend removed, drop; 2: the
/// first removed, reschedule; 3: the first draining, drop.
fn burst_config(ports: u16, variant: u8) -> Config {
    use lb_core::config::{BackendState, RemovedBackendPolicy};
    let mut services = vec![];
    for (vip, bases) in
        [(VIP, ["10.1.0.1", "10.1.0.2", "10.1.0.3"]), ("2001:db8::1", ["fd00:1::1", "fd00:1::2", "fd00:1::3"])]
    {
        for (port, mode) in [(80, ForwardMode::Nat), (81, ForwardMode::Dsr)] {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                let bport = if mode == ForwardMode::Nat { 8080 } else { port };
                let mut backends: Vec<_> = bases.iter().map(|a| backend(a, bport)).collect();
                match variant {
                    1 | 2 => {
                        backends.remove(0);
                    }
                    3 => backends[0].state = BackendState::Draining,
                    _ => {}
                }
                let mut s = service(&format!("{vip}-{port}-{proto:?}"), vip, port, proto, mode, backends);
                // The smallest Maglev table for three backends: built at every swap of every case.
                s.maglev_table_size = Some(307);
                s.on_backend_removed =
                    if variant % 2 == 1 { RemovedBackendPolicy::Drop } else { RemovedBackendPolicy::Reschedule };
                services.push(s);
            }
        }
    }
    let mut cfg = Config { node: node(), services };
    cfg.node.snat_ports = (40000, 40000 + ports - 1);
    let t = &mut cfg.node.timeouts;
    (t.tcp_syn, t.tcp_established, t.tcp_fin, t.tcp_time_wait, t.udp) = (dur(4), dur(12), dur(4), dur(3), dur(6));
    cfg
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A burst is decided exactly as its frames one by one, in tables of one to four buckets where
    /// new flows contend for ways and SNAT ports: a flow's frames, its NAT replies and other
    /// flows' in one burst, so the warm-up's insert and reply hints are stale by the time of their
    /// frame wherever an earlier frame inserted, evicted, removed, re-opened or buried an entry of
    /// the same bucket; with time passing and backends removed (drop and reschedule policies) or
    /// draining. After every burst the two workers' verdicts, frames, connection tables (every
    /// entry at its index) and counters are equal. (Time passes between bursts only, with every
    /// expired entry reclaimed then on both, so the sweep each burst makes has nothing to find and
    /// the one-by-one worker's many sweeps change nothing.) Debug builds also check each hint the
    /// insert takes against the choice made afresh. (Fails at once when `find_hinted` trusts a hint
    /// whose bucket has changed since: a flow's second frame in a burst is then a new flow.)
    #[test]
    fn a_burst_decides_as_its_frames_one_by_one(
        ports in 2u16..7,
        capacity in prop_oneof![Just(8usize), Just(16), Just(32)],
        steps in proptest::collection::vec(burst_step(), 1..40),
    ) {
        let mut builder = worker_common::table_builder();
        let tables = builder.build(&burst_config(ports, 0)).unwrap();
        let (mut burst_w, mut one_w) = (
            Worker::new(tables.clone(), WorkerConfig::single_core(capacity)),
            Worker::new(tables, WorkerConfig::single_core(capacity)),
        );
        let snat = |v6: bool| if v6 { v4("fd00::100") } else { v4("10.0.0.100") };
        let frame = |f: &BurstFrame| -> Vec<u8> {
            match *f {
                BurstFrame::Client { c, v6, sport, nat, what } => {
                    let (src, vip) = if v6 {
                        (IpAddr::V6(std::net::Ipv6Addr::from(0x2001_0db8_00ff_0000_0000_0000_0000_0100 + u128::from(c))), v4("2001:db8::1"))
                    } else {
                        (client(c), v4(VIP))
                    };
                    let dport = if nat { 80 } else { 81 };
                    let flags = [Tcp::Syn, Tcp::Ack, Tcp::Fin, Tcp::Rst];
                    match what {
                        4 => udp(src, 1000 + sport, vip, dport, b"u"),
                        w => tcp(src, 1000 + sport, vip, dport, flags[usize::from(w)], b""),
                    }
                }
                BurstFrame::Reply { b, v6, port, what } => {
                    let addr = if v6 { format!("fd00:1::{}", b + 1) } else { format!("10.1.0.{}", b + 1) };
                    let dport = 40000 + port % ports;
                    let flags = [Tcp::Ack, Tcp::Fin, Tcp::Rst];
                    match what {
                        3 => udp(v4(&addr), 8080, snat(v6), dport, b"r"),
                        w => tcp(v4(&addr), 8080, snat(v6), dport, flags[usize::from(w)], b""),
                    }
                }
            }
        };
        let mut now = 1u64;
        for (n, step) in steps.iter().enumerate() {
            match step {
                BurstStep::Wait(s) => {
                    now += s;
                    for w in [&mut burst_w, &mut one_w] {
                        w.sweep(secs(now), usize::MAX);
                    }
                }
                BurstStep::Swap(variant) => {
                    let tables = builder.build(&burst_config(ports, *variant)).unwrap();
                    burst_w.swap_tables(tables.clone());
                    one_w.swap_tables(tables);
                }
                BurstStep::Burst(frames) => {
                    let frames: Vec<Vec<u8>> = frames.iter().map(frame).collect();
                    let together = run_burst(&mut burst_w, &frames, secs(now));
                    let alone: Vec<_> = frames.iter().map(|f| run(&mut one_w, f, secs(now))).collect();
                    for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
                        prop_assert_eq!(a, b, "step {}, frame {}", n, i);
                    }
                }
            }
            let entries = |w: &Worker| w.conntrack().iter().map(|(i, e)| (i, *e)).collect::<Vec<_>>();
            prop_assert_eq!(entries(&burst_w), entries(&one_w), "step {}", n);
            prop_assert_eq!(burst_w.stats(), one_w.stats(), "step {}", n);
        }
    }
}
