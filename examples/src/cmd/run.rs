//! `lb run`: serve the configured interfaces and queues, with the control plane (configuration file,
//! reloads, Kubernetes feed, health checks, `/metrics`, `/state`) of `lb_examples::control`.
//!
//! One poll loop per (interface, queue): an AF_XDP socket, lb-core's `Worker` (as
//! `lb_examples::control::LbProcessor`) and an update channel. Per interface, the VIP-steering XDP
//! program sends frames for VIPs and SNAT addresses to the sockets; everything else stays with the
//! kernel. The control side builds tables, sends them to every loop, then updates the steered VIPs.
//! With `interfaces: []` it runs the control plane alone: a dry run whose tables `lb list` shows.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use lb_core::config::Config;
use lb_core::service::{TableBuilder, Tables};
use lb_core::worker::{Worker, WorkerConfig};
use lb_examples::control::{LbProcessor, TablesSink, run_blocking};
use lb_examples::metrics::PublishedCounters;
use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{SteeringConfig, VipSteering};
use lb_io::{LoopConfig, PollLoop, StopFlag, UpdateSender, XskConfig, XskDevice, update_channel};

use super::CmdResult;

/// Arguments of `lb run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The YAML configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Connection-table entries per core (a NAT flow takes two).
    #[arg(long, default_value_t = 1 << 18)]
    pub conntrack_entries: usize,
    /// Pin poll loop i to core FIRST+i.
    #[arg(long)]
    pub first_core: Option<usize>,
    /// Attach the XDP program in generic (SKB) mode instead of native.
    #[arg(long)]
    pub generic: bool,
}

/// Sends tables to every loop, then steers exactly their VIPs and SNAT addresses to the sockets.
struct Workers {
    loops: Vec<UpdateSender<Arc<Tables>>>,
    steering: Vec<VipSteering>,
}

impl TablesSink for Workers {
    fn publish(&mut self, tables: &Arc<Tables>) -> Result<(), String> {
        self.loops.publish(tables)?;
        let node = tables.node();
        let mut addrs: Vec<IpAddr> = tables.services().iter().map(|s| s.key.vip).collect();
        addrs.extend(node.snat_v4.map(IpAddr::V4));
        addrs.extend(node.snat_v6.map(IpAddr::V6));
        addrs.sort();
        addrs.dedup();
        for s in &mut self.steering {
            s.set_vips(addrs.iter().copied()).map_err(|e| format!("steering VIPs: {e}"))?;
        }
        Ok(())
    }
}

/// Starts the loops, runs the control plane until SIGINT/SIGTERM, stops the loops.
pub fn main(args: Args) -> CmdResult {
    let settings = lb_examples::config::file::load(&args.config)?;
    StopFlag::watch_signals()?;
    let stop = StopFlag::new();
    // Workers start on empty tables of the file's node settings (no flows can exist before the
    // control plane's first tables arrive, so its own builder's slot numbers are safe to take over).
    let empty = TableBuilder::new().build(&Config { node: settings.node.clone(), services: Vec::new() })?;
    let queues: Vec<(String, u32)> =
        settings.interfaces.iter().flat_map(|i| i.queues.iter().map(move |q| (i.name.clone(), *q))).collect();
    let cores = u16::try_from(queues.len()).map_err(|_| "too many queues")?;
    if cores > 1 && settings.services.iter().any(|s| s.config.mode == lb_core::config::ForwardMode::Nat) {
        tracing::warn!(
            "NAT with {cores} queues: replies must reach the core owning their SNAT port; the steering program \
             does not route them by port yet, so run NAT on one queue per node"
        );
    }
    let mode = if args.generic { AttachMode::Generic } else { AttachMode::Auto };
    let mut workers = Workers { loops: Vec::new(), steering: Vec::new() };
    let mut counters = PublishedCounters::default();
    let mut handles = Vec::new();
    let mut links = Vec::new();
    for iface in &settings.interfaces {
        let steering = VipSteering::load(SteeringConfig::default())?;
        for &q in &iface.queues {
            let i = handles.len();
            let dev = XskDevice::open(&XskConfig::new(&iface.name, q))?;
            steering.set_socket(q, dev.fd())?;
            let worker = Worker::new(empty.clone(), WorkerConfig {
                conntrack_capacity: args.conntrack_entries,
                core_index: u16::try_from(i)?,
                core_count: cores,
            });
            let (processor, published) = LbProcessor::new(worker);
            counters.0.push(published);
            let (tx, rx) = update_channel();
            workers.loops.push(tx);
            let core = args.first_core.map(|c| c + i);
            let lp = PollLoop::new(dev, processor, rx, stop.clone(), LoopConfig::default());
            handles.push(lp.spawn(format!("lb-{}-q{q}", iface.name), core)?);
        }
        let ifindex = lb_io::xsk::ifindex(&iface.name).ok_or_else(|| format!("no interface {}", iface.name))?;
        links.push(steering.attach(ifindex, mode)?);
        workers.steering.push(steering);
    }
    tracing::info!(loops = queues.len(), "poll loops running");
    let result = run_blocking(&args.config, workers, Arc::new(counters));
    stop.stop();
    for h in handles {
        match h.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("poll loop failed: {e}"),
            Err(_) => tracing::error!("poll loop panicked"),
        }
    }
    drop(links);
    result?;
    Ok(())
}
