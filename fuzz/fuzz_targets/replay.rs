//! The replay body on arbitrary chunkings, caps, trailers and interleavings: every replay
//! that is allowed yields exactly the bytes and trailers the caller's body produced, and a
//! body over the cap is never replayed but always delivered whole to its first reader.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run replay -- -max_total_time=60` (from the repo root).
#![no_main]

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use libfuzzer_sys::fuzz_target;
use steadfast_retry::ReplayBody;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let cap = usize::from(data[0]) * 4;
    let trailers = data[1] & 1 == 1;
    let stop_first_after = usize::from(data[1] >> 1);
    let payload = &data[2..];
    // Chunk sizes come from the payload itself.
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    let mut i = 0;
    while i < payload.len() {
        let n = usize::from(payload[i] % 17) + 1;
        let end = (i + n).min(payload.len());
        frames.push(Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(&payload[i..end]))));
        expected.extend_from_slice(&payload[i..end]);
        i = end;
    }
    if trailers {
        let mut t = http::HeaderMap::new();
        t.insert("x-len", expected.len().into());
        frames.push(Ok(Frame::trailers(t)));
    }
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut first = ReplayBody::new(StreamBody::new(futures_util::stream::iter(frames)), cap);
        // The first attempt may stop early (the upstream answered before reading it all).
        let mut read_first = Vec::new();
        let mut steps = 0;
        while steps < stop_first_after {
            match first.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        read_first.extend_from_slice(d);
                    }
                }
                _ => break,
            }
            steps += 1;
        }
        assert_eq!(&expected[..read_first.len()], &read_first[..], "first attempt sees the caller's bytes");
        match first.replay() {
            Some(second) => {
                drop(first);
                let out = second.collect().await.unwrap();
                assert_eq!(out.trailers().is_some(), trailers);
                assert_eq!(out.to_bytes(), Bytes::from(expected.clone()), "replay is byte-identical");
            }
            None => {
                assert!(expected.len() > cap, "only an over-cap body refuses replay");
                // The first reader still gets everything.
                let rest = first.collect().await.unwrap().to_bytes();
                let mut all = read_first.clone();
                all.extend_from_slice(&rest);
                assert_eq!(all, expected);
            }
        }
    });
    let _ = Body::is_end_stream(&ReplayBody::<StreamBody<futures_util::stream::Empty<Result<Frame<Bytes>, std::convert::Infallible>>>>::empty());
});
