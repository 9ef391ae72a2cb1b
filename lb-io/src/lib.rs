//! Moves frames between real queues and a per-core frame processor: AF_XDP sockets (UMEM and rings),
//! the XDP program that steers VIP traffic to them, pinned poll loops, and memory and pcap devices
//! that let the same loop run in tests and replays.
//!
//! lb-io knows nothing of load balancing: a [`BurstProcessor`] (in the load balancer,
//! `lb_core::worker::Worker`) turns bursts into verdicts; lb-io receives, hands over, transmits.
//!
//! ```text
//!  NIC queue ──XDP program (VIP, or ARP/NDP for one? redirect : XDP_PASS)──► XSK RX ring ─┐
//!                                                                                         ▼
//!   control thread ──update_channel──► PollLoop (pinned core): receive ► process_burst ► settle ► flush
//!         ▲                                 │                                               │
//!         └──────── retired state ──────────┘                       XSK TX ring ◄──────────┘
//! ```
//! Loops on several queues of one node are joined by a [`handoff`] mesh: a frame one loop's processor
//! says belongs to another (a NAT reply to another core's SNAT port) is copied into that loop's inbox.
//!
//! This is the only crate of the workspace with `unsafe` (system calls, the UMEM and ring mappings);
//! every block says why it holds.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod alloc;
pub mod bpf;
mod chunk;
pub mod device;
pub mod handoff;
pub mod interface;
pub mod limits;
pub mod memory;
pub mod netns;
pub mod offload;
pub mod pcap;
pub mod poll;
pub mod processor;
pub mod stop;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tun;
pub mod xsk;

pub use alloc::HugePageAlloc;
pub use device::{Device, DeviceError, FlushProgress, MAX_BURST, Received, Span};
pub use handoff::{Handoff, HandoffConfig, HandoffError, mesh};
pub use memory::{MemoryConfig, MemoryDevice};
pub use pcap::PcapDevice;
pub use poll::{
    Delivery, LoopConfig, LoopCounters, LoopFailed, LoopGone, LoopReport, LoopStats, PollLoop, Running, SpawnError,
    UpdateReceiver, UpdateSender, pin_to_core, update_channel,
};
pub use processor::{BurstProcessor, MacRewrite};
pub use stop::StopFlag;
pub use xsk::{BusyPoll, CopyMode, XskConfig, XskDevice, XskError, XskStats};
