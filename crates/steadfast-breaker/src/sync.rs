//! The atomics that the state machine and the windows are built on.
//!
//! Normal builds use `std::sync::atomic`. A test build with `--cfg loom` takes the same names
//! from `loom::sync::atomic`, so the loom models in `state/loom_model.rs` can explore every
//! interleaving of the state transitions. Loom atomics only work inside `loom::model`, so such
//! a build runs the loom models and nothing else.

#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

#[cfg(all(test, loom))]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
