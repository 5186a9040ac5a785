//! `llama-pow selftest`: the start-up self-test ([`crate::backend::selftest`]) on its own,
//! on every device of `--device`, as a JSON report; the exit status says whether every
//! device passed.

use super::devices::{resolve_devices, DeviceChoice, DtypeChoice};
use crate::backend::selftest::{self, DeviceReport};
use crate::pow::params::Params;
use clap::Args;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct SelftestArgs {
    /// Devices to test: auto (the GPUs where there are NVIDIA GPUs, else the CPU), cpu, cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// The dtype a server would serve: its cases run besides the f16 ones (fp8: the FP8
    /// products against the f16 reference).
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: DtypeChoice,
    /// How the GPUs are grouped, as `serve --group-for`: v1 or v2.
    #[arg(long, default_value = "v2", value_parser = ["v1", "v2"])]
    pub group_for: String,
    /// Run the GPUs with CUDA graphs, as `serve --cuda-graphs`.
    #[arg(long)]
    pub cuda_graphs: bool,
}

/// The report: every device's cases and whether all passed.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestReport {
    pub passed: bool,
    pub dtype: &'static str,
    pub seconds: f64,
    /// Why `--device auto` computes on the CPU, or which GPUs no group could use.
    pub device_note: Option<String>,
    pub devices: Vec<DeviceReport>,
}

/// Resolve the devices and run the self-test on each, side by side.
pub fn run(args: &SelftestArgs) -> anyhow::Result<SelftestReport> {
    let group_for = Params::preset(&args.group_for)
        .ok_or_else(|| anyhow::anyhow!("--group-for: expected v1 or v2"))?;
    let (devices, device_note) = resolve_devices(args.device, &group_for, args.cuda_graphs)?;
    let served = args.dtype.served();
    let started = Instant::now();
    let devices: Vec<DeviceReport> = std::thread::scope(|s| {
        let running: Vec<_> = devices
            .iter()
            .map(|d| s.spawn(move || selftest::run_on(d.as_ref(), served)))
            .collect();
        running
            .into_iter()
            .map(|h| h.join().expect("the self-test does not panic"))
            .collect()
    });
    Ok(SelftestReport {
        passed: devices.iter().all(|d| d.passed),
        dtype: args.dtype.as_str(),
        seconds: started.elapsed().as_secs_f64(),
        device_note,
        devices,
    })
}
