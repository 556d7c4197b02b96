//! Hostile tests of the per-key breaker's per-thread stripes: the thread that makes a key's
//! breaker counts on its first stripe if that thread is numbered below 8, each other thread
//! numbered below 8 on a stripe of its own made at its first call (bumped with a plain load
//! and store), later threads on eight more shared by thread number; a service's memo and each
//! thread's last keys remember the calling thread's stripe. Public API only.
//!
//! What is checked: counts are exact whatever the threads (hundreds of OS threads, a
//! work-stealing runtime, instances moved between threads, futures completed on other
//! threads); a handle taken before other threads call sees their counts; idle eviction sees
//! keys only other threads call, and still evicts idle ones; trips, rate windows and
//! half-open probes see every thread; eviction and re-creation while threads remember old
//! stripes; floods stay bounded and dropped breakers free every stripe (their streams end);
//! calls from thread-local destructors; the client presets over real sockets.
//!
//! Which threads get numbers below 8 depends on which threads of the test binary used a
//! stripe first, so the tests whose point is the exclusive stripes run again in a child
//! process of this binary (`*_fresh_process_*` runs `child_*`, a no-op otherwise), where the
//! numbering starts from 0 and the test knows which thread has which kind of stripe.
//!
//! Paused tokio time wherever time matters (threads that call enter the paused runtime, so
//! they read its clock); real threads only with invariants that hold for every interleaving;
//! loopback sockets with ephemeral ports for the transport tests (one generous timeout as a
//! hang guard, no timing assertions). Every loop is bounded.

mod support;

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use steadfast::breaker::{BreakerState, Transitions};
use steadfast::common::BoxError;
use steadfast_core::__private::thread_number;
use support::stripes::*;
use tokio::runtime::Runtime;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Whether `tr` ends (its breaker is gone) within a minute of paused time; drains what was
/// sent before.
fn stream_ends(rt: &Runtime, tr: &mut Transitions) -> bool {
    rt.block_on(async {
        for _ in 0..1000 {
            match tokio::time::timeout(Duration::from_secs(60), tr.recv()).await {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
        false
    })
}

// ---------------------------------------------------------------------------------------
// The child process: a fresh thread numbering.
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// 1. Exact counts.
// ---------------------------------------------------------------------------------------

/// Hundreds of fresh OS threads in waves (thread numbers well past 8, 16 and 255), each with
/// its own instance (cloned from one the main thread used, so it starts with the main
/// thread's memo), a fresh clone per call, a forced-open key, and its instance handed to the
/// next thread of its wave half-way (a ring: each continues with its neighbour's, whose memo
/// points at the neighbour's stripe). A handle taken before any other thread called sees
/// every count; so does one taken after.
fn hundreds_of_threads(layer: &PathLayer, waves: usize, per_wave: usize) -> Vec<usize> {
    const CALLS: usize = 60;
    let template = layer.layer(upstream());
    let k = "/k".to_owned();
    let before = layer.handle(&k); // the main thread makes the breaker
    let forced = layer.handle(&"/forced".to_owned());
    forced.force_open();
    let mut mine = template.clone();
    let mut expect = Tally::default();
    let mut rejected = 0;
    for i in 0..10 {
        expect.add(call_now(&mut mine, rq("/k", i % 3 == 0)));
    }
    let mut numbers = Vec::new();
    for wave in 0..waves {
        let barrier = Arc::new(Barrier::new(per_wave));
        let (txs, rxs): (Vec<_>, Vec<_>) =
            (0..per_wave).map(|_| mpsc::channel::<PathSvc>()).unzip();
        let mut rxs: Vec<_> = rxs.into_iter().map(Some).collect();
        let threads: Vec<_> = (0..per_wave)
            .map(|j| {
                let to_next = txs[(j + 1) % per_wave].clone();
                let from_prev = rxs[j].take().unwrap();
                let template = template.clone();
                let mut own = mine.clone();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let number = thread_number();
                    let (mut t, mut rejected) = (Tally::default(), 0u64);
                    barrier.wait();
                    for i in 0..CALLS {
                        if i == CALLS / 2 {
                            to_next.send(own).unwrap();
                            own = from_prev
                                .recv_timeout(Duration::from_secs(60))
                                .expect("the neighbour's instance");
                        }
                        let fail = (i + j + wave) % 4 == 0;
                        let g = match i % 3 {
                            0 => call_now(&mut own, rq("/k", fail)),
                            1 => call_now(&mut template.clone(), rq("/k", fail)),
                            _ => {
                                let r = call_now(&mut own, rq("/forced", false));
                                assert_eq!(r, Got::Rejected);
                                rejected += 1;
                                call_now(&mut own, rq("/k", fail))
                            }
                        };
                        t.add(g);
                    }
                    (number, t, rejected)
                })
            })
            .collect();
        drop(txs);
        for th in threads {
            let (n, t, r) = th.join().expect("a calling thread panicked");
            numbers.push(n);
            expect.merge(t);
            rejected += r;
        }
        // Exact after every wave, through the handle taken before any other thread called.
        let m = before.metrics();
        assert_eq!(
            (m.calls, m.failures, m.rejected, m.slow),
            (expect.admitted(), expect.failed, 0, 0),
            "wave {wave}: counts lost or doubled"
        );
    }
    assert_eq!(expect.rejected, 0, "the key never trips");
    let after = layer.handle(&k).metrics();
    assert_eq!(
        (after.calls, after.failures),
        (expect.admitted(), expect.failed)
    );
    let f = forced.metrics();
    assert_eq!((f.calls, f.rejected), (0, rejected));
    assert_eq!(
        layer.handle(&"/forced".to_owned()).metrics().rejected,
        rejected
    );
    numbers
}

#[test]
fn a1_exact_counts_from_hundreds_of_os_threads() {
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let numbers = hundreds_of_threads(&layer, 12, 24);
    let max = numbers.iter().copied().max().unwrap();
    assert!(
        max >= 256,
        "thread numbers past 255 not reached ({max}): the test is moot"
    );
}

/// A1 in a fresh process: the main thread (number 0) makes the key, the first seven
/// threads of the first wave count on stripes of their own, the rest on shared ones.
#[test]
fn a1_fresh_process_exclusive_and_shared_stripes() {
    run_in_child("child_a1_exclusive_and_shared_stripes");
}

#[test]
fn child_a1_exclusive_and_shared_stripes() {
    if !in_child("child_a1_exclusive_and_shared_stripes") {
        return;
    }
    let me = thread_number();
    assert!(me < 8, "the child's test thread is numbered {me}");
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let numbers = hundreds_of_threads(&layer, 3, 24);
    let exclusive = numbers.iter().filter(|&&n| n < 8).count();
    assert!(
        exclusive >= 6,
        "only {exclusive} threads with stripes of their own: {numbers:?}"
    );
    println!("thread numbers {numbers:?}");
}

/// An exclusive-stripe thread keeps calling through its own instance while its memo, copied
/// into clones, is used on every other exclusive-stripe thread at the same time (a clone
/// made on thread A, moved to B, starts with A's memo): no stripe written by two threads,
/// so no count lost. Runs in a fresh process so that the threads are the first eight.
#[test]
fn a2_fresh_process_memos_moved_between_exclusive_threads() {
    run_in_child("child_a2_memos_moved_between_exclusive_threads");
}

#[test]
fn child_a2_memos_moved_between_exclusive_threads() {
    if !in_child("child_a2_memos_moved_between_exclusive_threads") {
        return;
    }
    const ROUNDS: usize = 200;
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let k = "/k".to_owned();
    let h = layer.handle(&k);
    let template = layer.layer(upstream());
    // Workers 1..=7 (exclusive stripes), each with an instance whose memo is its own stripe.
    let workers: Vec<Worker<PathSvc>> = (0..7)
        .map(|_| {
            let t = template.clone();
            Worker::spawn(None, move || t)
        })
        .collect();
    let nums: Vec<usize> = workers.iter().map(|w| w.number).collect();
    assert!(
        nums.iter().all(|&n| n < 8),
        "not the first threads: {nums:?}"
    );
    let mut expect = Tally::default();
    for w in &workers {
        expect.add(w.run(|s| call_now(s, rq("/k", false))));
    }
    for round in 0..20 {
        // Each worker hands a clone of its instance (its memo: its own stripe) to the next
        // worker; all then call at once, each through its own instance and the neighbour's
        // clone in turn.
        let clones: Vec<PathSvc> = workers.iter().map(|w| w.run(|s| s.clone())).collect();
        let barrier = Arc::new(Barrier::new(workers.len()));
        let answers: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut theirs = clones[(i + 1) % clones.len()].clone();
                let barrier = barrier.clone();
                w.submit(move |own: &mut PathSvc| {
                    let mut t = Tally::default();
                    barrier.wait();
                    for c in 0..ROUNDS {
                        let fail = (c + round) % 5 == 0;
                        t.add(call_now(own, rq("/k", fail)));
                        t.add(call_now(&mut theirs, rq("/k", fail)));
                    }
                    t
                })
            })
            .collect();
        for a in answers {
            expect.merge(a.recv_timeout(Duration::from_secs(120)).unwrap());
        }
        let m = h.metrics();
        assert_eq!(
            (m.calls, m.failures),
            (expect.admitted(), expect.failed),
            "round {round}"
        );
    }
}

/// A multi-thread runtime with work stealing: tasks call one key through their own
/// instance and fresh clones, hand their instance to a task spawned anywhere, and call from
/// the blocking pool (more threads). Counts exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a3_exact_counts_multi_thread_runtime_work_stealing() {
    async fn call<S, B>(svc: &mut S, r: Request<()>) -> Got
    where
        S: Service<Request<()>, Response = Response<B>, Error = BoxError>,
    {
        let s = svc.ready().await.unwrap();
        got_of(s.call(r).await)
    }
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let k = "/k".to_owned();
    let h = layer.handle(&k);
    let forced = layer.handle(&"/forced".to_owned());
    forced.force_open();
    let template = layer.layer(upstream());
    let work = async {
        let mut tasks = Vec::new();
        for t in 0..32usize {
            let template = template.clone();
            tasks.push(tokio::spawn(async move {
                let mut own = template.clone();
                let mut tally = Tally::default();
                let mut rejected = 0u64;
                for i in 0..80usize {
                    let fail = (t * 7 + i) % 5 == 0;
                    match i % 4 {
                        0 => tally.add(call(&mut own, rq("/k", fail)).await),
                        1 => tally.add(call(&mut template.clone(), rq("/k", fail)).await),
                        2 => {
                            // The instance goes to another task (any worker) and comes back.
                            let (back, g) = tokio::spawn(async move {
                                let g = call(&mut own, rq("/k", fail)).await;
                                (own, g)
                            })
                            .await
                            .unwrap();
                            own = back;
                            tally.add(g);
                        }
                        _ => {
                            let (back, g, r) = tokio::task::spawn_blocking(move || {
                                let g = call_now(&mut own, rq("/k", fail));
                                let r = call_now(&mut own, rq("/forced", false));
                                (own, g, r)
                            })
                            .await
                            .unwrap();
                            own = back;
                            tally.add(g);
                            assert_eq!(r, Got::Rejected);
                            rejected += 1;
                        }
                    }
                    tokio::task::yield_now().await;
                }
                (tally, rejected)
            }));
        }
        let mut all = Tally::default();
        let mut rejected = 0;
        for t in tasks {
            let (tally, r) = t.await.unwrap();
            all.merge(tally);
            rejected += r;
        }
        (all, rejected)
    };
    let (all, rejected) = tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("hang guard");
    assert_eq!(all.admitted(), 32 * 80);
    let m = h.metrics();
    assert_eq!(
        (m.calls, m.failures, m.rejected),
        (all.admitted(), all.failed, 0)
    );
    assert_eq!(forced.metrics().rejected, rejected);
}

/// A handle taken before other threads first call the key (by a thread that then exits)
/// sees each thread's calls as soon as it joined, thread after thread (each a new stripe made
/// after the handle was taken).
#[test]
fn a4_handle_taken_before_sees_every_later_thread() {
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let template = layer.layer(upstream());
    let k = "/k".to_owned();
    // The key's maker is a thread that exits at once.
    let (l2, k2) = (layer.clone(), k.clone());
    let early = thread::spawn(move || l2.handle(&k2)).join().unwrap();
    let mut expect = Tally::default();
    for t in 0..40usize {
        let mut s = template.clone();
        let got = thread::spawn(move || {
            let mut tally = Tally::default();
            for i in 0..=t % 4 {
                tally.add(call_now(&mut s, rq("/k", i == 1)));
            }
            tally
        })
        .join()
        .unwrap();
        expect.merge(got);
        let m = early.metrics();
        assert_eq!(
            (m.calls, m.failures),
            (expect.admitted(), expect.failed),
            "after thread {t}"
        );
    }
}

/// `build_per_authority`: 30 threads at once call one upstream under case variants of its
/// authority (one key), through fresh clones of one instance, and another upstream: one
/// breaker per upstream, every call counted on it.
#[test]
fn a5_per_authority_case_variants_from_many_threads() {
    let layer = builder()
        .consecutive_failures(NEVER)
        .build_per_authority()
        .unwrap();
    let template = layer.layer(upstream());
    let req = |host: &str, fail: bool| {
        let q = if fail { "?fail" } else { "" };
        Request::get(format!("http://{host}/{q}")).body(()).unwrap()
    };
    let key = |host: &str| Some(host.parse::<http::uri::Authority>().unwrap());
    let before = layer.handle(&key("orders:8080"));
    let barrier = Arc::new(Barrier::new(30));
    let threads: Vec<_> = (0..30usize)
        .map(|t| {
            let template = template.clone();
            let b = barrier.clone();
            thread::spawn(move || {
                let (mut orders, mut users) = (Tally::default(), Tally::default());
                b.wait();
                for i in 0..40usize {
                    let host = ["orders:8080", "ORDERS:8080", "Orders:8080"][(t + i) % 3];
                    orders.add(call_now(&mut template.clone(), req(host, i % 7 == 0)));
                    users.add(call_now(&mut template.clone(), req("users:1", false)));
                }
                (orders, users)
            })
        })
        .collect();
    let (mut orders, mut users) = (Tally::default(), Tally::default());
    for t in threads {
        let (o, u) = t.join().unwrap();
        orders.merge(o);
        users.merge(u);
    }
    assert_eq!(layer.len(), 2, "{:?}", layer.keys());
    let m = before.metrics();
    assert_eq!((m.calls, m.failures), (orders.admitted(), orders.failed));
    assert_eq!(orders.admitted(), 1200);
    assert_eq!(
        layer.handle(&key("USERS:1")).metrics().calls,
        users.admitted()
    );
}

// ---------------------------------------------------------------------------------------
// 2. Idle eviction.
// ---------------------------------------------------------------------------------------

/// An open breaker that the main thread made, then only other threads call (each after a
/// first call at time 0, through its own instance): 15 minutes later, with an idle time of
/// one minute, it is in use (kept when a new key needs its shard's room); once nobody calls
/// for two minutes it is idle (evicted). `callers` picks the calling workers out of 20.
fn open_key_called_only_by_others(callers: impl Fn(&[Worker<SlotSvc>]) -> Vec<usize>) {
    let rt = paused_rt();
    let _entered = rt.enter();
    let layer = slot_layer(
        tripping()
            .max_keys(16)
            .idle_eviction(Duration::from_secs(60)),
    );
    let template = layer.layer(upstream());
    let k = Slot(7);
    assert_eq!(call_now(&mut template.clone(), rq("/7", true)), Got::Failed);
    let h = layer.handle(&k);
    assert_eq!(h.state(), BreakerState::Open);
    let workers: Vec<Worker<SlotSvc>> = (0..20)
        .map(|_| {
            let t = template.clone();
            Worker::spawn(Some(rt.handle().clone()), move || t)
        })
        .collect();
    let callers = callers(&workers);
    assert!(!callers.is_empty());
    for &c in &callers {
        assert_eq!(
            workers[c].run(|s| call_now(s, rq("/7", false))),
            Got::Rejected
        );
    }
    for step in 0..20 {
        rt.block_on(advance(Duration::from_secs(45)));
        let w = &workers[callers[step % callers.len()]];
        assert_eq!(w.run(|s| call_now(s, rq("/7", false))), Got::Rejected);
        assert_eq!(layer.len(), 1, "step {step}");
    }
    // A new key in the (one-breaker) shard: the open breaker used just now must stay.
    let _ = layer.handle(&Slot(100)).state();
    assert_eq!(
        layer.keys(),
        vec![k.clone()],
        "an open breaker other threads used 0 s ago was evicted as idle"
    );
    let w = &workers[callers[0]];
    assert_eq!(w.run(|s| call_now(s, rq("/7", false))), Got::Rejected);
    assert_eq!(
        h.metrics().rejected,
        callers.len() as u64 + 21,
        "the calls went to another breaker"
    );
    // Unused for two minutes: idle, evicted for the next new key.
    rt.block_on(advance(Duration::from_secs(120)));
    let _ = layer.handle(&Slot(101)).state();
    assert_eq!(
        layer.keys(),
        vec![Slot(101)],
        "an idle open breaker was kept"
    );
    drop(workers);
}

/// Thread B alone (the last of 20 workers).
#[test]
fn b1_open_key_called_only_by_one_other_thread_is_not_idle() {
    open_key_called_only_by_others(|w| vec![w.len() - 1]);
}

/// Only threads numbered 8 or more (stripes shared by thread number).
#[test]
fn b2_open_key_called_only_by_late_threads_is_not_idle() {
    open_key_called_only_by_others(|w| {
        (0..w.len())
            .filter(|&i| w[i].number >= 8)
            .collect::<Vec<_>>()
    });
}

/// In a fresh process: only threads with stripes of their own (numbers 1-7).
#[test]
fn b3_fresh_process_open_key_called_only_by_exclusive_threads_is_not_idle() {
    run_in_child("child_b3_exclusive_threads_only");
}

#[test]
fn child_b3_exclusive_threads_only() {
    if !in_child("child_b3_exclusive_threads_only") {
        return;
    }
    open_key_called_only_by_others(|w| {
        let ex: Vec<usize> = (0..w.len()).filter(|&i| w[i].number < 8).collect();
        assert!(ex.len() >= 6, "workers with stripes of their own: {ex:?}");
        ex
    });
}

/// In a fresh process: one thread with a stripe of its own (number 1) calls the key.
#[test]
fn b3_fresh_process_open_key_called_only_by_one_exclusive_thread_is_not_idle() {
    run_in_child("child_b3_one_exclusive_thread");
}

#[test]
fn child_b3_one_exclusive_thread() {
    if !in_child("child_b3_one_exclusive_thread") {
        return;
    }
    open_key_called_only_by_others(|w| {
        assert!(w[0].number < 8, "{}", w[0].number);
        vec![0]
    });
}

/// Two Closed keys in a two-breaker shard, the least recently used goes: `a` is made by
/// the main thread and then called only by another thread (through its memo), at 200 s;
/// `b` is called by the main thread at 100 s. At 300 s a new key evicts `b`, not `a`, for
/// every kind of calling thread.
#[test]
fn b4_least_recently_used_counts_other_threads_stripes() {
    let rt = paused_rt();
    let _entered = rt.enter();
    let workers: Vec<Worker<Option<SlotSvc>>> = (0..20)
        .map(|_| Worker::spawn(Some(rt.handle().clone()), || None))
        .collect();
    for (i, w) in workers.iter().enumerate() {
        let layer = slot_layer(
            builder()
                .max_keys(32)
                .idle_eviction(Duration::from_secs(3600)),
        );
        let template = layer.layer(upstream());
        let mut mine = template.clone();
        let (a, b) = (Slot(1), Slot(2));
        let ha = layer.handle(&a);
        let hb = layer.handle(&b);
        let t = template.clone();
        // The worker's first call (a lookup, which marks the first stripe) at 0 s.
        assert_eq!(
            w.run(move |st| call_now(st.insert(t), rq("/1", false))),
            Got::Ok
        );
        rt.block_on(advance(Duration::from_secs(100)));
        assert_eq!(call_now(&mut mine, rq("/2", false)), Got::Ok);
        rt.block_on(advance(Duration::from_secs(100)));
        assert_eq!(
            w.run(|st| call_now(st.as_mut().unwrap(), rq("/1", false))),
            Got::Ok
        );
        rt.block_on(advance(Duration::from_secs(100)));
        let _ = layer.handle(&Slot(3)).state();
        let mut keys = layer.keys();
        keys.sort_by_key(|s| s.0);
        assert_eq!(
            keys,
            vec![a.clone(), Slot(3)],
            "worker {i} (thread {}): the key used last (by another thread) was evicted",
            w.number
        );
        assert_eq!((ha.metrics().calls, hb.metrics().calls), (2, 1));
        w.run(|st| *st = None);
    }
}

// ---------------------------------------------------------------------------------------
// 3. The 32-bit last-used second.
// ---------------------------------------------------------------------------------------

/// An open breaker called every 30 s, idle time one minute: a new key in its shard must not
/// evict it. `offset` is how far the clock has moved since the layer was made.
fn open_breaker_in_use_after(offset: Duration) -> Vec<Slot> {
    let rt = paused_rt();
    let _entered = rt.enter();
    let layer = slot_layer(
        tripping()
            .max_keys(16)
            .idle_eviction(Duration::from_secs(60)),
    );
    let template = layer.layer(upstream());
    rt.block_on(advance(offset));
    let mut s = template.clone();
    assert_eq!(call_now(&mut s, rq("/7", true)), Got::Failed);
    let h = layer.handle(&Slot(7));
    assert_eq!(h.state(), BreakerState::Open);
    for _ in 0..10 {
        rt.block_on(advance(Duration::from_secs(30)));
        assert_eq!(call_now(&mut s, rq("/7", false)), Got::Rejected);
        // And from another thread.
        let mut t = template.clone();
        let handle = rt.handle().clone();
        let g = thread::spawn(move || {
            let _e = handle.enter();
            call_now(&mut t, rq("/7", false))
        })
        .join()
        .unwrap();
        assert_eq!(g, Got::Rejected);
    }
    let _ = layer.handle(&Slot(100)).state();
    layer.keys()
}

/// Control: a year in, the breaker in use is kept.
#[test]
fn c1_open_breaker_in_use_kept_a_year_in() {
    let keys = open_breaker_in_use_after(Duration::from_secs(365 * 86_400));
    assert_eq!(keys, vec![Slot(7)]);
}

/// Past 2^32 seconds after the layer was made (136 years; paused time gets there at once) an
/// open breaker in use is still not idle. Each stripe keeps the lowest 32 bits of its
/// last-used second (a stripe stays one cache line); when they saturated instead, every key
/// looked idle past that point and the next new key of the shard evicted (reset to Closed)
/// an open breaker protecting its callers.
#[test]
fn c2_an_open_breaker_in_use_is_kept_past_2_pow_32_seconds() {
    let keys = open_breaker_in_use_after(Duration::from_secs((1 << 32) + 10));
    assert_eq!(
        keys,
        vec![Slot(7)],
        "an open breaker used 0 s ago was evicted as idle"
    );
}

/// Clocks far out (past 2^32 s and 2^33 s), an idle time of `Duration::MAX` and of zero, on
/// several threads: no panic, no overflow; counts exact; `Duration::MAX` never idle (an open
/// breaker stays), zero always idle (even an open breaker goes).
#[test]
fn c3_far_clocks_and_extreme_idle_times_do_not_panic() {
    for (idle, open_kept) in [(Duration::MAX, true), (Duration::ZERO, false)] {
        let rt = paused_rt();
        let _entered = rt.enter();
        let layer = slot_layer(tripping().max_keys(16).idle_eviction(idle));
        let template = layer.layer(upstream());
        let mut expect = Tally::default();
        for jump in [(1u64 << 32) - 5, 10, 1 << 33] {
            rt.block_on(advance(Duration::from_secs(jump)));
            for t in 0..6 {
                let mut s = template.clone();
                let handle = rt.handle().clone();
                let g = thread::spawn(move || {
                    let _e = handle.enter();
                    call_now(&mut s, rq("/5", false))
                })
                .join()
                .expect("a call panicked");
                expect.add(g);
                if t == 0 {
                    expect.add(call_now(&mut template.clone(), rq("/5", false)));
                }
            }
        }
        let h = layer.handle(&Slot(5));
        assert_eq!(h.metrics().calls, expect.admitted());
        // Trip it; a new key: kept for ever with `Duration::MAX`, gone with zero.
        assert_eq!(call_now(&mut template.clone(), rq("/5", true)), Got::Failed);
        assert_eq!(h.state(), BreakerState::Open);
        let _ = layer.handle(&Slot(6)).state();
        assert_eq!(layer.keys().contains(&Slot(5)), open_kept, "idle {idle:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 4. One state machine for all threads.
// ---------------------------------------------------------------------------------------

/// Consecutive failures from different threads (one each, all at once) add up: 19 of 20 do
/// not trip, the 20th (from yet another thread) does.
#[test]
fn d1_consecutive_failures_from_many_threads_trip() {
    let layer = path_layer(builder().consecutive_failures(Some(20)));
    let template = layer.layer(upstream());
    let h = layer.handle(&"/k".to_owned());
    let barrier = Arc::new(Barrier::new(19));
    let threads: Vec<_> = (0..19)
        .map(|_| {
            let mut s = template.clone();
            let b = barrier.clone();
            thread::spawn(move || {
                b.wait();
                call_now(&mut s, rq("/k", true))
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Got::Failed);
    }
    let m = h.metrics();
    assert_eq!(
        (m.state, m.consecutive_failures, m.failures),
        (BreakerState::Closed, 19, 19)
    );
    let mut s = template.clone();
    assert_eq!(
        thread::spawn(move || call_now(&mut s, rq("/k", true)))
            .join()
            .unwrap(),
        Got::Failed
    );
    assert_eq!(h.state(), BreakerState::Open);
    assert_eq!(
        call_now(&mut template.clone(), rq("/k", false)),
        Got::Rejected
    );
    let m = h.metrics();
    assert_eq!((m.calls, m.failures, m.rejected), (20, 20, 1));
}

/// A count window's failure rate over calls from 25 threads (4 each, all at once): 50 of 100
/// failed trips at 50 %, 49 does not; the window counts every thread's calls.
#[test]
fn d2_failure_rate_window_sees_every_thread() {
    for failures in [49usize, 50] {
        let layer = path_layer(
            builder()
                .consecutive_failures(None)
                .count_window(100)
                .min_calls(100)
                .failure_rate(50),
        );
        let template = layer.layer(upstream());
        let h = layer.handle(&"/k".to_owned());
        let barrier = Arc::new(Barrier::new(25));
        let threads: Vec<_> = (0..25)
            .map(|t| {
                let mut s = template.clone();
                let b = barrier.clone();
                thread::spawn(move || {
                    b.wait();
                    let mut tally = Tally::default();
                    for i in 0..4 {
                        tally.add(call_now(&mut s, rq("/k", t * 4 + i < failures)));
                    }
                    tally
                })
            })
            .collect();
        let mut all = Tally::default();
        for t in threads {
            all.merge(t.join().unwrap());
        }
        assert_eq!(
            (all.ok, all.failed, all.rejected),
            (100 - failures as u64, failures as u64, 0)
        );
        let m = h.metrics();
        let w = m.window.expect("a window");
        assert_eq!((m.calls, m.failures), (100, failures as u64));
        assert_eq!(w.calls, 100, "{w:?}");
        let want = if failures >= 50 {
            BreakerState::Open
        } else {
            BreakerState::Closed
        };
        assert_eq!(m.state, want, "{failures} failures of 100: {m:?}");
    }
}

/// Half-open with three probes: twenty threads call at once (each admitted call held,
/// unfinished): exactly three are admitted; finished on the main thread, they close the
/// breaker. A failed probe from another thread reopens it.
#[test]
fn d3_half_open_probes_across_threads() {
    let rt = paused_rt();
    let _entered = rt.enter();
    let layer = path_layer(builder().consecutive_failures(Some(1)).half_open_probes(3));
    let template = layer.layer(upstream());
    let h = layer.handle(&"/k".to_owned());
    for round in 0..3 {
        assert_eq!(call_now(&mut template.clone(), rq("/k", true)), Got::Failed);
        assert_eq!(h.state(), BreakerState::Open, "round {round}");
        rt.block_on(advance(Duration::from_secs(31)));
        let before = h.metrics();
        let barrier = Arc::new(Barrier::new(20));
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let mut s = template.clone();
                let b = barrier.clone();
                let handle = rt.handle().clone();
                thread::spawn(move || {
                    let _e = handle.enter();
                    s.ready().now_or_never().unwrap().unwrap();
                    b.wait();
                    // Admitted or rejected here, in `call`; not finished yet.
                    s.call(rq("/k", false))
                })
            })
            .collect();
        let futures: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let outcomes: Vec<Got> = futures
            .into_iter()
            .map(|f| got_of(f.now_or_never().expect("answers at once")))
            .collect();
        let admitted = outcomes.iter().filter(|g| **g == Got::Ok).count();
        assert_eq!(admitted, 3, "round {round}: {outcomes:?}");
        let m = h.metrics();
        assert_eq!(m.state, BreakerState::Closed, "round {round}: {m:?}");
        assert_eq!(
            (m.calls - before.calls, m.rejected - before.rejected),
            (3, 17)
        );
    }
    // A failed probe, from another thread, reopens.
    assert_eq!(call_now(&mut template.clone(), rq("/k", true)), Got::Failed);
    rt.block_on(advance(Duration::from_secs(61)));
    let mut s = template.clone();
    let handle = rt.handle().clone();
    let g = thread::spawn(move || {
        let _e = handle.enter();
        call_now(&mut s, rq("/k", true))
    })
    .join()
    .unwrap();
    assert_eq!(g, Got::Failed);
    assert_eq!(h.state(), BreakerState::Open);
}

/// Slow calls: admitted on twenty threads (each on its own stripe), finished on the main
/// thread after the clock moved past the threshold (outcomes are counted on the admitting
/// thread's stripe from another thread); half of them finished before: exactly ten slow.
#[test]
fn d4_slow_calls_admitted_on_many_threads_finished_elsewhere() {
    let rt = paused_rt();
    let _entered = rt.enter();
    let layer = path_layer(
        builder()
            .consecutive_failures(None)
            .count_window(1000)
            .min_calls(1000)
            .slow_calls(Duration::from_secs(1), 100),
    );
    let template = layer.layer(upstream());
    let h = layer.handle(&"/k".to_owned());
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let mut s = template.clone();
            let handle = rt.handle().clone();
            thread::spawn(move || {
                let _e = handle.enter();
                s.ready().now_or_never().unwrap().unwrap();
                s.call(rq("/k", i % 4 == 0))
            })
        })
        .collect();
    let mut futures: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let late = futures.split_off(10);
    let mut expect = Tally::default();
    for f in futures {
        expect.add(got_of(f.now_or_never().unwrap()));
    }
    rt.block_on(advance(Duration::from_secs(2)));
    for f in late {
        expect.add(got_of(f.now_or_never().unwrap()));
    }
    let m = h.metrics();
    assert_eq!(
        (m.calls, m.failures, m.slow, m.rejected),
        (20, expect.failed, 10, 0)
    );
    assert_eq!(expect.failed, 5);
}

// ---------------------------------------------------------------------------------------
// 5. Eviction and re-creation while threads remember old stripes.
// ---------------------------------------------------------------------------------------

/// Twenty threads call a key through their own instances (each has its stripe in its memo
/// and its thread's slots). The map evicts the key:
/// - with a handle keeping the old breaker (and so its threads' stripes) alive, the threads'
///   next calls count on a new breaker, none on the old;
/// - with nothing keeping it, the old breaker's stream ends though the threads' memos and
///   slots still point at its stripes;
/// - `subscribe_all` ends once the layer and every instance are gone, though the threads
///   (and their slots) live on.
fn eviction_while_threads_remember(workers: &[Worker<Option<SlotSvc>>], rt: &Runtime) {
    let layer = slot_layer(builder().consecutive_failures(NEVER).max_keys(16));
    let template = layer.layer(upstream());
    let k = Slot(7);
    let mut all = layer.subscribe_all();
    let h1 = layer.handle(&k);
    let mut tr1 = h1.subscribe();
    let calls = |n: usize| {
        let answers: Vec<_> = workers
            .iter()
            .map(|w| {
                w.submit(move |st| {
                    let s = st.as_mut().unwrap();
                    (0..n)
                        .map(|_| call_now(s, rq("/7", false)))
                        .filter(|g| *g == Got::Ok)
                        .count() as u64
                })
            })
            .collect();
        answers
            .into_iter()
            .map(|a| a.recv_timeout(Duration::from_secs(60)).unwrap())
            .sum::<u64>()
    };
    for w in workers {
        let t = template.clone();
        w.run(move |st| *st = Some(t));
    }
    let n = workers.len() as u64;
    assert_eq!(calls(3), 3 * n);
    assert_eq!(
        h1.metrics().calls,
        3 * n,
        "a handle taken before the threads called"
    );

    // Evicted (a new key in the one-breaker shard); the old breaker kept alive by `h1`.
    let _ = layer.handle(&Slot(100)).state();
    assert_eq!(layer.keys(), vec![Slot(100)]);
    assert_eq!(calls(2), 2 * n);
    assert_eq!(
        h1.metrics().calls,
        3 * n,
        "calls counted on an evicted breaker"
    );
    let h2 = layer.handle(&k);
    assert_eq!(h2.metrics().calls, 2 * n, "calls lost");
    assert_eq!(layer.keys(), vec![k.clone()]);
    drop(h1);
    assert!(
        stream_ends(rt, &mut tr1),
        "the first breaker outlived its eviction"
    );

    // Evicted again, nothing holding it: its stream ends before any thread calls again.
    let mut tr2 = h2.subscribe();
    drop(h2);
    let _ = layer.handle(&Slot(101)).state();
    assert!(
        stream_ends(rt, &mut tr2),
        "an evicted breaker kept alive by threads' memos or slots"
    );
    assert_eq!(calls(1), n);
    let h3 = layer.handle(&k);
    assert_eq!(h3.metrics().calls, n);

    // The layer and every instance gone; the threads (and their slots) live on.
    let mut tr3 = h3.subscribe();
    drop(h3);
    for w in workers {
        w.run(|st| *st = None);
    }
    drop((template, layer));
    assert!(
        stream_ends(rt, &mut tr3),
        "a dropped layer's breaker lives on"
    );
    let ended = rt.block_on(async {
        for _ in 0..1000 {
            match tokio::time::timeout(Duration::from_secs(60), all.recv()).await {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
        false
    });
    assert!(ended, "subscribe_all outlived the layer");
}

#[test]
fn e1_eviction_and_recreation_while_threads_remember_old_stripes() {
    let rt = paused_rt();
    let _entered = rt.enter();
    let workers: Vec<Worker<Option<SlotSvc>>> = (0..20)
        .map(|_| Worker::spawn(Some(rt.handle().clone()), || None))
        .collect();
    eviction_while_threads_remember(&workers, &rt);
    // Again with the same threads (their slots hold the last layer's keys).
    eviction_while_threads_remember(&workers, &rt);
}

#[test]
fn e1_fresh_process_eviction_with_exclusive_stripes() {
    run_in_child("child_e1_eviction_with_exclusive_stripes");
}

#[test]
fn child_e1_eviction_with_exclusive_stripes() {
    if !in_child("child_e1_eviction_with_exclusive_stripes") {
        return;
    }
    let rt = paused_rt();
    let _entered = rt.enter();
    let workers: Vec<Worker<Option<SlotSvc>>> = (0..20)
        .map(|_| Worker::spawn(Some(rt.handle().clone()), || None))
        .collect();
    let exclusive = workers.iter().filter(|w| w.number < 8).count();
    assert!(exclusive >= 6, "{exclusive}");
    eviction_while_threads_remember(&workers, &rt);
}

/// A key made by a thread numbered 8 or more (its first stripe has no owner), then called
/// by every other kind of thread, then evicted while they remember their stripes; its
/// stream ends.
#[test]
fn e2_key_made_by_a_late_thread() {
    let rt = paused_rt();
    let _entered = rt.enter();
    let workers: Vec<Worker<Option<SlotSvc>>> = (0..20)
        .map(|_| Worker::spawn(Some(rt.handle().clone()), || None))
        .collect();
    let maker = workers.iter().position(|w| w.number >= 8).unwrap();
    let layer = slot_layer(builder().consecutive_failures(NEVER).max_keys(16));
    let template = layer.layer(upstream());
    for w in workers.iter().skip(maker).chain(&workers[..maker]) {
        let t = template.clone();
        assert_eq!(
            w.run(move |st| call_now(st.insert(t), rq("/9", false))),
            Got::Ok
        );
    }
    let h = layer.handle(&Slot(9));
    let mut tr = h.subscribe();
    for w in &workers {
        assert_eq!(
            w.run(|st| call_now(st.as_mut().unwrap(), rq("/9", true))),
            Got::Failed
        );
    }
    let m = h.metrics();
    assert_eq!((m.calls, m.failures), (40, 20));
    drop(h);
    let _ = layer.handle(&Slot(1)).state();
    assert!(stream_ends(&rt, &mut tr));
    for w in &workers {
        w.run(|st| *st = None);
    }
}

// ---------------------------------------------------------------------------------------
// 6. Memory.
// ---------------------------------------------------------------------------------------

/// Twelve threads each call 10 000 keys of their own and four hot keys every tenth call,
/// through their own instance and fresh clones, with `max_keys(64)`: the map stays at 64
/// at most. Once the layer and the instances are gone (the threads alive, their slots
/// holding weak references to their stripes), the hot keys' breakers — each with a stripe
/// for every thread — are freed: their streams end.
#[test]
fn f1_floods_from_many_threads_stay_bounded_and_free_every_stripe() {
    let rt = paused_rt();
    let _entered = rt.enter();
    let layer = path_layer(builder().consecutive_failures(NEVER).max_keys(64));
    let template = layer.layer(upstream());
    let hot: Vec<String> = (0..4).map(|i| format!("/hot{i}")).collect();
    let workers: Vec<Worker<Option<PathSvc>>> = (0..12)
        .map(|_| {
            let t = template.clone();
            Worker::spawn(Some(rt.handle().clone()), move || Some(t))
        })
        .collect();
    let max_len = Arc::new(AtomicUsize::new(0));
    let answers: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(w, worker)| {
            let (l, t, max_len) = (layer.clone(), template.clone(), max_len.clone());
            worker.submit(move |st| {
                let own = st.as_mut().unwrap();
                for i in 0..10_000 {
                    let p = format!("/w{w}-{i}");
                    let g = if i % 2 == 0 {
                        call_now(own, rq(&p, false))
                    } else {
                        call_now(&mut t.clone(), rq(&p, false))
                    };
                    assert_eq!(g, Got::Ok);
                    if i % 10 == 0 {
                        assert_eq!(call_now(own, rq(&format!("/hot{}", i % 4), false)), Got::Ok);
                    }
                    if i % 1000 == 0 {
                        max_len.fetch_max(l.len(), Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for a in answers {
        a.recv_timeout(Duration::from_secs(300)).unwrap();
    }
    assert!(layer.len() <= 64, "{}", layer.len());
    assert!(max_len.load(Ordering::SeqCst) <= 64);
    assert_eq!(layer.keys().len(), layer.len());
    // Every hot key called by every thread once more (a stripe for each), then watched.
    let answers: Vec<_> = workers
        .iter()
        .map(|w| {
            w.submit(|st| {
                for i in 0..4 {
                    assert_eq!(
                        call_now(st.as_mut().unwrap(), rq(&format!("/hot{i}"), false)),
                        Got::Ok
                    );
                }
            })
        })
        .collect();
    for a in answers {
        a.recv_timeout(Duration::from_secs(60)).unwrap();
    }
    let mut streams: Vec<Transitions> = hot.iter().map(|k| layer.handle(k).subscribe()).collect();
    for w in &workers {
        w.run(|st| *st = None);
    }
    drop((template, layer));
    for (i, tr) in streams.iter_mut().enumerate() {
        assert!(
            stream_ends(&rt, tr),
            "hot key {i}: its breaker outlived the layer"
        );
    }
    drop(workers);
}

// ---------------------------------------------------------------------------------------
// 7. Thread-local destructors and thread exit.
// ---------------------------------------------------------------------------------------

struct CallsOnDrop(Box<dyn FnMut()>);
impl Drop for CallsOnDrop {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Threads whose first call of a key is made from a thread-local destructor (the thread's
/// memory of keys destroyed before or after it, or never made): counted exactly, no panic.
/// (tokio's own context is registered first, so it outlives the destructor: with paused
/// time anywhere in the process, tokio's clock panics when read after its context is gone.)
#[test]
fn g1_first_calls_from_thread_local_destructors_count_exactly() {
    thread_local! {
        static LATE: RefCell<Option<CallsOnDrop>> = const { RefCell::new(None) };
    }
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let template = layer.layer(upstream());
    let h = layer.handle(&"/tls".to_owned());
    let mut threads = Vec::new();
    for j in 0..48usize {
        let t = template.clone();
        threads.push(thread::spawn(move || {
            let _ = tokio::runtime::Handle::try_current();
            let mut other = t.clone();
            let register = move || {
                let mut s = t.clone();
                LATE.with_borrow_mut(|l| {
                    *l = Some(CallsOnDrop(Box::new(move || {
                        for i in 0..4 {
                            let want = if i == 0 { Got::Failed } else { Got::Ok };
                            assert_eq!(call_now(&mut s, rq("/tls", i == 0)), want);
                        }
                    })));
                });
            };
            match j % 3 {
                0 => {
                    register();
                    assert_eq!(call_now(&mut other, rq("/other", false)), Got::Ok);
                }
                1 => {
                    assert_eq!(call_now(&mut other, rq("/other", false)), Got::Ok);
                    register();
                }
                _ => register(),
            }
        }));
    }
    for t in threads {
        assert!(t.join().is_ok(), "a thread panicked at exit");
    }
    let m = h.metrics();
    assert_eq!((m.calls, m.failures), (48 * 4, 48));
}

// ---------------------------------------------------------------------------------------
// 8. The client presets over real sockets, on two workers.
// ---------------------------------------------------------------------------------------

/// The HTTP client preset over a real hyper-util client to real axum servers, on a
/// two-worker runtime: 16 tasks, 20 calls each (a quarter fail with 500), through fresh
/// clones and an instance moved between tasks: the authority's breaker counts exactly what
/// the server saw. A second stack on an always-failing upstream trips, and what it admitted
/// is exactly what reached the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_client_preset_counts_exactly_and_trips_on_two_workers() {
    use axum::Router;
    use axum::routing::get;
    use bytes::Bytes;
    use http::StatusCode;
    use http::uri::Authority;
    use http_body_util::Full;

    let hits = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let counted = |i: usize, status: StatusCode| {
        let hits = hits.clone();
        get(move || {
            hits[i].fetch_add(1, Ordering::SeqCst);
            async move { status }
        })
    };
    let flaky = support::serve_axum(
        Router::new()
            .route("/ok", counted(0, StatusCode::OK))
            .route("/fail", counted(1, StatusCode::INTERNAL_SERVER_ERROR)),
    )
    .await;
    let bad = support::serve_axum(
        Router::new().route("/", counted(2, StatusCode::INTERNAL_SERVER_ERROR)),
    )
    .await;
    let key = |a: std::net::SocketAddr| Some(Authority::try_from(a.to_string().as_str()).unwrap());

    let stack = steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .breaker(|b| b.consecutive_failures(NEVER))
        .build()
        .unwrap();
    let client = stack.hyper_client::<Full<Bytes>>();
    let before = stack.breakers().handle(&key(flaky));
    let (ok, failed) = sum_of_tasks(16, |t| {
        let client = client.clone();
        async move {
            let mut own = client.clone();
            let (mut ok, mut failed) = (0u64, 0u64);
            for i in 0..20usize {
                let fail = (t + i) % 4 == 0;
                let path = if fail { "/fail" } else { "/ok" };
                let req = Request::get(format!("http://{flaky}{path}"))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                let res = if i % 2 == 0 {
                    let mut c = client.clone();
                    c.ready().await.unwrap().call(req).await
                } else {
                    let (back, res) = tokio::spawn(async move {
                        let res = own.ready().await.unwrap().call(req).await;
                        (own, res)
                    })
                    .await
                    .unwrap();
                    own = back;
                    res
                };
                let status = res.expect("the upstream answers").status();
                if fail {
                    assert_eq!(status, 500);
                    failed += 1;
                } else {
                    assert_eq!(status, 200);
                    ok += 1;
                }
            }
            (ok, failed)
        }
    })
    .await;
    assert_eq!((ok, failed), (240, 80));
    let m = before.metrics();
    assert_eq!((m.calls, m.failures, m.rejected), (320, 80, 0));
    assert_eq!(hits[0].load(Ordering::SeqCst), 240);
    assert_eq!(hits[1].load(Ordering::SeqCst), 80);

    // Trips: concurrent calls to an always-failing upstream.
    let stack = steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .breaker(|b| {
            b.consecutive_failures(Some(5))
                .open_time(Duration::from_secs(3600))
                .max_open_time(Duration::from_secs(3600))
        })
        .build()
        .unwrap();
    let client = stack.hyper_client::<Full<Bytes>>();
    let (answered, refused) = sum_of_tasks(16, |_| {
        let client = client.clone();
        async move {
            let (mut answered, mut refused) = (0u64, 0u64);
            for _ in 0..10 {
                let req = Request::get(format!("http://{bad}/"))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                let mut c = client.clone();
                match c.ready().await.unwrap().call(req).await {
                    Ok(res) => {
                        assert_eq!(res.status(), 500);
                        answered += 1;
                    }
                    Err(_) => refused += 1,
                }
                tokio::task::yield_now().await;
            }
            (answered, refused)
        }
    })
    .await;
    let m = stack.breakers().handle(&key(bad)).metrics();
    assert_eq!(m.state, BreakerState::Open, "{m:?}");
    assert_eq!(answered + refused, 160);
    assert_eq!(m.calls, answered, "{m:?}");
    assert_eq!(m.failures, answered);
    assert_eq!(m.rejected, refused);
    assert_eq!(hits[2].load(Ordering::SeqCst) as u64, answered);
    assert!(answered >= 5);
}

/// Runs `task(i)` for `i` in `0..n` as spawned tasks and sums their pairs of counts, under a
/// generous hang guard.
async fn sum_of_tasks<F>(n: usize, task: impl Fn(usize) -> F) -> (u64, u64)
where
    F: std::future::Future<Output = (u64, u64)> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(task(i))).collect();
    let work = async {
        let mut sum = (0, 0);
        for t in tasks {
            let (a, b) = t.await.unwrap();
            sum = (sum.0 + a, sum.1 + b);
        }
        sum
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("hang guard")
}

/// The gRPC client preset with a real tonic channel and health server, on two workers:
/// 16 tasks × 10 checks through clones; the channel's breaker (no authority: tonic adds the
/// origin below the stack) counts every one.
#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_grpc_preset_counts_exactly_on_two_workers() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let (reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(support::incoming(listener)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stack = steadfast::client::grpc().build().unwrap();
    let client = HealthClient::new(stack.layer(channel));
    let handle = stack.breakers().handle(&None);
    let work = async {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let mut c = client.clone();
                    c.check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .expect("serving");
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("hang guard");
    let m = handle.metrics();
    assert_eq!((m.calls, m.failures, m.rejected), (160, 0, 0), "{m:?}");
    drop(reporter);
}
