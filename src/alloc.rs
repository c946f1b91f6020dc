//! The process allocator: mimalloc, with purging of freed memory switched off.
//!
//! burn-ndarray copies both operands of every matmul into fresh buffers (its reshape to 3-D
//! turns a view into an owned array), so a forward pass allocates and frees the size of the
//! weights. With glibc malloc or mimalloc's default 10 ms purge delay each of those buffers is
//! returned to the OS and page-faulted back in: `codespot generate` spent 60% of its time in
//! the kernel. Measured on the default model, 40 tokens: glibc 8.2 s, mimalloc with purge
//! off 4.4 s (README, "Measurements").

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
