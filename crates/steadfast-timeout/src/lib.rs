//! The steadfast timeout layer (in progress: see the project's issue tracker).
