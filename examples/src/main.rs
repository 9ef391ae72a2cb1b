//! The sample load balancer binary. Filled in by issues 5 and 6.
fn main() {}
