//! lb-hash benchmarks: Maglev build against two baselines measured in the same run, lookup, and
//! flow hashing, in ns per key. Figures and the command that produced them: BENCHMARKS.md.
//!
//! Baselines for the Maglev build:
//! - `maglev-crate`: the `maglev` crate from crates.io (materialises every permutation);
//! - `paper-lazy`: the paper's populate loop (NSDI'16, section 3.4) as written there, with each
//!   permutation entry computed on demand, `% M` per step, and the table itself probed for occupancy.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lb_hash::{
    Backend, EcmpHashThreshold, EcmpModulo, FlowHasher, JumpHash, MaglevTable, Rendezvous, Selector, flow::KeyKind,
};

const SIZES: [u32; 2] = [65_537, 655_373];
const BACKENDS: [usize; 3] = [10, 100, 1000];
/// Keys per iteration in the per-key benchmarks.
const KEYS: usize = 1024;

fn backends(n: usize) -> Vec<Backend> {
    // Identities as lb-core derives them for 10.1.x.y:8080.
    (0..n as u64).map(|i| Backend::new(1 << 48 | (0x0a01_0000 + i) << 16 | 8080, 1)).collect()
}

/// The paper's populate loop, lazily computing `permutation[i][next[i]]`.
fn paper_lazy_build(ids: &[u64], m: u64) -> Vec<i32> {
    let h = FlowHasher::new(0);
    let offset: Vec<u64> = ids.iter().map(|&id| h.words(KeyKind::MaglevOffset, &[id]) % m).collect();
    let skip: Vec<u64> = ids.iter().map(|&id| h.words(KeyKind::MaglevSkip, &[id]) % (m - 1) + 1).collect();
    let mut next = vec![0u64; ids.len()];
    let mut entry = vec![-1i32; m as usize];
    let mut n = 0u64;
    loop {
        for i in 0..ids.len() {
            let mut c = (offset[i] + next[i] * skip[i]) % m;
            while entry[c as usize] >= 0 {
                next[i] += 1;
                c = (offset[i] + next[i] * skip[i]) % m;
            }
            entry[c as usize] = i as i32;
            next[i] += 1;
            n += 1;
            if n == m {
                return entry;
            }
        }
    }
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
    for &m in &SIZES {
        for &n in &BACKENDS {
            let set = backends(n);
            let ids: Vec<u64> = set.iter().map(|b| b.id.0).collect();
            let id = format!("N={n}/M={m}");
            group.bench_with_input(BenchmarkId::new("lb-hash", &id), &set, |b, set| {
                b.iter(|| MaglevTable::new(black_box(set), m).expect("valid set"));
            });
            group.bench_with_input(BenchmarkId::new("paper-lazy", &id), &ids, |b, ids| {
                b.iter(|| paper_lazy_build(black_box(ids), u64::from(m)));
            });
        }
    }
    // Weighted, skewed 64 to 1: once the heavy backends are done, the light ones take a turn only
    // every 64 rounds. One w64 and one w1, and one w64 among 999 of w1.
    for &m in &SIZES {
        for &n in &[2usize, 1000] {
            let mut set = backends(n);
            set[0].weight = 64;
            let id = format!("N={n}/M={m}");
            group.bench_with_input(BenchmarkId::new("lb-hash-skew64", &id), &set, |b, set| {
                b.iter(|| MaglevTable::new(black_box(set), m).expect("valid set"));
            });
        }
    }
    group.finish();

    // The crate materialises N x M permutation entries of 8 bytes: 0.5 GB at N=1000, M=65537, and
    // 5 GB at N=1000, M=655373, which this machine cannot hold; that point is left out.
    let mut group = c.benchmark_group("maglev_build");
    group.warm_up_time(Duration::from_millis(100)).measurement_time(Duration::from_secs(3)).sample_size(10);
    for &m in &SIZES {
        for &n in &BACKENDS {
            if n as u64 * u64::from(m) > 100_000_000 {
                continue;
            }
            let ids: Vec<u64> = backends(n).iter().map(|b| b.id.0).collect();
            group.bench_with_input(BenchmarkId::new("maglev-crate", format!("N={n}/M={m}")), &ids, |b, ids| {
                b.iter(|| maglev::Maglev::with_capacity(black_box(ids.clone()), m as usize));
            });
        }
    }
    group.finish();
}

fn hashes() -> Vec<u64> {
    let h = FlowHasher::default();
    (0..KEYS as u32).map(|i| h.source_v4(Ipv4Addr::from(i))).collect()
}

fn lookup(c: &mut Criterion) {
    let keys = hashes();
    let mut group = c.benchmark_group("lookup");
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(KEYS as u64));
    for &m in &SIZES {
        let table = MaglevTable::new(&backends(100), m).expect("valid set");
        group.bench_function(BenchmarkId::new("maglev-fastmod", m), |b| {
            b.iter(|| black_box(&keys).iter().fold(0u32, |acc, &h| acc ^ table.lookup(h).unwrap_or(0)));
        });
        let entries = table.entries();
        let size = u64::from(table.size());
        group.bench_function(BenchmarkId::new("maglev-division", m), |b| {
            b.iter(|| {
                black_box(&keys).iter().fold(0u32, |acc, &h| {
                    acc ^ entries.get((h % black_box(size)) as usize).map_or(0, |&e| u32::from(e))
                })
            });
        });
    }
    let set = backends(10);
    let selectors: [(&str, Box<dyn Selector>); 4] = [
        ("rendezvous-N=10", Box::new(Rendezvous::new(&set).expect("valid set"))),
        ("jump-N=100", Box::new(JumpHash::new(100).expect("buckets"))),
        ("ecmp-threshold-N=10", Box::new(EcmpHashThreshold::new(&set).expect("valid set"))),
        ("ecmp-modulo-N=10", Box::new(EcmpModulo::new(&set).expect("valid set"))),
    ];
    for (name, s) in &selectors {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(&keys).iter().fold(0u32, |acc, &h| acc ^ s.select(h).unwrap_or(0)));
        });
    }
    group.finish();
}

fn flow_hash(c: &mut Criterion) {
    let v4: Vec<(Ipv4Addr, Ipv4Addr, u16)> = (0..KEYS as u32)
        .map(|i| (Ipv4Addr::from(0xc000_0200 ^ i.wrapping_mul(0x9e37_79b9)), Ipv4Addr::new(10, 0, 0, 1), i as u16))
        .collect();
    let v6: Vec<(Ipv6Addr, Ipv6Addr, u16)> = v4
        .iter()
        .map(|&(s, d, p)| (s.to_ipv6_mapped(), Ipv6Addr::from(u128::from(d.to_bits()) << 64 | 0x2001_0db8), p))
        .collect();
    let h = FlowHasher::default();
    let mut group = c.benchmark_group("flow_hash");
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(KEYS as u64));
    group.bench_function("five_tuple_v4", |b| {
        b.iter(|| black_box(&v4).iter().fold(0, |acc, &(s, d, p)| acc ^ h.five_tuple_v4(s, d, 6, p, 443)));
    });
    group.bench_function("five_tuple_v6", |b| {
        b.iter(|| black_box(&v6).iter().fold(0, |acc, &(s, d, p)| acc ^ h.five_tuple_v6(s, d, 6, p, 443)));
    });
    group.bench_function("three_tuple_v4", |b| {
        b.iter(|| black_box(&v4).iter().fold(0, |acc, &(s, d, _)| acc ^ h.three_tuple_v4(s, d, 17)));
    });
    group.bench_function("source_v4", |b| {
        b.iter(|| black_box(&v4).iter().fold(0, |acc, &(s, _, _)| acc ^ h.source_v4(s)));
    });
    group.bench_function("source_v6", |b| {
        b.iter(|| black_box(&v6).iter().fold(0, |acc, &(s, _, _)| acc ^ h.source_v6(s)));
    });
    group.bench_function("src_dst_v6", |b| {
        b.iter(|| black_box(&v6).iter().fold(0, |acc, &(s, d, _)| acc ^ h.src_dst_v6(s, d)));
    });
    group.bench_function("five_tuple_v4_then_maglev_lookup", |b| {
        let table = MaglevTable::with_default_size(&backends(100)).expect("valid set");
        b.iter(|| {
            black_box(&v4)
                .iter()
                .fold(0, |acc, &(s, d, p)| acc ^ table.lookup(h.five_tuple_v4(s, d, 6, p, 443)).unwrap_or(0))
        });
    });
    group.finish();
}

criterion_group!(benches, flow_hash, lookup, maglev_build);
criterion_main!(benches);
