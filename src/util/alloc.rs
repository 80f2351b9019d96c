//! A global allocator that keeps large freed blocks for reuse by an allocation of the same
//! size, in front of mimalloc.
//!
//! A training step allocates and frees the same few hundred large tensors every step. Any
//! allocator that gives such memory back, or that places the next step's blocks at new
//! addresses as its free lists fragment, makes the kernel fault in and zero fresh pages:
//! measured on the 2-vCPU VM, each 2 MiB transparent huge page cost about 4 ms that way, and
//! steps with 40–50 such faults ran 0.2 s slower than steps without. Exact-size reuse ends
//! that after the first step. The cache is off (a limit of 0) until [`set_cache_limit`]
//! turns it on, so a server keeps mimalloc's own behaviour.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Blocks from this size on are cached.
pub const MIN_CACHED_BYTES: usize = 1 << 20;
/// Cached blocks at most (a fixed table: the allocator cannot allocate its own bookkeeping).
const SLOTS: usize = 1024;

/// The global allocator: mimalloc, with large blocks cached (see the module docs).
pub struct CachingAllocator;

struct Slot {
    ptr: AtomicUsize,
    size: AtomicUsize,
    align: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { ptr: AtomicUsize::new(0), size: AtomicUsize::new(0), align: AtomicUsize::new(0) };
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static LOCK: AtomicBool = AtomicBool::new(false);
static LIMIT: AtomicUsize = AtomicUsize::new(0);
static CACHED: AtomicUsize = AtomicUsize::new(0);

/// Caches up to `bytes` of freed large blocks (0 turns the cache off and frees what it holds).
pub fn set_cache_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
    if bytes == 0 {
        let _guard = Guard::lock();
        for slot in &TABLE {
            let ptr = slot.ptr.swap(0, Ordering::Relaxed);
            if ptr != 0 {
                let (size, align) = (slot.size.load(Ordering::Relaxed), slot.align.load(Ordering::Relaxed));
                CACHED.fetch_sub(size, Ordering::Relaxed);
                // SAFETY: the block came from mimalloc with this layout and nobody holds it.
                unsafe { mimalloc::MiMalloc.dealloc(ptr as *mut u8, Layout::from_size_align_unchecked(size, align)) };
            }
        }
    }
}

/// The limit training uses: a quarter of the machine's memory, at most 4 GiB.
pub fn training_cache_limit() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok()))
        .map_or(4 << 30, |kib| kib << 10);
    (total / 4).min(4 << 30)
}

/// Bytes held in the cache now.
pub fn cached_bytes() -> usize {
    CACHED.load(Ordering::Relaxed)
}

struct Guard;

impl Guard {
    fn lock() -> Guard {
        while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        Guard
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

/// A cached block of exactly this layout, if any.
fn take(layout: Layout) -> Option<*mut u8> {
    if CACHED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let _guard = Guard::lock();
    for slot in &TABLE {
        let ptr = slot.ptr.load(Ordering::Relaxed);
        if ptr != 0 && slot.size.load(Ordering::Relaxed) == layout.size() && slot.align.load(Ordering::Relaxed) == layout.align() {
            slot.ptr.store(0, Ordering::Relaxed);
            CACHED.fetch_sub(layout.size(), Ordering::Relaxed);
            return Some(ptr as *mut u8);
        }
    }
    None
}

/// Keeps a freed block when the cache has room.
fn keep(ptr: *mut u8, layout: Layout) -> bool {
    let limit = LIMIT.load(Ordering::Relaxed);
    if limit == 0 || CACHED.load(Ordering::Relaxed) + layout.size() > limit {
        return false;
    }
    let _guard = Guard::lock();
    for slot in &TABLE {
        if slot.ptr.load(Ordering::Relaxed) == 0 {
            slot.size.store(layout.size(), Ordering::Relaxed);
            slot.align.store(layout.align(), Ordering::Relaxed);
            slot.ptr.store(ptr as usize, Ordering::Relaxed);
            CACHED.fetch_add(layout.size(), Ordering::Relaxed);
            return true;
        }
    }
    false
}

// SAFETY: every block handed out comes from mimalloc with the requested layout (cached blocks
// are reused only for exactly the layout they were allocated with) and goes back to it.
unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_CACHED_BYTES
            && let Some(ptr) = take(layout)
        {
            return ptr;
        }
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_CACHED_BYTES
            && let Some(ptr) = take(layout)
        {
            // SAFETY: the block holds `layout.size()` bytes.
            unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
            return ptr;
        }
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= MIN_CACHED_BYTES && keep(ptr, layout) {
            return;
        }
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN_CACHED_BYTES && new_size < MIN_CACHED_BYTES {
            return unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        }
        // SAFETY: as `GlobalAlloc::realloc` requires of its callers.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_large_block_is_reused_for_the_same_size_only() {
        // The test binary's allocator is the system one: exercise the table directly.
        let layout = Layout::from_size_align(MIN_CACHED_BYTES * 3, 64).unwrap();
        set_cache_limit(64 * MIN_CACHED_BYTES);
        // SAFETY: a block from mimalloc of this layout, handed to the cache and taken back.
        unsafe {
            let a = CachingAllocator.alloc(layout);
            assert!(!a.is_null());
            CachingAllocator.dealloc(a, layout);
            assert_eq!(cached_bytes(), layout.size());
            let other = Layout::from_size_align(MIN_CACHED_BYTES * 4, 64).unwrap();
            assert!(take(other).is_none(), "another size is not served from the cache");
            let b = CachingAllocator.alloc_zeroed(layout);
            assert_eq!(a, b, "the same block comes back");
            assert!(std::slice::from_raw_parts(b, layout.size()).iter().all(|v| *v == 0), "zeroed on reuse");
            assert_eq!(cached_bytes(), 0);
            CachingAllocator.dealloc(b, layout);
        }
        set_cache_limit(0);
        assert_eq!(cached_bytes(), 0, "turning the cache off frees what it held");
    }
}
