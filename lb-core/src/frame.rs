//! A frame buffer lent by the I/O layer, and the worker's verdict on it.
//!
//! The I/O layer owns the memory (an AF_XDP UMEM chunk, a pcap record, a test vector) and lends each
//! frame as a [`Frame`]: the whole chunk, with the packet at `start..start + len`. Bytes before `start`
//! are headroom the rewrite may grow into (tunnel encapsulation); bytes after are tailroom.
//! [`Frame::HEADROOM_NEEDED`] says how much headroom the worker may use.

/// One frame, borrowed mutably for the length of a burst.
#[derive(Debug)]
pub struct Frame<'a> {
    buf: &'a mut [u8],
    start: usize,
    len: usize,
}

/// What the caller does with a frame after [`crate::Worker::process_burst`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (rewritten) frame out of the port it came in on.
    Tx,
    /// Not for the load balancer: hand it to the host's network stack unchanged.
    Pass,
    /// Drop it. The reason has been counted already (in [`crate::stats::Stats::drops`]).
    Drop(crate::stats::DropReason),
    /// Another core's: a full-NAT reply (or an ICMP error about a NAT flow) to a SNAT port in the
    /// share of the worker with this `core_index` (see [`crate::worker::snat_port_owner`]), which
    /// alone tracks its flow. The frame is unchanged: hand it to that worker's next burst, which
    /// translates it and says [`Verdict::Tx`]. RSS spreads replies over the queues by the backend's
    /// address and ports, not by the client flow's, so most replies land on a core that does not own
    /// their port unless the NIC steers them. Counted in [`crate::stats::Stats::handed_off`].
    Handoff(u16),
    /// Every other core's, to find the one it is for: an ICMP error to a VIP about a full-NAT flow
    /// this core does not track (RSS sends errors by the router's address, not the flow's). Hand a
    /// copy to each other worker through [`crate::Worker::process_handed_burst`]: the one tracking
    /// the flow translates it, the others count it as `icmp_copy_untracked`. Counted in `handed_off`.
    HandoffAll,
}

impl<'a> Frame<'a> {
    /// Headroom, in bytes, that the largest encapsulation may prepend: an outer IPv6 header (40),
    /// a UDP header (8) and a GUE header (4), rounded up. Give every frame at least this much, or
    /// tunnel-mode frames are dropped and counted as `NoHeadroom`.
    pub const HEADROOM_NEEDED: usize = 64;

    /// A frame whose packet is `buf[start..start + len]`. Out-of-range values are clamped to the
    /// buffer, never a panic.
    pub fn new(buf: &'a mut [u8], start: usize, len: usize) -> Self {
        let start = start.min(buf.len());
        let len = len.min(buf.len() - start);
        Frame { buf, start, len }
    }

    /// A frame that fills the whole buffer, with no headroom.
    pub fn whole(buf: &'a mut [u8]) -> Self {
        let len = buf.len();
        Frame { buf, start: 0, len }
    }

    /// The packet bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        // `start + len <= buf.len()` holds by construction (`new` clamps, the rest keep it); `get`
        // leaves no panic path even so, and inlined the check mostly folds into the caller's.
        // (`start..start + len` with a saturating add cost 2-4 instructions a packet more, callgrind.)
        self.buf.get(self.start..).and_then(|b| b.get(..self.len)).unwrap_or_default()
    }

    /// The packet bytes, mutably.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.buf.get_mut(self.start..).and_then(|b| b.get_mut(..self.len)).unwrap_or_default()
    }

    /// Offset of the packet's first byte in the buffer (the headroom left before it).
    pub fn start(&self) -> usize {
        self.start
    }

    /// Packet length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the packet has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of headroom before the packet.
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Grows the packet by `n` bytes at the front and returns the whole packet, or `None` (frame
    /// unchanged) when the headroom is short.
    pub fn push_front(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.start {
            return None;
        }
        self.start -= n;
        self.len += n;
        Some(self.data_mut())
    }

    /// Shrinks the packet by `n` bytes at the front, or returns `None` (frame unchanged) when the
    /// packet is shorter than `n`.
    pub fn pull_front(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.len {
            return None;
        }
        self.start += n;
        self.len -= n;
        Some(self.data_mut())
    }

    /// Sets the packet length, keeping the start; `None` (unchanged) if it would pass the buffer's end.
    pub fn set_len(&mut self, len: usize) -> Option<()> {
        if self.start.checked_add(len).is_none_or(|end| end > self.buf.len()) {
            return None;
        }
        self.len = len;
        Some(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]
mod tests {
    use super::*;

    #[test]
    fn push_and_pull_respect_bounds() {
        let mut buf = [0u8; 16];
        buf[4..8].copy_from_slice(&[1, 2, 3, 4]);
        let mut f = Frame::new(&mut buf, 4, 4);
        assert_eq!(f.data(), &[1, 2, 3, 4]);
        assert!(f.push_front(5).is_none());
        assert_eq!(f.len(), 4);
        f.push_front(4).unwrap().copy_from_slice(&[9, 9, 9, 9, 1, 2, 3, 4]);
        assert_eq!(f.headroom(), 0);
        assert_eq!(f.pull_front(4).unwrap(), &[1, 2, 3, 4]);
        assert!(f.pull_front(5).is_none());
        assert!(f.set_len(13).is_none());
        assert!(f.set_len(12).is_some());
    }

    #[test]
    fn new_clamps_out_of_range() {
        let mut buf = [0u8; 8];
        let f = Frame::new(&mut buf, 6, 100);
        assert_eq!((f.start(), f.len()), (6, 2));
        let mut buf = [0u8; 8];
        let f = Frame::new(&mut buf, 100, 1);
        assert_eq!((f.start(), f.len()), (8, 0));
    }

    /// A length whose end would pass `usize::MAX` is past the buffer's end too: refused, the frame
    /// unchanged (`start + len` overflowed: a panic in a debug build, and in a release build a
    /// frame longer than its buffer).
    #[test]
    fn set_len_refuses_a_length_past_the_address_space() {
        let mut buf = [0u8; 16];
        let mut f = Frame::new(&mut buf, 4, 8);
        assert!(f.set_len(usize::MAX).is_none());
        assert!(f.set_len(usize::MAX - 3).is_none());
        assert_eq!((f.start(), f.len(), f.data().len()), (4, 8, 8));
        assert!(f.push_front(4).is_some());
        assert_eq!((f.start(), f.len()), (0, 12));
    }
}
