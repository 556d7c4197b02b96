use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use steadfast_core::header::{Pushback, server_hint};
use steadfast_core::{
    BoxError, Class, Classify, Deadline, Delivery, GRPC_STATUS, PolicyRejected, ResponseClass,
    is_grpc_content_type, saturating_add,
};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::backoff::Rng;
use crate::layer::{ATTEMPT_HEADER, Config, GRPC_PREVIOUS_ATTEMPTS, IDEMPOTENCY_KEY};
use crate::replay::ReplayBody;

/// What a retrying call keeps between attempts.
pub(crate) struct Ctx<S, B, C> {
    pub(crate) service: S,
    pub(crate) parts: Parts,
    pub(crate) body: ReplayBody<B>,
    /// The body for the next attempt, taken when the retry was decided.
    pub(crate) next_body: Option<ReplayBody<B>>,
    pub(crate) config: Arc<Config<C>>,
    pub(crate) attempt: u32,
    pub(crate) started: Option<Instant>,
    pub(crate) deadline: Option<Deadline>,
    pub(crate) rng: Option<Rng>,
    pub(crate) previous_delay: Duration,
    /// Backoff waits since the last server hint (a hint restarts the schedule).
    pub(crate) backoffs: u32,
    /// A budget token is held for a retry decided but not sent yet.
    pub(crate) reserved: bool,
}

impl<S, B, C> Drop for Ctx<S, B, C> {
    fn drop(&mut self) {
        if self.reserved {
            if let Some(budget) = &self.config.budget {
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
        Ready,
    }
}

impl<F, S, B, C> fmt::Debug for ResponseFuture<F, S, B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempt", &self.ctx.as_ref().map(|c| c.attempt))
            .finish_non_exhaustive()
    }
}

impl<F, S, B, C> ResponseFuture<F, S, B, C> {
    pub(crate) fn once(fut: F) -> Self {
        Self {
            state: State::Called { fut },
            ctx: None,
        }
    }

    pub(crate) fn retrying(fut: F, ctx: Ctx<S, B, C>) -> Self {
        Self {
            state: State::Called { fut },
            ctx: Some(ctx),
        }
    }
}

/// A server's retry hint.
enum Hint {
    After(Duration),
    Stop,
}

fn hint<B>(res: &Response<B>) -> Option<Hint> {
    server_hint(res.headers(), SystemTime::now()).map(|p| match p {
        Pushback::After(d) => Hint::After(d),
        Pushback::Stop => Hint::Stop,
    })
}

/// A header value for a small count without allocating (static for 0-9).
fn small_number(n: u32) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match DIGITS.get(n as usize) {
        Some(d) => HeaderValue::from_static(d),
        None => HeaderValue::from(n),
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

enum Decision<T> {
    Return(T),
    Wait(Duration),
}

impl<S, B, C> Ctx<S, B, C> {
    fn give_up<T>(&self, out: T, reason: &'static str) -> Decision<T> {
        #[cfg(feature = "metrics")]
        metrics::counter!("steadfast_retry_gave_up_total", "reason" => reason).increment(1);
        tracing::event!(
            name: "retry.gave_up",
            target: "steadfast::retry",
            tracing::Level::DEBUG,
            attempt = self.attempt,
            reason,
        );
        Decision::Return(out)
    }

    fn decide<ResB>(
        &mut self,
        out: Result<Response<ResB>, BoxError>,
    ) -> Decision<Result<Response<ResB>, BoxError>>
    where
        C: Classify<Response<ResB>>,
    {
        let config = &*self.config;
        let class = match &out {
            Ok(res) => match config.classifier.classify_response(res) {
                ResponseClass::Ready(c) => c,
                // A streamed gRPC response whose head arrived is committed (gRPC A6).
                ResponseClass::Deferred(_) => return Decision::Return(out),
            },
            Err(e) => {
                if PolicyRejected::is_in(&**e) {
                    // Refused by a local policy (open breaker): not retried, costs no budget.
                    return self.give_up(out, "policy_rejected");
                }
                config.classifier.classify_error(&**e)
            }
        };
        if self.attempt >= config.max_attempts {
            if class.is_retryable() {
                return self.give_up(out, "attempts_exhausted");
            }
            return Decision::Return(out);
        }
        // A gRPC status the server answered with in the head (trailers-only): the one case
        // `retry_grpc_statuses` covers (not an HTTP status from a proxy on the way).
        let grpc_status = out.as_ref().is_ok_and(|r| {
            is_grpc_content_type(r.headers()) && r.headers().contains_key(&GRPC_STATUS)
        });
        let default = class.is_retryable() && self.safe_to_repeat(&class, grpc_status);
        let retry = match &config.predicate {
            Some(p) => p(&self.parts, &class).unwrap_or(default),
            None => default,
        };
        if !retry {
            if class.is_retryable() {
                return self.give_up(out, "not_idempotent");
            }
            return Decision::Return(out);
        }
        // Take the next attempt's body now: the check and the handle are one step.
        let Some(next_body) = self.body.replay() else {
            return self.give_up(out, "body_not_replayable");
        };
        // Read the server's hint only for an outcome that will be retried.
        let hint = out.as_ref().ok().and_then(hint);
        let mut from_hint = false;
        let delay = match hint {
            Some(Hint::Stop) => return self.give_up(out, "server_pushback_stop"),
            // Pinned 7: never sooner than asked, never longer than the cap.
            Some(Hint::After(d)) if d > config.max_hint => {
                return self.give_up(out, "server_hint_over_cap");
            }
            Some(Hint::After(d)) => {
                from_hint = true;
                d
            }
            None => {
                let rng = self.rng.get_or_insert_with(|| {
                    let stream = config.streams.fetch_add(1, Relaxed);
                    let mut mix =
                        Rng::seeded(config.seed ^ stream.wrapping_mul(steadfast_core::rand::STEP));
                    Rng::seeded(mix.next_u64())
                });
                // The backoff counts retries since the last server hint: a hint replaces
                // the schedule, which then starts again from its base.
                config
                    .backoff
                    .delay(self.backoffs + 1, self.previous_delay, rng)
            }
        };
        let ends = saturating_add(Instant::now(), delay);
        if self.deadline.is_some_and(|d| ends >= d.instant()) {
            return self.give_up(out, "deadline");
        }
        if let (Some(start), Some(total)) = (self.started, config.total) {
            if ends >= saturating_add(start, total) {
                return self.give_up(out, "total_timeout");
            }
        }
        if let Some(budget) = &config.budget {
            if !budget.withdraw() {
                #[cfg(feature = "metrics")]
                metrics::counter!("steadfast_retry_budget_exhausted_total").increment(1);
                tracing::event!(
                    name: "retry.budget_exhausted",
                    target: "steadfast::retry",
                    tracing::Level::INFO,
                    attempt = self.attempt,
                    "retry budget exhausted; returning the last outcome"
                );
                return Decision::Return(out);
            }
        }
        tracing::event!(
            name: "retry.attempt",
            target: "steadfast::retry",
            tracing::Level::DEBUG,
            attempt = self.attempt + 1,
            delay_ms = delay.as_millis() as u64,
            status = out.as_ref().ok().map(|r| r.status().as_u16()),
            error = out.is_err(),
            budget_left = config.budget.as_ref().map(|b| b.balance()),
        );
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("steadfast_retry_attempts_total").increment(1);
            metrics::histogram!("steadfast_retry_backoff_seconds").record(delay.as_secs_f64());
        }
        self.attempt += 1;
        if from_hint {
            self.backoffs = 0;
            self.previous_delay = Duration::ZERO;
        } else {
            self.backoffs += 1;
            self.previous_delay = delay;
        }
        self.next_body = Some(next_body);
        // The token is spent only when the retry is sent: a caller that gives up during the
        // wait gets it back (see `Drop`).
        self.reserved = config.budget.is_some();
        Decision::Wait(delay)
    }

    fn safe_to_repeat(&self, class: &Class, grpc_status: bool) -> bool {
        class.delivery() == Delivery::NotSent
            || idempotent(&self.parts.method)
            || self.parts.headers.contains_key(IDEMPOTENCY_KEY)
            || self.config.retry_non_idempotent
            || (self.config.grpc_statuses
                && grpc_status
                && class.delivery() == Delivery::Answered
                && is_grpc_content_type(&self.parts.headers))
    }

    fn next_request(&mut self) -> Option<Request<ReplayBody<B>>> {
        let body = self.next_body.take()?;
        let mut req = Request::from_parts(self.parts.clone(), body);
        let headers = req.headers_mut();
        headers.insert(ATTEMPT_HEADER, small_number(self.attempt));
        if is_grpc_content_type(headers) {
            headers.insert(GRPC_PREVIOUS_ATTEMPTS, small_number(self.attempt - 1));
        }
        Some(req)
    }
}

impl<F, S, B, C, ResB, E> Future for ResponseFuture<F, S, B, C>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    S: Service<Request<ReplayBody<B>>, Future = F, Response = Response<ResB>, Error = E>,
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
                    let out = ready!(fut.poll(cx)).map_err(Into::into);
                    let Some(ctx) = this.ctx.as_mut() else {
                        return Poll::Ready(out);
                    };
                    match ctx.decide(out) {
                        Decision::Return(out) => {
                            *this.ctx = None;
                            return Poll::Ready(out);
                        }
                        Decision::Wait(d) if d.is_zero() => this.state.set(State::Ready),
                        Decision::Wait(d) => this.state.set(State::Waiting {
                            sleep: Box::pin(tokio::time::sleep(d)),
                        }),
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let ctx = this.ctx.as_mut().expect("retrying without a context");
                    // Re-poll readiness before every attempt.
                    ready!(ctx.service.poll_ready(cx)).map_err(Into::into)?;
                    let req = ctx
                        .next_request()
                        .expect("a retry is only decided with the next body in hand");
                    let fut = ctx.service.call(req);
                    ctx.reserved = false;
                    this.state.set(State::Called { fut });
                }
            }
        }
    }
}
