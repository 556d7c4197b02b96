//! Responses a layer answers with itself (timeout, open breaker), for HTTP and gRPC servers.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::grpc::{GRPC_MESSAGE, GRPC_STATUS, GrpcCode};

pin_project! {
    /// A response body that is either the inner service's body or a short message produced by
    /// a layer (for example "deadline exceeded").
    ///
    /// Server-side layers that answer on their own (timeout, breaker) return
    /// `Response<ResponseBody<B>>`, which keeps the inner service's error type: axum's
    /// `Router::layer` and tonic's `Server::layer` accept it with no `HandleErrorLayer`.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
        },
        Local {
            data: Option<Bytes>,
        },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub const fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A body holding `data` (empty when `data` is empty).
    pub fn local(data: Bytes) -> Self {
        Self {
            kind: Kind::Local {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// An empty body.
    pub const fn empty() -> Self {
        Self {
            kind: Kind::Local { data: None },
        }
    }

    /// Whether this body was made by a layer (not the inner service).
    pub const fn is_local(&self) -> bool {
        matches!(self.kind, Kind::Local { .. })
    }
}

impl<B: fmt::Debug> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { body } => f.debug_tuple("Inner").field(body).finish(),
            Kind::Local { data } => f.debug_tuple("Local").field(data).finish(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// A plain-HTTP answer from a layer: `status`, `content-type: text/plain`, `message` as body.
///
/// ```
/// use http::StatusCode;
/// use steadfast_core::{ResponseBody, http_response};
///
/// let res = http_response::<()>(StatusCode::GATEWAY_TIMEOUT, "deadline exceeded\n");
/// assert_eq!(res.status(), 504);
/// ```
pub fn http_response<B>(status: StatusCode, message: &'static str) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::local(Bytes::from_static(message.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// A gRPC trailers-only answer from a layer: HTTP 200, `content-type: application/grpc`,
/// `grpc-status` and a percent-encoded `grpc-message` in the head, no body.
///
/// ```
/// use steadfast_core::{GrpcCode, grpc_response};
///
/// let res = grpc_response::<()>(GrpcCode::DeadlineExceeded, "deadline exceeded");
/// assert_eq!(res.headers()["grpc-status"], "4");
/// assert_eq!(res.headers()["content-type"], "application/grpc");
/// ```
pub fn grpc_response<B>(code: GrpcCode, message: &str) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::empty());
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, code.to_header_value());
    if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(message)) {
        headers.insert(GRPC_MESSAGE, v);
    }
    res
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol requires: bytes outside
/// printable ASCII (0x20-0x7E) and `%` itself become `%XX`.
pub(crate) fn percent_encode_grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0xf)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn local_body_is_the_message() {
        let res =
            http_response::<http_body_util::Empty<Bytes>>(StatusCode::SERVICE_UNAVAILABLE, "down");
        assert_eq!(res.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        let body = res.into_body();
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "down");
    }

    #[tokio::test]
    async fn inner_body_passes_through() {
        let body = ResponseBody::inner(http_body_util::Full::new(Bytes::from_static(b"hi")));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hi");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            percent_encode_grpc_message("a b%\n\u{e9}"),
            "a b%25%0A%C3%A9"
        );
        let res = grpc_response::<http_body_util::Empty<Bytes>>(
            GrpcCode::Unavailable,
            "circuit open: 100%",
        );
        assert_eq!(res.headers()[GRPC_MESSAGE], "circuit open: 100%25");
        assert!(res.body().is_end_stream());
    }
}
