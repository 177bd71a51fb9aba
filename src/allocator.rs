//! The allocator of every binary built on this crate, and how it gets memory from the kernel.
//!
//! Invariant: every allocation, Rust's and librdkafka's, goes through mimalloc, with its own
//! defaults except one: transparent huge pages are off for the process
//! ([`without_transparent_huge_pages`]) unless `MIMALLOC_ALLOW_THP` is set.
//!
//! A purge delay of 100 ms instead of mimalloc's 1 s (freed memory returned to the OS sooner)
//! lowered a fan-out's peak RSS while catching up on a backlog (benches/backlog.rs: 190-204
//! against 216-253 MiB) but cost the saga benchmark about 9 % (median 1,208 against 1,322
//! sagas/s over eight interleaved pairs of runs), so it was not kept; `MIMALLOC_PURGE_DELAY`
//! (milliseconds) sets it for a process.

/// Every binary built on this crate (the command, tests, benches) allocates with mimalloc: the
/// hot path allocates and frees many short-lived buffers across threads, where glibc's malloc
/// spent a third of the fan-out's CPU. With the `override` feature (Cargo.toml) mimalloc also
/// takes `malloc`/`free` for C code, so librdkafka's records and headers (copied per output,
/// freed on its delivery thread) no longer go through glibc's arenas either.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The environment variable through which mimalloc itself decides on transparent huge pages
/// (`0` off, `1` allowed); when it is set, [`without_transparent_huge_pages`] leaves the choice
/// to it.
pub const ALLOW_THP_SETTING: &str = "MIMALLOC_ALLOW_THP";

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), unless
/// [`ALLOW_THP_SETTING`] is set; returns whether it did. Call it first in `main`: it governs the
/// page faults that follow, on every mapping.
///
/// Why: mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`), so the first touch of each
/// 2 MiB region, and again of every region it purged (after 1 s unused) and then reuses, has the
/// kernel zero 2 MiB. librdkafka's per-request buffers keep doing exactly that. In the fan-out
/// benchmark the kernel's `clear_page_erms` took 6.45 % of the process's samples with huge pages
/// and 0.61 % without (`perf record`, three passes of 100,000 events each way).
///
/// The trade, off against on:
/// - memory (full `scripts/bench` runs before and after, BENCHMARKS.md of 10d4c28 and b09a7a2):
///   resident at 1,000 events/s 30 against 55 MiB; catching up on a backlog, peaks of 129 and
///   178 MiB against 180 and 245 MiB (benches/backlog.rs);
/// - the plain fan-out (`ORDERFLOW_BENCH_PROFILE=plain`, the bench binaries built before and
///   after, interleaved, 9 passes each): median 80.4k against 68.0k events/s; with dedup 48.3k
///   against 47.0k;
/// - the saga benchmark (one bench binary with `MIMALLOC_ALLOW_THP` unset against `=1`):
///   median 1,388 against 1,631 sagas/s (9 interleaved pairs, 8 slower):
///   its in-memory state gains from the larger pages. A deployment that runs mainly
///   orchestrators can set `MIMALLOC_ALLOW_THP=1`.
pub fn without_transparent_huge_pages() -> bool {
    if std::env::var_os(ALLOW_THP_SETTING).is_some() {
        return false;
    }
    disable_thp()
}

#[cfg(target_os = "linux")]
fn disable_thp() -> bool {
    // SAFETY: integer arguments only; it sets a flag of this process's address space.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn disable_thp() -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn thp_disabled() -> bool {
        // SAFETY: integer arguments only; it reads a flag of this process.
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
    }

    #[test]
    fn huge_pages_are_off_unless_mimalloc_is_told_otherwise() {
        let done = without_transparent_huge_pages();
        if std::env::var_os(ALLOW_THP_SETTING).is_some() {
            assert!(
                !done,
                "{ALLOW_THP_SETTING} is set: the choice is mimalloc's"
            );
        } else {
            assert!(done, "prctl(PR_SET_THP_DISABLE) failed");
            assert!(thp_disabled(), "the kernel does not report THP as disabled");
        }
    }
}
