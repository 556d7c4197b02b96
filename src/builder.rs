//! Builder methods for tower's `ServiceBuilder`.

use tower::ServiceBuilder;

mod sealed {
    pub trait Sealed<L> {}
}

/// Extension methods on [`tower::ServiceBuilder`] that add steadfast layers.
///
/// Sealed: implemented only for `ServiceBuilder`. A method per layer is added as each layer
/// lands.
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {}

impl<L> sealed::Sealed<L> for ServiceBuilder<L> {}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {}
