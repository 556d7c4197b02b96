//! Our retry budget beside gRPC A6's retry throttling, on the same seeded traffic (paused
//! time): what each lets through when an upstream fails some calls, fails all of them, and
//! recovers. The figures are printed (`cargo test -p steadfast-retry --test throttling --
//! --nocapture`) and the comparison they support is asserted; `docs/` quotes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use steadfast_core::BoxError;
use steadfast_retry::{Backoff, BudgetConfig, Jitter, ReplayBody, RetryLayer, ThrottleConfig};
use tower::{Layer, ServiceExt, service_fn};

/// One phase's outcome: calls, calls answered 200, attempts sent.
#[derive(Debug, Default, Clone, Copy)]
struct Phase {
    calls: u64,
    ok: u64,
    attempts: u64,
}

/// 100 calls a second for 20 s per phase: 20 % of attempts fail, then all, then none.
async fn run(layer: RetryLayer) -> [Phase; 3] {
    let failure_pct = Arc::new(AtomicU64::new(20));
    let n = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let (f, c, a) = (failure_pct.clone(), n.clone(), attempts.clone());
    let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let i = c.fetch_add(1, Ordering::SeqCst);
        a.fetch_add(1, Ordering::SeqCst);
        // A fixed pseudo-random sequence (SplitMix64 of the attempt number).
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let fail = (z ^ (z >> 31)) % 100 < f.load(Ordering::SeqCst);
        async move {
            let status = if fail { 503 } else { 200 };
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        }
    });
    let svc = layer.layer(upstream);
    let mut phases = [Phase::default(); 3];
    for (p, pct) in [20, 100, 0].into_iter().enumerate() {
        failure_pct.store(pct, Ordering::SeqCst);
        let before = attempts.load(Ordering::SeqCst);
        for _ in 0..2000 {
            let req = Request::get("http://up/").body(Full::default()).unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            phases[p].calls += 1;
            phases[p].ok += u64::from(res.status() == 200);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        phases[p].attempts = attempts.load(Ordering::SeqCst) - before;
    }
    phases
}

fn builder() -> steadfast_retry::RetryBuilder {
    RetryLayer::builder()
        .backoff(Backoff::constant(Duration::from_millis(1)).jitter(Jitter::None))
        .seed(1)
}

#[tokio::test(start_paused = true)]
async fn the_budget_keeps_retrying_a_partial_failure_and_caps_a_full_one() {
    let budget = run(builder()
        .budget(Some(BudgetConfig::default()))
        .build()
        .unwrap())
    .await;
    let a6 = run(builder()
        .budget(None)
        .grpc_throttling(Some(ThrottleConfig {
            max_tokens: 10,
            token_ratio: 0.1,
        }))
        .build()
        .unwrap())
    .await;
    for (name, phases) in [
        ("budget 10 % + 10/s", budget),
        ("A6 throttling 10 / 0.1", a6),
    ] {
        for (phase, p) in ["20 % failing", "all failing", "recovered"]
            .iter()
            .zip(phases)
        {
            println!(
                "{name:<24} {phase:<13} success {:>5.1} %  attempts per call {:.2}",
                100.0 * p.ok as f64 / p.calls as f64,
                p.attempts as f64 / p.calls as f64
            );
        }
    }
    // 20 % of attempts failing: the budget retries them (its floor of 10 a second covers this
    // load), A6 stops retrying once failures have drained half its tokens.
    assert!(budget[0].ok > a6[0].ok + 200, "{budget:?} {a6:?}");
    // All failing: both cap the load; neither more than the budget's 10 % + 10/s.
    assert!(
        budget[1].attempts <= 2000 + 200 + 10 * 20 + 100,
        "{budget:?}"
    );
    assert!(a6[1].attempts <= budget[1].attempts, "{a6:?}");
    // Recovered: everyone succeeds.
    assert_eq!((budget[2].ok, a6[2].ok), (2000, 2000));
}
