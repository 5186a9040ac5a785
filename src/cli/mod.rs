//! Command-line front ends: each subcommand parses its input, runs, prints JSON.

pub mod bench;
pub mod compute;
pub mod facts;
pub mod serve;

use crate::pow::request::ComputeRequest;
use anyhow::Context;
use std::io::Read;
use std::path::Path;

/// Read a compute/facts request from `--request FILE` or standard input.
pub fn read_request(path: Option<&Path>) -> anyhow::Result<ComputeRequest> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read request file {}", p.display()))?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the request from standard input")?;
            s
        }
    };
    Ok(ComputeRequest::parse_str(&text)?)
}
