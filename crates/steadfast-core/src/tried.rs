//! Which endpoints the attempts of one call went to, so that a hedge goes to another.
//!
//! A layer that sends several attempts of one call at once (hedging) opens a scope around
//! each attempt's synchronous `Service::call`; a balancer below reads the endpoints to avoid
//! from it and records the one it picked. Like the ambient deadline's call guard, it is a
//! thread-local set and restored around a synchronous call: nothing is added to the request.

use std::cell::Cell;

std::thread_local! {
    static SCOPE: Cell<Option<Tried>> = const { Cell::new(None) };
}

/// How many endpoints one call remembers (gRPC A6 allows at most five attempts).
const KEPT: usize = 5;

/// The endpoints the attempts of one call were sent to so far, by an id the balancer chose
/// (the first five are kept).
///
/// ```
/// use steadfast_core::__private::Tried;
///
/// let mut tried = Tried::default();
/// // What a balancer below does inside the scope: read what to avoid, record its pick.
/// tried.scope(|| {
///     assert!(!Tried::current().unwrap().contains(7));
///     Tried::record(7);
/// });
/// assert!(tried.contains(7));
/// assert_eq!(Tried::current(), None); // outside any scope
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tried {
    ids: [u64; KEPT],
    len: u8,
}

/// Restores the enclosing scope, on return and on unwind.
#[derive(Debug)]
struct Restore(Option<Tried>);

/// A scope entered with [`Tried::enter`]; the enclosing one comes back when it is left or
/// dropped (on unwind too).
#[must_use = "leave the scope to keep what was recorded in it"]
#[derive(Debug)]
pub struct Entered {
    _restore: Restore,
}

impl Entered {
    /// Leaves the scope, keeping in `into` what was recorded in it.
    #[inline]
    pub fn leave(self, into: &mut Tried) {
        if let Ok(Some(now)) = SCOPE.try_with(Cell::get) {
            *into = now;
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = SCOPE.try_with(|s| s.set(self.0));
    }
}

impl Tried {
    /// Whether an attempt of this call went to the endpoint `id`.
    #[inline]
    pub fn contains(&self, id: u64) -> bool {
        self.ids[..usize::from(self.len)].contains(&id)
    }

    /// The set holding `id` alone.
    ///
    /// ```
    /// use steadfast_core::__private::Tried;
    ///
    /// let t = Tried::of(7);
    /// assert!(t.contains(7));
    /// assert_eq!(t.only(), Some(7));
    /// assert_eq!(Tried::default().only(), None);
    /// ```
    pub fn of(id: u64) -> Self {
        let mut t = Self::default();
        t.push(id);
        t
    }

    /// The endpoint, when the set holds exactly one.
    #[inline]
    pub fn only(&self) -> Option<u64> {
        (self.len == 1).then_some(self.ids[0])
    }

    /// Whether no endpoint was recorded.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, id: u64) {
        if usize::from(self.len) < KEPT && !self.contains(id) {
            self.ids[usize::from(self.len)] = id;
            self.len += 1;
        }
    }

    /// Runs `call` (one attempt's synchronous `Service::call`) with this set as the current
    /// scope, then keeps what a balancer below recorded in it.
    #[inline]
    pub fn scope<R>(&mut self, call: impl FnOnce() -> R) -> R {
        let entered = self.enter();
        let out = call();
        entered.leave(self);
        out
    }

    /// Makes this set the current scope until the guard is left ([`Entered::leave`], which
    /// keeps what was recorded) or dropped: [`scope`](Self::scope) without a closure, for a
    /// call whose result (a large future) should not be moved out of one.
    ///
    /// ```
    /// use steadfast_core::__private::Tried;
    ///
    /// let mut tried = Tried::default();
    /// let entered = tried.enter();
    /// Tried::record(3); // what a balancer below does
    /// entered.leave(&mut tried);
    /// assert!(tried.contains(3));
    /// assert_eq!(Tried::current(), None);
    /// ```
    #[inline]
    pub fn enter(&self) -> Entered {
        Entered {
            _restore: Restore(SCOPE.try_with(|s| s.replace(Some(*self))).ok().flatten()),
        }
    }

    /// For a balancer: the endpoints the call being made has already used, when a layer
    /// above opened a scope for it.
    #[inline]
    pub fn current() -> Option<Tried> {
        SCOPE.try_with(Cell::get).ok().flatten()
    }

    /// For a balancer: records the endpoint it picked for the call being made (nothing
    /// happens outside a scope).
    #[inline]
    pub fn record(id: u64) {
        let _ = SCOPE.try_with(|s| {
            if let Some(mut t) = s.get() {
                t.push(id);
                s.set(Some(t));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Tried;

    #[test]
    fn scopes_nest_and_restore() {
        let mut outer = Tried::default();
        outer.scope(|| {
            Tried::record(1);
            let mut inner = Tried::default();
            inner.scope(|| Tried::record(2));
            assert!(inner.contains(2) && !inner.contains(1));
            assert_eq!(Tried::current().map(|t| t.contains(1)), Some(true));
        });
        assert!(outer.contains(1) && !outer.contains(2));
        assert_eq!(Tried::current(), None);
    }

    #[test]
    fn a_panic_inside_restores_the_scope() {
        let mut t = Tried::default();
        let r = std::panic::catch_unwind(move || t.scope(|| panic!("boom")));
        assert!(r.is_err());
        assert_eq!(Tried::current(), None);
    }

    #[test]
    fn keeps_the_first_five_once_each() {
        let mut t = Tried::default();
        t.scope(|| (0..9).chain(0..9).for_each(Tried::record));
        assert!((0..5).all(|i| t.contains(i)));
        assert!(!t.contains(5));
    }
}
