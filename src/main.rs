//! The `llama-pow` binary.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "llama-pow",
    version,
    about = "Proof-of-compute server for the LLaMA-based PoW of the Gonka network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute the distances of `count` consecutive nonces and print them as JSON.
    ///
    /// Input: one JSON object with block_hash, public_key, params, start_nonce, r_target
    /// (block_height, batch_size, count, dtype optional).
    Compute {
        /// Read the request from this file instead of standard input.
        #[arg(long)]
        request: Option<PathBuf>,
        /// Where to compute: cpu (the reference-faithful CPU backend), cuda (the first GPU
        /// group) or auto.
        #[arg(long, value_enum, default_value = "cpu")]
        device: llama_pow::cli::devices::DeviceChoice,
    },
    /// Validate a proof batch as a validator would: recompute every nonce's distance and run
    /// the fraud test. The verdict goes to stdout as one JSON object, progress to stderr.
    ///
    /// Input: /validate's body (block_hash, block_height, public_key, params, r_target,
    /// nonces, dist; node_id, fraud_threshold, batch_size optional) and optionally dtype.
    Validate {
        /// Read the request from this file instead of standard input.
        #[arg(long)]
        request: Option<PathBuf>,
        /// Where to compute: cpu (the reference-faithful CPU backend), cuda (the first GPU
        /// group) or auto.
        #[arg(long, value_enum, default_value = "cpu")]
        device: llama_pow::cli::devices::DeviceChoice,
    },
    /// Print the hashes of the pool, the parameters, the target, and the inputs and
    /// permutations of `count` nonces, to check an install against the reference.
    Facts {
        /// Read the request from this file instead of standard input.
        #[arg(long)]
        request: Option<PathBuf>,
        /// Hash only these parameters' values (repeatable); all of them by default.
        #[arg(long = "param", value_name = "NAME")]
        params: Vec<String>,
    },
    /// Serve /generate, /warmup, /pooled and /health over HTTP until SIGTERM or SIGINT, with
    /// Prometheus metrics at GET /metrics and the API's OpenAPI document at GET /openapi.json.
    Serve(llama_pow::cli::serve::ServeArgs),
    /// Measure throughput and latency (locally, or of a running server with --server) and
    /// write a run folder: report.json, metrics.csv, gpu.csv, throughput_latency.png.
    /// Ctrl-C stops early and still writes them (exit status 130).
    Bench(llama_pow::cli::bench::BenchArgs),
    /// Run the start-up self-test alone on every device: golden cases against the
    /// reference's distances. Prints a JSON report; exits non-zero when a device fails.
    Selftest(llama_pow::cli::selftest::SelftestArgs),
}

/// The exit status of a bench a Ctrl-C ended early (128 + SIGINT), its report written.
const INTERRUPTED: u8 = 130;

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Compute { request, device } => {
            let req = llama_pow::cli::read_request(request.as_deref())?;
            let out = llama_pow::cli::compute::run(&req, device)?;
            println!("{}", serde_json::to_string(&out)?);
        }
        Command::Validate { request, device } => {
            let text = llama_pow::cli::read_text(request.as_deref())?;
            let verdict = llama_pow::cli::validate::run(&text, device)?;
            llama_pow::cli::validate::print(&verdict)?;
        }
        Command::Facts { request, params } => {
            let req = llama_pow::cli::read_request(request.as_deref())?;
            let out = llama_pow::cli::facts::run(&req, &params)?;
            println!("{}", serde_json::to_string(&out)?);
        }
        Command::Serve(args) => llama_pow::cli::serve::run(&args)?,
        Command::Selftest(args) => {
            let report = llama_pow::cli::selftest::run(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            if !report.passed {
                let failed: Vec<String> = report
                    .devices
                    .iter()
                    .filter_map(|d| d.failure().map(|f| format!("{}: {f}", d.device)))
                    .collect();
                anyhow::bail!("self-test failed: {}", failed.join("; "));
            }
        }
        Command::Bench(args) => {
            let report = llama_pow::cli::bench::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "{}",
                    std::path::Path::new(report["run_folder"].as_str().unwrap_or("."))
                        .join(llama_pow::cli::bench::REPORT_FILE)
                        .display()
                );
            }
            if report["interrupted"] == true {
                return Ok(ExitCode::from(INTERRUPTED));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("llama-pow: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}
