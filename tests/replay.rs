//! The replay body through a real hyper client and server, HTTP/1.1 and HTTP/2.
//!
//! Property: for any request body shape (chunk sizes; an exact size hint that shrinks as the
//! body is read, as hyper's own `Incoming` does; a lower-bound hint; no hint; trailers), any
//! point at which the upstream gives up on an attempt (answers 503 after reading some bytes,
//! or none), and any number of attempts, every attempt that reaches the upstream carries the
//! original bytes and trailers, and any `content-length` it carries is the original length.
//! A retried PUT must never be stored truncated while the caller sees 200.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proptest::prelude::*;
use steadfast::retry::{Backoff, ReplayBody};
use tower::{Layer, ServiceExt};

/// How the test body describes its size.
#[derive(Clone, Copy, Debug)]
enum Hint {
    /// Exact, shrinking as the body is read (hyper's `Incoming` under a `content-length`).
    Exact,
    /// A lower bound of half what is left, no upper bound.
    Lower,
    /// Nothing known.
    Unknown,
}

/// A request body of given chunks, with a size hint that follows what is left.
struct Shaped {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    hint: Hint,
}

impl Body for Shaped {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(c) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let left: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        match self.hint {
            Hint::Exact => SizeHint::with_exact(left),
            Hint::Lower => {
                let mut h = SizeHint::new();
                h.set_lower(left / 2);
                h
            }
            Hint::Unknown => SizeHint::new(),
        }
    }
}

/// One request as the upstream saw it.
#[derive(Debug)]
struct Seen {
    content_length: Option<u64>,
    bytes: Vec<u8>,
    trailers: Option<HeaderMap>,
}

#[derive(Default)]
struct Upstream {
    /// For each failing attempt in turn: how many bytes to read before answering 503.
    fail_after: Mutex<VecDeque<usize>>,
    seen: Mutex<Vec<Seen>>,
}

async fn handle(
    up: Arc<Upstream>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let content_length = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let fail_after = up.fail_after.lock().unwrap().pop_front();
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    let mut trailers = None;
    loop {
        if fail_after.is_some_and(|n| bytes.len() >= n) {
            break;
        }
        match body.frame().await {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => bytes.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Some(Err(_)) | None => break,
        }
    }
    let status = if fail_after.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    up.seen.lock().unwrap().push(Seen {
        content_length,
        bytes,
        trailers,
    });
    Ok(Response::builder()
        .status(status)
        .body(Full::default())
        .unwrap())
}

async fn serve(up: Arc<Upstream>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let up = up.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(up.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    addr
}

#[derive(Clone)]
struct Case {
    chunks: Vec<Vec<u8>>,
    hint: Hint,
    trailers: bool,
    /// Bytes read before each failing attempt's 503 (as a share of the body, 0..=100 %).
    fail_after: Vec<u8>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lens: Vec<usize> = self.chunks.iter().map(Vec::len).collect();
        f.debug_struct("Case")
            .field("chunk_lens", &lens)
            .field("hint", &self.hint)
            .field("trailers", &self.trailers)
            .field("fail_after_percent", &self.fail_after)
            .finish()
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..700), 1..8),
        prop_oneof![Just(Hint::Exact), Just(Hint::Lower), Just(Hint::Unknown)],
        any::<bool>(),
        prop::collection::vec(0u8..=100, 0..4),
    )
        .prop_map(|(chunks, hint, trailers, fail_after)| Case {
            chunks,
            hint,
            trailers,
            fail_after,
        })
}

fn run(case: &Case, http2: bool) -> Result<(), TestCaseError> {
    // Real time: the loopback connections need it (a paused clock advances past a timeout
    // while a socket is still delivering), and the backoff is zero, so nothing here waits.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let original: Vec<u8> = case.chunks.concat();
        // HTTP/1.1 sends trailers only with chunked encoding (no exact length) and only the
        // fields the request declares in `Trailer`.
        let trailers = (case.trailers && (http2 || !matches!(case.hint, Hint::Exact))).then(|| {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", "abc123".parse().unwrap());
            t
        });
        let up = Arc::new(Upstream::default());
        *up.fail_after.lock().unwrap() = case
            .fail_after
            .iter()
            .map(|p| original.len() * usize::from(*p) / 100)
            .collect();
        let addr = serve(up.clone()).await;
        let transport = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http::<ReplayBody<Shaped>>();
        let attempts = case.fail_after.len() as u32 + 1;
        let stack = steadfast::client::http()
            .retry(|r| {
                r.max_attempts(attempts)
                    .backoff(Backoff::new(Duration::ZERO, Duration::ZERO))
            })
            .build()
            .unwrap();
        let body = Shaped {
            chunks: case.chunks.iter().cloned().map(Bytes::from).collect(),
            trailers: trailers.clone(),
            hint: case.hint,
        };
        let mut req = Request::put(format!("http://{addr}/orders/1"));
        if trailers.is_some() {
            req = req.header(http::header::TRAILER, "x-checksum");
        }
        let res = stack
            .layer(transport)
            .oneshot(req.body(body).unwrap())
            .await
            .map_err(|e| TestCaseError::fail(format!("call failed: {e}")))?;
        prop_assert_eq!(res.status(), StatusCode::OK);
        let seen = std::mem::take(&mut *up.seen.lock().unwrap());
        prop_assert_eq!(
            seen.len(),
            attempts as usize,
            "every attempt reached the upstream"
        );
        for (i, s) in seen.iter().enumerate() {
            if let Some(len) = s.content_length {
                prop_assert_eq!(
                    len,
                    original.len() as u64,
                    "attempt {} content-length",
                    i + 1
                );
            }
        }
        let last = seen.last().unwrap();
        prop_assert_eq!(&last.bytes, &original, "the stored body is the original");
        prop_assert_eq!(
            &last.trailers,
            &trailers,
            "the stored trailers are the original"
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_attempt_carries_the_original_body_over_http1(case in case()) {
        run(&case, false)?;
    }

    #[test]
    fn every_attempt_carries_the_original_body_over_http2(case in case()) {
        run(&case, true)?;
    }
}

/// The report's case, pinned: 2,000 bytes with an exact hint that shrinks as they are read,
/// no `Content-Length` header; the upstream answers 503 after reading half.
#[test]
fn a_put_retried_after_half_its_body_is_stored_whole() {
    let case = Case {
        chunks: vec![vec![b'x'; 500]; 4],
        hint: Hint::Exact,
        trailers: false,
        fail_after: vec![50],
    };
    run(&case, false).unwrap();
    let case = Case {
        fail_after: vec![0],
        ..case
    };
    run(&case, false).unwrap();
}
