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
//! address. [`line()`] takes a reference, so its address is always a live value's anyway;
//! [`element`] takes a slice and an index it does not check on x86-64 (a hint past the end does
//! nothing), for tables whose index is in bounds by construction, where the check was a compare and
//! a branch a hint.
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

/// Hints the line that holds the start of `s[i]`, with no bounds check on x86-64: a prefetch of
/// an address past the slice's end is a hint about memory the program does not read, which neither
/// faults nor changes anything (LLVM's `prefetch`: no effect on the program's behaviour), and the
/// pointer to it is made by `wrapping_add`, never dereferenced. For a caller whose index is in
/// bounds by construction (a table index from a mask, a slot of installed tables), where the check
/// cost a compare and a branch a hint. Off x86-64 the hint is a load: an index past the end hints
/// nothing there.
#[inline(always)]
pub fn element<T>(s: &[T], i: usize) {
    element_at(s, i, 0);
}

/// As [`element`], for the line that holds byte `byte` of `s[i]` (a field of a large element;
/// off x86-64, nothing when `byte` is not inside the element).
#[inline(always)]
pub fn element_at<T>(s: &[T], i: usize, byte: usize) {
    #[cfg(target_arch = "x86_64")]
    if core::mem::size_of::<T>() != 0 {
        at(s.as_ptr().wrapping_add(i).cast::<u8>().wrapping_add(byte));
    }
    #[cfg(not(target_arch = "x86_64"))]
    if let Some(x) = s.get(i)
        && byte < core::mem::size_of::<T>()
    {
        at(core::ptr::from_ref(x).cast::<u8>().wrapping_add(byte));
    }
}

/// The hint for the line holding the byte at `p`, which points into a live value (`line` makes
/// sure of that) or, on x86-64 only, anywhere (`element`: a prefetch never faults).
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

    use super::{element, element_at, line};

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

    /// An indexed hint takes any index and any byte offset, in bounds or far past the end (where a
    /// checked index would panic), and leaves every value as it was; an empty slice and zero-sized
    /// elements too.
    #[test]
    fn element_hints_any_index_without_effect() {
        let lines_of = [Line([1; 64]), Line([2; 64])];
        for i in [0, 1, 2, 3, 1 << 20, usize::MAX / 64, usize::MAX] {
            element(&lines_of, i);
            for byte in [0, 63, 64, 4096, usize::MAX] {
                element_at(&lines_of, i, byte);
            }
        }
        let empty: &[u64] = &[];
        element(empty, 0);
        element_at(empty, 5, 8);
        element(&[(); 4], 7);
        assert_eq!(lines_of[0].0, [1; 64]);
        assert_eq!(lines_of[1].0, [2; 64]);
    }
}
