//! The User Worker runtime (SPEC §8): runs one `wasi:http/proxy` component —
//! whatever `wasmtime serve` runs — in a long-lived, sandboxed process.
//!
//! The dispatcher (`crate::dispatch`) precompiles the component in the daemon
//! ([`engine`] + [`precompile`]) and starts `interceptor worker --name NAME
//! --relay IP:PORT [--cpu-ms N] [--memory-mb N]` ([`run_process`]) inside the
//! Worker's cgroup as the sandbox user, with
//!
//! - fd 3: its end of a connected Unix stream socketpair, the private channel;
//! - fd 4: a read-only memfd with the precompiled component.
//!
//! The channel speaks HTTP/2 with prior knowledge; the dispatcher is the client
//! and sends many requests at a time, each the incoming request as it came
//! (absolute URI, headers, body) plus [`CONTEXT_HEADER`], the signed request
//! context. Per request the runtime removes that header, instantiates the
//! component in a fresh [`wasmtime::Store`] (from a shared, pre-linked
//! `ProxyPre`, as `wasmtime serve` does) under the Worker's CPU and memory
//! limits, calls `wasi:http/incoming-handler` and answers with the guest's
//! response. A request that traps or breaks a limit answers `500` with the
//! message as its body and [`ERROR_HEADER`] set to `cpu`, `memory` or `trap`;
//! no other request of the process notices.
//!
//! Every outgoing request of the guest (`wasi:http/outgoing-handler`) carries
//! the incoming request's context token and goes out as plain HTTP/1.1 in
//! absolute-form — `https://` ones too: the relay originates TLS (SPEC §8) — to
//! the relay (see [`outgoing`]).
//!
//! ## Limits
//!
//! - **Memory** (`memory_mb`): the total size of the linear memories of one
//!   request's instance; growing past it traps at once.
//! - **CPU** (`cpu_ms`): measured with epoch interruption. A thread ticks the
//!   engine's epoch every millisecond (only while requests are in flight); the
//!   guest is charged for the ticks that pass *while its code runs*: time spent
//!   in host calls (waiting for a subrequest, a timer, the request body) and
//!   time spent yielded to other requests is not charged. Ticks are wall-clock
//!   time, so a guest descheduled by the kernel while running is still charged;
//!   on a loaded machine the limit can hit somewhat before `cpu_ms` of actual
//!   CPU time, never much after it (a tick of granularity plus the next epoch
//!   check in the guest's code). The guest yields to the async executor every
//!   tick, so one spinning request never starves the others on its thread.

mod outgoing;
mod process;
mod runtime;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

pub use crate::context::CONTEXT_HEADER;
pub use process::{run_process, CHANNEL_FD, COMPONENT_FD};
pub use runtime::{serve_channel, Limits, Worker};

/// Set on a `500` the runtime answers for a failed request: `cpu`, `memory` or
/// `trap` (a trap, a guest that answered with an error or never answered).
pub const ERROR_HEADER: &str = "x-interceptor-worker-error";

/// Errors of the Worker runtime.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    #[error("cannot compile the Worker: {0}")]
    Compile(String),
    #[error("cannot load the precompiled Worker: {0}")]
    Load(String),
    #[error("the Worker is not a wasi:http/proxy component: {0}")]
    Link(String),
    #[error("Worker channel (fd {fd}): {message}")]
    Channel { fd: i32, message: String },
    #[error("Worker component (fd {fd}): {message}")]
    ComponentFd { fd: i32, message: String },
    #[error("cannot start the Worker runtime: {0}")]
    Runtime(std::io::Error),
    #[error("serving the Worker channel: {0}")]
    Serve(hyper::Error),
}

/// The arguments of the hidden `interceptor worker` subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The Worker's name (its subdomain), for diagnostics.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// The relay: where outgoing requests to host names are sent (the kernel
    /// redirects them there anyway).
    #[arg(long, value_name = "IP:PORT")]
    pub relay: SocketAddr,
    /// CPU time per request, in milliseconds (see the module documentation).
    #[arg(long = "cpu-ms", value_name = "N")]
    pub cpu_ms: Option<u64>,
    /// Linear memory per request, in MiB.
    #[arg(long = "memory-mb", value_name = "N")]
    pub memory_mb: Option<u64>,
}

/// Requests one Worker process runs at once (HTTP/2 streams of its channel);
/// the dispatcher's client queues any beyond.
pub const MAX_CONCURRENT_REQUESTS: u32 = 100;

/// Instances the pooling allocator has slots for: a little more than the
/// requests, as an instance outlives its response by a moment.
const POOL_SLOTS: u32 = MAX_CONCURRENT_REQUESTS + MAX_CONCURRENT_REQUESTS / 4;

/// Bytes of a slot's linear memory (and tables) reset by `memset` when an
/// instance ends, instead of being unmapped: the next request's instance finds
/// them resident instead of taking a fault per page. Measured on the hello
/// Workers: Rust 6.8k → 7.6k requests/s; JavaScript unchanged at 2 MiB and
/// slower at 16 MiB (the memset then costs more than the faults it saves).
const KEEP_RESIDENT: usize = 2 << 20;

/// The one engine configuration, used by the daemon to precompile and by the
/// Worker process to load: the component model, async, epoch interruption,
/// Cranelift optimising for speed, and a pooling instance allocator (a fresh
/// instance per request reuses a warm slot instead of mapping memory anew).
///
/// The pool reserves address space up front (about 4 GiB per slot, never
/// touched until used); memory is committed as instances touch it and given
/// back when they finish. Where the address space cannot be had (a
/// `ulimit -v`), the engine falls back to allocating on demand: artifacts
/// do not depend on the allocator, so both load the same precompiled bytes.
pub fn engine() -> Result<Engine, WorkerError> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(POOL_SLOTS)
        .total_core_instances(POOL_SLOTS * 4)
        .total_memories(POOL_SLOTS * 2)
        .total_tables(POOL_SLOTS * 4)
        .total_stacks(POOL_SLOTS)
        .max_unused_warm_slots(8)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT);
    engine_with(InstanceAllocationStrategy::Pooling(pool)).or_else(|e| {
        tracing::warn!("{e}; allocating Worker instances on demand instead");
        engine_with(InstanceAllocationStrategy::OnDemand)
    })
}

pub(crate) fn engine_with(strategy: InstanceAllocationStrategy) -> Result<Engine, WorkerError> {
    let mut config = Config::new();
    // Async support is always on in wasmtime 48 (`Config::async_support` is a
    // deprecated no-op); the runtime calls guests with the `_async` methods.
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .allocation_strategy(strategy);
    Engine::new(&config).map_err(|e| WorkerError::Engine(format!("{e:#}")))
}

/// Compiles a component (the bytes of `NAME.wasm`) for [`engine`]; the Worker
/// process loads the result with `Component::deserialize`.
pub fn precompile(engine: &Engine, wasm: &[u8]) -> Result<Vec<u8>, WorkerError> {
    engine
        .precompile_component(wasm)
        .map_err(|e| WorkerError::Compile(format!("{e:#}")))
}
