//! The steadfast correlation layer (in progress: see the project's issue tracker).
