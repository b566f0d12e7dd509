//! Telling HTTP/1.x, TLS and anything else apart from a connection's first bytes,
//! and handing those bytes on to whichever relay path takes the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tls_parser::{parse_tls_raw_record, TlsRecordType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a client may stay silent before its connection is taken as opaque TCP
/// (protocols where the server speaks first).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(1000);
/// The most read before deciding: a ClientHello may span several records, but
/// not beyond this (it is taken as TLS without a readable SNI then).
const MAX_PREFIX: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tls,
    Opaque,
}

/// `PRI` opens HTTP/2 with prior knowledge: taken as HTTP, it meets the
/// HTTP/1 server, which refuses it, rather than passing as opaque bytes whose
/// requests nobody judges.
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"PRI",
];

/// Classifies what is known so far; `None` means more bytes are needed.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    let first = *prefix.first()?;
    if first == 0x16 {
        return match client_hello(prefix) {
            ClientHello::Partial if prefix.len() < MAX_PREFIX => None,
            _ => Some(Protocol::Tls),
        };
    }
    // Empty lines before a request line are ignored (RFC 9112 §2.2), by the
    // HTTP server here as by upstream ones: they must not make a request opaque.
    let start = prefix.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let prefix = &prefix[start..];
    match prefix.iter().position(|&b| b == b' ') {
        Some(end) if METHODS.contains(&&prefix[..end]) => Some(Protocol::Http),
        Some(_) => Some(Protocol::Opaque),
        None if prefix.len() < 8 && prefix.iter().all(u8::is_ascii_uppercase) => None,
        None => Some(Protocol::Opaque),
    }
}

/// The first handshake message of a TLS stream, as far as it has arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientHello {
    /// The whole message (header included), put back together from however
    /// many records the client split it into (RFC 8446 §5.1 allows any split;
    /// judging only the first record would let a split hide the SNI).
    Whole(Vec<u8>),
    /// More bytes are needed.
    Partial,
    /// Not a handshake this relay can read.
    Unreadable,
}

pub fn client_hello(prefix: &[u8]) -> ClientHello {
    let mut message = Vec::new();
    let mut rest = prefix;
    loop {
        if let [_, a, b, c, ..] = message[..] {
            let whole = 4 + u32::from_be_bytes([0, a, b, c]) as usize;
            if message.len() >= whole {
                message.truncate(whole);
                return ClientHello::Whole(message);
            }
        }
        match parse_tls_raw_record(rest) {
            Ok((after, record)) if record.hdr.record_type == TlsRecordType::Handshake => {
                message.extend_from_slice(record.data);
                rest = after;
            }
            Err(tls_parser::Err::Incomplete(_)) => return ClientHello::Partial,
            _ => return ClientHello::Unreadable,
        }
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
        assert_eq!(
            classify(b"\r\n\r\nGET / HTTP/1.1\r\n"),
            Some(Protocol::Http)
        );
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Protocol::Http));
        // A record whose handshake message says 3 bytes follow, of which 2 came.
        assert_eq!(classify(&[0x16, 3, 1, 0, 6, 1, 0, 0, 3, 7, 8]), None);
        assert_eq!(
            classify(&[0x16, 3, 1, 0, 7, 1, 0, 0, 3, 7, 8, 9]),
            Some(Protocol::Tls)
        );
        assert_eq!(classify(&[0, 1, 2]), Some(Protocol::Opaque));
    }

    #[test]
    fn a_client_hello_split_across_records_is_put_back_together() {
        let split = [
            &[0x16, 3, 1, 0, 2, 1, 0][..],
            &[0x16, 3, 1, 0, 1, 0][..],
            &[0x16, 3, 1, 0, 4, 3, 7, 8, 9][..],
        ]
        .concat();
        assert_eq!(
            client_hello(&split),
            ClientHello::Whole(vec![1, 0, 0, 3, 7, 8, 9])
        );
        assert_eq!(client_hello(&split[..10]), ClientHello::Partial);
        assert_eq!(classify(&split[..10]), None);
        assert_eq!(classify(&split), Some(Protocol::Tls));
        // Another record type before the message is whole: not readable, yet TLS.
        let interrupted = [&[0x16, 3, 1, 0, 2, 1, 0][..], &[0x17, 3, 3, 0, 1, 0][..]].concat();
        assert_eq!(client_hello(&interrupted), ClientHello::Unreadable);
        assert_eq!(classify(&interrupted), Some(Protocol::Tls));
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
