//! `llama-pow validate`: a proof batch validated as a validator would, on this machine's
//! devices: progress on stderr, the verdict (the ValidatedBatch) as one JSON object on
//! stdout. The request is /validate's body, plus an optional `dtype` (as `compute` takes).

use super::devices::{resolve_devices, DeviceChoice};
use crate::engine::{Engine, EngineOptions};
use crate::pow::dtype::Dtype;
use crate::pow::request::{wrong, Fields, RequestError};
use crate::pow::validation::{ValidatedBatch, ValidationRequest, OPTIONAL_KEYS, REQUIRED_KEYS};
use crate::session::lines::LineSink;
use crate::session::validation::{self, Outcome};
use crate::session::Shutdown;
use anyhow::Context;
use serde_json::Value;
use std::io::Write;
use std::time::Duration;

/// A validation as the command line takes it: strict about its keys.
pub fn parse(text: &str) -> Result<(ValidationRequest, Dtype), RequestError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| RequestError(format!("request is not valid JSON: {e}")))?;
    let f = Fields::new(&v, "request", "")?;
    let mut known: Vec<&str> = REQUIRED_KEYS.to_vec();
    known.extend(OPTIONAL_KEYS);
    known.push("dtype");
    f.deny_unknown(&known)?;
    let req = ValidationRequest::from_fields(&f)?;
    let dtype = match f.get("dtype") {
        None => Dtype::F16,
        Some(Value::String(s)) => s.parse().map_err(RequestError)?,
        Some(other) => return Err(wrong("dtype", "a string", other)),
    };
    Ok((req, dtype))
}

/// Validate on `device`, writing progress to stderr; the verdict.
pub fn run(text: &str, device: DeviceChoice) -> anyhow::Result<ValidatedBatch> {
    let (req, dtype) = parse(text)?;
    let (devices, note) = resolve_devices(device, &req.params, false)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let engine = Engine::new(
        devices,
        EngineOptions {
            dtype,
            model_cache: 0,
            ..EngineOptions::default()
        },
    );
    engine.check(&req.params)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("cannot start the runtime")?;
    let (sink, mut lines) = LineSink::channel();
    let outcome = runtime.block_on(async {
        let printer = async {
            // Every line but the verdict (returned below, for stdout) goes to stderr as it
            // comes.
            while let Some(line) = lines.recv().await {
                let is_verdict = serde_json::from_slice::<Value>(&line)
                    .is_ok_and(|v| v.get("probability_honest").is_some());
                if !is_verdict {
                    eprint!("{}", String::from_utf8_lossy(&line));
                }
            }
        };
        // No time limit on the command line, and no shutdown but Ctrl-C's: the batch is
        // validated whole.
        let (_never, shutdown) = tokio::sync::watch::channel(false);
        let shutdown = Shutdown::new(shutdown);
        let validating = async {
            let max = Duration::from_secs(u64::MAX / 4);
            let o = validation::run(&engine, &req, max, &sink, &shutdown).await;
            drop(sink);
            o
        };
        let (o, ()) = tokio::join!(validating, printer);
        o
    });
    match outcome {
        Outcome::Verdict(v) => Ok(*v),
        Outcome::Unfinished(why) => anyhow::bail!("validation did not finish: {why}"),
    }
}

/// Print the verdict as one JSON object on stdout.
pub fn print(v: &ValidatedBatch) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_request_is_strict_and_takes_a_dtype() {
        let base = r#"{"block_hash": "bh", "block_height": 1, "public_key": "pk",
            "params": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2,
                       "vocab_size": 40, "multiple_of": 32, "seq_len": 4},
            "r_target": 1.5, "nonces": [3], "dist": [1.2]"#;
        let (r, d) = parse(&format!("{base}}}")).unwrap();
        assert_eq!((r.nonces, d), (vec![3], Dtype::F16));
        let (_, d) = parse(&format!(r#"{base}, "dtype": "bf16"}}"#)).unwrap();
        assert_eq!(d, Dtype::Bf16);
        let e = parse(&format!(r#"{base}, "extra": 1}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("extra: unknown field"), "{e}");
        let e = parse(&format!(r#"{base}, "dtype": "f8"}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("f8"), "{e}");
    }
}
