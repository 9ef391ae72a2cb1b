//! Arbitrary sequences of (frame | burst of frames | reply to the last NAT frame | config change |
//! time step, forward or back | sweep | source MAC | neighbour responder) through one to three
//! Workers, the cores of one node: frames a core hands over ([`Verdict::Handoff`],
//! [`Verdict::HandoffAll`]) go to the others' `process_handed_burst`, which never hands them on.
//! Config changes go through the TableBuilder: invalid ones must be rejected and change nothing;
//! valid ones are swapped into every worker. The invariants of `lb_fuzz::check` hold after every step.
#![no_main]

use arbitrary::Arbitrary;
use lb_core::config::{BackendState, Cidr, ForwardMode, RemovedBackendPolicy, SchedulerKind};
use lb_core::{Instant, Verdict, Worker, WorkerConfig};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Change {
    AddBackend {
        service: u8,
        which: u8,
    },
    RemoveBackend {
        service: u8,
    },
    Weight {
        service: u8,
        backend: u8,
        weight: u8,
    },
    Drain {
        service: u8,
        backend: u8,
    },
    Scheduler {
        service: u8,
        kind: u8,
    },
    Mode {
        service: u8,
        mode: u8,
    },
    Affinity {
        service: u8,
        secs: Option<u16>,
    },
    Policy {
        service: u8,
        drop: bool,
    },
    /// Invalid on purpose: a duplicate backend.
    Duplicate {
        service: u8,
    },
    /// Invalid on purpose: a Maglev size that is not prime.
    BadMaglevSize {
        service: u8,
    },
    /// The SNAT addresses become the VIPs (a node address serving services and masquerading NAT
    /// flows), or go back. With `cover` the SNAT port range also covers the service ports: invalid
    /// on the VIPs, valid (and live NAT flows break, as documented) elsewhere.
    SnatOnVip {
        on: bool,
        cover: bool,
    },
    /// A backend whose frames go to the node's gateway (no MAC of its own; DSR needs one).
    AddBackendWithoutMac {
        service: u8,
        which: u8,
    },
    /// The service takes clients of a prefix of their network only (`None`: every client).
    SourceRanges {
        service: u8,
        prefix: Option<u8>,
    },
    /// `node.tunnel_mtu`: none, or 1200 plus the value (below 1332 is invalid).
    TunnelMtu(Option<u8>),
    /// The service goes (if another is left), with its flows' backends.
    RemoveService {
        service: u8,
    },
    /// The first service of the base config that is gone comes back, as the base config has it.
    RestoreService,
    /// `node.timeouts` in seconds (tcp_syn, tcp_established, tcp_fin, tcp_time_wait, udp); 0 is invalid.
    Timeouts([u8; 5]),
    /// `node.snat_ports`: `len + 1` ports from 40000 + `first` (few enough that some cores get none).
    SnatPorts {
        first: u8,
        len: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum Op {
    Frame {
        core: u8,
        spec: lb_fuzz::FrameSpec,
    },
    /// `specs` cycled to `specs.len() * (1 + repeat % 8)` frames (at most 96), the client port
    /// stepping at each round: bursts past one batch (16) and past lb-io's burst size (64).
    Burst {
        core: u8,
        specs: Vec<lb_fuzz::FrameSpec>,
        repeat: u8,
    },
    ReplyToLastNat {
        core: u8,
        fin: bool,
    },
    Config(Change),
    Time(u16),
    /// The clock steps back (a replayed capture out of order, a clock stepped back).
    TimeBack(u16),
    Sweep {
        core: u8,
        buckets: u8,
    },
    SourceMac {
        core: u8,
        mac: Option<u8>,
    },
    Neighbour {
        core: u8,
        on: bool,
    },
}

/// A frame's bytes and headroom.
type Frame = (Vec<u8>, usize);

#[derive(Debug, Arbitrary)]
struct Input {
    /// 1 + cores % 3 workers.
    cores: u8,
    ops: Vec<Op>,
}

/// Runs `frames` through core `at`, then hands what it hands over to the other cores; checks the
/// invariants of every core involved. Returns the verdicts and frames of core `at`.
fn step(
    workers: &mut [Worker],
    at: usize,
    frames: &[Frame],
    (now, clock): (Instant, Instant),
) -> Vec<(Verdict, Vec<u8>)> {
    let n = workers.len();
    let out = lb_fuzz::run_burst(&mut workers[at], frames, now, false);
    lb_fuzz::check_state(&workers[at], clock);
    // Per core, the frames handed to it. (Each core that tracks an ICMP error's flow translates its
    // copy: the fuzzer may send one flow to several cores, which RSS does not.)
    let mut handed: Vec<Vec<Frame>> = vec![Vec::new(); n];
    for ((v, bytes), (input, _)) in out.iter().zip(frames) {
        lb_fuzz::check_verdict(*v, input, bytes);
        match *v {
            Verdict::Handoff(k) => {
                let k = usize::from(k);
                assert!(k != at && k < n, "handed to core {k} of {n} by core {at}");
                handed[k].push((bytes.clone(), 64));
            }
            Verdict::HandoffAll => {
                assert!(n > 1, "handed to every other core of one");
                for (k, h) in handed.iter_mut().enumerate() {
                    if k != at {
                        h.push((bytes.clone(), 64));
                    }
                }
            }
            _ => {}
        }
    }
    for (k, frames) in handed.iter().enumerate() {
        if frames.is_empty() {
            continue;
        }
        let out = lb_fuzz::run_burst(&mut workers[k], frames, now, true);
        for ((v, bytes), (input, _)) in out.iter().zip(frames) {
            assert!(!matches!(v, Verdict::Handoff(_) | Verdict::HandoffAll), "a handed frame was handed on");
            lb_fuzz::check_verdict(*v, input, bytes);
        }
        lb_fuzz::check_state(&workers[k], clock);
    }
    out
}

fuzz_target!(|input: Input| {
    let mut cfg = lb_fuzz::config();
    let mut builder = lb_fuzz::builder();
    let n = 1 + usize::from(input.cores % 3);
    let tables = builder.build(&cfg).expect("the base fuzz config is valid");
    let mut workers: Vec<Worker> = (0..n)
        .map(|i| {
            let tables = tables.clone();
            let wc =
                WorkerConfig { conntrack_capacity: lb_fuzz::CONNTRACK, core_index: i as u16, core_count: n as u16 };
            let mut w = Worker::new(tables, wc);
            w.set_neighbour_mac(Some([0x02, 0, 0, 0, 0, 0x01]));
            w
        })
        .collect();
    let mut now = 1u64;
    // The latest `now` the workers were given (a worker never goes back: see `Worker::process_burst`).
    let mut clock = now;
    let mut last_nat: Option<Vec<u8>> = None;
    let core = |c: &u8| usize::from(*c) % n;
    for op in input.ops.iter().take(256) {
        match op {
            Op::Frame { core: c, spec } => {
                let out = step(
                    &mut workers,
                    core(c),
                    &[(spec.bytes(), usize::from(spec.headroom))],
                    (Instant::from_secs(now), Instant::from_secs(clock)),
                );
                if out[0].0 == Verdict::Tx && spec.target == 0 && !spec.icmp_error {
                    last_nat = Some(out[0].1.clone());
                }
            }
            Op::Burst { core: c, specs, repeat } => {
                let total = (specs.len() * (1 + usize::from(*repeat % 8))).min(96);
                let frames: Vec<Frame> = specs
                    .iter()
                    .cycle()
                    .enumerate()
                    .take(total)
                    .map(|(i, spec)| {
                        let mut spec = spec.clone();
                        spec.sport = spec.sport.wrapping_add((i / specs.len()) as u16);
                        (spec.bytes(), usize::from(spec.headroom))
                    })
                    .collect();
                let out = step(&mut workers, core(c), &frames, (Instant::from_secs(now), Instant::from_secs(clock)));
                let nat = |(i, (v, _)): &(usize, &(Verdict, Vec<u8>))| {
                    let spec = &specs[i % specs.len()];
                    *v == Verdict::Tx && spec.target == 0 && !spec.icmp_error
                };
                if let Some((_, (_, bytes))) = out.iter().enumerate().rfind(nat) {
                    last_nat = Some(bytes.clone());
                }
            }
            Op::ReplyToLastNat { core: c, fin } => {
                let Some(sent) = &last_nat else { continue };
                let Ok(p) = lb_core::packet::parse(sent) else { continue };
                let f = p.flow;
                let tcp = f.proto() == 6;
                let flags = if *fin { 0x11 } else { 0x10 };
                let reply = lb_fuzz::build(f.dst_ip(), f.dst_port(), f.src_ip(), f.src_port(), tcp, flags, 64, 4);
                step(&mut workers, core(c), &[(reply, 64)], (Instant::from_secs(now), Instant::from_secs(clock)));
            }
            Op::Time(s) => {
                now += u64::from(*s);
                clock = clock.max(now);
            }
            Op::TimeBack(s) => now = now.saturating_sub(u64::from(*s)),
            Op::Sweep { core: c, buckets } => {
                let w = &mut workers[core(c)];
                w.sweep(Instant::from_secs(now), usize::from(*buckets));
                lb_fuzz::check_state(w, Instant::from_secs(clock));
            }
            Op::SourceMac { core: c, mac } => {
                workers[core(c)].set_source_mac(mac.map(|m| [0x02, 0, 0, 0, 0x5c, m]));
            }
            Op::Neighbour { core: c, on } => {
                workers[core(c)].set_neighbour_mac(on.then_some([0x02, 0, 0, 0, 0, 0x01]));
            }
            Op::Config(change) => {
                let mut next = cfg.clone();
                let n = next.services.len();
                let bad = apply(&mut next, change, n);
                let version = workers[0].tables().version();
                match builder.build(&next) {
                    Ok(t) => {
                        assert!(!bad, "an invalid config was accepted: {change:?}");
                        for w in &mut workers {
                            drop(w.swap_tables(t.clone()));
                            lb_fuzz::check_state(w, Instant::from_secs(clock));
                        }
                        cfg = next;
                    }
                    Err(_) => {
                        // Rejected whole: the workers keep their tables; the old config still builds.
                        assert!(workers.iter().all(|w| w.tables().version() == version));
                        assert!(builder.build(&cfg).is_ok(), "the running config no longer builds");
                    }
                }
            }
        }
    }
});

/// Applies a change; returns true when the change makes the config invalid on purpose.
fn apply(cfg: &mut lb_core::config::Config, change: &Change, n: usize) -> bool {
    let svc = |s: &u8| usize::from(*s) % n;
    match change {
        Change::AddBackend { service, which } => {
            let s = &mut cfg.services[svc(service)];
            let v6 = s.key.vip.is_ipv6();
            let port =
                s.backends.first().map_or(if s.mode == ForwardMode::Nat { 8080 } else { s.key.port }, |b| b.port);
            let addr = lb_fuzz::backend_addr(v6, 2 + which % 8);
            if !s.backends.iter().any(|b| b.addr == addr) {
                s.backends.push(lb_core::config::BackendConfig {
                    addr,
                    port,
                    weight: 1,
                    mac: Some([2, 0, 0, 0, 2, *which]),
                    state: BackendState::Active,
                });
            }
        }
        Change::RemoveBackend { service } => {
            cfg.services[svc(service)].backends.pop();
        }
        Change::Weight { service, backend, weight } => {
            let s = &mut cfg.services[svc(service)];
            let k = s.backends.len();
            if k > 0 {
                s.backends[usize::from(*backend) % k].weight = u32::from(*weight);
            }
        }
        Change::Drain { service, backend } => {
            let s = &mut cfg.services[svc(service)];
            let k = s.backends.len();
            if k > 0 {
                s.backends[usize::from(*backend) % k].state = BackendState::Draining;
            }
        }
        Change::Scheduler { service, kind } => {
            cfg.services[svc(service)].scheduler = SchedulerKind::ALL[usize::from(*kind) % SchedulerKind::ALL.len()];
        }
        Change::Mode { service, mode } => {
            let s = &mut cfg.services[svc(service)];
            s.mode = lb_fuzz::MODES[usize::from(*mode) % 4];
            let port = if s.mode == ForwardMode::Nat { 8080 } else { s.key.port };
            for b in &mut s.backends {
                b.port = port;
            }
        }
        Change::Affinity { service, secs } => {
            cfg.services[svc(service)].affinity_timeout =
                secs.map(|s| std::time::Duration::from_secs(u64::from(s.max(1))));
        }
        Change::Policy { service, drop } => {
            cfg.services[svc(service)].on_backend_removed =
                if *drop { RemovedBackendPolicy::Drop } else { RemovedBackendPolicy::Reschedule };
        }
        Change::Duplicate { service } => {
            let s = &mut cfg.services[svc(service)];
            match s.backends.first().cloned() {
                Some(b) => s.backends.push(b),
                None => return false,
            }
            return true;
        }
        Change::BadMaglevSize { service } => {
            let s = &mut cfg.services[svc(service)];
            s.maglev_table_size = Some(1000);
            // (A scheduler without a Maglev table ignores the size.)
            return s.scheduler.uses_maglev_table();
        }
        Change::SnatOnVip { on, cover } => {
            let (v4, v6) = if *on { (lb_fuzz::VIP4, lb_fuzz::VIP6) } else { (lb_fuzz::SNAT4, lb_fuzz::SNAT6) };
            (cfg.node.snat_v4, cfg.node.snat_v6) = (Some(v4), Some(v6));
            cfg.node.snat_ports = if *cover { (80, 40015) } else { (40000, 40015) };
            return *on && *cover;
        }
        Change::AddBackendWithoutMac { service, which } => {
            let s = &mut cfg.services[svc(service)];
            let v6 = s.key.vip.is_ipv6();
            let port =
                s.backends.first().map_or(if s.mode == ForwardMode::Nat { 8080 } else { s.key.port }, |b| b.port);
            let addr = lb_fuzz::backend_addr(v6, 10 + which % 4);
            if !s.backends.iter().any(|b| b.addr == addr) {
                s.backends.push(lb_core::config::BackendConfig {
                    addr,
                    port,
                    weight: 1,
                    mac: None,
                    state: BackendState::Active,
                });
            }
        }
        Change::SourceRanges { service, prefix } => {
            let s = &mut cfg.services[svc(service)];
            s.source_ranges = match prefix {
                None => vec![],
                Some(p) if s.key.vip.is_ipv6() => {
                    let net = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, u16::from(*p));
                    Cidr::new(net.into(), 100 + p % 29).into_iter().collect()
                }
                Some(p) => {
                    let net = std::net::Ipv4Addr::new(198, 51, 100, *p);
                    Cidr::new(net.into(), 24 + p % 9).into_iter().collect()
                }
            };
        }
        Change::RemoveService { service } => {
            if n > 1 {
                cfg.services.remove(svc(service));
            }
        }
        Change::RestoreService => {
            if let Some(s) =
                lb_fuzz::config().services.into_iter().find(|s| !cfg.services.iter().any(|c| c.key == s.key))
            {
                cfg.services.push(s);
            }
        }
        Change::Timeouts(t) => {
            let [tcp_syn, tcp_established, tcp_fin, tcp_time_wait, udp] =
                t.map(|s| std::time::Duration::from_secs(u64::from(s)));
            cfg.node.timeouts = lb_core::config::Timeouts { tcp_syn, tcp_established, tcp_fin, tcp_time_wait, udp };
            return t.contains(&0);
        }
        Change::TunnelMtu(mtu) => {
            cfg.node.tunnel_mtu = mtu.map(|m| 1200 + u16::from(m));
            return mtu.is_some_and(|m| 1200 + u16::from(m) < 1332);
        }
        Change::SnatPorts { first, len } => {
            let lo = 40000 + u16::from(*first % 16);
            cfg.node.snat_ports = (lo, lo + u16::from(*len % 16));
        }
    }
    false
}
