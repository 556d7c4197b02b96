//! Every header parser in steadfast-core on arbitrary bytes: no panic, and the invariants the
//! layers rely on hold.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run headers -- -max_total_time=60` (from the repo root).
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use steadfast_core::GrpcCode;
use steadfast_core::header::{
    GRPC_RETRY_PUSHBACK_MS, MAX_RETRY_AFTER, Pushback, encode_grpc_timeout, encode_timeout_ms,
    grpc_timeout, pushback, retry_after, server_hint, single, timeout_ms,
};

/// The input split at `;` into several fields of one header: `server_hint` never panics, any
/// pushback field that says stop wins, and otherwise the hint is the longest any field asks
/// for (never sooner than one of them); `single` answers only for exactly one field.
fn several_fields(data: &[u8], now: SystemTime) {
    let values: Vec<HeaderValue> = data
        .split(|&b| b == b';')
        .filter_map(|p| HeaderValue::from_bytes(p).ok())
        .collect();
    for name in [RETRY_AFTER, GRPC_RETRY_PUSHBACK_MS] {
        let mut h = HeaderMap::new();
        for v in &values {
            h.append(name.clone(), v.clone());
        }
        assert_eq!(single(&h, &name).is_some(), values.len() == 1);
        let hint = server_hint(&h, now);
        if name == GRPC_RETRY_PUSHBACK_MS {
            let each: Vec<Pushback> = values.iter().map(pushback).collect();
            if each.contains(&Pushback::Stop) {
                assert_eq!(hint, Some(Pushback::Stop));
            } else {
                let longest = each.iter().filter_map(|p| match p {
                    Pushback::After(d) => Some(*d),
                    Pushback::Stop => None,
                });
                assert_eq!(hint, longest.max().map(Pushback::After));
            }
        } else {
            let longest = values.iter().filter_map(|v| retry_after(v, now)).max();
            assert_eq!(hint, longest.map(Pushback::After));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    several_fields(data, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
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
