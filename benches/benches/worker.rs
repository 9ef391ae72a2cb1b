//! lb-core `Worker::process_burst`, with the system allocator (a 4 KiB page under every
//! table): the cases in `common/worker_cases.rs`.
#![allow(missing_docs, clippy::unwrap_used, reason = "a benchmark binary")]

#[macro_use]
#[path = "common/worker_cases.rs"]
mod cases;

worker_benches!("worker_established", "worker_new_flows");
