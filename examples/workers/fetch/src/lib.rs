//! `fetch`: fetches a URL and answers with the upstream's status and body, so
//! a test sees what the upstream received (an echo server's view of the
//! Authorization header, say).
//!
//! - `?url=URL` (percent-encoded) or the header `x-fetch-url: URL`: what to fetch.
//! - `&count=N`: fetch it N times in a row (for subrequest limits); the answer
//!   is the last one's, and `x-fetch-statuses` lists every status (`err` for a
//!   failed fetch).
//! - `&header=NAME:VALUE` (repeatable): a header to set on the outgoing request.
//!
//! A fetch that fails answers `502` with the error as the body; a missing or
//! malformed URL answers `400`.

use std::io::{Read as _, Write as _};

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingRequest, IncomingResponse, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};

struct Fetch;

wasi::http::proxy::export!(Fetch);

impl Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, headers, body) = match run(&request) {
            Ok(answer) => answer,
            Err((status, message)) => (status, Vec::new(), message.into_bytes()),
        };
        respond(out, status, headers, &body);
    }
}

type Answer = (u16, Vec<(String, Vec<u8>)>, Vec<u8>);

fn run(request: &IncomingRequest) -> Result<Answer, (u16, String)> {
    let query = request
        .path_with_query()
        .and_then(|p| p.split_once('?').map(|(_, q)| q.to_string()))
        .unwrap_or_default();
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };

    let url = match param("url") {
        Some(url) => url,
        None => request
            .headers()
            .get("x-fetch-url")
            .into_iter()
            .next()
            .and_then(|v| String::from_utf8(v).ok())
            .ok_or((
                400,
                "give the URL to fetch as ?url= or x-fetch-url".to_string(),
            ))?,
    };
    let count: u32 = match param("count") {
        Some(n) => n.parse().map_err(|_| (400, format!("bad count {n:?}")))?,
        None => 1,
    };
    let extra: Vec<(String, Vec<u8>)> = params
        .iter()
        .filter(|(k, _)| k == "header")
        .filter_map(|(_, v)| v.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().as_bytes().to_vec()))
        .collect();

    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..count.max(1) {
        let result = fetch(&url, &extra);
        statuses.push(match &result {
            Ok((status, _)) => status.to_string(),
            Err(_) => "err".to_string(),
        });
        last = Some(result);
    }
    let statuses = (
        "x-fetch-statuses".to_string(),
        statuses.join(",").into_bytes(),
    );
    match last.expect("at least one fetch") {
        Ok((status, body)) => Ok((status, vec![statuses], body)),
        Err(e) => Ok((502, vec![statuses], e.into_bytes())),
    }
}

/// One GET of `url`; the upstream's status and body, or the error as text.
fn fetch(url: &str, extra: &[(String, Vec<u8>)]) -> Result<(u16, Vec<u8>), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("not an absolute URL: {url:?}"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };

    let headers = Fields::from_list(extra).map_err(|e| format!("bad header: {e:?}"))?;
    let request = OutgoingRequest::new(headers);
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| "bad scheme".to_string())?;
    request
        .set_authority(Some(authority))
        .map_err(|()| format!("bad authority {authority:?}"))?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| format!("bad path {path:?}"))?;
    let body = request.body().map_err(|()| "no request body".to_string())?;
    let pending = outgoing_handler::handle(request, None).map_err(describe)?;
    OutgoingBody::finish(body, None).map_err(describe)?;

    let response = loop {
        match pending.get() {
            Some(result) => break result,
            None => pending.subscribe().block(),
        }
    };
    let response: IncomingResponse = response
        .map_err(|()| "response already taken".to_string())?
        .map_err(describe)?;
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|()| "response body already taken".to_string())?;
    let mut stream = incoming
        .stream()
        .map_err(|()| "response stream already taken".to_string())?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the response body: {e}"))?;
    Ok((status, body))
}

fn describe(e: ErrorCode) -> String {
    format!("{e:?}")
}

fn respond(out: ResponseOutparam, status: u16, mut headers: Vec<(String, Vec<u8>)>, body: &[u8]) {
    headers.push((
        "content-type".to_string(),
        b"text/plain; charset=utf-8".to_vec(),
    ));
    let fields = Fields::from_list(&headers).unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(fields);
    let _ = response.set_status_code(status);
    let outgoing = response.body().expect("first call to body");
    ResponseOutparam::set(out, Ok(response));
    let mut stream = outgoing.write().expect("first call to write");
    stream.write_all(body).expect("write body");
    stream.flush().expect("flush body");
    drop(stream);
    OutgoingBody::finish(outgoing, None).expect("finish body");
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
