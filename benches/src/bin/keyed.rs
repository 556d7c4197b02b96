//! What per-key (per-authority) breakers cost: memory per idle breaker, and the time to add a
//! key to a full map under churn.
//!
//! Run: `cargo run --release -p steadfast-bench --bin keyed` (prints a markdown table).
//!
//! - Bytes per idle breaker: live heap bytes (counted by the allocator) and resident set
//!   (`/proc/self/statm`) before and after 100 000 distinct authorities, divided by 100 000.
//! - Insert under churn: a map already holding `max_keys` breakers, then new authorities one
//!   after another, each evicting one; nanoseconds per new key at 10 000 and 200 000 keys
//!   (median of 5 rounds).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall time is the measurement

use std::convert::Infallible;
use std::future::Future;
use std::time::Instant;

use steadfast::breaker::CircuitBreakerLayer;
use steadfast_bench::{CountingAlloc, live_bytes};
use tower::{Layer, Service};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

type Svc = steadfast::breaker::KeyedCircuitBreaker<
    tower::util::ServiceFn<
        fn(http::Request<()>) -> std::future::Ready<Result<http::Response<()>, Infallible>>,
    >,
    steadfast::common::DefaultClassifier,
    steadfast::breaker::ByAuthority,
    Option<http::uri::Authority>,
>;

fn answer(_req: http::Request<()>) -> std::future::Ready<Result<http::Response<()>, Infallible>> {
    std::future::ready(Ok(http::Response::new(())))
}

fn service(max_keys: usize) -> Svc {
    let layer = CircuitBreakerLayer::builder()
        .max_keys(max_keys)
        .build_per_authority()
        .expect("valid");
    layer.layer(tower::service_fn(answer as fn(_) -> _))
}

fn request(i: usize) -> http::Request<()> {
    http::Request::get(format!("http://host-{i}.test/"))
        .body(())
        .expect("valid")
}

/// One call to the authority `host-{i}`, answered at once (no runtime needed).
fn call(svc: &mut Svc, i: usize) {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = svc.call(request(i));
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(res) => drop(res),
        std::task::Poll::Pending => unreachable!("the inner service answers at once"),
    }
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Live heap bytes per idle breaker after `keys` distinct authorities.
fn bytes_per_key(keys: usize) -> (f64, Option<f64>) {
    let mut svc = service(keys + 16);
    for i in 0..16 {
        call(&mut svc, i);
    }
    let (heap, rss) = (live_bytes(), resident_bytes());
    for i in 16..keys + 16 {
        call(&mut svc, i);
    }
    let per_key = (live_bytes() - heap) as f64 / keys as f64;
    let rss = rss
        .zip(resident_bytes())
        .map(|(a, b)| b.saturating_sub(a) as f64 / keys as f64);
    drop(svc);
    (per_key, rss)
}

/// Nanoseconds per new key into a full map of `max_keys` (each new key evicts one).
fn insert_ns(max_keys: usize, rounds: usize, per_round: usize) -> f64 {
    let mut svc = service(max_keys);
    for i in 0..max_keys {
        call(&mut svc, i);
    }
    let mut next = max_keys;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..per_round {
            call(&mut svc, next);
            next += 1;
        }
        samples.push(start.elapsed().as_nanos() as f64 / per_round as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let (heap, rss) = bytes_per_key(100_000);
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| heap bytes per idle per-key breaker (100 000 authorities) | {heap:.0} |");
    if let Some(rss) = rss {
        println!("| resident bytes per idle per-key breaker (100 000 authorities) | {rss:.0} |");
    }
    for keys in [10_000, 200_000] {
        let ns = insert_ns(keys, 5, 20_000);
        println!("| ns per new key, full map of {keys} (churn) | {ns:.0} |");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17's budget: an idle per-key breaker costs at most 512 bytes of heap (counted by
    /// the allocator, so the figure does not depend on the machine). With the `metrics`
    /// feature each breaker also holds its three metric handles, registered at first use
    /// (72 bytes): 584 then.
    #[test]
    fn an_idle_per_key_breaker_costs_at_most_512_bytes() {
        let budget = if cfg!(feature = "metrics") {
            584.0
        } else {
            512.0
        };
        let (per_key, _) = bytes_per_key(20_000);
        println!("{per_key:.0} bytes per idle per-key breaker (budget {budget})");
        assert!(
            per_key <= budget,
            "{per_key} bytes per idle per-key breaker"
        );

        // The same when the thread that makes and calls the breakers is numbered past the
        // first eight (a runtime of more workers, or threads that came and went): it counts
        // on each breaker's first stripe as one of the first eight does. In this test, not
        // another: the heap is counted for the whole process.
        let late = loop {
            let measured = std::thread::spawn(|| {
                (steadfast::common::__private::thread_number() >= 8)
                    .then(|| bytes_per_key(20_000).0)
            })
            .join()
            .expect("no panic");
            if let Some(bytes) = measured {
                break bytes;
            }
        };
        println!("{late:.0} bytes per idle per-key breaker made by a later thread");
        assert!(late <= budget, "{late} bytes per idle per-key breaker");
    }
}
