//! Helpers for the hostile tests of the per-key breaker's per-thread stripes
//! (`hostile_thread_stripes.rs`, `hostile_stripe_owners.rs`): per-key layers over an upstream
//! that answers at once (failing on request), calls polled to completion on any thread,
//! worker threads that keep a service instance, and a child process of the test binary
//! (thread numbers from 0) for the tests whose point is which thread has which stripe.

use std::convert::Infallible;
use std::future::Ready;
use std::hash::{Hash, Hasher};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use futures_util::FutureExt;
use http::{HeaderMap, Request, Response, Uri};
use steadfast::breaker::error::BreakerOpen;
use steadfast::breaker::{
    BreakerKey, CircuitBreakerBuilder, CircuitBreakerLayer, KeyedCircuitBreaker,
    KeyedCircuitBreakerLayer,
};
use steadfast::common::{BoxError, DefaultClassifier};
use steadfast_core::__private::thread_number;
use tokio::runtime::Runtime;
use tower::util::ServiceFn;
use tower::{Service, ServiceExt, service_fn};

/// A consecutive-failure rule no test reaches (a breaker needs some rule).
pub const NEVER: Option<u32> = Some(u32::MAX);

pub fn builder() -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(30))
        .max_open_time(Duration::from_secs(30))
        .jitter_percent(0)
        .seed(1)
}

/// A breaker that trips at the first failure and stays open for an hour.
pub fn tripping() -> CircuitBreakerBuilder {
    builder()
        .consecutive_failures(Some(1))
        .open_time(Duration::from_secs(3600))
        .max_open_time(Duration::from_secs(3600))
}

pub type Answer = Ready<Result<Response<()>, Infallible>>;

/// The upstream: 503 when the query is `fail`, else 200; answers at once (no runtime needed).
pub type Up = ServiceFn<fn(Request<()>) -> Answer>;

pub fn answer(r: Request<()>) -> Answer {
    let status = if r.uri().query() == Some("fail") {
        503
    } else {
        200
    };
    std::future::ready(Ok(Response::builder().status(status).body(()).unwrap()))
}

pub fn upstream() -> Up {
    service_fn(answer as fn(Request<()>) -> Answer)
}

/// A key that hashes the same as every other: all keys of a map share one shard, so
/// `max_keys(16)` keeps one breaker and which key an insertion evicts is known. No heap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot(pub u32);

impl Hash for Slot {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

impl BreakerKey for Slot {
    fn name(&self) -> String {
        format!("slot{}", self.0)
    }
}

pub type PathFn = fn(&Uri, &HeaderMap) -> String;

pub type SlotFn = fn(&Uri, &HeaderMap) -> Slot;

pub type PathSvc = KeyedCircuitBreaker<Up, DefaultClassifier, PathFn, String>;

pub type SlotSvc = KeyedCircuitBreaker<Up, DefaultClassifier, SlotFn, Slot>;

pub type PathLayer = KeyedCircuitBreakerLayer<DefaultClassifier, PathFn, String>;

pub type SlotLayer = KeyedCircuitBreakerLayer<DefaultClassifier, SlotFn, Slot>;

pub fn by_path(u: &Uri, _: &HeaderMap) -> String {
    u.path().to_owned()
}

pub fn number_in(u: &Uri) -> u32 {
    u.path().trim_start_matches('/').parse().unwrap_or(0)
}

pub fn by_slot(u: &Uri, _: &HeaderMap) -> Slot {
    Slot(number_in(u))
}

pub fn path_layer(b: CircuitBreakerBuilder) -> PathLayer {
    b.build_per_key(by_path as PathFn).unwrap()
}

pub fn slot_layer(b: CircuitBreakerBuilder) -> SlotLayer {
    b.build_per_key(by_slot as SlotFn).unwrap()
}

/// A request for `path` (a path key, or `/<n>` for key `n`), failing when `fail`.
pub fn rq(path: &str, fail: bool) -> Request<()> {
    let q = if fail { "?fail" } else { "" };
    Request::get(format!("http://up{path}{q}"))
        .body(())
        .unwrap()
}

/// What one call came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Got {
    Ok,
    Failed,
    Rejected,
}

pub fn got_of<B>(r: Result<Response<B>, BoxError>) -> Got {
    match r {
        Ok(res) if res.status() == 200 => Got::Ok,
        Ok(res) => {
            assert_eq!(res.status(), 503);
            Got::Failed
        }
        Err(e) => {
            assert!(e.downcast_ref::<BreakerOpen>().is_some(), "{e}");
            Got::Rejected
        }
    }
}

/// One call through `svc`, polled to completion at once (the upstream answers at once):
/// usable on any thread, with or without a runtime.
pub fn call_now<S, B>(svc: &mut S, r: Request<()>) -> Got
where
    S: Service<Request<()>, Response = Response<B>, Error = BoxError>,
{
    svc.ready()
        .now_or_never()
        .expect("ready at once")
        .expect("poll_ready never fails");
    got_of(svc.call(r).now_or_never().expect("answers at once"))
}

/// Counts of calls by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub rejected: u64,
}

impl Tally {
    pub fn add(&mut self, g: Got) {
        match g {
            Got::Ok => self.ok += 1,
            Got::Failed => self.failed += 1,
            Got::Rejected => self.rejected += 1,
        }
    }
    pub fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.rejected += o.rejected;
    }
    pub fn admitted(&self) -> u64 {
        self.ok + self.failed
    }
}

/// A current-thread runtime with paused time. Threads that enter its handle read its clock.
pub fn paused_rt() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

pub type Job<St> = Box<dyn FnOnce(&mut St) + Send>;

/// A thread that keeps state `St` (made on it) and runs jobs on it, in the given runtime's
/// context if any (so that it reads that runtime's paused clock). Its thread number is taken
/// when it starts.
pub struct Worker<St> {
    tx: Option<mpsc::Sender<Job<St>>>,
    join: Option<thread::JoinHandle<()>>,
    pub number: usize,
}

impl<St: 'static> Worker<St> {
    pub fn spawn(
        rt: Option<tokio::runtime::Handle>,
        init: impl FnOnce() -> St + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job<St>>();
        let (ntx, nrx) = mpsc::channel();
        let join = thread::spawn(move || {
            let _entered = rt.as_ref().map(|h| h.enter());
            ntx.send(thread_number()).unwrap();
            let mut st = init();
            for job in rx {
                job(&mut st);
            }
        });
        let number = nrx.recv().expect("the worker started");
        Self {
            tx: Some(tx),
            join: Some(join),
            number,
        }
    }

    /// Runs `f` on the worker; its answer arrives on the receiver.
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut St) -> R + Send + 'static,
    ) -> mpsc::Receiver<R> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .as_ref()
            .unwrap()
            .send(Box::new(move |st: &mut St| {
                let _ = rtx.send(f(st));
            }))
            .expect("the worker is alive");
        rrx
    }

    pub fn run<R: Send + 'static>(&self, f: impl FnOnce(&mut St) -> R + Send + 'static) -> R {
        self.submit(f)
            .recv_timeout(Duration::from_secs(120))
            .expect("the worker panicked or hung")
    }
}

impl<St> Drop for Worker<St> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(j) = self.join.take() {
            let r = j.join();
            if !thread::panicking() {
                r.expect("the worker panicked");
            }
        }
    }
}

pub const CHILD_ENV: &str = "STEADFAST_HOSTILE_STRIPES_CHILD";

/// Whether this is the child process running `name` (else the test does nothing: its parent
/// test runs it).
pub fn in_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

/// Runs the test `name` of this binary alone in a child process (thread numbers from 0) and
/// asserts it passed.
pub fn run_in_child(name: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- child {name} ---\n{stdout}\n{stderr}");
    assert!(out.status.success(), "child {name} failed");
    assert!(
        stdout.contains("1 passed"),
        "child {name} did not run its test"
    );
}
