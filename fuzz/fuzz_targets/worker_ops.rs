//! Arbitrary sequences of (frame | reply to the last NAT frame | config change | time step) through a
//! Worker. Config changes go through the TableBuilder: invalid ones must be rejected and change
//! nothing; valid ones are swapped in. The invariants of `lb_fuzz::check` hold after every step.
#![no_main]

use arbitrary::Arbitrary;
use lb_core::config::{BackendState, ForwardMode, RemovedBackendPolicy, SchedulerKind};
use lb_core::{Instant, Verdict};
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
}

#[derive(Debug, Arbitrary)]
enum Op {
    Frame(lb_fuzz::FrameSpec),
    ReplyToLastNat { fin: bool },
    Config(Change),
    Time(u16),
}

fuzz_target!(|ops: Vec<Op>| {
    let mut cfg = lb_fuzz::config();
    let mut builder = lb_fuzz::builder();
    let mut w = lb_fuzz::worker(&mut builder, &cfg);
    let mut now = 1u64;
    let mut last_nat: Option<Vec<u8>> = None;
    for op in ops.iter().take(256) {
        match op {
            Op::Frame(spec) => {
                let (v, out) = lb_fuzz::run(&mut w, &spec.bytes(), usize::from(spec.headroom), Instant::from_secs(now));
                lb_fuzz::check(&w, v, &out);
                if v == Verdict::Tx && spec.target == 0 {
                    last_nat = Some(out);
                }
            }
            Op::ReplyToLastNat { fin } => {
                let Some(sent) = &last_nat else { continue };
                let Ok(p) = lb_core::packet::parse(sent) else { continue };
                let f = p.flow;
                let tcp = f.proto() == 6;
                let flags = if *fin { 0x11 } else { 0x10 };
                let reply = lb_fuzz::build(f.dst_ip(), f.dst_port(), f.src_ip(), f.src_port(), tcp, flags, 64, 4);
                let (v, out) = lb_fuzz::run(&mut w, &reply, 64, Instant::from_secs(now));
                lb_fuzz::check(&w, v, &out);
            }
            Op::Time(s) => now += u64::from(*s),
            Op::Config(change) => {
                let mut next = cfg.clone();
                let n = next.services.len();
                let bad = apply(&mut next, change, n);
                let version = w.tables().version();
                match builder.build(&next) {
                    Ok(t) => {
                        assert!(!bad, "an invalid config was accepted: {change:?}");
                        drop(w.swap_tables(t));
                        cfg = next;
                    }
                    Err(_) => {
                        // Rejected whole: the worker keeps its tables; the old config still builds.
                        assert_eq!(version, w.tables().version());
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
    }
    false
}
