//! Each scheduler against the behaviour its ipvsadm name promises.
#![allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]

use alloc::vec;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr};

use lb_hash::FlowHasher;

use super::*;
use crate::config::BackendState;
use crate::service::{Backend, BackendRef};
use crate::stats::{BackendCounters, BackendLine};

fn backends(weights: &[u32]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Backend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1)),
            port: 80,
            weight: w,
            state: BackendState::Active,
            mac: [0; 6],
            id: BackendRef { slot: i as u32, generation: 1 },
        })
        .collect()
}

fn flow(client: u32, sport: u16) -> FlowInput {
    let hasher = FlowHasher::new(1);
    let src = IpAddr::V4(Ipv4Addr::from(0xc633_6400 | client));
    let dst = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    FlowInput { src, dst, proto: 6, sport, dport: 80, flow_hash: hasher.five_tuple(src, dst, 6, sport, 80), hasher }
}

fn picks(kind: SchedulerKind, b: &[Backend], conns: &[BackendLine], n: usize) -> Vec<usize> {
    let s = ServiceScheduler::build(kind, b, None).unwrap();
    let mut cursor = 0;
    (0..n)
        .map(|i| {
            let mut core = CoreState { cursor: &mut cursor, conns };
            s.pick(&flow(i as u32, 1000u16.wrapping_add(i as u16)), b, &mut core).unwrap()
        })
        .collect()
}

/// Counters with `active` tracked entries.
fn conns(active: &[u64]) -> Vec<BackendLine> {
    conns_established(&active.iter().map(|&a| (a, 0)).collect::<Vec<_>>())
}

/// The schedulers that pick through an lb-hash selector.
const HASHING: [SchedulerKind; 5] = [
    SchedulerKind::Maglev,
    SchedulerKind::Rendezvous,
    SchedulerKind::Ecmp,
    SchedulerKind::SourceHashing,
    SchedulerKind::DestinationHashing,
];

fn histogram(p: &[usize], n: usize) -> Vec<usize> {
    let mut h = vec![0; n];
    for &i in p {
        h[i] += 1;
    }
    h
}

#[test]
fn round_robin_cycles_over_active_backends_only() {
    let mut b = backends(&[1, 1, 0, 1]);
    b[3].state = BackendState::Draining;
    assert_eq!(picks(SchedulerKind::RoundRobin, &b, &[], 4), vec![0, 1, 0, 1]);
}

#[test]
fn weighted_round_robin_is_proportional_and_interleaved() {
    let b = backends(&[5, 1, 1]);
    let p = picks(SchedulerKind::WeightedRoundRobin, &b, &[], 70);
    assert_eq!(histogram(&p, 3), vec![50, 10, 10]);
    // Interleaved: every window of one period (7 picks) holds exactly the 5:1:1 shares, so the light
    // backends are not starved for a whole run of the heavy one.
    for w in p.windows(7) {
        assert_eq!(histogram(w, 3), vec![5, 1, 1], "{p:?}");
    }
}

#[test]
fn weighted_round_robin_is_exact_for_any_weights() {
    // Huge weights: exactly one pick in 1 000 001 for the light backend, as IPVS gives it.
    let b = backends(&[1_000_000, 1]);
    let p = picks(SchedulerKind::WeightedRoundRobin, &b, &[], 1_000_001);
    assert_eq!(histogram(&p, 2), vec![1_000_000, 1]);
    // Weights 1 to 100 (5 050 a period; a 4 096-entry sequence gave weight 2 38 % less than its
    // share); a weight-0 and a draining backend get nothing. Any window of one period is exact.
    let mut weights: Vec<u32> = (1..=100).collect();
    weights.extend([0, 7]);
    let mut b = backends(&weights);
    b[101].state = BackendState::Draining;
    let p = picks(SchedulerKind::WeightedRoundRobin, &b, &[], 5050 + 777);
    for window in [&p[..5050], &p[777..]] {
        let h = histogram(window, b.len());
        let want: Vec<usize> =
            weights.iter().enumerate().map(|(i, &w)| if i == 101 { 0 } else { w as usize }).collect();
        assert_eq!(h, want);
    }
    // A common divisor does not lengthen the period: 300 and 100 alternate 3:1 in every 4 picks.
    let p = picks(SchedulerKind::WeightedRoundRobin, &backends(&[300, 100]), &[], 40);
    for w in p.windows(4) {
        assert_eq!(histogram(w, 2), vec![3, 1], "{p:?}");
    }
}

/// Counters with `active` tracked entries of which `established` are established TCP connections.
fn conns_established(counts: &[(u64, u64)]) -> Vec<BackendLine> {
    counts
        .iter()
        .map(|&(active, established)| BackendLine {
            counters: BackendCounters { active_conns: active, established_conns: established, ..Default::default() },
            generation: 0,
        })
        .collect()
}

#[test]
fn lc_and_wlc_weigh_an_established_connection_as_256_other_entries() {
    let b = backends(&[1, 1]);
    // Backend 0: 1 established (256); backend 1: 200 half-open or UDP entries (200).
    let c = conns_established(&[(1, 1), (200, 0)]);
    assert_eq!(picks(SchedulerKind::LeastConnections, &b, &c, 1), vec![1]);
    // 300 other entries outweigh one established connection.
    let c = conns_established(&[(1, 1), (300, 0)]);
    assert_eq!(picks(SchedulerKind::LeastConnections, &b, &c, 1), vec![0]);
    // wlc: backend 0 (weight 2) with 1 established = 128 per unit; backend 1 with 2 established
    // + 10 others = 522 per unit.
    let b = backends(&[2, 1]);
    let c = conns_established(&[(1, 1), (12, 2)]);
    assert_eq!(picks(SchedulerKind::WeightedLeastConnections, &b, &c, 1), vec![0]);
    // sed counts entries alike: (1+1)/1 vs (0+1)/1 even though backend 0's entry is not established.
    let b = backends(&[1, 1]);
    let c = conns_established(&[(1, 0), (0, 0)]);
    assert_eq!(picks(SchedulerKind::ShortestExpectedDelay, &b, &c, 1), vec![1]);
}

#[test]
fn least_connections_family_reads_this_cores_counts() {
    let b = backends(&[1, 1, 1]);
    assert_eq!(picks(SchedulerKind::LeastConnections, &b, &conns(&[5, 2, 9]), 1), vec![1]);
    // wlc: 4/4 beats 2/1.
    let b = backends(&[4, 1, 1]);
    assert_eq!(picks(SchedulerKind::WeightedLeastConnections, &b, &conns(&[4, 2, 3]), 1), vec![0]);
    // sed: (0+1)/1 = 1 vs (3+1)/8 = 0.5.
    let b = backends(&[1, 8]);
    assert_eq!(picks(SchedulerKind::ShortestExpectedDelay, &b, &conns(&[0, 3]), 1), vec![1]);
    // nq: the idle backend wins even against a better sed score.
    assert_eq!(picks(SchedulerKind::NeverQueue, &b, &conns(&[0, 3]), 1), vec![0]);
    assert_eq!(picks(SchedulerKind::NeverQueue, &b, &conns(&[1, 3]), 1), vec![1]);
}

#[test]
fn hashing_schedulers_are_deterministic_and_skip_draining() {
    let mut b = backends(&[1, 1, 1, 1]);
    b[2].state = BackendState::Draining;
    for kind in HASHING {
        let p1 = picks(kind, &b, &[], 400);
        let p2 = picks(kind, &b, &[], 400);
        assert_eq!(p1, p2, "{kind}");
        assert!(!p1.contains(&2), "{kind} picked a draining backend");
        if kind != SchedulerKind::DestinationHashing {
            let h = histogram(&p1, 4);
            assert!(h[0] > 50 && h[1] > 50 && h[3] > 50, "{kind} spreads: {h:?}");
        }
    }
}

#[test]
fn source_hashing_and_ecmp_ignore_ports() {
    let b = backends(&[1, 1, 1, 1]);
    for kind in [SchedulerKind::SourceHashing, SchedulerKind::Ecmp] {
        let s = ServiceScheduler::build(kind, &b, None).unwrap();
        let mut cursor = 0;
        for client in 0..50 {
            let mut core = CoreState::new(&mut cursor);
            let a = s.pick(&flow(client, 1000), &b, &mut core);
            let c = s.pick(&flow(client, 2000), &b, &mut core);
            assert_eq!(a, c, "{kind}: one client, one backend");
        }
    }
}

#[test]
fn no_eligible_backend_means_none() {
    let mut b = backends(&[0, 1]);
    b[1].state = BackendState::Draining;
    for kind in SchedulerKind::ALL {
        let s = ServiceScheduler::build(kind, &b, None).unwrap();
        assert_eq!(s.kind(), kind);
        let mut cursor = 0;
        let mut core = CoreState::new(&mut cursor);
        assert_eq!(s.pick(&flow(1, 1), &b, &mut core), None, "{kind}");
    }
    let s = ServiceScheduler::build(SchedulerKind::Maglev, &[], None).unwrap();
    let mut cursor = 0;
    assert_eq!(s.pick(&flow(1, 1), &[], &mut CoreState::new(&mut cursor)), None);
}

/// The hashing schedulers map lb-hash's order (backends sorted by identity) back to the service's
/// order: the same backend set in any order gives every flow the same backend, whether the map is
/// the identity (skipped on the fast path) or not.
#[test]
fn hashing_schedulers_pick_by_backend_not_by_position() {
    let sorted = {
        // The order the tables keep: lb-hash identity, so the Maglev map is the identity.
        let mut b = backends(&[1, 2, 1, 3, 1]);
        b.sort_by_key(|b| BackendId::from_socket_addr(SocketAddr::new(b.addr, b.port)));
        b
    };
    let shuffled: Vec<Backend> = [3, 0, 4, 1, 2].iter().map(|&i| sorted[i]).collect();
    let maglev = |b: &[Backend]| match ServiceScheduler::build(SchedulerKind::Maglev, b, None).unwrap() {
        ServiceScheduler::Maglev(m) => m.selection.to_backend.is_none(),
        _ => unreachable!(),
    };
    assert!(maglev(&sorted), "sorted backends need no map");
    assert!(!maglev(&shuffled), "shuffled backends need one");
    for kind in HASHING {
        let a = picks(kind, &sorted, &[], 300);
        let b = picks(kind, &shuffled, &[], 300);
        let addr = |p: &[usize], b: &[Backend]| p.iter().map(|&i| b[i].addr).collect::<Vec<_>>();
        assert_eq!(addr(&a, &sorted), addr(&b, &shuffled), "{kind}");
        if kind != SchedulerKind::DestinationHashing {
            assert!(histogram(&a, 5).iter().filter(|&&n| n > 0).count() >= 4, "{kind} spreads");
        }
    }
}
