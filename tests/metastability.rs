//! Metastability experiment (deterministic: paused time, seeded jitter). See
//! `docs/metastability.md` for the set-up and the recorded numbers.
//!
//! Closed-loop clients call a server of fixed capacity (one worker, FIFO queue, fixed service
//! time). The server cannot tell that a caller gave up, so timed-out requests still cost it
//! work. A 3 s latency spike (service time ×5) pushes it into overload. With naive retries
//! the retried, abandoned work keeps the queue full after the spike is gone: the system
//! stays down. With the retry budget on, retries stay near 10 % of traffic, the queue
//! drains, and goodput returns.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use steadfast::retry::{Backoff, ReplayBody, RetryLayer};
use steadfast::timeout::TimeoutLayer;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const CLIENTS: usize = 40;
const THINK: Duration = Duration::from_millis(200);
const SERVICE: Duration = Duration::from_millis(4); // capacity 250 req/s
const SPIKE_SERVICE: Duration = Duration::from_millis(20); // capacity 50 req/s
const SPIKE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(13));
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(50);
const END: Duration = Duration::from_secs(40);

/// The server: a FIFO queue in front of one worker.
#[derive(Clone)]
struct Server {
    queue: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl Server {
    fn start(t0: Instant) -> (Self, Arc<Mutex<usize>>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let backlog = Arc::new(Mutex::new(0usize));
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let t = t0.elapsed();
                let cost = if t >= SPIKE.0 && t < SPIKE.1 {
                    SPIKE_SERVICE
                } else {
                    SERVICE
                };
                tokio::time::sleep(cost).await;
                // The caller may have given up long ago; the work was done anyway.
                let _ = job.send(());
            }
        });
        (Self { queue: tx }, backlog)
    }
}

impl Service<http::Request<ReplayBody<Empty<Bytes>>>> for Server {
    type Response = http::Response<()>;
    type Error = steadfast::common::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<()>, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<ReplayBody<Empty<Bytes>>>) -> Self::Future {
        let (tx, rx) = oneshot::channel();
        let sent = self.queue.send(tx);
        Box::pin(async move {
            sent.map_err(|_| "server gone")?;
            rx.await.map_err(|_| "dropped")?;
            Ok(http::Response::new(()))
        })
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    before: f64,
    after_spike: f64,
    late: f64,
    attempts_per_request: f64,
}

async fn experiment(budgeted: bool) -> Phases {
    let t0 = Instant::now();
    let (server, _) = Server::start(t0);
    let policy = RetryLayer::builder()
        .backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .seed(7);
    let retry = if budgeted {
        policy
    } else {
        policy.budget(None)
    }
    .build()
    .unwrap();
    let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let completions: Arc<Mutex<Vec<(Duration, bool)>>> = Arc::default();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let counted = CountAttempts(server.clone(), attempts.clone());
        let svc = retry.layer(TimeoutLayer::new(ATTEMPT_TIMEOUT).layer(counted));
        let completions = completions.clone();
        clients.spawn(async move {
            // Stagger the start so clients are not in lock step.
            tokio::time::sleep(THINK * c as u32 / CLIENTS as u32).await;
            while t0.elapsed() < END {
                let ok = svc
                    .clone()
                    .oneshot(http::Request::new(Empty::new()))
                    .await
                    .is_ok();
                completions.lock().unwrap().push((t0.elapsed(), ok));
                tokio::time::sleep(THINK).await;
            }
        });
    }
    clients.join_all().await;
    let done = completions.lock().unwrap();
    let goodput = |from: Duration, to: Duration| {
        let n = done
            .iter()
            .filter(|(t, ok)| *ok && *t >= from && *t < to)
            .count();
        n as f64 / (to - from).as_secs_f64()
    };
    Phases {
        before: goodput(Duration::from_secs(2), SPIKE.0),
        after_spike: goodput(SPIKE.1, SPIKE.1 + Duration::from_secs(5)),
        late: goodput(Duration::from_secs(25), END),
        attempts_per_request: attempts.load(std::sync::atomic::Ordering::Relaxed) as f64
            / done.len() as f64,
    }
}

/// Counts every attempt that reaches the server.
#[derive(Clone)]
struct CountAttempts(Server, Arc<std::sync::atomic::AtomicU64>);

impl<R> Service<R> for CountAttempts
where
    Server: Service<R>,
{
    type Response = <Server as Service<R>>::Response;
    type Error = <Server as Service<R>>::Error;
    type Future = <Server as Service<R>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.call(req)
    }
}

#[tokio::test(start_paused = true)]
async fn budgets_recover_from_a_latency_spike_naive_retries_do_not() {
    let naive = experiment(false).await;
    let budgeted = experiment(true).await;
    println!(
        "goodput (successful requests / s)     before spike | 0-5 s after | 12-27 s after | attempts per request"
    );
    println!(
        "naive retries (3 attempts, no budget) {:>12.1} | {:>11.1} | {:>13.1} | {:.2}",
        naive.before, naive.after_spike, naive.late, naive.attempts_per_request
    );
    println!(
        "steadfast default budget             {:>12.1} | {:>11.1} | {:>13.1} | {:.2}",
        budgeted.before, budgeted.after_spike, budgeted.late, budgeted.attempts_per_request
    );
    // Same healthy baseline.
    assert!(naive.before > 150.0 && budgeted.before > 150.0);
    // Naive retries stay down long after the trigger is gone: metastable.
    assert!(
        naive.late < 0.2 * naive.before,
        "naive recovered: {naive:?}"
    );
    // The budget brings it back.
    assert!(
        budgeted.late > 0.8 * budgeted.before,
        "budgeted stayed down: {budgeted:?}"
    );
}
