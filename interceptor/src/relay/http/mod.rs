//! HTTP/1.x: each request on a kept-alive connection is judged on its own by its
//! host, gets the outbound Worker's injections, and is sent on through a pool of
//! upstream connections; a blocked one gets a 403 and never reaches upstream.
//!
//! `server` drives hyper over the client's socket; `pipeline` takes each request
//! through its steps (`target` reads what it asks for); a step that says no
//! returns a `Refused` (`refused`), answered and logged in one place; `respond`
//! sends the upstream's answer back.

mod pipeline;
mod refused;
mod respond;
mod server;
mod target;

use std::time::Instant;

use super::{body, budget, copy_until_stopped, sniff, stream, upstream, Connection, RelayContext};
use crate::logs::LogEntry;

pub use server::serve;

/// Writes a finished request's log line.
fn record(ctx: &RelayContext, conn: &Connection, mut entry: LogEntry, started: Instant) {
    entry.duration_ms = elapsed_ms(started);
    ctx.recorder.record(&entry, conn.log_enabled());
}

pub(super) fn elapsed_ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}
