//! `hello`: answers `200 hello from <worker>`, where `<worker>` is the first
//! label of the request's host (`acme` for `http://acme.example.com/`).
//!
//! Two extra paths for tests: `/headers` adds the request's headers, one
//! `name: value` per line, after the greeting; `/panic` panics (a trap).

use std::io::Write as _;

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasi::http::proxy::export!(Hello);

impl Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let authority = request.authority().unwrap_or_default();
        let host = authority
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h);
        let worker = host.split('.').next().unwrap_or_default();
        let path = request.path_with_query().unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default();

        let mut text = format!("hello from {worker}");
        match path {
            "/panic" => panic!("hello was asked to panic"),
            "/headers" => {
                for (name, value) in request.headers().entries() {
                    text.push_str(&format!("\n{name}: {}", String::from_utf8_lossy(&value)));
                }
            }
            _ => {}
        }

        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .expect("valid header");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("first call to body");
        ResponseOutparam::set(out, Ok(response));
        let mut stream = body.write().expect("first call to write");
        stream.write_all(text.as_bytes()).expect("write body");
        stream.flush().expect("flush body");
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}
