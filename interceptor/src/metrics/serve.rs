//! The `/metrics` listener: HTTP/1.1 (hyper, like the dispatchers), `GET
//! /metrics` and nothing else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE as PROMETHEUS_TEXT;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Metrics;
use crate::accept::accept_until;

/// A scraper that does not finish its request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The gauges' values at the moment of a scrape.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// Per tenant (and User Worker tenant), relay connections open now; a name
    /// given twice is summed.
    pub open_connections: Vec<(String, u64)>,
    /// Per dispatch namespace, Worker processes running now.
    pub worker_processes: Vec<(String, u64)>,
}

/// Serves `/metrics` on `listener` until `shutdown`; `gauges` is read on every scrape.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    accept_until(listener, shutdown.clone(), "metrics", |stream, _| {
        tracker.spawn(serve_connection(
            stream,
            metrics.clone(),
            gauges.clone(),
            shutdown.clone(),
        ));
    })
    .await
}

async fn serve_connection(
    stream: TcpStream,
    metrics: Arc<Metrics>,
    gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    shutdown: CancellationToken,
) {
    let service = service_fn(move |req| {
        let response = respond(&req, &metrics, &*gauges);
        async move { Ok::<_, Infallible>(response) }
    });
    crate::accept::serve_http1(stream, service, HEADER_TIMEOUT, shutdown, "metrics").await;
}

fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    gauges: &(dyn Fn() -> Gauges + Send + Sync),
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return status(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = status(StatusCode::METHOD_NOT_ALLOWED);
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match metrics.encode(&gauges()) {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
            response
        }
        Err(e) => {
            tracing::error!("cannot encode metrics: {e}");
            status(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}
