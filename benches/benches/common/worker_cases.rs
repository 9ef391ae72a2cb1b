//! The cases of the lb-core `Worker::process_burst` benchmarks, shared by `worker.rs` (the system
//! allocator) and `worker_hugepages.rs` (`lb_io::HugePageAlloc`, as the `lb` binary installs it):
//! nanoseconds per packet for bursts of 64 frames, on established flows and on new flows, with 10
//! and 100 000 services and a 1 M-entry conntrack table (new flows also in full-NAT mode, where each
//! flow takes a forward and a reverse entry). New flows come twice: as a SYN flood that keeps the
//! table full (`dsr_syn`, `nat_syn`: every insert evicts) and at the rate of a busy node, with the
//! table about half full (`*_half_full`: inserts take free and expired ways); see [`clock`].
//! `dsr_syn_cache_hot` floods a 2 048-entry table that stays in cache: a new flow's compute floor.
//! `nat_syn_ports_exhausted` floods a full-NAT service whose SNAT ports are all held by the flood's
//! half-open flows: each SYN takes the port of the oldest (the cost of `Core::pick_snat_port`'s
//! reclaim). `nat_reply` sends the established `nat` flows' replies (backend -> SNAT address and
//! port), which the worker translates back to VIP -> client.
//!
//! Each iteration copies 64 template frames into the burst's buffers (NAT and tunnel rewrites change
//! them) and processes the burst; `copy_only` measures the copy alone in the same run, as a baseline
//! to subtract. Frames are hand-built Ethernet + IPv4 + TCP with valid lengths (the worker does not
//! verify checksums). `dsr_conntrack_reads_only` measures, on the same worker state, only the
//! conntrack reads an established packet cannot avoid, as the worker's warm-up issues them (bucket
//! head with the home way's entry, then the entry the tags point to): the memory floor of the
//! established cases. Figures and the command are in BENCHMARKS.md, section "lb-core".
//!
//! Time is the benchmark thread's CPU time ([`ThreadCpuTime`]), not wall time: on a shared machine
//! wall time also counts the slices other processes run while this thread waits for a core, which
//! made repeated runs differ by 2x. On an idle, dedicated core the two agree.

/// The bench binary's groups and `main`: both case groups under the given names, with the shared
/// criterion configuration. Used at the root of `worker.rs` and `worker_hugepages.rs`, after
/// `#[macro_use] mod cases;`.
macro_rules! worker_benches {
    ($established:literal, $new_flows:literal) => {
        fn established(c: &mut criterion::Criterion<cases::ThreadCpuTime>) {
            cases::established(c, $established);
        }

        fn new_flows(c: &mut criterion::Criterion<cases::ThreadCpuTime>) {
            cases::new_flows(c, $new_flows);
        }

        criterion::criterion_group! {
            name = benches;
            config = cases::criterion();
            targets = established, new_flows
        }
        criterion::criterion_main!(benches);
    };
}

/// Criterion with [`ThreadCpuTime`], 1 s of warm-up, 3 s of measurement and 30 samples a point.
pub(crate) fn criterion() -> Criterion<ThreadCpuTime> {
    Criterion::default()
        .with_measurement(ThreadCpuTime)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use frames::tcp_frame;
use lb_core::config::{
    BackendConfig, BackendState, Config, ForwardMode, NodeConfig, Protocol, ServiceConfig, ServiceKey,
};
use lb_core::conntrack::ConnKey;
use lb_core::service::TableBuilder;
use lb_core::{Frame, Instant, Verdict, Worker, WorkerConfig};

#[path = "frames.rs"]
mod frames;
#[path = "thread_cpu_time.rs"]
mod thread_cpu_time;
pub(crate) use thread_cpu_time::ThreadCpuTime;

const BURST: usize = 64;
const HEADROOM: usize = Frame::HEADROOM_NEEDED;
const CONNTRACK: usize = 1 << 20;
/// Established flows the worker holds while the established benchmark runs.
const ESTABLISHED_FLOWS: usize = 65_536;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i as u32 + 1)
}

fn config(services: usize, mode: ForwardMode) -> Config {
    let node = NodeConfig {
        gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]),
        snat_v4: Some(Ipv4Addr::new(172, 16, 0, 1)),
        tunnel_src_v4: Some(Ipv4Addr::new(172, 16, 0, 2)),
        snat_ports: (1024, 65535),
        ..NodeConfig::default()
    };
    let services = (0..services)
        .map(|i| {
            let backends = (0..2)
                .map(|b| BackendConfig {
                    addr: IpAddr::V4(Ipv4Addr::from(0xac10_0000 + (i as u32) * 2 + b + 10)),
                    port: 80,
                    weight: 1,
                    // Its own MAC, which DSR needs (the other modes would do with the gateway's).
                    mac: Some([2, 0, 0, 0, 1, b as u8]),
                    state: BackendState::Active,
                })
                .collect();
            ServiceConfig {
                // 211 entries for 2 backends, as before lb-core's default became 65 537 (128 KiB a
                // service, 13 GB for 100 000): the per-packet path reads one entry either way.
                maglev_table_size: Some(lb_hash::maglev_table_size_for(2)),
                ..ServiceConfig::new(
                    format!("svc{i}"),
                    ServiceKey { vip: IpAddr::V4(vip(i)), port: 80, proto: Protocol::Tcp },
                    mode,
                    backends,
                )
            }
        })
        .collect();
    Config { node, services }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn client(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0xc000_0000 + (i as u32 >> 14))
}

fn sport(i: usize) -> u16 {
    1024 + (i & 0x3fff) as u16
}

/// Copies `templates` into the burst buffers, after the headroom.
fn copy_templates(bufs: &mut [[u8; HEADROOM + 128]; BURST], templates: &[[u8; 60]]) {
    for (b, t) in bufs.iter_mut().zip(templates) {
        b[HEADROOM..HEADROOM + 60].copy_from_slice(t);
    }
}

/// The memory floor of an established packet under the worker's table: copies `templates` into the
/// burst buffers as [`burst`] does, parses and hashes each, then prefetches each frame's conntrack
/// bucket head and home entry, as the worker's first warm-up round does, and (in a second round) reads
/// its entry, 16 frames at a time, and nothing else.
fn conntrack_reads(w: &Worker, bufs: &mut [[u8; HEADROOM + 128]; BURST], templates: &[[u8; 60]]) -> u64 {
    copy_templates(bufs, templates);
    let table = w.conntrack();
    let mut fold = 0u64;
    for batch in bufs.chunks(16) {
        let mut hashes = [0u64; 16];
        for (h, b) in hashes.iter_mut().zip(batch) {
            if let Ok(p) = lb_core::packet::parse(&b[HEADROOM..HEADROOM + 60]) {
                *h = table.hash(&ConnKey::from_flow(&p.flow));
            }
        }
        for h in hashes {
            table.touch_bucket_and_home(h);
        }
        for h in hashes {
            fold ^= table.likely_entry(h).map_or(0, |e| u64::from(e.expires));
        }
    }
    fold
}

/// The clock of the new-flow cases, in bursts per second. Each SYN's entry lives for the SYN timeout
/// (60 s) unless evicted first. A flood of 1 024 bursts a second (65 536 SYNs) keeps the table full,
/// every entry live and half-open, each insert evicting the oldest of its bucket, with expiries that
/// differ as in a real flood (on a clock that stood still every entry of a bucket had the same
/// expiry and each insert evicted its first way). At 128 a second about 60 x 128 x 64 = 491 520
/// entries (47 % of the table) are live in the steady state, the rest expired (reused by inserts,
/// reclaimed by the sweep) or empty: a busy node rather than a flood.
const FLOOD_BURSTS_PER_SECOND: u64 = 1024;
const HALF_FULL_BURSTS_PER_SECOND: u64 = 128;

/// The time of the next burst on a clock of `per_second` bursts a second.
fn clock(per_second: u64, bursts: &mut u64) -> Instant {
    *bursts += 1;
    Instant::from_secs(1 + *bursts / per_second)
}

/// Processes `templates` (64 at a time) through `w`, copying each into the burst buffers first.
fn burst(w: &mut Worker, bufs: &mut [[u8; HEADROOM + 128]; BURST], templates: &[[u8; 60]], now: Instant) -> usize {
    copy_templates(bufs, templates);
    let mut it = bufs.iter_mut();
    let mut frames: [Frame<'_>; BURST] = std::array::from_fn(|_| Frame::new(it.next().unwrap(), HEADROOM, 60));
    let mut verdicts = [Verdict::Pass; BURST];
    w.process_burst(&mut frames, now, &mut verdicts);
    verdicts.iter().filter(|v| **v == Verdict::Tx).count()
}

/// A worker holding `n_flows` established flows (SYN then ACK) spread over `services` services, and
/// the order the bursts walk them in: with a stride, so consecutive bursts touch unrelated entries.
fn established_worker(
    bufs: &mut [[u8; HEADROOM + 128]; BURST],
    services: usize,
    mode: ForwardMode,
    n_flows: usize,
) -> (Worker, Vec<[u8; 60]>) {
    let tables = TableBuilder::new().build(&config(services, mode)).unwrap();
    let mut w = Worker::new(tables, WorkerConfig::single_core(CONNTRACK));
    let flows: Vec<[u8; 60]> =
        (0..n_flows).map(|i| tcp_frame(client(i), sport(i), vip(i % services), 80, ACK)).collect();
    let syns: Vec<[u8; 60]> =
        (0..n_flows).map(|i| tcp_frame(client(i), sport(i), vip(i % services), 80, SYN)).collect();
    for chunk in syns.chunks(BURST).chain(flows.chunks(BURST)) {
        assert_eq!(burst(&mut w, bufs, chunk, Instant::from_secs(1)), BURST);
    }
    let order = (0..n_flows).map(|i| flows[(i * 7919) % n_flows]).collect();
    (w, order)
}

/// The replies of a full-NAT worker's established flows, `order`'s frames as the worker sends them
/// to their backends (SNAT address and port -> backend), turned around: backend -> SNAT address and
/// port, each an ACK of its flow, in `order`'s order. (The few flows the setup could not keep, their
/// bucket full of other flows' entries, send none; the count is cut to whole bursts.)
fn nat_replies(w: &mut Worker, bufs: &mut [[u8; HEADROOM + 128]; BURST], order: &[[u8; 60]]) -> Vec<[u8; 60]> {
    let mut replies = Vec::with_capacity(order.len());
    for chunk in order.chunks(BURST) {
        copy_templates(bufs, chunk);
        let mut verdicts = [Verdict::Pass; BURST];
        let mut it = bufs.iter_mut();
        let mut frames: [Frame<'_>; BURST] = std::array::from_fn(|_| Frame::new(it.next().unwrap(), HEADROOM, 60));
        w.process_burst(&mut frames, Instant::from_secs(1), &mut verdicts);
        for (f, v) in frames.iter().zip(verdicts) {
            if v != Verdict::Tx {
                continue;
            }
            let sent: [u8; 60] = f.data().try_into().unwrap();
            let mut r = sent;
            r[0..6].copy_from_slice(&sent[6..12]);
            r[6..12].copy_from_slice(&sent[0..6]);
            r[26..30].copy_from_slice(&sent[30..34]);
            r[30..34].copy_from_slice(&sent[26..30]);
            r[34..36].copy_from_slice(&sent[36..38]);
            r[36..38].copy_from_slice(&sent[34..36]);
            replies.push(r);
        }
    }
    assert!(replies.len() + 16 >= order.len(), "only {} of {} flows forwarded", replies.len(), order.len());
    replies.truncate(replies.len() / BURST * BURST);
    // The replies are translated back, not dropped or passed.
    let before = w.stats().reverse_nat;
    assert_eq!(burst(w, bufs, &replies[..BURST], Instant::from_secs(1)), BURST);
    assert_eq!(w.stats().reverse_nat, before + BURST as u64);
    replies
}

pub(crate) fn established(c: &mut Criterion<ThreadCpuTime>, group: &str) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(BURST as u64));
    let mut bufs = Box::new([[0u8; HEADROOM + 128]; BURST]);
    let cases = [
        (10usize, "dsr", ForwardMode::Dsr, ESTABLISHED_FLOWS),
        (10, "nat", ForwardMode::Nat, ESTABLISHED_FLOWS),
        (100_000, "dsr", ForwardMode::Dsr, ESTABLISHED_FLOWS),
        (100_000, "nat", ForwardMode::Nat, ESTABLISHED_FLOWS),
        // The replies of the `nat` flows: backend -> SNAT address and port, translated back to
        // VIP -> client.
        (10, "nat_reply", ForwardMode::Nat, ESTABLISHED_FLOWS),
        (100_000, "nat_reply", ForwardMode::Nat, ESTABLISHED_FLOWS),
        // 1 024 flows: everything the path touches stays in cache; the compute floor.
        (10, "dsr_cache_hot", ForwardMode::Dsr, 1024),
    ];
    for (services, mode_name, mode, n_flows) in cases {
        // Built on first use, so a filtered run builds only the cases it measures.
        let mut state: Option<(Worker, Vec<[u8; 60]>)> = None;
        let mut k = 0;
        g.bench_function(BenchmarkId::new(mode_name, format!("{services}_services")), |b| {
            let (w, order) = state.get_or_insert_with(|| {
                let (mut w, order) = established_worker(&mut bufs, services, mode, n_flows);
                let order = if mode_name == "nat_reply" { nat_replies(&mut w, &mut bufs, &order) } else { order };
                (w, order)
            });
            b.iter(|| {
                let chunk = &order[k..k + BURST];
                k = (k + BURST) % order.len();
                black_box(burst(w, &mut bufs, chunk, Instant::from_secs(2)))
            });
        });
        if mode == ForwardMode::Dsr && services == 10 {
            // The same flows, only the conntrack reads an established packet cannot avoid: each
            // frame's bucket head and home entry, then its entry, 16 frames a round, as the worker's
            // warm-up does.
            g.bench_function(BenchmarkId::new(format!("{mode_name}_conntrack_reads_only"), "10_services"), |b| {
                let (w, order) = state.get_or_insert_with(|| established_worker(&mut bufs, services, mode, n_flows));
                b.iter(|| {
                    let chunk = &order[k..k + BURST];
                    k = (k + BURST) % n_flows;
                    black_box(conntrack_reads(w, &mut bufs, chunk))
                });
            });
        }
    }
    g.bench_function("copy_only", |b| {
        let t = [tcp_frame(client(1), 1, vip(0), 80, ACK); BURST];
        b.iter(|| {
            copy_templates(&mut bufs, &t);
            black_box(&bufs);
        });
    });
    g.finish();
}

pub(crate) fn new_flows(c: &mut Criterion<ThreadCpuTime>, group: &str) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(BURST as u64));
    let mut bufs = Box::new([[0u8; HEADROOM + 128]; BURST]);
    for (mode, name, services) in [
        (ForwardMode::Dsr, "dsr_syn", 10usize),
        (ForwardMode::Dsr, "dsr_syn", 100_000),
        (ForwardMode::Nat, "nat_syn", 10),
        (ForwardMode::Dsr, "dsr_syn_half_full", 10),
        (ForwardMode::Dsr, "dsr_syn_half_full", 100_000),
        (ForwardMode::Nat, "nat_syn_half_full", 10),
        (ForwardMode::Dsr, "dsr_syn_cache_hot", 10),
        (ForwardMode::Nat, "nat_syn_cache_hot", 10),
        (ForwardMode::Nat, "nat_syn_ports_exhausted", 10),
    ] {
        let per_second =
            if name.ends_with("half_full") { HALF_FULL_BURSTS_PER_SECOND } else { FLOOD_BURSTS_PER_SECOND };
        let mut worker: Option<Worker> = None;
        let mut bursts = 0u64;
        let mut templates = [tcp_frame(client(0), 1, vip(0), 80, SYN); BURST];
        let mut n: usize = 0;
        // A never-seen client address and port for every frame.
        let mut next_syns = move |templates: &mut [[u8; 60]; BURST]| {
            for t in templates.iter_mut() {
                n += 1;
                t[26..30].copy_from_slice(&(0x6400_0000u32 + (n as u32 >> 16)).to_be_bytes());
                t[34..36].copy_from_slice(&(n as u16).to_be_bytes());
                t[30..34].copy_from_slice(&vip(n % services).octets());
            }
        };
        g.bench_function(BenchmarkId::new(name, format!("{services}_services")), |b| {
            let w = worker.get_or_insert_with(|| {
                let mut config = config(services, mode);
                // A SYN flood that holds every SNAT port: 64 a backend, 1 280 flows (2 560 entries)
                // in a table of 16 384 that never fills, so each SYN evicts the oldest half-open
                // flow for its port, after the search found all 32 ports it tried taken.
                if name.ends_with("ports_exhausted") {
                    config.node.snat_ports = (40000, 40063);
                }
                let tables = TableBuilder::new().build(&config).unwrap();
                // The cache-hot case's table (256 buckets, 147 KiB) stays in L2: a new flow's
                // compute floor, as `dsr_cache_hot` is an established packet's.
                let capacity = match name {
                    _ if name.ends_with("cache_hot") => 2048,
                    _ if name.ends_with("ports_exhausted") => 16_384,
                    _ => CONNTRACK,
                };
                let mut w = Worker::new(tables, WorkerConfig::single_core(capacity));
                // Fill the table first, so every measured SYN meets the steady state of a SYN flood
                // (a full table, each insert evicting the oldest half-open entry) however many
                // iterations the run has (callgrind runs few).
                for _ in 0..2 * CONNTRACK / BURST {
                    next_syns(&mut templates);
                    burst(&mut w, &mut bufs, &templates, clock(per_second, &mut bursts));
                }
                if name.ends_with("ports_exhausted") {
                    let s = w.stats();
                    // (Every SYN but the first 1 280 reclaims a port, but for the few whose bucket was full.)
                    assert!(s.snat_port_evictions + 2 * 1280 >= s.rx, "not the reclaim: {s:?}");
                    assert_eq!(s.dropped_total(), 0);
                }
                w
            });
            b.iter(|| {
                next_syns(&mut templates);
                black_box(burst(w, &mut bufs, &templates, clock(per_second, &mut bursts)))
            });
        });
    }
    g.finish();
}
