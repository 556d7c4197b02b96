//! The response futures of this crate's services.

pub use crate::server::SetCorrelationIdFuture;
