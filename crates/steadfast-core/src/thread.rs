//! Per-thread numbers for striped counters.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static NUMBER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// A number unique to the calling thread for the life of the process, given out in order of
/// first use (0, 1, 2, …) and never reused.
///
/// The layers use it to give the first few threads counters of their own, which such a thread
/// can bump with a plain load and store instead of a locked read-modify-write, and to spread
/// later threads over shared counters.
///
/// ```
/// let here = steadfast_core::__private::thread_number();
/// assert_eq!(here, steadfast_core::__private::thread_number());
/// let there = std::thread::spawn(steadfast_core::__private::thread_number).join().unwrap();
/// assert_ne!(here, there);
/// ```
#[inline]
pub fn thread_number() -> usize {
    NUMBER.with(|n| {
        let v = n.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, Relaxed);
        n.set(v);
        v
    })
}
