//! An in-memory device: tests push frames in, run the loop, and read back what was transmitted.

use std::collections::VecDeque;

use lb_core::Frame;

use crate::chunk::ChunkPool;
use crate::device::{Device, DeviceError, FlushProgress, Received, Span};

/// Sizes of a [`MemoryDevice`].
#[derive(Debug, Clone, Copy)]
pub struct MemoryConfig {
    /// Number of frame buffers (at least one is made).
    pub buffers: usize,
    /// Bytes per buffer, headroom included.
    pub buffer_size: usize,
    /// Bytes left free before each received packet.
    pub headroom: usize,
    /// Frames the "wire" takes per flush; `0` models a stuck transmit ring.
    pub tx_per_flush: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { buffers: 256, buffer_size: 2048, headroom: 256, tx_per_flush: usize::MAX }
    }
}

/// Frames in from a queue, frames out to a list.
#[derive(Debug)]
pub struct MemoryDevice {
    pool: ChunkPool,
    input: VecDeque<Vec<u8>>,
    transmitted: Vec<Vec<u8>>,
    tx_per_flush: usize,
    oversize: u64,
    kernel_dropped: u64,
}

impl MemoryDevice {
    /// An empty device.
    pub fn new(config: MemoryConfig) -> Self {
        MemoryDevice {
            pool: ChunkPool::new(config.buffers, config.buffer_size, config.headroom),
            input: VecDeque::new(),
            transmitted: Vec::new(),
            tx_per_flush: config.tx_per_flush,
            oversize: 0,
            kernel_dropped: 0,
        }
    }

    /// Queues a frame to be received.
    pub fn push_rx(&mut self, frame: &[u8]) {
        self.input.push_back(frame.to_vec());
    }

    /// Takes the frames transmitted so far, in order.
    pub fn take_transmitted(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.transmitted)
    }

    /// Changes how many frames the wire takes per flush (0 = stuck).
    pub fn set_tx_per_flush(&mut self, n: usize) {
        self.tx_per_flush = n;
    }

    /// Input frames skipped because they did not fit a buffer.
    pub fn oversize_dropped(&self) -> u64 {
        self.oversize
    }

    /// Counts `n` more frames as dropped before they reached the device, as the kernel counts an
    /// AF_XDP socket's ([`Device::kernel_rx_dropped`]).
    pub fn count_kernel_rx_dropped(&mut self, n: u64) {
        self.kernel_dropped += n;
    }

    #[cfg(test)]
    pub(crate) fn unaccounted_buffers(&self) -> usize {
        self.pool.unaccounted()
    }
}

impl Device for MemoryDevice {
    fn kernel_rx_dropped(&self) -> u64 {
        self.kernel_dropped
    }

    fn receive<'a>(&'a mut self, frames: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
        let room = self.pool.packet_room();
        let input = &mut self.input;
        let oversize = &mut self.oversize;
        Ok(Received::frames(self.pool.lend(frames, |_, buf| {
            while let Some(pkt) = input.pop_front() {
                if pkt.len() > room {
                    *oversize += 1;
                    continue;
                }
                buf.get_mut(..pkt.len())?.copy_from_slice(&pkt);
                return Some(pkt.len());
            }
            None
        })))
    }

    fn settle(&mut self, spans: &[Option<Span>]) -> Result<usize, DeviceError> {
        Ok(self.pool.settle(spans))
    }

    fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
        let out = &mut self.transmitted;
        self.pool.flush(self.tx_per_flush, |_, bytes| {
            out.push(bytes.to_vec());
            Ok::<(), DeviceError>(())
        })
    }

    fn pending_tx(&self) -> usize {
        self.pool.pending()
    }

    fn discard_pending(&mut self) -> usize {
        self.pool.discard()
    }

    fn at_end(&self) -> bool {
        self.input.is_empty()
    }

    fn transmit_copy(&mut self, packet: &[u8]) -> bool {
        self.pool.queue_copy(packet)
    }
}
