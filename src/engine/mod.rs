//! Running proof jobs on a backend: batches of nonces in, distances and proofs out.

pub mod batch;
