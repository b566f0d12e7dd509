//! `hog`: allocates (and touches) memory without end, until the runtime's
//! memory limit stops it.
//!
//! `?mb=N` allocates N MiB only and then answers `200 held N MiB`: a request in
//! the same process that does finish.

use std::io::Write as _;

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hog;

wasi::http::proxy::export!(Hog);

impl Guest for Hog {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let mb = request
            .path_with_query()
            .and_then(|p| p.split_once('?').map(|(_, q)| q.to_string()))
            .and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("mb=").map(str::to_string))
            })
            .and_then(|mb| mb.parse::<usize>().ok());
        let mut held: Vec<Vec<u8>> = Vec::new();
        while mb.is_none_or(|mb| held.len() < mb) {
            held.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&held);
        }
        respond(out, format!("held {} MiB", held.len()));
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
