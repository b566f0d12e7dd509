//! What every WebAssembly runtime of the daemon shares: for now the on-disk
//! compile cache ([`cache`]) of precompiled components.

pub mod cache;
