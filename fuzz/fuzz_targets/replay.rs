//! The replay body on arbitrary chunkings, caps, size hints, trailers and interleavings of
//! several readers:
//! - every replay that is allowed yields exactly the bytes and trailers the caller's body
//!   produced, and a body over the cap is never replayed but always delivered whole to its
//!   first reader;
//! - before every frame, each reader's `size_hint` bounds what that reader will still yield
//!   (never more than its lower bound promised, never past its upper bound), and
//!   `is_end_stream` is true only when nothing is left.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run replay -- -max_total_time=300` (from the repo root).
#![no_main]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use steadfast_retry::ReplayBody;

/// The caller's body: chunks, optional trailers, and a size hint of one of three kinds that
/// follows what is left (exact and shrinking, as hyper's `Incoming`; a lower bound; none).
struct Caller {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    hint: u8,
}

impl Body for Caller {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(c) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn size_hint(&self) -> SizeHint {
        let left: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        match self.hint % 3 {
            0 => SizeHint::with_exact(left),
            1 => {
                let mut h = SizeHint::new();
                h.set_lower(left / 2);
                h
            }
            _ => SizeHint::new(),
        }
    }
}

/// One reader and what it has yielded so far.
struct Reader {
    body: ReplayBody<Caller>,
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
    done: bool,
    failed: bool,
}

impl Reader {
    fn new(body: ReplayBody<Caller>) -> Self {
        Self {
            body,
            data: Vec::new(),
            trailers: None,
            done: false,
            failed: false,
        }
    }

    /// Reads one frame, checking the hint against what the whole body holds.
    async fn step(&mut self, total: u64) {
        let left = total - self.data.len() as u64;
        let hint = self.body.size_hint();
        assert!(hint.lower() <= left, "hint {hint:?} promises more than the {left} bytes left");
        assert!(
            hint.upper().is_none_or(|u| u >= left),
            "hint {hint:?} promises less than the {left} bytes left"
        );
        let end = self.body.is_end_stream();
        match self.body.frame().await {
            Some(Ok(f)) => {
                assert!(!end, "a frame after is_end_stream");
                match f.into_data() {
                    Ok(d) => self.data.extend_from_slice(&d),
                    Err(f) => self.trailers = f.into_trailers().ok(),
                }
            }
            Some(Err(_)) => {
                self.failed = true;
                self.done = true;
            }
            None => {
                assert_eq!(left, 0, "the body ended {left} bytes early");
                self.done = true;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let cap = usize::from(data[0]) * 4;
    let with_trailers = data[1] & 1 == 1;
    let hint = data[1] >> 1;
    // Which reader takes each step; a new reader joins on a step that names one past the last.
    let schedule = data[2];
    let payload = &data[3..];
    // Chunk sizes (zero included) come from the payload itself; the byte that says "zero"
    // is skipped.
    let mut chunks = VecDeque::new();
    let mut i = 0;
    while i < payload.len() {
        let n = usize::from(payload[i] % 17);
        let end = (i + n).min(payload.len());
        chunks.push_back(Bytes::copy_from_slice(&payload[i..end]));
        i = end.max(i + 1);
    }
    let expected = chunks.iter().flat_map(|c| c.iter().copied()).collect::<Vec<u8>>();
    let trailers = with_trailers.then(|| {
        let mut t = HeaderMap::new();
        t.insert("x-len", expected.len().into());
        t
    });
    let total = expected.len() as u64;
    let caller = Caller {
        chunks,
        trailers: trailers.clone(),
        hint,
    };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut readers = vec![Reader::new(ReplayBody::new(caller, cap))];
        let mut rng = u64::from(schedule) | 1;
        for _ in 0..10_000 {
            if readers.iter().all(|r| r.done) {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let pick = (rng % (readers.len() as u64 + 1)) as usize;
            if pick == readers.len() {
                if readers.len() < 4 {
                    if let Some(b) = readers[0].body.replay() {
                        readers.push(Reader::new(b));
                    }
                }
                continue;
            }
            if !readers[pick].done {
                readers[pick].step(total).await;
            }
        }
        // Whoever the schedule left unfinished reads on to its end.
        for r in readers.iter_mut() {
            while !r.done {
                r.step(total).await;
            }
        }
        assert!(readers.iter().any(|r| !r.failed), "the reader in front never fails");
        for (n, r) in readers.iter().enumerate() {
            if r.failed {
                // Only a reader behind one that read past the cap (its frames were dropped)
                // may fail.
                assert!(expected.len() > cap, "reader {n} failed under the cap");
                continue;
            }
            assert_eq!(r.data, expected, "reader {n} yields the caller's bytes");
            assert_eq!(r.trailers, trailers, "reader {n} yields the caller's trailers");
        }
        if expected.len() > cap {
            assert!(readers[0].body.replay().is_none(), "over the cap, no replay");
        } else {
            let again = readers[0].body.replay().expect("under the cap, a replay");
            let out = again.collect().await.unwrap();
            assert_eq!(out.trailers().cloned(), trailers);
            assert_eq!(out.to_bytes(), Bytes::from(expected.clone()));
        }
    });
});
