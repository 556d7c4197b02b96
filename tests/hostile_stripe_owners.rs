//! Hostile tests of who counts on which stripe of a per-key breaker, after the second review
//! of the per-thread stripes (tests/hostile_thread_stripes.rs is the first pass; nothing here
//! repeats it):
//!
//! 1. A maker numbered 8 or more ("late") counts on the breaker's first stripe, which it
//!    shares (atomically) with the later threads of its slot: exact counts when it, threads
//!    of its slot and threads of other slots call at once, the key made by a call or by a
//!    handle on the late thread, through the HTTP client preset too.
//! 2. A maker numbered below 8 counts on its first stripe with plain stores, alone: every way
//!    found to have another thread count there (clones of the maker's instance, whose memo
//!    points at the first stripe, on every kind of thread at once while the maker calls; the
//!    maker's own instance moved away and back; the "not kept" path of a shard full of open
//!    breakers; eviction and re-creation of the key by other threads; key code that calls
//!    the layer again from `Clone` and `Drop`). Run in a child process (a fresh numbering)
//!    with debug assertions on, so `Stripe::count`'s check would panic, and every count is
//!    checked exactly.
//! 3. An instance moved between threads re-points its memo: exact counts, never on an
//!    evicted breaker (old breakers kept alive by handles to see it), never on another map's.
//! 4. Idle eviction with the threads' clocks apart (each paused runtime has a clock of its
//!    own: they are aligned to the nanosecond, then set apart on purpose), straddling a second
//!    boundary and the 2^32-second wrap of the low bits.
//!
//! Paused tokio time wherever time matters; real threads only with invariants that hold for
//! every interleaving; every loop is bounded.

mod support;

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Ready;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::Full;
use steadfast::breaker::{BreakerHandle, BreakerKey, BreakerState, KeyedCircuitBreaker};
use steadfast::common::DefaultClassifier;
use steadfast::retry::ReplayBody;
use steadfast_core::__private::thread_number;
use support::stripes::*;
use tokio::runtime::Runtime;
use tokio::time::{Instant, advance};
use tower::util::ServiceFn;
use tower::{Layer, Service, ServiceExt, service_fn};

// ---------------------------------------------------------------------------------------
// Helpers (as in hostile_thread_stripes.rs)
// ---------------------------------------------------------------------------------------

/// The first thread number that shares its stripes with others (8 exclusive slots).
const LATE: usize = 8;

/// The per-key stripe slot of thread number `t`, as the breaker computes it.
fn slot(t: usize) -> usize {
    if t < LATE {
        t
    } else {
        LATE + (t - LATE) % LATE
    }
}

type Handle = BreakerHandle<DefaultClassifier>;

/// The handle's counts, as a tally (calls, failures, rejected) compares to.
fn counted(h: &Handle) -> (u64, u64, u64) {
    let m = h.metrics();
    (m.calls, m.failures, m.rejected)
}

fn expected(t: &Tally) -> (u64, u64, u64) {
    (t.admitted(), t.failed, t.rejected)
}

/// Waits for every answer (a worker that panicked — a failed debug check included — ends the
/// test here).
fn gather<R>(answers: Vec<mpsc::Receiver<R>>) -> Vec<R> {
    answers
        .into_iter()
        .map(|a| {
            a.recv_timeout(Duration::from_secs(120))
                .expect("a worker panicked or hung")
        })
        .collect()
}

/// Makes sure this process has handed out thread numbers below [`LATE`], so that threads
/// started from now on are late (numbers are never reused).
fn use_up_the_exclusive_numbers() {
    for _ in 0..4 * LATE {
        if thread::spawn(thread_number).join().unwrap() >= LATE {
            return;
        }
    }
    panic!("thread numbers never reached {LATE}");
}

/// Workers (state `St` from `init`, entered in `rt`) for a key whose maker is late: the
/// first late worker (the maker, index 0 of the answer), two more of its slot, and four late
/// ones of other slots, all distinct; every worker numbered below [`LATE`] met on the way is
/// kept too (only in a child process). Spawns at most 300 threads.
fn late_cast<St: 'static>(
    rt: Option<&Runtime>,
    init: impl Fn() -> St + Clone + Send + 'static,
) -> (Vec<Worker<St>>, Cast) {
    let mut kept: Vec<Worker<St>> = Vec::new();
    let mut maker = None;
    let (mut same, mut other) = (Vec::new(), Vec::new());
    let mut exclusive = Vec::new();
    for _ in 0..300 {
        if same.len() == 2 && other.len() == 4 {
            break;
        }
        let init = init.clone();
        let w = Worker::spawn(rt.map(|r| r.handle().clone()), init);
        let n = w.number;
        let i = kept.len();
        let wanted = match maker {
            _ if n < LATE => {
                exclusive.push(i);
                true
            }
            None => {
                maker = Some(i);
                true
            }
            Some(m) if slot(n) == slot(kept[m].number) && same.len() < 2 => {
                same.push(i);
                true
            }
            Some(m) => {
                let taken = |j: &usize| slot(kept[*j].number) == slot(n);
                if slot(n) != slot(kept[m].number) && other.len() < 4 && !other.iter().any(taken) {
                    other.push(i);
                    true
                } else {
                    false
                }
            }
        };
        if wanted {
            kept.push(w);
        }
    }
    assert!(
        same.len() == 2 && other.len() == 4,
        "no late threads of the same slot"
    );
    let cast = Cast {
        maker: maker.unwrap(),
        same,
        other,
        exclusive,
    };
    (kept, cast)
}

/// Who is who among [`late_cast`]'s workers (indices).
#[derive(Debug)]
struct Cast {
    maker: usize,
    same: Vec<usize>,
    other: Vec<usize>,
    exclusive: Vec<usize>,
}

// ---------------------------------------------------------------------------------------
// The child process: a fresh thread numbering.
// ---------------------------------------------------------------------------------------

/// The child's test thread makes the keys: it must be thread 0.
fn first_thread() {
    let me = thread_number();
    assert_eq!(me, 0, "the child's test thread is numbered {me}");
}

// ---------------------------------------------------------------------------------------
// 1. A late maker: its first stripe is shared by its slot.
// ---------------------------------------------------------------------------------------

/// Rounds of calls of `path` from every worker at once: two in three through the instance
/// each keeps, one in three through a fresh clone of `template`; failing one call in five. Between rounds the instances move on (worker `i` gets worker `i + 1`'s), so every
/// memo moves between threads of every kind. After each round the handle's counts are the
/// tally's.
fn rounds_at_once(
    workers: &[Worker<Option<PathSvc>>],
    template: &PathSvc,
    path: &'static str,
    h: &Handle,
    expect: &mut Tally,
) {
    const ROUNDS: usize = 6;
    const CALLS: usize = 300;
    let n = workers.len();
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(n));
        let answers: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(w, worker)| {
                let (template, barrier) = (template.clone(), barrier.clone());
                worker.submit(move |st: &mut Option<PathSvc>| {
                    let own = st.get_or_insert_with(|| template.clone());
                    let mut t = Tally::default();
                    barrier.wait();
                    for i in 0..CALLS {
                        let fail = (i + w + round) % 5 == 0;
                        let g = if i % 3 == 1 {
                            call_now(&mut template.clone(), rq(path, fail))
                        } else {
                            call_now(own, rq(path, fail))
                        };
                        t.add(g);
                    }
                    t
                })
            })
            .collect();
        for t in gather(answers) {
            expect.merge(t);
        }
        assert_eq!(counted(h), expected(expect), "round {round}");
        // The instances move on.
        let mut moved: Vec<Option<PathSvc>> = workers.iter().map(|w| w.run(Option::take)).collect();
        moved.rotate_left(1);
        for (w, s) in workers.iter().zip(moved) {
            w.run(move |st| *st = s);
        }
    }
}

/// A late maker makes the key (by a call through its own instance, or by taking a handle on
/// its thread), threads of its slot call first (on the first stripe, which they share with
/// it), then everyone at once through moving instances: exact counts.
fn late_maker_exact(via_handle: bool) {
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let template = layer.layer(upstream());
    let (workers, cast) = late_cast(None, || None::<PathSvc>);
    let maker = &workers[cast.maker];
    assert!(maker.number >= LATE);
    let mut expect = Tally::default();
    let h = if via_handle {
        let l = layer.clone();
        maker.run(move |_| l.handle(&"/k".to_owned()))
    } else {
        let t = template.clone();
        expect.add(maker.run(move |st| call_now(st.insert(t), rq("/k", true))));
        layer.handle(&"/k".to_owned())
    };
    // The maker's slot first, one at a time (on the first stripe), then the others.
    for &i in cast.same.iter().chain(&cast.other).chain(&cast.exclusive) {
        let t = template.clone();
        expect.add(workers[i].run(move |st| call_now(st.insert(t), rq("/k", false))));
        assert_eq!(
            counted(&h),
            expected(&expect),
            "thread {}",
            workers[i].number
        );
    }
    rounds_at_once(&workers, &template, "/k", &h, &mut expect);
    assert_eq!(layer.len(), 1);
    assert_eq!(counted(&layer.handle(&"/k".to_owned())), expected(&expect));
}

#[test]
fn l1_late_maker_its_slot_and_other_slots_at_once_count_exactly() {
    use_up_the_exclusive_numbers();
    late_maker_exact(false);
}

#[test]
fn l2_key_made_by_a_handle_on_a_late_thread_counts_exactly() {
    use_up_the_exclusive_numbers();
    late_maker_exact(true);
}

/// L1 and L2 in a fresh process: threads 1-7 (stripes of their own) call too.
#[test]
fn l3_fresh_process_late_maker_with_exclusive_threads_too() {
    run_in_child("child_l3_late_maker_with_exclusive_threads_too");
}

#[test]
fn child_l3_late_maker_with_exclusive_threads_too() {
    if !in_child("child_l3_late_maker_with_exclusive_threads_too") {
        return;
    }
    first_thread();
    late_maker_exact(false);
    late_maker_exact(true);
}

/// The HTTP client preset's transport: 503 when the query is `fail`.
type TransportFn =
    fn(Request<ReplayBody<Full<Bytes>>>) -> Ready<Result<Response<Full<Bytes>>, Infallible>>;
type PresetClient = steadfast::client::HttpClient<ServiceFn<TransportFn>>;

fn transport(
    r: Request<ReplayBody<Full<Bytes>>>,
) -> Ready<Result<Response<Full<Bytes>>, Infallible>> {
    let status = if r.uri().query() == Some("fail") {
        503
    } else {
        200
    };
    std::future::ready(Ok(Response::builder()
        .status(status)
        .body(Full::default())
        .unwrap()))
}

/// The HTTP client preset (`build_per_authority` inside) over an in-memory transport, each
/// worker with a runtime of its own: a late maker's authority, called at once by it, threads
/// of its slot and of other slots through their own clients and fresh clones; the authority's
/// breaker counts exactly (no retries: one attempt each).
#[test]
fn l6_client_preset_late_maker_counts_exactly() {
    use_up_the_exclusive_numbers();
    let stack = steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .breaker(|b| b.consecutive_failures(NEVER))
        .build()
        .unwrap();
    let client: PresetClient = stack.layer(service_fn(transport as TransportFn));
    let init = {
        let client = client.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            (rt, client.clone())
        }
    };
    let (workers, cast) = late_cast(None, init);
    let call = |rt: &Runtime, c: &mut PresetClient, fail: bool| -> Got {
        let q = if fail { "?fail" } else { "" };
        let req = Request::get(format!("http://orders:8080/x{q}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let res = rt
            .block_on(async { c.ready().await?.call(req).await })
            .expect("the transport answers");
        match res.status().as_u16() {
            200 => Got::Ok,
            503 => Got::Failed,
            s => panic!("status {s}"),
        }
    };
    let authority = Some(http::uri::Authority::from_static("orders:8080"));
    let mut expect = Tally::default();
    expect.add(workers[cast.maker].run(move |(rt, c)| call(rt, c, true)));
    let h = stack.breakers().handle(&authority);
    let n = workers.len();
    let barrier = Arc::new(Barrier::new(n));
    let answers: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(w, worker)| {
            let barrier = barrier.clone();
            worker.submit(move |(rt, own): &mut (Runtime, PresetClient)| {
                let mut t = Tally::default();
                barrier.wait();
                for i in 0..200usize {
                    let fail = (i + w) % 4 == 0;
                    let g = if i % 2 == 0 {
                        call(rt, own, fail)
                    } else {
                        call(rt, &mut own.clone(), fail)
                    };
                    t.add(g);
                }
                t
            })
        })
        .collect();
    for t in gather(answers) {
        expect.merge(t);
    }
    assert_eq!(expect.admitted(), 1 + 200 * n as u64);
    assert_eq!(counted(&h), expected(&expect));
    assert_eq!(stack.breakers().len(), 1);
}

// ---------------------------------------------------------------------------------------
// 2. A maker numbered below 8: its first stripe is its alone (plain stores).
// ---------------------------------------------------------------------------------------

/// Workers 1..=`n` of a child process (state `None`), entered in `rt` if given.
fn numbered_workers<St: 'static>(
    rt: Option<&Runtime>,
    n: usize,
    init: impl Fn() -> St + Clone + Send + 'static,
) -> Vec<Worker<St>> {
    let workers: Vec<Worker<St>> = (0..n)
        .map(|_| Worker::spawn(rt.map(|r| r.handle().clone()), init.clone()))
        .collect();
    let numbers: Vec<usize> = workers.iter().map(|w| w.number).collect();
    assert_eq!(
        numbers,
        (1..=n).collect::<Vec<_>>(),
        "not a fresh numbering"
    );
    workers
}

/// Thread 0 makes the key with a call through its own instance (its memo: the first stripe,
/// exclusive to it) and keeps calling through it with plain stores while threads 1-7 and
/// 8-17 call at once through clones of that instance (each clone's memo: thread 0's first
/// stripe), a clone kept untouched and cloned again for every call (so every call takes the
/// "moved" path), and fresh clones. Between rounds thread 0's instance itself goes to a worker
/// for a few calls and comes back (its memo re-pointed there and back). Exact counts; with
/// debug assertions, a count on thread 0's stripe from another thread panics.
#[test]
fn x1_fresh_process_makers_stripe_is_its_alone_while_everyone_calls() {
    run_in_child("child_x1_makers_stripe_is_its_alone");
}

#[test]
fn child_x1_makers_stripe_is_its_alone() {
    if !in_child("child_x1_makers_stripe_is_its_alone") {
        return;
    }
    first_thread();
    const CALLS: usize = 400;
    let layer = path_layer(builder().consecutive_failures(NEVER));
    let template = layer.layer(upstream());
    let mut mine = template.clone();
    let mut expect = Tally::default();
    expect.add(call_now(&mut mine, rq("/k", false)));
    let h = layer.handle(&"/k".to_owned());
    let workers = numbered_workers(None, 17, || None::<PathSvc>);
    let n = workers.len();
    for round in 0..10usize {
        // Thread 0's own instance goes away for three calls and comes back.
        let away = &workers[(round * 7) % n];
        let (back, t) = away.run(move |_| {
            let mut t = Tally::default();
            for i in 0..3 {
                t.add(call_now(&mut mine, rq("/k", i == 1)));
            }
            (mine, t)
        });
        mine = back;
        expect.merge(t);
        expect.add(call_now(&mut mine, rq("/k", false)));
        assert_eq!(
            counted(&h),
            expected(&expect),
            "round {round}: after the trip"
        );

        let barrier = Arc::new(Barrier::new(n + 1));
        let answers: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(w, worker)| {
                let pristine = mine.clone(); // memo: thread 0's first stripe
                let (template, barrier) = (template.clone(), barrier.clone());
                worker.submit(move |st: &mut Option<PathSvc>| {
                    let own = st.insert(pristine.clone());
                    let mut t = Tally::default();
                    barrier.wait();
                    for i in 0..CALLS {
                        let fail = (i + w + round) % 6 == 0;
                        let g = match i % 3 {
                            0 => call_now(own, rq("/k", fail)),
                            1 => call_now(&mut pristine.clone(), rq("/k", fail)),
                            _ => call_now(&mut template.clone(), rq("/k", fail)),
                        };
                        t.add(g);
                    }
                    t
                })
            })
            .collect();
        barrier.wait();
        for i in 0..CALLS {
            expect.add(call_now(&mut mine, rq("/k", i % 7 == 0)));
        }
        for t in gather(answers) {
            expect.merge(t);
        }
        assert_eq!(counted(&h), expected(&expect), "round {round}");
    }
    assert_eq!(expect.rejected, 0);
}

/// The "not kept" path: a one-breaker shard holds a key thread 0 tripped open. Thread 0 and
/// threads 1-17 at once call that key (rejections counted: thread 0's with plain stores on
/// its first stripe) and a new key, which the map cannot keep (each call on a breaker of its
/// own, made by the calling thread, never rejected though half its calls fail). Then the open
/// key is closed by hand, a worker's call makes the new key kept (evicting it; that worker is
/// the maker) and everyone calls it at once: exact counts on both breakers.
#[test]
fn x2_fresh_process_not_kept_breakers_and_a_kept_one_made_elsewhere() {
    run_in_child("child_x2_not_kept_breakers");
}

#[test]
fn child_x2_not_kept_breakers() {
    if !in_child("child_x2_not_kept_breakers") {
        return;
    }
    first_thread();
    const CALLS: usize = 200;
    let rt = paused_rt();
    let _entered = rt.enter();
    let layer = slot_layer(
        tripping()
            .max_keys(16)
            .idle_eviction(Duration::from_secs(3600)),
    );
    let template = layer.layer(upstream());
    let mut mine = template.clone();
    assert_eq!(call_now(&mut mine, rq("/1", true)), Got::Failed);
    let h1 = layer.handle(&Slot(1));
    assert_eq!(h1.state(), BreakerState::Open);
    let workers = numbered_workers(Some(&rt), 17, || None::<SlotSvc>);
    let n = workers.len();

    let at_once = |mine: &mut SlotSvc, key: &'static str, other: Option<&'static str>| {
        let barrier = Arc::new(Barrier::new(n + 1));
        let answers: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(w, worker)| {
                let pristine = mine.clone();
                let (template, barrier) = (template.clone(), barrier.clone());
                worker.submit(move |st: &mut Option<SlotSvc>| {
                    let own = st.get_or_insert_with(|| pristine.clone());
                    let (mut t, mut o) = (Tally::default(), Tally::default());
                    barrier.wait();
                    for i in 0..CALLS {
                        let fail = (i + w) % 2 == 0;
                        let g = match i % 3 {
                            0 => call_now(own, rq(key, fail)),
                            1 => call_now(&mut pristine.clone(), rq(key, fail)),
                            _ => call_now(&mut template.clone(), rq(key, fail)),
                        };
                        t.add(g);
                        if let Some(other) = other {
                            o.add(call_now(own, rq(other, false)));
                        }
                    }
                    (t, o)
                })
            })
            .collect();
        barrier.wait();
        let (mut t, mut o) = (Tally::default(), Tally::default());
        for i in 0..CALLS {
            t.add(call_now(mine, rq(key, i % 2 == 1)));
            if let Some(other) = other {
                o.add(call_now(mine, rq(other, false)));
            }
        }
        for (a, b) in gather(answers) {
            t.merge(a);
            o.merge(b);
        }
        (t, o)
    };

    // The new key /2 (not kept) and the open key /1, from everyone at once.
    let (new, open) = at_once(&mut mine, "/2", Some("/1"));
    assert_eq!(
        new.rejected, 0,
        "a breaker that is not kept tripped for another call"
    );
    assert_eq!(new.admitted(), (n as u64 + 1) * CALLS as u64);
    assert_eq!(open.rejected, (n as u64 + 1) * CALLS as u64);
    assert_eq!(layer.keys(), vec![Slot(1)]);
    assert_eq!(counted(&h1), (1, 1, open.rejected));
    assert_eq!(counted(&layer.handle(&Slot(2))), (0, 0, 0), "not kept");

    // Closed by hand: worker 5's call makes /2 kept (evicting /1); everyone calls it.
    h1.close();
    let t = template.clone();
    assert_eq!(
        workers[4].run(move |st| call_now(st.insert(t), rq("/2", false))),
        Got::Ok
    );
    assert_eq!(layer.keys(), vec![Slot(2)]);
    let h2 = layer.handle(&Slot(2));
    // Successes only from here (one failure would trip it).
    let ok = at_once_successes(&workers, &template, &mut mine, "/2");
    assert_eq!(counted(&h2), (ok + 1, 0, 0));
    assert_eq!(
        counted(&h1),
        (1, 1, open.rejected),
        "counted on an evicted breaker"
    );
}

/// Everyone (the workers and this thread) calls `key` at once, successes only; the count.
fn at_once_successes(
    workers: &[Worker<Option<SlotSvc>>],
    template: &SlotSvc,
    mine: &mut SlotSvc,
    key: &'static str,
) -> u64 {
    const CALLS: usize = 200;
    let barrier = Arc::new(Barrier::new(workers.len() + 1));
    let answers: Vec<_> = workers
        .iter()
        .map(|worker| {
            let pristine = mine.clone();
            let (template, barrier) = (template.clone(), barrier.clone());
            worker.submit(move |st: &mut Option<SlotSvc>| {
                let own = st.get_or_insert_with(|| pristine.clone());
                barrier.wait();
                let mut ok = 0u64;
                for i in 0..CALLS {
                    let g = match i % 3 {
                        0 => call_now(own, rq(key, false)),
                        1 => call_now(&mut pristine.clone(), rq(key, false)),
                        _ => call_now(&mut template.clone(), rq(key, false)),
                    };
                    assert_eq!(g, Got::Ok);
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    barrier.wait();
    let mut ok = 0;
    for _ in 0..CALLS {
        assert_eq!(call_now(mine, rq(key, false)), Got::Ok);
        ok += 1;
    }
    ok + gather(answers).into_iter().sum::<u64>()
}

/// Everyone (the workers and this thread) calls `key` at once, successes only; the count.
fn slot_at_once(
    workers: &[Worker<Option<SlotSvc>>],
    template: &SlotSvc,
    mine: &mut SlotSvc,
    key: &'static str,
    round: usize,
) -> Tally {
    const CALLS: usize = 200;
    let barrier = Arc::new(Barrier::new(workers.len() + 1));
    let answers: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(w, worker)| {
            let pristine = mine.clone();
            let (template, barrier) = (template.clone(), barrier.clone());
            worker.submit(move |st: &mut Option<SlotSvc>| {
                let own = st.get_or_insert_with(|| pristine.clone());
                let mut t = Tally::default();
                barrier.wait();
                for i in 0..CALLS {
                    let fail = (i + w + round) % 4 == 0;
                    t.add(match i % 3 {
                        0 => call_now(own, rq(key, fail)),
                        1 => call_now(&mut pristine.clone(), rq(key, fail)),
                        _ => call_now(&mut template.clone(), rq(key, fail)),
                    });
                }
                t
            })
        })
        .collect();
    barrier.wait();
    let mut t = Tally::default();
    for i in 0..CALLS {
        t.add(call_now(mine, rq(key, (i + round) % 4 == 1)));
    }
    for a in gather(answers) {
        t.merge(a);
    }
    t
}

/// A one-breaker shard: the key is evicted (a new key from this thread) and made again by
/// a call from thread 0, 1, 8, 16 (the slot of 8), 7, 9, 0 in turn, then called by everyone at
/// once through the instances they kept (memos of an evicted breaker) and clones of thread
/// 0's (its memo: its stripe, of this breaker or an evicted one). Each breaker counts
/// exactly its own calls; the evicted ones (kept alive by their handles) no more after their
/// eviction.
#[test]
fn x3_fresh_process_key_made_again_by_other_threads_in_turn() {
    run_in_child("child_x3_key_made_again_by_other_threads_in_turn");
}

#[test]
fn child_x3_key_made_again_by_other_threads_in_turn() {
    if !in_child("child_x3_key_made_again_by_other_threads_in_turn") {
        return;
    }
    first_thread();
    let layer = slot_layer(builder().consecutive_failures(NEVER).max_keys(16));
    let template = layer.layer(upstream());
    let mut mine = template.clone();
    let workers = numbered_workers(None, 17, || None::<SlotSvc>);
    // The maker of each breaker: `None` this thread (0), `Some(i)` worker `i` (number i + 1).
    let makers = [
        None,
        Some(0),
        Some(7),
        Some(15),
        Some(6),
        Some(8),
        None,
        Some(0),
    ];
    let mut old: Vec<(Handle, (u64, u64, u64))> = Vec::new();
    for (g, maker) in makers.into_iter().enumerate() {
        if g > 0 {
            let _ = layer.handle(&Slot(100 + g as u32)).state();
            assert_eq!(layer.keys(), vec![Slot(100 + g as u32)], "generation {g}");
        }
        let mut expect = Tally::default();
        expect.add(match maker {
            None => call_now(&mut mine, rq("/7", true)),
            Some(i) => {
                let t = template.clone();
                workers[i].run(move |st| call_now(st.get_or_insert_with(|| t), rq("/7", true)))
            }
        });
        assert_eq!(layer.keys(), vec![Slot(7)], "generation {g}");
        let h = layer.handle(&Slot(7));
        expect.merge(slot_at_once(&workers, &template, &mut mine, "/7", g));
        assert_eq!(counted(&h), expected(&expect), "generation {g}");
        for (i, (oh, c)) in old.iter().enumerate() {
            assert_eq!(
                counted(oh),
                *c,
                "generation {g}: counted on evicted breaker {i}"
            );
        }
        old.push((h, expected(&expect)));
    }
}

// Key code that calls the layer again: `Clone` and `Drop` of [`Echo`] run this thread's hook
// (once: not from inside it).

thread_local! {
    static HOOK: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    static NESTED: Cell<u64> = const { Cell::new(0) };
}

fn fire() {
    if IN_HOOK.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let taken = HOOK.try_with(|h| h.try_borrow_mut().ok().and_then(|mut h| h.take()));
    let Ok(Some(mut f)) = taken else { return };
    IN_HOOK.set(true);
    f();
    IN_HOOK.set(false);
    let _ = HOOK.try_with(|h| *h.borrow_mut() = Some(f));
}

/// A key whose `Clone` and `Drop` call the layer again (through this thread's hook).
#[derive(Debug, PartialEq, Eq)]
struct Echo(u32);

impl Clone for Echo {
    fn clone(&self) -> Self {
        fire();
        Echo(self.0)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        fire();
    }
}

impl Hash for Echo {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}

impl BreakerKey for Echo {
    fn name(&self) -> String {
        format!("echo{}", self.0)
    }
    /// Made under the shard's lock: no hook (a call there would wait for that lock).
    fn to_kept(&self) -> Self {
        Echo(self.0)
    }
}

type EchoFn = fn(&Uri, &HeaderMap) -> Echo;
type EchoSvc = KeyedCircuitBreaker<Up, DefaultClassifier, EchoFn, Echo>;

fn by_echo(u: &Uri, _: &HeaderMap) -> Echo {
    Echo(number_in(u))
}

/// Arms this thread's hook: each time, a call of `/7` through a clone of `svc`.
fn arm(svc: EchoSvc) {
    let f: Box<dyn FnMut()> = Box::new(move || {
        assert_eq!(call_now(&mut svc.clone(), rq("/7", false)), Got::Ok);
        NESTED.set(NESTED.get() + 1);
    });
    let old = HOOK.with_borrow_mut(|h| h.replace(f));
    drop(old);
}

/// Disarms this thread's hook; how many calls it made.
fn disarm() -> u64 {
    let f = HOOK.with_borrow_mut(Option::take);
    drop(f);
    NESTED.replace(0)
}

/// Every thread's key code calls the layer again while the calls run (`Clone` and `Drop` of
/// the key: when a thread remembers the key, fills a memo, drops the request's key or an old
/// memo's): thread 0 made the key, and calls at once with threads 1-12 through clones of its
/// instance, their own and fresh clones. No count on another thread's stripe (debug check),
/// every call counted, the nested ones too.
#[test]
fn x4_fresh_process_key_code_calling_the_layer_again() {
    run_in_child("child_x4_key_code_calling_the_layer_again");
}

#[test]
fn child_x4_key_code_calling_the_layer_again() {
    if !in_child("child_x4_key_code_calling_the_layer_again") {
        return;
    }
    first_thread();
    const CALLS: usize = 300;
    let layer = builder()
        .consecutive_failures(NEVER)
        .build_per_key(by_echo as EchoFn)
        .unwrap();
    let template: EchoSvc = layer.layer(upstream());
    let mut mine = template.clone();
    arm(template.clone());
    let mut expect = Tally::default();
    expect.add(call_now(&mut mine, rq("/7", false)));
    let workers = numbered_workers(None, 12, || None::<EchoSvc>);
    let barrier = Arc::new(Barrier::new(workers.len() + 1));
    let answers: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(w, worker)| {
            let pristine = mine.clone();
            let (template, barrier) = (template.clone(), barrier.clone());
            worker.submit(move |st: &mut Option<EchoSvc>| {
                arm(pristine.clone());
                let own = st.insert(template.clone());
                let mut t = Tally::default();
                barrier.wait();
                for i in 0..CALLS {
                    let fail = (i + w) % 5 == 0;
                    t.add(match i % 3 {
                        0 => call_now(own, rq("/7", fail)),
                        1 => call_now(&mut pristine.clone(), rq("/7", fail)),
                        _ => call_now(&mut template.clone(), rq("/7", fail)),
                    });
                }
                *st = None;
                drop(pristine);
                (t, disarm())
            })
        })
        .collect();
    barrier.wait();
    for i in 0..CALLS {
        expect.add(call_now(&mut mine, rq("/7", i % 5 == 2)));
    }
    drop(mine);
    let mut nested = disarm();
    for (t, n) in gather(answers) {
        expect.merge(t);
        nested += n;
    }
    assert!(
        nested > 3 * CALLS as u64,
        "the key code hardly ran: {nested}"
    );
    let h = layer.handle(&Echo(7));
    let m = h.metrics();
    assert_eq!(
        (m.calls, m.failures, m.rejected),
        (expect.admitted() + nested, expect.failed, 0)
    );
    println!("outer calls {}, nested {nested}", expect.admitted());
}

// ---------------------------------------------------------------------------------------
// 3. An instance moved between threads: its memo re-pointed, never at an evicted breaker.
// ---------------------------------------------------------------------------------------

/// Where the moving instance `s` is called next, or what else happens.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// `s` is called on worker A, B, or this thread.
    On(usize),
    /// Worker A's or B's own instance is called (its thread then remembers the key).
    Own(usize),
    /// A new key from this thread evicts the key (its breaker kept alive by its handle).
    Evict,
}

/// One instance moves between two workers and this thread, with evictions between: each
/// call counts on the breaker the map holds at the time (taken by a handle right after), and
/// no breaker counts a call after its eviction.
#[test]
fn m1_moved_instance_counts_on_the_live_breaker_only() {
    use Step::*;
    let layer = slot_layer(builder().consecutive_failures(NEVER).max_keys(16));
    let template = layer.layer(upstream());
    let workers: Vec<Worker<Option<SlotSvc>>> =
        (0..2).map(|_| Worker::spawn(None, || None)).collect();
    let script = [
        On(0),
        Own(1),
        On(1),
        On(1),
        On(0),
        On(2),
        On(1),
        Evict,
        On(1),
        On(0),
        Own(0),
        On(0),
        On(1),
        Evict,
        Own(0),
        On(0),
        On(2),
        On(0),
        Evict,
        On(2),
        On(1),
        Own(1),
        On(1),
        Evict,
        Evict,
        On(0),
        On(0),
        On(2),
        On(2),
        Own(1),
        On(1),
        On(0),
    ];
    let mut s = Some(template.clone());
    // Every breaker so far: its handle and how many calls it must have counted.
    let mut breakers: Vec<(Handle, u64)> = Vec::new();
    let mut live = false;
    for (i, step) in script.into_iter().enumerate() {
        let fail = i % 3 == 0;
        let got = match step {
            Evict => {
                let _ = layer.handle(&Slot(1000 + i as u32)).state();
                assert_eq!(layer.keys(), vec![Slot(1000 + i as u32)]);
                live = false;
                continue;
            }
            On(2) => call_now(s.as_mut().unwrap(), rq("/7", fail)),
            On(w) => {
                let moving = s.take().unwrap();
                let (back, g) = workers[w].run(move |_| {
                    let mut moving = moving;
                    let g = call_now(&mut moving, rq("/7", fail));
                    (moving, g)
                });
                s = Some(back);
                g
            }
            Own(w) => {
                let t = template.clone();
                workers[w].run(move |st| call_now(st.get_or_insert_with(|| t), rq("/7", fail)))
            }
        };
        assert_eq!(got, if fail { Got::Failed } else { Got::Ok });
        if !live {
            breakers.push((layer.handle(&Slot(7)), 0));
            live = true;
        }
        breakers.last_mut().unwrap().1 += 1;
        for (j, (h, n)) in breakers.iter().enumerate() {
            assert_eq!(h.metrics().calls, *n, "step {i} {step:?}: breaker {j}");
        }
    }
    assert_eq!(breakers.len(), 5);
}

/// Two maps of the same types and the same key: a thread that remembers the key of one map
/// does not give its stripe to an instance of the other moved there; a map made after
/// another is dropped (perhaps at its address) neither.
#[test]
fn m2_moved_instance_never_takes_another_maps_stripe() {
    let l1 = slot_layer(builder().consecutive_failures(NEVER));
    let l2 = slot_layer(builder().consecutive_failures(NEVER));
    let (t1, t2) = (l1.layer(upstream()), l2.layer(upstream()));
    let a = Worker::spawn(None, || None::<SlotSvc>);
    let b = Worker::spawn(None, || None::<SlotSvc>);
    let call_on = |w: &Worker<Option<SlotSvc>>, s: SlotSvc| -> SlotSvc {
        w.run(move |_| {
            let mut s = s;
            assert_eq!(call_now(&mut s, rq("/7", false)), Got::Ok);
            s
        })
    };
    // B remembers l2's key; l1's instance, filled on A, moves to B.
    let own2 = t2.clone();
    b.run(move |st| call_now(st.insert(own2), rq("/7", false)));
    let s1 = call_on(&a, t1.clone());
    let s1 = call_on(&b, s1);
    let s1 = call_on(&b, s1);
    let (h1, h2) = (l1.handle(&Slot(7)), l2.handle(&Slot(7)));
    assert_eq!((h1.metrics().calls, h2.metrics().calls), (3, 1));
    // And the other way: B remembers l1's key too; l2's instance filled on A moves to B.
    let s2 = call_on(&a, t2.clone());
    let s2 = call_on(&b, s2);
    let s1 = call_on(&a, s1);
    assert_eq!((h1.metrics().calls, h2.metrics().calls), (4, 3));
    // l1 goes; a map made now: the instance of it moved from A to B counts on its own.
    drop((s1, t1, h1, l1));
    let l3 = slot_layer(builder().consecutive_failures(NEVER));
    let t3 = l3.layer(upstream());
    let s3 = call_on(&a, t3.clone());
    let _s3 = call_on(&b, s3);
    assert_eq!(l3.handle(&Slot(7)).metrics().calls, 2);
    assert_eq!(h2.metrics().calls, 3);
    drop(s2);
}

// ---------------------------------------------------------------------------------------
// 4. Idle eviction, the threads' clocks apart.
// ---------------------------------------------------------------------------------------

fn now_in(rt: &Runtime) -> Instant {
    rt.block_on(async { Instant::now() })
}

/// `n` paused runtimes whose clocks read the same instant (each runtime's clock is its own,
/// frozen when it was built: the earlier ones are moved on to the last one's).
fn aligned(n: usize) -> Vec<Runtime> {
    let rts: Vec<Runtime> = (0..n).map(|_| paused_rt()).collect();
    let last = rts.iter().map(now_in).max().unwrap();
    for rt in &rts {
        let behind = last - now_in(rt);
        rt.block_on(advance(behind));
    }
    for rt in &rts {
        assert_eq!(now_in(rt), last);
    }
    rts
}

/// Moves `rt`'s clock on to `at`.
fn set_clock(rt: &Runtime, at: Instant) {
    let now = now_in(rt);
    assert!(at >= now, "clocks only move on");
    rt.block_on(advance(at - now));
    assert_eq!(now_in(rt), at);
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Three paused runtimes whose clocks start aligned: `a` for this thread (the one evicting),
/// `x` and `y` for two workers, each keeping an instance of a per-key layer (idle time 60 s,
/// one breaker per shard, a trip at the first failure) made at its first call to key 7.
struct TwoWorkers {
    // Declared first: the workers end before the runtimes whose clocks they read.
    wx: Worker<Option<SlotSvc>>,
    wy: Worker<Option<SlotSvc>>,
    template: SlotSvc,
    layer: SlotLayer,
    base: Instant,
    probes: Cell<u32>,
    rts: Vec<Runtime>,
}

impl TwoWorkers {
    fn new() -> Self {
        let rts = aligned(3);
        let base = now_in(&rts[0]);
        let layer = {
            let _entered = rts[0].enter();
            slot_layer(
                tripping()
                    .max_keys(16)
                    .idle_eviction(Duration::from_secs(60)),
            )
        };
        Self {
            wx: Worker::spawn(Some(rts[1].handle().clone()), || None::<SlotSvc>),
            wy: Worker::spawn(Some(rts[2].handle().clone()), || None::<SlotSvc>),
            template: layer.layer(upstream()),
            layer,
            base,
            probes: Cell::new(0),
            rts,
        }
    }

    /// A call to key 7 through `w`'s instance, failing when `fail`.
    fn call(&self, w: &Worker<Option<SlotSvc>>, fail: bool) -> Got {
        let t = self.template.clone();
        w.run(move |st| call_now(st.get_or_insert_with(|| t), rq("/7", fail)))
    }

    /// Sets clock `i` (0: this thread's, 1: x's, 2: y's) to `at` seconds after the start.
    fn at(&self, i: usize, at: f64) {
        set_clock(&self.rts[i], self.base + secs(at));
    }

    /// Whether a new key, made at `at` seconds on this thread's clock, evicts key 7.
    fn evicts(&self, at: f64) -> bool {
        self.at(0, at);
        self.probes.set(self.probes.get() + 1);
        let _ = self.layer.handle(&Slot(100 + self.probes.get())).state();
        !self.layer.keys().contains(&Slot(7))
    }
}

/// An open key (idle time 60 s, one breaker per shard) that a worker on a clock of its own
/// used last at whole second `s` + 0.25, while this thread (the one evicting, on another
/// clock) reads `s` - 0.25 (that use is ahead of it: age 0, kept), `s` + 59.75 (59 s: kept) and
/// `s` + 60 (60 s: idle, evicted). The key was made 10 s before `s` by this thread
/// (`worker_makes` false) or the worker. All times after the layer was made.
fn use_ahead_of_the_evicting_clock(s: u64, worker_makes: bool) {
    let rts = aligned(2);
    let (a, b) = (&rts[0], &rts[1]);
    let _entered = a.enter();
    let base = now_in(a);
    let layer = slot_layer(
        tripping()
            .max_keys(16)
            .idle_eviction(Duration::from_secs(60)),
    );
    let template = layer.layer(upstream());
    let user = Worker::spawn(Some(b.handle().clone()), || None::<SlotSvc>);
    let s = s as f64;
    set_clock(a, base + secs(s - 10.0));
    set_clock(b, base + secs(s - 5.0));
    if !worker_makes {
        let _ = layer.handle(&Slot(7)).state();
    }
    let t = template.clone();
    assert_eq!(
        user.run(move |st| call_now(st.insert(t), rq("/7", true))),
        Got::Failed
    );
    let h = layer.handle(&Slot(7));
    assert_eq!(h.state(), BreakerState::Open);
    set_clock(b, base + secs(s + 0.25));
    assert_eq!(
        user.run(|st| call_now(st.as_mut().unwrap(), rq("/7", false))),
        Got::Rejected
    );
    let mut probe = 0;
    let mut evicts = |at: f64| -> bool {
        set_clock(a, base + secs(at));
        probe += 1;
        let _ = layer.handle(&Slot(100 + probe)).state();
        !layer.keys().contains(&Slot(7))
    };
    assert!(
        !evicts(s - 0.25),
        "a use ahead of the evicting clock read as old"
    );
    assert!(!evicts(s + 59.75), "used 59 whole seconds ago: evicted");
    assert!(evicts(s + 60.0), "unused for 60 whole seconds: kept");
    assert_eq!(h.metrics().rejected, 1);
    drop(user);
}

#[test]
fn w1_a_use_ahead_across_a_second_boundary_is_used_now() {
    use_ahead_of_the_evicting_clock(100, false);
    use_ahead_of_the_evicting_clock(100, true);
}

/// The use at 2^32 s + 0.25 (its low 32 bits: 0), the evicting clock at 2^32 - 0.25 s (low
/// bits: 2^32 - 1): still ahead; then 59 and 60 whole seconds on, across the wrap.
#[test]
fn w2_a_use_ahead_across_the_wrap_of_the_low_32_bits() {
    use_ahead_of_the_evicting_clock(1 << 32, false);
    use_ahead_of_the_evicting_clock(1 << 32, true);
}

/// The same one second before the wrap: the use at 2^32 - 0.75 s, read from 2^32 - 1.25 s,
/// 2^32 + 58.75 s and 2^32 + 59 s.
#[test]
fn w3_a_use_ahead_one_second_before_the_wrap() {
    use_ahead_of_the_evicting_clock((1 << 32) - 1, false);
    use_ahead_of_the_evicting_clock((1 << 32) - 1, true);
    // And twice round the low bits.
    use_ahead_of_the_evicting_clock((1 << 33) + 7, true);
}

/// Threads on clocks that straddle a second boundary, each on a stripe of its own (the maker
/// on the first, a second thread on its own): the key's age is the youngest of them, however
/// the evicting thread's clock straddles theirs.
#[test]
fn w4_youngest_of_stripes_on_clocks_straddling_a_second() {
    let c = TwoWorkers::new();
    let _entered = c.rts[0].enter();
    // X makes and trips it at 0.9; Y (a clock 0.2 s ahead: second 1) first calls it at 1.1.
    c.at(1, 0.9);
    c.at(2, 1.1);
    assert_eq!(c.call(&c.wx, true), Got::Failed);
    assert_eq!(c.call(&c.wy, false), Got::Rejected);
    // Y at 30.1 (through its memo: only its stripe), X at 40.95 (its memo: the first stripe).
    c.at(2, 30.1);
    assert_eq!(c.call(&c.wy, false), Got::Rejected);
    c.at(1, 40.95);
    assert_eq!(c.call(&c.wx, false), Got::Rejected);
    // Y again at 41.05 (second 41).
    c.at(2, 41.05);
    assert_eq!(c.call(&c.wy, false), Got::Rejected);
    assert!(!c.evicts(40.99), "ahead of the evicting clock");
    assert!(!c.evicts(100.99), "second 100: 59 s after Y's last use");
    assert!(c.evicts(101.0), "second 101: 60 s after the youngest use");
}

// ---------------------------------------------------------------------------------------
// 5. A stamp of last use never goes back.
// ---------------------------------------------------------------------------------------

/// A stamp of last use never goes back, so an open breaker in use is not evicted as idle.
/// The maker X uses the key at 100.25 s (stamp 100) and Y, whose clock reads half a second
/// behind (it read it just before X, across the second boundary), then calls it for the first
/// time. At 159.5 s, 59 whole seconds after X's use, the open breaker must still be kept.
/// When `Stripe::touch` stored any second that differed, Y put the stamp back to 99 and the
/// breaker was evicted as idle for 60 s (reset to Closed: its callers reached the failing
/// upstream again); with real threads, a caller descheduled between its clock read and its
/// store put it back by as long as it was off the CPU
/// ([`a_stalled_caller_does_not_put_the_last_use_back`]).
#[test]
fn a_use_straddling_a_second_boundary_does_not_put_the_last_use_back() {
    let c = TwoWorkers::new();
    let _entered = c.rts[0].enter();
    assert_eq!(c.call(&c.wx, true), Got::Failed); // X makes it and trips it at 0 s
    let h = c.layer.handle(&Slot(7));
    c.at(1, 100.25);
    assert_eq!(c.call(&c.wx, false), Got::Rejected); // X's use: second 100
    c.at(2, 99.75);
    assert_eq!(c.call(&c.wy, false), Got::Rejected); // Y's, from a clock read just before X's
    assert!(
        !c.evicts(159.5),
        "an open breaker used 59 whole seconds ago was evicted as idle for 60"
    );
    assert_eq!(c.call(&c.wx, false), Got::Rejected);
    assert_eq!(h.metrics().rejected, 3);
}

/// A key whose `same` waits, on a thread that armed it, until the test lets it go: a
/// thread descheduled for a while between its clock read and its store, made deterministic.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stall(u32);

thread_local! {
    /// This thread's next `same` tells the first sender it is stalled, then waits for the
    /// receiver.
    static STALL: RefCell<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>> =
        const { RefCell::new(None) };
}

impl Hash for Stall {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

impl BreakerKey for Stall {
    fn name(&self) -> String {
        format!("stall{}", self.0)
    }
    fn same(&self, other: &Self) -> bool {
        if let Some((stalled, go)) = STALL.with_borrow_mut(Option::take) {
            stalled.send(()).unwrap();
            go.recv_timeout(Duration::from_secs(120)).unwrap();
        }
        self == other
    }
}

type StallFn = fn(&Uri, &HeaderMap) -> Stall;
type StallSvc = KeyedCircuitBreaker<Up, DefaultClassifier, StallFn, Stall>;

fn by_stall(u: &Uri, _: &HeaderMap) -> Stall {
    Stall(number_in(u))
}

/// As [`a_use_straddling_a_second_boundary_does_not_put_the_last_use_back`], on one clock: X
/// made the key and tripped it at 0 s. Y's first call reads the clock at 0 s and is held up
/// before it stores (here in the key's `same`, under the shard's read lock; with real
/// threads, a preemption or a wait for that lock does it) while X calls at 30 s through its
/// memo (stamp 30 on the first stripe). Y's store of 0 must not replace 30: at 75 s, 45 s
/// after X's use, a new key must not evict the open breaker.
#[test]
fn a_stalled_caller_does_not_put_the_last_use_back() {
    let rt = paused_rt();
    let _entered = rt.enter();
    let layer = tripping()
        .max_keys(16)
        .idle_eviction(Duration::from_secs(60))
        .build_per_key(by_stall as StallFn)
        .unwrap();
    let template: StallSvc = layer.layer(upstream());
    let wx = Worker::spawn(Some(rt.handle().clone()), || None::<StallSvc>);
    let wy = Worker::spawn(Some(rt.handle().clone()), || None::<StallSvc>);
    let t = template.clone();
    assert_eq!(
        wx.run(move |st| call_now(st.insert(t), rq("/7", true))),
        Got::Failed
    );
    let (stalled_tx, stalled) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let t = template.clone();
    let y_call = wy.submit(move |st| {
        STALL.with_borrow_mut(|s| *s = Some((stalled_tx, go_rx)));
        call_now(st.insert(t), rq("/7", false))
    });
    stalled
        .recv_timeout(Duration::from_secs(120))
        .expect("Y reached the lookup");
    rt.block_on(advance(Duration::from_secs(30)));
    assert_eq!(
        wx.run(|st| call_now(st.as_mut().unwrap(), rq("/7", false))),
        Got::Rejected
    );
    go.send(()).unwrap();
    assert_eq!(
        y_call.recv_timeout(Duration::from_secs(120)).unwrap(),
        Got::Rejected
    );
    rt.block_on(advance(Duration::from_secs(45)));
    let _ = layer.handle(&Stall(100)).state();
    assert_eq!(
        layer.keys(),
        vec![Stall(7)],
        "an open breaker used 45 s ago was evicted as idle for 60"
    );
    assert_eq!(
        wx.run(|st| call_now(st.as_mut().unwrap(), rq("/7", false))),
        Got::Rejected
    );
}
