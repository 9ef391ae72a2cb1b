//! Frames one poll loop hands to another: the full-NAT replies that land on a queue whose core does
//! not own their SNAT port ([`lb_core::Verdict::Handoff`]), and the ICMP errors about full-NAT
//! flows the receiving core does not track, which go to every other loop
//! ([`lb_core::Verdict::HandoffAll`]; such copies take at most half of an inbox, see
//! [`Handoff::send_to_others`]).
//!
//! Each core keeps its NAT flows in its own table and owns a share of the SNAT ports, so a reply is
//! translated back only by the core that owns its destination port. The NIC's RSS hash spreads the
//! replies over the queues by the backend's address and ports, not by the client flow's, so most of
//! them land elsewhere. Without NIC rules that steer replies by port (flow director, as DPVS uses),
//! the loop that receives one copies it into a buffer of the owner's inbox; the owner's loop takes
//! it in its next round, runs it through its worker like a frame of its own, and sends the result
//! from a buffer of its own device ([`crate::Device::transmit_copy`]). That costs two copies of the
//! frame (into the inbox, out to the device) and a second parse, which only the replies that land
//! on the wrong queue pay: about 110 ns a reply more than on the owner's own queue (~230 against
//! ~120 ns a reply, both loops' `run` in thread CPU time; benchmark `handoff` in benches/, figures
//! in BENCHMARKS.md). The veth lab's figures are the kernel's.
//!
//! ```text
//!   loop A: receive ► worker: Handoff(B) ► copy into one of B's free buffers ► B's inbox ─┐
//!                                                      (wake B if it waits)              │
//!   loop B: take its inbox ► worker: Tx (translated) ► transmit_copy ► free the buffer ◄──┘
//! ```
//!
//! No allocation and no lock after [`mesh`]: the buffers are made up front, and the inbox and the
//! free list are bounded crossbeam channels (arrays), over which buffers move as boxed slices. A full
//! inbox (the owner fell behind by more than its buffers) loses the frame, counted by the sender.
//! A loop that waits for its device also wakes when its inbox gets a frame: the sender writes the
//! owner's eventfd when the owner said it is about to wait. A loop that stops, or whose device
//! fails, closes its inbox and takes what waits in it (see [`Handoff::is_closed`]): a frame handed
//! to it after that is refused, and counted lost by its sender, rather than left in an inbox nobody
//! reads.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};

/// Bytes left free before a handed-off packet in its buffer: the worker's rewrite may grow a frame
/// into its headroom ([`lb_core::Frame::HEADROOM_NEEDED`]).
pub const HEADROOM: usize = 256;

/// Sizes of a [`mesh`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffConfig {
    /// Buffers each loop's inbox holds: frames handed to it that it has not taken yet.
    pub buffers: usize,
    /// Bytes per buffer, headroom included: a frame longer than `buffer_size - HEADROOM` is lost
    /// (counted by the sender).
    pub buffer_size: usize,
}

impl Default for HandoffConfig {
    /// 1 024 buffers of 4 KiB per loop (4 MiB): an AF_XDP chunk's largest frame fits.
    fn default() -> Self {
        HandoffConfig { buffers: 1024, buffer_size: 4096 }
    }
}

/// A buffer on its way between loops: the packet is `buf[HEADROOM..HEADROOM + len]`.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) buf: Box<[u8]>,
    pub(crate) len: usize,
}

/// One loop's inbox: frames handed to it, its free buffers, and how to wake it.
#[derive(Debug)]
struct Inbox {
    ready: (Sender<Slot>, Receiver<Slot>),
    free: (Sender<Slot>, Receiver<Slot>),
    /// Set by the owner just before it waits on its device (and cleared after): a sender then
    /// writes `wake`.
    waiting: AtomicBool,
    /// An eventfd the owner's wait also watches.
    wake: OwnedFd,
    /// Set by the owner when it leaves for good ([`Handoff::close`]): senders then take back what
    /// they hand it.
    closed: AtomicBool,
    /// How many buffers the inbox has.
    buffers: usize,
}

/// One loop's end of a [`mesh`]: hands frames to the other loops and takes those handed to it.
#[derive(Debug, Clone)]
pub struct Handoff {
    me: usize,
    inboxes: Arc<[Inbox]>,
}

/// Errors making a mesh.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The wake-up eventfd could not be made.
    #[error("eventfd for the handoff between poll loops: {0}")]
    EventFd(std::io::Error),
}

/// The ends for `loops` poll loops, in loop order: the end at index `i` belongs to the loop whose
/// worker has `core_index` `i`, so a [`lb_core::Verdict::Handoff`]`(i)` goes to its inbox.
pub fn mesh(loops: usize, config: HandoffConfig) -> Result<Vec<Handoff>, HandoffError> {
    let buffers = config.buffers.max(1);
    let size = config.buffer_size.max(HEADROOM);
    let mut inboxes = Vec::with_capacity(loops);
    for _ in 0..loops {
        // SAFETY: eventfd(2) takes no pointers; a non-negative result is a new descriptor that
        // nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(HandoffError::EventFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is the new, open descriptor just made, owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let inbox = Inbox {
            ready: crossbeam_channel::bounded(buffers),
            free: crossbeam_channel::bounded(buffers),
            waiting: AtomicBool::new(false),
            wake,
            closed: AtomicBool::new(false),
            buffers,
        };
        for _ in 0..buffers {
            // Room for every buffer: the channel holds `buffers`.
            let _ = inbox.free.0.try_send(Slot { buf: vec![0u8; size].into_boxed_slice(), len: 0 });
        }
        inboxes.push(inbox);
    }
    let inboxes: Arc<[Inbox]> = inboxes.into();
    Ok((0..loops).map(|me| Handoff { me, inboxes: inboxes.clone() }).collect())
}

impl Handoff {
    /// The index of the loop this end belongs to.
    pub fn index(&self) -> usize {
        self.me
    }

    /// Copies `packet` into a free buffer of loop `to`'s inbox and wakes that loop if it waits.
    /// False when it cannot: `to` is this loop or no loop of the mesh, the packet does not fit a
    /// buffer, the inbox has no free buffer (its loop is behind), or its loop has closed it. The
    /// caller counts that as lost.
    pub fn send(&self, to: usize, packet: &[u8]) -> bool {
        if to == self.me {
            return false;
        }
        let Some(inbox) = self.inboxes.get(to) else { return false };
        let Ok(mut slot) = inbox.free.1.try_recv() else { return false };
        let Some(room) = slot.buf.get_mut(HEADROOM..HEADROOM + packet.len()) else {
            let _ = inbox.free.0.try_send(slot);
            return false;
        };
        room.copy_from_slice(packet);
        slot.len = packet.len();
        // Never full: the inbox's buffers are all there is.
        if inbox.ready.0.try_send(slot).is_err() {
            return false;
        }
        // Pairs with `close`, as `waiting` with `will_wait` (the push's SeqCst tail update against
        // the owner's SeqCst fence before it finds the inbox empty): either the owner, taking what
        // waits after it closed, sees this frame, or this sees the flag and takes a frame back, so
        // none is left behind. The frame taken back may be another sender's (whose send then said
        // true): each is counted once, sent by the owner or lost here. Looked at after the push,
        // not before, so that a refusal takes the same path as the race.
        if inbox.closed.load(Ordering::SeqCst) {
            return match inbox.ready.1.try_recv() {
                Ok(slot) => {
                    let _ = inbox.free.0.try_send(slot);
                    false
                }
                // The owner took it.
                Err(_) => true,
            };
        }
        // Pairs with `will_wait`: either the owner sees the frame before it waits, or this sees
        // its flag and wakes it.
        if inbox.waiting.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes the 8 bytes of `one` to the eventfd, which lives as long as `self`. A
            // failure (the counter at its maximum) leaves the owner awake anyway.
            unsafe { libc::write(inbox.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        }
        true
    }

    /// Copies `packet` into the inbox of every other loop of the mesh (see [`Handoff::send`]);
    /// returns how many copies went, how many were lost, and how many of those lost went to a loop
    /// that had closed its inbox ([`Handoff::is_closed`]). A copy goes only into an inbox that
    /// keeps at least half its buffers free after it: a flood of frames for every loop (crafted ICMP errors about
    /// NAT flows, each copied to every other loop) cannot fill an inbox and crowd out the NAT
    /// replies handed to one loop alone.
    pub fn send_to_others(&self, packet: &[u8]) -> (usize, usize, usize) {
        let (mut sent, mut lost, mut refused) = (0, 0, 0);
        for to in (0..self.inboxes.len()).filter(|&to| to != self.me) {
            let room = self.inboxes.get(to).is_some_and(|i| 2 * i.free.1.len().saturating_sub(1) >= i.buffers);
            if room && self.send(to, packet) {
                sent += 1;
            } else {
                lost += 1;
                refused += usize::from(self.is_closed(to));
            }
        }
        (sent, lost, refused)
    }

    /// Whether loop `to` has closed its inbox: it left (stopped, or its device failed), and takes
    /// no more frames. False for a loop the mesh does not have.
    pub fn is_closed(&self, to: usize) -> bool {
        self.inboxes.get(to).is_some_and(|i| i.closed.load(Ordering::Relaxed))
    }

    fn inbox(&self) -> Option<&Inbox> {
        self.inboxes.get(self.me)
    }

    /// The next frame handed to this loop, if any.
    pub(crate) fn take(&self) -> Option<Slot> {
        self.inbox()?.ready.1.try_recv().ok()
    }

    /// Returns a buffer taken with [`Handoff::take`] to this loop's free list.
    pub(crate) fn give_back(&self, slot: Slot) {
        if let Some(inbox) = self.inbox() {
            let _ = inbox.free.0.try_send(slot);
        }
    }

    /// Closes this loop's inbox for good, as its loop leaves: frames handed to it from now on are
    /// refused ([`Handoff::send`] says false). What waits in it, and what a sender that had not
    /// seen the close hands it meanwhile, the loop then takes as usual ([`Handoff::take`]), until
    /// it finds it empty.
    pub(crate) fn close(&self) {
        if let Some(inbox) = self.inbox() {
            inbox.closed.store(true, Ordering::SeqCst);
        }
    }

    /// Frames waiting in this loop's inbox.
    pub fn pending(&self) -> usize {
        self.inbox().map_or(0, |i| i.ready.1.len())
    }

    /// Says this loop is about to wait on its device; false (and nothing said) when frames wait in
    /// its inbox already, so it takes them instead. After a true, call [`Handoff::woke`] once the
    /// wait ends.
    pub(crate) fn will_wait(&self) -> bool {
        let Some(inbox) = self.inbox() else { return true };
        inbox.waiting.store(true, Ordering::SeqCst);
        if inbox.ready.1.is_empty() {
            true
        } else {
            inbox.waiting.store(false, Ordering::SeqCst);
            false
        }
    }

    /// Ends a wait: clears the flag and the eventfd's count.
    pub(crate) fn woke(&self) {
        let Some(inbox) = self.inbox() else { return };
        inbox.waiting.store(false, Ordering::SeqCst);
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into `count`; the eventfd is non-blocking, so an empty one
        // returns EAGAIN at once.
        unsafe { libc::read(inbox.wake.as_raw_fd(), (&raw mut count).cast(), 8) };
    }

    /// The descriptor that becomes readable when a frame is handed to this loop while it waits.
    pub fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inbox().map(|i| i.wake.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed inbox refuses frames, each taken back with its buffer onto the free list. One that
    /// waited there since before the close is taken back in place of the newer one (each still
    /// counted once: lost by the sender refused, sent by the owner that takes the other).
    #[test]
    fn a_closed_inbox_refuses_frames_and_keeps_its_buffers() {
        let ends = mesh(2, HandoffConfig { buffers: 2, buffer_size: HEADROOM + 100 }).unwrap();
        assert!(ends[0].send(1, b"before"));
        ends[1].close();
        assert!(ends[0].is_closed(1) && !ends[1].is_closed(0) && !ends[0].is_closed(7));
        assert!(!ends[0].send(1, b"after"));
        let slot = ends[1].take().unwrap();
        assert_eq!(&slot.buf[HEADROOM..HEADROOM + slot.len], b"after");
        ends[1].give_back(slot);
        for _ in 0..5 {
            assert!(!ends[0].send(1, b"later"));
        }
        assert_eq!((ends[1].pending(), ends[1].inboxes[1].free.1.len()), (0, 2), "every buffer free");
        assert_eq!(ends[1].send_to_others(b"all"), (1, 0, 0));
        assert_eq!(ends[0].send_to_others(b"all"), (0, 1, 1));
    }

    #[test]
    fn a_frame_goes_to_the_inbox_named_and_its_buffer_comes_back() {
        let ends = mesh(3, HandoffConfig { buffers: 2, buffer_size: HEADROOM + 100 }).unwrap();
        assert!(ends[0].send(2, b"to two"));
        assert_eq!((ends[1].pending(), ends[2].pending()), (0, 1));
        let slot = ends[2].take().unwrap();
        assert_eq!(&slot.buf[HEADROOM..HEADROOM + slot.len], b"to two");
        assert!(ends[2].take().is_none());
        ends[2].give_back(slot);
        // Both buffers free again: two more fit, a third does not (counted lost by the sender).
        assert!(ends[1].send(2, b"a") && ends[0].send(2, b"b"));
        assert!(!ends[0].send(2, b"c"), "no free buffer");
        // Never to itself, to no loop, or too long for a buffer.
        assert!(!ends[0].send(0, b"self"));
        assert!(!ends[0].send(3, b"none"));
        assert!(!ends[0].send(1, &[0u8; 101]));
        assert!(ends[0].send(1, &[0u8; 100]));
    }

    /// Frames for every loop take at most half an inbox: the rest stays for frames handed to that
    /// loop alone.
    #[test]
    fn frames_for_every_loop_leave_half_of_each_inbox_to_the_rest() {
        let ends = mesh(3, HandoffConfig { buffers: 4, buffer_size: HEADROOM + 100 }).unwrap();
        assert_eq!(ends[0].send_to_others(b"all"), (2, 0, 0));
        assert_eq!(ends[0].send_to_others(b"all"), (2, 0, 0));
        assert_eq!(ends[0].send_to_others(b"all"), (0, 2, 0), "half of each inbox is taken");
        assert!(ends[0].send(1, b"one") && ends[0].send(1, b"one"), "the other half is still there");
        assert!(!ends[0].send(1, b"one"));
        assert_eq!((ends[1].pending(), ends[2].pending()), (4, 2));
    }

    #[test]
    fn a_waiting_loop_is_woken_by_a_frame_and_not_otherwise() {
        let ends = mesh(2, HandoffConfig::default()).unwrap();
        let readable = |h: &Handoff| {
            let mut pfd = libc::pollfd { fd: h.wake_fd().unwrap().as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd; a zero timeout returns at once.
            unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
        };
        // Not waiting: a send does not write the eventfd.
        assert!(ends[0].send(1, b"x"));
        assert!(!readable(&ends[1]));
        // Frames wait already: it does not go to sleep.
        assert!(!ends[1].will_wait());
        let slot = ends[1].take().unwrap();
        ends[1].give_back(slot);
        // About to wait on an empty inbox: a send wakes it, and `woke` clears the wake-up.
        assert!(ends[1].will_wait());
        assert!(!readable(&ends[1]));
        assert!(ends[0].send(1, b"y"));
        assert!(readable(&ends[1]));
        ends[1].woke();
        assert!(!readable(&ends[1]));
    }
}
