//! W3C Trace Context: `traceparent` (version 00 and forward-compatible higher versions) and
//! `tracestate`, carried from an inbound request to the calls its handler makes.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue};
use pin_project_lite::pin_project;
use steadfast_core::__private::rand;
use tokio::task::futures::TaskLocalFuture;

/// The `traceparent` header name.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The `tracestate` header name.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

tokio::task_local! {
    static TRACE: TraceContext;
}

/// The most list members a `tracestate` may carry (W3C Trace Context §3.3.1).
const MAX_STATE_MEMBERS: usize = 32;
/// The longest combined `tracestate` kept: the longest a valid one can be (32 members of a
/// 256-byte key, `=` and a 256-byte value, with a comma and some spaces between them), so
/// that only what breaks the list rules is dropped.
const MAX_STATE_LEN: usize = 32 * (256 + 1 + 256) + 31 * 4;

/// The W3C Trace Context of the request being handled: its trace id, the caller's span id
/// (the parent), the trace flags and the vendors' `tracestate`.
///
/// Behind [`SetCorrelationIdLayer`](crate::SetCorrelationIdLayer) (trace context on by
/// default), a request's valid `traceparent` is ambient in its handler, and every call made
/// through a [`PropagateCorrelationIdLayer`](crate::PropagateCorrelationIdLayer) carries it on:
/// the same trace id and flags, a new span id per call (the caller is the parent of what it
/// calls), and the `tracestate` unchanged. What fails the W3C rules is dropped, never
/// forwarded: a `traceparent` sent twice, of version `ff`, with upper-case hex, wrong lengths
/// or an all-zero id (then its `tracestate` too); a `tracestate` with a malformed or repeated
/// key, a bad value, or more than 32 members; a `tracestate` without a `traceparent`.
///
/// ```
/// use steadfast_correlation::TraceContext;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
/// headers.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
/// let trace = TraceContext::from_headers(&headers).unwrap();
/// assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(trace.sampled());
/// let child = trace.child_traceparent(0x1234);
/// assert_eq!(child, "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000001234-01");
/// assert_eq!(trace.state().unwrap(), "congo=t61rcWkgMzE");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
    state: Option<HeaderValue>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &self.trace_id())
            .field("parent_id", &hex(&self.parent_id))
            .field("flags", &self.flags)
            .field("state", &self.state)
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let digit = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

impl TraceContext {
    /// Parses one `traceparent` value; `None` unless it follows the W3C rules (see
    /// [`trace_id`]). Fields after the flags, which later versions may add, are not kept:
    /// what this context sends is version `00`.
    pub fn parse(traceparent: &[u8]) -> Option<Self> {
        trace_id(traceparent)?;
        Some(Self {
            trace_id: unhex(&traceparent[3..35])?,
            parent_id: unhex(&traceparent[36..52])?,
            flags: unhex::<1>(&traceparent[53..55])?[0],
            state: None,
        })
    }

    /// The trace context of a request's headers: exactly one valid `traceparent`, with its
    /// `tracestate` (several fields are joined, as the spec allows) when that is valid too.
    /// `None` when `traceparent` is absent, repeated or invalid.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut parents = headers.get_all(TRACEPARENT).iter();
        let (Some(parent), None) = (parents.next(), parents.next()) else {
            return None;
        };
        Self::with_state(parent, headers, true)
    }

    /// [`from_headers`](Self::from_headers) for a caller that has found the one
    /// `traceparent` field already, and knows whether a `tracestate` was sent at all (when
    /// not, `headers` is not looked at).
    pub(crate) fn with_state(
        parent: &HeaderValue,
        headers: &HeaderMap,
        state_sent: bool,
    ) -> Option<Self> {
        let mut trace = Self::parse(parent.as_bytes())?;
        if state_sent {
            trace.state = state_of(headers);
        }
        Some(trace)
    }

    /// The trace id, 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The caller's span id (the parent of the spans this request makes), 16 hex digits.
    pub fn parent_id(&self) -> String {
        hex(&self.parent_id)
    }

    /// The trace flags, as received.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the caller sampled this trace (flag `01`).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The validated `tracestate`, if one came with it.
    pub fn state(&self) -> Option<&HeaderValue> {
        self.state.as_ref()
    }

    /// The `traceparent` for a call made in this trace: version `00`, this trace id and
    /// flags, and `span_id` as its parent id (an id of zero, which the spec forbids, becomes
    /// one).
    pub fn child_traceparent(&self, span_id: u64) -> HeaderValue {
        let mut text = String::with_capacity(55);
        text.push_str("00-");
        text.push_str(&hex(&self.trace_id));
        text.push('-');
        text.push_str(&hex(&span_id.max(1).to_be_bytes()));
        text.push('-');
        text.push_str(&hex(&[self.flags]));
        HeaderValue::try_from(text).expect("hex digits and dashes")
    }

    /// Writes this trace's headers on an outgoing request: a `traceparent` with a new random
    /// span id, and the `tracestate`, replacing what the request carried.
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.child_traceparent(span_id()));
        match &self.state {
            Some(state) => {
                headers.insert(TRACESTATE, state.clone());
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// The trace context of the request being handled, if it came with one.
    pub fn current() -> Option<TraceContext> {
        TRACE.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with this trace context ambient.
    pub fn scope<F: Future>(self, fut: F) -> Traced<F> {
        Traced::new(Some(self), fut)
    }

    /// Carries the current trace context (if any) into `fut`, typically before
    /// `tokio::spawn`: task-locals do not cross a spawn.
    pub fn propagate<F: Future>(fut: F) -> Traced<F> {
        Traced::new(Self::current(), fut)
    }

    /// Runs `f` with `trace` ambient, when there is one.
    pub(crate) fn sync_scope_opt<R>(trace: Option<TraceContext>, f: impl FnOnce() -> R) -> R {
        match trace {
            Some(t) => TRACE.sync_scope(t, f),
            None => f(),
        }
    }
}

thread_local! {
    static SPAN_IDS: Cell<u64> = Cell::new(rand::random_seed(7));
}

/// A random span id for an outgoing call.
fn span_id() -> u64 {
    SPAN_IDS.with(|s| {
        let before = s.get();
        s.set(before.wrapping_add(rand::STEP));
        rand::next(before)
    })
}

/// The request's `tracestate`, its fields joined, if valid (§3.3): at most 32 list members,
/// each `key=value` with a key of lower-case letters, digits and `_-*/` (or
/// `tenant@system`), no key twice, and a value of printable ASCII without `,` or `=` that
/// does not end in a space. Empty members (`a=1,,b=2`) are allowed and skipped.
fn state_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(TRACESTATE).iter();
    let first = values.next()?;
    let joined = match values.next() {
        None => first.clone(),
        Some(second) => {
            let mut all = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                all.push(b',');
                all.extend_from_slice(v.as_bytes());
            }
            HeaderValue::from_bytes(&all).ok()?
        }
    };
    valid_state(joined.as_bytes()).then_some(joined)
}

fn valid_state(bytes: &[u8]) -> bool {
    if bytes.len() > MAX_STATE_LEN {
        return false;
    }
    let mut keys: Vec<&[u8]> = Vec::new();
    for member in bytes.split(|&b| b == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        let Some(eq) = member.iter().position(|&b| b == b'=') else {
            return false;
        };
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        if !valid_key(key) || !valid_value(value) || keys.contains(&key) {
            return false;
        }
        keys.push(key);
        if keys.len() > MAX_STATE_MEMBERS {
            return false;
        }
    }
    true
}

fn key_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

fn valid_key(key: &[u8]) -> bool {
    match key.iter().position(|&b| b == b'@') {
        // simple-key: lcalpha 0*255(keychars)
        None => {
            (1..=256).contains(&key.len())
                && key[0].is_ascii_lowercase()
                && key.iter().all(|&b| key_char(b))
        }
        // multi-tenant-key: tenant-id "@" system-id
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            (1..=241).contains(&tenant.len())
                && matches!(tenant[0], b'a'..=b'z' | b'0'..=b'9')
                && tenant.iter().all(|&b| key_char(b))
                && (1..=14).contains(&system.len())
                && system[0].is_ascii_lowercase()
                && system.iter().all(|&b| key_char(b))
        }
    }
}

fn valid_value(value: &[u8]) -> bool {
    (1..=256).contains(&value.len())
        && value
            .iter()
            .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
        && value[value.len() - 1] != b' '
}

pin_project! {
    /// A future with an ambient [`TraceContext`] (or none); see [`TraceContext::scope`] and
    /// [`TraceContext::propagate`].
    pub struct Traced<F> {
        #[pin]
        inner: TracedInner<F>,
    }
}

pin_project! {
    #[project = TracedProj]
    enum TracedInner<F> {
        With { #[pin] inner: TaskLocalFuture<TraceContext, F> },
        Without { #[pin] inner: F },
    }
}

impl<F: Future> Traced<F> {
    pub(crate) fn new(trace: Option<TraceContext>, fut: F) -> Self {
        Self {
            inner: match trace {
                Some(t) => TracedInner::With {
                    inner: TRACE.scope(t, fut),
                },
                None => TracedInner::Without { inner: fut },
            },
        }
    }
}

impl<F> fmt::Debug for Traced<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Traced").finish_non_exhaustive()
    }
}

impl<F: Future> Future for Traced<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().inner.project() {
            TracedProj::With { inner } => inner.poll(cx),
            TracedProj::Without { inner } => inner.poll(cx),
        }
    }
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trace-id of a valid `traceparent`, per W3C Trace Context §3.2: `version-traceid-
/// parentid-flags` in lowercase hex; version `ff` is invalid; an all-zero trace-id or
/// parent-id is invalid; version `00` must be exactly 55 bytes, higher versions may carry more
/// after a `-`.
///
/// ```
/// use steadfast_correlation::trace_id;
///
/// let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// assert_eq!(trace_id(tp), Some(&b"4bf92f3577b34da6a3ce929d0e0e4736"[..]));
/// assert_eq!(trace_id(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
/// assert_eq!(trace_id(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), None);
/// ```
pub fn trace_id(value: &[u8]) -> Option<&[u8]> {
    if value.len() < 55 || value.len() > 512 {
        return None;
    }
    let (version, trace, parent, flags) =
        (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    if !is_lower_hex(version) || version == b"ff" {
        return None;
    }
    if version == b"00" && value.len() != 55 {
        return None;
    }
    if value.len() > 55 && value[55] != b'-' {
        return None;
    }
    if !is_lower_hex(trace) || !is_lower_hex(parent) || !is_lower_hex(flags) {
        return None;
    }
    if trace.iter().all(|&b| b == b'0') || parent.iter().all(|&b| b == b'0') {
        return None;
    }
    Some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OK: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn spec_cases() {
        assert!(trace_id(OK).is_some());
        assert!(
            trace_id(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some()
        );
        for bad in [
            &b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0G",
            b"",
        ] {
            assert_eq!(trace_id(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_context_keeps_the_trace_id_and_flags_and_takes_a_new_parent() {
        let t = TraceContext::from_headers(&headers(&[("traceparent", TP)])).unwrap();
        assert_eq!(t.parent_id(), "00f067aa0ba902b7");
        assert_eq!(t.flags(), 1);
        let child = t.child_traceparent(0xabc);
        assert_eq!(
            child,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-01"
        );
        assert_eq!(
            t.child_traceparent(0),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000001-01",
            "a zero span id is not valid"
        );
        // A later version's extra fields are dropped; what goes out is version 00.
        let v1 = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-the-future-holds";
        let t = TraceContext::from_headers(&headers(&[("traceparent", v1)])).unwrap();
        assert!(!t.sampled());
        assert_eq!(
            t.child_traceparent(2),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000002-00"
        );
        // Injected span ids are random and never the parent's.
        let mut out = HeaderMap::new();
        t.inject(&mut out);
        let first = out["traceparent"].clone();
        t.inject(&mut out);
        assert_ne!(first, out["traceparent"]);
        assert!(!out.contains_key("tracestate"));
    }

    #[test]
    fn a_repeated_or_invalid_traceparent_gives_no_context() {
        assert!(TraceContext::from_headers(&headers(&[])).is_none());
        assert!(
            TraceContext::from_headers(&headers(&[("traceparent", TP), ("traceparent", TP)]))
                .is_none(),
            "sent twice"
        );
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                TraceContext::from_headers(&headers(&[("traceparent", bad)])).is_none(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tracestate_follows_the_list_rules_or_is_dropped() {
        let state = |values: &[&str]| {
            let mut pairs = vec![("traceparent", TP)];
            pairs.extend(values.iter().map(|v| ("tracestate", *v)));
            TraceContext::from_headers(&headers(&pairs))
                .unwrap()
                .state()
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            state(&["congo=t61rcWkgMzE"]).as_deref(),
            Some("congo=t61rcWkgMzE")
        );
        assert_eq!(
            state(&["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"]).as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            "several fields are joined in order"
        );
        assert!(state(&["a=1, ,b=2"]).is_some(), "empty members are allowed");
        assert!(
            state(&["a=1 , b=2"]).is_some(),
            "spaces around members are list syntax"
        );
        assert!(state(&["tenant1@vendor=x"]).is_some(), "multi-tenant key");
        let thirty_two: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert!(state(&[&thirty_two.join(",")]).is_some());
        let thirty_three: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        for bad in [
            thirty_three.join(","),
            "Congo=x".to_owned(),    // upper case key
            "1congo=x".to_owned(),   // simple key starts with a letter
            "congo".to_owned(),      // no value
            "congo=".to_owned(),     // empty value
            "congo=a=b".to_owned(),  // '=' in the value
            "congo=a\tb".to_owned(), // a tab inside the value
            "a=1,a=2".to_owned(),    // a key twice
            "t@toolongsystemid=x".to_owned(),
            format!("{}=x", "k".repeat(257)),
            format!("k={}", "v".repeat(257)),
        ] {
            assert_eq!(state(&[&bad]), None, "{bad}");
        }
        // The traceparent still counts when only the tracestate is bad.
        assert!(
            TraceContext::from_headers(&headers(&[("traceparent", TP), ("tracestate", "BAD")]))
                .is_some()
        );
    }

    proptest! {
        #[test]
        fn tracestate_parsing_never_panics(text in "[ -~]{0,300}") {
            let mut h = headers(&[("traceparent", TP)]);
            if let Ok(v) = HeaderValue::from_str(&text) {
                h.insert(TRACESTATE, v);
            }
            let _ = TraceContext::from_headers(&h);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = trace_id(&bytes);
        }

        #[test]
        fn valid_round_trip(trace in "[0-9a-f]{31}[1-9a-f]", parent in "[1-9a-f][0-9a-f]{15}", flags in "[0-9a-f]{2}") {
            let tp = format!("00-{trace}-{parent}-{flags}");
            prop_assert_eq!(trace_id(tp.as_bytes()), Some(trace.as_bytes()));
        }
    }
}
