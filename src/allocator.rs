//! The allocator of every binary built on this crate, and how soon it returns freed memory.
//!
//! Invariant: every allocation, Rust's and librdkafka's, goes through mimalloc; the purge delay
//! is set once, before any other thread exists, and an operator's `MIMALLOC_PURGE_DELAY` wins.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// Every binary built on this crate (the command, tests, benches) allocates with mimalloc: the
/// hot path allocates and frees many short-lived buffers across threads, where glibc's malloc
/// spent a third of the fan-out's CPU. With the `override` feature (Cargo.toml) mimalloc also
/// takes `malloc`/`free` for C code, so librdkafka's records and headers (copied per output,
/// freed on its delivery thread) no longer go through glibc's arenas either.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`: its slot in mimalloc.h's `mi_option_e` (the bindings name no
/// constant for it; mimalloc keeps retired options' slots, so the index is stable).
const PURGE_DELAY: mi_option_t = 15;

/// Milliseconds a freed page stays committed before mimalloc gives it back to the OS (its own
/// default is 1,000). A processor catching up on a backlog frees fast: holding a second's worth,
/// a fan-out's peak RSS reached 216-253 MiB against the dev manifests' 256 MiB limit; with
/// 100 ms, 192-204 MiB at the same throughput (benches/backlog.rs; the commit has the runs).
pub const PURGE_DELAY_MS: i64 = 100;

/// The environment variables by which an operator sets the purge delay (mimalloc reads them at
/// start-up; the second is its older name).
const PURGE_DELAY_SETTINGS: [&str; 2] = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"];

/// Sets the purge delay to [`PURGE_DELAY_MS`] unless the environment sets it. Call first thing
/// in `main`: mimalloc's options are not synchronised.
pub fn return_freed_memory_sooner() {
    if operator_sets_purge_delay(|name| std::env::var_os(name).is_some()) {
        return;
    }
    // SAFETY: a valid option index; called before any other thread exists.
    unsafe { mi_option_set(PURGE_DELAY, PURGE_DELAY_MS as _) };
}

/// The purge delay in effect, in milliseconds.
pub fn purge_delay_ms() -> i64 {
    // SAFETY: a valid option index; reading an option has no other effect.
    unsafe { mi_option_get(PURGE_DELAY) as i64 }
}

fn operator_sets_purge_delay(is_set: impl Fn(&str) -> bool) -> bool {
    PURGE_DELAY_SETTINGS.iter().any(|name| is_set(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_set_is_mimallocs_purge_delay_and_takes_the_new_value() {
        // No test sets the delay and this process's environment does not either: the slot holds
        // mimalloc 3's default for the purge delay, which no neighbouring option has.
        assert!(!operator_sets_purge_delay(|n| std::env::var_os(n).is_some()));
        assert_eq!(
            purge_delay_ms(),
            1000,
            "slot {PURGE_DELAY} is not the purge delay"
        );
        return_freed_memory_sooner();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
    }

    #[test]
    fn an_operators_setting_wins_under_either_name() {
        assert!(operator_sets_purge_delay(|n| n == "MIMALLOC_PURGE_DELAY"));
        assert!(operator_sets_purge_delay(|n| n == "MIMALLOC_RESET_DELAY"));
        assert!(!operator_sets_purge_delay(|n| n == "MIMALLOC_VERBOSE"));
    }
}
