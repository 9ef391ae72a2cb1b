//! lb-core `Worker::process_burst`, with the system allocator (a 4 KiB page under every
//! table): the cases in `common/worker_cases.rs`.
#![allow(missing_docs, clippy::unwrap_used, reason = "a benchmark binary")]

#[path = "common/worker_cases.rs"]
mod cases;

use cases::{Duration, ThreadCpuTime};
use criterion::{Criterion, criterion_group, criterion_main};

fn established(c: &mut Criterion<ThreadCpuTime>) {
    cases::established(c, "worker_established");
}

fn new_flows(c: &mut Criterion<ThreadCpuTime>) {
    cases::new_flows(c, "worker_new_flows");
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
