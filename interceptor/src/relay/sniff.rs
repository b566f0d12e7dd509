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
/// However it dribbles, a connection is decided this long after it came: a
/// ClientHello must be whole by then (else it is unreadable, and closed).
const SNIFF_DEADLINE: Duration = Duration::from_secs(10);
/// The most read before deciding.
const MAX_PREFIX: usize = 64 * 1024;
/// A ClientHello longer than this, or split into more records, is unreadable:
/// real ones are a few KiB in one record (a split to hide the SNI needs two).
const MAX_HELLO: usize = MAX_PREFIX / 2;
const MAX_HELLO_RECORDS: usize = 64;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

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
    if first == TLS_HANDSHAKE {
        return match hello_extent(prefix) {
            HelloExtent::Partial if prefix.len() < MAX_PREFIX => None,
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

/// How much of the first handshake message of a TLS stream has arrived.
#[derive(Debug, PartialEq, Eq)]
enum HelloExtent {
    Whole,
    Partial,
    /// Not a handshake this relay reads: another record type first, too long,
    /// or split into too many records.
    Unreadable,
}

/// Walks the records without copying them (it runs on every read of a
/// connection still being sniffed, so it must stay cheap however the client
/// splits its bytes).
fn hello_extent(prefix: &[u8]) -> HelloExtent {
    let mut header = [0u8; 4];
    let mut seen = 0;
    let mut rest = prefix;
    for _ in 0..=MAX_HELLO_RECORDS {
        if seen >= header.len() {
            let whole = 4 + u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
            if whole > MAX_HELLO {
                return HelloExtent::Unreadable;
            }
            if seen >= whole {
                return HelloExtent::Whole;
            }
        }
        match parse_tls_raw_record(rest) {
            Ok((after, record)) if record.hdr.record_type == TlsRecordType::Handshake => {
                for (i, &b) in record.data.iter().enumerate().take(header.len()) {
                    if let Some(slot) = header.get_mut(seen + i) {
                        *slot = b;
                    }
                }
                seen += record.data.len();
                rest = after;
            }
            Err(tls_parser::Err::Incomplete(_)) => return HelloExtent::Partial,
            _ => return HelloExtent::Unreadable,
        }
    }
    HelloExtent::Unreadable
}

/// The first handshake message of a TLS stream, put back together from however
/// many records the client split it into (RFC 8446 §5.1 allows any split:
/// judging only the first record would let a split hide the SNI); `None` when
/// it is not whole and readable.
pub fn client_hello(prefix: &[u8]) -> Option<Vec<u8>> {
    if hello_extent(prefix) != HelloExtent::Whole {
        return None;
    }
    let mut message = Vec::new();
    let mut rest = prefix;
    while let Ok((after, record)) = parse_tls_raw_record(rest) {
        message.extend_from_slice(record.data);
        let [_, a, b, c, ..] = message[..] else {
            rest = after;
            continue;
        };
        let whole = 4 + u32::from_be_bytes([0, a, b, c]) as usize;
        if message.len() >= whole {
            message.truncate(whole);
            return Some(message);
        }
        rest = after;
    }
    None
}

/// Reads until the protocol is known, the client goes quiet or closes, or
/// [`SNIFF_DEADLINE`] passes.
pub async fn sniff<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(Protocol, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + SNIFF_DEADLINE;
    // Read straight into the prefix (no stack buffer: it would make every
    // connection's task that much larger to allocate and move).
    let mut prefix = Vec::with_capacity(4096);
    // Once a connection has begun a TLS handshake it is TLS, however it ends:
    // a ClientHello cut short, paused or too long is unreadable, and closed,
    // never relayed as opaque bytes judged by address alone.
    let undecided = |prefix: &Vec<u8>| {
        if prefix.first() == Some(&TLS_HANDSHAKE) {
            Protocol::Tls
        } else {
            Protocol::Opaque
        }
    };
    loop {
        if prefix.capacity() - prefix.len() < 1024 {
            prefix.reserve(4096);
        }
        let wait = if prefix.first() == Some(&TLS_HANDSHAKE) {
            deadline
        } else {
            deadline.min(tokio::time::Instant::now() + SNIFF_TIMEOUT)
        };
        let n = match tokio::time::timeout_at(wait, stream.read_buf(&mut prefix)).await {
            Ok(read) => read?,
            Err(_) => return Ok((undecided(&prefix), prefix)),
        };
        if n == 0 {
            return Ok((undecided(&prefix), prefix));
        }
        if let Some(protocol) = classify(&prefix) {
            return Ok((protocol, prefix));
        }
        if prefix.len() >= MAX_PREFIX {
            return Ok((undecided(&prefix), prefix));
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

    /// The bytes read while sniffing, as long as none has been replayed.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix[self.offset..]
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
        assert_eq!(client_hello(&split), Some(vec![1, 0, 0, 3, 7, 8, 9]));
        assert_eq!(hello_extent(&split[..10]), HelloExtent::Partial);
        assert_eq!(client_hello(&split[..10]), None);
        assert_eq!(classify(&split[..10]), None);
        assert_eq!(classify(&split), Some(Protocol::Tls));
        // Another record type before the message is whole: not readable, yet TLS.
        let interrupted = [&[0x16, 3, 1, 0, 2, 1, 0][..], &[0x17, 3, 3, 0, 1, 0][..]].concat();
        assert_eq!(hello_extent(&interrupted), HelloExtent::Unreadable);
        assert_eq!(classify(&interrupted), Some(Protocol::Tls));
        // A message that says it is longer than any real ClientHello.
        assert_eq!(
            hello_extent(&[0x16, 3, 1, 0, 4, 1, 1, 0, 0]),
            HelloExtent::Unreadable
        );
        // One-byte records, more of them than a ClientHello is ever split into.
        let mut dribbled = vec![0x16, 3, 1, 0, 4, 1, 0, 0x10, 0];
        for _ in 0..MAX_HELLO_RECORDS {
            dribbled.extend_from_slice(&[0x16, 3, 1, 0, 1, 0]);
        }
        assert_eq!(hello_extent(&dribbled), HelloExtent::Unreadable);
    }

    #[tokio::test]
    async fn a_tls_handshake_that_stalls_is_tls_not_opaque() {
        // Half a ClientHello, then the client closes: still TLS (unreadable).
        let mut stalled: &[u8] = &[0x16, 3, 1, 0, 6, 1, 0, 0, 3, 7];
        let (protocol, _) = sniff(&mut stalled).await.unwrap();
        assert_eq!(protocol, Protocol::Tls);
        let mut other: &[u8] = b"GE";
        assert_eq!(sniff(&mut other).await.unwrap().0, Protocol::Opaque);
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
