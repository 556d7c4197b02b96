//! The response future of [`Hedge`](crate::Hedge).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use steadfast_core::__private::Tried;
use steadfast_core::header::{Pushback, server_hint};
use steadfast_core::{
    BoxError, Classify, Deadline, NotSent, PolicyRejected, ResponseClass, is_grpc_content_type,
    saturating_add,
};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::service::Shared;
use crate::future::{attempt_span, small_number};
use crate::header::GRPC_PREVIOUS_ATTEMPTS;
use crate::policy::MAX_REROUTES;
use crate::replay::{ReplayBody, ReplayLost};

pin_project! {
    /// The response future of [`Hedge`](crate::Hedge).
    pub struct HedgeFuture<F, S, B, C, R> {
        #[pin]
        primary: Primary<F>,
        #[pin]
        timer: Timer,
        race: Option<Race<F, S, B, C, R>>,
    }
}

pin_project! {
    #[project = PrimaryProj]
    enum Primary<F> {
        Running { #[pin] fut: F },
        Done,
    }
}

pin_project! {
    #[project = TimerProj]
    enum Timer {
        Off,
        Armed { #[pin] sleep: Sleep },
    }
}

/// A hedge in flight.
struct Attempt<F> {
    fut: Pin<Box<F>>,
    sent: Instant,
    span: tracing::Span,
}

/// What a call that may be hedged keeps while its attempts run.
pub(crate) struct Race<F, S, B, C, R> {
    shared: Arc<Shared<S, C>>,
    parts: Parts,
    /// A reader of the recorded body, from which each hedge's body is made.
    body: ReplayBody<B>,
    /// The service hedges go through, cloned from the shared copy at the first hedge.
    service: Option<S>,
    /// When the first attempt was sent.
    started: Instant,
    hedges: Vec<Attempt<F>>,
    /// Attempts sent so far, the first included, not counting those that replaced an
    /// attempt an endpoint refused before sending it (`reroutes`).
    sent: u32,
    /// Attempts sent again because an endpoint refused them unsent: they take no attempt
    /// from `max_attempts`, at most [`MAX_REROUTES`] per call.
    reroutes: u32,
    /// When the next hedge goes (`None`: no more hedges for this call, or none yet known).
    next_at: Option<Instant>,
    /// The next attempt replaces one that an endpoint refused before sending it: it adds no
    /// load and is not paid for.
    free: bool,
    /// Tokens taken for a hedge that waits for its service to be ready.
    reserved: Reserved,
    /// The last retryable outcome, returned if no attempt answers better.
    last: Option<Result<R, BoxError>>,
    /// `last` was made here (a refusal by a layer below, a lost body), not by the upstream: a
    /// later answer from the upstream replaces it, not the other way round.
    last_is_local: bool,
    /// Hedging ended for this call (a refused share, a stop hint, a policy refusal): no later
    /// answer starts it again.
    stopped: bool,
    /// The next hedge is due and waits for its service to be ready.
    awaiting_service: bool,
    tried: Tried,
    deadline: Option<Deadline>,
}

#[derive(Clone, Copy, Default)]
struct Reserved {
    extra: bool,
    retry: bool,
}

impl<F, S, B, C, R> Drop for Race<F, S, B, C, R> {
    fn drop(&mut self) {
        let config = &self.shared.config;
        if self.reserved.extra {
            config.extra.refund();
        }
        if self.reserved.retry {
            if let Some(b) = &config.retry_budget {
                b.refund();
            }
        }
    }
}

impl<F, S, B, C, R> Race<F, S, B, C, R> {
    pub(crate) fn new(
        shared: Arc<Shared<S, C>>,
        parts: Parts,
        body: ReplayBody<B>,
        started: Instant,
        next_at: Option<Instant>,
        tried: Tried,
        deadline: Option<Deadline>,
    ) -> Self {
        Self {
            shared,
            parts,
            body,
            service: None,
            started,
            hedges: Vec::new(),
            sent: 1,
            reroutes: 0,
            next_at,
            free: false,
            reserved: Reserved::default(),
            last: None,
            last_is_local: false,
            stopped: false,
            awaiting_service: false,
            tried,
            deadline,
        }
    }

    fn stop(&mut self, reason: &'static str) {
        self.stopped = true;
        if self.next_at.take().is_some() || self.reserved.extra || self.reserved.retry {
            tracing::event!(
                name: "hedge.stopped",
                target: "steadfast::hedge",
                tracing::Level::DEBUG,
                hedge = &*self.shared.config.name,
                attempt = self.sent,
                reason,
            );
        }
        self.release();
    }

    /// A hedge the share of extra load (or the retry budget) refused: hedging ends.
    fn refused(&mut self, reason: &'static str) {
        #[cfg(feature = "metrics")]
        metrics::counter!("steadfast_hedge_budget_exhausted_total", "hedge" => metrics::SharedString::from(self.shared.config.name.clone()))
            .increment(1);
        self.stop(reason);
    }

    /// Gives back tokens held for a hedge that will not be sent.
    fn release(&mut self) {
        let config = &self.shared.config;
        if std::mem::take(&mut self.reserved.extra) {
            config.extra.refund();
        }
        if std::mem::take(&mut self.reserved.retry) {
            if let Some(b) = &config.retry_budget {
                b.refund();
            }
        }
    }

    /// When the attempt after the one just sent (at `now`) is due, if another may be sent.
    fn schedule(&mut self, now: Instant, after: Option<Duration>) {
        self.next_at = after
            .filter(|_| !self.stopped && self.sent < self.shared.config.max_attempts)
            .map(|d| saturating_add(now, d))
            .filter(|at| self.deadline.is_none_or(|d| *at < d.instant()));
    }

    /// Records the latencies of attempts still running when the call ends: each counts with
    /// the time it had run, at least what it would have taken.
    fn finish(&mut self, now: Option<Instant>, primary_running: bool) {
        self.release();
        let Some(learnt) = self.shared.config.delay.learnt() else {
            return;
        };
        let now = now.unwrap_or_else(Instant::now);
        if primary_running {
            learnt.record(now, now.saturating_duration_since(self.started));
        }
        for a in &self.hedges {
            learnt.record(now, now.saturating_duration_since(a.sent));
        }
    }
}

/// What one attempt's outcome means for the race.
enum Verdict {
    /// It is the call's answer.
    Final,
    /// Keep waiting for another attempt; send the next at once, after a delay, or never.
    NonFatal(Next),
}

enum Next {
    Now,
    /// An endpoint refused the attempt before sending it: the next is sent at once and free.
    Rerouted,
    After(Duration),
    Never(&'static str),
}

fn verdict<C, ResB>(
    config: &super::layer::Config<C>,
    out: &Result<Response<ResB>, BoxError>,
) -> Verdict
where
    C: Classify<Response<ResB>>,
{
    match out {
        Ok(res) => match config.classifier.classify_response(res) {
            ResponseClass::Ready(c) if c.is_retryable() => {
                Verdict::NonFatal(match server_hint(res.headers(), (config.wall_clock)()) {
                    None => Next::Now,
                    Some(Pushback::Stop) => Next::Never("server_pushback_stop"),
                    Some(Pushback::After(d)) if d > config.max_hint => {
                        Next::Never("server_hint_over_cap")
                    }
                    Some(Pushback::After(d)) => Next::After(d),
                })
            }
            // A streamed gRPC answer is committed once its head arrives (A6).
            _ => Verdict::Final,
        },
        // Refused by a local policy (an open breaker): no more attempts for this call.
        Err(e) if PolicyRejected::is_in(&**e) => Verdict::NonFatal(Next::Never("policy_rejected")),
        Err(e) if NotSent::is_in(&**e) => Verdict::NonFatal(Next::Rerouted),
        // This attempt lost the body another attempt is sending: wait for that one.
        Err(e) if is_replay_lost(&**e) => Verdict::NonFatal(Next::Never("body_not_replayable")),
        Err(e) if config.classifier.classify_error(&**e).is_retryable() => {
            Verdict::NonFatal(Next::Now)
        }
        Err(_) => Verdict::Final,
    }
}

/// The count a request carries in `name` (one value of digits), if any.
fn count_in(headers: &http::HeaderMap, name: &http::HeaderName) -> Option<u32> {
    let mut values = headers.get_all(name).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    v.to_str().ok()?.parse().ok()
}

/// Whether `out` was made in this process (a layer below refused the call, or the attempt lost
/// its body) rather than by the upstream.
fn is_local<R>(out: &Result<R, BoxError>) -> bool {
    out.as_ref()
        .is_err_and(|e| PolicyRejected::is_in(&**e) || NotSent::is_in(&**e) || is_replay_lost(&**e))
}

fn is_replay_lost(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<ReplayLost>() {
            return true;
        }
        cur = e.source();
    }
    false
}

impl<F, S, B, C, R> fmt::Debug for HedgeFuture<F, S, B, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeFuture")
            .field("attempts", &self.race.as_ref().map_or(1, |r| r.sent))
            .finish_non_exhaustive()
    }
}

impl<F, S, B, C, R> HedgeFuture<F, S, B, C, R> {
    pub(crate) fn once(fut: F) -> Self {
        Self {
            primary: Primary::Running { fut },
            timer: Timer::Off,
            race: None,
        }
    }

    pub(crate) fn racing(fut: F, race: Race<F, S, B, C, R>) -> Self {
        Self {
            primary: Primary::Running { fut },
            timer: Timer::Off,
            race: Some(race),
        }
    }
}

/// What trying to send a hedge came to.
enum Sent {
    Yes,
    /// Its service is not ready yet (the task will be woken).
    NotReady,
    /// No hedge was sent and none will be.
    No,
}

impl<F, S, B, C, ResB, E> Race<F, S, B, C, Response<ResB>>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    S: Service<Request<ReplayBody<B>>, Future = F, Response = Response<ResB>, Error = E> + Clone,
    B: Body<Data = Bytes>,
    C: Classify<Response<ResB>>,
{
    /// Takes one attempt's outcome, of the attempt sent at `sent`: `Some` when it is the
    /// call's answer. `primary_running` says whether the first attempt still runs.
    fn settle(
        &mut self,
        out: Result<Response<ResB>, BoxError>,
        sent: Instant,
        hedge: bool,
        primary_running: bool,
    ) -> Option<Result<Response<ResB>, BoxError>> {
        let config = &*self.shared.config;
        let now = config.delay.learnt().map(|learnt| {
            let now = Instant::now();
            learnt.record(now, now.saturating_duration_since(sent));
            now
        });
        match verdict(config, &out) {
            Verdict::Final => {
                if hedge {
                    #[cfg(feature = "metrics")]
                    metrics::counter!("steadfast_hedge_won_total", "hedge" => metrics::SharedString::from(config.name.clone()))
                        .increment(1);
                    tracing::event!(
                        name: "hedge.won",
                        target: "steadfast::hedge",
                        tracing::Level::DEBUG,
                        hedge = &*config.name,
                        attempts = self.sent,
                    );
                }
                self.finish(now, primary_running);
                Some(out)
            }
            Verdict::NonFatal(next) => {
                match next {
                    Next::Now => self.next_at_once(false),
                    Next::Rerouted => self.next_at_once(true),
                    Next::After(d) => {
                        let now = now.unwrap_or_else(Instant::now);
                        self.schedule(now, Some(d));
                    }
                    Next::Never(reason) => self.stop(reason),
                }
                // The upstream's answer is kept over an outcome made here.
                let local = is_local(&out);
                if self.last.is_none() || !local || self.last_is_local {
                    self.last = Some(out);
                    self.last_is_local = local;
                }
                None
            }
        }
    }

    /// After a retryable answer: the next attempt goes now (A6's non-fatal status), if one
    /// may still be sent.
    fn next_at_once(&mut self, rerouted: bool) {
        // No hedge before a delay is known (a fixed delay always is); an attempt an endpoint
        // refused before sending it adds no load and goes elsewhere all the same.
        let config = &self.shared.config;
        let unlearnt = !rerouted && config.delay.get().is_none();
        let spent = if rerouted {
            self.reroutes >= MAX_REROUTES
        } else {
            self.sent >= config.max_attempts
        };
        if self.stopped || spent || unlearnt {
            self.next_at = None;
            return;
        }
        // A hedge due later is brought forward; none is sent past the deadline.
        let now = Instant::now();
        self.next_at = Some(now).filter(|at| self.deadline.is_none_or(|d| *at < d.instant()));
        self.free = rerouted;
    }

    /// Sends the next hedge, its time having come.
    fn send(&mut self, cx: &mut Context<'_>) -> Sent {
        let shared = self.shared.clone();
        let config = &*shared.config;
        if self.deadline.is_some_and(Deadline::is_expired) {
            self.stop("deadline");
            return Sent::No;
        }
        if self.free {
            // This attempt replaces one an endpoint refused before sending it: it is not paid
            // for, and tokens taken for a hedge go back.
            self.release();
        } else if !self.reserved.extra {
            if !config.extra.withdraw() {
                self.refused("max_extra_load");
                return Sent::No;
            }
            self.reserved.extra = true;
            if let Some(budget) = &config.retry_budget {
                if !budget.withdraw() {
                    self.refused("retry_budget");
                    return Sent::No;
                }
                self.reserved.retry = true;
            }
        }
        if self.service.is_none() {
            self.service = self.shared.spare.get();
        }
        let Some(service) = self.service.as_mut() else {
            self.stop("service_failed");
            return Sent::No;
        };
        match service.poll_ready(cx) {
            Poll::Pending => return Sent::NotReady,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                // This copy of the service is done for; the attempts running are not.
                let e: BoxError = e.into();
                tracing::event!(
                    name: "hedge.not_ready",
                    target: "steadfast::hedge",
                    tracing::Level::DEBUG,
                    hedge = &*config.name,
                    error = %e,
                );
                self.service = None;
                self.stop("service_failed");
                return Sent::No;
            }
        }
        let Some(body) = self.body.replay() else {
            self.stop("body_not_replayable");
            return Sent::No;
        };
        // An attempt that replaces one an endpoint refused unsent takes its number.
        let rerouted = self.free;
        let attempt = if rerouted { self.sent } else { self.sent + 1 };
        let mut req = Request::from_parts(self.parts.clone(), body);
        let headers = req.headers_mut();
        // Counted on from what the request arrived with (a retry layer above numbers its own
        // attempts): this call's attempts after the first add to it.
        if let Some(name) = &config.attempt_header {
            let base = count_in(headers, name).unwrap_or(1);
            headers.insert(name.clone(), small_number(base.saturating_add(attempt - 1)));
        }
        if is_grpc_content_type(headers) {
            let base = count_in(headers, &GRPC_PREVIOUS_ATTEMPTS).unwrap_or(0);
            headers.insert(
                GRPC_PREVIOUS_ATTEMPTS,
                small_number(base.saturating_add(attempt - 1)),
            );
        }
        let now = Instant::now();
        if let Some(deadline) = self.deadline {
            // The head kept from the first attempt says the budget as it was then.
            steadfast_core::header::clamp_budgets(
                headers,
                deadline.instant().saturating_duration_since(now),
                &steadfast_core::header::TIMEOUT_MS,
            );
        }
        let span = attempt_span(&self.parts, attempt - 1);
        let fut = {
            let _attempt = span.enter();
            let _deadline = self.deadline.map(|d| d.enter_at(now));
            let service = self.service.as_mut().expect("made ready above");
            self.tried.scope(|| service.call(req))
        };
        tracing::event!(
            name: "hedge.sent",
            target: "steadfast::hedge",
            tracing::Level::DEBUG,
            hedge = &*config.name,
            attempt,
            after_ms = now.saturating_duration_since(self.started).as_millis() as u64,
        );
        // A replacement for a refused attempt is no hedge.
        #[cfg(feature = "metrics")]
        if !rerouted {
            metrics::counter!("steadfast_hedge_sent_total", "hedge" => metrics::SharedString::from(config.name.clone()))
                .increment(1);
        }
        // The tokens are spent: the hedge is out.
        self.reserved = Reserved::default();
        self.free = false;
        if rerouted {
            self.reroutes += 1;
        } else {
            self.sent = attempt;
        }
        self.hedges.push(Attempt {
            fut: Box::pin(fut),
            sent: now,
            span,
        });
        self.schedule(now, config.delay.get());
        Sent::Yes
    }
}

impl<F, S, B, C, ResB, E> Future for HedgeFuture<F, S, B, C, Response<ResB>>
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
            let mut primary_running = false;
            if let PrimaryProj::Running { fut } = this.primary.as_mut().project() {
                match fut.poll(cx) {
                    Poll::Ready(out) => {
                        this.primary.set(Primary::Done);
                        let out = out.map_err(Into::into);
                        let Some(race) = this.race.as_mut() else {
                            return Poll::Ready(out);
                        };
                        let started = race.started;
                        if let Some(out) = race.settle(out, started, false, false) {
                            *this.race = None;
                            return Poll::Ready(out);
                        }
                    }
                    Poll::Pending => primary_running = true,
                }
            }
            let Some(race) = this.race.as_mut() else {
                return Poll::Pending;
            };
            let mut i = 0;
            while i < race.hedges.len() {
                let polled = {
                    let a = &mut race.hedges[i];
                    let _attempt = a.span.enter();
                    a.fut.as_mut().poll(cx)
                };
                match polled {
                    Poll::Pending => i += 1,
                    Poll::Ready(out) => {
                        let a = race.hedges.swap_remove(i);
                        let out = out.map_err(Into::into);
                        crate::future::record_outcome(&a.span, &out);
                        if let Some(out) = race.settle(out, a.sent, true, primary_running) {
                            // The other attempts are cancelled.
                            *this.race = None;
                            this.primary.set(Primary::Done);
                            return Poll::Ready(out);
                        }
                    }
                }
            }
            let running = primary_running || !race.hedges.is_empty();
            let Some(at) = race.next_at else {
                if running {
                    return Poll::Pending;
                }
                let out = race
                    .last
                    .take()
                    .expect("every attempt ended with a retryable outcome");
                *this.race = None;
                return Poll::Ready(out);
            };
            // Once due, a hedge waiting for its service is woken by the service, or by the
            // timer at the deadline; until then the timer is set for when it is due.
            let wake_at = if race.awaiting_service {
                race.deadline.map(Deadline::instant)
            } else {
                Some(at)
            };
            if let Some(wake_at) = wake_at {
                match this.timer.as_mut().project() {
                    TimerProj::Armed { mut sleep } => {
                        if sleep.deadline() != wake_at {
                            sleep.as_mut().reset(wake_at);
                        }
                    }
                    TimerProj::Off => this.timer.set(Timer::Armed {
                        sleep: tokio::time::sleep_until(wake_at),
                    }),
                }
                let fired = match this.timer.as_mut().project() {
                    TimerProj::Armed { sleep } => sleep.poll(cx).is_ready(),
                    TimerProj::Off => false,
                };
                if race.awaiting_service && fired {
                    // The deadline came with the hedge's service still not ready.
                    race.awaiting_service = false;
                    race.stop("deadline");
                    continue;
                }
                if !race.awaiting_service && !fired {
                    return Poll::Pending;
                }
            }
            match race.send(cx) {
                Sent::Yes | Sent::No => {
                    race.awaiting_service = false;
                    continue;
                }
                Sent::NotReady => {
                    if race.awaiting_service {
                        return Poll::Pending;
                    }
                    // Polled again at once: the timer now watches the deadline.
                    race.awaiting_service = true;
                    if race.deadline.is_none() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}
