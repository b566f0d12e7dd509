//! A body wrapper that counts the bytes passing through it and runs a completion
//! hook exactly once: before the last byte is handed on when the length is known,
//! at end of stream otherwise, or when the body is dropped unfinished. The log
//! entry for a request is written by that hook, so it is in the file before the
//! client has the whole response.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub type OnEnd = Box<dyn FnOnce(u64) + Send>;

pub struct Metered<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    expected: Option<u64>,
    on_end: Option<OnEnd>,
}

impl<B: Body> Metered<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>, on_end: Option<OnEnd>) -> Self {
        let expected = inner.size_hint().exact();
        let mut body = Metered {
            inner,
            bytes,
            expected,
            on_end,
        };
        if body.expected == Some(0) {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes.load(Ordering::Relaxed));
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if self.expected.is_some_and(|n| total >= n) {
                        self.finish();
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Not ended until the hook ran, so the end is always polled for.
        self.on_end.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes.load(Ordering::Relaxed));
        }
    }
}
