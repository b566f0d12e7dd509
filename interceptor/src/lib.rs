//! interceptor: kernel-enforced egress control for multi-tenant code.
//!
//! Data flows one way: a sandboxed connection is redirected by [`ebpf`] → the
//! [`relay`] identifies tenant and destination → [`policy`] decides → the relay
//! forwards or refuses → [`logs`] records it.

pub mod config;
pub mod ebpf;
pub mod logs;
pub mod policy;
