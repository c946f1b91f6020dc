//! The process allocator: mimalloc, with purging of freed memory switched off.
//!
//! The CPU backends allocate a fresh buffer for most tensor ops (burn-ndarray even copies both
//! operands of every matmul), so a training step allocates and frees gigabytes. With glibc
//! malloc, or mimalloc's default 10 ms purge delay, each large buffer goes back to the OS and is
//! page-faulted in again. Measured on the default model: `codespot generate` (ndarray, 40
//! tokens) 8.2 s with glibc vs 4.4 s with purge off; `codespot bench score` (flex, batch 4 × 256)
//! 52.6 tokens/s with the 10 ms purge vs 92 tokens/s with purge off, for 2.4 vs 2.7 GB peak RSS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed pages committed (call once, first thing in `main`). An explicit
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: setting a documented mimalloc option; no pointers involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
