//! Hardened codecs for the headers resilience depends on.
//!
//! Every parser bounds its input length, caps absurd values, answers `None` (or the documented
//! safe default) on garbage and never panics. They are fuzzed (`fuzz/`) and property-tested.
//!
//! | header | parse | encode |
//! |---|---|---|
//! | `Retry-After` | [`retry_after`] (delta-seconds or HTTP-date) | — |
//! | `grpc-retry-pushback-ms` | [`pushback`] (negative or garbage: stop) | [`encode_pushback`] |
//! | `grpc-timeout` | [`grpc_timeout`] | [`encode_grpc_timeout`] |
//! | `x-request-timeout-ms` | [`timeout_ms`] | [`encode_timeout_ms`] |
//!
//! [`server_hint`] reads a response's wait hint (`grpc-retry-pushback-ms`, else `Retry-After`)
//! the one way both the retry and the breaker use.
//!
//! A header that must have one value (an id, a `traceparent`) is read with [`single`]: two
//! fields of it are ambiguous, and ambiguity is treated as invalid, never as "the first wins".

mod grpc_timeout;
mod pushback;
mod retry_after;
mod timeout_ms;

pub use grpc_timeout::{GRPC_TIMEOUT, encode_grpc_timeout, grpc_timeout};
pub use pushback::{GRPC_RETRY_PUSHBACK_MS, Pushback, encode_pushback, pushback};
pub use retry_after::{MAX_RETRY_AFTER, retry_after};
pub use timeout_ms::{MAX_TIMEOUT_MS, TIMEOUT_MS, encode_timeout_ms, timeout_ms};

/// The headers steadfast's own layers own by default: the correlation id and its fallback,
/// the deadline and the retry attempt. A layer refuses to write into another layer's
/// (a deadline written into `x-correlation-id` would replace the id on the wire).
///
/// ```
/// use steadfast_core::header::owned_by_steadfast;
///
/// assert!(owned_by_steadfast(&http::HeaderName::from_static("x-correlation-id")));
/// assert!(!owned_by_steadfast(&http::HeaderName::from_static("x-tenant")));
/// ```
pub fn owned_by_steadfast(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-correlation-id" | "x-request-id" | "x-request-timeout-ms" | "x-retry-attempt"
    )
}

/// Whether a layer must refuse to write its own value into the header `name`: the protocol,
/// the caller's credentials or another hop owns it. Writing there would corrupt the message
/// (`content-length`), the connection (`connection`), a credential (`cookie`), a deadline or
/// retry hint another hop acts on (`x-request-timeout-ms`, `idempotency-key`, `retry-after`,
/// `x-retry-attempt`), gRPC (`grpc-*`) or the trace (`traceparent`). A layer that owns one of
/// these by default (the retry layer's `x-retry-attempt`) compares with its own name first.
///
/// ```
/// use http::HeaderName;
/// use steadfast_core::header::reserved;
///
/// assert!(reserved(&http::header::CONTENT_LENGTH));
/// assert!(reserved(&HeaderName::from_static("grpc-timeout")));
/// assert!(!reserved(&HeaderName::from_static("x-correlation-id")));
/// ```
pub fn reserved(name: &http::HeaderName) -> bool {
    const RESERVED: [&str; 30] = [
        // Framing, connection and negotiation.
        "host",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        // Credentials.
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "www-authenticate",
        "proxy-authenticate",
        // What steadfast's own layers and their peers act on.
        "x-request-timeout-ms",
        "idempotency-key",
        "x-retry-attempt",
        "retry-after",
        // Trace context.
        "traceparent",
        "tracestate",
        "baggage",
        // Caching and location.
        "location",
        "cache-control",
    ];
    let n = name.as_str();
    RESERVED.contains(&n) || n.starts_with("grpc-") || n.starts_with("content-")
}

/// A response's hint of how long the caller should wait before trying again, read the same
/// way by every layer: `grpc-retry-pushback-ms` when present (gRPC A6: a negative or garbled
/// value asks for no retry), else `Retry-After` (seconds or an HTTP-date, measured from
/// `now`). Several fields of one header are not an error but are never read as "the first
/// wins": any pushback field that says stop means stop, and otherwise the **longest** wait
/// any field asks for wins, so the caller never comes back sooner than one of them asked.
/// Unparseable `Retry-After` fields are ignored; `None` when no field gives a wait.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::{HeaderMap, HeaderValue, header::RETRY_AFTER};
/// use steadfast_core::header::{Pushback, server_hint};
///
/// let mut h = HeaderMap::new();
/// h.append(RETRY_AFTER, HeaderValue::from_static("1"));
/// h.append(RETRY_AFTER, HeaderValue::from_static("30"));
/// assert_eq!(server_hint(&h, SystemTime::now()), Some(Pushback::After(Duration::from_secs(30))));
/// h.append("grpc-retry-pushback-ms", HeaderValue::from_static("-1"));
/// assert_eq!(server_hint(&h, SystemTime::now()), Some(Pushback::Stop));
/// ```
pub fn server_hint(headers: &http::HeaderMap, now: std::time::SystemTime) -> Option<Pushback> {
    let mut longest: Option<std::time::Duration> = None;
    let mut pushed = false;
    for v in headers.get_all(&GRPC_RETRY_PUSHBACK_MS) {
        pushed = true;
        match pushback(v) {
            Pushback::Stop => return Some(Pushback::Stop),
            Pushback::After(d) => longest = longest.max(Some(d)),
        }
    }
    if !pushed {
        for v in headers.get_all(http::header::RETRY_AFTER) {
            longest = longest.max(retry_after(v, now));
        }
    }
    longest.map(Pushback::After)
}

/// Up to this many header names in a map, one pass over it finds the few headers a layer
/// reads more cheaply than a hashed lookup of each (a custom name is hashed byte by byte,
/// and a pass compares lengths first); past it, layers look each header up. Either way a
/// request with many headers costs a layer no more than its lookups.
///
/// ```
/// use http::{HeaderMap, HeaderValue};
/// use steadfast_core::header::FEW_NAMES;
///
/// let mut h = HeaderMap::new();
/// h.insert("x-correlation-id", HeaderValue::from_static("id-1"));
/// assert!(h.keys_len() <= FEW_NAMES);
/// ```
pub const FEW_NAMES: usize = 16;

/// The value of `name` when the message carries exactly one field of it; `None` when it
/// carries none, or two or more (whether or not they agree: a sender that repeats a
/// single-valued header is not to be trusted with either copy).
///
/// ```
/// use http::{HeaderMap, HeaderName, HeaderValue};
/// use steadfast_core::header::single;
///
/// let name = HeaderName::from_static("x-correlation-id");
/// let mut h = HeaderMap::new();
/// assert!(single(&h, &name).is_none());
/// h.append(&name, HeaderValue::from_static("good-1"));
/// assert_eq!(single(&h, &name).unwrap(), "good-1");
/// h.append(&name, HeaderValue::from_static("EVIL PAYLOAD"));
/// assert!(single(&h, &name).is_none(), "two fields: neither is taken");
/// ```
#[inline]
pub fn single<'a>(
    headers: &'a http::HeaderMap,
    name: &http::HeaderName,
) -> Option<&'a http::HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// The time budget a request carries: `grpc-timeout` if present and valid, else the deadline
/// header `header` (`x-request-timeout-ms` by default) if present and valid. Malformed values
/// are ignored. The server deadline layer reads it from an inbound request; a client
/// timeout and retry read it from an outgoing one, as a budget its caller set (tonic's
/// `Request::set_timeout` writes `grpc-timeout`).
///
/// A header sent more than once counts by its shortest valid value: a budget only ever
/// shrinks, and a caller cannot lengthen one by repeating the header.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderMap;
/// use steadfast_core::header::{TIMEOUT_MS, budget};
///
/// let mut h = HeaderMap::new();
/// h.append("grpc-timeout", "99S".parse().unwrap());
/// h.append("grpc-timeout", "250m".parse().unwrap());
/// h.insert(TIMEOUT_MS, "100".parse().unwrap());
/// assert_eq!(budget(&h, &TIMEOUT_MS), Some(Duration::from_millis(250)));
/// h.remove("grpc-timeout");
/// assert_eq!(budget(&h, &TIMEOUT_MS), Some(Duration::from_millis(100)));
/// ```
#[inline]
pub fn budget(headers: &http::HeaderMap, header: &http::HeaderName) -> Option<std::time::Duration> {
    if headers.is_empty() {
        return None;
    }
    budget_in(headers, header, false).flatten()
}

/// The budget a caller wrote on an outgoing request: the shorter of `grpc-timeout` and the
/// deadline header `header` when both are there (the caller's strictest word), telling apart a
/// request that carries no budget header (`None`) from one whose budget headers are all
/// malformed (`Some(None)`): a client layer that finds one leaves it on the wire as one valid
/// value.
#[doc(hidden)]
#[inline]
pub fn carried_budget(
    headers: &http::HeaderMap,
    header: &http::HeaderName,
) -> Option<Option<std::time::Duration>> {
    // Every client call asks (a budget its caller wrote): most carry no header at all.
    if headers.is_empty() {
        return None;
    }
    budget_in(headers, header, true)
}

/// `None` when neither header is there; else the budget: the shorter of the two headers'
/// (`shorter_of_both`), or `grpc-timeout`'s when it has a valid one.
fn budget_in(
    headers: &http::HeaderMap,
    header: &http::HeaderName,
    shorter_of_both: bool,
) -> Option<Option<std::time::Duration>> {
    use http::HeaderValue;
    use std::time::Duration;
    let few = headers.keys_len() <= FEW_NAMES;
    // Most requests carry neither header: their names alone say so.
    if few && !headers.keys().any(|n| n == GRPC_TIMEOUT || n == header) {
        return None;
    }
    if !few || *header == GRPC_TIMEOUT {
        // One lookup per header: what it holds, and whether it is there at all.
        let grpc_values = headers.get_all(&GRPC_TIMEOUT);
        let http_values = (*header != GRPC_TIMEOUT).then(|| headers.get_all(header));
        let absent = |v: &http::header::GetAll<'_, HeaderValue>| v.iter().next().is_none();
        if absent(&grpc_values) && http_values.as_ref().is_none_or(absent) {
            return None;
        }
        let grpc = grpc_values.iter().filter_map(grpc_timeout).min();
        let http = http_values.and_then(|v| v.iter().filter_map(timeout_ms).min());
        return Some(if shorter_of_both {
            shorter(grpc, http)
        } else {
            grpc.or(http)
        });
    }
    // One pass over a request with few headers.
    let (mut grpc, mut http) = (None, None);
    for (name, value) in headers {
        let (slot, parse): (_, fn(&HeaderValue) -> Option<Duration>) = if name == GRPC_TIMEOUT {
            (&mut grpc, grpc_timeout)
        } else if name == header {
            (&mut http, timeout_ms)
        } else {
            continue;
        };
        if let Some(d) = parse(value) {
            *slot = Some(slot.map_or(d, |s: Duration| s.min(d)));
        }
    }
    Some(if shorter_of_both {
        shorter(grpc, http)
    } else {
        grpc.or(http)
    })
}

fn shorter(
    a: Option<std::time::Duration>,
    b: Option<std::time::Duration>,
) -> Option<std::time::Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Leaves each budget header the request carries (`grpc-timeout`, and `header`) as one value
/// no longer than `left`: the shortest valid one if it is, else `left`. A header the request
/// does not carry is not added. For the layers that send a request again, or that found a
/// budget its caller wrote: the budget a request carries only ever shrinks downstream.
#[doc(hidden)]
pub fn clamp_budgets(
    headers: &mut http::HeaderMap,
    left: std::time::Duration,
    header: &http::HeaderName,
) {
    clamp(
        headers,
        &GRPC_TIMEOUT,
        left,
        grpc_timeout,
        encode_grpc_timeout,
    );
    if *header != GRPC_TIMEOUT {
        clamp(headers, header, left, timeout_ms, encode_timeout_ms);
    }
}

fn clamp(
    headers: &mut http::HeaderMap,
    name: &http::HeaderName,
    left: std::time::Duration,
    parse: fn(&http::HeaderValue) -> Option<std::time::Duration>,
    encode: fn(std::time::Duration) -> http::HeaderValue,
) {
    if !headers.contains_key(name) {
        return;
    }
    let values = headers.get_all(name);
    let smallest = values.iter().filter_map(parse).min();
    let single = values.iter().nth(1).is_none();
    match smallest {
        Some(d) if d <= left && single => {}
        Some(d) if d <= left => {
            let kept = encode(d);
            headers.insert(name, kept);
        }
        _ => {
            headers.insert(name, encode(left));
        }
    }
}

/// Parses a run of ASCII digits of at most `max_digits` into a `u64`. Anything else — empty,
/// a sign, whitespace inside, a non-digit, too many digits — is `None`.
fn parse_digits(bytes: &[u8], max_digits: usize) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > max_digits {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Encodes an integer and a one-byte suffix into a header value without going through
/// `format!`.
fn encode_int(n: u64, suffix: Option<u8>) -> http::HeaderValue {
    let mut buf = [0u8; 21];
    let mut i = buf.len();
    if let Some(s) = suffix {
        i -= 1;
        buf[i] = s;
    }
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    http::HeaderValue::from_bytes(&buf[i..]).expect("digits and an ASCII unit are a valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits() {
        assert_eq!(parse_digits(b"0", 3), Some(0));
        assert_eq!(parse_digits(b"123", 3), Some(123));
        assert_eq!(parse_digits(b"1234", 3), None);
        assert_eq!(parse_digits(b"", 3), None);
        assert_eq!(parse_digits(b"-1", 3), None);
        assert_eq!(parse_digits(b"1 ", 3), None);
        assert_eq!(
            parse_digits(b"99999999999999999999999", 40),
            None,
            "overflow"
        );
    }

    #[test]
    fn encode_ints() {
        assert_eq!(encode_int(0, None), "0");
        assert_eq!(encode_int(u64::MAX, Some(b'n')), "18446744073709551615n");
    }
}
