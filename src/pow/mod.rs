//! The protocol, pure: everything here is deterministic arithmetic with no I/O and no GPU.

pub mod binomial;
pub mod dtype;
pub mod facts;
pub mod nonces;
pub mod params;
pub mod proof;
pub mod request;
pub mod rng;
pub mod seeds;
pub mod validation;
pub mod weights;
mod ziggurat_tables;
