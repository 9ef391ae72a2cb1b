//! Cache prefetch hints for a reference: the one `unsafe` intrinsic lb-core's fast path needs, kept
//! in a crate of its own so that lb-core stays `#![forbid(unsafe_code)]`.
//!
//! lb-core's worker reads ahead, for a batch of frames, the cache lines that deciding them will
//! touch: conntrack buckets and entries, service index slots, backend locations and counters. It did
//! so with plain loads, whose values it folded and threw away. A plain load that misses cannot retire
//! until its line arrives, and the core runs ahead only as far as its reorder window; a prefetch
//! retires at once. Measured against plain loads in four same-run comparisons, prefetches took 2-17 %
//! off the cases where those lines miss: new flows and established packets with 100 000 services, and
//! full-NAT new flows (BENCHMARKS.md, lb-core, session 18).
//!
//! On x86-64 this is `PREFETCHT0` (into every cache level). Elsewhere it is a one-byte volatile load
//! of the same line, much what the warm-up did before.
//!
//! A prefetch is only a hint: it never faults and never changes memory or program state, for any
//! address. The function takes a reference, so the address is always a live value's anyway.
//!
//! The project keeps `unsafe` in lb-io, where the kernel interfaces are; this crate is the one
//! other place, because lb-core cannot depend on lb-io (lb-io is built on it) and a prefetch
//! cannot be written without `unsafe` on stable Rust (`core::intrinsics::prefetch_read_data` is
//! unstable, and the `_mm_prefetch` intrinsic is safe only inside `#[target_feature]` functions,
//! which are themselves `unsafe` to call from lb-core's callers). Each block says why it holds.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]

/// Hints the CPU to bring the cache line that holds the start of `x` into every cache level.
/// Changes nothing the program can observe.
#[inline(always)]
pub fn line<T: ?Sized>(x: &T) {
    if core::mem::size_of_val(x) != 0 {
        at(core::ptr::from_ref(x).cast::<u8>());
    }
}

/// The hint for the line holding the byte at `p`, which points into a live value (the caller
/// above makes sure of that).
#[inline(always)]
fn at(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is `unsafe` only as a `#[target_feature(enable = "sse")]` function,
    // and SSE is part of the x86-64 baseline, so every x86-64 CPU has it. The instruction is a hint:
    // it does not fault on any address and does not change memory.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: `p` points at a byte of a live value (see `line`), readable for the reference's
    // lifetime; read as `MaybeUninit<u8>`, so padding bytes are fine too.
    unsafe {
        core::ptr::read_volatile(p.cast::<core::mem::MaybeUninit<u8>>());
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::line;

    #[repr(C, align(64))]
    struct Line([u8; 64]);

    /// Every shape of value lb-core hands over is hinted and left as it was: sized and unsized
    /// values, values straddling two lines, the last bytes of an allocation. Zero-sized values and
    /// empty slices are skipped: their address may dangle, so a missing guard would hint (or, off
    /// x86-64, load) through a pointer to nothing.
    #[test]
    fn hints_any_value_without_effect() {
        let lines_of = [Line([1; 64]), Line([2; 64])];
        // 40 bytes from offset 40: spans both lines.
        let straddling: &[u8] = &lines_of[0].0[40..];
        let straddling = [straddling, &lines_of[1].0[..16]].concat();
        line(&lines_of[1]);
        line(&lines_of);
        line(&straddling[..]);
        let boxed = std::boxed::Box::new([7u8; 3]);
        line(&*boxed);
        line(&boxed[2..]);
        line(&());
        let empty: &[u32] = &[];
        line(empty);
        assert_eq!(lines_of[0].0, [1; 64]);
        assert_eq!(lines_of[1].0, [2; 64]);
        assert_eq!(*boxed, [7; 3]);
    }
}
