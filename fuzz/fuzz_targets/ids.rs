//! Correlation-id validation and `traceparent` parsing on arbitrary bytes.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run ids -- -max_total_time=60` (from the repo root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use steadfast_correlation::{CorrelationId, is_valid_default, trace_id};

fuzz_target!(|data: &[u8]| {
    if is_valid_default(data) {
        // Accepted ids are 1-128 bytes of [A-Za-z0-9._:-] and always usable as a header.
        assert!(!data.is_empty() && data.len() <= 128);
        let s = std::str::from_utf8(data).expect("ASCII");
        let id = CorrelationId::parse(s).expect("valid ids parse");
        assert_eq!(id.as_bytes(), data);
    } else if let Ok(s) = std::str::from_utf8(data) {
        assert!(CorrelationId::parse(s).is_none());
    }
    if let Some(trace) = trace_id(data) {
        assert_eq!(trace.len(), 32);
        assert!(trace.iter().any(|&b| b != b'0'));
        assert!(is_valid_default(trace));
    }
});
