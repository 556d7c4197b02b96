//! The atomics the permit accounting is built on.
//!
//! Normal builds use `std::sync::atomic`. A test build with `--cfg loom` takes the same names
//! from `loom::sync::atomic`, so the loom model in `loom_model.rs` explores every interleaving
//! of admissions, releases and waiters. Loom atomics only work inside `loom::model`, so such a
//! build runs the loom model and nothing else.

#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::Mutex;
#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(all(test, loom))]
pub(crate) use loom::sync::Mutex;
#[cfg(all(test, loom))]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A pause in a retry loop that waits for another thread's step (under loom, a yield, so the
/// model lets that thread run).
#[inline]
pub(crate) fn spin() {
    #[cfg(not(all(test, loom)))]
    std::hint::spin_loop();
    #[cfg(all(test, loom))]
    loom::thread::yield_now();
}
