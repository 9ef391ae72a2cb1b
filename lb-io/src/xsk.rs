//! The AF_XDP device: one socket bound to one NIC RX queue, its UMEM and its four rings.
//!
//! ```text
//!   free chunks ──refill (in chunks)──► FILL ring ──kernel receives──► RX ring ──receive()──► frames
//!        ▲                                                                                    │ settle
//!        ├──────────── recycled (Pass / Drop) ◄──────────────────────────────────────────────┤
//!        │                                                                                    ▼
//!        └──── COMPLETION ring ◄──kernel sent── TX ring ◄──flush(): submit + kick (≤ tx_budget)── pending TX
//! ```
//! Every frame is one UMEM chunk; the kernel puts a received packet `XDP_PACKET_HEADROOM` (256) plus
//! the configured headroom into its chunk, so a rewrite can grow the packet at the front (tunnel
//! encapsulation) without copying.
//!
//! Why this file drives the rings itself instead of through the `xdp` crate (0.8, which works and was
//! read closely): its rings do not expose the `XDP_RING_NEED_WAKEUP` flag, so a user must either make
//! a system call on every enqueue or never; its fill-ring enqueue is all-or-nothing, which starves the
//! fill ring when asked for more than fits; and its `Packet` hides the chunk, so a [`Frame`] with the
//! chunk's headroom cannot be lent without re-deriving its pointers anyway. The ring protocol itself
//! is the kernel's (Documentation/networking/af_xdp.rst): a producer index, a consumer index, a flags
//! word and a power-of-two array, with acquire/release ordering on the indices.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lb_core::Frame;

use crate::device::{Device, DeviceError, FlushProgress, MAX_BURST, Received, Span};

/// `XDP_MAX_TX_SKB_BUDGET` from linux/if_xdp.h (6.17+), not yet in the `libc` crate.
const XDP_MAX_TX_SKB_BUDGET: i32 = 9;

/// Chunks handed to the fill ring per refill step (the ring takes what fits, never all-or-nothing).
const REFILL_STEP: u32 = 64;
/// Upper bound on kicks in one flush, so a ring that never drains cannot hold the loop.
const MAX_KICKS_PER_FLUSH: usize = 16;

/// Whether to ask for zero-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Zero-copy when the driver offers it, else copy (the kernel decides; veth: copy).
    #[default]
    Auto,
    /// Copy mode always.
    Copy,
    /// Zero-copy or fail.
    ZeroCopy,
}

/// Busy polling: the poll loop drives the NIC's NAPI itself instead of waiting for interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPoll {
    /// SO_BUSY_POLL: microseconds to busy-poll in a blocking call.
    pub usecs: u32,
    /// SO_BUSY_POLL_BUDGET: packets per busy-poll round.
    pub budget: u32,
}

/// How to open an AF_XDP socket.
#[derive(Debug, Clone)]
pub struct XskConfig {
    /// Interface name, e.g. `eth0`.
    pub interface: String,
    /// RX queue index.
    pub queue: u32,
    /// UMEM chunks (frames). Power of two.
    pub frames: u32,
    /// Chunk size: 2048 or 4096.
    pub frame_size: u32,
    /// Entries in the RX and completion rings. Power of two.
    pub ring_size: u32,
    /// Entries in the fill ring. Power of two. Chunks waiting here are what the kernel can receive
    /// into while the loop is busy; when it runs dry the kernel drops after doing the receive work.
    /// At most half the UMEM's chunks wait here, however large the ring: the rest cover frames in
    /// flight and the copies of frames other loops hand over.
    pub fill_ring_size: u32,
    /// Entries in the TX ring. Power of two. Chunks queued here wait for the peer; a TX ring much
    /// deeper than the fill ring lets a slow peer hold the chunks the fill ring needs.
    pub tx_ring_size: u32,
    /// Extra headroom the kernel leaves before each received packet, on top of its own 256 bytes.
    pub headroom: u32,
    /// Copy or zero-copy.
    pub copy_mode: CopyMode,
    /// Busy polling; `None` leaves the socket interrupt-driven. Refused options are logged, not fatal.
    pub busy_poll: Option<BusyPoll>,
    /// Copy mode: frames one TX system call may send (XDP_MAX_TX_SKB_BUDGET, Linux 6.17+, between 32
    /// and `ring_size`); `None` keeps the kernel's 32. Refused (older kernel) is logged, not fatal.
    pub tx_budget: Option<u32>,
    /// Copy mode: the socket's send buffer in bytes (SO_SNDBUFFORCE, else SO_SNDBUF). Every frame
    /// sent is an skb charged to it until the peer frees it (~0.8 KB for a 60-byte frame), so the
    /// default (net.core.wmem_default, ~208 KB) stalls TX at ~270 frames in flight behind a slow peer.
    /// `None` keeps the default. Refused is logged, not fatal.
    pub send_buffer: Option<u32>,
    /// How long a bind the kernel refuses with EBUSY (the queue has a socket) is tried again. The
    /// kernel frees a closed socket's queue only after an RCU grace period (its buffer pool's
    /// release is deferred work), ~30 ms after the close on this project's test machine, where 186
    /// of 200 opens right after a close were refused. So a process restarted in place (by a
    /// supervisor, after a crash) can find its queues still taken for a moment. A queue that
    /// another live socket holds is still refused, after this long. `Duration::ZERO` tries once.
    pub busy_wait: Duration,
}

impl XskConfig {
    /// Defaults for `interface` queue `queue`: 4096 chunks of 4 KiB; fill, RX and completion rings
    /// of 2048, a TX ring of 512; copy mode sends up to 128 frames per kick with a 4 MiB send
    /// buffer (BENCHMARKS.md "lb-io / throughput" has the runs behind these numbers).
    pub fn new(interface: &str, queue: u32) -> Self {
        XskConfig {
            interface: interface.to_string(),
            queue,
            frames: 4096,
            frame_size: 4096,
            ring_size: 2048,
            fill_ring_size: 2048,
            tx_ring_size: 512,
            headroom: 0,
            copy_mode: CopyMode::Auto,
            busy_poll: None,
            tx_budget: Some(128),
            send_buffer: Some(4 << 20),
            busy_wait: Duration::from_secs(1),
        }
    }
}

/// Why an AF_XDP socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// The interface does not exist.
    #[error("interface {0:?} not found")]
    NoInterface(String),
    /// A size is not a power of two or out of range.
    #[error("{field} = {value} is invalid: {why}")]
    Config {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u32,
        /// What is expected.
        why: &'static str,
    },
    /// A setup system call failed.
    #[error("{op} on {interface} queue {queue} failed: {source}{}", xsk_hint(op, source))]
    Sys {
        /// The call.
        op: &'static str,
        /// Interface.
        interface: String,
        /// Queue.
        queue: u32,
        /// The OS error.
        source: std::io::Error,
    },
}

fn xsk_hint(op: &str, e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        // The kernel's refusal of a UMEM beyond RLIMIT_MEMLOCK (xdp_umem_account_pages).
        Some(libc::ENOBUFS) if op == "XDP_UMEM_REG" => {
            " (the UMEM is more than the locked-memory limit allows: needs CAP_IPC_LOCK, or a higher `ulimit -l`)"
        }
        Some(libc::EPERM) => " (needs root or CAP_NET_RAW + CAP_NET_ADMIN)",
        Some(libc::EOPNOTSUPP) => " (the driver has no zero-copy support; use copy mode)",
        Some(libc::EBUSY) => " (another socket is bound to this queue)",
        Some(libc::EAFNOSUPPORT) => " (kernel built without AF_XDP)",
        _ => "",
    }
}

impl XskError {
    /// True when the kernel refused for lack of privilege or support (tests skip on this).
    pub fn is_refused(&self) -> bool {
        matches!(self, XskError::Sys { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES | libc::EAFNOSUPPORT)))
    }
}

/// A memory mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped exactly once, here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One ring of the socket: indices and flags shared with the kernel, and a local cache of them.
struct Ring<T> {
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    descs: *mut T,
    mask: u32,
    size: u32,
    /// Local copies: for a producer ring, `cached_prod` is ours and `cached_cons` the kernel's last
    /// seen; for a consumer ring the other way round.
    cached_prod: u32,
    cached_cons: u32,
    _map: Mapping,
}

impl<T: Copy> Ring<T> {
    /// Maps ring `pgoff` of `fd` with the kernel's offsets.
    fn map(fd: i32, off: &libc::xdp_ring_offset, size: u32, pgoff: i64) -> std::io::Result<Self> {
        let len = off.desc as usize + size as usize * std::mem::size_of::<T>();
        // SAFETY: mapping a ring of our own AF_XDP socket at the page offset the ABI defines for it,
        // with the length the kernel's offsets give; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = ptr.cast::<u8>();
        // SAFETY: the offsets come from XDP_MMAP_OFFSETS for this very mapping and lie inside `len`;
        // the index and flag words are u32s the kernel updates atomically.
        let ring = unsafe {
            Ring {
                producer: base.add(off.producer as usize).cast(),
                consumer: base.add(off.consumer as usize).cast(),
                flags: base.add(off.flags as usize).cast(),
                descs: base.add(off.desc as usize).cast(),
                mask: size - 1,
                size,
                cached_prod: 0,
                cached_cons: 0,
                _map: Mapping { ptr: base, len },
            }
        };
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into our live mapping (see `map`), aligned, shared with the kernel as atomic.
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as `producer`.
        unsafe { &*self.consumer }
    }

    /// True when the kernel asks for a system call to make progress (XDP_USE_NEED_WAKEUP).
    fn needs_wakeup(&self) -> bool {
        // SAFETY: as `producer`.
        let flags = unsafe { &*self.flags };
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    // --- producer side (FILL, TX) ---

    /// Free slots, refreshing the kernel's consumer index only when the cache says "not enough".
    fn free(&mut self, want: u32) -> u32 {
        let free = self.size - self.cached_prod.wrapping_sub(self.cached_cons);
        if free >= want {
            return free;
        }
        self.cached_cons = self.consumer().load(Ordering::Acquire);
        self.size - self.cached_prod.wrapping_sub(self.cached_cons)
    }

    /// Writes `item` into the next producer slot (after `free` said there is room).
    fn write(&mut self, item: T) {
        let i = (self.cached_prod & self.mask) as usize;
        // SAFETY: `i <= mask < size`, so the slot lies in the mapped array; the caller checked via
        // `free` that the kernel has consumed this slot, so it is ours to write.
        unsafe { self.descs.add(i).write(item) };
        self.cached_prod = self.cached_prod.wrapping_add(1);
    }

    /// Slots published but not yet taken by the kernel (refreshes the kernel's consumer index).
    fn unconsumed(&mut self) -> u32 {
        self.cached_cons = self.consumer().load(Ordering::Acquire);
        self.cached_prod.wrapping_sub(self.cached_cons)
    }

    /// Publishes the slots written so far.
    fn submit(&mut self) {
        self.producer().store(self.cached_prod, Ordering::Release);
    }

    // --- consumer side (RX, COMPLETION) ---

    /// Entries ready to read, up to `max`.
    fn available(&mut self, max: u32) -> u32 {
        let mut n = self.cached_prod.wrapping_sub(self.cached_cons);
        if n == 0 {
            self.cached_prod = self.producer().load(Ordering::Acquire);
            n = self.cached_prod.wrapping_sub(self.cached_cons);
        }
        n.min(max)
    }

    /// Reads the next entry (after `available` said there is one).
    fn read(&mut self) -> T {
        let i = (self.cached_cons & self.mask) as usize;
        self.cached_cons = self.cached_cons.wrapping_add(1);
        // SAFETY: `i < size` (masked) and the kernel published this entry (acquire load in
        // `available`), so it is initialised and will not change until we release it.
        unsafe { self.descs.add(i).read() }
    }

    /// Hands the entries read so far back to the kernel.
    fn release(&mut self) {
        self.consumer().store(self.cached_cons, Ordering::Release);
    }
}

/// Counters from the kernel (XDP_STATISTICS) and from the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Frames the kernel dropped for this socket for other reasons than a full RX ring: one longer
    /// than a chunk, or one that found no chunk to go in (the fill ring empty, also counted in
    /// `rx_fill_ring_empty`). A full RX ring's drops are `rx_ring_full`.
    pub rx_dropped: u64,
    /// Invalid descriptors on the RX ring, as the kernel counts them (it writes none: 0).
    pub rx_invalid_descs: u64,
    /// Bad descriptors we put on the TX ring.
    pub tx_invalid_descs: u64,
    /// Times the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty (we did not refill fast enough).
    pub rx_fill_ring_empty: u64,
    /// Times the kernel found the TX ring empty on a kick.
    pub tx_ring_empty: u64,
    /// System calls made to kick TX.
    pub tx_kicks: u64,
    /// System calls made to wake RX (need_wakeup on the fill ring).
    pub rx_wakeups: u64,
}

/// What an error from a TX kick means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KickRefusal {
    /// The ring is busy, the driver has no room or the link is down: the next flush tries again.
    Transient,
    /// An error only when the socket carries one (it was unbound: its interface is gone); else the
    /// driver's wakeup refused while a queue is reconfigured, and the next flush tries again.
    UnlessUnbound,
    /// An error.
    Fatal,
}

/// How `errno` from `sendto` on the socket is taken.
fn tx_kick_refusal(errno: i32) -> KickRefusal {
    match errno {
        // The kernel's (ENOBUFS, ENETDOWN, EAGAIN, EBUSY: the ones the kernel's xdpsock sample
        // ignores) and the drivers' (ixgbe, i40e: the device down or being reconfigured).
        libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR | libc::ENETDOWN => KickRefusal::Transient,
        // The kernel returns ENXIO for an unbound socket, and zero-copy drivers' wakeups return ENXIO
        // (ixgbe) or EINVAL (i40e, ice, mlx5) while a queue has no buffer pool or XDP program during
        // a reset (`ethtool -G` / `-L`, a link down). One that stays refused leaves the TX ring full,
        // and the poll loop gives up on the frames queued behind it and counts them (`tx_abandoned`).
        libc::ENXIO | libc::EINVAL => KickRefusal::UnlessUnbound,
        _ => KickRefusal::Fatal,
    }
}

/// An AF_XDP socket bound to one queue, as a [`Device`].
pub struct XskDevice {
    fd: OwnedFd,
    umem: Mapping,
    frame_size: u64,
    fill: Ring<u64>,
    completion: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    /// Chunk addresses owned by userspace and not in use.
    free: Vec<u64>,
    /// Chunk addresses lent in the current burst, by position.
    lent: [u64; MAX_BURST],
    lent_n: usize,
    /// Descriptors waiting for room on the TX ring.
    pending: VecDeque<libc::xdp_desc>,
    zero_copy: bool,
    /// Chunks in the UMEM.
    frames: usize,
    /// Most chunks the fill ring holds, whatever its size: half the UMEM (see `refill`).
    fill_target: u32,
    /// Busy polling configured: every empty receive makes a system call that polls the NAPI.
    busy_poll: bool,
    /// Frames the kernel sends per TX kick in copy mode (32 unless XDP_MAX_TX_SKB_BUDGET took).
    tx_budget: usize,
    name: String,
    kicks: u64,
    wakeups: u64,
}

// SAFETY: the raw pointers all point into mappings this device owns; the device is used by one thread
// at a time (moved into its poll loop), and the kernel side of the rings is designed for concurrent
// access through the atomic indices.
unsafe impl Send for XskDevice {}

impl std::fmt::Debug for XskDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskDevice").field("name", &self.name).field("zero_copy", &self.zero_copy).finish()
    }
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` is a live `T` and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(fd, level, name, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn getsockopt<T>(fd: i32, level: i32, name: i32, value: &mut T) -> std::io::Result<()> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, exclusively borrowed `T` of plain integers and `len` is its size.
    let rc = unsafe { libc::getsockopt(fd, level, name, (value as *mut T).cast(), &mut len) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The interface index of `name`.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

impl XskDevice {
    /// Creates the UMEM and rings, fills the fill ring and binds to the queue. A bind refused with
    /// EBUSY is tried again, from a new socket, for up to [`XskConfig::busy_wait`].
    pub fn open(config: &XskConfig) -> Result<Self, XskError> {
        let start = std::time::Instant::now();
        loop {
            match XskDevice::open_once(config) {
                Err(XskError::Sys { op: "bind", ref source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < config.busy_wait =>
                {
                    // No event says when the kernel's deferred release has run: poll for it.
                    std::thread::sleep(Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    fn open_once(config: &XskConfig) -> Result<Self, XskError> {
        let sys = |op: &'static str| {
            let interface = config.interface.clone();
            let queue = config.queue;
            move |source: std::io::Error| XskError::Sys { op, interface, queue, source }
        };
        for (field, value) in [
            ("frames", config.frames),
            ("ring_size", config.ring_size),
            ("fill_ring_size", config.fill_ring_size),
            ("tx_ring_size", config.tx_ring_size),
        ] {
            if !value.is_power_of_two() {
                return Err(XskError::Config { field, value, why: "must be a power of two" });
            }
        }
        if config.frame_size != 2048 && config.frame_size != 4096 {
            return Err(XskError::Config {
                field: "frame_size",
                value: config.frame_size,
                why: "must be 2048 or 4096",
            });
        }
        // (Saturating: an absurd headroom is refused here, not wrapped into a small one.)
        if config.headroom.saturating_add(256 + 64) > config.frame_size / 2 {
            return Err(XskError::Config {
                field: "headroom",
                value: config.headroom,
                why: "leaves less than half a chunk for the packet",
            });
        }
        let ifindex = ifindex(&config.interface).ok_or_else(|| XskError::NoInterface(config.interface.clone()))?;

        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(sys("socket(AF_XDP)")(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let umem_len = config.frames as usize * config.frame_size as usize;
        // SAFETY: an anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                umem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(sys("mmap(UMEM)")(std::io::Error::last_os_error()));
        }
        let umem = Mapping { ptr: ptr.cast(), len: umem_len };
        // Transparent huge pages where the system allows them (THP "madvise" or "always"): every
        // packet touches a different chunk, and with 4 KiB pages a 16 MiB UMEM needs 4096 TLB entries
        // between the kernel's copy and the loop's rewrite. Advice only; refused is not an error.
        // SAFETY: advice on the mapping created just above, with its exact bounds.
        unsafe { libc::madvise(ptr, umem_len, libc::MADV_HUGEPAGE) };
        // Fault every page in now (as MAP_POPULATE did), so the fast path never takes a page fault.
        for off in (0..umem_len).step_by(4096) {
            // SAFETY: `off < umem_len`, inside the fresh private mapping nothing else references.
            unsafe { umem.ptr.add(off).write_volatile(0) };
        }

        let reg = libc::xdp_umem_reg {
            addr: umem.ptr as u64,
            len: umem_len as u64,
            chunk_size: config.frame_size,
            headroom: config.headroom,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg).map_err(sys("XDP_UMEM_REG"))?;
        for (opt, size) in [
            (libc::XDP_UMEM_FILL_RING, config.fill_ring_size),
            (libc::XDP_UMEM_COMPLETION_RING, config.ring_size),
            (libc::XDP_RX_RING, config.ring_size),
            (libc::XDP_TX_RING, config.tx_ring_size),
        ] {
            setsockopt(raw, libc::SOL_XDP, opt, &size).map_err(sys("ring size"))?;
        }
        // SAFETY: xdp_mmap_offsets is plain integers; all-zero is valid.
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        getsockopt(raw, libc::SOL_XDP, libc::XDP_MMAP_OFFSETS, &mut off).map_err(sys("XDP_MMAP_OFFSETS"))?;

        let n = config.ring_size;
        let fill = Ring::<u64>::map(raw, &off.fr, config.fill_ring_size, libc::XDP_UMEM_PGOFF_FILL_RING as i64)
            .map_err(sys("mmap(fill)"))?;
        let completion = Ring::<u64>::map(raw, &off.cr, n, libc::XDP_UMEM_PGOFF_COMPLETION_RING as i64)
            .map_err(sys("mmap(completion)"))?;
        let rx = Ring::<libc::xdp_desc>::map(raw, &off.rx, n, libc::XDP_PGOFF_RX_RING).map_err(sys("mmap(rx)"))?;
        let tx = Ring::<libc::xdp_desc>::map(raw, &off.tx, config.tx_ring_size, libc::XDP_PGOFF_TX_RING)
            .map_err(sys("mmap(tx)"))?;

        let mut dev = XskDevice {
            fd,
            umem,
            frame_size: u64::from(config.frame_size),
            fill,
            completion,
            rx,
            tx,
            free: (0..u64::from(config.frames)).rev().map(|i| i * u64::from(config.frame_size)).collect(),
            lent: [0; MAX_BURST],
            lent_n: 0,
            pending: VecDeque::with_capacity(config.frames as usize),
            zero_copy: false,
            frames: config.frames as usize,
            fill_target: (config.frames / 2).max(1).min(config.fill_ring_size),
            busy_poll: config.busy_poll.is_some(),
            tx_budget: 32,
            name: format!("{}#{}", config.interface, config.queue),
            kicks: 0,
            wakeups: 0,
        };
        // Up to half the chunks wait on the fill ring for packets; the rest cover frames in flight.
        dev.refill(dev.fill_target);

        if let Some(bp) = config.busy_poll {
            let one: i32 = 1;
            for (name, opt, v) in [
                ("SO_PREFER_BUSY_POLL", libc::SO_PREFER_BUSY_POLL, one),
                ("SO_BUSY_POLL", libc::SO_BUSY_POLL, bp.usecs as i32),
                ("SO_BUSY_POLL_BUDGET", libc::SO_BUSY_POLL_BUDGET, bp.budget as i32),
            ] {
                if let Err(e) = setsockopt(raw, libc::SOL_SOCKET, opt, &v) {
                    tracing::warn!(device = %dev.name, "{name} refused ({e}); continuing without it");
                }
            }
        }

        if let Some(budget) = config.tx_budget {
            if let Err(e) = setsockopt(raw, libc::SOL_XDP, XDP_MAX_TX_SKB_BUDGET, &budget) {
                tracing::warn!(device = %dev.name, budget, "XDP_MAX_TX_SKB_BUDGET refused ({e}); the kernel sends 32 frames per kick");
            } else {
                dev.tx_budget = budget as usize;
            }
        }

        if let Some(bytes) = config.send_buffer {
            let v = i32::try_from(bytes).unwrap_or(i32::MAX);
            if setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &v).is_err()
                && let Err(e) = setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, &v)
            {
                tracing::warn!(device = %dev.name, bytes, "SO_SNDBUF refused ({e}); keeping the default");
            }
        }

        let mode_flag = match config.copy_mode {
            CopyMode::Auto => 0,
            CopyMode::Copy => libc::XDP_COPY,
            CopyMode::ZeroCopy => libc::XDP_ZEROCOPY,
        };
        let addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_USE_NEED_WAKEUP | mode_flag,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: config.queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `addr` is a valid sockaddr_xdp and its size is passed.
        let rc = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_xdp).cast(),
                std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(sys("bind")(std::io::Error::last_os_error()));
        }
        let mut opts = libc::xdp_options { flags: 0 };
        if getsockopt(raw, libc::SOL_XDP, libc::XDP_OPTIONS, &mut opts).is_ok() {
            dev.zero_copy = opts.flags & libc::XDP_OPTIONS_ZEROCOPY != 0;
        }
        tracing::info!(device = %dev.name, zero_copy = dev.zero_copy, "AF_XDP socket bound");
        Ok(dev)
    }

    /// The socket's descriptor (to put into the XSKMAP).
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// True when bound in zero-copy mode.
    pub fn is_zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// The NAPI instance the kernel recorded for this socket on its first received frame
    /// (SO_INCOMING_NAPI_ID); busy polling drives that NAPI. `None` before a frame arrived, or when
    /// the driver registered its queue without one (then busy polling cannot work).
    pub fn napi_id(&self) -> Option<u32> {
        let mut id: u32 = 0;
        getsockopt(self.fd(), libc::SOL_SOCKET, libc::SO_INCOMING_NAPI_ID, &mut id).ok()?;
        (id != 0).then_some(id)
    }

    /// Frames one TX kick may send in copy mode (what the kernel accepted as XDP_MAX_TX_SKB_BUDGET).
    pub fn tx_budget(&self) -> usize {
        self.tx_budget
    }

    /// Kernel and device counters.
    pub fn stats(&self) -> XskStats {
        // SAFETY: xdp_statistics is plain integers; all-zero is valid.
        let mut s: libc::xdp_statistics = unsafe { std::mem::zeroed() };
        let _ = getsockopt(self.fd(), libc::SOL_XDP, libc::XDP_STATISTICS, &mut s);
        XskStats {
            rx_dropped: s.rx_dropped,
            rx_invalid_descs: s.rx_invalid_descs,
            tx_invalid_descs: s.tx_invalid_descs,
            rx_ring_full: s.rx_ring_full,
            rx_fill_ring_empty: s.rx_fill_ring_empty_descs,
            tx_ring_empty: s.tx_ring_empty_descs,
            tx_kicks: self.kicks,
            rx_wakeups: self.wakeups,
        }
    }

    /// Frames on the TX ring that the kernel has not taken yet (queued ones not yet on the ring are
    /// [`Device::pending_tx`]).
    pub fn tx_unsent(&mut self) -> u32 {
        self.tx.unconsumed()
    }

    /// Queues up to `n` new frames for transmission, each written by `write` into a free chunk (it
    /// gets the chunk from the packet's first byte on and returns the packet length; 0, or a length
    /// that does not fit, skips that frame). `write` is called at most `n` times: a declined chunk
    /// goes back, and asking again for it would loop for as long as `write` declines.
    /// Returns how many were queued; send them with [`Device::flush`]. For traffic generators.
    pub fn transmit_new(&mut self, n: usize, mut write: impl FnMut(&mut [u8]) -> usize) -> usize {
        // Keep a quarter of the chunks free for the receive side.
        let reserve = self.frames / 4;
        let mut queued = 0;
        let headroom = 256usize;
        let size = self.frame_size as usize;
        for _ in 0..n {
            if self.free.len() <= reserve {
                break;
            }
            let Some(base) = self.free.pop() else { break };
            // SAFETY: `base` is a free chunk start inside the UMEM (from our free list, so neither the
            // kernel nor a lent frame holds it); the slice covers that chunk only and ends before
            // this function returns.
            let chunk = unsafe { std::slice::from_raw_parts_mut(self.umem.ptr.add(base as usize), size) };
            let len = chunk.get_mut(headroom..).map_or(0, &mut write);
            if len == 0 || len > size - headroom {
                self.free.push(base);
                continue;
            }
            self.pending.push_back(libc::xdp_desc { addr: base + headroom as u64, len: len as u32, options: 0 });
            queued += 1;
        }
        queued
    }

    /// Moves up to `max` free chunks to the fill ring, in steps, taking whatever room there is up to
    /// `fill_target` chunks on the ring. A fill ring as deep as the UMEM once took every free chunk,
    /// and `transmit_copy` (which leaves a quarter of the chunks free) then never found one.
    fn refill(&mut self, max: u32) -> u32 {
        let mut done = 0;
        while done < max && !self.free.is_empty() {
            // The kernel's consumer index is read again only when the cached one says "at the target".
            let held = match self.fill.cached_prod.wrapping_sub(self.fill.cached_cons) {
                held if held < self.fill_target => held,
                _ => self.fill.unconsumed(),
            };
            let room =
                self.fill.free(REFILL_STEP).min(self.fill_target.saturating_sub(held)).min(REFILL_STEP).min(max - done);
            if room == 0 {
                break;
            }
            for _ in 0..room {
                let Some(addr) = self.free.pop() else { break };
                self.fill.write(addr);
                done += 1;
            }
            self.fill.submit();
        }
        done
    }

    /// Reaps the completion ring into the free list.
    fn reap(&mut self) -> usize {
        let n = self.completion.available(u32::MAX);
        for _ in 0..n {
            let addr = self.completion.read();
            self.free.push(addr & !(self.frame_size - 1));
        }
        if n > 0 {
            self.completion.release();
        }
        n as usize
    }

    /// `sendto(fd, NULL, 0, MSG_DONTWAIT)`: makes the kernel transmit (copy mode: up to 32 frames).
    fn kick_tx(&mut self) -> Result<(), DeviceError> {
        self.kicks += 1;
        // SAFETY: a zero-length send with no buffer on our own socket.
        let rc = unsafe { libc::sendto(self.fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match tx_kick_refusal(e.raw_os_error().unwrap_or(0)) {
                KickRefusal::Transient => {}
                KickRefusal::UnlessUnbound => {
                    self.unbound("sendto (TX kick): the socket was unbound, its interface is gone")?;
                }
                KickRefusal::Fatal => {
                    return Err(DeviceError::Io { op: "sendto (TX kick)", device: self.name.clone(), source: e });
                }
            }
        }
        Ok(())
    }

    /// `recvfrom(fd, NULL, 0, MSG_DONTWAIT)`: wakes the kernel to use the fill ring / busy-poll.
    /// ENXIO (the socket was unbound: its interface is gone) is an error; the rest are transient.
    fn wake_rx(&mut self) -> Result<(), DeviceError> {
        self.wakeups += 1;
        // SAFETY: a zero-length receive with no buffer on our own socket.
        let rc = unsafe {
            libc::recvfrom(
                self.fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        // ENXIO also comes from some drivers' wakeup while a queue is reconfigured (ixgbe without a
        // pool yet): only an unbound socket, which carries the kernel's ENETDOWN, is an error.
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            self.unbound("recvfrom (RX wakeup): the socket was unbound, its interface is gone")?;
        }
        Ok(())
    }

    /// The error an unbound socket carries (the kernel sets ENETDOWN when the socket's interface is
    /// unregistered; reading it clears it), as a [`DeviceError`] for `op`.
    fn unbound(&self, op: &'static str) -> Result<(), DeviceError> {
        let mut err: i32 = 0;
        if getsockopt(self.fd(), libc::SOL_SOCKET, libc::SO_ERROR, &mut err).is_ok() && err != 0 {
            return Err(DeviceError::Io {
                op,
                device: self.name.clone(),
                source: std::io::Error::from_raw_os_error(err),
            });
        }
        Ok(())
    }
}

impl Device for XskDevice {
    /// `rx_dropped` (no fill-ring buffer, a frame too large for a chunk) and `rx_ring_full` of the
    /// kernel's XDP_STATISTICS.
    fn kernel_rx_dropped(&self) -> u64 {
        let s = self.stats();
        s.rx_dropped + s.rx_ring_full
    }

    fn receive<'a>(&'a mut self, frames: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
        debug_assert_eq!(self.lent_n, 0, "receive called twice without settle");
        // Take back the chunks the kernel has finished sending, then keep the fill ring stocked, a
        // step at a time. Reaping here rather than only in `flush` matters: once nothing waits to be
        // sent the loop stops flushing, and the chunks on the completion ring would otherwise stay
        // there while the fill ring runs dry and the kernel drops what arrives (measured: 0.69 M
        // fill-ring-empty drops in a 4 s run of the floor loop).
        self.reap();
        self.refill(REFILL_STEP * 2);
        let want = frames.len().min(MAX_BURST) as u32;
        let n = self.rx.available(want);
        if n == 0 {
            // With busy polling, the empty receive itself drives the queue's NAPI (recvfrom busy-polls).
            if self.busy_poll || self.fill.needs_wakeup() {
                self.wake_rx()?;
            }
            // Frames a flush's kicks could not move (the completion ring full, the driver busy) stay
            // on the TX ring with nothing queued behind them, and the loop flushes only while
            // something is queued: an idle loop, spinning or between waits, passes here instead, so
            // it kicks them on. (Without this a spinning loop left them there until new traffic came.)
            if self.tx.unconsumed() > 0 && (self.tx.needs_wakeup() || !self.zero_copy) {
                self.kick_tx()?;
                self.reap();
            }
            return Ok(Received::frames(0));
        }
        let mask = !(self.frame_size - 1);
        let mut spans = [(0u64, 0usize, 0usize); MAX_BURST];
        for (i, span) in spans.iter_mut().enumerate().take(n as usize) {
            let d = self.rx.read();
            let base = d.addr & mask;
            self.lent[i] = base;
            *span = (base, (d.addr - base) as usize, d.len as usize);
        }
        self.rx.release();
        self.lent_n = n as usize;
        let size = self.frame_size as usize;
        for (slot, &(base, start, len)) in frames.iter_mut().zip(spans.iter()).take(n as usize) {
            // SAFETY: `base` is the start of a chunk inside the UMEM (the kernel only returns
            // addresses we gave it, masked to the chunk), so `base..base + size` lies in the mapping.
            // The kernel handed this chunk to us through the RX ring and will not touch it until we
            // put it back on the fill or TX ring (in `settle`, after this borrow ends); chunks are
            // disjoint, so the slices of one burst never alias; and they live no longer than `'a`,
            // the borrow of this device that owns the mapping.
            let buf = unsafe { std::slice::from_raw_parts_mut(self.umem.ptr.add(base as usize), size) };
            *slot = Frame::new(buf, start, len);
        }
        Ok(Received::frames(n as usize))
    }

    fn settle(&mut self, spans: &[Option<Span>]) -> Result<usize, DeviceError> {
        let mut queued = 0;
        let size = self.frame_size as usize;
        for (i, &base) in self.lent.iter().enumerate().take(self.lent_n) {
            match spans.get(i).copied().flatten() {
                Some(s) if s.start + s.len <= size && s.len > 0 => {
                    self.pending.push_back(libc::xdp_desc {
                        addr: base + s.start as u64,
                        len: s.len as u32,
                        options: 0,
                    });
                    queued += 1;
                }
                _ => self.free.push(base),
            }
        }
        self.lent_n = 0;
        Ok(queued)
    }

    fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
        let mut completed = self.reap();
        let room = self.tx.free(self.pending.len() as u32) as usize;
        let submitted = room.min(self.pending.len());
        for _ in 0..submitted {
            if let Some(d) = self.pending.pop_front() {
                self.tx.write(d);
            }
        }
        if submitted > 0 {
            self.tx.submit();
        }
        // Copy mode transmits at most `tx_budget` frames per system call: kick while the kernel has not yet
        // taken everything off the TX ring. Counting what it has not taken (rather than what is not
        // yet completed: a sent frame completes only when the peer frees its copy) avoids kicks
        // that find the ring empty; a kick that moves nothing (the driver is busy) ends the round.
        if self.tx.unconsumed() > 0 && (self.tx.needs_wakeup() || !self.zero_copy) {
            for _ in 0..MAX_KICKS_PER_FLUSH {
                // Completions taken back first: the kernel sends only as many frames as the
                // completion ring has room for.
                completed += self.reap();
                let before = self.tx.unconsumed();
                self.kick_tx()?;
                let after = self.tx.unconsumed();
                if after == 0 || after == before {
                    break;
                }
            }
        }
        completed += self.reap();
        Ok(FlushProgress { submitted, completed, pending: self.pending.len() })
    }

    fn pending_tx(&self) -> usize {
        self.pending.len()
    }

    fn discard_pending(&mut self) -> usize {
        let n = self.pending.len();
        let mask = !(self.frame_size - 1);
        for d in self.pending.drain(..) {
            self.free.push(d.addr & mask);
        }
        n
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        self.poll_for(timeout, None)
    }

    fn wait_or_wake(&mut self, timeout: Duration, wake: std::os::fd::BorrowedFd<'_>) -> Result<(), DeviceError> {
        self.poll_for(timeout, Some(wake))
    }

    /// One frame copied into a free chunk (a quarter of them stay for the receive side).
    fn transmit_copy(&mut self, packet: &[u8]) -> bool {
        self.transmit_new(1, |chunk| match chunk.get_mut(..packet.len()) {
            Some(room) => {
                room.copy_from_slice(packet);
                packet.len()
            }
            None => 0,
        }) == 1
    }
}

impl XskDevice {
    /// Waits up to `timeout` for a frame on the socket, or for `wake` to become readable.
    fn poll_for(&mut self, timeout: Duration, wake: Option<std::os::fd::BorrowedFd<'_>>) -> Result<(), DeviceError> {
        use std::os::fd::AsRawFd;
        let mut pfds = [
            libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.map_or(-1, |w| w.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: two valid pollfds for the duration of the call (a negative fd is ignored).
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(DeviceError::Io { op: "poll", device: self.name.clone(), source: e });
            }
        }
        // When its interface is unregistered the kernel unbinds the socket and leaves ENETDOWN as
        // its error, and poll reports nothing: without this check an idle loop waited, timed out
        // and received nothing, for good, without a word.
        self.unbound("poll (the socket was unbound: its interface is gone)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UMEM registration refused with ENOBUFS, which the kernel returns when the UMEM's pages are
    /// more than the locked-memory limit allows a process without CAP_IPC_LOCK, says so. Before, it
    /// said 'No buffer space available' alone: a container without IPC_LOCK (deploy/'s DaemonSet
    /// adds it) under a runtime's 64 KiB limit crash-looped with nothing naming either.
    #[test]
    fn a_umem_over_the_locked_memory_limit_says_so() {
        let e = |op: &'static str| {
            XskError::Sys {
                op,
                interface: "eth0".into(),
                queue: 0,
                source: std::io::Error::from_raw_os_error(libc::ENOBUFS),
            }
            .to_string()
        };
        assert!(e("XDP_UMEM_REG").contains("CAP_IPC_LOCK"), "{}", e("XDP_UMEM_REG"));
        assert!(!e("bind").contains("CAP_IPC_LOCK"), "{}", e("bind"));
    }

    fn refused_field(config: &XskConfig) -> Option<&'static str> {
        match XskDevice::open(config) {
            Err(XskError::Config { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn each_ring_size_must_be_a_power_of_two_and_the_error_names_it() {
        let good = XskConfig::new("no-such-interface", 0);
        // A valid config gets past the checks and fails on the interface instead.
        assert!(matches!(
            XskDevice::open(&good),
            Err(XskError::NoInterface(name)) if name == "no-such-interface"
        ));
        let fill = XskConfig { fill_ring_size: 3000, ..good.clone() };
        assert_eq!(refused_field(&fill), Some("fill_ring_size"));
        let tx = XskConfig { tx_ring_size: 500, ..good.clone() };
        assert_eq!(refused_field(&tx), Some("tx_ring_size"));
        let rx = XskConfig { ring_size: 1000, ..good.clone() };
        assert_eq!(refused_field(&rx), Some("ring_size"));
        // Near u32::MAX the headroom check once overflowed (a panic in debug builds).
        let headroom = XskConfig { headroom: u32::MAX - 100, ..good };
        assert_eq!(refused_field(&headroom), Some("headroom"));
    }

    /// A zero-copy driver's wakeup refuses while a queue's buffer pool is missing during a reset
    /// (`ethtool -G` / `-L`, a link down): ixgbe with ENXIO, i40e, ice and mlx5 with EINVAL, and
    /// some with ENETDOWN, EAGAIN or EBUSY. None of these may end the loop (and lose every flow);
    /// the kernel's own ENXIO, an unbound socket, is told apart by the error the socket carries.
    #[test]
    fn a_tx_kick_refused_during_a_driver_reset_is_not_an_error() {
        for errno in [libc::EAGAIN, libc::EBUSY, libc::ENOBUFS, libc::EINTR, libc::ENETDOWN] {
            assert_eq!(tx_kick_refusal(errno), KickRefusal::Transient, "errno {errno}");
        }
        for errno in [libc::ENXIO, libc::EINVAL] {
            assert_eq!(tx_kick_refusal(errno), KickRefusal::UnlessUnbound, "errno {errno}");
        }
        for errno in [libc::EFAULT, libc::EBADF, libc::EOPNOTSUPP, libc::ENOTSOCK] {
            assert_eq!(tx_kick_refusal(errno), KickRefusal::Fatal, "errno {errno}");
        }
    }

    #[test]
    fn the_config_error_message_says_field_value_and_rule() {
        let config = XskConfig { tx_ring_size: 500, ..XskConfig::new("eth0", 0) };
        let msg = XskDevice::open(&config).unwrap_err().to_string();
        assert_eq!(msg, "tx_ring_size = 500 is invalid: must be a power of two");
    }
}
