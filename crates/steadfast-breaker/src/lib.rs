//! The steadfast breaker layer (in progress: see the project's issue tracker).
