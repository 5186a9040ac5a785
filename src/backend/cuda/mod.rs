//! CUDA: device discovery and the kernels compiled for each device at start-up.
//!
//! Everything here goes through cudarc with its libraries loaded at run time, so the crate
//! builds and its tests run on machines with no CUDA toolkit, driver or GPU. cudarc's safe
//! API panics when a library it needs cannot be loaded, so [`cuda_available`] checks that
//! every library the backend needs is present before it calls into any of them, and catches
//! a panic from a library that loads but lacks a symbol: discovery never panics.
//!
//! GPUs are formed into groups ([`groups`], the reference's rule), and each group is one
//! [`CudaBackend`] ([`backend`]): [`gpu`] (a device brought up: context, stream, kernels,
//! cuBLASLt; device buffers), [`launch`] (one launcher module per kernel family), [`gemm`]
//! (the matrix products), [`model`] (weights built on the devices from the pool) and
//! [`forward`] (the CPU backend's steps, queued on the GPU, and the tail; [`graphs`] says
//! when a batch runs as a CUDA graph); [`ceiling`] times
//! cuBLASLt alone on the forward's products for the bench.

pub mod backend;
pub mod ceiling;
pub mod forward;
pub mod gemm;
pub mod gpu;
pub mod graphs;
pub mod groups;
pub mod kernels;
pub mod launch;
pub mod model;

pub use backend::CudaBackend;

use cudarc::driver::{result as drv, CudaContext};
use serde::Serialize;

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    /// The driver's device ordinal (`cuda:N`, the same numbering as NVML's index when
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub ordinal: usize,
    pub name: String,
    /// (major, minor): the architecture the kernels are compiled for, `sm_{major}{minor}`.
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    /// Free memory when discovered (the primary context itself takes a few hundred MiB).
    pub free_bytes: u64,
}

impl GpuInfo {
    /// The device's name for logs and /health: `cuda:N`.
    pub fn device_name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    /// The real architecture NVRTC compiles CUBIN for, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("sm_{major}{minor}")
    }

    /// Total memory in GiB (bytes / 1024^3), the unit of the reference's group sizing.
    pub fn total_gib(&self) -> f64 {
        self.total_bytes as f64 / (1u64 << 30) as f64
    }
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({}, {:.1} GiB, {:.1} GiB free)",
            self.device_name(),
            self.name,
            self.arch(),
            self.total_gib(),
            self.free_bytes as f64 / (1u64 << 30) as f64
        )
    }
}

/// A library the CUDA backend loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaLibrary {
    /// The driver API (`libcuda.so.1`), installed with the NVIDIA driver.
    Driver,
    /// The run-time compiler of the kernels (`libnvrtc.so.13`).
    Nvrtc,
    /// The matrix products (`libcublasLt.so.13`).
    CublasLt,
}

impl CudaLibrary {
    /// Every library the backend needs, in the order they are checked.
    pub const ALL: [CudaLibrary; 3] = [Self::Driver, Self::Nvrtc, Self::CublasLt];

    /// The file name cudarc looks for first on Linux.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Driver => "libcuda.so.1",
            Self::Nvrtc => "libnvrtc.so.13",
            Self::CublasLt => "libcublasLt.so.13",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Self::Driver => "no NVIDIA driver is installed, or it is not visible in this container",
            Self::Nvrtc | Self::CublasLt => {
                "install the CUDA 13 libraries (the NVIDIA pip wheels or a toolkit) and put \
                 their lib folder on LD_LIBRARY_PATH"
            }
        }
    }

    /// Whether the dynamic loader finds the library (under any of the names cudarc tries).
    pub fn is_present(self) -> bool {
        // SAFETY: each of these opens the library with the system's dynamic loader and
        // closes it again; it touches no state of ours. Loading runs the library's own
        // initialisers, which is what any later use of it does as well.
        unsafe {
            match self {
                Self::Driver => cudarc::driver::sys::is_culib_present(),
                Self::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Self::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
            }
        }
    }
}

/// Why the CUDA backend cannot run on this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("{} not found: {}", .0.file_name(), .0.hint())]
    LibraryMissing(CudaLibrary),
    #[error("the CUDA driver failed to initialise: {0}")]
    DriverInit(String),
    #[error("the CUDA driver sees no GPU")]
    NoDevices,
    #[error("cuda:{ordinal} could not be queried: {error}")]
    DeviceQuery { ordinal: usize, error: String },
    #[error("a CUDA library failed while loading: {0}")]
    LoadFailure(String),
}

/// The usable GPUs of this machine, in the driver's order, or why there are none.
///
/// Checks that the driver, NVRTC and cuBLASLt libraries are present first (calling into a
/// missing one would panic inside cudarc), then initialises the driver and queries every
/// device through its primary context (name, compute capability, total and free memory).
/// Never panics.
pub fn cuda_available() -> Result<Vec<GpuInfo>, CudaUnavailable> {
    if let Some(missing) = CudaLibrary::ALL.into_iter().find(|l| !l.is_present()) {
        return Err(CudaUnavailable::LibraryMissing(missing));
    }
    // A library that loads but lacks a symbol the bindings look up (an older driver) makes
    // cudarc panic: report it as a reason, not a crash.
    match std::panic::catch_unwind(query_devices) {
        Ok(r) => r,
        Err(payload) => Err(CudaUnavailable::LoadFailure(panic_message(
            payload.as_ref(),
        ))),
    }
}

/// The text of a panic caught from a CUDA library binding (cudarc panics with a message
/// when a library or symbol is missing).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown failure".into())
}

fn query_devices() -> Result<Vec<GpuInfo>, CudaUnavailable> {
    drv::init().map_err(|e| CudaUnavailable::DriverInit(e.to_string()))?;
    let count = drv::device::get_count().map_err(|e| CudaUnavailable::DriverInit(e.to_string()))?;
    if count <= 0 {
        return Err(CudaUnavailable::NoDevices);
    }
    (0..count as usize).map(query_device).collect()
}

fn query_device(ordinal: usize) -> Result<GpuInfo, CudaUnavailable> {
    let err = |e: cudarc::driver::DriverError| CudaUnavailable::DeviceQuery {
        ordinal,
        error: e.to_string(),
    };
    let ctx = CudaContext::new(ordinal).map_err(err)?;
    let (free, total) = ctx.mem_get_info().map_err(err)?;
    Ok(GpuInfo {
        ordinal,
        name: ctx.name().map_err(err)?,
        compute_capability: ctx.compute_capability().map_err(err)?,
        total_bytes: total as u64,
        free_bytes: free as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_reports_a_reason_or_gpus_without_panicking() {
        match cuda_available() {
            Ok(gpus) => {
                assert!(!gpus.is_empty());
                for g in &gpus {
                    assert!(g.compute_capability.0 >= 5, "{g}");
                    assert!(g.total_bytes >= g.free_bytes, "{g}");
                }
            }
            Err(why) => {
                let text = why.to_string();
                assert!(!text.is_empty());
                eprintln!("CUDA unavailable here: {text}");
            }
        }
    }

    #[test]
    fn unavailable_here_names_the_missing_library() {
        // This check only means something where the driver library is absent (the build
        // machines); where it is present there is nothing to assert.
        if CudaLibrary::Driver.is_present() {
            eprintln!("skipped: the CUDA driver library is present on this machine");
            return;
        }
        let why = cuda_available().unwrap_err();
        assert_eq!(why, CudaUnavailable::LibraryMissing(CudaLibrary::Driver));
        let text = why.to_string();
        assert!(text.contains("libcuda.so.1"), "{text}");
        assert!(text.contains("NVIDIA driver"), "{text}");
    }

    #[test]
    fn gpu_info_names() {
        let g = GpuInfo {
            ordinal: 3,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            total_bytes: 85_520_809_984,
            free_bytes: 84_987_133_952,
        };
        assert_eq!(g.device_name(), "cuda:3");
        assert_eq!(g.arch(), "sm_90");
        assert!((g.total_gib() - 79.647).abs() < 1e-3);
        assert!(g
            .to_string()
            .starts_with("cuda:3 NVIDIA H100 80GB HBM3 (sm_90, 79.6 GiB"));
    }
}
