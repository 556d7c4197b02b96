//! Run: `cargo run --release --example demo --features metrics` (the layers' counters feed the
//! gateway's `/metrics`, so the example needs them on).
//!
//! The seed scenario in one process, on loopback, in about 15 seconds:
//!
//! ```text
//!                      ┌──────── users        (down from 2 s to 3.8 s, then back; browns out
//!                      │                      at 6-8.5 s: every other call fails)
//!   load driver ──▶ gateway ──── orders ×3 ──┬── inventory (every 7th call stalls past the attempt timeout)
//!   (burst + spike)  │  rate limit 100 r/s,  └── payments  (bursts of 503 + Retry-After)
//!                    │  burst 200 (payments 20)
//!                    └── /health, /metrics (Prometheus text)
//! ```
//!
//! Every hop runs the standard server stack; every outgoing call goes through the standard
//! client stack (correlation id, total timeout, retry with budget, per-host breaker,
//! attempt timeout). The gateway calls orders as a *service*: its stack balances over the
//! three instances, of which orders-3 answers 503 to every other order (a bad deploy), and
//! ejects it for a while when it fails too often. Handlers contain no resilience code: the correlation id and the
//! remaining deadline travel on their own.
//!
//! At the end it prints a table per upstream, the breaker timeline, one request's
//! correlation id as it appears in the log line of every hop, and the gateway's metrics. Two
//! phases follow on services of their own: an overload (a caller with only the client stack
//! beside one with client-side throttling and an adaptive concurrency limit, against a
//! catalog that sheds load) and a slow replica (a balanced caller beside one that also
//! hedges).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use steadfast::balance::FailurePercentage;
use steadfast::client::{HttpClient, HttpClientLayer};
use steadfast::errors::{self, Failure};
use steadfast::retry::{Backoff, BudgetConfig, ReplayBody};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

mod observation;
mod phases;
mod report;
mod scenario;
mod services;

use observation::*;
use phases::*;
use report::*;
use scenario::*;
use services::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let report = run(Scenario::full()).await;
    print!("{}", report.text);
    if report.driver_ok == 0 || report.traced_hops == 0 {
        eprintln!(
            "the demo is broken: {} of {} requests succeeded, {} hops traced",
            report.driver_ok, report.driver_total, report.traced_hops
        );
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo, scaled down and on paused time, so it never rots.
    #[tokio::test(start_paused = true)]
    async fn demo_runs_scaled_down() {
        let report = run(Scenario::small()).await;
        println!("{}", report.text);
        assert!(report.driver_total > 0);
        assert!(report.driver_ok > 0, "some requests succeed");
        // gateway -> orders -> inventory + payments, all under one id.
        assert!(
            report.traced_hops >= 4,
            "one id seen at every hop: {}",
            report.traced_hops
        );
        assert!(report.text.contains("| gateway → users |"));
        // Rows and breakers are per caller: the orders instances' own calls show apart.
        assert!(
            report.text.contains("| orders-1 → inventory |"),
            "{}",
            report.text
        );
        assert!(report.text.contains("retry budget (one per stack)"));
        assert!(report.text.contains("| + throttle, adaptive limit"));
        assert!(report.text.contains("| balanced + hedge"));
    }
}
