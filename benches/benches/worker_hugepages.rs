//! lb-core `Worker::process_burst`, with `lb_io::HugePageAlloc` as the global allocator,
//! as the `lb` binary runs it: the cases in `common/worker_cases.rs`.
//! Tables of 2 MiB and more (the 72 MiB connection table) sit on transparent huge pages where the
//! kernel allows them (THP "madvise" or "always"): a random read misses the TLB far less often.
#![allow(missing_docs, clippy::unwrap_used, reason = "a benchmark binary")]

#[global_allocator]
static ALLOC: lb_io::HugePageAlloc = lb_io::HugePageAlloc;

#[macro_use]
#[path = "common/worker_cases.rs"]
mod cases;

worker_benches!("worker_established_hugepages", "worker_new_flows_hugepages");
