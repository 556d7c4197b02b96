//! The steadfast retry layer (in progress: see the project's issue tracker).
