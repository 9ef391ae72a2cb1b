//! The control side's cost: building [`Tables`] for many services, as every configuration update
//! does. Cases (1000 services of 3 backends, Maglev):
//! - `cold/default-size`: a fresh builder, lb-core's default table size (65 537, stable as backends
//!   come and go): what the first update after start costs;
//! - `cold/100-per-backend`: the same with 307-entry tables (`maglev_table_size_for(3)`), the size
//!   lb-core used to default to, for the memory / time trade-off;
//! - `one-changed/default-size`: a warm builder, each update differing from the last in one service's
//!   backends: what an EndpointSlice change costs once unchanged services reuse their tables.
//!
//! - `one-service/{wrr,mh}/backends=65535`: one service at the per-service maximum of backends,
//!   built cold: the control side's cost that grows with a service's backends rather than with the
//!   number of services.
//!
//! Figures and the command: BENCHMARKS.md ("control side").

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use lb_core::config::{
    BackendConfig, Config, ForwardMode, NodeConfig, Protocol, SchedulerKind, ServiceConfig, ServiceKey,
};
use lb_core::service::TableBuilder;

const SERVICES: u32 = 1000;
const BACKENDS: u32 = 3;

/// A DSR backend on port 80, with the MAC of its own DSR needs.
fn backend(addr: IpAddr) -> BackendConfig {
    BackendConfig { mac: Some([2, 0, 0, 0, 1, 1]), ..BackendConfig::new(addr, 80) }
}

/// `SERVICES` DSR services of `BACKENDS` backends; service 0 gets one more backend when `bump`.
fn config(size: Option<u32>, bump: bool) -> Config {
    let services = (0..SERVICES)
        .map(|i| {
            let n = BACKENDS + u32::from(bump && i == 0);
            let backends = (0..n).map(|b| backend(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 64 + b)))).collect();
            ServiceConfig {
                maglev_table_size: size,
                ..ServiceConfig::new(
                    format!("svc{i}"),
                    ServiceKey { vip: IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + i)), port: 80, proto: Protocol::Tcp },
                    ForwardMode::Dsr,
                    backends,
                )
            }
        })
        .collect();
    Config { node: NodeConfig { gateway_mac: Some([2, 0, 0, 0, 0, 1]), ..NodeConfig::default() }, services }
}

fn tables(c: &mut Criterion) {
    let mut g = c.benchmark_group("table_build");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    let name = |case: &str| format!("{case}/services={SERVICES}/backends={BACKENDS}");

    let default = config(None, false);
    g.bench_function(name("cold/default-size"), |b| {
        b.iter(|| black_box(TableBuilder::new().build(&default).expect("valid config")));
    });
    let small = config(Some(lb_hash::maglev_table_size_for(BACKENDS as usize)), false);
    g.bench_function(name("cold/100-per-backend"), |b| {
        b.iter(|| black_box(TableBuilder::new().build(&small).expect("valid config")));
    });
    let bumped = config(None, true);
    let mut builder = TableBuilder::new();
    builder.build(&default).expect("valid config");
    let mut flip = false;
    g.bench_function(name("one-changed/default-size"), |b| {
        b.iter(|| {
            flip = !flip;
            black_box(builder.build(if flip { &bumped } else { &default }).expect("valid config"))
        });
    });
    g.finish();

    let mut g = c.benchmark_group("table_build");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    for (name, scheduler) in [("wrr", SchedulerKind::WeightedRoundRobin), ("mh", SchedulerKind::Maglev)] {
        let one = one_service(scheduler, 65_535);
        g.bench_function(format!("one-service/{name}/backends=65535"), |b| {
            b.iter(|| black_box(TableBuilder::new().build(&one).expect("valid config")));
        });
    }
    g.finish();
}

/// One DSR service of `n` backends with weights 1 to 100 under `scheduler`.
fn one_service(scheduler: SchedulerKind, n: u32) -> Config {
    let backends = (0..n)
        .map(|b| BackendConfig { weight: 1 + b % 100, ..backend(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + b))) })
        .collect();
    let key = ServiceKey { vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), port: 80, proto: Protocol::Tcp };
    let service = ServiceConfig { scheduler, ..ServiceConfig::new("big", key, ForwardMode::Dsr, backends) };
    Config {
        node: NodeConfig { gateway_mac: Some([2, 0, 0, 0, 0, 1]), ..NodeConfig::default() },
        services: vec![service],
    }
}

criterion_group!(benches, tables);
criterion_main!(benches);
