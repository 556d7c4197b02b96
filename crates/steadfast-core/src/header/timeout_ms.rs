use std::time::Duration;

use http::{HeaderName, HeaderValue};

/// The HTTP header steadfast uses to carry the remaining deadline to a plain-HTTP upstream:
/// the caller's remaining budget, in whole milliseconds, rounded down.
///
/// gRPC requests carry `grpc-timeout` instead. Like `grpc-timeout` it is relative, so no clock
/// synchronisation between hosts is needed; the time on the wire is not counted.
pub const TIMEOUT_MS: HeaderName = HeaderName::from_static("x-request-timeout-ms");

/// The largest value accepted: ten digits (about 115 days). Longer values are ignored.
pub const MAX_TIMEOUT_MS: u64 = 9_999_999_999;

/// Parses [`TIMEOUT_MS`]: 1-10 ASCII digits of milliseconds. Zero means the deadline has passed.
/// Anything else is `None`: the header is ignored.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use steadfast_core::header::timeout_ms;
///
/// assert_eq!(timeout_ms(&HeaderValue::from_static("1500")), Some(Duration::from_millis(1500)));
/// assert_eq!(timeout_ms(&HeaderValue::from_static("-1")), None);
/// assert_eq!(timeout_ms(&HeaderValue::from_static("12345678901")), None);
/// ```
pub fn timeout_ms(value: &HeaderValue) -> Option<Duration> {
    super::parse_digits(value.as_bytes(), 10).map(Duration::from_millis)
}

/// Encodes a remaining budget for [`TIMEOUT_MS`], rounded down to whole milliseconds and
/// clamped to [`MAX_TIMEOUT_MS`].
///
/// ```
/// use std::time::Duration;
/// use steadfast_core::header::encode_timeout_ms;
///
/// assert_eq!(encode_timeout_ms(Duration::from_micros(1999)), "1");
/// ```
pub fn encode_timeout_ms(d: Duration) -> HeaderValue {
    super::encode_int(d.as_millis().min(u128::from(MAX_TIMEOUT_MS)) as u64, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edges() {
        let p = |s: &'static str| timeout_ms(&HeaderValue::from_static(s));
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(p("9999999999"), Some(Duration::from_millis(MAX_TIMEOUT_MS)));
        for bad in ["", "+1", "1 ", "1ms", "1.0", "0x1"] {
            assert_eq!(p(bad), None, "{bad}");
        }
        assert_eq!(encode_timeout_ms(Duration::MAX), "9999999999");
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let _ = timeout_ms(&v);
            }
        }

        #[test]
        fn round_trip_never_grows(nanos in 0..MAX_TIMEOUT_MS * 1_000_000) {
            let d = Duration::from_nanos(nanos);
            let back = timeout_ms(&encode_timeout_ms(d)).unwrap();
            prop_assert!(back <= d);
            prop_assert!(d - back < Duration::from_millis(1));
        }
    }
}
