//! AF_XDP I/O for the load balancer. Filled in by issue 5.
#![forbid(unsafe_code)]
