//! What the poll loop calls on each burst. lb-io knows nothing of load balancing: anything that turns
//! a burst of frames into verdicts can sit in the loop: `lb_core::worker::Worker` in the load
//! balancer, [`MacRewrite`] as the bare "receive, rewrite, transmit" floor in benchmarks and tests.

use lb_core::{Frame, Instant, Verdict};

/// A per-core frame processor driven by a poll loop.
pub trait BurstProcessor {
    /// What the control side sends to replace the processor's shared state (e.g. `Arc<Tables>`).
    type Update: Send + 'static;

    /// Decides a verdict for every frame (`verdicts.len() == frames.len()`), rewriting frames to
    /// transmit in place.
    fn process_burst(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]);

    /// As [`BurstProcessor::process_burst`], for frames another loop's processor handed to this one
    /// ([`Verdict::Handoff`], [`Verdict::HandoffAll`]; see [`crate::handoff`]). The loop never hands
    /// these on again: a processor that can tell should decide them as its own or drop them.
    fn process_handed(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
        self.process_burst(frames, now, verdicts);
    }

    /// Installs `update` between bursts and returns the state it replaces, which the loop sends back
    /// to the control side so it is dropped there, never on the fast path.
    fn apply(&mut self, update: Self::Update) -> Self::Update;

    /// Called when no frame came for a while, before the loop waits for one: time for the work
    /// bursts would otherwise do (reclaiming expired state, publishing counters). Does nothing by
    /// default.
    fn idle(&mut self, now: Instant) {
        let _ = now;
    }
}

/// Conntrack buckets the load balancer's worker sweeps each time its loop goes idle: with the
/// loop's default 10 ms wait, a 2^20-entry table (131 072 buckets) is gone round in ~5 s of idle.
pub const IDLE_SWEEP_BUCKETS: usize = 256;

/// The floor of any forwarder: rewrite the Ethernet addresses and transmit, with no other work.
/// Frames shorter than an Ethernet header get [`Verdict::Pass`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacRewrite {
    /// Ethernet source written into every frame (the port's own MAC).
    pub src: [u8; 6],
    /// Ethernet destination written into every frame (the next hop).
    pub dst: [u8; 6],
}

impl BurstProcessor for MacRewrite {
    type Update = MacRewrite;

    fn process_burst(&mut self, frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
        for (frame, verdict) in frames.iter_mut().zip(verdicts.iter_mut()) {
            *verdict = match frame.data_mut().get_mut(..12) {
                Some(macs) => {
                    macs[..6].copy_from_slice(&self.dst);
                    macs[6..].copy_from_slice(&self.src);
                    Verdict::Tx
                }
                None => Verdict::Pass,
            };
        }
    }

    fn apply(&mut self, update: MacRewrite) -> MacRewrite {
        std::mem::replace(self, update)
    }
}

/// The load balancer: lb-core's per-core worker. Updates are whole new tables; the old ones (or new
/// ones the worker refused, see `Worker::swap_tables`) go back to the control side to be dropped
/// there.
impl BurstProcessor for lb_core::worker::Worker {
    type Update = std::sync::Arc<lb_core::service::Tables>;

    fn process_burst(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
        lb_core::worker::Worker::process_burst(self, frames, now, verdicts);
    }

    fn process_handed(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
        self.process_handed_burst(frames, now, verdicts);
    }

    fn apply(&mut self, update: Self::Update) -> Self::Update {
        self.swap_tables(update)
    }

    fn idle(&mut self, now: Instant) {
        self.sweep(now, IDLE_SWEEP_BUCKETS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_macs_and_passes_runts() {
        let mut p = MacRewrite { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 2] };
        let mut a = [0xffu8; 20];
        let mut b = [0xffu8; 11];
        let mut frames = [Frame::whole(&mut a), Frame::whole(&mut b)];
        let mut v = [Verdict::Pass; 2];
        p.process_burst(&mut frames, Instant::ZERO, &mut v);
        assert_eq!(v, [Verdict::Tx, Verdict::Pass]);
        assert_eq!(&frames[0].data()[..12], &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
        assert_eq!(frames[0].data()[12..], [0xff; 8]);
        assert_eq!(frames[1].data(), &[0xff; 11]);
    }
}
