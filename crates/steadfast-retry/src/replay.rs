//! Replaying request bodies that are not `Clone`.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use steadfast_core::BoxError;

/// Default cap on the bytes a body may buffer for replay: 64 KiB.
pub const DEFAULT_REPLAY_CAP: usize = 64 * 1024;

/// A request body that can be sent again.
///
/// The first attempt streams the caller's body unchanged while recording its frames (data
/// chunks are reference-counted `Bytes`, so recording copies nothing) up to a cap. A retry
/// replays the recorded data **and trailers** identically, then continues with whatever the
/// first attempt had not read yet. If the body grows past the cap, the recording is dropped,
/// the reader in front continues unharmed, and no further retry happens
/// ([`ReplayBody::can_replay`]); a reader behind it, which needed the dropped frames, fails
/// with [`ReplayLost`] rather than send a body with a hole.
///
/// Two fast paths take no buffer, no lock and no allocation: an empty body, and a body that
/// is whole in memory when wrapped — `http_body_util::Full<Bytes>` or a `String` within the
/// cap. Each attempt then sends a clone of the same `Bytes` (a reference count for shared or
/// static bytes; bytes made from a `Vec` are moved to shared storage once, on the first
/// replay).
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use steadfast_retry::ReplayBody;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let first = ReplayBody::new(Full::new(Bytes::from_static(b"payload")), 1024);
/// let second = first.replay().unwrap();
/// assert_eq!(first.collect().await.unwrap().to_bytes(), "payload");
/// assert_eq!(second.collect().await.unwrap().to_bytes(), "payload");
/// # }
/// ```
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Empty,
    /// The whole body, taken from a cheap-to-clone body type when wrapped.
    Whole {
        data: Bytes,
        sent: bool,
    },
    Shared {
        state: Arc<Mutex<State<B>>>,
        /// Frames of the recording this attempt has already sent.
        pos: usize,
        /// Data bytes this attempt has already sent.
        sent_bytes: u64,
        /// Whether this attempt has sent the trailers.
        trailers_sent: bool,
        /// This reader's slot in [`State::waiters`].
        reader: usize,
        /// The order this reader was made in (see [`State::fence`]); 32 bits, so that it
        /// fits beside `trailers_sent` and a request carrying this body grows by nothing.
        epoch: u32,
    },
}

struct State<B> {
    body: Pin<Box<B>>,
    frames: Vec<Bytes>,
    /// Frames ever recorded (the recording may have been dropped on overflow).
    recorded: usize,
    trailers: Option<HeaderMap>,
    /// Data bytes read from the caller's body so far (recorded or not).
    buffered: usize,
    cap: usize,
    /// The readers waiting on the caller's body. The caller's body is polled with a waker
    /// that wakes all of them (it would keep only the last poller's otherwise).
    waiters: Arc<Waiters>,
    overflow: bool,
    failed: bool,
    eos: bool,
    /// Readers made so far (the next reader's epoch; it stops at `u32::MAX`, where readers
    /// are no longer told apart and none is superseded).
    epochs: u32,
    /// Readers made before this epoch may not read on from the caller's body: a retry
    /// superseded the attempts that hold them (see [`ReplayBody::supersede`]).
    fence: u32,
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Empty => f.write_str("ReplayBody::Empty"),
            Kind::Whole { data, sent } => f
                .debug_struct("ReplayBody::Whole")
                .field("len", &data.len())
                .field("sent", sent)
                .finish(),
            Kind::Shared { pos, .. } => f.debug_struct("ReplayBody").field("pos", pos).finish(),
        }
    }
}

impl<B: Body<Data = Bytes> + 'static> ReplayBody<B> {
    /// Wraps `body`, recording up to `cap` bytes for replay.
    pub fn new(mut body: B, cap: usize) -> Self {
        if body.is_end_stream() {
            return Self { kind: Kind::Empty };
        }
        if let Some(data) = take_whole(&mut body, cap) {
            return Self {
                kind: Kind::Whole { data, sent: false },
            };
        }
        // A body that declares a size over the cap will never be replayed: record nothing.
        let overflow = body.size_hint().lower() > cap as u64;
        Self {
            kind: Kind::Shared {
                state: Arc::new(Mutex::new(State {
                    body: Box::pin(body),
                    frames: Vec::new(),
                    recorded: 0,
                    trailers: None,
                    buffered: 0,
                    cap,
                    overflow,
                    failed: false,
                    eos: false,
                    epochs: 1,
                    fence: 0,
                    // Room for the two readers a retry makes up front.
                    waiters: Arc::new(Waiters(Mutex::new({
                        let mut slots = Vec::with_capacity(2);
                        slots.push(Slot::Idle);
                        slots
                    }))),
                })),
                pos: 0,
                sent_bytes: 0,
                trailers_sent: false,
                reader: 0,
                epoch: 0,
            },
        }
    }
}

/// The bytes of a body type that holds its whole content in memory (`Full<Bytes>`,
/// `String`), if `body` is one and fits in `cap`; `body` is left empty. Any other body is left
/// untouched.
fn take_whole<B: Body<Data = Bytes> + 'static>(body: &mut B, cap: usize) -> Option<Bytes> {
    let body: &mut dyn Any = body;
    if let Some(full) = body.downcast_mut::<Full<Bytes>>() {
        if full.size_hint().exact().is_none_or(|n| n > cap as u64) {
            return None;
        }
        // `Full` answers at once with its one data frame; no waker is kept.
        let mut cx = Context::from_waker(Waker::noop());
        return match Pin::new(full).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            _ => None,
        };
    }
    if let Some(text) = body.downcast_mut::<String>() {
        if text.len() <= cap {
            return Some(Bytes::from(std::mem::take(text)));
        }
    }
    None
}

impl<B> ReplayBody<B> {
    /// An empty body.
    pub const fn empty() -> Self {
        Self { kind: Kind::Empty }
    }

    /// Whether a retry could send this body again identically: it stayed under the cap and
    /// no read failed, or (over the cap) nothing of it has been read yet and no other
    /// attempt holds it: an attempt refused before it sent anything hands the body over
    /// whole.
    pub fn can_replay(&self) -> bool {
        match &self.kind {
            Kind::Empty | Kind::Whole { .. } => true,
            Kind::Shared { state, reader, .. } => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                !s.failed && (!s.overflow || s.untouched_but_for(*reader))
            }
        }
    }

    /// A body for another attempt, starting from the beginning; `None` when the body cannot
    /// be replayed.
    pub fn replay(&self) -> Option<Self> {
        if !self.can_replay() {
            return None;
        }
        Some(match &self.kind {
            Kind::Empty => Self { kind: Kind::Empty },
            Kind::Whole { data, .. } => Self {
                kind: Kind::Whole {
                    data: data.clone(),
                    sent: false,
                },
            },
            Kind::Shared { state, .. } => {
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                // Reuse the slot of a reader that went away, so the list stays as long as the
                // number of live readers.
                let reader = s.waiters.free_slot();
                let epoch = s.epochs;
                s.epochs = s.epochs.saturating_add(1);
                drop(s);
                Self {
                    kind: Kind::Shared {
                        state: state.clone(),
                        pos: 0,
                        sent_bytes: 0,
                        trailers_sent: false,
                        reader,
                        epoch,
                    },
                }
            }
        })
    }

    /// Makes this reader the one that reads on from the caller's body: every reader made
    /// before it may still send what was recorded, then fails with [`Superseded`] where it
    /// would have read further. The retry calls it on the next attempt's body once the attempt
    /// before has been answered and a retry decided: that attempt's transport may still be
    /// sending its body (an HTTP/2 stream the server answered early stays open), and every
    /// frame it read on would count against the replay cap, so that the retry it was replaced
    /// by could no longer be sent whole.
    pub(crate) fn supersede(&self) {
        if let Kind::Shared { state, epoch, .. } = &self.kind {
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            s.fence = s.fence.max(*epoch);
            // A superseded reader waiting on the caller's body learns it now.
            let waiting = s.waiters.take_others(usize::MAX);
            drop(s);
            waiting.into_iter().for_each(Waker::wake);
        }
    }
}

/// An attempt a retry replaced went on reading the request body: it stops there, with the
/// frames recorded before sent and nothing read on from the caller's body (which belongs to
/// the retry now). Its transport resets the stream; nobody waits for its answer any more.
#[derive(Debug)]
pub(crate) struct Superseded;

impl fmt::Display for Superseded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "request body superseded by a retry: this attempt's answer was already acted on",
        )
    }
}

impl std::error::Error for Superseded {}

/// A replaying attempt can no longer send the whole body: the data it needed was dropped
/// because another attempt read past the replay cap, or another attempt saw the caller's body
/// fail. The attempt fails rather than send a body with a hole in it.
#[derive(Debug)]
pub struct ReplayLost;

impl fmt::Display for ReplayLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "request body can no longer be replayed: it grew past the replay cap or reading it failed",
        )
    }
}

impl std::error::Error for ReplayLost {}

/// A reader's place in the list of waiting readers.
enum Slot {
    /// No reader holds this slot; [`ReplayBody::replay`] may hand it out again.
    Free,
    /// A live reader that is not waiting on the caller's body.
    Idle,
    /// A live reader that found the caller's body pending.
    Waiting(Waker),
}

/// One slot per reader. Waking it (it is the waker the caller's body is polled with) wakes
/// every waiting reader: whichever of them the caller's body woke, all of them have news.
struct Waiters(Mutex<Vec<Slot>>);

impl Waiters {
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn free_slot(&self) -> usize {
        let mut slots = self.slots();
        match slots.iter().position(|w| matches!(w, Slot::Free)) {
            Some(i) => {
                slots[i] = Slot::Idle;
                i
            }
            None => {
                slots.push(Slot::Idle);
                slots.len() - 1
            }
        }
    }

    /// Marks `reader` as waiting with `waker`.
    fn wait(&self, reader: usize, waker: &Waker) {
        if let Some(slot) = self.slots().get_mut(reader) {
            match slot {
                Slot::Waiting(w) => w.clone_from(waker),
                _ => *slot = Slot::Waiting(waker.clone()),
            }
        }
    }

    /// Sets `reader`'s slot (idle, or free when it goes away).
    fn set(&self, reader: usize, to: Slot) {
        if let Some(slot) = self.slots().get_mut(reader) {
            *slot = to;
        }
    }

    /// Takes the wakers of every waiting reader but `except` (`usize::MAX`: all), to be
    /// woken once no lock is held (a waker may run code that reaches this body again). No
    /// allocation unless someone is waiting.
    #[must_use]
    fn take_others(&self, except: usize) -> Vec<Waker> {
        let mut woken = Vec::new();
        for (i, slot) in self.slots().iter_mut().enumerate() {
            if i != except && matches!(slot, Slot::Waiting(_)) {
                if let Slot::Waiting(w) = std::mem::replace(slot, Slot::Idle) {
                    woken.push(w);
                }
            }
        }
        woken
    }
}

impl std::task::Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.take_others(usize::MAX)
            .into_iter()
            .for_each(Waker::wake);
    }
}

impl<B> State<B> {
    /// Nothing has been read from the caller's body, and no reader but `reader` (the one
    /// asking) is alive: a new reader from the start would be its only reader.
    fn untouched_but_for(&self, reader: usize) -> bool {
        self.buffered == 0
            && self.recorded == 0
            && !self.eos
            && self
                .waiters
                .slots()
                .iter()
                .enumerate()
                .all(|(i, slot)| i == reader || matches!(slot, Slot::Free))
    }

    /// Data bytes recorded that a reader who has sent `sent` bytes has yet to send, or `None`
    /// when that reader can no longer get them (the recording was dropped).
    fn unsent_recorded(&self, sent: u64) -> Option<u64> {
        let buffered = self.buffered as u64;
        if self.overflow && sent < buffered {
            return None;
        }
        Some(buffered.saturating_sub(sent))
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let Kind::Shared { state, reader, .. } = &self.kind {
            let s = state.lock().unwrap_or_else(PoisonError::into_inner);
            s.waiters.set(*reader, Slot::Free);
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let (state, pos, sent_bytes, trailers_sent, reader, epoch) = match &mut this.kind {
            Kind::Empty => return Poll::Ready(None),
            Kind::Whole { data, sent } => {
                if *sent {
                    return Poll::Ready(None);
                }
                *sent = true;
                return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
            }
            Kind::Shared {
                state,
                pos,
                sent_bytes,
                trailers_sent,
                reader,
                epoch,
            } => (state, pos, sent_bytes, trailers_sent, *reader, *epoch),
        };
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        // Replay what earlier attempts recorded.
        if !s.overflow && *pos < s.frames.len() {
            let chunk = s.frames[*pos].clone();
            *pos += 1;
            *sent_bytes += chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.overflow && *pos < s.recorded {
            // The frames this reader still needed were dropped: never send a body with a hole.
            return Poll::Ready(Some(Err(ReplayLost.into())));
        }
        if s.eos {
            if !*trailers_sent {
                if let Some(t) = s.trailers.clone() {
                    *trailers_sent = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        if s.failed {
            // Another reader saw the caller's body fail: this one cannot finish either.
            return Poll::Ready(Some(Err(ReplayLost.into())));
        }
        if epoch < s.fence {
            // A retry replaced this attempt: the caller's body is the retry's to read.
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        // Read on from the caller's body, recording as we go. This reader waits from now
        // on; the caller's body gets a waker that wakes every waiting reader.
        s.waiters.wait(reader, cx.waker());
        let all = Waker::from(s.waiters.clone());
        let frame = match s.body.as_mut().poll_frame(&mut Context::from_waker(&all)) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(f) => f,
        };
        // The caller's body moved on (a frame, its end, an error): the other waiting readers
        // have news too (woken below, once the state is unlocked).
        s.waiters.set(reader, Slot::Idle);
        let others = s.waiters.take_others(reader);
        match &frame {
            None => s.eos = true,
            Some(Err(_)) => s.failed = true,
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    s.buffered = s.buffered.saturating_add(data.len());
                    if s.buffered > s.cap {
                        s.overflow = true;
                    }
                    if s.overflow {
                        s.frames = Vec::new();
                    } else {
                        s.frames.push(data.clone());
                    }
                    s.recorded += 1;
                    *pos += 1;
                    *sent_bytes += data.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.eos = true;
                    *trailers_sent = true;
                }
            }
        }
        drop(s);
        others.into_iter().for_each(Waker::wake);
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Whole { sent, .. } => *sent,
            Kind::Shared {
                state,
                pos,
                trailers_sent,
                ..
            } => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                // A reader behind a dropped recording still has an error to yield.
                let caught_up = if s.overflow {
                    *pos >= s.recorded
                } else {
                    *pos >= s.frames.len()
                };
                // The caller's body may know it is done before it was polled to its end.
                let ended = s.eos || (!s.failed && s.body.is_end_stream());
                ended && caught_up && (s.trailers.is_none() || *trailers_sent)
            }
        }
    }

    /// What this reader will still yield: the recorded bytes it has not sent yet plus what
    /// the caller's body says it still holds. Exact only when both are; unknown (`0..`) for a
    /// reader that can only fail; a lower bound for a reader with recorded trailers still to
    /// send (HTTP/1.1 would turn an exact hint into a `content-length` and drop them).
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Whole { data, sent } => {
                SizeHint::with_exact(if *sent { 0 } else { data.len() as u64 })
            }
            Kind::Shared {
                state,
                sent_bytes,
                trailers_sent,
                ..
            } => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(recorded) = s.unsent_recorded(*sent_bytes) else {
                    return SizeHint::new();
                };
                if s.eos {
                    if s.trailers.is_some() && !*trailers_sent {
                        // Exact, yet HTTP/1.1 would then send a `content-length` and drop the
                        // trailers: a lower bound makes it send the body chunked, trailers
                        // included.
                        let mut hint = SizeHint::new();
                        hint.set_lower(recorded);
                        return hint;
                    }
                    return SizeHint::with_exact(recorded);
                }
                if s.failed {
                    return SizeHint::new();
                }
                let rest = s.body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(recorded));
                if let Some(upper) = rest.upper().and_then(|u| u.checked_add(recorded)) {
                    hint.set_upper(upper);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn stream(
        chunks: &[&'static [u8]],
        trailers: bool,
    ) -> impl Body<Data = Bytes, Error = std::io::Error> {
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "42".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn data_and_trailers_replay_identically() {
        let first = ReplayBody::new(stream(&[b"a", b"bc", b"def"], true), 1024);
        let second = first.replay().unwrap();
        let a = first.collect().await.unwrap();
        let b = second.collect().await.unwrap();
        assert_eq!(a.trailers(), b.trailers());
        assert_eq!(b.trailers().unwrap()["x-sum"], "42");
        assert_eq!(a.to_bytes(), "abcdef");
        assert_eq!(b.to_bytes(), "abcdef");
    }

    /// A retry decided after an attempt was answered supersedes it: that attempt's reader
    /// sends what was recorded, then fails where it would read on from the caller's body,
    /// which the retry's reader then reads alone. A reader made later is not affected, and
    /// superseding an in-memory body changes nothing.
    #[tokio::test]
    async fn a_superseded_reader_stops_where_it_would_read_on() {
        let mut first = ReplayBody::new(stream(&[b"one", b"two", b"three"], true), 1024);
        let template = first.replay().unwrap();
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "one"
        );
        let second = template.replay().unwrap();
        second.supersede();
        let err = first.frame().await.unwrap().unwrap_err();
        assert!(err.is::<Superseded>(), "{err}");
        let third = template.replay().unwrap();
        let got = second.collect().await.unwrap();
        assert_eq!(got.to_bytes(), "onetwothree");
        // Made after the retry superseded the first: it replays the whole body.
        let got = third.collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-sum"], "42");
        assert_eq!(got.to_bytes(), "onetwothree");

        let mut earlier = ReplayBody::new(stream(&[b"a"], false), 1024);
        let later = earlier.replay().unwrap();
        assert_eq!(later.collect().await.unwrap().to_bytes(), "a");
        let last = earlier.replay().unwrap();
        last.supersede();
        // The body was read to its end: a superseded reader still sends what was recorded.
        assert_eq!(
            earlier.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        assert!(earlier.frame().await.is_none());

        let whole = ReplayBody::new(Full::new(Bytes::from_static(b"x")), 1024);
        let again = whole.replay().unwrap();
        again.supersede();
        assert_eq!(whole.collect().await.unwrap().to_bytes(), "x");
    }

    #[tokio::test]
    async fn a_retry_continues_where_the_first_attempt_stopped() {
        let mut first = ReplayBody::new(stream(&[b"one", b"two", b"three"], false), 1024);
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "one");
        drop(first.replay()); // a replay handle made and dropped changes nothing
        let second = first.replay().unwrap();
        drop(first); // the first attempt gave up after one frame
        assert_eq!(second.collect().await.unwrap().to_bytes(), "onetwothree");
    }

    #[tokio::test]
    async fn over_the_cap_the_first_attempt_is_unharmed_and_no_replay() {
        let first = ReplayBody::new(stream(&[b"12345", b"67890", b"abc"], true), 8);
        let probe = first.replay().unwrap();
        let out = first.collect().await.unwrap();
        assert_eq!(out.trailers().unwrap()["x-sum"], "42");
        assert_eq!(out.to_bytes(), "1234567890abc");
        assert!(!probe.can_replay());
        assert!(probe.replay().is_none());
    }

    #[tokio::test]
    async fn a_replay_that_lost_its_prefix_fails_instead_of_sending_a_hole() {
        let mut first = ReplayBody::new(stream(&[b"12345", b"67890", b"abc"], false), 8);
        let second = first.replay().unwrap();
        // The first attempt reads past the cap while the second has not started.
        while first.frame().await.is_some() {}
        let err = second.collect().await.unwrap_err();
        assert!(err.downcast_ref::<ReplayLost>().is_some());
    }

    #[tokio::test]
    async fn end_of_stream_and_size_hints_follow_each_reader() {
        let mut first = ReplayBody::new(Full::new(Bytes::from_static(b"12345678")), 8);
        assert!(!first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(8));
        let replay = first.replay().unwrap();
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "12345678"
        );
        assert!(first.frame().await.is_none());
        assert!(first.is_end_stream(), "the first reader is done");
        assert!(
            !replay.is_end_stream(),
            "the replay still has the recording to send"
        );
        assert_eq!(replay.size_hint().exact(), Some(8));
        assert!(first.can_replay(), "exactly at the cap is still replayable");
        let out = replay.collect().await.unwrap().to_bytes();
        assert_eq!(out, "12345678");

        // With trailers, a reader is done only once it has sent them.
        let mut body = ReplayBody::new(stream(&[b"a"], true), 8);
        body.frame().await.unwrap().unwrap();
        let second = body.replay().unwrap();
        let trailers = body.frame().await.unwrap().unwrap();
        assert!(trailers.is_trailers());
        assert!(body.is_end_stream());
        let mut second = second;
        second.frame().await.unwrap().unwrap();
        assert!(!second.is_end_stream(), "trailers still to send");
        assert!(second.frame().await.unwrap().unwrap().is_trailers());
        assert!(second.is_end_stream());
    }

    /// A body fed by hand that, like a socket, keeps only the waker of its last poll.
    #[derive(Clone, Default)]
    struct Fed(Arc<Mutex<FedState>>);

    /// Chunks not read yet, whether the body has ended, the last poller's waker.
    type FedState = (std::collections::VecDeque<Bytes>, bool, Option<Waker>);

    impl Fed {
        fn push(&self, b: &'static [u8]) {
            let mut s = self.0.lock().unwrap();
            s.0.push_back(Bytes::from_static(b));
            if let Some(w) = s.2.take() {
                w.wake();
            }
        }
        fn end(&self) {
            let mut s = self.0.lock().unwrap();
            s.1 = true;
            if let Some(w) = s.2.take() {
                w.wake();
            }
        }
    }

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            let mut s = self.0.lock().unwrap();
            if let Some(b) = s.0.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if s.1 {
                return Poll::Ready(None);
            }
            s.2 = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn poll(body: &mut ReplayBody<Fed>, count: &Arc<Count>) -> Poll<Option<Bytes>> {
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        Pin::new(body)
            .poll_frame(&mut cx)
            .map(|f| f.map(|f| f.unwrap().into_data().unwrap()))
    }

    #[test]
    fn every_waiting_reader_is_woken() {
        let fed = Fed::default();
        let mut a = ReplayBody::new(fed.clone(), 1024);
        let mut b = a.replay().unwrap();
        let (wa, wb) = (Arc::new(Count::default()), Arc::new(Count::default()));
        assert!(poll(&mut a, &wa).is_pending());
        assert!(poll(&mut b, &wb).is_pending());
        assert!(poll(&mut a, &wa).is_pending()); // a polled last
        fed.push(b"x");
        // Both are woken by the frame itself: neither has to poll for the other to learn.
        assert_eq!(
            (wa.get(), wb.get()),
            (1, 1),
            "every waiting reader is woken"
        );
        assert_eq!(
            poll(&mut b, &wb),
            Poll::Ready(Some(Bytes::from_static(b"x")))
        );
        assert_eq!(
            poll(&mut a, &wa),
            Poll::Ready(Some(Bytes::from_static(b"x")))
        );

        // A reader that read the caller's body wakes the others, which now have a recorded
        // frame to send (the caller's body itself woke nobody: it was ready at once).
        assert!(poll(&mut a, &wa).is_pending());
        fed.push(b"y");
        assert_eq!(wa.get(), 2);
        let mut c = a.replay().unwrap();
        let wc = Arc::new(Count::default());
        assert_eq!(
            poll(&mut c, &wc),
            Poll::Ready(Some(Bytes::from_static(b"x")))
        );
        assert_eq!(
            poll(&mut c, &wc),
            Poll::Ready(Some(Bytes::from_static(b"y")))
        );
        assert!(poll(&mut c, &wc).is_pending());
        assert_eq!(
            poll(&mut b, &wb),
            Poll::Ready(Some(Bytes::from_static(b"y")))
        );
        assert!(poll(&mut b, &wb).is_pending());
        fed.push(b"z");
        assert_eq!(
            poll(&mut b, &wb),
            Poll::Ready(Some(Bytes::from_static(b"z")))
        );
        assert!(
            wc.get() >= 1,
            "the reader that read the frame woke the waiting one"
        );
    }

    #[test]
    fn a_reader_that_goes_away_leaves_the_others_woken() {
        let fed = Fed::default();
        let mut a = ReplayBody::new(fed.clone(), 1024);
        let mut b = a.replay().unwrap();
        let (wa, wb) = (Arc::new(Count::default()), Arc::new(Count::default()));
        assert!(poll(&mut a, &wa).is_pending());
        assert!(poll(&mut b, &wb).is_pending()); // b polled last
        drop(b);
        fed.push(b"x");
        assert_eq!(wa.get(), 1, "woken although the last poller is gone");
        assert_eq!(
            poll(&mut a, &wa),
            Poll::Ready(Some(Bytes::from_static(b"x")))
        );
        assert!(poll(&mut a, &wa).is_pending());
        fed.end();
        assert_eq!(wa.get(), 2, "the end wakes it too");
        assert_eq!(poll(&mut a, &wa), Poll::Ready(None));
        // A reader made after another left reuses its slot: the list does not grow.
        let c = a.replay().unwrap();
        let Kind::Shared { state, .. } = &c.kind else {
            panic!("shared")
        };
        assert_eq!(state.lock().unwrap().waiters.slots().len(), 2);
    }

    /// Reads `body` to the end, checking before every frame that its size hint bounds what it
    /// still yields, and that `is_end_stream` is true exactly when nothing is left.
    async fn read_checking_hints<B>(mut body: ReplayBody<B>, total: u64) -> Vec<u8>
    where
        B: Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        let mut out = Vec::new();
        loop {
            let hint = body.size_hint();
            let left = total - out.len() as u64;
            assert!(hint.lower() <= left, "{hint:?} over-states {left}");
            assert!(
                hint.upper().is_none_or(|u| u >= left),
                "{hint:?} under-states {left}"
            );
            match body.frame().await {
                Some(f) => {
                    if let Ok(d) = f.unwrap().into_data() {
                        out.extend_from_slice(&d);
                    }
                }
                None => break,
            }
        }
        out
    }

    /// A body whose exact hint shrinks as it is read, as hyper's `Incoming` does.
    fn shrinking(chunks: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = std::io::Error> {
        struct Shrinking(std::collections::VecDeque<Bytes>);
        impl Body for Shrinking {
            type Data = Bytes;
            type Error = std::io::Error;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
                Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
            }
            fn size_hint(&self) -> SizeHint {
                SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
            }
        }
        Shrinking(chunks.iter().map(|c| Bytes::from_static(c)).collect())
    }

    #[tokio::test]
    async fn every_reader_s_size_hint_is_what_it_will_yield() {
        let mut first = ReplayBody::new(shrinking(&[b"aaaa", b"bbbb", b"cccc"]), 1024);
        assert_eq!(first.size_hint().exact(), Some(12));
        first.frame().await.unwrap().unwrap();
        // The first attempt read 4 of 12 bytes and failed; the retry must say 12, not 8.
        let second = first.replay().unwrap();
        assert_eq!(second.size_hint().exact(), Some(12));
        assert_eq!(first.size_hint().exact(), Some(8));
        let third = first.replay().unwrap();
        assert_eq!(read_checking_hints(second, 12).await, b"aaaabbbbcccc");
        assert_eq!(
            first.size_hint().exact(),
            Some(8),
            "the recording is still owed"
        );
        assert_eq!(read_checking_hints(first, 8).await, b"bbbbcccc");
        assert_eq!(read_checking_hints(third, 12).await, b"aaaabbbbcccc");
    }

    #[test]
    fn replay_lost_says_why() {
        assert!(ReplayLost.to_string().contains("replay cap"));
    }

    #[tokio::test]
    async fn declared_oversize_is_never_recorded() {
        let body = ReplayBody::new(Full::new(Bytes::from(vec![0u8; 100])), 10);
        // Nothing read yet: it could still be handed over whole.
        assert!(body.can_replay());
        let keeper = body.replay().unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 100);
        // Read past the cap with nothing recorded: never again.
        assert!(!keeper.can_replay());
        assert!(keeper.replay().is_none());
    }

    /// Over the cap, a body nothing has read is handed over whole to the next attempt once
    /// the attempt that held it is gone (refused before it sent anything); while that one
    /// lives, or once anything was read, it is not.
    #[tokio::test]
    async fn an_untouched_body_over_the_cap_is_handed_over_whole() {
        let data: Vec<u8> = (0..200).map(|i| (i / 50) as u8).collect();
        // Declares 200 bytes against a cap of 64: nothing will be recorded.
        let first = ReplayBody::new(Full::new(Bytes::from(data)), 64);
        let keeper = first.replay().expect("nothing read yet");
        assert!(
            keeper.replay().is_none(),
            "the first attempt still holds it"
        );
        drop(first); // refused: nothing sent
        let second = keeper.replay().expect("untouched and alone: handed over");
        let got = second.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 200);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i / 50) as u8));
        assert!(keeper.replay().is_none(), "read past the cap: never again");
    }

    /// Two readers of an untouched body over the cap, both reading: the one left behind
    /// fails with `ReplayLost`, never sends a body with a hole.
    #[tokio::test]
    async fn two_readers_of_an_unrecorded_body_never_send_a_hole() {
        let first = ReplayBody::new(Full::new(Bytes::from(vec![1u8; 100])), 10);
        let second = first.replay().unwrap();
        assert_eq!(first.collect().await.unwrap().to_bytes().len(), 100);
        let err = second.collect().await.unwrap_err();
        assert!(err.is::<ReplayLost>(), "{err}");
    }

    #[tokio::test]
    async fn empty_bodies_take_the_fast_path() {
        let body = ReplayBody::new(http_body_util::Empty::<Bytes>::new(), 10);
        assert!(matches!(body.kind, Kind::Empty));
        assert!(body.is_end_stream());
        assert!(body.replay().unwrap().is_end_stream());
    }

    #[tokio::test]
    async fn whole_bodies_replay_without_a_shared_buffer() {
        let first = ReplayBody::new(Full::new(Bytes::from_static(b"payload")), 64);
        assert!(matches!(first.kind, Kind::Whole { .. }));
        assert_eq!(first.size_hint().exact(), Some(7));
        let second = first.replay().unwrap();
        assert_eq!(first.collect().await.unwrap().to_bytes(), "payload");
        let mut second = second;
        assert!(!second.is_end_stream());
        let data = second.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, "payload");
        assert!(second.is_end_stream());
        assert_eq!(second.size_hint().exact(), Some(0));
        assert!(second.frame().await.is_none());
        // A replay made from an attempt that already sent still starts from the beginning.
        assert_eq!(
            second.replay().unwrap().collect().await.unwrap().to_bytes(),
            "payload"
        );

        let text = ReplayBody::new(String::from("héllo"), 64);
        assert!(matches!(text.kind, Kind::Whole { .. }));
        let again = text.replay().unwrap();
        assert_eq!(text.collect().await.unwrap().to_bytes(), "héllo");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "héllo");
    }

    #[tokio::test]
    async fn whole_bodies_over_the_cap_are_sent_once_unharmed() {
        let big = ReplayBody::new(Full::new(Bytes::from(vec![7u8; 100])), 10);
        assert!(!matches!(big.kind, Kind::Whole { .. }));
        let keeper = big.replay().expect("untouched");
        assert_eq!(big.collect().await.unwrap().to_bytes(), vec![7u8; 100]);
        assert!(keeper.replay().is_none(), "sent once");

        let text = ReplayBody::new("x".repeat(11), 10);
        assert!(!matches!(text.kind, Kind::Whole { .. }));
        let keeper = text.replay().expect("untouched");
        assert_eq!(text.collect().await.unwrap().to_bytes(), "x".repeat(11));
        assert!(!keeper.can_replay(), "sent once");
    }

    #[tokio::test]
    async fn a_read_error_forbids_replay() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Err(std::io::Error::other("reset")),
        ];
        let first = ReplayBody::new(StreamBody::new(futures_util::stream::iter(frames)), 1024);
        let handle = first.replay().unwrap();
        assert!(first.collect().await.is_err());
        assert!(!handle.can_replay());
    }
}
