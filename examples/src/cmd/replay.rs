//! `lb replay`: the same poll loop as `lb run`, over a capture instead of a NIC queue. Frames are read
//! from `--in`, run through the fast path with the capture's timestamps as the clock, and the
//! transmitted (rewritten) frames are written to `--out`. Needs no root.

use std::path::PathBuf;

use lb_io::{
    BurstProcessor, LoopConfig, LoopStats, MacRewrite, PcapDevice, PollLoop, StopFlag,
    update_channel,
};

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
    let device = PcapDevice::open(&args.input, &args.output)?;
    if args.config.is_some() {
        return Err("--config needs the lb-core worker, which is not in this build yet".into());
    }
    let processor = MacRewrite {
        src: [0x02, 0, 0, 0, 0, 1],
        dst: [0x02, 0, 0, 0, 0, 2],
    };
    let (stats, device) = replay(device, processor)?;
    device.finish()?;
    print_counts(&stats);
    Ok(())
}

/// Runs `processor` over every frame of the capture.
pub fn replay<P: BurstProcessor>(
    device: PcapDevice,
    processor: P,
) -> Result<(LoopStats, PcapDevice), lb_io::DeviceError> {
    let (_updates, rx) = update_channel();
    let report = PollLoop::new(
        device,
        processor,
        rx,
        StopFlag::new(),
        LoopConfig::default(),
    )
    .run()?;
    let skipped = report.device.oversize_dropped();
    if skipped > 0 {
        eprintln!("note: {skipped} frames longer than a 2 KiB buffer were skipped");
    }
    Ok((report.stats, report.device))
}

fn print_counts(s: &LoopStats) {
    println!("frames read     {:>10}", s.rx);
    println!("  tx (written)  {:>10}", s.tx);
    println!("  pass          {:>10}", s.pass);
    println!("  drop          {:>10}", s.drop);
}
