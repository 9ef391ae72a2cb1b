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
    /// Capture to read (pcap, Ethernet link type; an FCS its header marks is stripped from each frame).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Capture to write the transmitted frames to; `/dev/stdout` pipes it to `tcpdump -r -` (the
    /// counts then go to standard error).
    #[arg(long = "out")]
    pub output: PathBuf,
    /// Load-balancer configuration (YAML). Without it, frames only get their MAC addresses rewritten
    /// (the I/O floor), which checks the capture and the plumbing.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Runs the replay and prints per-verdict counts: to standard output, or to standard error when
/// the capture goes there.
pub fn main(args: Args) -> CmdResult {
    let to_stderr = is_standard_output(&args.output);
    let Some(path) = &args.config else {
        let device = PcapDevice::open(&args.input, &args.output)?;
        let processor = MacRewrite { src: [0x02, 0, 0, 0, 0, 1], dst: [0x02, 0, 0, 0, 0, 2] };
        let (stats, device) = replay(device, processor)?;
        let mut text = counts(&stats);
        text.push_str(&skipped(&device));
        device.finish()?;
        return print_summary(&text, to_stderr);
    };
    // The configuration first: opening the device creates (truncates) the output, which a refused
    // configuration must leave as it was.
    let tables = super::file_tables(path)?;
    let device = PcapDevice::open(&args.input, &args.output)?;
    let worker = Worker::new(tables, WorkerConfig::single_core(1 << 16));
    let (_updates, rx) = update_channel();
    let report = PollLoop::new(device, worker, rx, StopFlag::new(), LoopConfig::default()).run()?;
    let mut text = counts(&report.stats);
    let w = report.processor.stats();
    text.push_str(&format!("  of which reverse NAT {:>5}\n", w.reverse_nat));
    for reason in DropReason::ALL {
        let n = w.dropped(reason);
        if n > 0 {
            text.push_str(&format!("  drop {:<20} {n:>5}\n", reason.name()));
        }
    }
    text.push_str(&skipped(&report.device));
    report.device.finish()?;
    print_summary(&text, to_stderr)
}

/// Whether `path` names this process's standard output (`/dev/stdout`, `/proc/self/fd/1`, the file
/// it is redirected to), where the capture then goes.
fn is_standard_output(path: &std::path::Path) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else { return false };
    match (std::fs::File::from(fd).metadata(), std::fs::metadata(path)) {
        (Ok(out), Ok(path)) => (out.dev(), out.ino()) == (path.dev(), path.ino()),
        _ => false,
    }
}

/// Writes the summary to standard output, or to standard error (`to_stderr`); a reader that went
/// away (`| head`) is no error.
fn print_summary(text: &str, to_stderr: bool) -> CmdResult {
    use std::io::Write;
    let mut stream: Box<dyn Write> =
        if to_stderr { Box::new(std::io::stderr().lock()) } else { Box::new(std::io::stdout().lock()) };
    match stream.write_all(text.as_bytes()).and_then(|()| stream.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
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
fn skipped(device: &PcapDevice) -> String {
    let mut text = String::new();
    let oversize = device.oversize_dropped();
    if oversize > 0 {
        let what = format!("skipped, longer than {} bytes", device.longest_frame());
        text.push_str(&format!("{what:<41}{oversize:>10}\n"));
    }
    let truncated = device.truncated_records();
    if truncated > 0 {
        text.push_str(&format!("skipped, cut short by the snap length    {truncated:>10}\n"));
    }
    if device.ends_inside_a_record() {
        text.push_str(
            "the capture ends inside a record (cut off while being written): \
             the rest of the file was not replayed\n",
        );
    }
    text
}

fn counts(s: &LoopStats) -> String {
    format!(
        "frames read     {:>10}\n  tx (written)  {:>10}\n  pass          {:>10}\n  drop          {:>10}\n",
        s.rx, s.tx, s.pass, s.drop
    )
}
