//! Telling HTTP/1.x, TLS and anything else apart from a connection's first bytes,
//! and handing those bytes on to whichever relay path takes the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a client may stay silent before its connection is taken as opaque TCP
/// (protocols where the server speaks first).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(1000);
/// A ClientHello larger than one TLS record is not supported.
const MAX_PREFIX: usize = 5 + 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tls,
    Opaque,
}

const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
];

/// Classifies what is known so far; `None` means more bytes are needed.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    let first = *prefix.first()?;
    if first == 0x16 {
        if prefix.len() < 5 {
            return None;
        }
        let record_len = 5 + u16::from_be_bytes([prefix[3], prefix[4]]) as usize;
        return if prefix.len() >= record_len.min(MAX_PREFIX) {
            Some(Protocol::Tls)
        } else {
            None
        };
    }
    match prefix.iter().position(|&b| b == b' ') {
        Some(end) if METHODS.contains(&&prefix[..end]) => Some(Protocol::Http),
        Some(_) => Some(Protocol::Opaque),
        None if prefix.len() < 8 && prefix.iter().all(u8::is_ascii_uppercase) => None,
        None => Some(Protocol::Opaque),
    }
}

/// Reads until the protocol is known, the client goes quiet, or it closes.
pub async fn sniff<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(Protocol, Vec<u8>)> {
    // Read straight into the prefix (no stack buffer: it would make every
    // connection's task that much larger to allocate and move).
    let mut prefix = Vec::with_capacity(4096);
    loop {
        if prefix.capacity() - prefix.len() < 1024 {
            prefix.reserve(4096);
        }
        let n = match tokio::time::timeout(SNIFF_TIMEOUT, stream.read_buf(&mut prefix)).await {
            Ok(read) => read?,
            Err(_) => return Ok((Protocol::Opaque, prefix)),
        };
        if n == 0 {
            return Ok((Protocol::Opaque, prefix));
        }
        if let Some(protocol) = classify(&prefix) {
            return Ok((protocol, prefix));
        }
        if prefix.len() >= MAX_PREFIX {
            return Ok((Protocol::Opaque, prefix));
        }
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            offset: 0,
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.offset < self.prefix.len() {
            let rest = &self.prefix[self.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.offset += n;
            if self.offset == self.prefix.len() {
                self.prefix = Vec::new();
                self.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(classify(b"HELLO world"), Some(Protocol::Opaque));
        assert_eq!(classify(&[0x16, 3, 1, 0, 4, 1, 2]), None);
        assert_eq!(classify(&[0x16, 3, 1, 0, 2, 1, 2]), Some(Protocol::Tls));
        assert_eq!(classify(&[0, 1, 2]), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn prefixed_stream_replays_prefix() {
        let inner: &[u8] = b" world";
        let mut s = Prefixed::new(b"hello".to_vec(), inner);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
