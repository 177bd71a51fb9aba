//! The allocator of every binary built on this crate.
//!
//! Invariant: every allocation, Rust's and librdkafka's, goes through mimalloc, with its own
//! defaults. A purge delay of 100 ms instead of its 1 s (freed memory returned to the OS sooner)
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
