//! The per-core poll loop: one device, one processor, one pinned thread.
//!
//! ```text
//! loop {
//!     stop?                       -> close the inbox, run what it holds, flush what is queued, leave
//!                                    (a device error: the same, the queue abandoned, counted)
//!     control update waiting?     -> processor.apply(update); send the old state back
//!     transmit side behind?       -> flush; no progress => counted back-off, give up after a limit
//!     frames handed over by other loops?  -> process them, transmit copies (see crate::handoff)
//!     n = device.receive(burst)   -> none: flush / wait (idle) / leave at the end of a capture
//!     processor.process_burst(frames[..n], now, verdicts)
//!     Handoff(i) frames => copied to loop i's inbox
//!     device.settle(Tx frames => transmit, the rest => recycle)
//!     TX batch full or flush deadline passed -> device.flush()
//! }
//! ```
//! The burst arrays live on the stack; nothing in the round allocates, locks or panics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use lb_core::{Frame, Instant, Verdict};

use crate::device::{Device, DeviceError, MAX_BURST, Span};
use crate::handoff::{self, Handoff};
use crate::processor::BurstProcessor;
use crate::stop::StopFlag;

/// Tuning of one poll loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Frames per receive, at most [`MAX_BURST`].
    pub burst: usize,
    /// Flush once this many frames are queued for transmission (copy-mode AF_XDP sends at most 32 per
    /// kick).
    pub tx_batch: usize,
    /// Flush at least this often while frames are queued, so a lone frame never waits for company.
    pub flush_interval: Duration,
    /// Stop receiving while this many frames wait for the transmit side (back-pressure, not drops).
    /// At least 1 (0 would never receive).
    pub max_pending_tx: usize,
    /// Empty receive rounds before the loop calls [`Device::wait`]; `usize::MAX` spins (busy poll).
    /// A loop that spins still gives the processor its idle turn ([`BurstProcessor::idle`]) about
    /// once per `idle_wait` while nothing comes.
    pub idle_spins: usize,
    /// How long [`Device::wait`] may block when idle.
    pub idle_wait: Duration,
    /// Flushes without progress in a row after which the queued frames are dropped (counted) rather
    /// than waiting on a stuck ring forever.
    pub max_stalled_flushes: u32,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            burst: MAX_BURST,
            tx_batch: 32,
            flush_interval: Duration::from_micros(50),
            max_pending_tx: 4 * MAX_BURST,
            idle_spins: 64,
            idle_wait: Duration::from_millis(10),
            max_stalled_flushes: 1000,
        }
    }
}

/// What one loop did, as plain numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Frames received.
    pub rx: u64,
    /// Frames the processor marked Tx and the device queued.
    pub tx: u64,
    /// Frames with verdict Pass (recycled: an AF_XDP socket cannot hand a frame back to the kernel;
    /// the XDP program keeps non-VIP traffic in the kernel so these are rare).
    pub pass: u64,
    /// Frames with verdict Drop, frames marked Tx that the device could not queue (`tx_declined`
    /// too), frames for another loop
    /// that it had no room for (`handoff_lost` too), and handed-in frames not sent, so that
    /// `rx + handed_in = tx + pass + drop + handed_off`.
    pub drop: u64,
    /// Frames handed to other loops ([`lb_core::Verdict::Handoff`], copied into that loop's inbox;
    /// [`lb_core::Verdict::HandoffAll`], copied into every other loop's, counted once).
    pub handed_off: u64,
    /// Copies for another loop lost because its inbox had no free buffer, there was no such loop,
    /// or that loop had left (`handoff_refused` too). A frame none of whose copies went also counts
    /// in `drop`.
    pub handoff_lost: u64,
    /// Of `handoff_lost`, the copies refused because their loop had left (stopped, or its device
    /// failed) and closed its inbox: frames handed over as the loops stop.
    pub handoff_refused: u64,
    /// Frames other loops handed to this one, processed here.
    pub handed_in: u64,
    /// Non-empty bursts.
    pub bursts: u64,
    /// Control updates applied.
    pub updates: u64,
    /// Flushes that moved nothing while frames were queued.
    pub stalled_flushes: u64,
    /// Frames dropped because the transmit side stayed stuck for `max_stalled_flushes` flushes.
    pub tx_abandoned: u64,
    /// Frames the processor marked Tx (and counted as sent) that the device could not queue: a
    /// handed-in copy with no free buffer (the transmit side backed up), an empty packet or one past
    /// its buffer. Also in `drop`.
    pub tx_declined: u64,
    /// Times the loop blocked in [`Device::wait`].
    pub idle_waits: u64,
    /// Frames the kernel dropped before they reached the device ([`Device::kernel_rx_dropped`]: an
    /// AF_XDP socket's receive ring full, or no fill-ring buffer), as last read: at most every
    /// `KERNEL_DROPS_EVERY` (1 s), busy or idle, and at the end. Not in `drop`: the loop never
    /// received them.
    pub kernel_rx_dropped: u64,
}

/// Adds another loop's counts: several loops' totals (a node's, as `lb run` logs them when its
/// loops end).
impl std::ops::AddAssign<&LoopStats> for LoopStats {
    fn add_assign(&mut self, other: &LoopStats) {
        // Every field named: one added to the struct must be added here.
        let LoopStats {
            rx,
            tx,
            pass,
            drop,
            handed_off,
            handoff_lost,
            handoff_refused,
            handed_in,
            bursts,
            updates,
            stalled_flushes,
            tx_abandoned,
            tx_declined,
            idle_waits,
            kernel_rx_dropped,
        } = *other;
        self.rx += rx;
        self.tx += tx;
        self.pass += pass;
        self.drop += drop;
        self.handed_off += handed_off;
        self.handoff_lost += handoff_lost;
        self.handoff_refused += handoff_refused;
        self.handed_in += handed_in;
        self.bursts += bursts;
        self.updates += updates;
        self.stalled_flushes += stalled_flushes;
        self.tx_abandoned += tx_abandoned;
        self.tx_declined += tx_declined;
        self.idle_waits += idle_waits;
        self.kernel_rx_dropped += kernel_rx_dropped;
    }
}

/// Live counters of a running loop, published once per round (plain stores, one writer).
#[derive(Debug, Default)]
pub struct LoopCounters {
    rx: AtomicU64,
    tx: AtomicU64,
    pass: AtomicU64,
    drop: AtomicU64,
    handed_off: AtomicU64,
    handoff_lost: AtomicU64,
    handed_in: AtomicU64,
    stalled_flushes: AtomicU64,
    tx_abandoned: AtomicU64,
    tx_declined: AtomicU64,
    kernel_rx_dropped: AtomicU64,
}

impl LoopCounters {
    fn publish(&self, s: &LoopStats) {
        self.rx.store(s.rx, Ordering::Relaxed);
        self.tx.store(s.tx, Ordering::Relaxed);
        self.pass.store(s.pass, Ordering::Relaxed);
        self.drop.store(s.drop, Ordering::Relaxed);
        self.handed_off.store(s.handed_off, Ordering::Relaxed);
        self.handoff_lost.store(s.handoff_lost, Ordering::Relaxed);
        self.handed_in.store(s.handed_in, Ordering::Relaxed);
        self.stalled_flushes.store(s.stalled_flushes, Ordering::Relaxed);
        self.tx_abandoned.store(s.tx_abandoned, Ordering::Relaxed);
        self.tx_declined.store(s.tx_declined, Ordering::Relaxed);
        self.kernel_rx_dropped.store(s.kernel_rx_dropped, Ordering::Relaxed);
    }

    /// A snapshot (fields not published live are zero).
    pub fn snapshot(&self) -> LoopStats {
        LoopStats {
            rx: self.rx.load(Ordering::Relaxed),
            tx: self.tx.load(Ordering::Relaxed),
            pass: self.pass.load(Ordering::Relaxed),
            drop: self.drop.load(Ordering::Relaxed),
            handed_off: self.handed_off.load(Ordering::Relaxed),
            handoff_lost: self.handoff_lost.load(Ordering::Relaxed),
            handed_in: self.handed_in.load(Ordering::Relaxed),
            stalled_flushes: self.stalled_flushes.load(Ordering::Relaxed),
            tx_abandoned: self.tx_abandoned.load(Ordering::Relaxed),
            tx_declined: self.tx_declined.load(Ordering::Relaxed),
            kernel_rx_dropped: self.kernel_rx_dropped.load(Ordering::Relaxed),
            ..LoopStats::default()
        }
    }
}

/// The control side's end of a loop's update channel.
///
/// [`send`](Self::send) blocks while the loop's queue is full; [`send_latest`](Self::send_latest)
/// never does: for updates that each replace the whole state (lb-core's tables), it keeps the
/// newest one back as *pending* while the loop has no room, and [`retry_pending`](Self::retry_pending)
/// hands it over later. Use one or the other on a sender: `send` does not wait for a pending update.
/// [`is_applied`](Self::is_applied) tells, without blocking, whether the loop runs the last update
/// handed to it.
#[derive(Debug)]
pub struct UpdateSender<U> {
    updates: Sender<U>,
    retired: Receiver<U>,
    /// The newest update offered by `send_latest` that the loop had no room for.
    pending: Option<U>,
    /// Updates queued to the loop whose retired state has not come back yet: the loop has not
    /// applied them (or, with a parked retired state, not yet said so). Atomic only so that the
    /// collecting methods can keep taking `&self`.
    unapplied: AtomicUsize,
}

/// Where [`UpdateSender::send_latest`] or [`UpdateSender::retry_pending`] left the newest update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// In the loop's queue (or nothing was pending).
    Queued,
    /// Kept back on the control side: the loop's queue is full. Retry once it has room.
    Pending,
}

/// The loop's end of the update channel.
#[derive(Debug)]
pub struct UpdateReceiver<U> {
    updates: Receiver<U>,
    retired: Sender<U>,
    /// A retired state the control side had no room for; sent before any new update is applied, so
    /// the loop never drops one itself. With [`RETIRED_QUEUE`] slots this does not happen (see
    /// there); it is kept for a control side that uses the channel otherwise.
    parked: Option<U>,
}

/// Updates not yet applied when the control side sends a new one are bounded by this many.
const UPDATE_QUEUE: usize = 8;

/// Room for retired states not yet collected: one more than [`UPDATE_QUEUE`], so the loop never
/// finds it full. Every [`UpdateSender::send`] (and `send_latest`, `retry_pending`) collects before
/// it queues; between two collections the loop can apply at most what was queued at the first (up
/// to `UPDATE_QUEUE`) and the one update that call adds. With only `UPDATE_QUEUE` slots the ninth was parked, and a parked loop
/// applies nothing until the control side sends again: after a burst of updates the last one
/// could wait, unapplied, for as long as the configuration stayed unchanged.
const RETIRED_QUEUE: usize = UPDATE_QUEUE + 1;

/// A bounded channel pair: updates to the loop, retired states back to the control side.
pub fn update_channel<U>() -> (UpdateSender<U>, UpdateReceiver<U>) {
    let (tx, rx) = crossbeam_channel::bounded(UPDATE_QUEUE);
    let (rtx, rrx) = crossbeam_channel::bounded(RETIRED_QUEUE);
    (
        UpdateSender { updates: tx, retired: rrx, pending: None, unapplied: AtomicUsize::new(0) },
        UpdateReceiver { updates: rx, retired: rtx, parked: None },
    )
}

/// The loop has gone (stopped or failed); the update was not delivered.
#[derive(Debug, thiserror::Error)]
#[error("the poll loop has stopped; update not delivered")]
pub struct LoopGone;

impl<U> UpdateSender<U> {
    /// Sends an update, blocking while the loop has `UPDATE_QUEUE` unapplied ones, and drops the
    /// states the loop retired so far (here, on the control thread).
    pub fn send(&self, update: U) -> Result<(), LoopGone> {
        self.collect_retired();
        // Counted before it can be applied, so a retired state never comes back uncounted.
        self.unapplied.fetch_add(1, Ordering::Relaxed);
        self.updates.send(update).map_err(|_| {
            self.unapplied.fetch_sub(1, Ordering::Relaxed);
            LoopGone
        })
    }

    /// Hands `update` to the loop without blocking. While the loop's queue is full (a loop stuck
    /// or far behind), `update` is kept back as the pending update instead, replacing (and dropping,
    /// here) an older pending one that the loop then never applies: only for updates each of which
    /// supersedes the ones before. Nothing newer is lost: the pending update goes out with the next
    /// `send_latest` or [`retry_pending`](Self::retry_pending) that finds room, after everything
    /// queued before it. Like `send`, collects retired states first (the retired queue's bound holds).
    pub fn send_latest(&mut self, update: U) -> Result<Delivery, LoopGone> {
        self.pending = Some(update);
        self.retry_pending()
    }

    /// Tries again to queue the pending update, without blocking; [`Delivery::Queued`] when nothing
    /// is pending any more.
    pub fn retry_pending(&mut self) -> Result<Delivery, LoopGone> {
        let Some(update) = self.pending.take() else { return Ok(Delivery::Queued) };
        self.collect_retired();
        self.unapplied.fetch_add(1, Ordering::Relaxed);
        match self.updates.try_send(update) {
            Ok(()) => Ok(Delivery::Queued),
            Err(TrySendError::Full(update)) => {
                self.unapplied.fetch_sub(1, Ordering::Relaxed);
                self.pending = Some(update);
                Ok(Delivery::Pending)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.unapplied.fetch_sub(1, Ordering::Relaxed);
                Err(LoopGone)
            }
        }
    }

    /// Whether an update waits for room in the loop's queue.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the loop has applied every update handed to it and none is pending: it runs the
    /// last one sent. Never blocks (collects the retired states that came back). False while an
    /// update waits in the loop's queue or, pending, on the control side.
    pub fn is_applied(&self) -> bool {
        self.collect_retired();
        self.pending.is_none() && self.unapplied.load(Ordering::Relaxed) == 0
    }

    /// Drops retired states sent back by the loop; returns how many.
    pub fn collect_retired(&self) -> usize {
        let n = self.retired.try_iter().count();
        self.retire(n);
        n
    }

    /// Waits up to `timeout` for the loop to retire one state (i.e. to have applied an update).
    pub fn wait_retired(&self, timeout: Duration) -> Option<U> {
        let old = self.retired.recv_timeout(timeout).ok()?;
        self.retire(1);
        Some(old)
    }

    /// Counts `n` updates as applied (their retired states came back).
    fn retire(&self, n: usize) {
        // Never below zero: the loop retires one state for each update it applies.
        let _ = self.unapplied.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }
}

impl<U> UpdateReceiver<U> {
    /// Applies at most one waiting update to `processor`; returns true if one was applied.
    fn poll<P: BurstProcessor<Update = U>>(&mut self, processor: &mut P) -> bool {
        if let Some(old) = self.parked.take() {
            match self.retired.try_send(old) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(old)) => {
                    self.parked = Some(old);
                    return false;
                }
            }
        }
        match self.updates.try_recv() {
            Ok(update) => {
                let old = processor.apply(update);
                if let Err(TrySendError::Full(old)) = self.retired.try_send(old) {
                    self.parked = Some(old);
                }
                true
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => false,
        }
    }
}

/// One device, one processor, the update channel and the stop flag.
pub struct PollLoop<D, P: BurstProcessor> {
    device: D,
    processor: P,
    updates: UpdateReceiver<P::Update>,
    stop: StopFlag,
    config: LoopConfig,
    counters: Arc<LoopCounters>,
    stats: LoopStats,
    /// The origin of the processor's time ([`clock_origin`], shared by every loop).
    clock: std::time::Instant,
    /// This loop's end of the handoff between loops, if it has one.
    handoff: Option<Handoff>,
}

impl<D: std::fmt::Debug, P: BurstProcessor> std::fmt::Debug for PollLoop<D, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollLoop").field("device", &self.device).field("stats", &self.stats).finish()
    }
}

/// What a finished loop hands back: its parts and its numbers.
#[derive(Debug)]
pub struct LoopReport<D, P> {
    /// The device (e.g. to finish a capture file or read its statistics).
    pub device: D,
    /// The processor (e.g. to read a worker's counters).
    pub processor: P,
    /// The loop's own counters.
    pub stats: LoopStats,
}

/// A loop that ended on a device error, with what it held ([`PollLoop::run_keeping_parts`]).
pub struct LoopFailed<D, P> {
    /// Why the device failed.
    pub error: DeviceError,
    /// The device, the processor and the loop's counts up to the failure (boxed: the device is
    /// large, and the error path is no fast path).
    pub report: Box<LoopReport<D, P>>,
}

impl<D, P> std::fmt::Debug for LoopFailed<D, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopFailed").field("error", &self.error).field("stats", &self.report.stats).finish()
    }
}

impl<D, P> std::fmt::Display for LoopFailed<D, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<D, P> std::error::Error for LoopFailed<D, P> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl<D: Device, P: BurstProcessor> PollLoop<D, P> {
    /// A loop over `device` and `processor`, taking updates from `updates`, stopping on `stop`.
    pub fn new(
        device: D,
        processor: P,
        updates: UpdateReceiver<P::Update>,
        stop: StopFlag,
        config: LoopConfig,
    ) -> Self {
        let config = LoopConfig {
            burst: config.burst.clamp(1, MAX_BURST),
            tx_batch: config.tx_batch.max(1),
            max_pending_tx: config.max_pending_tx.max(1),
            ..config
        };
        PollLoop {
            device,
            processor,
            updates,
            stop,
            config,
            counters: Arc::default(),
            stats: LoopStats::default(),
            clock: clock_origin(),
            handoff: None,
        }
    }

    /// Joins the loop to a [`handoff::mesh`] through its end `handoff`: frames its processor gives
    /// [`Verdict::Handoff`]`(i)` go to the loop holding end `i`, and frames handed to this one are
    /// processed and sent from this loop's device. Without a mesh such frames are lost (counted).
    #[must_use]
    pub fn with_handoff(mut self, handoff: Handoff) -> Self {
        self.handoff = Some(handoff);
        self
    }

    /// Live counters, readable from another thread while the loop runs.
    pub fn counters(&self) -> Arc<LoopCounters> {
        Arc::clone(&self.counters)
    }

    /// Runs until the stop flag is set or a finite device reaches its end and has sent everything.
    /// A device error ends it with that error alone; [`run_keeping_parts`](Self::run_keeping_parts)
    /// hands back the processor too.
    pub fn run(self) -> Result<LoopReport<D, P>, DeviceError> {
        self.run_keeping_parts().map_err(|failed| failed.error)
    }

    /// As [`run`](Self::run), but a loop that fails on its device hands back what it held
    /// ([`LoopFailed`]): the processor with its state (a worker's flows), to go on with on a new
    /// device, the device, and the counts up to the failure, published to the live counters too.
    /// The frames still queued for transmission are dropped and counted in `tx_abandoned`.
    pub fn run_keeping_parts(mut self) -> Result<LoopReport<D, P>, LoopFailed<D, P>> {
        let served = self.serve();
        if served.is_err() {
            self.close_inbox();
            self.stats.tx_abandoned += self.device.discard_pending() as u64;
        }
        self.stats.kernel_rx_dropped = self.device.kernel_rx_dropped();
        self.counters.publish(&self.stats);
        let report = LoopReport { device: self.device, processor: self.processor, stats: self.stats };
        match served {
            Ok(()) => Ok(report),
            Err(error) => Err(LoopFailed { error, report: Box::new(report) }),
        }
    }

    /// The loop itself, up to the stop flag, the end of a finite device, or a device error.
    fn serve(&mut self) -> Result<(), DeviceError> {
        let mut idle = 0usize;
        let mut stalls = 0u32;
        let mut last_flush = self.clock.elapsed();
        let mut last_idle_call = last_flush;
        let mut last_drops_read = last_flush;
        loop {
            if self.stop.is_set() {
                self.close_inbox();
                break;
            }
            if self.updates.poll(&mut self.processor) {
                self.stats.updates += 1;
            }
            if self.device.pending_tx() >= self.config.max_pending_tx {
                self.flush_or_back_off(&mut stalls)?;
                continue;
            }
            match self.round()? {
                0 if self.device.pending_tx() > 0 => {
                    self.flush_or_back_off(&mut stalls)?;
                    last_flush = self.clock.elapsed();
                }
                0 if self.device.at_end() => break,
                0 => {
                    idle += 1;
                    let wait = idle >= self.config.idle_spins;
                    // The idle turn comes before each wait; a loop that spins rather than waits (busy
                    // poll) gets it as often as a waiting loop would, so its worker's expired flows
                    // are reclaimed and its counters published while no traffic comes.
                    if wait
                        || (idle.is_multiple_of(SPIN_CLOCK_ROUNDS)
                            && self.clock.elapsed().saturating_sub(last_idle_call) >= self.config.idle_wait)
                    {
                        self.processor.idle(self.now());
                        last_idle_call = self.clock.elapsed();
                        if last_idle_call.saturating_sub(last_drops_read) >= KERNEL_DROPS_EVERY {
                            self.stats.kernel_rx_dropped = self.device.kernel_rx_dropped();
                            last_drops_read = last_idle_call;
                        }
                    }
                    if wait {
                        idle = 0;
                        self.wait()?;
                    }
                }
                _ => {
                    idle = 0;
                    let now = self.clock.elapsed();
                    // A loop that falls behind is never idle: the kernel's drops are read here too.
                    if now.saturating_sub(last_drops_read) >= KERNEL_DROPS_EVERY {
                        self.stats.kernel_rx_dropped = self.device.kernel_rx_dropped();
                        last_drops_read = now;
                    }
                    if self.device.pending_tx() >= self.config.tx_batch
                        || now.saturating_sub(last_flush) >= self.config.flush_interval
                    {
                        self.flush_or_back_off(&mut stalls)?;
                        last_flush = now;
                    }
                }
            }
            self.counters.publish(&self.stats);
        }
        self.drain(&mut stalls)
    }

    /// The loop's clock, for a burst whose device gives no time of its own (and for idle calls).
    fn now(&self) -> Instant {
        elapsed(&self.clock)
    }

    /// Blocks in the device's wait while nothing comes, waking early when another loop hands this
    /// one a frame.
    fn wait(&mut self) -> Result<(), DeviceError> {
        let timeout = self.config.idle_wait;
        let Some(h) = &self.handoff else {
            self.stats.idle_waits += 1;
            return self.device.wait(timeout);
        };
        if !h.will_wait() {
            return Ok(());
        }
        self.stats.idle_waits += 1;
        let waited = match h.wake_fd() {
            Some(fd) => self.device.wait_or_wake(timeout, fd),
            None => self.device.wait(timeout),
        };
        h.woke();
        waited
    }

    /// As the loop leaves for good (stopped, or its device failed), closes its inbox, so that frames
    /// handed to it from then on are refused and counted lost by their senders, and runs what waits
    /// there as in any round: sent with the rest of the queue on the way out, or counted (declined,
    /// abandoned) on a failed device. Before, those frames stayed in the inbox, counted as handed
    /// off by their senders and nowhere else. A loop that leaves at the end of a finite device keeps
    /// its inbox open: it may be run again with the same end (tests, replays).
    fn close_inbox(&mut self) {
        let Some(h) = &self.handoff else { return };
        h.close();
        // Until it is empty: senders that see it closed take back what they hand it.
        while self.handed_in() > 0 {
            if self.device.pending_tx() >= self.config.max_pending_tx {
                // Room for the next burst's copies; a stuck ring is given up on by the drain.
                let _ = self.device.flush();
            }
        }
    }

    /// Runs up to a burst of the frames other loops handed to this one through the processor and
    /// queues copies of those to transmit on this loop's device; returns how many it took.
    fn handed_in(&mut self) -> usize {
        let Some(h) = &self.handoff else { return 0 };
        let burst = self.config.burst;
        let mut slots: [Option<handoff::Slot>; MAX_BURST] = [const { None }; MAX_BURST];
        let mut n = 0;
        while n < burst
            && let Some(slot) = h.take()
        {
            slots[n] = Some(slot);
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        let mut frames: [Frame<'_>; MAX_BURST] = std::array::from_fn(|_| Frame::whole(&mut []));
        for (frame, slot) in frames.iter_mut().zip(slots.iter_mut()).take(n) {
            if let Some(slot) = slot {
                *frame = Frame::new(&mut slot.buf, handoff::HEADROOM, slot.len);
            }
        }
        let mut verdicts = [Verdict::Pass; MAX_BURST];
        self.processor.process_handed(&mut frames[..n], elapsed(&self.clock), &mut verdicts[..n]);
        for (frame, verdict) in frames.iter().zip(verdicts.iter()).take(n) {
            // A copy cannot go to the kernel, and is never handed on again (no ping-pong between
            // loops whose tables disagree for a moment).
            if *verdict != Verdict::Tx {
                self.stats.drop += 1;
            } else if self.device.transmit_copy(frame.data()) {
                self.stats.tx += 1;
            } else {
                self.stats.tx_declined += 1;
                self.stats.drop += 1;
            }
        }
        for slot in slots.iter_mut().take(n) {
            if let Some(slot) = slot.take() {
                h.give_back(slot);
            }
        }
        self.stats.handed_in += n as u64;
        n
    }

    /// Receives one burst, runs the processor on it and settles it; returns the burst size (with
    /// the frames handed in by other loops).
    fn round(&mut self) -> Result<usize, DeviceError> {
        let handed = self.handed_in();
        let burst = self.config.burst;
        let mut frames: [Frame<'_>; MAX_BURST] = std::array::from_fn(|_| Frame::whole(&mut []));
        let received = self.device.receive(&mut frames[..burst])?;
        let n = received.count.min(burst);
        if n == 0 {
            return Ok(handed);
        }
        let now = received.clock.unwrap_or_else(|| elapsed(&self.clock));
        let mut verdicts = [Verdict::Pass; MAX_BURST];
        self.processor.process_burst(&mut frames[..n], now, &mut verdicts[..n]);
        let mut spans: [Option<Span>; MAX_BURST] = [None; MAX_BURST];
        let mut tx = 0usize;
        for ((frame, verdict), span) in frames.iter().zip(verdicts.iter()).zip(spans.iter_mut()).take(n) {
            match verdict {
                Verdict::Tx => {
                    *span = Some(Span::of(frame));
                    tx += 1;
                }
                Verdict::Pass => self.stats.pass += 1,
                Verdict::Drop(_) => self.stats.drop += 1,
                Verdict::Handoff(to) => {
                    let to = usize::from(*to);
                    if self.handoff.as_ref().is_some_and(|h| h.send(to, frame.data())) {
                        self.stats.handed_off += 1;
                    } else {
                        self.stats.handoff_lost += 1;
                        let closed = self.handoff.as_ref().is_some_and(|h| h.is_closed(to));
                        self.stats.handoff_refused += u64::from(closed);
                        self.stats.drop += 1;
                    }
                }
                Verdict::HandoffAll => {
                    // A copy to every other loop: handed off once any copy went.
                    let (sent, lost, refused) =
                        self.handoff.as_ref().map_or((0, 1, 0), |h| h.send_to_others(frame.data()));
                    self.stats.handoff_lost += lost as u64;
                    self.stats.handoff_refused += refused as u64;
                    if sent > 0 {
                        self.stats.handed_off += 1;
                    } else {
                        self.stats.drop += 1;
                    }
                }
            }
        }
        self.stats.rx += n as u64;
        self.stats.bursts += 1;
        let queued = self.device.settle(&spans[..n])?;
        self.stats.tx += queued as u64;
        // What the device declined (it recycles those buffers) is lost: a drop.
        let declined = tx.saturating_sub(queued) as u64;
        self.stats.tx_declined += declined;
        self.stats.drop += declined;
        Ok(n + handed)
    }

    /// Flushes; when nothing moves, backs off (spin, then yield, then a short sleep) and, after
    /// `max_stalled_flushes` in a row, abandons the queued frames (counted).
    fn flush_or_back_off(&mut self, stalls: &mut u32) -> Result<(), DeviceError> {
        let progress = self.device.flush()?;
        if progress.submitted > 0 || progress.completed > 0 || progress.pending == 0 {
            *stalls = 0;
            return Ok(());
        }
        *stalls += 1;
        self.stats.stalled_flushes += 1;
        if *stalls >= self.config.max_stalled_flushes {
            self.stats.tx_abandoned += self.device.discard_pending() as u64;
            *stalls = 0;
        } else if *stalls > 64 {
            std::thread::sleep(Duration::from_micros(u64::from((*stalls).min(1000))));
        } else if *stalls > 8 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// On the way out: send what is queued, giving up (counted) on a stuck ring.
    fn drain(&mut self, stalls: &mut u32) -> Result<(), DeviceError> {
        while self.device.pending_tx() > 0 {
            self.flush_or_back_off(stalls)?;
        }
        // One more flush reaps completions of the last submissions.
        self.device.flush()?;
        Ok(())
    }
}

impl<D, P> PollLoop<D, P>
where
    D: Device + Send + 'static,
    P: BurstProcessor + Send + 'static,
{
    /// Runs the loop on its own thread named `name`, pinned to `core` when given, and returns once
    /// the thread is pinned: a core that does not exist (or the affinity mask excludes) is this
    /// call's error, and no loop runs. The thread ends as [`run_keeping_parts`](Self::run_keeping_parts)
    /// does: a loop whose device fails hands back its processor with the error. It also sets the
    /// stop flag it was made with, so the loops that share it (one node's) stop too rather than
    /// serve on without its queue, and the replies handed to it.
    pub fn spawn(self, name: String, core: Option<usize>) -> Result<Running<D, P>, SpawnError> {
        let (pinned_tx, pinned) = std::sync::mpsc::channel::<Result<(), SpawnError>>();
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            if let Some(core) = core
                && let Err(e) = pin_to_core(core)
            {
                let _ = pinned_tx.send(Err(e));
                // Never seen: `spawn` returns the pinning error and drops this thread's handle.
                return Ok(LoopReport { device: self.device, processor: self.processor, stats: self.stats });
            }
            let _ = pinned_tx.send(Ok(()));
            let report = self.run_keeping_parts();
            if report.is_err() {
                stop.stop();
            }
            report
        })?;
        match pinned.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            // The thread ended before it said (it panicked).
            Err(_) => Err(SpawnError::Pin(core.unwrap_or_default())),
        }
    }
}

/// A poll loop running on its own thread ([`PollLoop::spawn`]): what it hands back when it ends.
pub type Running<D, P> = JoinHandle<Result<LoopReport<D, P>, LoopFailed<D, P>>>;

/// How often a loop that receives frames reads the kernel's drops on their way to its device (a
/// system call for an AF_XDP socket).
const KERNEL_DROPS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Empty rounds between the spinning loop's looks at the clock for its idle turn (a clock read each
/// empty round would slow the receive polls that a spinning loop is for).
const SPIN_CLOCK_ROUNDS: usize = 64;

/// The origin of every loop's clock, one for the process: a processor moved from a finished loop
/// into a new one (a worker kept, with its flows, across a restart of its loop) sees its time go
/// on. With an origin per loop the new loop's times started again at zero, and a worker, which
/// takes a time earlier than its last burst's as that one, held its clock there: no flow expired
/// until the new loop's clock caught up with the old one's.
fn clock_origin() -> std::time::Instant {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(std::time::Instant::now)
}

/// The time since `start`, as the processor's clock.
fn elapsed(start: &std::time::Instant) -> Instant {
    Instant::from_nanos(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// Why a poll loop could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The core to pin to does not exist or refused the thread.
    #[error("cannot pin the poll loop to core {0}: it does not exist or the affinity mask excludes it")]
    Pin(usize),
    /// The thread could not be made.
    #[error("cannot start the poll loop's thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Pins the calling thread to CPU number `core` (as `taskset` and /proc/cpuinfo number them); an
/// error when the CPU does not exist or is outside this process's affinity mask.
pub fn pin_to_core(core: usize) -> Result<(), SpawnError> {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    let id = ids.into_iter().find(|c| c.id == core).ok_or(SpawnError::Pin(core))?;
    if core_affinity::set_for_current(id) { Ok(()) } else { Err(SpawnError::Pin(core)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{FlushProgress, Received};
    use crate::memory::{MemoryConfig, MemoryDevice};
    use crate::processor::MacRewrite;
    use crate::testing::NoTraffic;

    const SRC: [u8; 6] = [2, 0, 0, 0, 0, 0xaa];
    const DST: [u8; 6] = [2, 0, 0, 0, 0, 0xbb];

    fn frame(i: u16) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14..16].copy_from_slice(&i.to_be_bytes());
        f
    }

    fn device_with(n: u16, config: MemoryConfig) -> MemoryDevice {
        let mut d = MemoryDevice::new(config);
        for i in 0..n {
            d.push_rx(&frame(i));
        }
        d
    }

    fn run<P: BurstProcessor>(dev: MemoryDevice, p: P, config: LoopConfig) -> LoopReport<MemoryDevice, P> {
        let (_tx, rx) = update_channel();
        PollLoop::new(dev, p, rx, StopFlag::new(), config).run().unwrap()
    }

    #[test]
    fn forwards_every_frame_in_order_and_recycles_every_buffer() {
        // 1000 frames through a 64-buffer pool: buffers must come back or the loop would starve.
        let dev = device_with(1000, MemoryConfig { buffers: 64, ..MemoryConfig::default() });
        let mut dev = dev;
        dev.push_rx(&[1, 2, 3]); // a runt: Pass, recycled
        let mut r = run(dev, MacRewrite { src: SRC, dst: DST }, LoopConfig::default());
        let out = r.device.take_transmitted();
        assert_eq!(out.len(), 1000);
        for (i, f) in out.iter().enumerate() {
            assert_eq!(&f[..6], &DST);
            assert_eq!(&f[6..12], &SRC);
            assert_eq!(u16::from_be_bytes([f[14], f[15]]), i as u16);
        }
        assert_eq!((r.stats.rx, r.stats.tx, r.stats.pass, r.stats.tx_abandoned), (1001, 1000, 1, 0));
        assert_eq!(r.device.unaccounted_buffers(), 0);
    }

    /// A headroom as large as the buffers leaves no room for a packet: every input frame is counted
    /// oversize and the input drains (the loop used to find no buffer it could lend, take nothing
    /// from the input and spin).
    #[test]
    fn a_headroom_beyond_the_buffer_drops_every_frame_as_oversize() {
        let cfg = MemoryConfig { buffer_size: 256, headroom: 512, ..MemoryConfig::default() };
        let mut r = run(device_with(10, cfg), MacRewrite { src: SRC, dst: DST }, LoopConfig::default());
        assert_eq!(r.device.oversize_dropped(), 10);
        assert_eq!(r.stats.rx, 0);
        assert!(r.device.take_transmitted().is_empty());
    }

    /// A memory device configured with no buffers gets one, as a handoff mesh does: the loop
    /// forwards every frame and ends with the input (with none it could lend nothing, took nothing
    /// from the input and spun for ever).
    #[test]
    fn a_memory_device_with_no_buffers_still_forwards_and_ends() {
        let cfg = MemoryConfig { buffers: 0, ..MemoryConfig::default() };
        let dev = device_with(10, cfg);
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(run(dev, MacRewrite { src: SRC, dst: DST }, LoopConfig::default()));
        });
        let mut r = done.recv_timeout(Duration::from_secs(60)).expect("the loop ends with its input");
        assert_eq!((r.stats.rx, r.stats.tx), (10, 10));
        assert_eq!(r.device.take_transmitted().len(), 10);
        assert_eq!(r.device.unaccounted_buffers(), 0);
    }

    /// Frames the kernel dropped before they reached the device (an AF_XDP socket's full receive
    /// ring) show in the loop's stats and live counters, apart from the frames it received: they
    /// were counted nowhere the operator could see.
    #[test]
    fn the_kernels_drops_before_the_device_are_counted() {
        let mut dev = device_with(5, MemoryConfig::default());
        dev.count_kernel_rx_dropped(7);
        let (_tx, rx) = update_channel();
        let lp = PollLoop::new(dev, MacRewrite { src: SRC, dst: DST }, rx, StopFlag::new(), LoopConfig::default());
        let live = lp.counters();
        let r = lp.run().unwrap();
        assert_eq!((r.stats.rx, r.stats.drop, r.stats.kernel_rx_dropped), (5, 0, 7));
        assert_eq!(live.snapshot().kernel_rx_dropped, 7);
    }

    #[test]
    fn slow_transmit_side_is_back_pressure_not_loss() {
        let cfg = MemoryConfig { buffers: 32, tx_per_flush: 3, ..MemoryConfig::default() };
        let loop_cfg = LoopConfig { max_pending_tx: 16, ..LoopConfig::default() };
        let mut r = run(device_with(500, cfg), MacRewrite { src: SRC, dst: DST }, loop_cfg);
        assert_eq!(r.device.take_transmitted().len(), 500);
        assert_eq!(r.stats.tx_abandoned, 0);
    }

    #[test]
    fn stuck_transmit_ring_is_abandoned_after_counted_stalls() {
        let cfg = MemoryConfig { buffers: 32, tx_per_flush: 0, ..MemoryConfig::default() };
        let loop_cfg = LoopConfig { max_pending_tx: 16, max_stalled_flushes: 5, ..LoopConfig::default() };
        let mut r = run(device_with(100, cfg), MacRewrite { src: SRC, dst: DST }, loop_cfg);
        assert!(r.device.take_transmitted().is_empty());
        assert_eq!(r.stats.rx, 100);
        assert_eq!(r.stats.tx_abandoned, 100);
        // Every give-up came after exactly `max_stalled_flushes` fruitless flushes.
        assert!(r.stats.stalled_flushes >= 5 && r.stats.stalled_flushes.is_multiple_of(5), "{:?}", r.stats);
        assert_eq!(r.device.unaccounted_buffers(), 0);
    }

    /// A `max_pending_tx` of 0 is read as 1: the loop still receives and ends at the end of the
    /// input (with 0 it saw "0 >= 0 queued", only flushed, and spun forever without receiving).
    #[test]
    fn a_zero_max_pending_tx_still_receives() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let loop_cfg = LoopConfig { max_pending_tx: 0, ..LoopConfig::default() };
            let mut r = run(device_with(10, MemoryConfig::default()), MacRewrite { src: SRC, dst: DST }, loop_cfg);
            let _ = done_tx.send((r.stats.rx, r.device.take_transmitted().len()));
        });
        let done = done_rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(done.ok(), Some((10, 10)), "the loop never received (or never ended)");
    }

    #[test]
    fn stop_flag_ends_the_loop_before_any_receive() {
        let stop = StopFlag::new();
        stop.stop();
        let (_tx, rx) = update_channel();
        let r = PollLoop::new(
            device_with(10, MemoryConfig::default()),
            MacRewrite { src: SRC, dst: DST },
            rx,
            stop,
            LoopConfig::default(),
        )
        .run()
        .unwrap();
        assert_eq!(r.stats.rx, 0);
    }

    /// Records the generation it saw in each burst.
    struct Tagger {
        generation: Box<u32>,
        seen: Vec<u32>,
    }

    impl BurstProcessor for Tagger {
        type Update = Box<u32>;
        fn process_burst(&mut self, frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
            self.seen.push(*self.generation);
            for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
                f.data_mut()[0] = *self.generation as u8;
                *v = Verdict::Tx;
            }
        }
        fn apply(&mut self, update: Box<u32>) -> Box<u32> {
            std::mem::replace(&mut self.generation, update)
        }
    }

    /// A device that lends `left` frames one burst at a time and declines to send any of them, as an
    /// AF_XDP device declines an empty span or one past its chunk.
    struct Declining {
        left: usize,
        buffers: Vec<Vec<u8>>,
    }

    impl Device for Declining {
        fn receive<'a>(&'a mut self, frames: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
            let n = self.left.min(frames.len()).min(self.buffers.len());
            self.left -= n;
            for (f, b) in frames.iter_mut().zip(self.buffers.iter_mut()).take(n) {
                *f = Frame::whole(b);
            }
            Ok(Received::frames(n))
        }
        fn settle(&mut self, _spans: &[Option<Span>]) -> Result<usize, DeviceError> {
            Ok(0)
        }
        fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
            Ok(FlushProgress::default())
        }
        fn pending_tx(&self) -> usize {
            0
        }
        fn discard_pending(&mut self) -> usize {
            0
        }
        fn at_end(&self) -> bool {
            self.left == 0
        }
    }

    #[test]
    fn a_tx_the_device_declines_counts_as_a_drop() {
        let dev = Declining { left: 40, buffers: (0..16).map(frame).collect() };
        let (_tx, rx) = update_channel();
        let r = PollLoop::new(dev, MacRewrite { src: SRC, dst: DST }, rx, StopFlag::new(), LoopConfig::default())
            .run()
            .unwrap();
        let s = r.stats;
        assert_eq!((s.rx, s.tx, s.pass, s.drop), (40, 0, 0, 40));
    }

    /// A device that never receives and never ends; its third wait stops the loop.
    struct Silent {
        waits: u32,
        stop: StopFlag,
    }

    impl Device for Silent {
        fn receive<'a>(&'a mut self, _frames: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
            Ok(Received::frames(0))
        }
        fn settle(&mut self, _spans: &[Option<Span>]) -> Result<usize, DeviceError> {
            Ok(0)
        }
        fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
            Ok(FlushProgress::default())
        }
        fn pending_tx(&self) -> usize {
            0
        }
        fn discard_pending(&mut self) -> usize {
            0
        }
        fn wait(&mut self, _timeout: Duration) -> Result<(), DeviceError> {
            self.waits += 1;
            if self.waits == 3 {
                self.stop.stop();
            }
            Ok(())
        }
    }

    /// Records the times it was called idle with.
    #[derive(Default)]
    struct Housekeeper {
        idle: Vec<Instant>,
    }

    impl BurstProcessor for Housekeeper {
        type Update = ();
        fn process_burst(&mut self, _: &mut [Frame<'_>], _: Instant, _: &mut [Verdict]) {
            panic!("no frame came");
        }
        fn apply(&mut self, u: ()) {
            u
        }
        fn idle(&mut self, now: Instant) {
            self.idle.push(now);
        }
    }

    /// With nothing to receive the processor still gets its turn (`idle`) before each wait, so it
    /// can reclaim expired state and publish counters; the load balancer's worker sweeps then.
    #[test]
    fn an_idle_loop_calls_the_processor_before_each_wait() {
        let stop = StopFlag::new();
        let dev = Silent { waits: 0, stop: stop.clone() };
        let (_tx, rx) = update_channel();
        let cfg = LoopConfig { idle_spins: 4, ..LoopConfig::default() };
        let r = PollLoop::new(dev, Housekeeper::default(), rx, stop, cfg).run().unwrap();
        assert_eq!((r.device.waits, r.stats.idle_waits), (3, 3));
        assert_eq!(r.processor.idle.len(), 3, "once before each wait");
        assert!(r.processor.idle.windows(2).all(|w| w[0] <= w[1]), "{:?}", r.processor.idle);
    }

    /// Records the time of each burst; holds the first burst for `hold` (so the loop's clock has
    /// moved on by the next one). Passes every frame.
    struct Clocked {
        nows: Vec<Instant>,
        hold: Duration,
    }

    impl BurstProcessor for Clocked {
        type Update = ();
        fn process_burst(&mut self, _: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
            self.nows.push(now);
            verdicts.fill(Verdict::Pass);
            if self.nows.len() == 1 {
                let start = std::time::Instant::now();
                while start.elapsed() < self.hold {
                    std::hint::spin_loop();
                }
            }
        }
        fn apply(&mut self, u: ()) {
            u
        }
    }

    /// A processor taken from a finished loop's report into a new loop (a worker kept, with its
    /// flows, across a restart of its loop) sees its time go on. Each loop's clock started at zero
    /// when it was made, so the new loop's times were earlier than the old one's: a worker then
    /// holds its clock at its last burst's, and no flow expires until the new clock catches up.
    #[test]
    fn a_processor_moved_to_a_new_loop_sees_its_time_go_on() {
        let cfg = LoopConfig { burst: 1, ..LoopConfig::default() };
        let p = Clocked { nows: vec![], hold: Duration::from_millis(200) };
        let (_tx, rx) = update_channel();
        let first = PollLoop::new(device_with(2, MemoryConfig::default()), p, rx, StopFlag::new(), cfg).run().unwrap();
        let (_tx, rx) = update_channel();
        let dev = device_with(1, MemoryConfig::default());
        let second = PollLoop::new(dev, first.processor, rx, StopFlag::new(), cfg).run().unwrap();
        let nows = &second.processor.nows;
        assert_eq!(nows.len(), 3);
        assert!(nows[1].saturating_since(nows[0]) >= Duration::from_millis(200), "{nows:?}");
        assert!(nows[2] >= nows[1], "the second loop's first burst came before the first loop's last: {nows:?}");
    }

    /// A memory device whose wire is stuck and that fails, as an unbound AF_XDP socket does, once
    /// its input is used up.
    struct FailsWhenEmpty(MemoryDevice);

    impl Device for FailsWhenEmpty {
        fn receive<'a>(&'a mut self, f: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
            if self.0.at_end() {
                return Err(DeviceError::Io {
                    op: "recvfrom (RX wakeup)",
                    device: "gone0#0".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENETDOWN),
                });
            }
            self.0.receive(f)
        }
        fn settle(&mut self, s: &[Option<Span>]) -> Result<usize, DeviceError> {
            self.0.settle(s)
        }
        fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
            self.0.flush()
        }
        fn pending_tx(&self) -> usize {
            self.0.pending_tx()
        }
        fn discard_pending(&mut self) -> usize {
            self.0.discard_pending()
        }
    }

    fn failing_device(frames: u16) -> FailsWhenEmpty {
        let mut dev = device_with(frames, MemoryConfig::default());
        dev.set_tx_per_flush(0);
        FailsWhenEmpty(dev)
    }

    /// A loop that fails on its device hands back its processor, with its state (here the bursts it
    /// saw; a worker's flows), so an embedder can go on with it on a new device; its counts up to
    /// the failure are published, the frames it had queued to send counted as abandoned. Spawned,
    /// the same comes back through its thread, and the loops sharing its stop flag are stopped.
    /// Before, the error alone came back: the processor, and a worker's connection table in it,
    /// were dropped with the loop.
    #[test]
    fn a_loop_that_fails_on_its_device_hands_back_its_processor() {
        let (_tx, rx) = update_channel();
        let p = Tagger { generation: Box::new(3), seen: vec![] };
        let lp = PollLoop::new(failing_device(10), p, rx, StopFlag::new(), LoopConfig::default());
        let counters = lp.counters();
        let Err(failed) = lp.run_keeping_parts() else { panic!("the device failed, the loop did not") };
        assert!(failed.to_string().contains("gone0#0"), "{failed}");
        let r = &failed.report;
        assert_eq!(r.processor.seen, [3], "the processor came back with the burst it processed");
        assert_eq!((r.stats.rx, r.stats.tx, r.stats.tx_abandoned), (10, 10, 10));
        assert_eq!(r.device.pending_tx(), 0);
        assert_eq!(counters.snapshot().tx_abandoned, 10, "published");
        // Its processor goes on in a new loop.
        let (_tx, rx) = update_channel();
        let again = PollLoop::new(
            device_with(1, MemoryConfig::default()),
            failed.report.processor,
            rx,
            StopFlag::new(),
            LoopConfig::default(),
        );
        assert_eq!(again.run().unwrap().processor.seen, [3, 3]);

        let stop = StopFlag::new();
        let (_tx, rx) = update_channel();
        let p = Tagger { generation: Box::new(4), seen: vec![] };
        let h = PollLoop::new(failing_device(2), p, rx, stop.clone(), LoopConfig::default())
            .spawn("failing".into(), None)
            .unwrap();
        let Err(failed) = h.join().unwrap() else { panic!("the device failed, the loop did not") };
        assert_eq!(failed.report.processor.seen, [4]);
        assert!(stop.is_set(), "the loops sharing the flag are stopped");
    }

    /// Stops its loop at its third idle call.
    struct StopWhenIdle {
        calls: u32,
        stop: StopFlag,
    }

    impl BurstProcessor for StopWhenIdle {
        type Update = ();
        fn process_burst(&mut self, _: &mut [Frame<'_>], _: Instant, _: &mut [Verdict]) {
            panic!("no frame came");
        }
        fn apply(&mut self, u: ()) {
            u
        }
        fn idle(&mut self, _now: Instant) {
            self.calls += 1;
            if self.calls == 3 {
                self.stop.stop();
            }
        }
    }

    /// A loop that spins (`idle_spins: usize::MAX`, busy poll) never waits, but its processor still
    /// gets idle turns (before, it got none: expired flows stayed and counters went unpublished).
    #[test]
    fn a_spinning_loop_still_gives_the_processor_its_idle_turns() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let stop = StopFlag::new();
            let dev = Silent { waits: 0, stop: StopFlag::new() };
            let (_tx, rx) = update_channel();
            let cfg =
                LoopConfig { idle_spins: usize::MAX, idle_wait: Duration::from_millis(1), ..LoopConfig::default() };
            let p = StopWhenIdle { calls: 0, stop: stop.clone() };
            let r = PollLoop::new(dev, p, rx, stop, cfg).run().unwrap();
            let _ = done_tx.send((r.processor.calls, r.device.waits, r.stats.idle_waits));
        });
        let done = done_rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(done.ok(), Some((3, 0, 0)), "no idle turn came (or the loop waited)");
    }

    #[test]
    fn updates_are_applied_between_bursts_and_old_state_comes_back() {
        let (tx, rx) = update_channel();
        tx.send(Box::new(7)).unwrap();
        let dev = device_with(200, MemoryConfig::default());
        let cfg = LoopConfig { burst: 16, ..LoopConfig::default() };
        let mut r = PollLoop::new(dev, Tagger { generation: Box::new(1), seen: vec![] }, rx, StopFlag::new(), cfg)
            .run()
            .unwrap();
        assert_eq!(r.stats.updates, 1);
        assert_eq!(r.processor.seen.len(), 200usize.div_ceil(16));
        assert!(r.processor.seen.iter().all(|&g| g == 7));
        assert!(r.device.take_transmitted().iter().all(|f| f[0] == 7));
        // The replaced state was sent back to be dropped here, on the control side.
        assert_eq!(tx.wait_retired(Duration::ZERO).map(|b| *b), Some(1));
    }

    /// The loop applies every update sent, the last one included, once the control side stops
    /// sending, in the worst interleaving for the retired queue: the control side fills the update
    /// queue, then a `send` collects, finds the queue full and waits while the loop applies one,
    /// and then the loop runs alone; twice. (With `UPDATE_QUEUE` retired slots the first round
    /// parked a retired state and the second left its last update unapplied.)
    #[test]
    fn the_last_update_of_a_burst_is_applied() {
        let (tx, mut rx) = update_channel();
        let mut p = Tagger { generation: Box::new(0), seen: vec![] };
        let mut sent = 0;
        for _round in 0..2 {
            for _ in 0..UPDATE_QUEUE {
                sent += 1;
                tx.send(Box::new(sent)).unwrap();
            }
            // A blocking `send`, spelled out so the loop runs between its collection and its push.
            sent += 1;
            tx.collect_retired();
            let update = tx.updates.try_send(Box::new(sent)).unwrap_err().into_inner();
            assert!(rx.poll(&mut p));
            tx.updates.try_send(update).unwrap();
            for _ in 0..2 * UPDATE_QUEUE {
                rx.poll(&mut p);
            }
            assert_eq!(*p.generation, sent, "the loop applied up to {}, {sent} sent", p.generation);
        }
        assert_eq!(tx.collect_retired(), UPDATE_QUEUE + 1, "every replaced state came back");
    }

    /// `send_latest` to a loop that does not drain its queue returns at once, keeping only the
    /// newest update back; once the loop has room, a retry queues it, and the loop ends on it,
    /// having skipped the ones it replaced while pending.
    #[test]
    fn send_latest_to_a_stuck_loop_keeps_the_newest_pending() {
        let (mut tx, mut rx) = update_channel();
        let mut p = Tagger { generation: Box::new(0), seen: vec![] };
        for g in 1..=UPDATE_QUEUE as u32 {
            assert_eq!(tx.send_latest(Box::new(g)).unwrap(), Delivery::Queued);
        }
        let newest = 3 * UPDATE_QUEUE as u32;
        for g in UPDATE_QUEUE as u32 + 1..=newest {
            assert_eq!(tx.send_latest(Box::new(g)).unwrap(), Delivery::Pending, "update {g}");
        }
        assert!(tx.has_pending());
        assert_eq!(tx.retry_pending().unwrap(), Delivery::Pending, "the loop has applied nothing yet");

        assert!(rx.poll(&mut p));
        assert_eq!(tx.retry_pending().unwrap(), Delivery::Queued);
        assert!(!tx.has_pending());
        let mut applied = vec![*p.generation];
        while rx.poll(&mut p) {
            applied.push(*p.generation);
        }
        let mut want: Vec<u32> = (1..=UPDATE_QUEUE as u32).collect();
        want.push(newest);
        assert_eq!(applied, want);
        assert_eq!(tx.collect_retired(), UPDATE_QUEUE, "the rest of the replaced states came back");

        drop(rx);
        assert!(tx.send_latest(Box::new(0)).is_err(), "a gone loop is reported");
    }

    /// `is_applied` says whether the loop runs the last update handed to it: not while one waits in
    /// its queue, nor while one is pending on the control side, and again once the loop has applied
    /// all of them; it never blocks.
    #[test]
    fn is_applied_tells_when_the_loop_runs_the_last_update() {
        let (mut tx, mut rx) = update_channel();
        let mut p = Tagger { generation: Box::new(0), seen: vec![] };
        assert!(tx.is_applied(), "nothing sent: the loop runs what it started with");
        tx.send(Box::new(1)).unwrap();
        assert!(!tx.is_applied(), "queued, not applied");
        assert!(rx.poll(&mut p));
        assert!(tx.is_applied());
        for g in 2..=UPDATE_QUEUE as u32 + 1 {
            tx.send_latest(Box::new(g)).unwrap();
        }
        let newest = UPDATE_QUEUE as u32 + 2;
        assert_eq!(tx.send_latest(Box::new(newest)).unwrap(), Delivery::Pending);
        while rx.poll(&mut p) {}
        assert!(!tx.is_applied(), "the newest is still pending on the control side");
        assert_eq!(tx.retry_pending().unwrap(), Delivery::Queued);
        assert!(!tx.is_applied(), "queued, not applied");
        assert!(rx.poll(&mut p));
        assert_eq!(*p.generation, newest);
        assert!(tx.is_applied());
        // Retired states taken by `wait_retired` count as well.
        tx.send(Box::new(0)).unwrap();
        assert!(rx.poll(&mut p));
        assert!(tx.wait_retired(Duration::ZERO).is_some());
        assert!(tx.is_applied());
        drop(rx);
        assert!(tx.send(Box::new(0)).is_err());
        assert!(tx.is_applied(), "an update that was not delivered is not waited for");
    }

    #[test]
    fn a_spawned_loop_takes_live_updates_and_stops_on_the_flag() {
        // A device that never ends: the loop must leave on the stop flag.
        struct Endless(MemoryDevice);
        impl Device for Endless {
            fn receive<'a>(&'a mut self, f: &mut [Frame<'a>]) -> Result<crate::Received, DeviceError> {
                self.0.push_rx(&frame(0));
                self.0.receive(f)
            }
            fn settle(&mut self, s: &[Option<Span>]) -> Result<usize, DeviceError> {
                self.0.settle(s)
            }
            fn flush(&mut self) -> Result<crate::FlushProgress, DeviceError> {
                let p = self.0.flush();
                self.0.take_transmitted();
                p
            }
            fn pending_tx(&self) -> usize {
                self.0.pending_tx()
            }
            fn discard_pending(&mut self) -> usize {
                self.0.discard_pending()
            }
        }
        let (tx, rx) = update_channel();
        let stop = StopFlag::new();
        let lp = PollLoop::new(
            Endless(MemoryDevice::new(MemoryConfig::default())),
            Tagger { generation: Box::new(0), seen: vec![] },
            rx,
            stop.clone(),
            LoopConfig::default(),
        );
        let h = lp.spawn("test-loop".into(), None).unwrap();
        // Each update is applied while the loop runs and retires the one before it, in order.
        let mut retired = Vec::new();
        for g in 1..=20u32 {
            tx.send(Box::new(g)).unwrap();
            match tx.wait_retired(Duration::from_secs(10)) {
                Some(b) => retired.push(*b),
                None => panic!("loop stopped applying updates; retired so far: {retired:?}"),
            }
        }
        assert_eq!(retired, (0..20).collect::<Vec<_>>());
        stop.stop();
        let r = h.join().unwrap().unwrap();
        assert_eq!(r.stats.updates, 20);
        assert_eq!(*r.processor.generation, 20);
        assert!(r.processor.seen.windows(2).all(|w| w[0] <= w[1]), "generations go forward only");
    }

    /// Sends a frame to the loop its first byte names (0xff: to every other loop); its own frames
    /// it marks (second byte) and transmits, and so those handed to it for all.
    struct Router {
        me: u8,
    }

    const TO_ALL: u8 = 0xff;

    impl BurstProcessor for Router {
        type Update = Box<u32>;
        fn process_burst(&mut self, frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
            for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
                let to = f.data()[0];
                *v = if to == self.me {
                    f.data_mut()[1] = 0xee;
                    Verdict::Tx
                } else if to == TO_ALL {
                    Verdict::HandoffAll
                } else {
                    Verdict::Handoff(u16::from(to))
                };
            }
        }
        fn process_handed(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
            for f in frames.iter_mut() {
                if f.data()[0] == TO_ALL {
                    f.data_mut()[0] = self.me;
                }
            }
            self.process_burst(frames, now, verdicts);
        }
        fn apply(&mut self, update: Box<u32>) -> Box<u32> {
            update
        }
    }

    fn routed(to: u8, i: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        (f[0], f[2]) = (to, i);
        f
    }

    #[test]
    fn frames_for_another_loop_are_handed_to_it_and_sent_from_its_device() {
        let ends = handoff::mesh(3, handoff::HandoffConfig { buffers: 4, buffer_size: 512 }).unwrap();
        let loop_of = |me: u8, input: &[Vec<u8>]| {
            let mut dev = MemoryDevice::new(MemoryConfig::default());
            for f in input {
                dev.push_rx(f);
            }
            let (_tx, rx) = update_channel();
            PollLoop::new(dev, Router { me }, rx, StopFlag::new(), LoopConfig::default())
                .with_handoff(ends[usize::from(me)].clone())
        };
        // Loop 0 gets one frame of its own, four for loop 1 and two for loop 2, then one more for
        // loop 1, whose inbox (four buffers) is full by then: lost, counted. And one for a loop 7
        // that does not exist.
        let input: Vec<Vec<u8>> = [(0, 0), (1, 1), (1, 2), (2, 3), (1, 4), (1, 5), (2, 6), (1, 7), (7, 8)]
            .map(|(t, i)| routed(t, i))
            .to_vec();
        let mut r0 = loop_of(0, &input).run().unwrap();
        assert_eq!(
            r0.device.take_transmitted(),
            vec![{
                let mut f = routed(0, 0);
                f[1] = 0xee;
                f
            }]
        );
        let s = r0.stats;
        assert_eq!((s.rx, s.tx, s.handed_off, s.handoff_lost, s.drop, s.handed_in), (9, 1, 6, 2, 2, 0));
        // Loop 1 takes what it was handed, in order, and sends it marked from its own buffers, before
        // and beside its own input.
        let mut r1 = loop_of(1, &[routed(1, 9)]).run().unwrap();
        let sent: Vec<(u8, u8)> = r1.device.take_transmitted().iter().map(|f| (f[1], f[2])).collect();
        assert_eq!(sent, [(0xee, 1), (0xee, 2), (0xee, 4), (0xee, 5), (0xee, 9)]);
        let s = r1.stats;
        assert_eq!((s.rx, s.handed_in, s.tx, s.drop), (1, 4, 5, 0));
        assert_eq!(s.rx + s.handed_in, s.tx + s.pass + s.drop + s.handed_off);
        // Its buffers are free again: four more fit.
        assert!((0..4).all(|i| ends[0].send(1, &routed(1, i))));
        let r2 = loop_of(2, &[]).run().unwrap();
        assert_eq!(r2.stats.handed_in, 2);
        // A frame handed in that its new loop would hand on again is dropped, not bounced: loop 2
        // receives one for loop 0 through its inbox.
        assert!(ends[1].send(2, &routed(0, 10)));
        let r2 = loop_of(2, &[]).run().unwrap();
        assert_eq!((r2.stats.handed_in, r2.stats.drop, r2.stats.handed_off), (1, 1, 0));
        assert_eq!(ends[0].pending(), 0);
        // A frame for every other loop: a copy to each, counted once where it came in (loop 1 takes
        // the four it holds first).
        assert_eq!(loop_of(1, &[]).run().unwrap().stats.handed_in, 4);
        let r0 = loop_of(0, &[routed(TO_ALL, 11)]).run().unwrap();
        assert_eq!((r0.stats.handed_off, r0.stats.handoff_lost, r0.stats.drop), (1, 0, 0));
        for me in [1, 2] {
            let mut r = loop_of(me, &[]).run().unwrap();
            let sent: Vec<(u8, u8, u8)> = r.device.take_transmitted().iter().map(|f| (f[0], f[1], f[2])).collect();
            assert_eq!(sent, [(me, 0xee, 11)], "loop {me} got its copy through process_handed");
        }
        // With loop 2's inbox full, its copy is lost and counted; loop 1's goes.
        for i in 0..4 {
            assert!(ends[1].send(2, &routed(2, i)));
        }
        let r0 = loop_of(0, &[routed(TO_ALL, 12)]).run().unwrap();
        assert_eq!((r0.stats.handed_off, r0.stats.handoff_lost, r0.stats.drop), (1, 1, 0));
        assert_eq!((ends[1].pending(), ends[2].pending()), (1, 4));
    }

    /// Frames handed to a loop whose device has no free buffer to copy them into (its transmit side
    /// backed up) are counted as declined, published with the loop's live counters, beside the
    /// drop they also are. Before, only `drop` counted them, which `/metrics` does not show, while
    /// the worker counted them as sent: NAT replies lost with no number going up.
    #[test]
    fn handed_in_frames_the_device_has_no_buffer_for_are_counted_as_declined() {
        let ends = handoff::mesh(2, handoff::HandoffConfig { buffers: 4, buffer_size: 512 }).unwrap();
        for i in 0..4 {
            assert!(ends[0].send(1, &routed(1, i)));
        }
        // Two buffers, and a wire that takes nothing.
        let dev = MemoryDevice::new(MemoryConfig { buffers: 2, tx_per_flush: 0, ..MemoryConfig::default() });
        let (_tx, rx) = update_channel();
        let config = LoopConfig { max_stalled_flushes: 2, ..LoopConfig::default() };
        let lp = PollLoop::new(dev, Router { me: 1 }, rx, StopFlag::new(), config).with_handoff(ends[1].clone());
        let counters = lp.counters();
        let s = lp.run().unwrap().stats;
        assert_eq!((s.handed_in, s.tx, s.tx_declined, s.drop, s.tx_abandoned), (4, 2, 2, 2, 2));
        assert_eq!(counters.snapshot().tx_declined, 2);
    }

    /// Frames waiting in a loop's inbox when it stops are run and sent with the rest of its queue,
    /// and its inbox closes: a frame handed to it from then on is refused and counted lost where it
    /// came in (`handoff_lost`, `handoff_refused`, `drop`). Before, both kinds stayed in the inbox,
    /// counted as handed off by their sender and nowhere else.
    #[test]
    fn frames_in_the_inbox_of_a_stopped_loop_are_sent_and_later_ones_counted_lost() {
        let ends = handoff::mesh(2, handoff::HandoffConfig { buffers: 4, buffer_size: 512 }).unwrap();
        for i in 0..3 {
            assert!(ends[0].send(1, &routed(1, i)));
        }
        let stop = StopFlag::new();
        stop.stop();
        let (_tx, rx) = update_channel();
        let dev = MemoryDevice::new(MemoryConfig::default());
        let mut r = PollLoop::new(dev, Router { me: 1 }, rx, stop, LoopConfig::default())
            .with_handoff(ends[1].clone())
            .run()
            .unwrap();
        let sent: Vec<(u8, u8)> = r.device.take_transmitted().iter().map(|f| (f[1], f[2])).collect();
        assert_eq!(sent, [(0xee, 0), (0xee, 1), (0xee, 2)]);
        let s = r.stats;
        assert_eq!((s.handed_in, s.tx, s.drop, ends[1].pending()), (3, 3, 0, 0));

        // More than its buffers, each refused (and its buffer back on the free list).
        for i in 0..6 {
            assert!(!ends[0].send(1, &routed(1, i)), "handed to a stopped loop");
        }
        assert_eq!(ends[1].pending(), 0);
        let mut dev = MemoryDevice::new(MemoryConfig::default());
        dev.push_rx(&routed(1, 9));
        dev.push_rx(&routed(TO_ALL, 10));
        let (_tx, rx) = update_channel();
        let r0 = PollLoop::new(dev, Router { me: 0 }, rx, StopFlag::new(), LoopConfig::default())
            .with_handoff(ends[0].clone());
        let s = r0.run().unwrap().stats;
        assert_eq!((s.rx, s.handed_off, s.handoff_lost, s.handoff_refused, s.drop), (2, 0, 2, 2, 2));
        assert_eq!(s.rx + s.handed_in, s.tx + s.pass + s.drop + s.handed_off);
    }

    /// A loop whose device fails takes what waits in its inbox too (counted: here declined, the
    /// device having no buffer for a copy) and closes it.
    #[test]
    fn frames_in_the_inbox_of_a_failed_loop_are_counted_and_its_inbox_closes() {
        let ends = handoff::mesh(2, handoff::HandoffConfig { buffers: 4, buffer_size: 512 }).unwrap();
        // Fails at its first receive, once another loop has handed this one a frame.
        let other = ends[0].clone();
        let device = NoTraffic(move || {
            assert!(other.send(1, &routed(1, 7)));
            Err(DeviceError::Io {
                op: "recvfrom (RX wakeup)",
                device: "gone0#0".into(),
                source: std::io::Error::from_raw_os_error(libc::ENETDOWN),
            })
        });
        let (_tx, rx) = update_channel();
        let lp = PollLoop::new(device, Router { me: 1 }, rx, StopFlag::new(), LoopConfig::default())
            .with_handoff(ends[1].clone());
        let Err(failed) = lp.run_keeping_parts() else { panic!("the device failed, the loop did not") };
        let s = failed.report.stats;
        assert_eq!((s.handed_in, s.tx_declined, s.drop, ends[1].pending()), (1, 1, 1, 0));
        assert!(!ends[0].send(1, &routed(1, 8)), "handed to a failed loop");
        assert_eq!(ends[1].pending(), 0);
    }

    #[test]
    fn a_waiting_loop_wakes_for_a_frame_handed_to_it() {
        /// Receives nothing; waits as an AF_XDP socket does (poll on its wake-up), saying when it
        /// starts to; hands what it sends to the test.
        struct Sleeper {
            waiting: Sender<()>,
            sent: Sender<Vec<u8>>,
        }
        impl Device for Sleeper {
            fn receive<'a>(&'a mut self, _f: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
                Ok(Received::frames(0))
            }
            fn settle(&mut self, _s: &[Option<Span>]) -> Result<usize, DeviceError> {
                Ok(0)
            }
            fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
                Ok(FlushProgress::default())
            }
            fn pending_tx(&self) -> usize {
                0
            }
            fn discard_pending(&mut self) -> usize {
                0
            }
            fn transmit_copy(&mut self, packet: &[u8]) -> bool {
                self.sent.send(packet.to_vec()).is_ok()
            }
            fn wait_or_wake(
                &mut self,
                timeout: Duration,
                wake: std::os::fd::BorrowedFd<'_>,
            ) -> Result<(), DeviceError> {
                use std::os::fd::AsRawFd;
                let _ = self.waiting.try_send(());
                let mut pfd = libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
                Ok(())
            }
        }
        let ends = handoff::mesh(2, handoff::HandoffConfig::default()).unwrap();
        let (waiting_tx, waiting) = crossbeam_channel::bounded(1);
        let (sent_tx, sent) = crossbeam_channel::unbounded();
        let stop = StopFlag::new();
        let (_updates, rx) = update_channel();
        // Waits of ten minutes: only the wake-up can end one within the test's deadline.
        let config = LoopConfig { idle_spins: 1, idle_wait: Duration::from_secs(600), ..LoopConfig::default() };
        let h =
            PollLoop::new(Sleeper { waiting: waiting_tx, sent: sent_tx }, Router { me: 1 }, rx, stop.clone(), config)
                .with_handoff(ends[1].clone())
                .spawn("handoff-wake".into(), None)
                .unwrap();
        for i in 0..3 {
            waiting.recv_timeout(Duration::from_secs(30)).expect("the loop went to wait");
            assert!(ends[0].send(1, &routed(1, i)));
            let got = sent.recv_timeout(Duration::from_secs(30)).expect("woken by the handoff, not by its timeout");
            assert_eq!((got[1], got[2]), (0xee, i));
        }
        // Stopped only once it waits again: stopped sooner, the loop could see the flag before it
        // waits, leave and close its inbox, and the send below find it closed.
        waiting.recv_timeout(Duration::from_secs(30)).expect("the loop went to wait");
        stop.stop();
        // The loop leaves at its next look at the flag: wake it once more.
        assert!(ends[0].send(1, &routed(1, 99)));
        let r = h.join().unwrap().unwrap();
        assert!(r.stats.handed_in >= 3);
    }
}
