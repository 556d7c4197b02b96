//! The retry decision for one outcome, apart from the future that drives the attempts.
//!
//! [`decide`] reads the outcome, the request head and what the call has done so far, and
//! says whether to hand the outcome to the caller or retry after a delay. It has no service,
//! body or budget: the future takes the next body and the budget token once the policy says
//! retry (both can still refuse), and keeps the events and metrics.

use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, Method, Response};
use steadfast_core::__private::Tried;
use steadfast_core::__private::rand::STEP;
use steadfast_core::header::{Pushback, server_hint};
use steadfast_core::{
    BoxError, Class, Classify, Deadline, Delivery, GRPC_STATUS, NotSent, PolicyRejected,
    ResponseClass, is_grpc_content_type, saturating_add,
};
use tokio::time::Instant;

use crate::backoff::Rng;
use crate::header::IDEMPOTENCY_KEY;
use crate::layer::Config;

/// What the policy says about one outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand the outcome to the caller: it is not one to retry.
    Done,
    /// Hand the outcome to the caller: it would be worth retrying, but `reason` forbids it.
    GiveUp(&'static str),
    /// Retry after `delay`; `from_hint` says a server's hint set it; `rerouted` says the
    /// attempt was refused before leaving this process by one endpoint and goes to another
    /// (no wait, no budget: it adds no load anywhere).
    Retry {
        delay: Duration,
        from_hint: bool,
        rerouted: bool,
    },
}

/// What one call has done so far, as the policy needs it.
#[derive(Debug)]
pub(crate) struct History {
    /// Attempts made, the current one included.
    pub(crate) attempt: u32,
    /// Backoff waits since the last server hint (a hint restarts the schedule).
    pub(crate) backoffs: u32,
    pub(crate) previous_delay: Duration,
    pub(crate) deadline: Option<Deadline>,
    /// The call's jitter stream, drawn from only when a backoff is needed.
    pub(crate) rng: Option<Rng>,
    /// Attempts refused before they left this process and sent again elsewhere: not counted
    /// in `attempt`, bounded by [`MAX_REROUTES`].
    pub(crate) reroutes: u32,
    /// The endpoints this call's attempts went to, when a balancer below recorded any, so
    /// that a retry goes to another while one is in service: the first attempt's alone
    /// inline (`0`: none), so that a call that is not retried allocates nothing; more, once
    /// retries add to it, boxed (a future is moved through every layer above).
    pub(crate) first_endpoint: u64,
    pub(crate) tried: Option<Box<Tried>>,
}

/// How many times one call is sent again because an endpoint refused it before it left this
/// process (its breaker open): such an attempt adds no load anywhere and does not count
/// against `max_attempts`, but a call stops being rerouted after this many. A balancer takes
/// an endpoint that refused out of service for its failure penalty, so one call meets each
/// refusing endpoint once at most: this many lets a call find the one healthy endpoint among
/// 64 refusing ones whose penalties ran out together.
pub(crate) const MAX_REROUTES: u32 = 64;

impl History {
    pub(crate) fn new(deadline: Option<Deadline>) -> Self {
        Self {
            attempt: 1,
            backoffs: 0,
            previous_delay: Duration::ZERO,
            deadline,
            rng: None,
            reroutes: 0,
            first_endpoint: 0,
            tried: None,
        }
    }

    /// Keeps what a balancer recorded in `tried` during an attempt's call, if anything.
    #[inline]
    pub(crate) fn keep_tried(&mut self, tried: Tried) {
        if tried.is_empty() {
            return;
        }
        match (&mut self.tried, tried.only()) {
            (Some(kept), _) => **kept = tried,
            (None, Some(id)) if id != 0 => self.first_endpoint = id,
            (None, _) => self.tried = Some(Box::new(tried)),
        }
    }

    /// The endpoints to avoid for the next attempt.
    #[inline]
    pub(crate) fn tried(&self) -> Tried {
        match (&self.tried, self.first_endpoint) {
            (Some(kept), _) => **kept,
            (None, 0) => Tried::default(),
            (None, id) => Tried::of(id),
        }
    }

    /// An attempt refused before it left the process goes to another endpoint: it takes the
    /// refused attempt's place (its number, no backoff, no budget).
    pub(crate) fn rerouted(&mut self) {
        self.reroutes += 1;
    }

    /// Records a retry the policy decided and the caller committed to.
    pub(crate) fn retried(&mut self, delay: Duration, from_hint: bool) {
        self.attempt += 1;
        if from_hint {
            self.backoffs = 0;
            self.previous_delay = Duration::ZERO;
        } else {
            self.backoffs += 1;
            self.previous_delay = delay;
        }
    }
}

pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// gRPC A6's client-side cap on attempts.
pub(crate) const GRPC_MAX_ATTEMPTS: u32 = 5;

/// Decides what to do with `out`, the outcome of attempt `history.attempt` of `request`.
/// `now` is read only when a retry is on the table (a clock read costs more than the rest of a
/// success's decision).
pub(crate) fn decide<C, B>(
    config: &Config<C>,
    request: &Parts,
    history: &mut History,
    out: &Result<Response<B>, BoxError>,
    now: impl FnOnce() -> Instant,
) -> Verdict
where
    C: Classify<Response<B>>,
{
    let class = match out {
        Ok(res) => match config.classifier.classify_response(res) {
            ResponseClass::Ready(c) => c,
            // A streamed gRPC response whose head arrived is committed (gRPC A6). Its status
            // comes in the trailers, which this layer does not read: the throttle counts it
            // a success (a trailers-only failure, the kind a retry is for, is judged above).
            ResponseClass::Deferred(_) => {
                if let Some(throttle) = &config.throttle {
                    throttle.succeeded();
                }
                return Verdict::Done;
            }
        },
        // Refused by a local policy (open breaker): not retried, costs no budget.
        Err(e) if PolicyRejected::is_in(&**e) => return Verdict::GiveUp("policy_rejected"),
        Err(e) => config.classifier.classify_error(&**e),
    };
    // Refused by one endpoint before anything was sent, to be sent to another (the balancer's
    // `Rerouted`): no upstream failed, so the throttle is not charged either.
    let rerouted = out.as_ref().is_err_and(|e| NotSent::is_in(&**e));
    // A retry decides by the status, shed or not (`is_failed_attempt`): an upstream that
    // sheds is spared a breaker's count, not a retry's rules.
    if let Some(throttle) = config.throttle.as_ref().filter(|_| !rerouted) {
        if !class.is_failed_attempt() {
            throttle.succeeded();
        } else if class.is_retryable() {
            throttle.failed();
        }
    }
    if !class.is_retryable() && !class.is_failed_attempt() {
        // A success, or the caller's own error: final whatever the attempt count, the
        // method or the predicate says (the common case, decided before any header is read).
        return Verdict::Done;
    }
    let headers = out.as_ref().ok().map(Response::headers);
    // gRPC A6: a client never makes more than 5 attempts, whatever its policy says.
    let max_attempts = if is_grpc_content_type(&request.headers) {
        config.max_attempts.min(GRPC_MAX_ATTEMPTS)
    } else {
        config.max_attempts
    };
    if rerouted {
        // The refused attempt never left: it is not one of the attempts `max_attempts`
        // counts, and its replacement takes its place.
        if history.reroutes >= MAX_REROUTES {
            return give_up_if_retryable(&class, "reroutes_exhausted");
        }
    } else if history.attempt >= max_attempts {
        return give_up_if_retryable(&class, "attempts_exhausted");
    }
    let safe = safe_to_repeat(config, request, &class, headers);
    match config
        .predicate
        .as_ref()
        .and_then(|p| p.retry(request, &class))
    {
        // The caller's say widens the retry to any failure and to requests the method rule
        // would keep, but a success or the caller's own error (2xx-4xx but 429) is final.
        Some(true) if class.is_retryable() || class.is_failed_attempt() => {}
        Some(_) => return give_up_if_retryable(&class, "predicate"),
        None if class.is_retryable() && safe => {}
        None => return give_up_if_retryable(&class, "not_idempotent"),
    }
    // A rerouted attempt is retried at once, and free of the budget.
    // Read the server's hint only for an outcome that will be retried.
    let hint = headers.and_then(|h| server_hint(h, (config.wall_clock)()));
    let (delay, from_hint) = match hint {
        _ if rerouted => (Duration::ZERO, false),
        Some(Pushback::Stop) => return Verdict::GiveUp("server_pushback_stop"),
        // Never sooner than asked, never longer than the cap.
        Some(Pushback::After(d)) if d > config.max_hint => {
            return Verdict::GiveUp("server_hint_over_cap");
        }
        Some(Pushback::After(d)) => (d, true),
        None => {
            let rng = history.rng.get_or_insert_with(|| jitter_stream(config));
            // The backoff counts retries since the last server hint: a hint replaces the
            // schedule, which then starts again from its base.
            let d = config
                .backoff
                .delay(history.backoffs + 1, history.previous_delay, rng);
            (d, false)
        }
    };
    if history
        .deadline
        .is_some_and(|d| saturating_add(now(), delay) >= d.instant())
    {
        return Verdict::GiveUp("deadline");
    }
    if !rerouted && config.throttle.as_ref().is_some_and(|t| !t.allows()) {
        return Verdict::GiveUp("throttled");
    }
    Verdict::Retry {
        delay,
        from_hint,
        rerouted,
    }
}

fn give_up_if_retryable(class: &Class, reason: &'static str) -> Verdict {
    if class.is_retryable() {
        Verdict::GiveUp(reason)
    } else {
        Verdict::Done
    }
}

/// Each call that backs off gets its own stream, derived from the layer's seed.
fn jitter_stream<C>(config: &Config<C>) -> Rng {
    let stream = config
        .streams
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut mix = Rng::seeded(config.seed ^ stream.wrapping_mul(STEP));
    Rng::seeded(mix.next_u64())
}

/// Whether sending `request` again cannot do harm the caller did not accept.
fn safe_to_repeat<C>(
    config: &Config<C>,
    request: &Parts,
    class: &Class,
    response: Option<&HeaderMap>,
) -> bool {
    // A gRPC status the server answered with in the head (trailers-only): the one case
    // `retry_grpc_statuses` covers (not an HTTP status from a proxy on the way).
    let grpc_status = || {
        response.is_some_and(|h| is_grpc_content_type(h) && h.contains_key(&GRPC_STATUS))
            && is_grpc_content_type(&request.headers)
    };
    class.delivery() == Delivery::NotSent
        || idempotent(&request.method)
        || request.headers.contains_key(IDEMPOTENCY_KEY)
        || config.retry_non_idempotent
        || (config.grpc_statuses && class.delivery() == Delivery::Answered && grpc_status())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{RetryBuilder, RetryLayer};

    fn config(b: RetryBuilder) -> std::sync::Arc<Config<steadfast_core::DefaultClassifier>> {
        b.seed(7).build().unwrap().config
    }

    fn parts(method: Method) -> Parts {
        http::Request::builder()
            .method(method)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn status(code: u16) -> Result<Response<()>, BoxError> {
        Ok(Response::builder().status(code).body(()).unwrap())
    }

    #[test]
    fn a_success_is_done() {
        let c = config(RetryLayer::builder());
        let mut h = History::new(None);
        let v = decide(&c, &parts(Method::GET), &mut h, &status(200), Instant::now);
        assert_eq!(v, Verdict::Done);
    }

    #[test]
    fn a_503_on_get_is_retried_after_the_backoff() {
        let c = config(RetryLayer::builder());
        let mut h = History::new(None);
        let v = decide(&c, &parts(Method::GET), &mut h, &status(503), Instant::now);
        assert!(
            matches!(v, Verdict::Retry { from_hint: false, delay, .. } if delay <= Duration::from_millis(100))
        );
    }

    #[test]
    fn a_503_on_post_is_not_retried() {
        let c = config(RetryLayer::builder());
        let mut h = History::new(None);
        let v = decide(&c, &parts(Method::POST), &mut h, &status(503), Instant::now);
        assert_eq!(v, Verdict::GiveUp("not_idempotent"));
    }

    #[test]
    fn the_last_attempt_gives_up() {
        let c = config(RetryLayer::builder().max_attempts(2));
        let mut h = History::new(None);
        h.retried(Duration::ZERO, false);
        let v = decide(&c, &parts(Method::GET), &mut h, &status(503), Instant::now);
        assert_eq!(v, Verdict::GiveUp("attempts_exhausted"));
    }

    #[test]
    fn a_retry_after_sets_the_delay_and_over_the_cap_gives_up() {
        let c = config(RetryLayer::builder().max_server_delay(Duration::from_secs(5)));
        let hinted = |secs: &str| -> Result<Response<()>, BoxError> {
            Ok(Response::builder()
                .status(503)
                .header("retry-after", secs)
                .body(())
                .unwrap())
        };
        let mut h = History::new(None);
        let v = decide(&c, &parts(Method::GET), &mut h, &hinted("2"), Instant::now);
        assert_eq!(
            v,
            Verdict::Retry {
                delay: Duration::from_secs(2),
                from_hint: true,
                rerouted: false,
            }
        );
        let v = decide(&c, &parts(Method::GET), &mut h, &hinted("6"), Instant::now);
        assert_eq!(v, Verdict::GiveUp("server_hint_over_cap"));
    }

    #[test]
    fn a_wait_that_ends_at_the_deadline_gives_up() {
        let c = config(
            RetryLayer::builder().backoff(
                crate::Backoff::new(Duration::from_secs(1), Duration::from_secs(1))
                    .jitter(crate::Jitter::None),
            ),
        );
        let now = Instant::now();
        let mut h = History::new(Some(Deadline::at(now + Duration::from_secs(1))));
        let v = decide(&c, &parts(Method::GET), &mut h, &status(503), || now);
        assert_eq!(v, Verdict::GiveUp("deadline"));
    }

    #[test]
    fn a_predicate_never_repeats_a_success_or_a_client_error() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        // Nor is it asked about them (its answer could not change the verdict).
        let asked = Arc::new(AtomicU32::new(0));
        let a = asked.clone();
        let c = config(
            RetryLayer::builder().predicate(move |_: &Parts, _: &Class| {
                a.fetch_add(1, Ordering::Relaxed);
                Some(true)
            }),
        );
        for code in [200, 201, 204, 304, 400, 404] {
            let mut h = History::new(None);
            let v = decide(
                &c,
                &parts(Method::POST),
                &mut h,
                &status(code),
                Instant::now,
            );
            assert_eq!(v, Verdict::Done, "{code}");
        }
        assert_eq!(asked.load(Ordering::Relaxed), 0);
        // A 500 on a POST: asked once, and its yes still widens the retry.
        let mut h = History::new(None);
        let v = decide(&c, &parts(Method::POST), &mut h, &status(500), Instant::now);
        assert!(matches!(v, Verdict::Retry { .. }), "{v:?}");
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        let c = config(RetryLayer::builder().predicate(|_: &Parts, _: &Class| Some(false)));
        let mut h = History::new(None);
        let v = decide(&c, &parts(Method::GET), &mut h, &status(503), Instant::now);
        assert_eq!(v, Verdict::GiveUp("predicate"));
    }

    #[test]
    fn the_predicate_overrides_the_method_rule() {
        let c = config(RetryLayer::builder().predicate(|_: &Parts, _: &Class| Some(true)));
        let mut h = History::new(None);
        let v = decide(&c, &parts(Method::POST), &mut h, &status(503), Instant::now);
        assert!(matches!(v, Verdict::Retry { .. }));
    }
}
