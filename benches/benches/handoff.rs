//! What a full-NAT reply costs when it lands on a core that does not own its SNAT port and is handed
//! to the owner's poll loop (`lb_io::handoff`), against the same reply landing on the owner's own
//! queue. Two lb-core workers of a 2-core node share the tables of one full-NAT TCP service (2
//! backends); worker 1 opens 64 flows (a SYN from each of 64 clients), and the 64 backend -> SNAT
//! replies (ACKs), to ports of worker 1's share, are the burst of each iteration:
//! - `own_queue`: the poll loop of worker 1 receives them from its `MemoryDevice`, translates and
//!   transmits them;
//! - `handed_over`: the loop of worker 0 receives them, its worker answers `Handoff(1)`, the loop
//!   copies each into loop 1's inbox; then loop 1 (nothing on its own device) takes them, runs them
//!   through `process_handed` and sends them with `Device::transmit_copy`.
//!
//! The difference of the two is the handoff's cost per reply: worker 0's parse up to its verdict,
//! the copy into the inbox and the channel operations, the owner's take, and `transmit_copy`'s copy
//! (and the second loop's rounds). Both loops run one after the other on the benchmark thread, each
//! `run` returning once its device is drained and its inbox taken; only the `run` calls are timed,
//! in the thread's CPU time ([`ThreadCpuTime`]). Loops are built anew each iteration around the same
//! workers and devices (a `LoopReport` hands them back), so no buffer is touched for the first
//! time while timed. Both cases pay the `MemoryDevice`'s receive copy and its "wire" (each sent
//! frame copied into a new `Vec`): the difference does not depend on them.
//!
//! Figures and the command: BENCHMARKS.md.
#![allow(missing_docs, clippy::unwrap_used, reason = "a benchmark binary")]

#[path = "common/frames.rs"]
mod frames;
#[path = "common/thread_cpu_time.rs"]
mod thread_cpu_time;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use frames::tcp_frame;
use lb_core::config::{BackendConfig, Config, ForwardMode, NodeConfig, Protocol, ServiceConfig, ServiceKey};
use lb_core::service::TableBuilder;
use lb_core::{Frame, Instant, Verdict, Worker, WorkerConfig};
use lb_io::{Handoff, HandoffConfig, LoopConfig, LoopStats, MemoryConfig, MemoryDevice, PollLoop, StopFlag};
use thread_cpu_time::ThreadCpuTime;

/// Replies per iteration: one burst.
const REPLIES: usize = 64;
const CORES: u16 = 2;
/// The core whose share holds the flows' SNAT ports.
const OWNER: u16 = 1;
const CONNTRACK: usize = 1 << 16;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const SNAT: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// One full-NAT TCP service of 2 backends, SNAT ports 1024-65535.
fn config() -> Config {
    let node = NodeConfig {
        gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]),
        snat_v4: Some(SNAT),
        snat_ports: (1024, 65535),
        ..NodeConfig::default()
    };
    let backends = (0..2).map(|b| BackendConfig::new(IpAddr::V4(Ipv4Addr::new(172, 16, 1, 10 + b)), 80)).collect();
    let key = ServiceKey { vip: IpAddr::V4(VIP), port: 80, proto: Protocol::Tcp };
    Config { node, services: vec![ServiceConfig::new("web", key, ForwardMode::Nat, backends)] }
}

/// The verdicts of `w` for `frames` (one burst), and the frames as it left them.
fn process(w: &mut Worker, frames: &[[u8; 60]], handed: bool) -> (Vec<Verdict>, Vec<Vec<u8>>) {
    let headroom = Frame::HEADROOM_NEEDED;
    let mut bufs: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut b = vec![0u8; headroom + 128];
            b[headroom..headroom + f.len()].copy_from_slice(f);
            b
        })
        .collect();
    let mut burst: Vec<Frame<'_>> = bufs.iter_mut().map(|b| Frame::new(b, headroom, 60)).collect();
    let mut verdicts = vec![Verdict::Pass; burst.len()];
    if handed {
        w.process_handed_burst(&mut burst, Instant::ZERO, &mut verdicts);
    } else {
        w.process_burst(&mut burst, Instant::ZERO, &mut verdicts);
    }
    let out = burst.iter().map(|f| f.data().to_vec()).collect();
    (verdicts, out)
}

/// The two workers and the two loops' devices and handoff ends, reused by every iteration.
struct Node {
    workers: [Option<Worker>; 2],
    devices: [Option<MemoryDevice>; 2],
    ends: Vec<Handoff>,
    replies: Vec<[u8; 60]>,
    stop: StopFlag,
}

/// A loop over `device` and `worker`, joined to the mesh by `end`.
fn poll_loop(device: MemoryDevice, worker: Worker, end: &Handoff, stop: &StopFlag) -> PollLoop<MemoryDevice, Worker> {
    let (_updates, rx) = lb_io::update_channel();
    PollLoop::new(device, worker, rx, stop.clone(), LoopConfig::default()).with_handoff(end.clone())
}

impl Node {
    /// Worker 1 holds 64 NAT flows; `replies` are their backends' ACKs to the SNAT ports, which
    /// worker 1 translates and worker 0 hands to it.
    fn new() -> Node {
        let tables = TableBuilder::new().build(&config()).unwrap();
        let mut workers = [0, 1].map(|core_index| {
            Worker::new(tables.clone(), WorkerConfig { conntrack_capacity: CONNTRACK, core_index, core_count: CORES })
        });
        let syns: Vec<[u8; 60]> = (0..REPLIES)
            .map(|i| tcp_frame(Ipv4Addr::from(0xc633_6400 + i as u32), 40_000 + i as u16, VIP, 80, SYN))
            .collect();
        let (verdicts, opened) = process(&mut workers[usize::from(OWNER)], &syns, false);
        assert!(verdicts.iter().all(|v| *v == Verdict::Tx), "worker 1 opens the flows: {verdicts:?}");
        let replies: Vec<[u8; 60]> = opened
            .iter()
            .map(|f| {
                let backend = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
                let snat_port = u16::from_be_bytes([f[34], f[35]]);
                assert_eq!(Ipv4Addr::new(f[26], f[27], f[28], f[29]), SNAT);
                tcp_frame(backend, u16::from_be_bytes([f[36], f[37]]), SNAT, snat_port, ACK)
            })
            .collect();
        let (own, _) = process(&mut workers[usize::from(OWNER)], &replies, false);
        assert!(own.iter().all(|v| *v == Verdict::Tx), "worker 1 translates the replies: {own:?}");
        let (other, _) = process(&mut workers[0], &replies, false);
        assert!(other.iter().all(|v| *v == Verdict::Handoff(OWNER)), "worker 0 hands them over: {other:?}");
        Node {
            workers: workers.map(Some),
            devices: [(); 2].map(|()| Some(MemoryDevice::new(MemoryConfig::default()))),
            ends: lb_io::mesh(usize::from(CORES), HandoffConfig::default()).unwrap(),
            replies,
            stop: StopFlag::new(),
        }
    }

    /// Takes worker and device `i` for a loop, the device holding the replies when `fill`.
    fn parts(&mut self, i: usize, fill: bool) -> (MemoryDevice, Worker) {
        let mut device = self.devices[i].take().unwrap();
        if fill {
            for r in &self.replies {
                device.push_rx(r);
            }
        }
        (device, self.workers[i].take().unwrap())
    }

    /// Puts back what a loop's report returns, with what its device sent and its counters.
    fn put_back(&mut self, i: usize, report: lb_io::LoopReport<MemoryDevice, Worker>) -> (Vec<Vec<u8>>, LoopStats) {
        let mut device = report.device;
        let sent = device.take_transmitted();
        self.devices[i] = Some(device);
        self.workers[i] = Some(report.processor);
        (sent, report.stats)
    }

    /// Loop 1 receives the replies and sends them: the time of its `run`, and what it sent.
    fn own_queue(&mut self) -> (Duration, Vec<Vec<u8>>) {
        let owner = usize::from(OWNER);
        let (device, worker) = self.parts(owner, true);
        let lp = poll_loop(device, worker, &self.ends[owner], &self.stop);
        let start = cpu_time::ThreadTime::now();
        let report = lp.run().unwrap();
        let took = start.elapsed();
        let (sent, s) = self.put_back(owner, report);
        assert_eq!((s.rx, s.tx, s.drop, s.handed_off), (REPLIES as u64, REPLIES as u64, 0, 0), "{s:?}");
        (took, sent)
    }

    /// Loop 0 receives the replies and hands them to loop 1, which sends them: the time of the two
    /// `run`s, and what loop 1 sent.
    fn handed_over(&mut self) -> (Duration, Vec<Vec<u8>>) {
        let owner = usize::from(OWNER);
        let (device, worker) = self.parts(0, true);
        let receiver = poll_loop(device, worker, &self.ends[0], &self.stop);
        let (device, worker) = self.parts(owner, false);
        let sender = poll_loop(device, worker, &self.ends[owner], &self.stop);
        let start = cpu_time::ThreadTime::now();
        let received = receiver.run().unwrap();
        let sent = sender.run().unwrap();
        let took = start.elapsed();
        let n = REPLIES as u64;
        let (_, s) = self.put_back(0, received);
        assert_eq!((s.rx, s.tx, s.handed_off, s.handoff_lost, s.drop), (n, 0, n, 0, 0), "loop 0: {s:?}");
        let (sent, s) = self.put_back(owner, sent);
        assert_eq!((s.rx, s.handed_in, s.tx, s.drop), (0, n, n, 0), "loop 1: {s:?}");
        assert_eq!(sent.len(), REPLIES);
        (took, sent)
    }
}

fn handoff(c: &mut Criterion<ThreadCpuTime>) {
    let mut node = Node::new();
    // Both ways send the same translated replies.
    let (_, own) = node.own_queue();
    let (_, handed) = node.handed_over();
    assert_eq!(own.len(), REPLIES);
    assert_eq!(own, handed, "the owner translates a handed-over reply as one of its own");
    // The worker's own check of a handed-in reply, as loop 1 runs it.
    let (verdicts, _) = process(node.workers[usize::from(OWNER)].as_mut().unwrap(), &node.replies, true);
    assert!(verdicts.iter().all(|v| *v == Verdict::Tx));

    let mut g = c.benchmark_group("handoff");
    g.throughput(Throughput::Elements(REPLIES as u64));
    g.bench_function("own_queue", |b| b.iter_custom(|iters| (0..iters).map(|_| node.own_queue().0).sum()));
    g.bench_function("handed_over", |b| b.iter_custom(|iters| (0..iters).map(|_| node.handed_over().0).sum()));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(ThreadCpuTime)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = handoff
}
criterion_main!(benches);
