//! Second hostile pass: striped permits across OS threads, the FIFO hand-off with a limit that
//! comes down, and the client-side throttle (paused time, seeded draws, many threads).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Ready;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use steadfast_core::{BoxError, PolicyRejected, TimedOut};
use steadfast_limit::error::{InvalidLimitConfig, LimitExceeded, Throttled};
use steadfast_limit::{
    Aimd, ConcurrencyLimit, ConcurrencyLimitLayer, LimitBody, ThrottleLayer, Vegas,
};
use tokio::time::advance;
use tower::util::ServiceFn;
use tower::{Layer, Service, ServiceExt, service_fn};

// ---------------------------------------------------------------------------------------------
// Helpers: a limited service whose calls answer at once, with a body that holds the permit.

type Answer = fn(Request<u16>) -> Ready<Result<Response<Full<Bytes>>, Infallible>>;
type Svc = ConcurrencyLimit<ServiceFn<Answer>>;
type Res = Response<LimitBody<Full<Bytes>>>;

/// Answers with the status the request carries (0: 200), and a one-frame body (not at its end,
/// so the call holds its permit until the body is read or dropped).
fn answer(req: Request<u16>) -> Ready<Result<Response<Full<Bytes>>, Infallible>> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"x")));
    if *req.body() != 0 {
        *res.status_mut() = StatusCode::from_u16(*req.body()).unwrap();
    }
    std::future::ready(Ok(res))
}

fn svc(layer: &ConcurrencyLimitLayer) -> Svc {
    layer.layer(service_fn(answer as Answer))
}

/// One call through a layer that never waits: admitted or refused at once.
fn call_now(svc: &Svc, status: u16) -> Result<Res, BoxError> {
    svc.clone()
        .oneshot(Request::new(status))
        .now_or_never()
        .expect("a limit that does not wait answers at once")
}

fn is_refusal(e: &BoxError) -> bool {
    e.downcast_ref::<LimitExceeded>().is_some() && PolicyRejected::is_in(&**e)
}

/// Reads a held body to its end (the call ends as seen: an adaptive limit takes a sample).
fn finish(res: Res) {
    res.into_body()
        .collect()
        .now_or_never()
        .expect("a full body is ready")
        .unwrap();
}

/// `n` calls from `threads` fresh OS threads (shares as even as possible), all held.
fn hold_from_threads(svc: &Svc, n: u32, threads: u32, what: &str) -> Vec<Res> {
    let threads = threads.clamp(1, n.max(1));
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = n / threads + u32::from(t < n % threads);
                let s = svc.clone();
                sc.spawn(move || {
                    (0..share)
                        .map(|i| {
                            call_now(&s, 0).unwrap_or_else(|e| {
                                panic!("{what}: thread {t}, call {i} of {share}: refused: {e}")
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// Drops `held` on `threads` fresh OS threads (chunks of unequal size).
fn drop_on_threads(held: Vec<Res>, threads: usize) {
    let mut chunks: Vec<Vec<Res>> = (0..threads.max(1)).map(|_| Vec::new()).collect();
    for (i, r) in held.into_iter().enumerate() {
        // Unequal: thread k takes items with i % (k + 2) == 0 first.
        let k = (i * 7 + i / 3) % chunks.len();
        chunks[k].push(r);
    }
    std::thread::scope(|sc| {
        for c in chunks {
            sc.spawn(move || drop(c));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 1. Striped permits: exact boundaries across OS threads.

/// Limit N: N calls held across different OS threads, released on yet other threads, then N new
/// calls from fresh threads must all be admitted (and the N+1-th refused), round after round,
/// for limits around the batch sizes (1, 2, 31, 32, 33, ...).
#[test]
fn exact_boundaries_hold_across_os_threads_and_cross_thread_releases() {
    for limit in [
        1u32, 2, 3, 5, 7, 8, 9, 16, 31, 32, 33, 63, 64, 65, 100, 257, 1000, 4099,
    ] {
        let layer = ConcurrencyLimitLayer::new(limit);
        let s = svc(&layer);
        for (round, threads) in [limit, 8, 3, 13, 2, 9, 1, 17].into_iter().enumerate() {
            let what = format!("limit {limit}, round {round}, {threads} threads");
            let held = hold_from_threads(&s, limit, threads, &what);
            assert_eq!(layer.in_flight(), limit, "{what}");
            // One more, from a fresh thread: refused (the limit holds exactly).
            let s2 = s.clone();
            let extra = std::thread::spawn(move || call_now(&s2, 0)).join().unwrap();
            match extra {
                Err(e) => assert!(is_refusal(&e), "{what}: {e}"),
                Ok(_) => panic!("{what}: call {} admitted over the limit", limit + 1),
            }
            drop_on_threads(held, [5, 1, 2, 11][round % 4]);
            assert_eq!(layer.in_flight(), 0, "{what}: after the releases");
            assert_eq!(layer.waiting(), 0, "{what}");
        }
        // Finally the whole limit from one thread (all budgets sit idle in other stripes).
        let all = hold_from_threads(&s, limit, 1, &format!("limit {limit}, one thread"));
        assert_eq!(layer.in_flight(), limit);
        drop(all);
        assert_eq!(layer.in_flight(), 0);
    }
}

/// Several threads start together (a barrier) and take, between them, exactly the limit: no
/// call may be refused, since the permits taken never reach the limit before the last one.
/// (Two threads that both find the global count exhausted race to reclaim the idle budgets of
/// other stripes: the one that finds them already reclaimed must still take one.)
#[test]
fn concurrent_acquirers_taking_exactly_the_limit_are_never_refused() {
    let mut spurious = Vec::new();
    for (limit, threads) in [(2u32, 2u32), (4, 4), (16, 8), (64, 2), (64, 8), (100, 5)] {
        let layer = ConcurrencyLimitLayer::new(limit);
        let s = svc(&layer);
        for round in 0..200 {
            let barrier = std::sync::Barrier::new(threads as usize);
            let refused = AtomicU32::new(0);
            let held: Vec<Res> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let share = limit / threads + u32::from(t < limit % threads);
                        let (s, barrier, refused) = (s.clone(), &barrier, &refused);
                        sc.spawn(move || {
                            barrier.wait();
                            let mut got = Vec::new();
                            for _ in 0..share {
                                match call_now(&s, 0) {
                                    Ok(r) => got.push(r),
                                    Err(e) => {
                                        assert!(is_refusal(&e), "{e}");
                                        refused.fetch_add(1, SeqCst);
                                    }
                                }
                            }
                            got
                        })
                    })
                    .collect();
                hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
            });
            let n = refused.load(SeqCst);
            if n > 0 {
                spurious.push(format!(
                    "limit {limit}, {threads} threads, round {round}: {n} refused with {} in flight",
                    held.len()
                ));
            }
            // Released on other threads.
            drop_on_threads(held, 3);
            assert_eq!(layer.in_flight(), 0);
        }
    }
    assert!(
        spurious.is_empty(),
        "{} rounds refused calls below the limit, e.g. {:?}",
        spurious.len(),
        &spurious[..spurious.len().min(3)]
    );
}

/// Many threads hammer limits of 1, 2 and 3; every admitted call is handed to one of several
/// dropper threads (released on another thread than it was acquired on). The calls holding a
/// permit never exceed the limit, and afterwards the whole limit is admitted from fresh
/// threads.
#[test]
fn hammering_small_limits_from_many_threads_with_foreign_releases() {
    for limit in [1u32, 2, 3] {
        let layer = ConcurrencyLimitLayer::new(limit);
        let s = svc(&layer);
        let gauge = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let admitted = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<Res>();
        let rx = Arc::new(Mutex::new(rx));
        std::thread::scope(|sc| {
            let droppers: Vec<_> = (0..3)
                .map(|_| {
                    let (rx, gauge) = (rx.clone(), gauge.clone());
                    sc.spawn(move || {
                        loop {
                            let got = rx.lock().unwrap().recv();
                            match got {
                                Ok(r) => {
                                    gauge.fetch_sub(1, SeqCst);
                                    drop(r);
                                }
                                Err(_) => break,
                            }
                        }
                    })
                })
                .collect();
            let workers: Vec<_> = (0..10)
                .map(|_| {
                    let (s, tx, gauge, most, admitted) = (
                        s.clone(),
                        tx.clone(),
                        gauge.clone(),
                        most.clone(),
                        admitted.clone(),
                    );
                    sc.spawn(move || {
                        for _ in 0..4_000 {
                            match call_now(&s, 0) {
                                Ok(r) => {
                                    admitted.fetch_add(1, SeqCst);
                                    let now = gauge.fetch_add(1, SeqCst) + 1;
                                    most.fetch_max(now, SeqCst);
                                    tx.send(r).unwrap();
                                }
                                Err(e) => assert!(is_refusal(&e), "{e}"),
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            drop(tx);
            for d in droppers {
                d.join().unwrap();
            }
        });
        assert!(
            most.load(SeqCst) <= limit,
            "limit {limit}: {} calls held at once",
            most.load(SeqCst)
        );
        assert!(admitted.load(SeqCst) > 0);
        assert_eq!(
            (layer.in_flight(), layer.waiting()),
            (0, 0),
            "limit {limit}"
        );
        let held = hold_from_threads(&s, limit, limit, &format!("limit {limit} after the hammer"));
        assert_eq!(layer.in_flight(), limit);
        drop(held);
    }
}

/// A limit of `u32::MAX`: hundreds of thousands held across threads, counted exactly, all given
/// back; a waiting `u32::MAX` limit with `Duration::MAX` waits admits too.
#[test]
fn a_u32_max_limit_counts_exactly_across_threads() {
    let layer = ConcurrencyLimitLayer::new(u32::MAX);
    let s = svc(&layer);
    let held = hold_from_threads(&s, 200_000, 6, "u32::MAX");
    assert_eq!(layer.in_flight(), 200_000);
    assert_eq!(layer.limit(), u32::MAX);
    drop_on_threads(held, 4);
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = ConcurrencyLimitLayer::builder()
            .max(u32::MAX)
            .wait_up_to(Duration::MAX)
            .build()
            .unwrap();
        let s = svc(&layer);
        let mut held = Vec::new();
        for _ in 0..10_000 {
            held.push(s.clone().oneshot(Request::new(0)).await.unwrap());
        }
        assert_eq!(layer.in_flight(), 10_000);
        drop(held);
        assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
        // An adaptive limit at u32::MAX backs off on overload and stays within bounds.
        let layer = ConcurrencyLimitLayer::builder()
            .aimd(Aimd {
                initial: u32::MAX,
                min: 1,
                max: u32::MAX,
                backoff: 0.5,
                slow: Duration::MAX,
            })
            .sample_window(Duration::ZERO, 1)
            .build()
            .unwrap();
        assert_eq!(layer.limit(), u32::MAX);
        let s = svc(&layer);
        finish(s.clone().oneshot(Request::new(503)).await.unwrap());
        assert_eq!(layer.limit(), u32::MAX / 2);
        assert_eq!(layer.in_flight(), 0);
    });
}

/// An adaptive limit comes down while calls hold budgets in many stripes; once everything is
/// given back, exactly the new limit is admitted from fresh threads: no spurious refusal and
/// no call over it.
#[test]
fn a_limit_that_came_down_is_exact_across_threads_afterwards() {
    let layer = ConcurrencyLimitLayer::builder()
        .aimd(Aimd {
            initial: 64,
            min: 1,
            max: 64,
            backoff: 0.5,
            slow: Duration::MAX,
        })
        .sample_window(Duration::ZERO, 1)
        .build()
        .unwrap();
    let s = svc(&layer);
    // 64 held over 16 threads; read on other threads: four overload answers, 64 → 4.
    let mut held = hold_from_threads(&s, 60, 16, "adaptive 64");
    let overloads: Vec<Res> = std::thread::scope(|sc| {
        (0..4)
            .map(|_| {
                let s = s.clone();
                sc.spawn(move || call_now(&s, 503).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(layer.in_flight(), 64);
    std::thread::scope(|sc| {
        for r in overloads {
            sc.spawn(move || finish(r));
        }
    });
    assert_eq!(layer.limit(), 4, "four halvings");
    // Over the new limit while the old calls still run: refused from anywhere.
    for _ in 0..4 {
        let s2 = s.clone();
        let r = std::thread::spawn(move || call_now(&s2, 0)).join().unwrap();
        assert!(
            r.is_err(),
            "admitted with {} in flight over a limit of 4",
            layer.in_flight()
        );
    }
    // Dropped before their ends, on other threads: each is a success sample timed to its
    // drop, so the limit may only have grown back.
    let rest = held.split_off(30);
    drop_on_threads(held, 3);
    drop_on_threads(rest, 7);
    assert_eq!(layer.in_flight(), 0);
    assert!((4..=64).contains(&layer.limit()), "{}", layer.limit());
    for round in 0..6 {
        // Whatever the limit is now, exactly that many are admitted from fresh threads.
        let limit = layer.limit();
        let what = format!("limit {limit}, round {round}");
        let now = hold_from_threads(&s, limit, [4, 1, 2, 3][round % 4], &what);
        let s2 = s.clone();
        let extra = std::thread::spawn(move || call_now(&s2, 0)).join().unwrap();
        assert!(extra.is_err(), "{what}: one call over the limit admitted");
        assert_eq!(layer.in_flight(), limit, "{what}");
        drop_on_threads(now, 2);
    }
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. The queue: hand-off when the limit came down, and order across threads.

/// An upstream whose calls wait for a gate (a status sent on a oneshot), with empty bodies (a
/// call ends with its head).
type Gate = (u32, tokio::sync::oneshot::Sender<u16>);

#[derive(Clone, Default)]
struct Gates {
    open: Arc<Mutex<VecDeque<Gate>>>,
    started: Arc<Mutex<Vec<u32>>>,
}

impl Gates {
    fn service(
        &self,
    ) -> impl Service<
        Request<u32>,
        Response = Response<Empty<Bytes>>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<Empty<Bytes>>, Infallible>>
                 + Send
                 + 'static,
    > + Clone
    + Send
    + 'static {
        let g = self.clone();
        service_fn(move |req: Request<u32>| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            g.open.lock().unwrap().push_back((*req.body(), tx));
            g.started.lock().unwrap().push(*req.body());
            async move {
                let status = rx.await.unwrap_or(200);
                let mut res = Response::new(Empty::new());
                *res.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok::<_, Infallible>(res)
            }
        })
    }

    fn pending(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    /// Answers the oldest pending upstream call with `status`.
    fn answer_oldest(&self, status: u16) -> u32 {
        let (n, tx) = self
            .open
            .lock()
            .unwrap()
            .pop_front()
            .expect("a pending call");
        let _ = tx.send(status);
        n
    }

    fn started(&self) -> Vec<u32> {
        self.started.lock().unwrap().clone()
    }
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// AIMD from 4 down to 1 while four calls run and four wait: the finishing calls (each an
/// overload answer) hand their permits to the waiters although the limit came down, so once the
/// calls admitted under the old limit have finished, four run under a limit of one.
#[tokio::test(start_paused = true)]
async fn a_limit_that_came_down_is_respected_by_the_hand_off_to_waiters() {
    let layer = ConcurrencyLimitLayer::builder()
        .aimd(Aimd {
            initial: 4,
            min: 1,
            max: 4,
            backoff: 0.5,
            slow: Duration::from_secs(3600),
        })
        .sample_window(Duration::ZERO, 1)
        .wait_up_to(Duration::from_secs(3600))
        .build()
        .unwrap();
    let gates = Gates::default();
    let svc = layer.layer(gates.service());
    let mut first = Vec::new();
    for n in 0..4 {
        first.push(tokio::spawn(svc.clone().oneshot(Request::new(n))));
    }
    settle().await;
    assert_eq!((gates.pending(), layer.in_flight()), (4, 4));
    let mut waiters = Vec::new();
    for n in 4..8 {
        waiters.push(tokio::spawn(svc.clone().oneshot(Request::new(n))));
    }
    settle().await;
    assert_eq!(layer.waiting(), 4);
    // The four calls admitted under the limit of 4 end with overload answers: 4 → 2 → 1 → 1.
    for (n, h) in first.into_iter().enumerate() {
        assert_eq!(gates.answer_oldest(503), n as u32);
        assert_eq!(h.await.unwrap().unwrap().status(), 503);
        settle().await;
    }
    assert_eq!(layer.limit(), 1, "three halvings to the floor");
    let upstream_now = gates.pending();
    let in_flight = layer.in_flight();
    // Cleanup before asserting, so that a failure leaves nothing running.
    while gates.pending() > 0 {
        gates.answer_oldest(200);
        settle().await;
    }
    for w in waiters {
        let _ = w.await;
    }
    assert!(
        in_flight <= 1 && upstream_now <= 1,
        "the limit came down to 1 and every call admitted under the old limit finished, yet \
         {in_flight} calls hold permits and the upstream runs {upstream_now} (permits handed \
         to waiters past the lowered limit)"
    );
}

/// Vegas measures its unloaded latency with the limit held at its floor, calls over it
/// waiting. When a window closes into a probe while calls wait, a finishing call must not hand
/// its permit to a waiter (the probe runs at the floor, not at the old limit).
#[tokio::test(start_paused = true)]
async fn a_vegas_probe_at_the_floor_does_not_hand_permits_past_it() {
    let layer = ConcurrencyLimitLayer::builder()
        .vegas(Vegas {
            initial: 8,
            min: 1,
            max: 8,
            probe_every: 1,
            ..Vegas::default()
        })
        .sample_window(Duration::ZERO, 8)
        .wait_up_to(Duration::from_secs(3600))
        .build()
        .unwrap();
    assert_eq!(layer.limit(), 1, "starts at the floor");
    let gates = Gates::default();
    let svc = layer.layer(gates.service());
    // The first window: eight calls one at a time at the floor.
    for n in 0..8 {
        let h = tokio::spawn(svc.clone().oneshot(Request::new(n)));
        settle().await;
        advance(Duration::from_millis(10)).await;
        gates.answer_oldest(200);
        h.await.unwrap().unwrap();
    }
    assert_eq!(layer.limit(), 8, "the initial limit after the probe");
    // Eight in flight, eight waiting; the eight end and close a window: the next probes.
    let mut first = Vec::new();
    for n in 100..108 {
        first.push(tokio::spawn(svc.clone().oneshot(Request::new(n))));
    }
    settle().await;
    let mut waiters = Vec::new();
    for n in 200..216 {
        waiters.push(tokio::spawn(svc.clone().oneshot(Request::new(n))));
    }
    settle().await;
    assert_eq!((layer.in_flight(), layer.waiting()), (8, 16));
    advance(Duration::from_millis(10)).await;
    for _ in 0..7 {
        gates.answer_oldest(200);
        settle().await;
    }
    let started_before = gates.started().len();
    gates.answer_oldest(200); // closes the window: the limit drops to the floor to probe
    settle().await;
    let limit = layer.limit();
    let started_after = gates.started().len();
    let in_flight = layer.in_flight();
    while gates.pending() > 0 {
        gates.answer_oldest(200);
        settle().await;
    }
    for h in first.into_iter().chain(waiters) {
        let _ = h.await;
    }
    assert_eq!(limit, 1, "probing at the floor");
    assert_eq!(
        started_after, started_before,
        "the probe holds the limit at 1 with {} calls in flight, yet the call that closed the \
         window handed its permit to a waiter (in flight {in_flight})",
        in_flight
    );
}

/// Waiters are admitted in call order when the permits are given back on other OS threads
/// while the waiters' tasks run on a multi-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn call_order_holds_with_releases_on_foreign_threads() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(2)
        .wait_up_to(Duration::from_secs(3600))
        .build()
        .unwrap();
    let gates = Gates::default();
    let mut svc = layer.layer(gates.service());
    let mut handles = Vec::new();
    for n in 0..40u32 {
        // `call` in order from this task; the futures run on the workers.
        svc.ready().await.unwrap();
        let fut = svc.call(Request::new(n));
        handles.push(tokio::spawn(fut));
    }
    let bounded = async {
        while gates.pending() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(layer.waiting(), 38);
        for k in 0..38usize {
            // Release the oldest from a fresh OS thread; wait for the next admission.
            let g = gates.clone();
            std::thread::spawn(move || g.answer_oldest(200))
                .join()
                .unwrap();
            while gates.started().len() < k + 3 {
                tokio::task::yield_now().await;
            }
        }
        while gates.pending() > 0 {
            gates.answer_oldest(200);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), bounded)
        .await
        .expect("hang: a waiter was stranded");
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let started = gates.started();
    assert_eq!(started, (0..40).collect::<Vec<_>>(), "admission order");
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

/// Many waiters on a multi-thread runtime; releases on OS threads, random cancellations of
/// waiters (some just handed a permit) and of running calls. Nobody is stranded, and at the end
/// everything is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancellations_and_foreign_releases_strand_nobody() {
    for limit in [1u32, 2, 3] {
        let layer = ConcurrencyLimitLayer::builder()
            .max(limit)
            .wait_up_to(Duration::from_secs(3600))
            .build()
            .unwrap();
        let gates = Gates::default();
        let mut svc = layer.layer(gates.service());
        let mut handles = Vec::new();
        for n in 0..60u32 {
            svc.ready().await.unwrap();
            handles.push(tokio::spawn(svc.call(Request::new(n))));
        }
        let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(limit);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut aborted = [false; 60];
        let work = async {
            for _ in 0..200 {
                match next() % 4 {
                    0 => {
                        let i = (next() % 60) as usize;
                        handles[i].abort();
                        aborted[i] = true;
                    }
                    _ => {
                        if gates.pending() > 0 {
                            let g = gates.clone();
                            std::thread::spawn(move || {
                                if g.pending() > 0 {
                                    g.answer_oldest(200);
                                }
                            })
                            .join()
                            .unwrap();
                        }
                    }
                }
                tokio::task::yield_now().await;
                // Settled: a waiter only while every permit is in use.
                let mut ok = false;
                for _ in 0..10_000 {
                    let (f, w) = (layer.in_flight(), layer.waiting());
                    if w == 0 || f == limit {
                        ok = true;
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                assert!(
                    ok,
                    "limit {limit}: {} waiting with {} of {limit} permits in use",
                    layer.waiting(),
                    layer.in_flight()
                );
            }
            // Let everything left through.
            loop {
                while gates.pending() > 0 {
                    gates.answer_oldest(200);
                }
                if handles.iter().all(|h| h.is_finished()) {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .expect("hang: a waiter was stranded");
        for (i, h) in handles.into_iter().enumerate() {
            match h.await {
                Ok(r) => {
                    r.unwrap_or_else(|e| panic!("limit {limit}: call {i} failed: {e}"));
                }
                Err(e) => assert!(e.is_cancelled() && aborted[i]),
            }
        }
        assert_eq!(
            (layer.in_flight(), layer.waiting()),
            (0, 0),
            "limit {limit}"
        );
    }
}

/// A waiter just handed a permit is dropped on another OS thread without ever being polled:
/// the permit passes on to the next waiter.
#[tokio::test(start_paused = true)]
async fn a_waiter_handed_a_permit_and_dropped_elsewhere_passes_it_on() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::from_secs(60))
        .build()
        .unwrap();
    let gates = Gates::default();
    let mut svc = layer.layer(gates.service());
    svc.ready().await.unwrap();
    let held = tokio::spawn(svc.call(Request::new(0)));
    settle().await;
    svc.ready().await.unwrap();
    let w1 = svc.call(Request::new(1));
    svc.ready().await.unwrap();
    let w2 = tokio::spawn(svc.call(Request::new(2)));
    settle().await;
    assert_eq!(layer.waiting(), 2);
    gates.answer_oldest(200);
    held.await.unwrap().unwrap();
    // Handed to w1 (never polled); w1 dropped on another thread.
    assert_eq!((layer.in_flight(), layer.waiting()), (1, 1));
    std::thread::spawn(move || drop(w1)).join().unwrap();
    settle().await;
    assert_eq!(gates.started(), vec![0, 2], "w2 got the permit w1 dropped");
    gates.answer_oldest(200);
    w2.await.unwrap().unwrap();
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// 4. The throttle.

/// An upstream answering the status in `status` (and counting the calls it sees).
fn upstream(
    status: Arc<AtomicU16>,
    seen: Arc<AtomicU32>,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, Infallible>> + Send,
> + Clone
+ Send
+ Sync {
    service_fn(move |_req: Request<()>| {
        let (status, seen) = (status.clone(), seen.clone());
        async move {
            seen.fetch_add(1, SeqCst);
            let mut res = Response::new(());
            *res.status_mut() = StatusCode::from_u16(status.load(SeqCst)).unwrap();
            Ok::<_, Infallible>(res)
        }
    })
}

fn throttled(r: &Result<Response<()>, BoxError>) -> Option<Throttled> {
    match r {
        Ok(_) => None,
        Err(e) => {
            let t = *e
                .downcast_ref::<Throttled>()
                .expect("only Throttled errors");
            assert!(PolicyRejected::is_in(&**e));
            Some(t)
        }
    }
}

fn formula(counts: (u64, u64), k: f64, max: f64, min_requests: u64) -> f64 {
    let (r, a) = counts;
    if r < min_requests {
        return 0.0;
    }
    ((r as f64 - k * a as f64) / (r as f64 + 1.0)).clamp(0.0, max)
}

/// The rule exactly as documented, for several K and caps: before each call the reported
/// probability is the formula over the counts, a refusal carries it, and every call (refused
/// or not) is a request.
#[tokio::test(start_paused = true)]
async fn the_probability_is_the_documented_formula_over_the_counts() {
    for (k, max, min) in [
        (1.0, 1.0, 0u32),
        (2.0, 0.8, 10),
        (1.0, 0.25, 3),
        (1.5, 1.0, 1),
    ] {
        let status = Arc::new(AtomicU16::new(200));
        let seen = Arc::new(AtomicU32::new(0));
        let throttle = ThrottleLayer::builder()
            .k(k)
            .max_rejection(max)
            .min_requests(min)
            .window(Duration::from_secs(60))
            .seed(42)
            .build()
            .unwrap();
        let svc = throttle.layer(upstream(status.clone(), seen.clone()));
        let (mut made, mut refused) = (0u64, 0u64);
        for i in 0..600u32 {
            // Mixed: accepted for a while, then mostly overload answers.
            let s = if i < 50 || i % 7 == 0 { 200 } else { 503 };
            status.store(s, SeqCst);
            let before = throttle.counts();
            let expected = formula(before, k, max, u64::from(min));
            let p = throttle.rejection_probability();
            assert!(
                (p - expected).abs() < 1e-12,
                "k {k} max {max} min {min}: counts {before:?}: {p} != {expected}"
            );
            assert!(p <= max);
            let r = svc.clone().oneshot(Request::new(())).await;
            made += 1;
            let after = throttle.counts();
            assert_eq!(after.0, made, "k {k}: every call is a request");
            assert!(after.1 <= after.0);
            if let Some(t) = throttled(&r) {
                refused += 1;
                assert!(
                    (t.probability() - expected).abs() < 1e-12,
                    "{t:?} vs {expected}"
                );
                assert_eq!(after.1, before.1);
            } else {
                assert_eq!(after.1, before.1 + u64::from(s == 200));
            }
            advance(Duration::from_millis(1)).await;
        }
        assert_eq!(u64::from(seen.load(SeqCst)) + refused, made);
    }
}

/// `max_rejection(0)` never refuses, `min_requests(u32::MAX)` never refuses, and
/// `max_rejection(1)` with K = 1 keeps the probability below 1 (p = r / (r + 1)).
#[tokio::test(start_paused = true)]
async fn caps_and_minimums_at_their_extremes() {
    let status = Arc::new(AtomicU16::new(503));
    for b in [
        ThrottleLayer::builder().max_rejection(0.0).min_requests(0),
        ThrottleLayer::builder()
            .min_requests(u32::MAX)
            .max_rejection(1.0)
            .k(1.0),
    ] {
        let seen = Arc::new(AtomicU32::new(0));
        let throttle = b.seed(3).build().unwrap();
        let svc = throttle.layer(upstream(status.clone(), seen.clone()));
        for _ in 0..3000 {
            let r = svc.clone().oneshot(Request::new(())).await;
            assert!(throttled(&r).is_none(), "{throttle:?}");
        }
        assert_eq!(seen.load(SeqCst), 3000);
        assert_eq!(throttle.counts(), (3000, 0));
        assert_eq!(throttle.rejection_probability(), 0.0);
    }
    let seen = Arc::new(AtomicU32::new(0));
    let throttle = ThrottleLayer::builder()
        .k(1.0)
        .max_rejection(1.0)
        .min_requests(0)
        .seed(5)
        .build()
        .unwrap();
    assert_eq!(throttle.rejection_probability(), 0.0, "no requests: 0 / 1");
    let svc = throttle.layer(upstream(status.clone(), seen.clone()));
    let first = svc.clone().oneshot(Request::new(())).await;
    assert!(
        throttled(&first).is_none(),
        "the first call cannot be refused"
    );
    for _ in 0..2000 {
        let _ = svc.clone().oneshot(Request::new(())).await;
        let p = throttle.rejection_probability();
        assert!((0.0..1.0).contains(&p), "{p}");
    }
    // K = 1 and all accepted: never refused.
    let ok = Arc::new(AtomicU16::new(200));
    let throttle = ThrottleLayer::builder()
        .k(1.0)
        .max_rejection(1.0)
        .min_requests(0)
        .build()
        .unwrap();
    let svc = throttle.layer(upstream(ok, Arc::new(AtomicU32::new(0))));
    for _ in 0..1000 {
        assert!(throttled(&svc.clone().oneshot(Request::new(())).await).is_none());
    }
    assert_eq!(throttle.rejection_probability(), 0.0);
}

/// Settings at their boundaries are accepted or refused as documented.
#[test]
fn throttle_settings_at_their_boundaries() {
    let b = ThrottleLayer::builder;
    assert!(b().k(1.0).build().is_ok());
    assert!(b().k(f64::MAX).build().is_ok());
    assert!(b().k(1.0 - f64::EPSILON).build().is_err());
    assert!(b().k(f64::NAN).build().is_err());
    assert!(b().k(f64::INFINITY).build().is_err());
    assert!(b().max_rejection(0.0).build().is_ok());
    assert!(b().max_rejection(1.0).build().is_ok());
    assert!(b().max_rejection(f64::NAN).build().is_err());
    assert!(b().max_rejection(1.0 + f64::EPSILON).build().is_err());
    assert!(b().max_rejection(-f64::MIN_POSITIVE).build().is_err());
    assert!(b().window(Duration::from_secs(1)).build().is_ok());
    assert!(matches!(
        b().window(Duration::from_secs(1) - Duration::from_nanos(1))
            .build(),
        Err(InvalidLimitConfig::Zero(_))
    ));
    assert!(b().window(Duration::MAX).build().is_ok());
    assert!(b().min_requests(0).build().is_ok());
    assert!(b().min_requests(u32::MAX).build().is_ok());
}

/// The counts follow the documented window: `counts()` and `rejection_probability()` say "the
/// window's counts now"; after an idle spell longer than the window they must be empty, and the
/// probability 0 (the next call is not refused).
#[tokio::test(start_paused = true)]
async fn the_reported_counts_and_probability_forget_an_idle_window() {
    let status = Arc::new(AtomicU16::new(503));
    let seen = Arc::new(AtomicU32::new(0));
    let throttle = ThrottleLayer::builder()
        .window(Duration::from_secs(1))
        .k(1.0)
        .max_rejection(1.0)
        .min_requests(1)
        .seed(9)
        .build()
        .unwrap();
    let svc = throttle.layer(upstream(status.clone(), seen.clone()));
    for _ in 0..20 {
        let _ = svc.clone().oneshot(Request::new(())).await;
    }
    assert!(throttle.rejection_probability() > 0.5);
    advance(Duration::from_secs(5)).await;
    let reported = (throttle.counts(), throttle.rejection_probability());
    status.store(200, SeqCst);
    let next = svc.clone().oneshot(Request::new(())).await;
    assert!(
        throttled(&next).is_none(),
        "the next call after the idle spell"
    );
    assert_eq!(throttle.counts(), (1, 1));
    assert_eq!(
        reported,
        ((0, 0), 0.0),
        "five windows idle: counts() and rejection_probability() still report the old window \
         (the next call was not refused)"
    );
}

/// A model of the documented buckets: the window is cut into 20 slices; a count stays while its
/// slice is one of the last 20. Random steps (within a slice, a few slices, more than the
/// window, years), one call per step: the counts always match the model.
#[tokio::test(start_paused = true)]
async fn counts_follow_the_buckets_through_random_steps_and_jumps_of_years() {
    for window_ms in [1000u64, 1_000_001, 120_000] {
        let status = Arc::new(AtomicU16::new(200));
        let throttle = ThrottleLayer::builder()
            .window(Duration::from_millis(window_ms))
            .min_requests(u32::MAX)
            .seed(1)
            .build()
            .unwrap();
        let start = tokio::time::Instant::now();
        let bucket_ns = u128::from(window_ms) * 1_000_000 / 20;
        let svc = throttle.layer(upstream(status.clone(), Arc::new(AtomicU32::new(0))));
        let mut events: Vec<(u128, bool)> = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ window_ms;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for step in 0..600 {
            let ok = next() % 3 != 0;
            status.store(if ok { 200 } else { 503 }, SeqCst);
            let _ = svc.clone().oneshot(Request::new(())).await;
            let epoch = (tokio::time::Instant::now() - start).as_nanos() / bucket_ns;
            events.push((epoch, ok));
            let live: Vec<_> = events.iter().filter(|(e, _)| e + 20 > epoch).collect();
            let expected = (
                live.len() as u64,
                live.iter().filter(|(_, ok)| *ok).count() as u64,
            );
            assert_eq!(
                throttle.counts(),
                expected,
                "window {window_ms} ms, step {step}, epoch {epoch}"
            );
            let d = match next() % 10 {
                0 => Duration::from_millis(window_ms * (1 + next() % 3)),
                1 if step % 50 == 0 => Duration::from_secs(86_400 * 365 * (1 + next() % 5)),
                2 => Duration::from_nanos((bucket_ns as u64).saturating_sub(1)),
                3 => Duration::from_nanos(bucket_ns as u64),
                4 => Duration::ZERO,
                _ => Duration::from_millis(next() % (window_ms / 10).max(1)),
            };
            advance(d).await;
        }
    }
}

/// A window of exactly 1 s: a count 999 ms old is still in (it shares the 20th-last slice);
/// one 1 s old is out.
#[tokio::test(start_paused = true)]
async fn a_one_second_window_at_its_edges() {
    let status = Arc::new(AtomicU16::new(503));
    let throttle = ThrottleLayer::builder()
        .window(Duration::from_secs(1))
        .min_requests(u32::MAX)
        .build()
        .unwrap();
    let svc = throttle.layer(upstream(status.clone(), Arc::new(AtomicU32::new(0))));
    for _ in 0..5 {
        let _ = svc.clone().oneshot(Request::new(())).await;
    }
    advance(Duration::from_millis(999)).await;
    let _ = svc.clone().oneshot(Request::new(())).await;
    assert_eq!(throttle.counts(), (6, 0));
    advance(Duration::from_millis(1)).await;
    let _ = svc.clone().oneshot(Request::new(())).await;
    assert_eq!(throttle.counts(), (2, 0), "the five 1 s old are out");
    advance(Duration::from_secs(1)).await;
    let _ = svc.clone().oneshot(Request::new(())).await;
    assert_eq!(throttle.counts(), (1, 0));
}

/// A window of `Duration::MAX`: counts never expire, years pass without a panic, and the
/// throttle still refuses and lets through.
#[tokio::test(start_paused = true)]
async fn a_duration_max_window_and_jumps_of_years() {
    let status = Arc::new(AtomicU16::new(503));
    let seen = Arc::new(AtomicU32::new(0));
    let throttle = ThrottleLayer::builder()
        .window(Duration::MAX)
        .k(1.0)
        .min_requests(1)
        .seed(11)
        .build()
        .unwrap();
    let svc = throttle.layer(upstream(status.clone(), seen.clone()));
    for i in 0..200u64 {
        let _ = svc.clone().oneshot(Request::new(())).await;
        if i % 20 == 0 {
            advance(Duration::from_secs(86_400 * 365 * 20)).await;
        }
    }
    assert_eq!(throttle.counts(), (200, 0), "nothing expires");
    assert!(throttle.rejection_probability() > 0.7);
    assert!(seen.load(SeqCst) < 200);
}

/// Refusals of a limit below (LimitExceeded, PolicyRejected) count nowhere, timeouts below count
/// as requests without an accept, and a call dropped before its answer counts nowhere; a call
/// refused locally is a request even if its future is never polled.
#[tokio::test(start_paused = true)]
async fn what_counts_and_what_does_not() {
    let throttle = ThrottleLayer::builder()
        .min_requests(u32::MAX)
        .build()
        .unwrap();
    let limit = ConcurrencyLimitLayer::new(1);
    let gates = Gates::default();
    let svc = throttle.layer(limit.layer(gates.service()));
    let held = tokio::spawn(svc.clone().oneshot(Request::new(0)));
    settle().await;
    for _ in 0..50 {
        let e = svc.clone().oneshot(Request::new(1)).await.unwrap_err();
        assert!(e.is::<LimitExceeded>(), "{e}");
    }
    assert_eq!(
        throttle.counts(),
        (0, 0),
        "the limit's refusals count nowhere"
    );
    gates.answer_oldest(200);
    held.await.unwrap().unwrap();
    assert_eq!(throttle.counts(), (1, 1));
    // A call dropped before its answer: nowhere.
    let dropped = tokio::spawn(svc.clone().oneshot(Request::new(2)));
    settle().await;
    dropped.abort();
    let _ = dropped.await;
    assert_eq!(throttle.counts(), (1, 1));
    gates.answer_oldest(200);
    // A timeout below: a request, not an accept.
    #[derive(Debug)]
    struct Late;
    impl std::fmt::Display for Late {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("late")
        }
    }
    impl std::error::Error for Late {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&TimedOut::INSTANCE)
        }
    }
    let t2 = ThrottleLayer::builder()
        .min_requests(u32::MAX)
        .build()
        .unwrap();
    let late = t2.layer(service_fn(|_r: Request<()>| async {
        Err::<Response<()>, BoxError>(Box::new(Late))
    }));
    for _ in 0..3 {
        assert!(late.clone().oneshot(Request::new(())).await.is_err());
    }
    assert_eq!(t2.counts(), (3, 0));
    // A locally refused call is a request even unpolled.
    let t3 = ThrottleLayer::builder()
        .min_requests(0)
        .max_rejection(1.0)
        .k(1.0)
        .seed(1)
        .build()
        .unwrap();
    let mut s3 = t3.layer(upstream(
        Arc::new(AtomicU16::new(503)),
        Arc::new(AtomicU32::new(0)),
    ));
    for _ in 0..200 {
        let _ = s3.ready().await.unwrap().call(Request::new(())).await;
    }
    let (r0, a0) = t3.counts();
    let mut unpolled = Vec::new();
    for _ in 0..100 {
        unpolled.push(s3.ready().await.unwrap().call(Request::new(())));
    }
    let (r1, a1) = t3.counts();
    assert_eq!(a1, a0);
    assert!(r1 > r0, "refused calls count at once");
    drop(unpolled);
    assert!(t3.counts().0 <= r1);
}

/// Many OS threads call through one throttle (1 s window: slices roll every 50 ms under real
/// time) against an upstream refusing about half; a sampler reads the counts throughout. They
/// stay consistent: accepts ≤ requests ≤ calls made, no underflow, no panic.
#[test]
fn concurrent_calls_keep_the_counts_consistent() {
    let throttle = ThrottleLayer::builder()
        .window(Duration::from_secs(1))
        .min_requests(1)
        .k(1.0)
        .max_rejection(0.9)
        .build()
        .unwrap();
    let made = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let counter = Arc::new(AtomicU32::new(0));
    let inner = {
        let counter = counter.clone();
        service_fn(move |_r: Request<()>| {
            let n = counter.fetch_add(1, SeqCst);
            let mut res = Response::new(());
            if n % 2 == 0 {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            std::future::ready(Ok::<_, Infallible>(res))
        })
    };
    let svc = throttle.layer(inner);
    std::thread::scope(|sc| {
        let sampler = {
            let (throttle, made, stop, bad) =
                (throttle.clone(), made.clone(), stop.clone(), bad.clone());
            sc.spawn(move || {
                let mut n = 0u64;
                while !stop.load(SeqCst) && n < 50_000_000 {
                    n += 1;
                    let (r, a) = throttle.counts();
                    let m = u64::from(made.load(SeqCst));
                    let p = throttle.rejection_probability();
                    if a > r || r > m || !(0.0..=0.9).contains(&p) {
                        bad.lock()
                            .unwrap()
                            .push(format!("counts ({r}, {a}), made {m}, p {p}"));
                    }
                }
            })
        };
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (svc, made) = (svc.clone(), made.clone());
                sc.spawn(move || {
                    for _ in 0..60_000 {
                        made.fetch_add(1, SeqCst);
                        let r = svc
                            .clone()
                            .oneshot(Request::new(()))
                            .now_or_never()
                            .unwrap();
                        if let Err(e) = r {
                            assert!(e.is::<Throttled>(), "{e}");
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, SeqCst);
        sampler.join().unwrap();
    });
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} inconsistent readings, first: {:?}",
        bad.len(),
        bad.first()
    );
    let (r, a) = throttle.counts();
    assert!(a <= r && r <= u64::from(made.load(SeqCst)), "({r}, {a})");
    // (That the window forgets idle counts is checked on paused time above.)
}
