//! Command-line front ends: each subcommand parses its input, runs, prints JSON.

pub mod bench;
pub mod compute;
pub mod devices;
pub mod facts;
pub mod selftest;
pub mod serve;
pub mod validate;

use crate::pow::request::ComputeRequest;
use anyhow::Context;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// A command-line number of seconds: positive and finite.
pub(crate) fn seconds(s: &str) -> Result<Duration, String> {
    let x: f64 = s
        .parse()
        .map_err(|_| format!("expected a number of seconds, got {s:?}"))?;
    if !x.is_finite() || x <= 0.0 || x > 1e9 {
        return Err(format!("expected a positive number of seconds, got {s}"));
    }
    Ok(Duration::from_secs_f64(x))
}

/// Read a compute/facts request from `--request FILE` or standard input.
pub fn read_request(path: Option<&Path>) -> anyhow::Result<ComputeRequest> {
    Ok(ComputeRequest::parse_str(&read_text(path)?)?)
}

/// The text of `--request FILE`, or of standard input.
pub fn read_text(path: Option<&Path>) -> anyhow::Result<String> {
    Ok(match path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read request file {}", p.display()))?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the request from standard input")?;
            s
        }
    })
}
