//! Where a command computes: `--device` and `--dtype` as every subcommand takes them, and the
//! devices they resolve to on this machine (the CPU, or one backend per GPU group).

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::groups::{groups_for, NotEnoughGPUResources};
use crate::backend::cuda::{self, CudaBackend, CudaUnavailable, GpuInfo};
use crate::backend::selftest::Served;
use crate::backend::Backend;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use clap::ValueEnum;
use std::sync::Arc;

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The GPUs when this machine has NVIDIA GPUs (and then they must work: a GPU host
    /// whose GPU path cannot start is refused, not served slowly from the CPU); the CPU, with
    /// a log line saying why, only where there is no NVIDIA GPU at all.
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

    /// What a server with this `--dtype` computes in (what its self-test checks).
    pub fn served(self) -> Served {
        Served {
            dtype: self.dtype(),
            fp8: self.fp8(),
        }
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

/// The refusal of `--device auto` on a machine with NVIDIA GPUs (`evidence` says what shows
/// them) whose GPU path cannot start (`why`). Serving from the CPU there would refuse or
/// crawl through every real request without anyone noticing.
fn auto_refusal(evidence: &str, why: &str) -> String {
    format!(
        "--device auto: NVIDIA GPUs are visible here ({evidence}), but the GPU path cannot \
         start: {why}. Fix that, or pass --device cpu to compute on the CPU"
    )
}

/// Decide where to compute. `discover` (the usable GPUs, or why there are none) and
/// `visible` (what shows NVIDIA GPUs on this machine, if anything) are only called when the
/// choice needs them (not for `cpu`). `cuda` fails with the reason; `auto` takes the GPUs
/// when they are usable, refuses when NVIDIA GPUs are visible but unusable, and computes on
/// the CPU, with a note saying why, only where no NVIDIA GPU is visible at all.
pub fn plan_devices(
    choice: DeviceChoice,
    discover: impl FnOnce() -> Result<Vec<GpuInfo>, CudaUnavailable>,
    visible: impl FnOnce() -> Option<String>,
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
        _ => match visible() {
            Some(evidence) => Err(auto_refusal(&evidence, &why_not)),
            None => Ok(DevicePlan::Cpu {
                note: Some(format!(
                    "--device auto: computing on the CPU, not on CUDA (no NVIDIA GPU here): \
                     {why_not}"
                )),
            }),
        },
    }
}

/// A worker's devices and, when `auto` fell back to the CPU (or some GPUs were left out of
/// every group), the note saying why.
pub type ResolvedDevices = (Vec<Arc<dyn Backend>>, Option<String>);

/// The devices of `choice` on this machine: [`plan_devices`] with the machine's CUDA
/// discovery, then the GPUs formed into groups as the reference does (for the minimum memory
/// of `group_for`'s params: see [`crate::backend::cuda::groups`]), one worker per group, each
/// group brought up (contexts, kernels compiled for its architecture, cuBLASLt).
///
/// Where GPUs were found, both `auto` and `cuda` refuse when no group can be formed (the
/// reference's fatal NotEnoughGPUResources) or a group cannot be brought up, saying why;
/// `auto` falls back to the CPU only on a machine without NVIDIA GPUs. `cuda_graphs` turns
/// on CUDA graph replay in the GPU devices.
pub fn resolve_devices(
    choice: DeviceChoice,
    group_for: &Params,
    cuda_graphs: bool,
) -> anyhow::Result<ResolvedDevices> {
    resolve_with(
        choice,
        group_for,
        cuda::cuda_available,
        cuda::nvidia_gpus_visible_here,
        |group: &[GpuInfo]| {
            let device = CudaBackend::open(group).map_err(|e| e.to_string())?;
            Ok(Arc::new(device.with_graphs(cuda_graphs)) as Arc<dyn Backend>)
        },
    )
}

/// [`resolve_devices`] with discovery, the visibility of NVIDIA GPUs and the bringing up of
/// a group given (the machine's own, or fakes in tests).
fn resolve_with(
    choice: DeviceChoice,
    group_for: &Params,
    discover: impl FnOnce() -> Result<Vec<GpuInfo>, CudaUnavailable>,
    visible: impl FnOnce() -> Option<String>,
    open: impl Fn(&[GpuInfo]) -> Result<Arc<dyn Backend>, String>,
) -> anyhow::Result<ResolvedDevices> {
    let gpus = match plan_devices(choice, discover, visible) {
        Ok(DevicePlan::Cpu { note }) => return Ok((vec![Arc::new(CpuBackend::new())], note)),
        Ok(DevicePlan::Cuda(gpus)) => gpus,
        Err(why) => return Err(anyhow::anyhow!(why)),
    };
    match cuda_backends(&gpus, group_for, open) {
        Ok(resolved) => Ok(resolved),
        Err(why) if choice == DeviceChoice::Cuda => Err(anyhow::anyhow!("--device cuda: {why}")),
        Err(why) => {
            let evidence = format!("the CUDA driver sees {} GPU(s)", gpus.len());
            Err(anyhow::anyhow!(auto_refusal(&evidence, &why)))
        }
    }
}

/// One backend per GPU group, each brought up by `open`, and a note naming the GPUs no group
/// could use.
fn cuda_backends(
    gpus: &[GpuInfo],
    group_for: &Params,
    open: impl Fn(&[GpuInfo]) -> Result<Arc<dyn Backend>, String>,
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
        let device =
            open(&infos).map_err(|e| format!("{} could not be brought up: {e}", group.name()))?;
        devices.push(device);
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
    use crate::backend::cuda::tests::{h100, FakeProbe};
    use crate::backend::cuda::{discover, nvidia_gpus_visible, CudaLibrary, DriverInitError};

    /// [`plan_devices`] on a faked machine.
    fn plan_on(choice: DeviceChoice, probe: &FakeProbe) -> Result<DevicePlan, String> {
        plan_devices(choice, || discover(probe), || nvidia_gpus_visible(probe))
    }

    /// [`resolve_with`] on a faked machine whose groups come up as `open` says.
    fn resolve_on(
        choice: DeviceChoice,
        probe: &FakeProbe,
        open: impl Fn(&[GpuInfo]) -> Result<Arc<dyn Backend>, String>,
    ) -> anyhow::Result<ResolvedDevices> {
        let v2 = Params::v2();
        resolve_with(
            choice,
            &v2,
            || discover(probe),
            || nvidia_gpus_visible(probe),
            open,
        )
    }

    /// A group that comes up: any backend stands in for it (its name is all that is looked
    /// at).
    fn comes_up(_: &[GpuInfo]) -> Result<Arc<dyn Backend>, String> {
        Ok(Arc::new(CpuBackend::new()))
    }

    #[test]
    fn cpu_never_probes_cuda() {
        let plan = plan_devices(DeviceChoice::Cpu, || panic!("probed"), || panic!("probed"));
        assert_eq!(plan.unwrap(), DevicePlan::Cpu { note: None });
    }

    #[test]
    fn auto_takes_usable_gpus_and_the_cpu_only_without_nvidia_gpus() {
        let host = FakeProbe::with_gpus(vec![h100(0), h100(1)]);
        let plan = plan_on(DeviceChoice::Auto, &host).unwrap();
        assert_eq!(plan, DevicePlan::Cuda(vec![h100(0), h100(1)]));

        let DevicePlan::Cpu { note: Some(note) } =
            plan_on(DeviceChoice::Auto, &FakeProbe::without_nvidia()).unwrap()
        else {
            panic!("auto without NVIDIA GPUs must fall back to the CPU with a note");
        };
        assert!(note.contains("computing on the CPU"), "{note}");
        assert!(note.contains("no NVIDIA GPU here"), "{note}");
        assert!(note.contains("libcuda.so.1 not found"), "{note}");
    }

    #[test]
    fn auto_refuses_a_gpu_host_whose_gpu_path_cannot_start() {
        let host = FakeProbe::with_gpus(vec![h100(0)]);
        // Each way the GPU path can fail on a host with GPUs, and what the refusal names.
        let cases: Vec<(FakeProbe, &str, &str)> = vec![
            (
                FakeProbe {
                    missing: vec![CudaLibrary::Driver],
                    ..host.clone()
                },
                "/dev/nvidia* device nodes exist",
                "libcuda.so.1 not found",
            ),
            (
                FakeProbe {
                    missing: vec![CudaLibrary::Nvrtc],
                    device_nodes: false,
                    ..host.clone()
                },
                "the CUDA driver sees 1 GPU(s)",
                "libnvrtc.so.13 not found",
            ),
            (
                FakeProbe {
                    driver: 12040,
                    ..host.clone()
                },
                "/dev/nvidia*",
                "supports CUDA 12.4",
            ),
            (
                FakeProbe {
                    nvrtc: (12, 9),
                    ..host.clone()
                },
                "/dev/nvidia*",
                "NVRTC 12.9 is loaded",
            ),
            (
                FakeProbe {
                    cublaslt: 120_901,
                    ..host.clone()
                },
                "/dev/nvidia*",
                "cuBLASLt 12.9.1 is loaded",
            ),
            (
                FakeProbe {
                    device_nodes: false,
                    count: Err(DriverInitError {
                        text: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH".into(),
                        no_gpu: false,
                    }),
                    ..host.clone()
                },
                "the CUDA driver is installed but fails",
                "failed to initialise: CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
            ),
        ];
        for (probe, evidence, why) in cases {
            let e = plan_on(DeviceChoice::Auto, &probe).unwrap_err();
            assert!(
                e.starts_with("--device auto: NVIDIA GPUs are visible here"),
                "{e}"
            );
            assert!(e.contains(evidence), "{evidence} in {e}");
            assert!(e.contains(why), "{why} in {e}");
            assert!(e.contains("--device cpu to compute on the CPU"), "{e}");
            // cuda refuses the same machine with the same reason.
            let e = plan_on(DeviceChoice::Cuda, &probe).unwrap_err();
            assert!(
                e.starts_with("--device cuda: cannot compute on CUDA"),
                "{e}"
            );
            assert!(e.contains(why), "{why} in {e}");
            // And cpu computes on the CPU without asking.
            let (d, note) = resolve_on(DeviceChoice::Cpu, &probe, |_| panic!("opened")).unwrap();
            assert_eq!((d[0].name(), note), ("cpu".to_string(), None));
        }
    }

    #[test]
    fn gpus_that_cannot_be_grouped_or_brought_up_are_refused_not_replaced_by_the_cpu() {
        // Discovery succeeds, but a group fails to come up (a kernel that does not load).
        let host = FakeProbe::with_gpus(vec![h100(0)]);
        let broken = |_: &[GpuInfo]| -> Result<Arc<dyn Backend>, String> {
            Err("the CUBIN of attention.cu could not be loaded".into())
        };
        let e = resolve_on(DeviceChoice::Auto, &host, broken)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("NVIDIA GPUs are visible here"), "{e}");
        assert!(
            e.contains("cuda:0 could not be brought up: the CUBIN"),
            "{e}"
        );
        assert!(e.contains("--device cpu"), "{e}");
        let e = resolve_on(DeviceChoice::Cuda, &host, broken)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("--device cuda: cuda:0 could not be brought up"),
            "{e}"
        );
        // A 16 GiB GPU cannot hold a V2 group (38 GiB): refused, not computed on the CPU.
        let mut small = h100(0);
        small.total_bytes = 16 << 30;
        let e = resolve_on(
            DeviceChoice::Auto,
            &FakeProbe::with_gpus(vec![small]),
            comes_up,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("NotEnoughGPUResources"), "{e}");
        // Usable GPUs: one worker per group.
        let (d, note) = resolve_on(
            DeviceChoice::Auto,
            &FakeProbe::with_gpus(vec![h100(0), h100(1)]),
            comes_up,
        )
        .unwrap();
        assert_eq!((d.len(), note), (2, None));
        // No NVIDIA GPU at all: the CPU, with the reason.
        let (d, note) =
            resolve_on(DeviceChoice::Auto, &FakeProbe::without_nvidia(), comes_up).unwrap();
        assert_eq!(d[0].name(), "cpu");
        assert!(note.unwrap().contains("no NVIDIA GPU here"));
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
        match (cuda::cuda_available(), cuda::nvidia_gpus_visible_here()) {
            (Err(why), None) => {
                // No NVIDIA GPU here: auto takes the CPU and says why; cuda refuses.
                let (devices, note) = resolve_devices(DeviceChoice::Auto, &v2, false).unwrap();
                assert_eq!(devices.len(), 1);
                assert_eq!(devices[0].name(), "cpu");
                assert!(note.unwrap().contains(&why.to_string()));
                let e = resolve_devices(DeviceChoice::Cuda, &v2, false)
                    .err()
                    .unwrap()
                    .to_string();
                assert!(e.contains("cannot compute on CUDA"), "{e}");
            }
            (Err(why), Some(evidence)) => {
                let e = resolve_devices(DeviceChoice::Auto, &v2, false)
                    .err()
                    .unwrap()
                    .to_string();
                eprintln!("NVIDIA GPUs here ({evidence}) but unusable: {why}");
                assert!(e.contains("--device cpu"), "{e}");
            }
            (Ok(gpus), _) => match resolve_devices(DeviceChoice::Auto, &v2, false) {
                Ok((devices, _)) => {
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
                Err(e) => {
                    eprintln!("GPUs here but not served: {e}");
                    assert!(e.to_string().contains("--device cpu"), "{e}");
                }
            },
        }
    }
}
