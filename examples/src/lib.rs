//! The control side of the sample load balancer: configuration file, Kubernetes feed, health checks,
//! the control loop that builds and publishes tables, metrics and `lb list`. The `lb` binary
//! (src/main.rs) wires these to lb-io's poll loops.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod control;
pub mod health;
pub mod k8s;
pub mod lab;
pub mod list;
pub mod log_capture;
pub mod metrics;
