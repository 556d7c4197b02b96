use std::time::{Duration, SystemTime};

use http::HeaderValue;

/// The largest delay a `Retry-After` value parses to; larger values saturate here, so a
/// policy cap (for example five minutes) still sees "longer than I will wait".
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60 * 24 * 365);

/// Longest `Retry-After` value considered (an IMF-fixdate is 29 bytes).
const MAX_LEN: usize = 64;

/// Parses `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.
///
/// `now` is the wall-clock time an HTTP-date is measured from (pass `SystemTime::now()`); a
/// date in the past means "retry now" (`Duration::ZERO`). Values beyond [`MAX_RETRY_AFTER`]
/// saturate to it. Garbage, overlong input, signs and fractions are `None`.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use http::HeaderValue;
/// use steadfast_core::header::retry_after;
///
/// let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
/// assert_eq!(retry_after(&HeaderValue::from_static("120"), now), Some(Duration::from_secs(120)));
/// let date = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:30 GMT");
/// assert_eq!(retry_after(&date, now), Some(Duration::from_secs(30)));
/// assert_eq!(retry_after(&HeaderValue::from_static("-5"), now), None);
/// ```
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let bytes = value.as_bytes().trim_ascii();
    if bytes.is_empty() || bytes.len() > MAX_LEN {
        return None;
    }
    if bytes.iter().all(u8::is_ascii_digit) {
        // Any run of digits is a valid delta; saturate instead of rejecting huge ones, so the
        // caller never retries sooner than it was asked to.
        let secs = super::parse_digits(bytes, 19).unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let at = httpdate::parse_http_date(text).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_445_412_480)
    }

    fn hv(s: &[u8]) -> Option<HeaderValue> {
        HeaderValue::from_bytes(s).ok()
    }

    #[test]
    fn formats() {
        let p = |s: &str| retry_after(&HeaderValue::from_str(s).unwrap(), now());
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(p(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(p("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(
            p("Wed, 21 Oct 2015 07:27:00 GMT"),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(
            p("Wednesday, 21-Oct-15 07:29:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            p("Wed Oct 21 07:30:00 2015"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(p("99999999999999999999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(p("Fri, 31 Dec 9999 23:59:59 GMT"), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn garbage() {
        for raw in [
            &b""[..],
            b"   ",
            b"-1",
            b"+1",
            b"1.5",
            b"1e3",
            b"0x10",
            b"soon",
            b"Wed, 32 Oct 2015 07:28:00 GMT",
            b"Wed, 21 Oct 2015 25:28:00 GMT",
            b"\xff\xfe",
            &[b'1'; 65],
        ] {
            if let Some(v) = hv(raw) {
                assert_eq!(retry_after(&v, now()), None, "{raw:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100), secs in any::<u64>()) {
            if let Some(v) = hv(&bytes) {
                let _ = retry_after(&v, UNIX_EPOCH + Duration::from_secs(secs % (1 << 40)));
            }
        }

        #[test]
        fn seconds_round_trip(secs in 0u64..=MAX_RETRY_AFTER.as_secs()) {
            let v = HeaderValue::from_str(&secs.to_string()).unwrap();
            prop_assert_eq!(retry_after(&v, now()), Some(Duration::from_secs(secs)));
        }

        #[test]
        fn date_round_trip(ahead in 0u64..10_000_000) {
            let at = now() + Duration::from_secs(ahead);
            let v = HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap();
            prop_assert_eq!(retry_after(&v, now()), Some(Duration::from_secs(ahead)));
        }
    }
}
