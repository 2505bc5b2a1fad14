//! The bench binary's allocator, chosen by cargo feature; the eventbus crates never set one.
//!
//! - default: the system allocator (glibc malloc here), as most users run;
//! - `mimalloc`: mimalloc for the whole binary, bus and raw clients alike;
//! - `alloc-count`: the system allocator, counted, so every run reports allocations per
//!   message (where the bus allocates more than the raw client shows up here). It wins over
//!   `mimalloc` when both are on (as with `--all-features`).

#[cfg(all(feature = "mimalloc", not(feature = "alloc-count")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "alloc-count")]
#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// The allocator this binary was built with, for the report.
pub fn name() -> &'static str {
    if cfg!(feature = "alloc-count") {
        "system (counted)"
    } else if cfg!(feature = "mimalloc") {
        "mimalloc"
    } else {
        "system"
    }
}

/// Allocations (including reallocations) made so far by the whole process; `None` unless the
/// binary counts them.
pub fn allocations() -> Option<u64> {
    #[cfg(feature = "alloc-count")]
    {
        let s = GLOBAL.stats();
        Some((s.allocations + s.reallocations) as u64)
    }
    #[cfg(not(feature = "alloc-count"))]
    {
        None
    }
}

/// Bytes allocated and not yet freed by the whole process; `None` unless counting.
pub fn live_bytes() -> Option<u64> {
    #[cfg(feature = "alloc-count")]
    {
        let s = GLOBAL.stats();
        let live =
            s.bytes_allocated as i64 + s.bytes_reallocated as i64 - s.bytes_deallocated as i64;
        Some(live.max(0) as u64)
    }
    #[cfg(not(feature = "alloc-count"))]
    {
        None
    }
}
