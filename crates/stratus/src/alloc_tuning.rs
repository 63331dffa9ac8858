//! One allocator setting made before anything else runs: big buffers go back to the kernel.
//!
//! glibc's malloc serves allocations above its mmap threshold (128 KiB at start) with their own
//! `mmap` and unmaps them on `free`. But the threshold is dynamic: freeing such a chunk raises it
//! to that chunk's size (up to 32 MiB), so the next argon2 working memory (19 MiB per password
//! hash) comes from a heap arena and stays there after `free`, and every thread that ever hashed
//! held 19 MiB. Setting the threshold explicitly turns the adjustment off (mallopt(3)): every
//! allocation above 128 KiB is mapped and returned on free, and an idle server stays small.

/// Pins glibc's mmap threshold at its initial 128 KiB; nothing on other C libraries.
pub fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a setting inside glibc's malloc, under malloc's own lock;
        // it takes two integers, touches no memory of ours and is called here from `main`
        // before any other thread exists. A 0 return (refused) leaves the default in place.
        let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    }
}
