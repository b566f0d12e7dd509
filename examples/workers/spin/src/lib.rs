//! `spin`: burns CPU without end, until the runtime's CPU limit stops it.
//!
//! `?ms=N` spins for N milliseconds only (of the monotonic clock) and then
//! answers `200 spun N ms`: a request in the same process that does finish.

use std::io::Write as _;

use wasi::clocks::monotonic_clock;
use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Spin;

wasi::http::proxy::export!(Spin);

impl Guest for Spin {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let ms = request
            .path_with_query()
            .and_then(|p| p.split_once('?').map(|(_, q)| q.to_string()))
            .and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("ms=").map(str::to_string))
            })
            .and_then(|ms| ms.parse::<u64>().ok());
        let Some(ms) = ms else {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        };
        let end = monotonic_clock::now() + ms * 1_000_000;
        let mut n: u64 = 0;
        while monotonic_clock::now() < end {
            // Mostly guest code: look at the clock only now and then.
            for _ in 0..10_000 {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        respond(out, format!("spun {ms} ms"));
    }
}

fn respond(out: ResponseOutparam, text: String) {
    let response = OutgoingResponse::new(Fields::new());
    let body = response.body().expect("first call to body");
    ResponseOutparam::set(out, Ok(response));
    let mut stream = body.write().expect("first call to write");
    stream.write_all(text.as_bytes()).expect("write body");
    stream.flush().expect("flush body");
    drop(stream);
    OutgoingBody::finish(body, None).expect("finish body");
}
