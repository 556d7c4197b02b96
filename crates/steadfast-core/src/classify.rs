//! One outcome classification for retry and breaker.
//!
//! Every finished call is turned into a [`Class`]: is it a *failure* (counts against an upstream's
//! health), is it *retryable* (another attempt may succeed), and how far did the request get
//! ([`Delivery`]). Retry and breaker read the same classification, so "what is a failure" is
//! decided once.
//!
//! gRPC puts its status in the trailers at the end of a streamed body, so a gRPC response whose
//! headers carry no `grpc-status` classifies as [`ResponseClass::Deferred`]; wrap its body in
//! frames through [`GrpcClassifier::classify_frame`] to learn the verdict at end of stream (the
//! breaker's body does).

use std::error::Error;

use http::{HeaderMap, Response, StatusCode, header::CONTENT_TYPE, header::HeaderName};
use http_body::Frame;

use crate::error::{Delivery, classify_transport_error};
use crate::grpc::{GrpcCode, GrpcCodeSet};

/// The verdict on one finished call.
///
/// ```
/// use steadfast_core::{Class, Delivery};
///
/// let c = Class::new(true, true, Delivery::Answered);
/// assert!(c.is_failure() && c.is_retryable());
/// assert_eq!(Class::SUCCESS.delivery(), Delivery::Answered);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Class {
    failure: bool,
    retryable: bool,
    delivery: Delivery,
    overload: bool,
}

impl Class {
    /// An answered call that is neither a failure nor worth retrying.
    pub const SUCCESS: Class = Class::new(false, false, Delivery::Answered);

    /// A verdict from its parts.
    pub const fn new(failure: bool, retryable: bool, delivery: Delivery) -> Self {
        Self {
            failure,
            retryable,
            delivery,
            overload: false,
        }
    }

    /// This verdict as a *shed* answer: the upstream refused the call because it was
    /// overloaded, did not process it, and said so ([`OVERLOADED`]).
    ///
    /// A shed answer is not a failure: the upstream is busy, not broken. A breaker counts it
    /// neither way (Finagle's failure accrual ignores nacks the same way), so a server that
    /// sheds load does not get every caller's breaker opened against it for the open time,
    /// which would turn a brief overload into an outage. A balancer still sends that
    /// endpoint's next calls elsewhere for a while, without counting the answer towards
    /// ejection; an adaptive limit or throttle still learns from its status. Whether it is
    /// retried is decided by its status, as for any answer (`503` is retryable, and only for
    /// idempotent requests; [`Class::is_failed_attempt`] keeps the status's verdict).
    ///
    /// ```
    /// use steadfast_core::{Class, Delivery};
    ///
    /// let shed = Class::new(true, true, Delivery::Answered).overloaded();
    /// assert!(shed.is_overload() && !shed.is_failure() && shed.is_retryable());
    /// assert!(shed.is_failed_attempt());
    /// assert!(!Class::SUCCESS.is_overload());
    /// ```
    #[must_use]
    pub const fn overloaded(mut self) -> Self {
        self.overload = true;
        self
    }

    /// Whether the call counts against the upstream's health (breaker input): a failure by
    /// its status or error, unless the upstream shed it ([`Class::is_overload`]).
    pub const fn is_failure(self) -> bool {
        self.failure && !self.overload
    }

    /// Whether the attempt failed by its status or error alone, shed or not: what a retry
    /// decides on. A shed `500` is a failed attempt (a retry predicate may retry it, gRPC's
    /// retry throttling counts it) though no failure of the upstream's health.
    ///
    /// ```
    /// use steadfast_core::{Class, Delivery};
    ///
    /// let shed_500 = Class::new(true, false, Delivery::Answered).overloaded();
    /// assert!(shed_500.is_failed_attempt() && !shed_500.is_failure());
    /// assert!(!Class::SUCCESS.overloaded().is_failed_attempt());
    /// ```
    pub const fn is_failed_attempt(self) -> bool {
        self.failure
    }

    /// Whether another attempt may succeed. Whether one is *allowed* also depends on the
    /// request (idempotency) and [`Class::delivery`]; that is the retry layer's decision.
    pub const fn is_retryable(self) -> bool {
        self.retryable
    }

    /// How far the request got.
    pub const fn delivery(self) -> Delivery {
        self.delivery
    }

    /// Whether the upstream shed the call: see [`Class::overloaded`].
    pub const fn is_overload(self) -> bool {
        self.overload
    }
}

/// `x-envoy-overloaded`: the response header that marks an answer an overloaded server (or
/// proxy) gave instead of processing the request.
///
/// Envoy sets it when it sheds a request (its circuit breakers' connection and pending-request
/// limits, its overload manager) and never retries an answer that carries it. steadfast's
/// shedding answers set it too (`steadfast-limit`'s answering limit and throttle), and
/// [`DefaultClassifier`] classifies an error answer that carries it as shed
/// ([`Class::overloaded`]) unless told not to ([`DefaultClassifier::honour_overloaded`]).
/// Any value counts; only its presence matters, in the response's head (a gRPC status that
/// arrives in trailers after a body is classified by its code alone: a shedding server answers
/// trailers-only).
pub const OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");

/// A response's classification: known from its head, or only at end of stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseClass {
    /// The head decides.
    Ready(Class),
    /// A gRPC response whose status arrives in the trailers: classify the end of the body
    /// with this classifier (see [`GrpcClassifier::classify_frame`]).
    Deferred(GrpcClassifier),
}

/// How a resilience layer learns what an outcome means.
///
/// Implemented by [`DefaultClassifier`] (HTTP status, gRPC status, transport errors) and by any
/// closure `Fn(Result<&Res, &(dyn Error + 'static)>) -> Class`:
///
/// ```
/// use std::error::Error;
/// use steadfast_core::{Class, Classify, Delivery, ResponseClass};
///
/// // A service answering plain numbers: negative means "overloaded, try again".
/// let classify = |outcome: Result<&i32, &(dyn Error + 'static)>| match outcome {
///     Ok(n) if *n < 0 => Class::new(true, true, Delivery::Answered),
///     Ok(_) => Class::SUCCESS,
///     Err(_) => Class::new(true, true, Delivery::MaybeSent),
/// };
/// assert_eq!(classify.classify_response(&-1), ResponseClass::Ready(Class::new(true, true, Delivery::Answered)));
/// ```
pub trait Classify<Res> {
    /// Classifies a response.
    fn classify_response(&self, res: &Res) -> ResponseClass;
    /// Classifies an error returned instead of a response. Walk [`Error::source`] to find
    /// the cause.
    fn classify_error(&self, err: &(dyn Error + 'static)) -> Class;
}

impl<F, Res> Classify<Res> for F
where
    F: Fn(Result<&Res, &(dyn Error + 'static)>) -> Class,
{
    fn classify_response(&self, res: &Res) -> ResponseClass {
        ResponseClass::Ready(self(Ok(res)))
    }

    fn classify_error(&self, err: &(dyn Error + 'static)) -> Class {
        self(Err(err))
    }
}

/// A set of HTTP status codes (100-999) as a fixed bit set; `const`-constructible, no heap.
///
/// ```
/// use http::StatusCode;
/// use steadfast_core::StatusSet;
///
/// let set = StatusSet::EMPTY.with_range(500, 599).without(501);
/// assert!(set.contains(StatusCode::BAD_GATEWAY));
/// assert!(!set.contains(StatusCode::NOT_IMPLEMENTED));
/// assert!(!set.contains(StatusCode::NOT_FOUND));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct StatusSet([u64; 16]);

impl StatusSet {
    /// No status.
    pub const EMPTY: Self = Self([0; 16]);
    /// 500-599.
    pub const SERVER_ERRORS: Self = Self::EMPTY.with_range(500, 599);
    /// 429, 502, 503, 504: the seed's and Envoy's retriable statuses.
    pub const RETRYABLE: Self = Self::of(&[429, 502, 503, 504]);

    /// The set with `code` added; codes outside 100-999 are ignored.
    #[must_use]
    pub const fn with(mut self, code: u16) -> Self {
        if code >= 100 && code <= 999 {
            self.0[(code / 64) as usize] |= 1 << (code % 64);
        }
        self
    }

    /// The set with `code` removed.
    #[must_use]
    pub const fn without(mut self, code: u16) -> Self {
        if code >= 100 && code <= 999 {
            self.0[(code / 64) as usize] &= !(1 << (code % 64));
        }
        self
    }

    /// The set with every code in `from..=to` added.
    #[must_use]
    pub const fn with_range(mut self, from: u16, to: u16) -> Self {
        let mut c = from;
        while c <= to && c <= 999 {
            self = self.with(c);
            c += 1;
        }
        self
    }

    /// A set holding exactly `codes`.
    pub const fn of(codes: &[u16]) -> Self {
        let mut set = Self::EMPTY;
        let mut i = 0;
        while i < codes.len() {
            set = set.with(codes[i]);
            i += 1;
        }
        set
    }

    /// Whether `status` is in the set.
    #[inline]
    pub const fn contains(&self, status: StatusCode) -> bool {
        self.contains_u16(status.as_u16())
    }

    /// Whether the numeric `code` is in the set.
    #[inline]
    pub const fn contains_u16(&self, code: u16) -> bool {
        code >= 100 && code <= 999 && self.0[(code / 64) as usize] & (1 << (code % 64)) != 0
    }
}

/// HTTP status classification: which statuses are failures, which are retryable.
///
/// Defaults: failures are 5xx; retryable are 429, 502, 503 and 504 (the seed's list, Envoy's
/// `retriable-status-codes` usage). 4xx is the caller's fault, so not a failure; 429 is still
/// retryable because the server asked the caller to come back.
///
/// ```
/// use http::StatusCode;
/// use steadfast_core::{HttpClassifier, StatusSet};
///
/// let c = HttpClassifier::new().retryable(StatusSet::RETRYABLE.with(500));
/// assert!(c.classify(StatusCode::INTERNAL_SERVER_ERROR).is_retryable());
/// assert!(!c.classify(StatusCode::NOT_FOUND).is_failure());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HttpClassifier {
    failure: StatusSet,
    retryable: StatusSet,
}

impl Default for HttpClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClassifier {
    /// The defaults: failure = 5xx, retryable = 429/502/503/504.
    pub const fn new() -> Self {
        Self {
            failure: StatusSet::SERVER_ERRORS,
            retryable: StatusSet::RETRYABLE,
        }
    }

    /// Sets which statuses count as failures.
    #[must_use]
    pub const fn failure(mut self, set: StatusSet) -> Self {
        self.failure = set;
        self
    }

    /// Sets which statuses are retryable.
    #[must_use]
    pub const fn retryable(mut self, set: StatusSet) -> Self {
        self.retryable = set;
        self
    }

    /// Classifies a status.
    #[inline]
    pub const fn classify(&self, status: StatusCode) -> Class {
        Class::new(
            self.failure.contains(status),
            self.retryable.contains(status),
            Delivery::Answered,
        )
    }
}

/// gRPC status classification.
///
/// Defaults: failures are UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN and DATA_LOSS (the
/// server's health, not the caller's mistake); retryable is UNAVAILABLE only, as gRPC's retry
/// design (A6) recommends.
///
/// ```
/// use steadfast_core::{GrpcClassifier, GrpcCode};
///
/// let c = GrpcClassifier::new();
/// assert!(c.classify(GrpcCode::Unavailable).is_retryable());
/// assert!(c.classify(GrpcCode::Internal).is_failure());
/// assert!(!c.classify(GrpcCode::NotFound).is_failure());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrpcClassifier {
    failure: GrpcCodeSet,
    retryable: GrpcCodeSet,
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcClassifier {
    /// Default failure codes.
    pub const DEFAULT_FAILURE: GrpcCodeSet = GrpcCodeSet::of(&[
        GrpcCode::Unavailable,
        GrpcCode::DeadlineExceeded,
        GrpcCode::Internal,
        GrpcCode::Unknown,
        GrpcCode::DataLoss,
    ]);
    /// Default retryable codes.
    pub const DEFAULT_RETRYABLE: GrpcCodeSet = GrpcCodeSet::of(&[GrpcCode::Unavailable]);

    /// The defaults.
    pub const fn new() -> Self {
        Self {
            failure: Self::DEFAULT_FAILURE,
            retryable: Self::DEFAULT_RETRYABLE,
        }
    }

    /// Sets which codes count as failures.
    #[must_use]
    pub const fn failure(mut self, set: GrpcCodeSet) -> Self {
        self.failure = set;
        self
    }

    /// Sets which codes are retryable.
    #[must_use]
    pub const fn retryable(mut self, set: GrpcCodeSet) -> Self {
        self.retryable = set;
        self
    }

    /// Classifies a code.
    pub const fn classify(&self, code: GrpcCode) -> Class {
        Class::new(
            self.failure.contains(code),
            self.retryable.contains(code),
            Delivery::Answered,
        )
    }

    /// Classifies the end of a gRPC response body from its trailers. A stream that ends
    /// without a `grpc-status` is classified as UNKNOWN, as gRPC clients report it.
    pub fn classify_trailers(&self, trailers: Option<&HeaderMap>) -> Class {
        let code = trailers
            .and_then(GrpcCode::from_map)
            .unwrap_or(GrpcCode::Unknown);
        self.classify(code)
    }

    /// The verdict a body frame, as `poll_frame` returned it, carries: the trailers' status,
    /// UNKNOWN at an end of stream without trailers, a failure for a body error, and `None`
    /// for a data frame (no verdict yet).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body::Frame;
    /// use steadfast_core::GrpcClassifier;
    ///
    /// let c = GrpcClassifier::new();
    /// let data: Result<Frame<Bytes>, std::io::Error> = Ok(Frame::data(Bytes::new()));
    /// assert_eq!(c.classify_frame(Some(&data)), None);
    /// let mut t = http::HeaderMap::new();
    /// t.insert("grpc-status", "0".parse().unwrap());
    /// let trailers: Result<Frame<Bytes>, std::io::Error> = Ok(Frame::trailers(t));
    /// assert!(!c.classify_frame(Some(&trailers)).unwrap().is_failure());
    /// assert!(c.classify_frame::<Bytes, std::io::Error>(None).unwrap().is_failure());
    /// ```
    pub fn classify_frame<D, E>(&self, frame: Option<&Result<Frame<D>, E>>) -> Option<Class> {
        match frame {
            Some(Ok(f)) => f.trailers_ref().map(|t| self.classify_trailers(Some(t))),
            Some(Err(_)) => Some(Class::new(true, true, Delivery::Answered)),
            None => Some(self.classify_trailers(None)),
        }
    }
}

/// Whether a header map declares a gRPC content type.
#[inline]
pub fn is_grpc_content_type(headers: &HeaderMap) -> bool {
    headers.get(&CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.as_bytes();
        ct.len() >= 16
            && ct[..16].eq_ignore_ascii_case(b"application/grpc")
            && (ct.len() == 16 || matches!(ct[16], b'+' | b';'))
    })
}

/// The classification used by default everywhere: HTTP status for HTTP, `grpc-status` for
/// gRPC (headers of a trailers-only response, else trailers via [`ResponseClass::Deferred`]),
/// and transport errors by how far the request got.
///
/// ```
/// use http::{Response, StatusCode};
/// use steadfast_core::{Classify, DefaultClassifier, ResponseClass};
///
/// let c = DefaultClassifier::new();
/// let res = Response::builder().status(503).body(()).unwrap();
/// let ResponseClass::Ready(class) = c.classify_response(&res) else { unreachable!() };
/// assert!(class.is_failure() && class.is_retryable());
///
/// // gRPC, trailers-only: the status is in the headers.
/// let res = Response::builder()
///     .header("content-type", "application/grpc")
///     .header("grpc-status", "14")
///     .body(())
///     .unwrap();
/// assert!(matches!(c.classify_response(&res), ResponseClass::Ready(c) if c.is_retryable()));
///
/// // gRPC, streamed: the status comes in the trailers.
/// let res = Response::builder().header("content-type", "application/grpc").body(()).unwrap();
/// assert!(matches!(c.classify_response(&res), ResponseClass::Deferred(_)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DefaultClassifier {
    http: HttpClassifier,
    grpc: GrpcClassifier,
    honour_overloaded: bool,
}

impl Default for DefaultClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl DefaultClassifier {
    /// The defaults of [`HttpClassifier`] and [`GrpcClassifier`].
    pub const fn new() -> Self {
        Self {
            http: HttpClassifier::new(),
            grpc: GrpcClassifier::new(),
            honour_overloaded: true,
        }
    }

    /// Whether an error answer (status 400 or more, or a trailers-only gRPC status other than
    /// OK) that carries [`OVERLOADED`] is classified as shed ([`Class::overloaded`]): not a
    /// failure, so breakers do not count it. On by default; turn it off to count such answers
    /// by their status alone, as resilience4j and Polly do, for instance when the upstream is
    /// not trusted to use the header honestly (an upstream that marks every error cannot open
    /// a breaker against itself, though balancers still avoid it and limits still learn).
    ///
    /// ```
    /// use http::Response;
    /// use steadfast_core::{Classify, DefaultClassifier, ResponseClass};
    ///
    /// let shed = Response::builder()
    ///     .status(503)
    ///     .header("x-envoy-overloaded", "true")
    ///     .body(())
    ///     .unwrap();
    /// let ResponseClass::Ready(c) = DefaultClassifier::new().classify_response(&shed) else { unreachable!() };
    /// assert!(c.is_overload() && !c.is_failure() && c.is_retryable());
    ///
    /// let strict = DefaultClassifier::new().honour_overloaded(false);
    /// let ResponseClass::Ready(c) = strict.classify_response(&shed) else { unreachable!() };
    /// assert!(!c.is_overload() && c.is_failure());
    /// ```
    #[must_use]
    pub const fn honour_overloaded(mut self, on: bool) -> Self {
        self.honour_overloaded = on;
        self
    }

    /// Replaces the HTTP status classification.
    #[must_use]
    pub const fn http(mut self, http: HttpClassifier) -> Self {
        self.http = http;
        self
    }

    /// Replaces the gRPC status classification.
    #[must_use]
    pub const fn grpc(mut self, grpc: GrpcClassifier) -> Self {
        self.grpc = grpc;
        self
    }

    /// The HTTP part.
    pub const fn http_classifier(&self) -> &HttpClassifier {
        &self.http
    }

    /// The gRPC part.
    pub const fn grpc_classifier(&self) -> &GrpcClassifier {
        &self.grpc
    }
}

impl<B> Classify<Response<B>> for DefaultClassifier {
    #[inline]
    fn classify_response(&self, res: &Response<B>) -> ResponseClass {
        let headers = res.headers();
        // Plain HTTP first: one lookup of a standard header, no custom-name hashing.
        if !is_grpc_content_type(headers) {
            let class = self.http.classify(res.status());
            // The shed marker is looked for on error answers only: none on a success's path.
            if res.status().as_u16() >= 400 {
                return ResponseClass::Ready(self.shed(class, headers));
            }
            return ResponseClass::Ready(class);
        }
        if let Some(code) = GrpcCode::from_map(headers) {
            // Trailers-only gRPC response: the status is in the head.
            let class = self.grpc.classify(code);
            if code != GrpcCode::Ok {
                return ResponseClass::Ready(self.shed(class, headers));
            }
            return ResponseClass::Ready(class);
        }
        if res.status() == StatusCode::OK {
            return ResponseClass::Deferred(self.grpc);
        }
        let class = self
            .grpc
            .classify(GrpcCode::from_http_status(res.status().as_u16()));
        if res.status().as_u16() >= 400 {
            // A proxy's error answer to a gRPC call, no gRPC status of its own.
            return ResponseClass::Ready(self.shed(class, headers));
        }
        ResponseClass::Ready(class)
    }

    fn classify_error(&self, err: &(dyn Error + 'static)) -> Class {
        classify_transport_error(err)
    }
}

impl DefaultClassifier {
    /// `class`, as shed when the head says so and the marker is honoured.
    #[cold]
    fn shed(&self, class: Class, headers: &HeaderMap) -> Class {
        if self.honour_overloaded && headers.contains_key(OVERLOADED) {
            class.overloaded()
        } else {
            class
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ready(c: ResponseClass) -> Class {
        match c {
            ResponseClass::Ready(c) => c,
            ResponseClass::Deferred(_) => panic!("deferred"),
        }
    }

    #[test]
    fn http_defaults() {
        let c = DefaultClassifier::new();
        for code in 100..=599u16 {
            let res = Response::builder().status(code).body(()).unwrap();
            let class = ready(c.classify_response(&res));
            assert_eq!(class.is_failure(), code >= 500, "{code}");
            assert_eq!(
                class.is_retryable(),
                matches!(code, 429 | 502 | 503 | 504),
                "{code}"
            );
            assert_eq!(class.delivery(), Delivery::Answered);
        }
    }

    #[test]
    fn shed_marker_on_error_answers_only() {
        let c = DefaultClassifier::new();
        for code in 100..=599u16 {
            for value in ["true", "", "anything"] {
                let res = Response::builder()
                    .status(code)
                    .header("X-Envoy-Overloaded", value)
                    .body(())
                    .unwrap();
                let class = ready(c.classify_response(&res));
                assert_eq!(class.is_overload(), code >= 400, "{code}");
                assert!(!class.is_failure() || code < 400, "{code}");
                // The status's own verdict stays for a retry to read.
                assert_eq!(class.is_failed_attempt(), code >= 500, "{code}");
                assert_eq!(
                    class.is_retryable(),
                    matches!(code, 429 | 502 | 503 | 504),
                    "{code}"
                );
            }
        }
        // Turned off, the status alone decides.
        let strict = DefaultClassifier::new().honour_overloaded(false);
        let res = Response::builder()
            .status(503)
            .header(OVERLOADED, "true")
            .body(())
            .unwrap();
        let class = ready(strict.classify_response(&res));
        assert!(class.is_failure() && !class.is_overload());
    }

    #[test]
    fn shed_marker_in_a_trailers_only_grpc_head() {
        let c = DefaultClassifier::new();
        let head = |code: &'static str, marked: bool| {
            let mut b = Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", code);
            if marked {
                b = b.header(OVERLOADED, "true");
            }
            b.body(()).unwrap()
        };
        assert!(ready(c.classify_response(&head("8", true))).is_overload());
        let unavailable = ready(c.classify_response(&head("14", true)));
        assert!(unavailable.is_overload() && !unavailable.is_failure());
        assert!(unavailable.is_retryable());
        assert!(!ready(c.classify_response(&head("0", true))).is_overload());
        assert!(ready(c.classify_response(&head("14", false))).is_failure());
        // A proxy's marked 503 to a gRPC call, with no gRPC status: shed.
        let proxied = Response::builder()
            .status(503)
            .header("content-type", "application/grpc")
            .header(OVERLOADED, "true")
            .body(())
            .unwrap();
        let class = ready(c.classify_response(&proxied));
        assert!(class.is_overload() && !class.is_failure() && class.is_failed_attempt());
        // A streamed answer's head: the trailers decide, by code alone.
        let streamed = Response::builder()
            .header("content-type", "application/grpc")
            .header(OVERLOADED, "true")
            .body(())
            .unwrap();
        assert!(matches!(
            c.classify_response(&streamed),
            ResponseClass::Deferred(_)
        ));
    }

    #[test]
    fn configurable_http_sets() {
        let c = DefaultClassifier::new().http(
            HttpClassifier::new()
                .failure(StatusSet::SERVER_ERRORS.with(408))
                .retryable(StatusSet::of(&[503])),
        );
        let res = Response::builder().status(408).body(()).unwrap();
        assert!(ready(c.classify_response(&res)).is_failure());
        let res = Response::builder().status(502).body(()).unwrap();
        assert!(!ready(c.classify_response(&res)).is_retryable());
    }

    #[test]
    fn grpc_trailers_only_and_deferred() {
        let c = DefaultClassifier::new();
        let res = Response::builder()
            .header("content-type", "application/grpc+proto")
            .header("grpc-status", "0")
            .body(())
            .unwrap();
        assert_eq!(ready(c.classify_response(&res)), Class::SUCCESS);
        let res = Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "garbage")
            .body(())
            .unwrap();
        let class = ready(c.classify_response(&res));
        assert!(class.is_failure() && !class.is_retryable(), "UNKNOWN");
        let res = Response::builder()
            .status(503)
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let class = ready(c.classify_response(&res));
        assert!(
            class.is_failure() && class.is_retryable(),
            "503 maps to UNAVAILABLE"
        );
        let res = Response::builder()
            .header("content-type", "application/grpc-web")
            .body(())
            .unwrap();
        assert!(!is_grpc_content_type(res.headers()), "grpc-web is not grpc");
    }

    #[test]
    fn grpc_default_sets() {
        let g = GrpcClassifier::new();
        for n in 0..=16 {
            let code = GrpcCode::from_i32(n);
            let class = g.classify(code);
            assert_eq!(
                class.is_failure(),
                matches!(
                    code,
                    GrpcCode::Unavailable
                        | GrpcCode::DeadlineExceeded
                        | GrpcCode::Internal
                        | GrpcCode::Unknown
                        | GrpcCode::DataLoss
                ),
                "{code}"
            );
            assert_eq!(class.is_retryable(), code == GrpcCode::Unavailable);
        }
        assert!(g.classify_trailers(None).is_failure(), "missing status");
    }

    #[test]
    fn closures_classify() {
        let f = |o: Result<&u8, &(dyn Error + 'static)>| {
            if o.is_ok() {
                Class::SUCCESS
            } else {
                Class::new(true, false, Delivery::MaybeSent)
            }
        };
        assert_eq!(
            Classify::<u8>::classify_response(&f, &1),
            ResponseClass::Ready(Class::SUCCESS)
        );
        let e = std::io::Error::other("x");
        assert!(Classify::<u8>::classify_error(&f, &e).is_failure());
    }

    proptest! {
        #[test]
        fn status_set_is_exact(codes in proptest::collection::vec(0u16..1100, 0..40), probe in 0u16..1100) {
            let set = StatusSet::of(&codes);
            let expected = (100..=999).contains(&probe) && codes.contains(&probe);
            prop_assert_eq!(set.contains_u16(probe), expected);
        }
    }
}
