//! The seam between the poll loop and whatever moves frames: an AF_XDP socket, a memory queue in a
//! test, a pcap file in a replay.
//!
//! One round of the loop talks to a [`Device`] in three steps:
//! ```text
//!   receive(frames)  -> n frames lent out of the device's buffers (with headroom before each packet)
//!   settle(spans)    -> for each of those n frames, in order: Some(span) = transmit these bytes of the
//!                       frame's buffer, None = give the buffer back to the receive side
//!   flush()          -> push queued transmissions to the wire, reap completed ones
//! ```
//! Frames borrow the device's memory only between `receive` and `settle`; the loop copies each frame's
//! final position into a [`Span`] and ends the borrow before settling, so no buffer is ever copied on
//! the way through.

use lb_core::{Frame, Instant};

/// Most frames one `receive` lends out; the loop's burst arrays have this many slots.
pub const MAX_BURST: usize = 64;

/// Where a frame's packet sits inside its buffer after the worker rewrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Offset of the packet's first byte in the buffer.
    pub start: usize,
    /// Packet length in bytes.
    pub len: usize,
}

impl Span {
    /// The span of a frame as it stands.
    pub fn of(frame: &Frame<'_>) -> Self {
        Span { start: frame.start(), len: frame.len() }
    }
}

/// What one [`Device::receive`] lent out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Received {
    /// Frames lent, in `frames[..count]`.
    pub count: usize,
    /// The device's own time of these frames (a capture's timestamps), so replays are deterministic;
    /// `None` means "use the monotonic clock".
    pub clock: Option<Instant>,
}

impl Received {
    /// `count` frames on the monotonic clock.
    pub fn frames(count: usize) -> Self {
        Received { count, clock: None }
    }
}

/// What one [`Device::flush`] achieved, so the loop can tell a stuck ring from a busy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlushProgress {
    /// Frames handed to the transmit ring (or written out) by this call.
    pub submitted: usize,
    /// Transmitted buffers reaped back into the free pool by this call.
    pub completed: usize,
    /// Frames still waiting for room on the transmit side.
    pub pending: usize,
}

/// Errors a device reports. Transient ring conditions are not errors: they show as no progress.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A system call on the device failed.
    #[error("{op} failed on {device}: {source}")]
    Io {
        /// What was being done (e.g. "sendto (TX kick)").
        op: &'static str,
        /// Which device (interface and queue, file name).
        device: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A capture file could not be read or written.
    #[error("pcap {op} failed on {path}: {message}")]
    Pcap {
        /// "read" or "write".
        op: &'static str,
        /// The file.
        path: String,
        /// What the pcap library said.
        message: String,
    },
}

/// A source and sink of frames for one poll loop.
pub trait Device {
    /// Lends up to `frames.len()` received frames (never more than [`MAX_BURST`]) into
    /// `frames[..n]` and returns `n`. Every frame keeps at least the device's headroom before its
    /// packet. The next call on the device must be [`Device::settle`] with exactly `n` entries.
    fn receive<'a>(&'a mut self, frames: &mut [Frame<'a>]) -> Result<Received, DeviceError>;

    /// Settles the frames of the last `receive`, in order: `Some(span)` queues the frame's buffer for
    /// transmission with the packet at `span`, `None` returns the buffer to the receive side.
    /// Returns how many frames were queued for transmission.
    fn settle(&mut self, spans: &[Option<Span>]) -> Result<usize, DeviceError>;

    /// Pushes queued transmissions out and reaps completed ones.
    fn flush(&mut self) -> Result<FlushProgress, DeviceError>;

    /// Frames queued for transmission that the transmit side has not taken yet.
    fn pending_tx(&self) -> usize;

    /// Gives up on the frames still queued for transmission (a stuck ring), returning their buffers
    /// to the receive side; returns how many were dropped.
    fn discard_pending(&mut self) -> usize;

    /// Waits up to `timeout` for frames to arrive when the loop is idle; returns at once on devices
    /// that have nothing to wait on.
    fn wait(&mut self, timeout: std::time::Duration) -> Result<(), DeviceError> {
        let _ = timeout;
        Ok(())
    }

    /// True when the device will never receive again (the end of a capture or a test vector).
    fn at_end(&self) -> bool {
        false
    }

    /// Frames the kernel dropped on their way to this device, as it counts them so far: for an
    /// AF_XDP socket, those that found its receive ring full (the loop fell behind) or no buffer on
    /// its fill ring. They never reach the loop. 0 for a device the kernel does not feed.
    fn kernel_rx_dropped(&self) -> u64 {
        0
    }

    /// Queues a copy of `packet` for transmission from a buffer of the device's own (a frame another
    /// loop handed over, see [`crate::handoff`]); false when it cannot (no free buffer, too long, or
    /// a device that does not send copies, as by default). Send it with [`Device::flush`].
    fn transmit_copy(&mut self, packet: &[u8]) -> bool {
        let _ = packet;
        false
    }

    /// As [`Device::wait`], returning early too once `wake` is readable (another loop handed this
    /// one a frame). By default the same as `wait`, which suits a device that does not block.
    fn wait_or_wake(
        &mut self,
        timeout: std::time::Duration,
        wake: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), DeviceError> {
        let _ = wake;
        self.wait(timeout)
    }
}
