use std::time::Duration;

use http::{HeaderName, HeaderValue};

/// The `grpc-timeout` header name.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Largest value gRPC allows in `grpc-timeout` (8 digits).
const MAX_VALUE: u64 = 99_999_999;

/// Parses `grpc-timeout`: 1-8 ASCII digits followed by one unit of `H M S m u n` (hours,
/// minutes, seconds, milliseconds, microseconds, nanoseconds), per the gRPC HTTP/2 protocol.
///
/// Zero is valid and means the deadline has already passed. Anything else — 9+ digits, an
/// unknown unit, signs, spaces, non-ASCII — is `None`: the header is ignored.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use steadfast_core::header::grpc_timeout;
///
/// assert_eq!(grpc_timeout(&HeaderValue::from_static("1500m")), Some(Duration::from_millis(1500)));
/// assert_eq!(grpc_timeout(&HeaderValue::from_static("0S")), Some(Duration::ZERO));
/// assert_eq!(grpc_timeout(&HeaderValue::from_static("123456789S")), None);
/// assert_eq!(grpc_timeout(&HeaderValue::from_static("5s")), None);
/// ```
pub fn grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let bytes = value.as_bytes();
    let (&unit, digits) = bytes.split_last()?;
    let n = super::parse_digits(digits, 8)?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a duration as `grpc-timeout`, in the finest unit whose value fits in 8 digits.
///
/// The value is rounded down (the receiver never gets more time than the sender has); a
/// duration beyond the format's range is clamped to `99999999H`.
///
/// ```
/// use std::time::Duration;
/// use steadfast_core::header::encode_grpc_timeout;
///
/// assert_eq!(encode_grpc_timeout(Duration::from_millis(50)), "50000000n");
/// assert_eq!(encode_grpc_timeout(Duration::from_secs(2)), "2000000u");
/// assert_eq!(encode_grpc_timeout(Duration::from_secs(3600 * 24)), "86400000m");
/// ```
pub fn encode_grpc_timeout(d: Duration) -> HeaderValue {
    let nanos = d.as_nanos();
    let units: [(u128, u8); 6] = [
        (1, b'n'),
        (1_000, b'u'),
        (1_000_000, b'm'),
        (1_000_000_000, b'S'),
        (60_000_000_000, b'M'),
        (3_600_000_000_000, b'H'),
    ];
    for (per, unit) in units {
        let v = nanos / per;
        if v <= u128::from(MAX_VALUE) {
            return super::encode_int(v as u64, Some(unit));
        }
    }
    super::encode_int(MAX_VALUE, Some(b'H'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units() {
        let p = |s: &'static str| grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("3S"), Some(Duration::from_secs(3)));
        assert_eq!(p("4m"), Some(Duration::from_millis(4)));
        assert_eq!(p("5u"), Some(Duration::from_micros(5)));
        assert_eq!(p("6n"), Some(Duration::from_nanos(6)));
        assert_eq!(p("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(p("00000001S"), Some(Duration::from_secs(1)));
        for zero in ["0H", "0M", "0S", "0m", "0u", "0n"] {
            assert_eq!(p(zero), Some(Duration::ZERO));
        }
    }

    #[test]
    fn the_coarsest_loss_is_just_past_a_unit_switch() {
        // 10^8 ms and a bit: sent in whole seconds, losing up to a second in 10^5.
        let d = Duration::from_nanos(100_721_100_721_102);
        let back = grpc_timeout(&encode_grpc_timeout(d)).unwrap();
        assert_eq!(back, Duration::from_secs(100_721));
        assert!(d - back <= d / 100_000);
    }

    #[test]
    fn garbage_is_ignored() {
        for raw in [
            &b""[..],
            b"S",
            b"1",
            b"1s",
            b"1h",
            b"1x",
            b"-1S",
            b"+1S",
            b" 1S",
            b"1 S",
            b"1S ",
            b"123456789S",
            b"1.5S",
            b"\xc3\xa9S",
            b"1SS",
            b"18446744073709551616n",
        ] {
            if let Ok(v) = HeaderValue::from_bytes(raw) {
                assert_eq!(grpc_timeout(&v), None, "{raw:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let _ = grpc_timeout(&v);
            }
        }

        #[test]
        fn round_trip_never_grows(nanos in any::<u64>()) {
            let d = Duration::from_nanos(nanos);
            let v = encode_grpc_timeout(d);
            prop_assert!(v.len() <= 9);
            let back = grpc_timeout(&v).expect("encoded values parse");
            prop_assert!(back <= d);
            // Rounding loses less than one unit of the chosen precision. A coarser unit is chosen
            // only past 99,999,999 of the finer one, and is at most 1000 of them: the loss stays
            // under 1000 / 10^8 of the duration. (This said one part per million, which a
            // duration just past 10^8 ms, in whole seconds, broke: 100,721.100721102 s was sent
            // as 100721S.)
            prop_assert!(d - back <= d / 100_000 + Duration::from_nanos(1));
        }

        #[test]
        fn exact_in_own_unit(n in 0u64..=99_999_999) {
            let v = encode_grpc_timeout(Duration::from_millis(n));
            prop_assert_eq!(grpc_timeout(&v), Some(Duration::from_millis(n)));
        }
    }

    #[test]
    fn huge_clamps() {
        assert_eq!(encode_grpc_timeout(Duration::MAX), "99999999H");
    }
}
