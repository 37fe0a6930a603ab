//! The wasm's allocator: free lists of small blocks in front of the default one (dlmalloc).
//!
//! A request allocates and frees a few hundred small values (strings, vectors, futures) and
//! almost nothing large: a perf profile of a Service Bus send on workerd put a sixth of the
//! wasm's time in dlmalloc's `malloc` and `free`. Here a small block (at most [`LARGEST`] bytes,
//! alignment at most [`ALIGN`]) is taken from, and given back to, a free list of its size class
//! (16, 32, …, 1024 bytes): a pop or a push. The lists are refilled from slabs the backing
//! allocator hands out; larger blocks and stricter alignments go to the backing allocator
//! itself. A small block given back stays on its list for the next request: the isolate's small
//! blocks never exceed their peak in use (and a wasm's memory never shrinks anyway).
//!
//! Single-threaded: the worker's wasm has no threads (no `atomics` target feature); the
//! allocator is only installed there.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr::{self, null_mut};

/// The alignment every block of a size class has (its size is a multiple of it).
pub const ALIGN: usize = 16;
/// The largest block the free lists serve.
pub const LARGEST: usize = 1024;
/// Size classes: 16, 32, 64, 128, 256, 512, 1024 bytes.
const CLASSES: usize = 7;
/// What a class's list is refilled with at once from the backing allocator.
const SLAB: usize = 16 * 1024;

/// Small blocks by size class, over a backing allocator for the rest.
pub struct SizeClasses<A> {
    backing: A,
    free: UnsafeCell<[*mut u8; CLASSES]>,
}

// SAFETY: used only where there is one thread (the worker's wasm), or, in the tests, behind a
// lock (`&mut`-free use from one thread at a time).
unsafe impl<A: Sync> Sync for SizeClasses<A> {}

impl<A> SizeClasses<A> {
    pub const fn new(backing: A) -> Self {
        SizeClasses {
            backing,
            free: UnsafeCell::new([null_mut(); CLASSES]),
        }
    }
}

/// The class of a layout the lists serve, or `None` for the backing allocator.
fn class_of(layout: Layout) -> Option<usize> {
    if layout.size() > LARGEST || layout.align() > ALIGN {
        return None;
    }
    // 1..=16 → 0, 17..=32 → 1, …, 513..=1024 → 6 (a zero size is never asked of GlobalAlloc).
    let size = layout.size().max(ALIGN);
    Some((usize::BITS - (size - 1).leading_zeros()) as usize - 4)
}

const fn class_size(class: usize) -> usize {
    ALIGN << class
}

impl<A: GlobalAlloc> SizeClasses<A> {
    /// Refills an empty list from a new slab; the slab's first block is the caller's.
    unsafe fn refill(&self, class: usize) -> *mut u8 {
        let size = class_size(class);
        let slab = self
            .backing
            .alloc(Layout::from_size_align_unchecked(SLAB, ALIGN));
        if slab.is_null() {
            return slab;
        }
        // Blocks 1.. onto the list, each pointing at the next; the last at what the list held.
        let free = &mut *self.free.get();
        let count = SLAB / size;
        let mut next = free[class];
        for i in (1..count).rev() {
            let block = slab.add(i * size);
            block.cast::<*mut u8>().write(next);
            next = block;
        }
        free[class] = next;
        slab
    }
}

unsafe impl<A: GlobalAlloc> GlobalAlloc for SizeClasses<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            return self.backing.alloc(layout);
        };
        let free = &mut *self.free.get();
        let block = free[class];
        if block.is_null() {
            return self.refill(class);
        }
        free[class] = block.cast::<*mut u8>().read();
        block
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else {
            return self.backing.dealloc(ptr, layout);
        };
        let free = &mut *self.free.get();
        ptr.cast::<*mut u8>().write(free[class]);
        free[class] = ptr;
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (class_of(layout), class_of(new_layout)) {
            // Still fits its block: nothing moves.
            (Some(old), Some(new)) if old == new => ptr,
            (None, None) => self.backing.realloc(ptr, layout, new_size),
            _ => {
                let moved = self.alloc(new_layout);
                if !moved.is_null() {
                    ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;
    use std::sync::Mutex;

    /// A backing allocator that counts what it is asked for.
    struct Counting {
        calls: Mutex<Vec<usize>>,
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.calls.lock().unwrap().push(layout.size());
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            System.dealloc(ptr, layout)
        }
    }

    fn allocator() -> SizeClasses<Counting> {
        SizeClasses::new(Counting {
            calls: Mutex::new(Vec::new()),
        })
    }

    #[test]
    fn classes_cover_every_small_size_with_room_to_spare() {
        for size in 1..=LARGEST {
            let class = class_of(Layout::from_size_align(size, 1).unwrap()).unwrap();
            assert!(class_size(class) >= size, "{size} in class {class}");
            assert!(
                class == 0 || class_size(class - 1) < size,
                "{size} not in the smallest class that holds it"
            );
        }
        assert_eq!(
            class_of(Layout::from_size_align(LARGEST + 1, 1).unwrap()),
            None
        );
        assert_eq!(class_of(Layout::from_size_align(8, 32).unwrap()), None);
    }

    #[test]
    fn blocks_are_distinct_aligned_and_keep_their_bytes() {
        let a = allocator();
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        // Sizes across every class and the backing allocator, enough to take several slabs.
        for i in 0..3000usize {
            let size = 1 + (i * 37) % 1500;
            let layout = Layout::from_size_align(size, [1, 2, 4, 8, 16][i % 5]).unwrap();
            let p = unsafe { a.alloc(layout) };
            assert!(!p.is_null());
            assert_eq!(p as usize % layout.align(), 0);
            let fill = (i % 251) as u8;
            unsafe { ptr::write_bytes(p, fill, size) };
            live.push((p, layout, fill));
            // Free every third block at once: the lists hand them out again.
            if i % 3 == 2 {
                let (p, layout, fill) = live.remove(live.len() / 2);
                unsafe {
                    assert!(std::slice::from_raw_parts(p, layout.size())
                        .iter()
                        .all(|&b| b == fill));
                    a.dealloc(p, layout);
                }
            }
        }
        // No two live blocks overlap, and each still holds what was written into it.
        let mut spans: Vec<(usize, usize)> = live
            .iter()
            .map(|(p, l, _)| (*p as usize, *p as usize + l.size()))
            .collect();
        spans.sort();
        assert!(
            spans.windows(2).all(|w| w[0].1 <= w[1].0),
            "overlapping blocks"
        );
        for (p, layout, fill) in live {
            unsafe {
                assert!(std::slice::from_raw_parts(p, layout.size())
                    .iter()
                    .all(|&b| b == fill));
                a.dealloc(p, layout);
            }
        }
    }

    #[test]
    fn a_freed_small_block_is_reused_without_asking_the_backing_allocator() {
        let a = allocator();
        let layout = Layout::from_size_align(100, 8).unwrap();
        let first = unsafe { a.alloc(layout) };
        unsafe { a.dealloc(first, layout) };
        let again = unsafe { a.alloc(layout) };
        assert_eq!(first, again);
        // One slab for the class, nothing else.
        assert_eq!(*a.backing.calls.lock().unwrap(), vec![SLAB]);
        // A large block goes to the backing allocator as it is.
        let big = Layout::from_size_align(4096, 8).unwrap();
        unsafe { a.dealloc(a.alloc(big), big) };
        assert_eq!(*a.backing.calls.lock().unwrap(), vec![SLAB, 4096]);
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes_and_into_the_backing_allocator() {
        let a = allocator();
        let mut layout = Layout::from_size_align(10, 1).unwrap();
        let mut p = unsafe { a.alloc(layout) };
        unsafe { ptr::copy_nonoverlapping(b"0123456789".as_ptr(), p, 10) };
        // Within its class (16): the same block.
        let same = unsafe { a.realloc(p, layout, 16) };
        assert_eq!(same, p);
        layout = Layout::from_size_align(16, 1).unwrap();
        for new_size in [40, 700, 5000, 9000, 300, 12] {
            p = unsafe { a.realloc(p, layout, new_size) };
            layout = Layout::from_size_align(new_size, 1).unwrap();
            assert_eq!(unsafe { std::slice::from_raw_parts(p, 10) }, b"0123456789");
        }
        unsafe { a.dealloc(p, layout) };
    }
}
