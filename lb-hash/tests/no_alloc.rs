//! The fast path (flow hashing and every selector's `select`) never allocates: `allocation-counter`'s
//! counting allocator sees no allocation while thousands of keys are hashed and looked up.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};

use lb_hash::{
    AnySelector, Backend, EcmpHashThreshold, EcmpModulo, FlowHasher, JumpHash, MaglevTable, Rendezvous, Selector,
};

#[test]
fn hashing_and_selection_do_not_allocate() {
    let set: Vec<Backend> = (0..20u64).map(|i| Backend::new(i * 31 + 7, (i % 4) as u32)).collect();
    let selectors: Vec<AnySelector> = vec![
        MaglevTable::new(&set, 2003).expect("valid set").into(),
        Rendezvous::new(&set).expect("valid set").into(),
        JumpHash::new(20).expect("buckets").into(),
        EcmpHashThreshold::new(&set).expect("valid set").into(),
        EcmpModulo::new(&set).expect("valid set").into(),
    ];
    let h = FlowHasher::default();
    // The counter does see allocations (so the assertion below can fail).
    let control = allocation_counter::measure(|| drop(black_box(vec![1u8; 16])));
    assert_eq!(control.count_total, 1);

    let mut sink = 0u64;
    let info = allocation_counter::measure(|| {
        for i in 0..5000u32 {
            let (a, b) = (Ipv4Addr::from(i), Ipv4Addr::from(i.rotate_left(7)));
            let (a6, b6) = (Ipv6Addr::from(u128::from(i) << 64), Ipv6Addr::from(u128::from(i)));
            let keys = [
                h.five_tuple_v4(a, b, 6, i as u16, 80),
                h.five_tuple(a6.into(), b.into(), 17, 1, 2),
                h.three_tuple_v6(a6, b6, 6),
                h.source_v4(a),
                h.destination_v6(b6),
                h.src_dst_v4(a, b),
            ];
            for s in &selectors {
                for &k in &keys {
                    sink ^= u64::from(s.select(k).unwrap_or(0));
                }
            }
        }
    });
    assert_eq!(info.count_total, 0, "the fast path allocated (sink {sink})");
}
