//! The load balancer's fast path, sans I/O.
//!
//! An embedder owns one [`Worker`] per core and hands it bursts of frames together with the current
//! time; the worker decides, for each frame, a [`Verdict`] and rewrites forwarded frames in place.
//! Nothing here does I/O, reads a clock, takes a lock or allocates once a worker is built, so the same
//! code runs inside an AF_XDP poll loop, a DPDK lcore or a pcap replay, and is tested on a laptop.
//!
//! ```text
//!   frames, now ──► Worker::process_burst ──► verdicts (+ frames rewritten in place)
//!                     │ parse (packet)
//!                     │ service lookup (service::Tables, read-only, swapped whole)
//!                     │ conntrack lookup (conntrack, per core)
//!                     │ on miss: scheduler pick (schedule) + conntrack insert
//!                     │ rewrite: NAT / DSR / IP-in-IP / GUE (forward)
//!                     │ ARP / NDP asking for a VIP: answered in place (neighbour)
//!                     └ counters (stats)
//! ```
//!
//! Embedding it takes four calls: build the tables on the control side, give each core a worker, hand
//! it bursts, and swap new tables in between bursts.
//!
//! ```
//! use core::net::IpAddr;
//! use lb_core::config::{BackendConfig, BackendState, Config, ForwardMode, Protocol, RemovedBackendPolicy,
//!     SchedulerKind, ServiceConfig, ServiceKey};
//! use lb_core::conntrack::ConntrackSeed;
//! use lb_core::service::TableBuilder;
//! use lb_core::{Frame, Instant, Verdict, Worker, WorkerConfig};
//!
//! let vip: IpAddr = "192.0.2.10".parse().unwrap();
//! let backend = |last: u8| BackendConfig {
//!     addr: IpAddr::from([10, 0, 0, last]), port: 80, weight: 1,
//!     mac: Some([2, 0xbe, 0, 0, 0, last]), state: BackendState::Active,
//! };
//! let mut config = Config::default();
//! config.services.push(ServiceConfig {
//!     name: "web".into(),
//!     key: ServiceKey { vip, port: 80, proto: Protocol::Tcp },
//!     backends: vec![backend(1), backend(2), backend(3)],
//!     scheduler: SchedulerKind::Maglev,
//!     mode: ForwardMode::Dsr,
//!     affinity_timeout: None,
//!     source_ranges: vec![],
//!     maglev_table_size: None,
//!     on_backend_removed: RemovedBackendPolicy::Reschedule,
//!     answer_neighbours: true,
//! });
//!
//! // Control side: validate the whole configuration and build the tables (Maglev rings and all).
//! // Keep one builder for the process's life: it keeps backend slots stable across rebuilds, and
//! // gives every table the process's connection table seed (drawn at random at start: a sender
//! // who knew it could aim flows at one conntrack bucket; see `ConntrackSeed`).
//! let mut builder = TableBuilder::new().with_conntrack_seed(ConntrackSeed::new(0x243f_6a88_85a3_08d3));
//! let tables = builder.build(&config).expect("valid config");
//! // One worker per core, sized once; nothing allocates after this.
//! let mut worker = Worker::new(tables, WorkerConfig::single_core(1 << 16));
//!
//! // A TCP SYN from a client to the VIP, with headroom in front for tunnel modes.
//! let mut buf = vec![0u8; Frame::HEADROOM_NEEDED];
//! etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xc1], [2, 0, 0, 0, 0, 1])
//!     .ipv4([198, 51, 100, 7], [192, 0, 2, 10], 64)
//!     .tcp(40000, 80, 1, 64240)
//!     .syn()
//!     .write(&mut buf, &[])
//!     .unwrap();
//! let len = buf.len() - Frame::HEADROOM_NEEDED;
//! let sent = buf[Frame::HEADROOM_NEEDED..].to_vec();
//! let mut frames = [Frame::new(&mut buf, Frame::HEADROOM_NEEDED, len)];
//! let mut verdicts = [Verdict::Tx; 1];
//! worker.process_burst(&mut frames, Instant::from_secs(1), &mut verdicts);
//!
//! // DSR: only the Ethernet addresses changed: the destination to the chosen backend's MAC, the
//! // source to the node's (`node.local_mac`, or the worker's `set_source_mac`).
//! assert_eq!(verdicts[0], Verdict::Tx);
//! let out = frames[0].data();
//! assert_eq!(&out[..5], &[2, 0xbe, 0, 0, 0]);
//! assert!((1..=3).contains(&out[5]));
//! assert_eq!(out[6..12], config.node.local_mac);
//! assert_eq!(out[12..], sent[12..]);
//! assert_eq!(worker.stats().tx, 1);
//!
//! // Later, between bursts: a new configuration replaces the tables whole; conntrack survives.
//! config.services[0].backends.pop();
//! let old = worker.swap_tables(builder.build(&config).expect("valid config"));
//! assert_eq!(worker.conntrack().len(), 1); // the flow's entry, on whichever backend it went to
//! drop(old); // freed here, on the control side, never inside the burst
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod config;
pub mod conntrack;
pub mod forward;
pub mod frame;
pub mod neighbour;
pub mod packet;
pub mod schedule;
pub mod service;
pub mod stats;
pub mod time;
pub mod worker;

pub use frame::{Frame, Verdict};
pub use time::Instant;
pub use worker::{Worker, WorkerConfig, WorkerConfigError};
