//! `lb replay`: the same poll loop as `lb run`, over a capture instead of a NIC queue. Frames are read
//! from `--in`, run through the fast path with the capture's timestamps as the clock, and the
//! transmitted (rewritten) frames are written to `--out`. Needs no root.

use std::path::PathBuf;

use lb_io::{BurstProcessor, LoopConfig, LoopStats, MacRewrite, PcapDevice, PollLoop, StopFlag, update_channel};

use lb_core::stats::DropReason;
use lb_core::worker::{Worker, WorkerConfig};

use super::CmdResult;

/// Arguments of `lb replay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Capture to read (pcap, Ethernet link type).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Capture to write the transmitted frames to.
    #[arg(long = "out")]
    pub output: PathBuf,
    /// Load-balancer configuration (YAML). Without it, frames only get their MAC addresses rewritten
    /// (the I/O floor), which checks the capture and the plumbing.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Runs the replay and prints per-verdict counts.
pub fn main(args: Args) -> CmdResult {
    let Some(path) = &args.config else {
        let device = PcapDevice::open(&args.input, &args.output)?;
        let processor = MacRewrite { src: [0x02, 0, 0, 0, 0, 1], dst: [0x02, 0, 0, 0, 0, 2] };
        let (stats, device) = replay(device, processor)?;
        print_counts(&stats);
        print_skipped(&device);
        device.finish()?;
        return Ok(());
    };
    // The configuration first: opening the device creates (truncates) the output, which a refused
    // configuration must leave as it was.
    let mut settings = lb_examples::config::file::load(path).map_err(|e| e.naming(path))?.settings;
    // As `lb run` reads it: a SNAT address left to the node (`node.snat_v4: node`) is the node's
    // address from the Kubernetes settings (`kubernetes.node_addresses`, else $NODE_IPS).
    settings.fill_from_env(|k| std::env::var(k).ok());
    let config = lb_core::config::Config {
        node: settings.node.clone(),
        services: settings.services.iter().map(|s| s.config.clone()).collect(),
    };
    let tables = lb_core::service::TableBuilder::new().build(&config)?;
    let device = PcapDevice::open(&args.input, &args.output)?;
    let worker = Worker::new(tables, WorkerConfig::single_core(1 << 16));
    let (_updates, rx) = update_channel();
    let report = PollLoop::new(device, worker, rx, StopFlag::new(), LoopConfig::default()).run()?;
    print_counts(&report.stats);
    let w = report.processor.stats();
    println!("  of which reverse NAT {:>5}", w.reverse_nat);
    for reason in DropReason::ALL {
        let n = w.dropped(reason);
        if n > 0 {
            println!("  drop {:<20} {n:>5}", reason.name());
        }
    }
    print_skipped(&report.device);
    report.device.finish()?;
    Ok(())
}

/// Runs `processor` over every frame of the capture.
pub fn replay<P: BurstProcessor>(
    device: PcapDevice,
    processor: P,
) -> Result<(LoopStats, PcapDevice), lb_io::DeviceError> {
    let (_updates, rx) = update_channel();
    let report = PollLoop::new(device, processor, rx, StopFlag::new(), LoopConfig::default()).run()?;
    Ok((report.stats, report.device))
}

/// Records of the capture that were not replayed, and why (not counted in "frames read").
fn print_skipped(device: &PcapDevice) {
    let oversize = device.oversize_dropped();
    if oversize > 0 {
        println!("skipped, longer than a 2 KiB buffer      {oversize:>10}");
    }
    let truncated = device.truncated_records();
    if truncated > 0 {
        println!("skipped, cut short by the snap length    {truncated:>10}");
    }
    if device.ends_inside_a_record() {
        println!(
            "the capture ends inside a record (cut off while being written): \
             the rest of the file was not replayed"
        );
    }
}

fn print_counts(s: &LoopStats) {
    println!("frames read     {:>10}", s.rx);
    println!("  tx (written)  {:>10}", s.tx);
    println!("  pass          {:>10}", s.pass);
    println!("  drop          {:>10}", s.drop);
}
