//! The guest's allocator: a job arena first, the system allocator after it.
//!
//! The host runs every job in a fresh instance and drops the instance when the job returns, so
//! a plugin's heap lives for one job. Rust's allocator on `wasm32-unknown-unknown` (dlmalloc)
//! is built for long-lived heaps: it grows the linear memory for every new region (a call into
//! the host that changes page protections, undone when the instance is dropped), and on a
//! fresh heap every allocation walks bins that nothing has warmed. A job of the bundled
//! plugins allocates about 100 KiB in all, so an arena in the module's zeroed data serves it
//! with a pointer bump and never grows the memory. `esi-host bench --only plugins`: a VLAN job
//! took 68-70 µs with dlmalloc and 46-48 µs with the arena, a monitoring job 74 -> 53-57 µs.
//!
//! - **What it serves**: each block that fits in what is left of the arena's [`ARENA_BYTES`];
//!   any other block (one larger than what is left, or with an alignment the arena cannot
//!   give there) comes from the system allocator, so a job that needs more still runs.
//! - **What it frees**: a block freed or resized while it is the arena's last one (a growing
//!   `Vec` or `String`, a temporary dropped at once) gives its bytes back; any other free is a
//!   no-op, and those bytes come back with the instance.
//! - **What it costs**: the arena is part of the module's initial memory, so a plugin starts
//!   with ~1 MiB more (an SDK plugin's module asks for ~2.1 MiB: 1 MiB of stack, its data, the
//!   arena). The manifest's `limits.memory_mib` counts it: keep it at 3 or more; the host
//!   rejects a plugin that cannot start within its limit when it loads.
//! - **Opting out**: plugins get it through the SDK's default `job-arena` feature. A plugin
//!   that wants another allocator depends on the SDK with `default-features = false` and
//!   declares its own `#[global_allocator]`; any other crate of the build that turns the
//!   feature back on (Cargo unifies features) brings the SDK's back, and the link fails with
//!   two global allocators. Built with the `atomics` target feature (threads), the SDK
//!   declares no allocator and Rust's default serves.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::{Cell, UnsafeCell};

/// Bytes of the arena: ten times what a job of the bundled plugins allocates.
pub const ARENA_BYTES: usize = 1 << 20;

/// The bump state of one arena: how many bytes from its start are in use. The arena's bytes
/// are passed to each call as `(base, len)`, so the logic is tested natively on any buffer.
#[derive(Debug, Default)]
pub struct Bump {
    used: Cell<usize>,
}

impl Bump {
    pub const fn new() -> Bump {
        Bump { used: Cell::new(0) }
    }

    /// The address of a new block for `layout` in `[base, base + len)`, or `None` when it does
    /// not fit in what is left.
    pub fn alloc(&self, base: usize, len: usize, layout: Layout) -> Option<usize> {
        let top = base.checked_add(self.used.get())?;
        // The alignment is a power of two (a `Layout` guarantees it).
        let start = top.checked_add(layout.align() - 1)? & !(layout.align() - 1);
        let end = start.checked_add(layout.size())?;
        if end - base > len {
            return None;
        }
        self.used.set(end - base);
        Some(start)
    }

    /// Whether `ptr` lies in the arena `[base, base + len)`.
    pub fn contains(base: usize, len: usize, ptr: usize) -> bool {
        ptr >= base && ptr - base < len
    }

    /// Frees the block at `ptr` of `size` bytes, which must lie in the arena: its bytes come
    /// back if it is the last block, otherwise nothing happens.
    pub fn free(&self, base: usize, ptr: usize, size: usize) {
        if ptr + size == base + self.used.get() {
            self.used.set(ptr - base);
        }
    }

    /// Resizes the arena's block at `ptr` from `old` to `new` bytes where it is: true when it
    /// is the last block and the arena has room, or when it shrinks (a block that is not the
    /// last keeps its bytes until the instance goes).
    pub fn resize_in_place(
        &self,
        base: usize,
        len: usize,
        ptr: usize,
        old: usize,
        new: usize,
    ) -> bool {
        let last = ptr + old == base + self.used.get();
        if last {
            match ptr.checked_add(new) {
                Some(end) if end - base <= len => {
                    self.used.set(end - base);
                    true
                }
                _ => false,
            }
        } else {
            new <= old
        }
    }
}

/// An allocator serving blocks from its own `N` bytes while they fit, and from `fallback`
/// otherwise. A plugin's global allocator is one of these with [`ARENA_BYTES`] and the system
/// allocator (dlmalloc); tests use small ones natively.
#[repr(C, align(16))]
pub struct JobArena<const N: usize, F> {
    bytes: UnsafeCell<[u8; N]>,
    bump: Bump,
    fallback: F,
}

impl<const N: usize, F> JobArena<N, F> {
    /// All zero but `fallback`, so a `static` of it with a zero-sized `fallback` lies in the
    /// module's zeroed memory, not in its data segments: the component file does not grow.
    pub const fn new(fallback: F) -> Self {
        JobArena {
            bytes: UnsafeCell::new([0; N]),
            bump: Bump::new(),
            fallback,
        }
    }

    fn base(&self) -> usize {
        self.bytes.get() as usize
    }

    /// The pointer to `address`, which lies in the arena (keeps the arena's provenance).
    fn at(&self, address: usize) -> *mut u8 {
        self.bytes
            .get()
            .cast::<u8>()
            .wrapping_add(address - self.base())
    }

    fn owns(&self, ptr: *mut u8) -> bool {
        Bump::contains(self.base(), N, ptr as usize)
    }
}

// SAFETY: every block the arena hands out lies in `bytes`, is aligned and sized as asked, and
// no part of it is handed out again until it is freed (a free moves the bump back only from
// the last block); every other block is `fallback`'s and goes back to it.
unsafe impl<const N: usize, F: GlobalAlloc> GlobalAlloc for JobArena<N, F> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.bump.alloc(self.base(), N, layout) {
            Some(address) => self.at(address),
            // SAFETY: the caller's contract, passed on.
            None => unsafe { self.fallback.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.owns(ptr) {
            self.bump.free(self.base(), ptr as usize, layout.size());
        } else {
            // SAFETY: a block outside the arena came from `fallback` with this layout.
            unsafe { self.fallback.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.owns(ptr) {
            // SAFETY: a block outside the arena came from `fallback` with this layout.
            return unsafe { self.fallback.realloc(ptr, layout, new_size) };
        }
        let (base, address) = (self.base(), ptr as usize);
        if self
            .bump
            .resize_in_place(base, N, address, layout.size(), new_size)
        {
            return ptr;
        }
        // SAFETY: `realloc`'s contract makes the new size, with the old alignment, a valid
        // layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: non-zero size (the caller's contract).
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap: the new
            // one was free until now (a last block that did not grow in place cannot get the
            // space above itself).
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        moved
    }
}

/// The plugin's global allocator.
///
/// Sound only without threads: `wasm32-unknown-unknown` without the `atomics` feature runs
/// one thread. With `atomics` the SDK declares no allocator (Rust's default serves).
#[cfg(all(
    target_arch = "wasm32",
    feature = "job-arena",
    not(target_feature = "atomics")
))]
mod global {
    use std::alloc::{GlobalAlloc, Layout, System};

    use super::{JobArena, ARENA_BYTES};

    struct Global(JobArena<ARENA_BYTES, System>);

    // SAFETY: the guest has one thread (see the module's `cfg`), so nothing shares the arena.
    unsafe impl Sync for Global {}

    // SAFETY: `JobArena`'s; this only forwards, with the caller's contract.
    unsafe impl GlobalAlloc for Global {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { self.0.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { self.0.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            unsafe { self.0.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Global = Global(JobArena::new(System));
}

#[cfg(test)]
mod tests {
    use std::alloc::System;

    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    /// A fake region: the logic only does arithmetic on addresses.
    const BASE: usize = 0x1_0000;

    #[test]
    fn blocks_are_aligned_and_do_not_overlap() {
        let bump = Bump::new();
        let a = bump.alloc(BASE, 256, layout(3, 1)).unwrap();
        let b = bump.alloc(BASE, 256, layout(8, 8)).unwrap();
        let c = bump.alloc(BASE, 256, layout(1, 64)).unwrap();
        assert_eq!(a, BASE);
        assert_eq!(b, BASE + 8);
        assert_eq!(c, BASE + 64);
        assert_eq!(bump.used.get(), 65);
    }

    #[test]
    fn a_block_that_does_not_fit_is_refused_and_costs_nothing() {
        let bump = Bump::new();
        bump.alloc(BASE, 100, layout(90, 1)).unwrap();
        assert_eq!(bump.alloc(BASE, 100, layout(11, 1)), None);
        assert_eq!(bump.alloc(BASE, 100, layout(1, 4096)), None);
        assert_eq!(bump.alloc(BASE, 100, layout(usize::MAX / 2, 1)), None);
        assert_eq!(bump.used.get(), 90);
        assert_eq!(bump.alloc(BASE, 100, layout(10, 1)), Some(BASE + 90));
        assert_eq!(bump.used.get(), 100);
    }

    #[test]
    fn only_the_last_block_gives_its_bytes_back() {
        let bump = Bump::new();
        let a = bump.alloc(BASE, 256, layout(16, 8)).unwrap();
        let b = bump.alloc(BASE, 256, layout(16, 8)).unwrap();
        bump.free(BASE, a, 16);
        assert_eq!(bump.used.get(), 32);
        bump.free(BASE, b, 16);
        assert_eq!(bump.used.get(), 16);
        assert_eq!(bump.alloc(BASE, 256, layout(4, 4)), Some(b));
    }

    #[test]
    fn the_last_block_grows_in_place_while_it_fits() {
        let bump = Bump::new();
        let a = bump.alloc(BASE, 64, layout(8, 8)).unwrap();
        assert!(bump.resize_in_place(BASE, 64, a, 8, 48));
        assert_eq!(bump.used.get(), 48);
        assert!(!bump.resize_in_place(BASE, 64, a, 48, 65));
        assert_eq!(bump.used.get(), 48);
        assert!(bump.resize_in_place(BASE, 64, a, 48, 4));
        assert_eq!(bump.used.get(), 4);
    }

    #[test]
    fn an_earlier_block_shrinks_in_place_but_does_not_grow() {
        let bump = Bump::new();
        let a = bump.alloc(BASE, 64, layout(16, 8)).unwrap();
        bump.alloc(BASE, 64, layout(8, 8)).unwrap();
        assert!(bump.resize_in_place(BASE, 64, a, 16, 8));
        assert!(!bump.resize_in_place(BASE, 64, a, 16, 17));
        assert_eq!(bump.used.get(), 24);
    }

    #[test]
    fn contains_is_the_half_open_region() {
        assert!(!Bump::contains(BASE, 64, BASE - 1));
        assert!(Bump::contains(BASE, 64, BASE));
        assert!(Bump::contains(BASE, 64, BASE + 63));
        assert!(!Bump::contains(BASE, 64, BASE + 64));
    }

    /// A plugin's allocator in small: 4 KiB over the system allocator.
    fn small_arena() -> Box<JobArena<4096, System>> {
        Box::new(JobArena::new(System))
    }

    fn fill(ptr: *mut u8, len: usize, seed: u8) {
        for i in 0..len {
            // SAFETY: the tests pass blocks of at least `len` bytes.
            unsafe { *ptr.add(i) = seed.wrapping_add(i as u8) };
        }
    }

    fn intact(ptr: *mut u8, len: usize, seed: u8) -> bool {
        // SAFETY: the tests pass blocks of at least `len` bytes, filled by `fill`.
        (0..len).all(|i| unsafe { *ptr.add(i) } == seed.wrapping_add(i as u8))
    }

    #[test]
    fn a_last_block_that_outgrows_the_arena_moves_out_and_its_space_serves_again() {
        let arena = small_arena();
        // SAFETY: every block is used within its layout and freed with it.
        unsafe {
            let first = arena.alloc(layout(96, 8));
            fill(first, 96, 1);
            let grown = arena.alloc(layout(1000, 8));
            fill(grown, 1000, 2);
            let bigger = arena.realloc(grown, layout(1000, 8), 3000);
            assert_eq!(bigger, grown, "the last block grows in place");
            let moved = arena.realloc(bigger, layout(3000, 8), 8000);
            assert!(!moved.is_null() && !arena.owns(moved));
            assert!(intact(moved, 1000, 2));
            // The space it left is the arena's again.
            let next = arena.alloc(layout(2000, 8));
            assert_eq!(next, grown);
            assert_eq!(grown as usize, first as usize + 96);
            fill(next, 2000, 3);
            assert!(intact(moved, 1000, 2) && intact(first, 96, 1));
            arena.dealloc(moved, layout(8000, 8));
            arena.dealloc(next, layout(2000, 8));
            arena.dealloc(first, layout(96, 8));
        }
        assert_eq!(arena.bump.used.get(), 0);
    }

    #[test]
    fn a_block_that_is_not_the_last_moves_up_and_the_one_after_it_stays() {
        let arena = small_arena();
        // SAFETY: every block is used within its layout.
        unsafe {
            let a = arena.alloc(layout(64, 8));
            let b = arena.alloc(layout(64, 8));
            fill(a, 64, 10);
            fill(b, 64, 20);
            let a2 = arena.realloc(a, layout(64, 8), 128);
            assert!(arena.owns(a2) && a2 != a);
            assert!(intact(a2, 64, 10) && intact(b, 64, 20));
            // `b` is no longer the last block: it shrinks where it is and keeps its bytes.
            assert_eq!(arena.realloc(b, layout(64, 8), 32), b);
            arena.dealloc(b, layout(32, 8));
            assert!(intact(a2, 64, 10));
            assert_eq!(arena.bump.used.get(), 256);
        }
    }

    #[test]
    fn every_alignment_is_honoured_by_the_arena_or_the_fallback() {
        let arena = small_arena();
        let aligns = [4096, 8192, 1 << 16];
        // SAFETY: every block is used within its layout and freed with it.
        unsafe {
            let blocks: Vec<*mut u8> = aligns
                .iter()
                .map(|&align| arena.alloc(layout(16, align)))
                .collect();
            for (&block, &align) in blocks.iter().zip(&aligns) {
                assert!(!block.is_null());
                assert_eq!(block as usize % align, 0);
                if arena.owns(block) {
                    assert!(block as usize + 16 <= arena.base() + 4096);
                }
                fill(block, 16, align as u8);
            }
            for (&block, &align) in blocks.iter().zip(&aligns) {
                assert!(intact(block, 16, align as u8));
            }
            // A block larger than the whole arena is the fallback's.
            let rest = arena.alloc(layout(8192, 8));
            assert!(!arena.owns(rest));
            arena.dealloc(rest, layout(8192, 8));
            for (&block, &align) in blocks.iter().zip(&aligns).rev() {
                arena.dealloc(block, layout(16, align));
            }
        }
    }
}
