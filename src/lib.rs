//! llama-pow: the LLaMA-based proof of compute of the Gonka network.
//!
//! Layout: [`pow`] is the pure protocol (parameters, numpy-exact random streams, weights,
//! distances, nonce schedules: no I/O, no GPU); [`backend`] computes the forward pass on a
//! device; [`engine`] runs jobs on the devices; [`api`] is the HTTP server; [`cli`] holds the
//! command-line front ends.

pub mod api;
pub mod backend;
pub mod cli;
pub mod engine;
pub mod logsafe;
pub mod pow;
pub mod splitmix;
pub mod telemetry;
