//! interceptor: kernel-enforced egress control for multi-tenant code.
//!
//! Data flows one way: a sandboxed connection is redirected by [`ebpf`] → the
//! [`relay`] (or the [`dns`] listener) identifies the tenant ([`tenants`]) and the
//! destination → [`policy`] decides → the relay forwards or refuses → [`record`]
//! counts it and writes it to the tenant's [`logs`]. [`daemon`] wires the parts;
//! [`cli`] and [`admin`] are the operator's side.

pub mod accept;
pub mod admin;
pub mod cli;
pub mod config;
pub mod context;
pub mod daemon;
pub mod dispatch;
pub mod dns;
pub mod ebpf;
pub mod headers;
pub mod logs;
pub mod metrics;
pub mod policy;
pub mod record;
pub mod relay;
pub mod resolve;
pub mod sandbox;
pub mod tenants;
pub mod wasm;
pub mod worker;
