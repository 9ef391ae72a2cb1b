//! Hidden `lb bench-gen` and `lb bench-forward`: the two ends of scripts/bench-throughput.sh.
//!
//! `bench-gen` sends 60-byte IPv4/UDP frames over AF_XDP (many flows by source port, a send timestamp
//! in the payload), receives what comes back on the same socket and reports received pps and
//! latency percentiles. `bench-forward` runs one poll loop on a pinned core with either the bare
//! floor processor (MAC rewrite, nothing else) or the load balancer, until SIGINT / SIGTERM.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant as StdInstant};

use lb_core::Frame;
use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{MissingSocket, SteeringConfig, VipSteering};
use lb_io::{BusyPoll, Device, LoopConfig, MacRewrite, PollLoop, StopFlag, XskConfig, XskDevice, update_channel};

use super::CmdResult;

/// Payload marker, so foreign frames are not taken for timestamps.
const MAGIC: [u8; 2] = [0x4c, 0x42];

/// Arguments of `lb bench-gen`.
#[derive(Debug, clap::Args)]
pub struct GenArgs {
    /// Interface to send on and receive from.
    #[arg(long)]
    pub iface: String,
    /// Core to pin to.
    #[arg(long)]
    pub core: Option<usize>,
    /// Destination MAC (the forwarder's port).
    #[arg(long)]
    pub dst_mac: String,
    /// Source IPv4 address.
    #[arg(long)]
    pub src_ip: Ipv4Addr,
    /// Destination IPv4 address (the VIP).
    #[arg(long)]
    pub dst_ip: Ipv4Addr,
    /// Destination UDP port.
    #[arg(long, default_value_t = 80)]
    pub dst_port: u16,
    /// Number of flows (source ports 10000 and up).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=55536))]
    pub flows: u16,
    /// Offered rate in packets per second; 0 sends as fast as the ring takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds to send.
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
    /// Destination addresses of returning frames to steer to this socket.
    #[arg(long = "receive")]
    pub receive: Vec<IpAddr>,
    /// Drop the returning frames in the XDP program instead of receiving them (no latency, no
    /// returned count): keeps this core's work per returned frame small at full offered load.
    #[arg(long)]
    pub drop_returns: bool,
    /// Frames one TX system call may send (XDP_MAX_TX_SKB_BUDGET; the kernel's default is 32).
    #[arg(long)]
    pub tx_budget: Option<u32>,
}

/// Arguments of `lb bench-forward`.
#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Interface to serve.
    #[arg(long)]
    pub iface: String,
    /// Core to pin the poll loop to.
    #[arg(long)]
    pub core: Option<usize>,
    /// `floor` (MAC rewrite only) or `lb` (the load balancer, needs --config).
    #[arg(long, default_value = "floor")]
    pub processor: String,
    /// Floor: the Ethernet destination written into every frame.
    #[arg(long)]
    pub dst_mac: Option<String>,
    /// Addresses steered to the socket.
    #[arg(long = "steer")]
    pub steer: Vec<IpAddr>,
    /// Load-balancer configuration (YAML).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Busy-poll: spin instead of sleeping in poll() when idle, and ask for SO_PREFER_BUSY_POLL.
    #[arg(long)]
    pub busy_poll: bool,
    /// Spin instead of sleeping in poll() when idle (without the busy-poll socket options).
    #[arg(long)]
    pub spin: bool,
    /// UMEM chunks (default: lb-io's `XskConfig::new`, as for every option below).
    #[arg(long)]
    pub frames: Option<u32>,
    /// Fill-ring entries.
    #[arg(long)]
    pub fill_ring: Option<u32>,
    /// TX-ring entries.
    #[arg(long)]
    pub tx_ring: Option<u32>,
    /// Frames one TX system call may send (XDP_MAX_TX_SKB_BUDGET; the kernel's own default is 32).
    #[arg(long)]
    pub tx_budget: Option<u32>,
    /// Connection-table entries (`lb run`'s default, and the kernel's nf_conntrack_max here).
    #[arg(long, default_value_t = 1 << 18, value_parser = super::run::conntrack_entries)]
    pub conntrack_entries: usize,
    /// The socket's send buffer in bytes (copy mode: caps the frames in flight to the peer).
    #[arg(long)]
    pub send_buffer: Option<u32>,
}

fn mac_of(iface: &str) -> Result<[u8; 6], String> {
    let text =
        std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).map_err(|e| format!("{iface}: {e}"))?;
    lb_io::netns::parse_mac(text.trim()).ok_or_else(|| format!("{iface}: bad MAC {text:?}"))
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    lb_io::netns::parse_mac(s).ok_or_else(|| format!("bad MAC {s:?}: expected aa:bb:cc:dd:ee:ff"))
}

fn open(
    cfg: &XskConfig,
    steer: &[IpAddr],
    missing_socket: MissingSocket,
) -> Result<(VipSteering, XskDevice, lb_io::bpf::Link), String> {
    let iface = cfg.interface.as_str();
    let mut steering =
        VipSteering::load(SteeringConfig { missing_socket, ..SteeringConfig::default() }).map_err(|e| e.to_string())?;
    steering.set_vips(steer.iter().copied()).map_err(|e| e.to_string())?;
    // (A bind refused with EBUSY right after another run's socket closed is tried again:
    // `XskConfig::busy_wait`.)
    let dev = XskDevice::open(cfg).map_err(|e| e.to_string())?;
    // With `MissingSocket::Drop` the socket stays out of the map: steered frames are dropped.
    if missing_socket == MissingSocket::Pass {
        steering.set_socket(0, dev.fd()).map_err(|e| e.to_string())?;
    }
    let idx = lb_io::xsk::ifindex(iface).ok_or_else(|| format!("no interface {iface}"))?;
    let link = steering.attach(idx, AttachMode::Native).map_err(|e| e.to_string())?;
    Ok((steering, dev, link))
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `lb bench-gen`.
pub fn gen_main(a: GenArgs) -> CmdResult {
    if let Some(c) = a.core {
        lb_io::pin_to_core(c)?;
    }
    StopFlag::watch_signals()?;
    let mut cfg = XskConfig::new(&a.iface, 0);
    cfg.tx_budget = a.tx_budget.or(cfg.tx_budget);
    // The generator keeps the kernel's send buffer: it caps the frames in flight towards the
    // forwarder (back-pressure from a full peer) instead of letting them pile up and drop there.
    cfg.send_buffer = None;
    cfg.tx_ring_size = 2048;
    let missing = if a.drop_returns { MissingSocket::Drop } else { MissingSocket::Pass };
    let (_steering, mut dev, _link) = open(&cfg, &a.receive, missing)?;
    let src_mac = mac_of(&a.iface)?;
    let dst_mac = parse_mac(&a.dst_mac)?;
    let mut template = [0u8; 60];
    template[..6].copy_from_slice(&dst_mac);
    template[6..12].copy_from_slice(&src_mac);
    template[12..14].copy_from_slice(&[0x08, 0x00]);
    template[14..24].copy_from_slice(&[0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17]);
    template[26..30].copy_from_slice(&a.src_ip.octets());
    template[30..34].copy_from_slice(&a.dst_ip.octets());
    let csum = ipv4_checksum(&template[14..34]);
    template[24..26].copy_from_slice(&csum.to_be_bytes());
    template[36..38].copy_from_slice(&a.dst_port.to_be_bytes());
    template[38..40].copy_from_slice(&26u16.to_be_bytes());
    template[42..44].copy_from_slice(&MAGIC);

    let start = StdInstant::now();
    let duration = Duration::from_secs(a.duration);
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 22);
    let (mut sent, mut received, mut seq) = (0u64, 0u64, 0u64);
    let flows = u64::from(a.flows.max(1));
    let mut measure_start = None;
    let warmup = Duration::from_millis(500);
    let (mut rx_at_start, mut sent_at_start) = (0u64, 0u64);
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration + warmup || StopFlag::signalled() {
            break;
        }
        if measure_start.is_none() && elapsed >= warmup {
            measure_start = Some(elapsed);
            rx_at_start = received;
            sent_at_start = sent;
        }
        let budget = if a.rate == 0 {
            64
        } else {
            let due = (elapsed.as_nanos() as u64).saturating_mul(a.rate) / 1_000_000_000;
            due.saturating_sub(sent).min(64) as usize
        };
        if budget > 0 && dev.pending_tx() < 256 {
            let n = dev.transmit_new(budget, |buf| {
                let Some(f) = buf.get_mut(..60) else { return 0 };
                f.copy_from_slice(&template);
                let sport = 10_000 + (seq % flows) as u16;
                f[34..36].copy_from_slice(&sport.to_be_bytes());
                let ts = start.elapsed().as_nanos() as u64;
                f[44..52].copy_from_slice(&ts.to_be_bytes());
                f[52..60].copy_from_slice(&seq.to_be_bytes());
                seq += 1;
                60
            });
            sent += n as u64;
        }
        dev.flush()?;
        let mut frames: [Frame<'_>; 64] = std::array::from_fn(|_| Frame::whole(&mut []));
        let got = dev.receive(&mut frames)?.count;
        let now = start.elapsed().as_nanos() as u64;
        for f in frames.iter().take(got) {
            let d = f.data();
            // UDP payload of an IPv4 frame: after the IP header (IHL) and 8 bytes of UDP.
            let off = 14 + usize::from(d.get(14).copied().unwrap_or(0) & 0x0f) * 4 + 8;
            if d.get(off..off + 2) == Some(&MAGIC[..])
                && let Some(ts) = d.get(off + 2..off + 10)
            {
                let ts = u64::from_be_bytes(ts.try_into().unwrap_or([0; 8]));
                if measure_start.is_some() && latencies.len() < latencies.capacity() {
                    latencies.push(now.saturating_sub(ts).min(u64::from(u32::MAX)) as u32);
                }
                received += 1;
            }
        }
        let none = [None; 64];
        dev.settle(&none[..got])?;
        // At a fixed rate, sleep in poll() until a frame returns (or 1 ms) instead of spinning, so the
        // interface's NAPI thread on this core gets the CPU and latency is not our own scheduling.
        if a.rate > 0 && got == 0 && budget == 0 {
            dev.wait(Duration::from_millis(1))?;
        }
    }
    let measured = start.elapsed().saturating_sub(measure_start.unwrap_or_default()).as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let rx_pps = (received - rx_at_start) as f64 / measured;
    let tx_pps = (sent - sent_at_start) as f64 / measured;
    println!(
        "tx_pps={tx_pps:.0} rx_pps={rx_pps:.0} sent={sent} received={received} p50_us={:.1} p99_us={:.1} samples={}",
        f64::from(pct(0.50)) / 1000.0,
        f64::from(pct(0.99)) / 1000.0,
        latencies.len()
    );
    let s = dev.stats();
    eprintln!(
        "gen AF_XDP: rx_dropped {} rx_ring_full {} fill_empty {} tx_kicks {} napi_id {}",
        s.rx_dropped,
        s.rx_ring_full,
        s.rx_fill_ring_empty,
        s.tx_kicks,
        dev.napi_id().map_or("none".to_string(), |id| id.to_string())
    );
    Ok(())
}

/// `lb bench-forward`.
pub fn forward_main(a: ForwardArgs) -> CmdResult {
    StopFlag::watch_signals()?;
    if let Some(c) = a.core {
        lb_io::pin_to_core(c)?;
    }
    let mut cfg = XskConfig::new(&a.iface, 0);
    cfg.frames = a.frames.unwrap_or(cfg.frames);
    cfg.fill_ring_size = a.fill_ring.unwrap_or(cfg.fill_ring_size);
    cfg.tx_ring_size = a.tx_ring.unwrap_or(cfg.tx_ring_size);
    cfg.tx_budget = a.tx_budget.or(cfg.tx_budget);
    cfg.send_buffer = a.send_buffer.or(cfg.send_buffer);
    if a.busy_poll {
        cfg.busy_poll = Some(BusyPoll { usecs: 20, budget: 64 });
    }
    // The load balancer's tables (`None`: the floor), read before the interface is touched, so a
    // refused file attaches nothing.
    let lb_tables = match a.processor.as_str() {
        "floor" => None,
        "lb" => Some(super::file_tables(a.config.as_deref().ok_or("--config is required for --processor lb")?)?),
        other => return Err(format!("unknown --processor {other:?} (floor or lb)").into()),
    };
    let (_steering, dev, _link) = open(&cfg, &a.steer, MissingSocket::Pass)?;
    let config_loop = LoopConfig {
        idle_spins: if a.busy_poll || a.spin { usize::MAX } else { LoopConfig::default().idle_spins },
        ..LoopConfig::default()
    };
    println!("ready");
    let stats = match lb_tables {
        None => {
            let dst = parse_mac(a.dst_mac.as_deref().ok_or("--dst-mac is required for the floor")?)?;
            let p = MacRewrite { src: mac_of(&a.iface)?, dst };
            let (_updates, rx) = update_channel();
            let report = PollLoop::new(dev, p, rx, StopFlag::new(), config_loop).run()?;
            print_xsk(&report.device);
            report.stats
        }
        Some(tables) => {
            let worker =
                lb_core::worker::Worker::new(tables, lb_core::worker::WorkerConfig::single_core(a.conntrack_entries));
            let (_updates, rx) = update_channel();
            let report = PollLoop::new(dev, worker, rx, StopFlag::new(), config_loop).run()?;
            print_xsk(&report.device);
            let w = report.processor.stats();
            eprintln!("worker: rx {} tx {} dropped {} passed {}", w.rx, w.tx, w.dropped_total(), w.passed);
            for reason in lb_core::stats::DropReason::ALL {
                if w.dropped(reason) > 0 {
                    eprintln!("  drop {reason}: {}", w.dropped(reason));
                }
            }
            report.stats
        }
    };
    // Context switches of this (the loop's) thread: how often it gave the core to l0's NAPI thread.
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let switches =
        |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map_or("?".to_string(), |v| v.trim().to_string());
    eprintln!(
        "forwarder: rx {} tx {} pass {} drop {} stalled {} idle_waits {} ctxt_switches voluntary {} involuntary {}",
        stats.rx,
        stats.tx,
        stats.pass,
        stats.drop,
        stats.stalled_flushes,
        stats.idle_waits,
        switches("voluntary_ctxt_switches:"),
        switches("nonvoluntary_ctxt_switches:")
    );
    Ok(())
}

fn print_xsk(dev: &XskDevice) {
    let s = dev.stats();
    eprintln!(
        "forwarder AF_XDP: rx_dropped {} rx_ring_full {} fill_empty {} tx_kicks {} rx_wakeups {} napi_id {} tx_budget {}",
        s.rx_dropped,
        s.rx_ring_full,
        s.rx_fill_ring_empty,
        s.tx_kicks,
        s.rx_wakeups,
        dev.napi_id().map_or("none".to_string(), |id| id.to_string()),
        dev.tx_budget()
    );
}
