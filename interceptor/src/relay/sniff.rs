//! Telling HTTP/1.x, TLS and anything else apart from a connection's first bytes,
//! and handing those bytes on to whichever relay path takes the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tls_parser::{parse_tls_raw_record, TlsRecordType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::budget::{HeadCharge, CHARGED_READ};

/// How long a client may stay silent before the relay looks for a server that
/// speaks first (a client that has sent nothing cannot be classified).
pub const SILENCE: Duration = Duration::from_millis(1000);
/// However it dribbles, a connection is decided this long after its first byte
/// came: a ClientHello must be whole by then (else it is unreadable, and
/// closed), and what could still be an HTTP request line is taken as HTTP.
const SNIFF_DEADLINE: Duration = Duration::from_secs(10);
/// The most read before deciding.
const MAX_PREFIX: usize = 64 * 1024;
/// A ClientHello longer than this, or split into more records, is unreadable:
/// real ones are a few KiB in one record (a split to hide the SNI needs two).
const MAX_HELLO: usize = MAX_PREFIX / 2;
const MAX_HELLO_RECORDS: usize = 64;
/// The first byte of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tls,
    Opaque,
    /// Nothing came for [`SILENCE`]: perhaps a protocol whose server speaks first.
    Silent,
}

/// Where a [`RequestLines`] scanner stands in the current line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// Nothing but whitespace yet.
    Start,
    Method,
    /// Whitespace after the method.
    AfterMethod,
    /// In a word after the method (the target, or more of it).
    Target,
    /// Whitespace after a word of the target.
    AfterWord,
    /// This many bytes of `HTTP/` matched at the start of a word.
    Version(u8),
    /// Not a request line: nothing to find until the line ends.
    Other,
}

impl Line {
    /// `cr_breaks`: a bare CR ends the line (else it is whitespace: lenient
    /// parsers do one or the other, RFC 9112 §2.2). `None`: a request line.
    fn next(self, b: u8, cr_breaks: bool) -> Option<Line> {
        const VERSION: &[u8] = b"HTTP/";
        // SP, HTAB, VT, FF (RFC 9112 §3 lets recipients split on any of them).
        let space = matches!(b, b' ' | b'\t' | 0x0b | 0x0c) || (b == b'\r' && !cr_breaks);
        if b == b'\n' || b == b'\r' && cr_breaks {
            return Some(Line::Start);
        }
        Some(match self {
            Line::Other => Line::Other,
            Line::Start if space => Line::Start,
            // Any visible ASCII word: servers differ in what a method may be,
            // and any of them might take this one.
            Line::Start | Line::Method if b.is_ascii_graphic() => Line::Method,
            Line::Start => Line::Other,
            Line::Method if space => Line::AfterMethod,
            Line::Method => Line::Other,
            Line::AfterMethod if space => Line::AfterMethod,
            Line::AfterWord | Line::Version(_) if space => Line::AfterWord,
            Line::AfterMethod => Line::Target,
            Line::Target if space => Line::AfterWord,
            Line::Target => Line::Target,
            // A target may itself hold spaces for a lenient server: any later
            // word beginning `HTTP/` (any case) makes the line a request line.
            Line::AfterWord if b.to_ascii_uppercase() == VERSION[0] => Line::Version(1),
            Line::AfterWord => Line::Target,
            Line::Version(n) if b.to_ascii_uppercase() == VERSION[n as usize] => {
                if n as usize + 1 == VERSION.len() {
                    return None;
                }
                Line::Version(n + 1)
            }
            Line::Version(_) => Line::Target,
        })
    }
}

/// Finds, byte by byte, the lines an HTTP server, however lenient, could take
/// as a request line: a method (any visible ASCII word, any case), whitespace
/// (SP, HTAB, VT, FF, or a bare CR), a target, whitespace, and a word beginning
/// `HTTP/` in any case. Keeps no bytes, so it can watch a whole stream.
#[derive(Clone, Debug)]
pub struct RequestLines {
    /// Bare CR as whitespace, and bare CR as a line break.
    cr_space: Line,
    cr_breaks: Line,
    found: bool,
    /// A line with something in it has ended.
    ended_line: bool,
    /// Every byte so far is text (visible ASCII or whitespace).
    text: bool,
}

impl Default for RequestLines {
    fn default() -> Self {
        RequestLines {
            cr_space: Line::Start,
            cr_breaks: Line::Start,
            found: false,
            ended_line: false,
            text: true,
        }
    }
}

impl RequestLines {
    /// Scans `bytes`; true once a request line was seen (in these bytes or before).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        while !self.found && !rest.is_empty() {
            if self.cr_space == Line::Other && self.cr_breaks == Line::Other {
                // Nothing to find before the next line break.
                match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                    Some(i) => {
                        self.text &= rest[..i].iter().all(|&b| is_text(b));
                        rest = &rest[i..];
                    }
                    None => {
                        self.text &= rest.iter().all(|&b| is_text(b));
                        return false;
                    }
                }
            }
            let b = rest[0];
            rest = &rest[1..];
            self.text &= is_text(b);
            if (b == b'\n' || b == b'\r') && self.cr_breaks != Line::Start {
                self.ended_line = true;
            }
            match (self.cr_space.next(b, false), self.cr_breaks.next(b, true)) {
                (Some(a), Some(b)) => (self.cr_space, self.cr_breaks) = (a, b),
                _ => self.found = true,
            }
        }
        self.found
    }

    /// [`RequestLines::feed`] for a whole stream, at the speed of a memchr: bytes
    /// in which no `HTTP/` can end are not walked byte by byte, only the line
    /// they end in. (Does not track what classifying needs: for watching.)
    pub fn watch(&mut self, bytes: &[u8]) -> bool {
        let split = |line: Line| matches!(line, Line::Version(_));
        if self.found || split(self.cr_space) || split(self.cr_breaks) || may_end_version(bytes) {
            return self.feed(bytes);
        }
        let last_lf = memchr::memrchr(b'\n', bytes);
        let last_break = memchr::memrchr2(b'\n', b'\r', bytes);
        self.cr_space = line_after(self.cr_space, bytes, last_lf, false);
        self.cr_breaks = line_after(self.cr_breaks, bytes, last_break, true);
        false
    }

    /// The line being read could still become a request line.
    fn open(&self, nonempty: bool) -> bool {
        let open = |line: Line| line != Line::Other && !(nonempty && line == Line::Start);
        open(self.cr_space) || open(self.cr_breaks)
    }

    /// What the bytes scanned so far make of a connection's start: HTTP once a
    /// request line was seen; undecided (`None`) while the first line could
    /// still become one, or, in a stream of text, a later line; else opaque.
    fn verdict(&self) -> Option<Protocol> {
        let first_line_open = !self.ended_line && self.open(false);
        let later_text_line_open = self.ended_line && self.text && self.open(true);
        if self.found {
            Some(Protocol::Http)
        } else if first_line_open || later_text_line_open {
            None
        } else {
            Some(Protocol::Opaque)
        }
    }
}

/// Whether an `HTTP/` (any case) may end in `bytes`: one that began before
/// them leaves its scanner in [`Line::Version`].
fn may_end_version(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'/', bytes).any(|i| i < 4 || bytes[i - 4..i].eq_ignore_ascii_case(b"HTTP"))
}

/// Where `line` stands after `bytes`, in which no request line can end, and
/// whose last line break (for its variant) is at `last_break`.
fn line_after(line: Line, bytes: &[u8], last_break: Option<usize>, cr_breaks: bool) -> Line {
    let (mut line, rest) = match last_break {
        Some(i) => (Line::Start, &bytes[i + 1..]),
        None => (line, bytes),
    };
    for &b in rest {
        if line == Line::Other {
            break;
        }
        line = line.next(b, cr_breaks).unwrap_or(Line::Other);
    }
    line
}

fn is_text(b: u8) -> bool {
    b.is_ascii_graphic() || matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c)
}

/// Classifies a connection's first bytes; `None` means more bytes are needed.
#[cfg(test)]
fn classify(prefix: &[u8]) -> Option<Protocol> {
    Classifier::default().feed(prefix)
}

/// [`classify`], fed as bytes arrive (so a client dribbling its bytes one at a
/// time cannot make classifying quadratic).
#[derive(Default)]
struct Classifier {
    lines: RequestLines,
    seen: usize,
}

impl Classifier {
    /// `prefix`: every byte so far, of which the first `seen` were fed before.
    fn feed(&mut self, prefix: &[u8]) -> Option<Protocol> {
        let first = *prefix.first()?;
        if first == TLS_HANDSHAKE {
            return match hello_extent(prefix) {
                HelloExtent::Partial if prefix.len() < MAX_PREFIX => None,
                _ => Some(Protocol::Tls),
            };
        }
        self.lines.feed(&prefix[self.seen.min(prefix.len())..]);
        self.seen = prefix.len();
        self.lines.verdict()
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

/// Reads until the protocol is known. A client that sends nothing for `silence`
/// is [`Protocol::Silent`]; once a byte has come, no pause decides: the bytes
/// do, or, [`SNIFF_DEADLINE`] after the first of them (or when the client stops
/// sending), what they could still become is what they are: a TLS handshake
/// (unreadable, and closed) or an HTTP request (which the HTTP server refuses
/// when it is not one). Every byte read is charged to `charge`.
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    charge: &mut HeadCharge,
    silence: Option<Duration>,
) -> io::Result<(Protocol, Vec<u8>)> {
    // Read straight into the prefix (no stack buffer: it would make every
    // connection's task that much larger to allocate and move).
    let mut prefix = Vec::with_capacity(4096);
    let mut classifier = Classifier::default();
    let mut deadline = None;
    let undecided = |prefix: &Vec<u8>| match prefix.first() {
        None => Protocol::Opaque,
        Some(&TLS_HANDSHAKE) => Protocol::Tls,
        // Only what could still be a request line is left undecided.
        Some(_) => Protocol::Http,
    };
    loop {
        if prefix.capacity() - prefix.len() < 1024 {
            prefix.reserve(4096);
        }
        let mut limited = (&mut *stream).take(CHARGED_READ as u64);
        let read = limited.read_buf(&mut prefix);
        let n = match (deadline, silence) {
            (Some(deadline), _) => match tokio::time::timeout_at(deadline, read).await {
                Ok(read) => read?,
                Err(_) => return Ok((undecided(&prefix), prefix)),
            },
            (None, Some(silence)) => match tokio::time::timeout(silence, read).await {
                Ok(read) => read?,
                Err(_) => return Ok((Protocol::Silent, prefix)),
            },
            (None, None) => read.await?,
        };
        if n == 0 {
            return Ok((undecided(&prefix), prefix));
        }
        let until = *deadline.get_or_insert(tokio::time::Instant::now() + SNIFF_DEADLINE);
        charge.add(n);
        if let Some(protocol) = classifier.feed(&prefix) {
            return Ok((protocol, prefix));
        }
        if prefix.len() >= MAX_PREFIX {
            return Ok((undecided(&prefix), prefix));
        }
        if tokio::time::timeout_at(until, charge.settle())
            .await
            .is_err()
        {
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
    use crate::relay::budget::HeadBudgets;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http));
        assert_eq!(classify(b"GE"), None);
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
    fn any_request_line_is_http_whatever_its_method_case_or_whitespace() {
        for line in [
            &b"get / HTTP/1.1\r\n"[..],
            b"FOO / HTTP/1.1\r\n",
            b"gEt /x http/1.0\r\n",
            b"GET\t/\tHTTP/1.1\r\n",
            b"GET  /  HTTP/1.1\r\n",
            b"  GET / HTTP/1.1\r\n",
            b"GET\x0b/\x0cHTTP/1.1\r\n",
            // A bare CR as whitespace, as a lenient parser may take it.
            b"GET\r/\rHTTP/1.1\r\n",
            // Spaces inside a target (nginx takes them).
            b"GET /a b HTTP/1.1\r\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            // No line end yet: the version word has begun.
            b"GET / HTTP/",
        ] {
            let shown = String::from_utf8_lossy(line);
            assert_eq!(classify(line), Some(Protocol::Http), "{shown:?}");
        }
    }

    #[test]
    fn what_could_still_become_a_request_line_waits_for_more() {
        for start in [
            &b"G"[..],
            b"get",
            b"GET ",
            b"GET /",
            b"GET / ",
            b"GET / HT",
            b"HELLO world",
            b" \r\n\t",
            // Junk lines, then what may be a request line.
            b"junk\r\nGE",
            b"junk\r\n\r\nGET / H",
        ] {
            let shown = String::from_utf8_lossy(start);
            assert_eq!(classify(start), None, "{shown:?}");
        }
    }

    #[test]
    fn a_request_line_after_junk_lines_makes_the_connection_http() {
        assert_eq!(
            classify(b"junk\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Protocol::Http)
        );
        assert_eq!(
            classify(b"\x00\x01junk\nGET / HTTP/1.1\r\n"),
            Some(Protocol::Http)
        );
        // A bare CR that ends the junk for a parser that takes it as a line end.
        assert_eq!(classify(b"junk\rGET / HTTP/1.1\r\n"), Some(Protocol::Http));
    }

    #[test]
    fn other_protocols_stay_opaque() {
        for start in [
            // SSH identification strings, with and without a comment.
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n",
            // Memcached, Redis (inline and RESP), SMTP after a server greeting.
            b"get some-key\r\n",
            b"PING\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"EHLO client.test\r\n",
            // A line whose third word is not a version.
            b"GET / FOO/1.1\r\n",
            // Binary: PostgreSQL's startup, AMQP's header, MQTT's CONNECT.
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"AMQP\x00\x00\x09\x01",
            b"\x10\x0c\x00\x04MQTT",
            // Binary, then a line that could still become anything: the watch on
            // the stream catches a request line later (see `RequestLines`).
            b"\x00\x05\nGET",
        ] {
            let shown = String::from_utf8_lossy(start);
            assert_eq!(classify(start), Some(Protocol::Opaque), "{shown:?}");
        }
    }

    #[test]
    fn a_request_line_is_found_however_the_stream_is_cut() {
        let stream = b"\x00binary\r\nPING\r\nPOST\t/upload Http/1.1\r\nHost: x\r\n";
        for size in 1..stream.len() {
            let mut fed = RequestLines::default();
            assert!(
                stream.chunks(size).any(|chunk| fed.feed(chunk)),
                "fed in {size}-byte pieces"
            );
            let mut watched = RequestLines::default();
            assert!(
                stream.chunks(size).any(|chunk| watched.watch(chunk)),
                "watched in {size}-byte pieces"
            );
        }
        for watch in [false, true] {
            let mut lines = RequestLines::default();
            let mut feed = |bytes: &[u8]| {
                if watch {
                    lines.watch(bytes)
                } else {
                    lines.feed(bytes)
                }
            };
            assert!(!feed(b"PING\r\nSET k \"GET / x\"\r\n\x00\xffHTTP/1.1"));
            assert!(!feed(b"\r\nGET /HTTP/1.1\r\n"));
            // A request line begun in one piece, its version in the next.
            assert!(!feed(b"\x00\r\nPUT /a/b"));
            assert!(!feed(b"/c\t"));
            assert!(feed(b"http/1.1\r\n"));
        }
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
    async fn what_stops_half_way_is_what_it_began_as() {
        let budgets = HeadBudgets::default();
        let mut charge = budgets.charge("t");
        // Half a ClientHello, then the client closes: still TLS (unreadable).
        let mut stalled: &[u8] = &[0x16, 3, 1, 0, 6, 1, 0, 0, 3, 7];
        let (protocol, _) = sniff(&mut stalled, &mut charge, None).await.unwrap();
        assert_eq!(protocol, Protocol::Tls);
        // Half a request line: HTTP, for the HTTP server to refuse.
        let mut other: &[u8] = b"GE";
        let (protocol, _) = sniff(&mut other, &mut charge, None).await.unwrap();
        assert_eq!(protocol, Protocol::Http);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_after_the_first_byte_decides_nothing() {
        let budgets = HeadBudgets::default();
        let mut charge = budgets.charge("t");
        let (mut client, mut server) = tokio::io::duplex(1024);
        let sniffing = tokio::spawn(async move {
            sniff(&mut server, &mut charge, Some(SILENCE))
                .await
                .unwrap()
        });
        client.write_all(b"G").await.unwrap();
        tokio::time::sleep(SILENCE * 5).await;
        client.write_all(b"ET / HTTP/1.1\r\n").await.unwrap();
        let (protocol, prefix) = sniffing.await.unwrap();
        assert_eq!(
            (protocol, &prefix[..]),
            (Protocol::Http, &b"GET / HTTP/1.1\r\n"[..])
        );

        // Dribbled past the deadline: what it could still become.
        let mut charge = budgets.charge("t");
        let (mut client, mut server) = tokio::io::duplex(1024);
        let sniffing = tokio::spawn(async move {
            sniff(&mut server, &mut charge, Some(SILENCE))
                .await
                .unwrap()
        });
        for _ in 0..20 {
            // Refused once the sniff has decided and let go of its end.
            let _ = client.write_all(b"a").await;
            tokio::time::sleep(Duration::from_millis(900)).await;
        }
        assert_eq!(sniffing.await.unwrap().0, Protocol::Http);

        // Nothing at all: silent, for the server-speaks-first path.
        let mut charge = budgets.charge("t");
        let (_client, mut server) = tokio::io::duplex(1024);
        let (protocol, _) = sniff(&mut server, &mut charge, Some(SILENCE))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Silent);
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
