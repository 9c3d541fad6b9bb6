//! The guest's allocator: a job arena first, the system allocator after it.
//!
//! The host runs every job in a fresh instance and drops the instance when the job returns, so
//! a plugin's heap lives for one job. Rust's allocator on `wasm32-unknown-unknown` (dlmalloc)
//! is built for long-lived heaps: it grows the linear memory for every new region (a call into
//! the host that changes page protections, undone when the instance is dropped), and on a
//! fresh heap every allocation walks bins that nothing has warmed. A job of the bundled
//! plugins allocates about 100 KiB in all, so an arena in the module's zeroed data serves it
//! with a pointer bump and never grows the memory. `esi-host bench --only plugins`: a VLAN job
//! took 68-70 µs with dlmalloc and 47-48 µs with the arena, a monitoring job 74 -> 55-57 µs.
//!
//! What the arena frees: a block freed or resized while it is the arena's last one (a growing
//! `Vec` or `String`, a temporary dropped at once) gives its bytes back; any other free is a
//! no-op, and the bytes come back with the instance. An allocation that no longer fits goes to
//! the system allocator, so a job that needs more than [`ARENA_BYTES`] still runs, under the
//! same memory limit as before: the arena is part of the module's initial memory, which the
//! limit counts.
//!
//! Plugins get it through the SDK's default `job-arena` feature; a plugin that wants another
//! allocator turns default features off and declares its own `#[global_allocator]`.

use std::alloc::Layout;
use std::cell::Cell;

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

/// The global allocator of a plugin: the arena, then the system allocator (dlmalloc).
///
/// Sound only without threads: `wasm32-unknown-unknown` without the `atomics` feature runs
/// one thread, which the `cfg` of the whole module requires.
#[cfg(all(
    target_arch = "wasm32",
    feature = "job-arena",
    not(target_feature = "atomics")
))]
mod global {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::UnsafeCell;

    use super::{Bump, ARENA_BYTES};

    #[repr(C, align(16))]
    struct Arena {
        bytes: UnsafeCell<[u8; ARENA_BYTES]>,
        bump: Bump,
    }

    // SAFETY: the guest has one thread (see the module's `cfg`), so nothing shares the arena.
    unsafe impl Sync for Arena {}

    /// Zeroed, so it is part of the module's initial memory and not of its data segments:
    /// the component file does not grow.
    static ARENA: Arena = Arena {
        bytes: UnsafeCell::new([0; ARENA_BYTES]),
        bump: Bump::new(),
    };

    fn base() -> usize {
        ARENA.bytes.get() as usize
    }

    struct JobArena;

    // SAFETY: every block the arena hands out lies in `ARENA`, is aligned and sized as asked and
    // is handed out once until freed; every other block is the system allocator's, and goes
    // back to it.
    unsafe impl GlobalAlloc for JobArena {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            match ARENA.bump.alloc(base(), ARENA_BYTES, layout) {
                Some(address) => address as *mut u8,
                // SAFETY: the caller's contract, passed on.
                None => unsafe { System.alloc(layout) },
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if Bump::contains(base(), ARENA_BYTES, ptr as usize) {
                ARENA.bump.free(base(), ptr as usize, layout.size());
            } else {
                // SAFETY: a block outside the arena came from `System` with this layout.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let address = ptr as usize;
            if !Bump::contains(base(), ARENA_BYTES, address) {
                // SAFETY: a block outside the arena came from `System` with this layout.
                return unsafe { System.realloc(ptr, layout, new_size) };
            }
            if ARENA
                .bump
                .resize_in_place(base(), ARENA_BYTES, address, layout.size(), new_size)
            {
                return ptr;
            }
            // SAFETY: `realloc`'s contract makes the new size, with the old alignment, a valid
            // layout.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            // SAFETY: non-zero size (the caller's contract).
            let moved = unsafe { self.alloc(new_layout) };
            if !moved.is_null() {
                // SAFETY: both blocks are valid for the smaller size and do not overlap (the
                // new one was free until now).
                unsafe {
                    std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
            }
            moved
        }
    }

    #[global_allocator]
    static GLOBAL: JobArena = JobArena;
}

#[cfg(test)]
mod tests {
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
}
