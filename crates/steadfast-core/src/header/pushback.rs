use std::time::Duration;

use http::{HeaderName, HeaderValue};

/// The `grpc-retry-pushback-ms` trailer/header name (gRPC A6).
pub const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// A server's retry pushback (gRPC A6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pushback {
    /// Retry no sooner than after this delay.
    After(Duration),
    /// Do not retry at all.
    Stop,
}

/// Parses `grpc-retry-pushback-ms`: a non-negative 32-bit integer of milliseconds.
///
/// Per gRPC A6, a negative or unparseable value means the server asks the client not to retry:
/// [`Pushback::Stop`]. Values beyond `i32::MAX` are not valid 32-bit integers, so they stop too.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use steadfast_core::header::{Pushback, pushback};
///
/// assert_eq!(pushback(&HeaderValue::from_static("250")), Pushback::After(Duration::from_millis(250)));
/// assert_eq!(pushback(&HeaderValue::from_static("-1")), Pushback::Stop);
/// assert_eq!(pushback(&HeaderValue::from_static("soon")), Pushback::Stop);
/// assert_eq!(pushback(&HeaderValue::from_static("000000000000250")), Pushback::After(Duration::from_millis(250)));
/// ```
pub fn pushback(value: &HeaderValue) -> Pushback {
    let bytes = value.as_bytes();
    // Leading zeros leave an integer as it is (gRPC's own parsers accept them); the rest
    // must still be a 32-bit integer's digits.
    let start = bytes
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(bytes.len().saturating_sub(1));
    match super::parse_digits(&bytes[start..], 10) {
        Some(ms) if ms <= i32::MAX as u64 => Pushback::After(Duration::from_millis(ms)),
        _ => Pushback::Stop,
    }
}

/// Encodes a pushback for a server to send. Durations beyond `i32::MAX` ms clamp to it.
///
/// ```
/// use std::time::Duration;
/// use steadfast_core::header::{Pushback, encode_pushback, pushback};
///
/// let v = encode_pushback(Pushback::After(Duration::from_millis(1500)));
/// assert_eq!(v, "1500");
/// assert_eq!(pushback(&encode_pushback(Pushback::Stop)), Pushback::Stop);
/// ```
pub fn encode_pushback(p: Pushback) -> HeaderValue {
    match p {
        Pushback::After(d) => super::encode_int(d.as_millis().min(i32::MAX as u128) as u64, None),
        Pushback::Stop => HeaderValue::from_static("-1"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edges() {
        let p = |s: &'static str| pushback(&HeaderValue::from_static(s));
        assert_eq!(p("0"), Pushback::After(Duration::ZERO));
        assert_eq!(
            p("2147483647"),
            Pushback::After(Duration::from_millis(2_147_483_647))
        );
        assert_eq!(p("2147483648"), Pushback::Stop);
        assert_eq!(p("99999999999"), Pushback::Stop);
        assert_eq!(p(""), Pushback::Stop);
        assert_eq!(p("-0"), Pushback::Stop);
        assert_eq!(p("1.5"), Pushback::Stop);
        assert_eq!(p(" 1"), Pushback::Stop);
        // Leading zeros: the same integer, however many.
        assert_eq!(p("000"), Pushback::After(Duration::ZERO));
        assert_eq!(
            p("00000000000000000000500"),
            Pushback::After(Duration::from_millis(500))
        );
        assert_eq!(p("002147483648"), Pushback::Stop);
        assert_eq!(p("0-1"), Pushback::Stop);
        assert_eq!(p("00 1"), Pushback::Stop);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let _ = pushback(&v);
            }
        }

        #[test]
        fn round_trip(ms in 0u64..=i32::MAX as u64) {
            let p = Pushback::After(Duration::from_millis(ms));
            prop_assert_eq!(pushback(&encode_pushback(p)), p);
        }
    }
}
