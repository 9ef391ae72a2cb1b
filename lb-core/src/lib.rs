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
//!                     │ service lookup (service::ServiceTable, read-only, swapped whole)
//!                     │ conntrack lookup (conntrack, per core)
//!                     │ on miss: scheduler pick (schedule) + conntrack insert
//!                     │ rewrite: NAT / DSR / IP-in-IP / GUE (forward)
//!                     └ counters (stats)
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod config;
pub mod conntrack;
pub mod forward;
pub mod schedule;
pub mod service;
pub mod stats;
pub mod frame;
pub mod packet;
pub mod time;
pub mod worker;

pub use frame::{Frame, Verdict};
pub use time::Instant;
pub use worker::{Worker, WorkerConfig};
