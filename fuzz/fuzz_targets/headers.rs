//! Every header parser in steadfast-core on arbitrary bytes: no panic, and the invariants the
//! layers rely on hold.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run headers -- -max_total_time=60` (from the repo root).
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use steadfast_core::GrpcCode;
use steadfast_core::header::{
    MAX_RETRY_AFTER, Pushback, encode_grpc_timeout, encode_timeout_ms, grpc_timeout, pushback,
    retry_after, timeout_ms,
};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    if let Some(d) = retry_after(&v, now) {
        assert!(d <= MAX_RETRY_AFTER);
    }
    let _ = retry_after(&v, SystemTime::UNIX_EPOCH);
    if let Some(d) = grpc_timeout(&v) {
        // Whatever parsed re-encodes to something that parses to no more than itself.
        let again = grpc_timeout(&encode_grpc_timeout(d)).expect("encoded value parses");
        assert!(again <= d);
        assert!(data.len() <= 9);
    }
    if let Pushback::After(d) = pushback(&v) {
        assert!(d <= Duration::from_millis(i32::MAX as u64));
    }
    if let Some(d) = timeout_ms(&v) {
        assert_eq!(timeout_ms(&encode_timeout_ms(d)), Some(d));
    }
    let code = GrpcCode::from_header(&v);
    assert!((0..=16).contains(&code.as_i32()));
});
