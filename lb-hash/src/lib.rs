//! Flow hashing and consistent backend selection for the load balancer.
//!
//! Keys go in, backend indices come out; this crate knows nothing of packets. The control side builds
//! a selection table once per configuration change (that is the only place that allocates), and the
//! fast path asks it `select(hash)`, which for Maglev costs one reduction and one array index.
//!
//! ```text
//!   flow key ──► FlowHasher (flow) ──► u64 ──► Selector::select ──► index into the table's backends
//!                                              ├ MaglevTable        (maglev: weighted Maglev, NSDI'16)
//!                                              ├ Rendezvous         (rendezvous: weighted HRW)
//!                                              ├ JumpHash           (jump: Lamping & Veach)
//!                                              ├ EcmpHashThreshold  (ecmp: RFC 2992 hash-threshold)
//!                                              └ EcmpModulo         (ecmp: modulo-N)
//! ```
//!
//! Three properties matter to a user and each is proven by a property test in this crate:
//! - **Agreement**: every node computes the same answer. The flow hash is a fixed, documented
//!   algorithm (see [`flow`]), and builders sort backends by their [`BackendId`], so the order in which
//!   a node learned its backends does not matter.
//! - **Balance**: a Maglev table gives each backend its weighted share `M w_i / W` of the table to
//!   within one entry, so to within 1 % for `M >= 100 x N` and equal weights (see [`maglev`]).
//! - **Low disruption**: removing a backend moves its own flows and few others; adding it back restores
//!   the previous table exactly.
//!
//! Backends are given to builders as [`Backend`] (stable identity + weight). Weight 0 means *drain*:
//! the backend keeps its index (so connections already tracked by the caller stay valid) but receives
//! no new flows. Every builder exposes its backends sorted by identity, and `select` returns an index
//! into that sorted slice (see [`Selector`]).
//!
//! Adding a selector: write one file with a type implementing [`Selector`], then add one variant to
//! [`AnySelector`] so the fast path can dispatch to it without a virtual call.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod backend;
pub mod ecmp;
pub mod error;
pub mod flow;
pub mod jump;
pub mod maglev;
pub mod rendezvous;
mod selector;

pub use backend::{Backend, BackendId};
pub use ecmp::{EcmpHashThreshold, EcmpModulo};
pub use error::BuildError;
pub use flow::FlowHasher;
pub use jump::{JumpHash, jump_consistent_hash};
pub use maglev::{MaglevTable, TableChanges, is_prime, maglev_table_size_for, maglev_table_size_stable_for};
pub use rendezvous::Rendezvous;
pub use selector::{AnySelector, Selector};
