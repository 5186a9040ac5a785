//! llama-pow: the LLaMA-based proof of compute of the Gonka network.
//!
//! Layout: [`pow`] is the pure protocol (parameters, numpy-exact random streams, weights,
//! distances, nonce schedules: no I/O, no GPU); [`backend`] computes the forward pass on a
//! device (the CPU or a GPU group, behind one trait); [`engine`] runs jobs on the devices;
//! [`session`] is what a request does over time (generation streams, /warmup, /pooled),
//! without HTTP; [`api`] is the HTTP server; [`cli`] holds the command-line front ends;
//! [`telemetry`] the metrics and GPU readings.

pub mod api;
pub mod backend;
pub mod cli;
pub mod engine;
pub mod logsafe;
pub mod pow;
pub mod session;
pub mod splitmix;
pub mod telemetry;
