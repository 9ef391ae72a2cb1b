//! A global allocator for data-plane binaries: large allocations on transparent huge pages.
//!
//! lb-core's big tables (a connection table of 2^18 entries is 16 MiB; a Maglev table 128 KiB per
//! service) are read at random, one or two lines per packet; on 4 KiB pages nearly every such read
//! also misses the TLB. An allocation of at least [`HugePageAlloc::THRESHOLD`] bytes is aligned to 2 MiB
//! and marked `MADV_HUGEPAGE`, so with THP in "madvise" mode (a common distribution default) or
//! "always" its pages are 2 MiB. Smaller allocations go to the system allocator unchanged. lb-core
//! stays allocator-agnostic (`no_std`, the embedder chooses); the `lb` binary installs this one:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: lb_io::HugePageAlloc = lb_io::HugePageAlloc;
//! # fn main() {}
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, with allocations of [`Self::THRESHOLD`] bytes or more on huge pages.
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePageAlloc;

/// 2 MiB, the x86-64 and arm64 (4 KiB granule) huge page.
const HUGE_PAGE: usize = 2 << 20;

impl HugePageAlloc {
    /// Allocations at least this large (2 MiB) are placed and advised for huge pages.
    pub const THRESHOLD: usize = HUGE_PAGE;

    /// The layout a large allocation really takes: aligned to a huge page.
    fn huge(layout: Layout) -> Option<Layout> {
        if layout.size() < Self::THRESHOLD {
            return None;
        }
        Layout::from_size_align(layout.size(), layout.align().max(HUGE_PAGE)).ok()
    }

    /// Asks for huge pages over `[ptr, ptr + size)` (a no-op where THP is off or unsupported).
    fn advise(ptr: *mut u8, size: usize) {
        if ptr.is_null() {
            return;
        }
        // SAFETY: `ptr` starts an allocation of at least `size` bytes that this allocator just made
        // (aligned to 2 MiB, so page-aligned as madvise requires); MADV_HUGEPAGE changes only how the
        // kernel backs the range, never its contents or validity. Failure (THP off) is harmless.
        unsafe { libc::madvise(ptr.cast(), size, libc::MADV_HUGEPAGE) };
    }
}

// SAFETY: every call is forwarded to `System` with either the caller's layout or, for a large one,
// the same size at a stricter alignment; `dealloc` and `realloc` compute the same layout from the
// caller's (the size decides which), so each block is freed with the layout it was allocated with.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::huge(layout) {
            Some(huge) => {
                // SAFETY: `huge` has a non-zero size (>= THRESHOLD) and a valid alignment.
                let ptr = unsafe { System.alloc(huge) };
                Self::advise(ptr, huge.size());
                ptr
            }
            // SAFETY: the caller's contract (non-zero size) is passed on unchanged.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::huge(layout) {
            Some(huge) => {
                // SAFETY: as in `alloc`.
                let ptr = unsafe { System.alloc_zeroed(huge) };
                Self::advise(ptr, huge.size());
                ptr
            }
            // SAFETY: the caller's contract is passed on unchanged.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let layout = Self::huge(layout).unwrap_or(layout);
        // SAFETY: `ptr` was allocated by `System` with exactly this layout (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < Self::THRESHOLD && new_size < Self::THRESHOLD {
            // SAFETY: small before and after: the block is `System`'s with the caller's layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Crossing or above the threshold: a new block of the right kind, the contents copied.
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `new_layout` is valid and non-zero (the caller's contract for `new_size`).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: `ptr` was allocated by this allocator with `layout`.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large blocks come back aligned to 2 MiB (so whole huge pages can back them), small ones as the
    /// system gives them; contents survive a realloc across the threshold both ways.
    #[test]
    fn large_blocks_are_huge_page_aligned_and_reallocs_keep_contents() {
        let a = HugePageAlloc;
        unsafe {
            let big = Layout::from_size_align(16 << 20, 64).unwrap();
            let p = a.alloc_zeroed(big);
            assert!(!p.is_null());
            assert_eq!(p as usize % HUGE_PAGE, 0);
            assert!(std::slice::from_raw_parts(p, big.size()).iter().all(|&b| b == 0));
            p.write(7);
            let q = a.realloc(p, big, 1024);
            assert_eq!(q.read(), 7);
            let small = Layout::from_size_align(1024, 64).unwrap();
            let r = a.realloc(q, small, 4 << 20);
            assert_eq!((r.read(), r as usize % HUGE_PAGE), (7, 0));
            a.dealloc(r, Layout::from_size_align(4 << 20, 64).unwrap());
        }
    }
}
