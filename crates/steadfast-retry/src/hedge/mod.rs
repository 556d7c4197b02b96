//! Hedged requests: a second attempt races a slow first one.

pub(crate) mod future;
mod latency;
pub(crate) mod layer;
pub(crate) mod service;
