//! Handing the memory of finished jobs back to the system.
//!
//! glibc's allocator keeps freed memory in its arenas for reuse rather than returning it.
//! Blocks above its mmap threshold get mappings of their own, unmapped when freed, but that
//! threshold rises as large blocks are freed (up to 32 MiB, and the top of each thread's arena
//! is only trimmed past twice that): a job's buffers of a few to tens of MB would then stay
//! resident after the job, in every thread's arena. A server fixes the threshold
//! ([`map_large_blocks`]) and trims the heap after each job ([`give_back_free_memory`]).

/// Blocks of this size and more get mappings of their own.
const MMAP_THRESHOLD: i32 = 1 << 20;

/// Give every block of 1 MiB or more its own mapping, returned to the system when freed
/// (glibc: a fixed `M_MMAP_THRESHOLD`, which also stops the trim threshold from rising);
/// nothing elsewhere. Call once, at start-up.
pub fn map_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters under the allocator's lock; an
        // out-of-range value is refused with a 0 return, which leaves the default in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Return the allocator's free memory to the system (glibc: `malloc_trim(0)`, which also
/// releases the free pages inside every arena); nothing elsewhere.
pub fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions; it only walks the allocator's own arenas
        // under their locks and madvises pages that hold no live allocation.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
