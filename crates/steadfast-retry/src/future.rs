//! The response future of [`Retry`](crate::Retry).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use steadfast_core::{BoxError, Classify, Deadline, is_grpc_content_type};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::error::NotReadyByDeadline;
use crate::header::GRPC_PREVIOUS_ATTEMPTS;
use crate::policy::{History, Verdict, decide};
use crate::replay::ReplayBody;
use crate::service::Shared;

pub use crate::hedge::future::HedgeFuture;

/// What a retrying call keeps between attempts.
pub(crate) struct Ctx<S, B, C> {
    /// The service later attempts go through, cloned from the shared copy at the first retry
    /// (boxed: a future is moved through every layer above, and most calls never need it).
    pub(crate) service: Option<Box<S>>,
    pub(crate) parts: Parts,
    pub(crate) body: ReplayBody<B>,
    /// The body for the next attempt, taken when the retry was decided.
    pub(crate) next_body: Option<ReplayBody<B>>,
    pub(crate) shared: Arc<Shared<S, C>>,
    pub(crate) history: History,
    /// A budget token is held for a retry decided but not sent yet.
    pub(crate) reserved: bool,
    /// The attempt decided next replaces one an endpoint refused (it is no retry).
    pub(crate) next_is_reroute: bool,
}

impl<S, B, C> Drop for Ctx<S, B, C> {
    fn drop(&mut self) {
        if self.reserved {
            if let Some(budget) = &self.shared.config.budget {
                budget.refund();
            }
        }
    }
}

pin_project! {
    /// The response future of [`Retry`](crate::Retry).
    pub struct ResponseFuture<F, S, B, C> {
        #[pin]
        state: State<F>,
        ctx: Option<Ctx<S, B, C>>,
        // The running attempt's span (see `attempt_span`).
        span: tracing::Span,
    }
}

/// The span of one attempt, a child of the span current when the call was made: named
/// `attempt` (`otel.name` is the method, `otel.kind` client), with OpenTelemetry's HTTP
/// client attribute names. `http.request.resend_count` is set on resends only, the status
/// and `error.type` when the attempt ends. With no subscriber (or the level filtered out)
/// it is a disabled span: nothing is recorded or allocated.
pub(crate) fn attempt_span(parts: &Parts, resend: u32) -> tracing::Span {
    let span = tracing::info_span!(
        target: "steadfast::retry",
        "attempt",
        otel.name = parts.method.as_str(),
        otel.kind = "client",
        http.request.method = parts.method.as_str(),
        server.address = parts.uri.host(),
        server.port = parts.uri.port_u16(),
        url.full = tracing::field::display(Redacted(&parts.uri)),
        http.request.resend_count = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if resend > 0 {
        span.record("http.request.resend_count", resend);
    }
    span
}

/// A URI as OpenTelemetry's `url.full` may carry it: credentials in its userinfo become
/// `REDACTED:REDACTED`, and the values of the query parameters the convention names as
/// signatures or keys (`AWSAccessKeyId`, `Signature`, `sig`, `X-Goog-Signature`) become
/// `REDACTED`. Written only when a subscriber records the span.
struct Redacted<'a>(&'a http::Uri);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SECRET_PARAMS: [&str; 4] = ["AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"];
        let uri = self.0;
        if let Some(scheme) = uri.scheme_str() {
            write!(f, "{scheme}://")?;
        }
        if let Some(authority) = uri.authority() {
            let host_port = match authority.as_str().rsplit_once('@') {
                Some((_, rest)) => {
                    f.write_str("REDACTED:REDACTED@")?;
                    rest
                }
                None => authority.as_str(),
            };
            f.write_str(host_port)?;
        }
        f.write_str(uri.path())?;
        let Some(query) = uri.query() else {
            return Ok(());
        };
        f.write_str("?")?;
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            match pair.split_once('=') {
                Some((name, _)) if SECRET_PARAMS.contains(&name) => {
                    write!(f, "{name}=REDACTED")?;
                }
                _ => f.write_str(pair)?,
            }
        }
        Ok(())
    }
}

/// Writes an attempt's outcome into its span.
pub(crate) fn record_outcome<ResB>(span: &tracing::Span, out: &Result<Response<ResB>, BoxError>) {
    if span.is_disabled() {
        return;
    }
    match out {
        Ok(res) => {
            let status = res.status();
            span.record("http.response.status_code", status.as_u16());
            if status.is_client_error() || status.is_server_error() {
                span.record("error.type", status.as_str());
            }
        }
        Err(e) => {
            span.record("error.type", steadfast_core::error_type(&**e));
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            fut: F,
        },
        Waiting {
            sleep: Pin<Box<Sleep>>,
        },
        // Waiting for the service below to take the next attempt; `sleep`, armed once it is
        // not ready, ends the wait at the call's deadline.
        Ready {
            sleep: Option<Pin<Box<Sleep>>>,
            // The deadline passed at an earlier poll.
            passed: bool,
        },
    }
}

impl<F, S, B, C> fmt::Debug for ResponseFuture<F, S, B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempt", &self.ctx.as_ref().map(|c| c.history.attempt))
            .finish_non_exhaustive()
    }
}

impl<F, S, B, C> ResponseFuture<F, S, B, C> {
    pub(crate) fn once(fut: F, span: tracing::Span) -> Self {
        Self {
            state: State::Called { fut },
            ctx: None,
            span,
        }
    }

    pub(crate) fn retrying(fut: F, ctx: Ctx<S, B, C>, span: tracing::Span) -> Self {
        Self {
            state: State::Called { fut },
            ctx: Some(ctx),
            span,
        }
    }
}

/// A header value for a small count without allocating (static for 0-9).
pub(crate) fn small_number(n: u32) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match DIGITS.get(n as usize) {
        Some(d) => HeaderValue::from_static(d),
        None => HeaderValue::from(n),
    }
}

enum Step<T> {
    Return(T),
    Wait(Duration),
}

impl<S, B, C> Ctx<S, B, C> {
    fn give_up<T>(&self, out: T, reason: &'static str) -> Step<T> {
        #[cfg(feature = "metrics")]
        metrics::counter!("steadfast_retry_gave_up_total", "retry" => self.label(), "reason" => reason)
            .increment(1);
        tracing::event!(
            name: "retry.gave_up",
            target: "steadfast::retry",
            tracing::Level::DEBUG,
            retry = &*self.shared.config.name,
            attempt = self.history.attempt,
            reason,
        );
        Step::Return(out)
    }

    /// The `retry` label: the layer's name.
    #[cfg(feature = "metrics")]
    fn label(&self) -> metrics::SharedString {
        metrics::SharedString::from(self.shared.config.name.clone())
    }

    /// Counts the attempt just sent: a retry, or the replacement of a refused one.
    #[cfg(feature = "metrics")]
    fn count_sent(&self) {
        if self.next_is_reroute {
            metrics::counter!("steadfast_retry_rerouted_total", "retry" => self.label())
                .increment(1);
        } else {
            metrics::counter!("steadfast_retry_attempts_total", "retry" => self.label())
                .increment(1);
        }
    }

    /// The budget's level, set whenever the budget is asked for a retry.
    #[cfg(feature = "metrics")]
    fn record_budget(&self) {
        if let Some(budget) = &self.shared.config.budget {
            metrics::gauge!("steadfast_retry_budget_tokens", "retry" => self.label())
                .set(budget.balance());
        }
    }

    /// Asks the policy, then takes what a retry needs that the policy does not own: the next
    /// body and a budget token.
    fn next_step<ResB>(
        &mut self,
        out: Result<Response<ResB>, BoxError>,
    ) -> Step<Result<Response<ResB>, BoxError>>
    where
        C: Classify<Response<ResB>>,
    {
        let config = &*self.shared.config;
        let (delay, from_hint, rerouted) =
            match decide(config, &self.parts, &mut self.history, &out, Instant::now) {
                Verdict::Done => return Step::Return(out),
                Verdict::GiveUp(reason) => return self.give_up(out, reason),
                Verdict::Retry {
                    delay,
                    from_hint,
                    rerouted,
                } => (delay, from_hint, rerouted),
            };
        let Some(next_body) = self.body.replay() else {
            return self.give_up(out, "body_not_replayable");
        };
        if rerouted {
            // Nothing left this process: another endpoint takes it at once, and the budget,
            // which limits load added to upstreams, is not asked.
            tracing::event!(
                name: "retry.rerouted",
                target: "steadfast::retry",
                tracing::Level::DEBUG,
                retry = &*config.name,
                // The refused attempt's number: its replacement takes it.
                attempt = self.history.attempt,
            );
            self.history.rerouted();
            self.next_is_reroute = true;
            next_body.supersede();
            self.next_body = Some(next_body);
            return Step::Wait(Duration::ZERO);
        }
        if let Some(budget) = &config.budget {
            let paid = budget.withdraw();
            #[cfg(feature = "metrics")]
            self.record_budget();
            if !paid {
                #[cfg(feature = "metrics")]
                metrics::counter!("steadfast_retry_budget_exhausted_total", "retry" => self.label())
                    .increment(1);
                tracing::event!(
                    name: "retry.budget_exhausted",
                    target: "steadfast::retry",
                    tracing::Level::INFO,
                    retry = &*config.name,
                    attempt = self.history.attempt,
                    "retry budget exhausted; returning the last outcome"
                );
                return Step::Return(out);
            }
        }
        tracing::event!(
            name: "retry.attempt",
            target: "steadfast::retry",
            tracing::Level::DEBUG,
            retry = &*config.name,
            attempt = self.history.attempt + 1,
            delay_ms = delay.as_millis() as u64,
            status = out.as_ref().ok().map(|r| r.status().as_u16()),
            error = out.is_err(),
            budget_left = config.budget.as_ref().map(|b| b.balance()),
        );
        #[cfg(feature = "metrics")]
        {
            // Every wait is one observation, a server's hint as much as a backoff.
            metrics::histogram!("steadfast_retry_backoff_seconds", "retry" => self.label(), "source" => if from_hint { "server_hint" } else { "backoff" })
                .record(delay.as_secs_f64());
        }
        self.history.retried(delay, from_hint);
        self.next_is_reroute = false;
        // The attempt before is answered: its transport must not read on from the caller's
        // body past what it holds, or the retry could lose the frames it needs.
        next_body.supersede();
        self.next_body = Some(next_body);
        // The token is spent only when the retry is sent: a caller that gives up during the
        // wait gets it back (see `Drop`).
        self.reserved = config.budget.is_some();
        Step::Wait(delay)
    }

    fn next_request(&mut self) -> Option<Request<ReplayBody<B>>> {
        let body = self.next_body.take()?;
        let attempt = self.history.attempt;
        let mut req = Request::from_parts(self.parts.clone(), body);
        let headers = req.headers_mut();
        if let Some(deadline) = self.history.deadline {
            // The head kept from the first attempt says the budget as it was then; a layer
            // below may rewrite it, but none need be there.
            steadfast_core::header::clamp_budgets(
                headers,
                deadline.remaining(),
                &steadfast_core::header::TIMEOUT_MS,
            );
        }
        if let Some(name) = &self.shared.config.attempt_header {
            headers.insert(name.clone(), small_number(attempt));
        }
        if is_grpc_content_type(headers) {
            headers.insert(GRPC_PREVIOUS_ATTEMPTS, small_number(attempt - 1));
        }
        Some(req)
    }
}

impl<F, S, B, C, ResB, E> Future for ResponseFuture<F, S, B, C>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    S: Service<Request<ReplayBody<B>>, Future = F, Response = Response<ResB>, Error = E> + Clone,
    B: Body<Data = Bytes>,
    C: Classify<Response<ResB>>,
{
    type Output = Result<Response<ResB>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { fut } => {
                    let out = {
                        let _attempt = this.span.enter();
                        ready!(fut.poll(cx)).map_err(Into::into)
                    };
                    record_outcome(this.span, &out);
                    let Some(ctx) = this.ctx.as_mut() else {
                        return Poll::Ready(out);
                    };
                    match ctx.next_step(out) {
                        Step::Return(out) => {
                            *this.ctx = None;
                            return Poll::Ready(out);
                        }
                        Step::Wait(d) if d.is_zero() => this.state.set(State::Ready {
                            sleep: None,
                            passed: false,
                        }),
                        Step::Wait(d) => this.state.set(State::Waiting {
                            sleep: Box::pin(tokio::time::sleep(d)),
                        }),
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Ready {
                        sleep: None,
                        passed: false,
                    });
                }
                StateProj::Ready { sleep, passed } => {
                    let ctx = this.ctx.as_mut().expect("retrying without a context");
                    if ctx.service.is_none() {
                        ctx.service = ctx.shared.spare.get().map(Box::new);
                    }
                    let service = ctx
                        .service
                        .as_mut()
                        .expect("the copy is made before a call can be retried");
                    // Re-poll readiness before every attempt, until the call's deadline.
                    let late = if let Poll::Ready(ready) = service.poll_ready(cx) {
                        ready.map_err(Into::into)?;
                        // Readiness that came at or after the deadline is too late: a retry
                        // is never sent past it (as a backoff ending there is never waited).
                        ctx.history.deadline.is_some_and(Deadline::is_expired)
                    } else {
                        let Some(deadline) = ctx.history.deadline else {
                            return Poll::Pending;
                        };
                        let sleep = sleep.get_or_insert_with(|| {
                            Box::pin(tokio::time::sleep_until(deadline.instant()))
                        });
                        ready!(sleep.as_mut().poll(cx));
                        true
                    };
                    if late {
                        if !*passed {
                            // A timeout above that owns this deadline (the client stack's
                            // total) is due now too, and is polled after this future: one
                            // more poll lets it report the call's end as its own.
                            *passed = true;
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        let attempt = ctx.history.attempt;
                        let _ = ctx.give_up((), "not_ready_by_deadline");
                        // Dropping the context gives back the token reserved for the retry.
                        *this.ctx = None;
                        return Poll::Ready(Err(NotReadyByDeadline::new(attempt).into()));
                    }
                    let req = ctx
                        .next_request()
                        .expect("a retry is only decided with the next body in hand");
                    *this.span = attempt_span(&ctx.parts, ctx.history.attempt - 1);
                    let fut = {
                        let _attempt = this.span.enter();
                        // The call's deadline, as it was when the first attempt was made
                        // (the layers below learn it as the ambient one, as they did then).
                        // With the instant: a timeout below then knows a steadfast layer
                        // above calls with the deadline in hand (see `Deadline::call_now`).
                        let _entered = ctx.history.deadline.map(|d| d.enter_at(Instant::now()));
                        let service = ctx.service.as_mut().expect("made ready above");
                        // A balancer below avoids the endpoints earlier attempts went to.
                        let mut tried = ctx.history.tried();
                        let entered = tried.enter();
                        let fut = service.call(req);
                        entered.leave(&mut tried);
                        ctx.history.keep_tried(tried);
                        fut
                    };
                    ctx.reserved = false;
                    #[cfg(feature = "metrics")]
                    ctx.count_sent();
                    this.state.set(State::Called { fut });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Redacted;

    fn shown(uri: &str) -> String {
        Redacted(&uri.parse().unwrap()).to_string()
    }

    #[test]
    fn url_full_never_carries_credentials_or_signatures() {
        assert_eq!(
            shown("http://alice:pw@orders:8080/p?token=t&sig=abc&Signature=x&a=1"),
            "http://REDACTED:REDACTED@orders:8080/p?token=t&sig=REDACTED&Signature=REDACTED&a=1"
        );
        assert_eq!(shown("http://orders/p"), "http://orders/p");
        assert_eq!(
            shown("https://a@b@orders/"),
            "https://REDACTED:REDACTED@orders/"
        );
        assert_eq!(shown("/only/a/path?x"), "/only/a/path?x");
        assert_eq!(shown("http://[::1]:80/?sig"), "http://[::1]:80/?sig");
    }
}
