//! A body wrapper that classifies a gRPC response at end of stream.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::classify::{Class, GrpcClassifier};

/// Told how a classified body ended.
///
/// Implemented for closures `FnOnce(Option<Class>)`. `None` means the body was dropped before
/// its end (the caller lost interest): no verdict on the upstream.
pub trait OnEos {
    /// Called exactly once: with the verdict at end of stream, or `None` if the body was
    /// dropped first.
    fn on_eos(self, class: Option<Class>);
}

impl<F: FnOnce(Option<Class>)> OnEos for F {
    fn on_eos(self, class: Option<Class>) {
        self(class)
    }
}

pin_project! {
    /// Wraps a response body and reports its gRPC verdict when the stream ends.
    ///
    /// Data frames pass through untouched and are never buffered. The trailers frame is read
    /// for `grpc-status`; a stream that ends without one is classified UNKNOWN; a body error is
    /// a failure. The callback runs exactly once, also when the body is dropped early (with
    /// `None`).
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use bytes::Bytes;
    /// use http::HeaderMap;
    /// use http_body_util::{BodyExt, StreamBody};
    /// use http_body::Frame;
    /// use steadfast_core::{ClassifyEos, GrpcClassifier};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut trailers = HeaderMap::new();
    /// trailers.insert("grpc-status", "14".parse().unwrap());
    /// let frames = vec![
    ///     Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"msg"))),
    ///     Ok(Frame::trailers(trailers)),
    /// ];
    /// let seen = Arc::new(Mutex::new(None));
    /// let s = seen.clone();
    /// let body = ClassifyEos::new(
    ///     StreamBody::new(futures_util::stream::iter(frames)),
    ///     GrpcClassifier::new(),
    ///     move |class| *s.lock().unwrap() = class,
    /// );
    /// let collected = body.collect().await.unwrap();
    /// assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    /// assert!(seen.lock().unwrap().unwrap().is_retryable());
    /// # }
    /// ```
    pub struct ClassifyEos<B, F: OnEos> {
        #[pin]
        inner: B,
        classifier: GrpcClassifier,
        on_eos: Option<F>,
    }

    impl<B, F: OnEos> PinnedDrop for ClassifyEos<B, F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(f) = this.project().on_eos.take() {
                f.on_eos(None);
            }
        }
    }
}

impl<B, F: OnEos> ClassifyEos<B, F> {
    /// Wraps `inner`; `on_eos` learns the verdict.
    pub fn new(inner: B, classifier: GrpcClassifier, on_eos: F) -> Self {
        Self {
            inner,
            classifier,
            on_eos: Some(on_eos),
        }
    }
}

impl<B: fmt::Debug, F: OnEos> fmt::Debug for ClassifyEos<B, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyEos")
            .field("inner", &self.inner)
            .field("classifier", &self.classifier)
            .field("reported", &self.on_eos.is_none())
            .finish()
    }
}

impl<B: Body, F: OnEos> Body for ClassifyEos<B, F> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(class) = this.classifier.classify_frame(frame.as_ref()) {
            if let Some(f) = this.on_eos.take() {
                f.on_eos(Some(class));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<Option<Class>>>>;

    fn recorder() -> (Seen, impl FnOnce(Option<Class>)) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        (seen, move |c| s.lock().unwrap().push(c))
    }

    #[tokio::test]
    async fn trailers_ok_is_success_and_data_passes_through() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<_, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
            Ok(Frame::trailers(t)),
        ];
        let (seen, f) = recorder();
        let body = ClassifyEos::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            GrpcClassifier::new(),
            f,
        );
        let out = body.collect().await.unwrap();
        assert_eq!(out.to_bytes(), Bytes::from_static(b"ab"));
        assert_eq!(*seen.lock().unwrap(), vec![Some(Class::SUCCESS)]);
    }

    #[tokio::test]
    async fn end_without_trailers_is_unknown_failure() {
        let (seen, f) = recorder();
        let body = ClassifyEos::new(
            Full::new(Bytes::from_static(b"x")),
            GrpcClassifier::new(),
            f,
        );
        body.collect().await.unwrap();
        let v = seen.lock().unwrap().clone();
        assert_eq!(v.len(), 1);
        let c = v[0].unwrap();
        assert!(c.is_failure() && !c.is_retryable());
    }

    #[tokio::test]
    async fn body_error_is_failure() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
            vec![Err(std::io::Error::other("reset"))];
        let (seen, f) = recorder();
        let body = ClassifyEos::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            GrpcClassifier::new(),
            f,
        );
        assert!(body.collect().await.is_err());
        assert!(seen.lock().unwrap()[0].unwrap().is_failure());
    }

    #[test]
    fn dropped_early_reports_none_once() {
        let (seen, f) = recorder();
        let body = ClassifyEos::new(
            Full::new(Bytes::from_static(b"x")),
            GrpcClassifier::new(),
            f,
        );
        drop(body);
        assert_eq!(*seen.lock().unwrap(), vec![None]);
    }
}
