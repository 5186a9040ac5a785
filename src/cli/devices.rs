//! Where a command computes: `--device` and `--dtype` as every subcommand takes them, and the
//! devices they resolve to on this machine (the CPU, or one backend per GPU group).

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::groups::{groups_for, NotEnoughGPUResources};
use crate::backend::cuda::{self, CudaBackend, CudaUnavailable, GpuInfo};
use crate::backend::Backend;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use clap::ValueEnum;
use std::sync::Arc;

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when a usable GPU and a CUDA forward pass exist, else the CPU (with a log line
    /// saying why).
    Auto,
    Cpu,
    Cuda,
}

/// The model dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeChoice {
    F32,
    F16,
    Bf16,
    /// FP8 (E4M3) matrix products on sm_89 / sm_90 / sm_100 GPUs, everything else in f16:
    /// the same as f16 with `use_fp8: true` in every request's params.
    Fp8,
}

impl DtypeChoice {
    /// The dtype of the model's activations (f16 for fp8).
    pub fn dtype(self) -> Dtype {
        match self {
            DtypeChoice::F32 => Dtype::F32,
            DtypeChoice::F16 | DtypeChoice::Fp8 => Dtype::F16,
            DtypeChoice::Bf16 => Dtype::Bf16,
        }
    }

    /// Whether the matrix products run in FP8.
    pub fn fp8(self) -> bool {
        self == DtypeChoice::Fp8
    }

    /// The name the command line takes.
    pub fn as_str(self) -> &'static str {
        match self {
            DtypeChoice::F32 => "f32",
            DtypeChoice::F16 => "f16",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::Fp8 => "fp8",
        }
    }
}

/// What `--device` resolves to on this machine.
#[derive(Debug, Clone, PartialEq)]
pub enum DevicePlan {
    /// Compute on the CPU; `note` says why not on a GPU when `auto` fell back to it.
    Cpu { note: Option<String> },
    /// Compute on these GPUs.
    Cuda(Vec<GpuInfo>),
}

/// Decide where to compute. `discover` is only called when the choice needs it (not for
/// `cpu`). `auto` takes CUDA when a GPU is usable, else the CPU with a note saying why; `cuda`
/// fails with the reason instead of falling back.
pub fn plan_devices(
    choice: DeviceChoice,
    discover: impl FnOnce() -> Result<Vec<GpuInfo>, CudaUnavailable>,
) -> Result<DevicePlan, String> {
    if choice == DeviceChoice::Cpu {
        return Ok(DevicePlan::Cpu { note: None });
    }
    let why_not = match discover() {
        Ok(gpus) => return Ok(DevicePlan::Cuda(gpus)),
        Err(why) => why.to_string(),
    };
    match choice {
        DeviceChoice::Cuda => Err(format!(
            "--device cuda: cannot compute on CUDA: {why_not}; use --device cpu (or auto)"
        )),
        _ => Ok(DevicePlan::Cpu {
            note: Some(format!(
                "--device auto: computing on the CPU, not on CUDA: {why_not}"
            )),
        }),
    }
}

/// A worker's devices and, when `auto` fell back to the CPU, the note saying why.
pub type ResolvedDevices = (Vec<Arc<dyn Backend>>, Option<String>);

/// The devices of `choice` on this machine: [`plan_devices`] with the machine's CUDA
/// discovery, then the GPUs formed into groups as the reference does (for the minimum memory
/// of `group_for`'s params: see [`crate::backend::cuda::groups`]), one worker per group, each group
/// brought up (contexts, kernels compiled for its architecture, cuBLASLt).
///
/// `auto` falls back to the CPU, with a note saying why, when no group can be formed or a
/// GPU cannot be brought up; `cuda` fails instead (no group at all is the reference's fatal
/// NotEnoughGPUResources). `cuda_graphs` turns on CUDA graph replay in the GPU devices.
pub fn resolve_devices(
    choice: DeviceChoice,
    group_for: &Params,
    cuda_graphs: bool,
) -> anyhow::Result<ResolvedDevices> {
    let gpus = match plan_devices(choice, cuda::cuda_available) {
        Ok(DevicePlan::Cpu { note }) => return Ok((vec![Arc::new(CpuBackend::new())], note)),
        Ok(DevicePlan::Cuda(gpus)) => gpus,
        Err(why) => return Err(anyhow::anyhow!(why)),
    };
    match cuda_backends(&gpus, group_for, cuda_graphs) {
        Ok((devices, note)) => Ok((devices, note)),
        Err(why) if choice == DeviceChoice::Cuda => Err(anyhow::anyhow!("--device cuda: {why}")),
        Err(why) => Ok((
            vec![Arc::new(CpuBackend::new())],
            Some(format!(
                "--device auto: computing on the CPU, not on CUDA: {why}"
            )),
        )),
    }
}

/// One [`CudaBackend`] per GPU group, and a note naming the GPUs no group could use.
fn cuda_backends(
    gpus: &[GpuInfo],
    group_for: &Params,
    cuda_graphs: bool,
) -> Result<ResolvedDevices, String> {
    let grouping = groups_for(group_for, gpus)
        .map_err(|e| format!("{}: {e}", NotEnoughGPUResources::ERROR_TYPE))?;
    let mut devices: Vec<Arc<dyn Backend>> = Vec::with_capacity(grouping.groups.len());
    for group in &grouping.groups {
        let infos: Vec<GpuInfo> = group
            .ordinals
            .iter()
            .filter_map(|o| gpus.iter().find(|g| g.ordinal == *o).cloned())
            .collect();
        let device = CudaBackend::open(&infos)
            .map_err(|e| format!("{} could not be brought up: {e}", group.name()))?
            .with_graphs(cuda_graphs);
        devices.push(Arc::new(device));
    }
    let note = (!grouping.left_out.is_empty()).then(|| {
        let names: Vec<String> = grouping
            .left_out
            .iter()
            .map(|o| format!("cuda:{o}"))
            .collect();
        format!(
            "{} left out: not enough memory to start a GPU group of their own",
            names.join(", ")
        )
    });
    Ok((devices, note))
}

/// `--dtype fp8` needs every device to multiply in FP8: refused at start-up otherwise (a
/// server that would refuse every request is no server), with the device's own reason.
pub fn check_fp8_devices(devices: &[Arc<dyn Backend>]) -> anyhow::Result<()> {
    // A model small enough for any device, with every size a multiple of 16.
    let probe = Params {
        dim: 64,
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 4,
        vocab_size: 64,
        multiple_of: 32,
        seq_len: 2,
        use_fp8: true,
        ..Params::default()
    };
    for d in devices {
        d.check(&probe, Dtype::F16).map_err(|e| {
            anyhow::anyhow!(
                "--dtype fp8 on {}: {}; start with --dtype f16 (or f32, bf16) instead",
                d.name(),
                startup_terms(&e.to_string())
            )
        })?;
    }
    Ok(())
}

/// A backend's reason for refusing `use_fp8`, said of the server rather than of a request:
/// without the `params.use_fp8:` it starts with and the advice to send `use_fp8 false` it may
/// end with (at start-up there is no request to change).
fn startup_terms(reason: &str) -> String {
    let r = reason.strip_prefix("params.use_fp8: ").unwrap_or(reason);
    let r = r.strip_suffix("; send use_fp8 false").unwrap_or(r);
    r.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::CudaLibrary;

    fn h100(ordinal: usize) -> GpuInfo {
        GpuInfo {
            ordinal,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            total_bytes: 85_520_809_984,
            free_bytes: 84_987_133_952,
        }
    }

    fn missing() -> Result<Vec<GpuInfo>, CudaUnavailable> {
        Err(CudaUnavailable::LibraryMissing(CudaLibrary::Driver))
    }

    #[test]
    fn cpu_never_probes_cuda() {
        let plan = plan_devices(DeviceChoice::Cpu, || panic!("probed")).unwrap();
        assert_eq!(plan, DevicePlan::Cpu { note: None });
    }

    #[test]
    fn auto_takes_cuda_when_usable_else_says_why() {
        let gpus = vec![h100(0), h100(1)];
        let plan = plan_devices(DeviceChoice::Auto, || Ok(gpus.clone())).unwrap();
        assert_eq!(plan, DevicePlan::Cuda(gpus.clone()));

        let DevicePlan::Cpu { note: Some(note) } =
            plan_devices(DeviceChoice::Auto, missing).unwrap()
        else {
            panic!("auto without CUDA must fall back to the CPU with a note");
        };
        assert!(note.contains("computing on the CPU"), "{note}");
        assert!(note.contains("libcuda.so.1 not found"), "{note}");
    }

    #[test]
    fn cuda_fails_with_the_reason() {
        let e = plan_devices(DeviceChoice::Cuda, missing).unwrap_err();
        assert!(
            e.starts_with("--device cuda: cannot compute on CUDA: libcuda.so.1"),
            "{e}"
        );
        let e = plan_devices(DeviceChoice::Cuda, || Err(CudaUnavailable::NoDevices)).unwrap_err();
        assert!(e.contains("sees no GPU"), "{e}");
        let plan = plan_devices(DeviceChoice::Cuda, || Ok(vec![h100(0)])).unwrap();
        assert_eq!(plan, DevicePlan::Cuda(vec![h100(0)]));
    }

    #[test]
    fn fp8_is_refused_at_start_up_on_the_cpu() {
        let devices: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::new())];
        let e = check_fp8_devices(&devices).unwrap_err().to_string();
        assert!(e.starts_with("--dtype fp8 on cpu: "), "{e}");
        assert!(e.contains("no FP8 support"), "{e}");
        assert!(
            e.ends_with("start with --dtype f16 (or f32, bf16) instead"),
            "{e}"
        );
        // Start-up terms: no request field, no advice about requests.
        assert!(
            !e.contains("params.use_fp8") && !e.contains("send use_fp8"),
            "{e}"
        );
        assert_eq!(DtypeChoice::Fp8.dtype(), Dtype::F16);
        assert!(DtypeChoice::Fp8.fp8() && !DtypeChoice::Bf16.fp8());
        assert_eq!(DtypeChoice::Fp8.as_str(), "fp8");
    }

    #[test]
    fn this_machine_resolves_without_panicking() {
        let v2 = Params::v2();
        let (devices, note) = resolve_devices(DeviceChoice::Auto, &v2, false).unwrap();
        assert!(!devices.is_empty());
        match cuda::cuda_available() {
            Err(why) => {
                // No usable GPU here: auto takes the CPU and says why; cuda refuses.
                assert_eq!(devices.len(), 1);
                assert_eq!(devices[0].name(), "cpu");
                assert!(note.unwrap().contains(&why.to_string()));
                let e = resolve_devices(DeviceChoice::Cuda, &v2, false)
                    .err()
                    .unwrap()
                    .to_string();
                assert!(e.contains("cannot compute on CUDA"), "{e}");
            }
            Ok(gpus) => {
                eprintln!(
                    "GPUs here: {} found, {} worker(s)",
                    gpus.len(),
                    devices.len()
                );
                assert!(
                    devices[0].name().starts_with("cuda:"),
                    "{}",
                    devices[0].name()
                );
            }
        }
    }
}
