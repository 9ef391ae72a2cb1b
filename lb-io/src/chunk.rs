//! A pool of fixed-size heap buffers lent out as frames: the buffer management that the memory and
//! pcap devices share (AF_XDP has its own in the UMEM). Safe code only: disjoint borrows of several
//! buffers come from one pass of `iter_mut`, not from pointers.

use std::collections::VecDeque;

use lb_core::Frame;

use crate::device::{FlushProgress, MAX_BURST, Span};

/// Marks a buffer that is not lent out in the current burst.
const NOT_LENT: u16 = u16::MAX;

/// Fixed-size buffers, a free list, the buffers lent in the current burst and a transmit queue.
#[derive(Debug)]
pub(crate) struct ChunkPool {
    chunks: Vec<Box<[u8]>>,
    free: Vec<usize>,
    /// For each buffer, its position in the current burst, or `NOT_LENT`.
    position: Vec<u16>,
    /// Buffers lent in the current burst, by position.
    lent: Vec<usize>,
    /// Buffers queued for transmission with their packet spans.
    tx_queue: VecDeque<(usize, Span)>,
    headroom: usize,
}

impl ChunkPool {
    /// `count` buffers (at least one) of `size` bytes; packets are received `headroom` bytes into a
    /// buffer.
    pub(crate) fn new(count: usize, size: usize, headroom: usize) -> Self {
        // With no buffer a device could lend nothing and never take its input: the loop spun.
        let count = count.max(1);
        ChunkPool {
            chunks: (0..count).map(|_| vec![0u8; size].into_boxed_slice()).collect(),
            free: (0..count).rev().collect(),
            position: vec![NOT_LENT; count],
            lent: Vec::with_capacity(MAX_BURST),
            tx_queue: VecDeque::with_capacity(count),
            // A headroom past the buffer's end leaves no room for a packet: the buffers lend an
            // empty slice, and every input frame is counted oversize (a headroom beyond the buffer
            // found no slice to lend, took nothing from the input, and the loop spun).
            headroom: headroom.min(size),
        }
    }

    /// Bytes a received packet may occupy in one buffer.
    pub(crate) fn packet_room(&self) -> usize {
        self.chunks.first().map_or(0, |c| c.len().saturating_sub(self.headroom))
    }

    /// Lends up to `frames.len()` buffers, filling each with `next` (which copies one packet into the
    /// slice it is given and returns its length, or `None` when there is no more input). `next` also
    /// gets the buffer's index (below the pool's buffer count), which [`ChunkPool::flush`] hands back
    /// with the frame, so a device can keep something per frame (the pcap device: its timestamp).
    pub(crate) fn lend<'a>(
        &'a mut self,
        frames: &mut [Frame<'a>],
        mut next: impl FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> usize {
        debug_assert!(self.lent.is_empty(), "receive called twice without settle");
        let mut lens = [0usize; MAX_BURST];
        let want = frames.len().min(MAX_BURST);
        while self.lent.len() < want {
            let Some(&idx) = self.free.last() else { break };
            let Some(chunk) = self.chunks.get_mut(idx) else {
                break;
            };
            let Some(room) = chunk.get_mut(self.headroom..) else {
                break;
            };
            let Some(len) = next(idx, room) else { break };
            self.free.pop();
            lens[self.lent.len()] = len.min(room.len());
            if let Some(p) = self.position.get_mut(idx) {
                *p = self.lent.len() as u16;
            }
            self.lent.push(idx);
        }
        let n = self.lent.len();
        for (chunk, pos) in self.chunks.iter_mut().zip(self.position.iter()) {
            if *pos != NOT_LENT {
                let p = usize::from(*pos);
                if let Some(slot) = frames.get_mut(p) {
                    *slot = Frame::new(chunk, self.headroom, lens[p]);
                }
            }
        }
        n
    }

    /// Settles the current burst (see [`crate::Device::settle`]); returns how many were queued.
    pub(crate) fn settle(&mut self, spans: &[Option<Span>]) -> usize {
        let mut queued = 0;
        for (pos, &idx) in self.lent.iter().enumerate() {
            if let Some(p) = self.position.get_mut(idx) {
                *p = NOT_LENT;
            }
            match spans.get(pos).copied().flatten() {
                Some(span) => {
                    self.tx_queue.push_back((idx, span));
                    queued += 1;
                }
                None => self.free.push(idx),
            }
        }
        self.lent.clear();
        queued
    }

    /// Hands up to `room` queued frames to `sink` in order, each with the index of its buffer (as
    /// [`ChunkPool::lend`] gave it), and returns their buffers to the pool.
    pub(crate) fn flush<E>(
        &mut self,
        room: usize,
        mut sink: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<FlushProgress, E> {
        let mut done = 0;
        while done < room {
            let Some(&(idx, span)) = self.tx_queue.front() else {
                break;
            };
            let bytes = self
                .chunks
                .get(idx)
                .and_then(|c| c.get(span.start..span.start.saturating_add(span.len)))
                .unwrap_or(&[]);
            sink(idx, bytes)?;
            self.tx_queue.pop_front();
            self.free.push(idx);
            done += 1;
        }
        Ok(FlushProgress { submitted: done, completed: done, pending: self.tx_queue.len() })
    }

    /// Queues a copy of `packet` for transmission from a free buffer, at the headroom; false when no
    /// buffer is free or the packet does not fit one. Not between [`ChunkPool::lend`] and
    /// [`ChunkPool::settle`].
    pub(crate) fn queue_copy(&mut self, packet: &[u8]) -> bool {
        debug_assert!(self.lent.is_empty(), "queue_copy while a burst is lent");
        let Some(&idx) = self.free.last() else { return false };
        let start = self.headroom;
        let Some(room) = self.chunks.get_mut(idx).and_then(|c| c.get_mut(start..start.saturating_add(packet.len())))
        else {
            return false;
        };
        room.copy_from_slice(packet);
        self.free.pop();
        self.tx_queue.push_back((idx, Span { start, len: packet.len() }));
        true
    }

    /// Drops every queued frame, returning its buffer to the pool.
    pub(crate) fn discard(&mut self) -> usize {
        let n = self.tx_queue.len();
        for (idx, _) in self.tx_queue.drain(..) {
            self.free.push(idx);
        }
        n
    }

    /// Frames queued for transmission.
    pub(crate) fn pending(&self) -> usize {
        self.tx_queue.len()
    }

    /// Buffers neither free, lent nor queued: must be zero between bursts (a leak otherwise).
    #[cfg(test)]
    pub(crate) fn unaccounted(&self) -> usize {
        self.chunks.len() - self.free.len() - self.lent.len() - self.tx_queue.len()
    }
}
