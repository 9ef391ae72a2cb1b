//! The control side's cost: building [`Tables`] for many services, as every configuration update
//! does. Cases (1000 services of 3 backends, Maglev):
//! - `cold/default-size`: a fresh builder, lb-core's default table size (65 537, stable as backends
//!   come and go): what the first update after start costs;
//! - `cold/100-per-backend`: the same with 307-entry tables (`maglev_table_size_for(3)`), the size
//!   lb-core used to default to, for the memory / time trade-off;
//! - `one-changed/default-size`: a warm builder, each update differing from the last in one service's
//!   backends: what an EndpointSlice change costs once unchanged services reuse their tables.
//!
//! Figures and the command: BENCHMARKS.md ("control side").

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use lb_core::config::{BackendConfig, Config, ForwardMode, NodeConfig, Protocol, ServiceConfig, ServiceKey};
use lb_core::service::TableBuilder;

const SERVICES: u32 = 1000;
const BACKENDS: u32 = 3;

/// `SERVICES` DSR services of `BACKENDS` backends; service 0 gets one more backend when `bump`.
fn config(size: Option<u32>, bump: bool) -> Config {
    let services = (0..SERVICES)
        .map(|i| {
            let n = BACKENDS + u32::from(bump && i == 0);
            let backends =
                (0..n).map(|b| BackendConfig::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 64 + b)), 80)).collect();
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
}

criterion_group!(benches, tables);
criterion_main!(benches);
