//! lb-core `Worker::process_burst`, with `lb_io::HugePageAlloc` as the global allocator,
//! as the `lb` binary runs it: the cases in `common/worker_cases.rs`.
//! Tables of 2 MiB and more (the 72 MiB connection table) sit on transparent huge pages where the
//! kernel allows them (THP "madvise" or "always"): a random read misses the TLB far less often.
#![allow(missing_docs, clippy::unwrap_used, reason = "a benchmark binary")]

#[global_allocator]
static ALLOC: lb_io::HugePageAlloc = lb_io::HugePageAlloc;

#[path = "common/worker_cases.rs"]
mod cases;

use cases::{Duration, ThreadCpuTime};
use criterion::{Criterion, criterion_group, criterion_main};

fn established(c: &mut Criterion<ThreadCpuTime>) {
    cases::established(c, "worker_established_hugepages");
}

fn new_flows(c: &mut Criterion<ThreadCpuTime>) {
    cases::new_flows(c, "worker_new_flows_hugepages");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(ThreadCpuTime)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = established, new_flows
}
criterion_main!(benches);
