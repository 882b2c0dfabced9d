//! The response body of Herald's endpoints: a whole buffer, or an SSE
//! stream fed by a shard.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{mpsc, oneshot};

/// Why a response body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The SSE subscriber fell too far behind and was disconnected.
    #[error("slow consumer")]
    SlowConsumer,
}

/// Response body of Herald's HTTP endpoints.
#[derive(Debug)]
pub struct Body {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Sse { rx: mpsc::Receiver<Bytes>, abort: Option<oneshot::Receiver<()>> },
}

impl Body {
    /// A body of one buffer.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let b = bytes.into();
        Body { kind: Kind::Full((!b.is_empty()).then_some(b)) }
    }

    /// An empty body.
    pub fn empty() -> Body {
        Body { kind: Kind::Full(None) }
    }

    pub(crate) fn sse(rx: mpsc::Receiver<Bytes>, abort: oneshot::Receiver<()>) -> Body {
        Body { kind: Kind::Sse { rx, abort: Some(abort) } }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Sse { rx, abort } => {
                if let Some(a) = abort {
                    match Pin::new(a).poll(cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Some(Err(BodyError::SlowConsumer))),
                        Poll::Ready(Err(_)) => *abort = None,
                        Poll::Pending => {}
                    }
                }
                rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Sse { .. } => SizeHint::default(),
        }
    }
}
