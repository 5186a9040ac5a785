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
//! when a batch runs as a CUDA graph, [`pipeline`] how a batch crosses a group of several
//! GPUs, [`peer`] how the residual travels between them); [`ceiling`] times
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
pub mod peer;
pub mod pipeline;

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

/// The CUDA version this build's bindings and kernels are made for: the driver must support
/// at least this, and NVRTC and cuBLASLt must be of this major version.
pub const CUDA_MAJOR: i32 = 13;

/// Why the CUDA backend cannot run on this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("{} not found: {}", .0.file_name(), .0.hint())]
    LibraryMissing(CudaLibrary),
    #[error("the CUDA driver failed to initialise: {0}")]
    DriverInit(String),
    #[error("the CUDA driver sees no GPU")]
    NoDevices,
    #[error(
        "the NVIDIA driver supports CUDA {}, and this build needs CUDA {CUDA_MAJOR}.0 or later: \
         install an NVIDIA driver of the R580 branch or newer",
        version_text(*.0)
    )]
    DriverTooOld(i32),
    #[error(
        "{} {found} is loaded, and this build needs {} {CUDA_MAJOR}.x: {}",
        .library.name(), .library.name(), .library.install_hint()
    )]
    LibraryVersion {
        library: CudaLibrary,
        /// The version the loaded library reports, e.g. `12.4`.
        found: String,
    },
    #[error("cuda:{ordinal} could not be queried: {error}")]
    DeviceQuery { ordinal: usize, error: String },
    #[error("a CUDA library failed while loading: {0}")]
    LoadFailure(String),
}

/// `12080` (the driver's `1000 * major + 10 * minor`) as `12.8`.
fn version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

impl CudaLibrary {
    /// The library's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Driver => "the CUDA driver",
            Self::Nvrtc => "NVRTC",
            Self::CublasLt => "cuBLASLt",
        }
    }

    /// What to install for the right version.
    fn install_hint(self) -> &'static str {
        match self {
            Self::Driver => "install an NVIDIA driver of the R580 branch or newer",
            Self::Nvrtc => {
                "install NVIDIA's CUDA 13 NVRTC (pip install nvidia-cuda-nvrtc==13.*, or a \
                 CUDA 13 toolkit) and put its lib folder first on LD_LIBRARY_PATH"
            }
            Self::CublasLt => {
                "install NVIDIA's CUDA 13 cuBLAS (pip install nvidia-cublas==13.*, or a CUDA 13 \
                 toolkit) and put its lib folder first on LD_LIBRARY_PATH"
            }
        }
    }
}

/// What the CUDA driver's initialisation said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInitError {
    pub text: String,
    /// The driver itself reports that there is no GPU (no device, or a stub library that
    /// stands in for a driver on machines without one).
    pub no_gpu: bool,
}

/// What discovery asks of the machine: which CUDA libraries load, their versions, the
/// devices. [`SystemProbe`] asks the real driver and libraries; tests fake it, so that every
/// refusal can be checked on a machine without CUDA.
pub trait CudaProbe {
    /// Whether the dynamic loader finds `library`.
    fn library_present(&self, library: CudaLibrary) -> bool;
    /// Whether the kernel driver's device nodes (`/dev/nvidia0`, ...) exist: NVIDIA GPUs are
    /// attached even when no user-space driver library is visible.
    fn device_nodes_present(&self) -> bool;
    /// How many GPUs the driver sees after initialising (the driver library is present).
    fn driver_device_count(&self) -> Result<usize, DriverInitError>;
    /// The CUDA version the driver supports, `1000 * major + 10 * minor`.
    fn driver_version(&self) -> Result<i32, String>;
    /// The loaded NVRTC's (major, minor).
    fn nvrtc_version(&self) -> Result<(i32, i32), String>;
    /// The loaded cuBLASLt's version, `10000 * major + 100 * minor + patch`.
    fn cublaslt_version(&self) -> Result<usize, String>;
    /// Every one of `count` devices, in the driver's order.
    fn devices(&self, count: usize) -> Result<Vec<GpuInfo>, CudaUnavailable>;
}

/// The usable GPUs `probe` finds, or why there are none. In order: the driver library, its
/// GPUs, the CUDA version it supports, NVRTC and cuBLASLt (present, and of the major version
/// this build is made for: a library of another version is a refusal naming both, never a
/// library used regardless), then each device.
pub fn discover(probe: &dyn CudaProbe) -> Result<Vec<GpuInfo>, CudaUnavailable> {
    if !probe.library_present(CudaLibrary::Driver) {
        return Err(CudaUnavailable::LibraryMissing(CudaLibrary::Driver));
    }
    let count = probe
        .driver_device_count()
        .map_err(|e| CudaUnavailable::DriverInit(e.text))?;
    if count == 0 {
        return Err(CudaUnavailable::NoDevices);
    }
    let driver = probe
        .driver_version()
        .map_err(CudaUnavailable::DriverInit)?;
    if driver < CUDA_MAJOR * 1000 {
        return Err(CudaUnavailable::DriverTooOld(driver));
    }
    for library in [CudaLibrary::Nvrtc, CudaLibrary::CublasLt] {
        if !probe.library_present(library) {
            return Err(CudaUnavailable::LibraryMissing(library));
        }
        let (major, found) = match library {
            CudaLibrary::Nvrtc => {
                let (major, minor) = probe
                    .nvrtc_version()
                    .map_err(CudaUnavailable::LoadFailure)?;
                (major, format!("{major}.{minor}"))
            }
            _ => {
                let v = probe
                    .cublaslt_version()
                    .map_err(CudaUnavailable::LoadFailure)?;
                let major = (v / 10_000) as i32;
                (major, format!("{major}.{}.{}", (v / 100) % 100, v % 100))
            }
        };
        if major != CUDA_MAJOR {
            return Err(CudaUnavailable::LibraryVersion { library, found });
        }
    }
    probe.devices(count)
}

/// What shows that NVIDIA GPUs are attached to this machine, whatever discovery made of them:
/// the kernel driver's device nodes, or a driver library that sees GPUs (or fails to
/// initialise for a reason other than having none). None on a machine without NVIDIA GPUs.
pub fn nvidia_gpus_visible(probe: &dyn CudaProbe) -> Option<String> {
    if probe.device_nodes_present() {
        return Some("/dev/nvidia* device nodes exist".into());
    }
    if !probe.library_present(CudaLibrary::Driver) {
        return None;
    }
    match probe.driver_device_count() {
        Ok(0) => None,
        Ok(n) => Some(format!("the CUDA driver sees {n} GPU(s)")),
        Err(e) if e.no_gpu => None,
        Err(e) => Some(format!(
            "the CUDA driver is installed but fails: {}",
            e.text
        )),
    }
}

/// The machine's own driver and libraries, through cudarc (which panics on a missing library
/// or symbol: [`cuda_available`] catches that).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemProbe;

impl CudaProbe for SystemProbe {
    fn library_present(&self, library: CudaLibrary) -> bool {
        library.is_present()
    }

    fn device_nodes_present(&self) -> bool {
        std::fs::read_dir("/dev").is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.strip_prefix("nvidia")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
        })
    }

    fn driver_device_count(&self) -> Result<usize, DriverInitError> {
        use cudarc::driver::sys::CUresult;
        let fail = |e: cudarc::driver::DriverError| DriverInitError {
            text: e.to_string(),
            no_gpu: matches!(
                e.0,
                CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_STUB_LIBRARY
            ),
        };
        drv::init().map_err(fail)?;
        let n = drv::device::get_count().map_err(fail)?;
        Ok(n.max(0) as usize)
    }

    fn driver_version(&self) -> Result<i32, String> {
        let mut v = 0;
        // SAFETY: the driver library is present (discovery checks it first) and
        // cuDriverGetVersion, in every driver, writes one int to the valid place given.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| e.to_string())?;
        Ok(v)
    }

    fn nvrtc_version(&self) -> Result<(i32, i32), String> {
        kernels::nvrtc_version().ok_or_else(|| "nvrtcVersion failed".to_string())
    }

    fn cublaslt_version(&self) -> Result<usize, String> {
        // SAFETY: the library is present (discovery checks it first); cublasLtGetVersion
        // takes nothing and returns a number.
        Ok(unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() })
    }

    fn devices(&self, count: usize) -> Result<Vec<GpuInfo>, CudaUnavailable> {
        (0..count).map(query_device).collect()
    }
}

/// The usable GPUs of this machine, in the driver's order, or why there are none:
/// [`discover`] with the machine's own driver and libraries. Never panics: a library that
/// loads but lacks a symbol the bindings look up (cudarc panics then) is reported as a
/// reason.
pub fn cuda_available() -> Result<Vec<GpuInfo>, CudaUnavailable> {
    match std::panic::catch_unwind(|| discover(&SystemProbe)) {
        Ok(r) => r,
        Err(payload) => Err(CudaUnavailable::LoadFailure(panic_message(
            payload.as_ref(),
        ))),
    }
}

/// [`nvidia_gpus_visible`] on this machine, never panicking.
pub fn nvidia_gpus_visible_here() -> Option<String> {
    std::panic::catch_unwind(|| nvidia_gpus_visible(&SystemProbe)).unwrap_or_else(|payload| {
        Some(format!(
            "the CUDA driver panicked: {}",
            panic_message(payload.as_ref())
        ))
    })
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
pub(crate) mod tests {
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

    /// A machine as discovery sees it.
    #[derive(Clone)]
    pub(crate) struct FakeProbe {
        pub missing: Vec<CudaLibrary>,
        pub device_nodes: bool,
        pub count: Result<usize, DriverInitError>,
        pub driver: i32,
        pub nvrtc: (i32, i32),
        pub cublaslt: usize,
        pub gpus: Vec<GpuInfo>,
    }

    impl FakeProbe {
        /// A host with `gpus`, a CUDA 13.0 driver and the 13.0 libraries.
        pub(crate) fn with_gpus(gpus: Vec<GpuInfo>) -> Self {
            FakeProbe {
                missing: Vec::new(),
                device_nodes: true,
                count: Ok(gpus.len()),
                driver: 13000,
                nvrtc: (13, 0),
                cublaslt: 130_001,
                gpus,
            }
        }

        /// A machine without NVIDIA hardware or software (like the build machines).
        pub(crate) fn without_nvidia() -> Self {
            FakeProbe {
                missing: CudaLibrary::ALL.to_vec(),
                device_nodes: false,
                count: Ok(0),
                ..Self::with_gpus(Vec::new())
            }
        }
    }

    impl CudaProbe for FakeProbe {
        fn library_present(&self, library: CudaLibrary) -> bool {
            !self.missing.contains(&library)
        }
        fn device_nodes_present(&self) -> bool {
            self.device_nodes
        }
        fn driver_device_count(&self) -> Result<usize, DriverInitError> {
            assert!(
                self.library_present(CudaLibrary::Driver),
                "driver called without it"
            );
            self.count.clone()
        }
        fn driver_version(&self) -> Result<i32, String> {
            Ok(self.driver)
        }
        fn nvrtc_version(&self) -> Result<(i32, i32), String> {
            assert!(
                self.library_present(CudaLibrary::Nvrtc),
                "NVRTC called without it"
            );
            Ok(self.nvrtc)
        }
        fn cublaslt_version(&self) -> Result<usize, String> {
            assert!(
                self.library_present(CudaLibrary::CublasLt),
                "cuBLASLt called without it"
            );
            Ok(self.cublaslt)
        }
        fn devices(&self, count: usize) -> Result<Vec<GpuInfo>, CudaUnavailable> {
            assert_eq!(count, self.gpus.len());
            Ok(self.gpus.clone())
        }
    }

    pub(crate) fn h100(ordinal: usize) -> GpuInfo {
        GpuInfo {
            ordinal,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            total_bytes: 85_520_809_984,
            free_bytes: 84_987_133_952,
        }
    }

    #[test]
    fn discovery_checks_the_driver_and_library_versions() {
        let ok = FakeProbe::with_gpus(vec![h100(0), h100(1)]);
        assert_eq!(discover(&ok).unwrap(), vec![h100(0), h100(1)]);
        // A CUDA 12.8 driver: refused, naming its version, the one needed, what to install.
        let old = FakeProbe {
            driver: 12080,
            ..ok.clone()
        };
        let e = discover(&old).unwrap_err();
        assert_eq!(e, CudaUnavailable::DriverTooOld(12080));
        let text = e.to_string();
        assert!(
            text.contains("supports CUDA 12.8")
                && text.contains("needs CUDA 13.0")
                && text.contains("R580"),
            "{text}"
        );
        // Newer drivers run older CUDA: 13.1 and 14.0 are fine.
        for driver in [13010, 14000] {
            assert!(discover(&FakeProbe {
                driver,
                ..ok.clone()
            })
            .is_ok());
        }
        // NVRTC 12.4 found first on the library path (an unversioned libnvrtc.so of a CUDA 12
        // toolkit, say): refused with both versions.
        let nvrtc12 = FakeProbe {
            nvrtc: (12, 4),
            ..ok.clone()
        };
        let text = discover(&nvrtc12).unwrap_err().to_string();
        assert!(
            text.starts_with("NVRTC 12.4 is loaded, and this build needs NVRTC 13.x: install"),
            "{text}"
        );
        assert!(text.contains("nvidia-cuda-nvrtc==13"), "{text}");
        let lt12 = FakeProbe {
            cublaslt: 120_803,
            ..ok.clone()
        };
        let text = discover(&lt12).unwrap_err().to_string();
        assert!(
            text.starts_with("cuBLASLt 12.8.3 is loaded, and this build needs cuBLASLt 13.x"),
            "{text}"
        );
        // Missing libraries, in the order checked.
        let no_lt = FakeProbe {
            missing: vec![CudaLibrary::CublasLt],
            ..ok.clone()
        };
        assert_eq!(
            discover(&no_lt).unwrap_err(),
            CudaUnavailable::LibraryMissing(CudaLibrary::CublasLt)
        );
        let none = FakeProbe::without_nvidia();
        assert_eq!(
            discover(&none).unwrap_err(),
            CudaUnavailable::LibraryMissing(CudaLibrary::Driver)
        );
        let no_gpu = FakeProbe {
            count: Ok(0),
            ..ok.clone()
        };
        assert_eq!(discover(&no_gpu).unwrap_err(), CudaUnavailable::NoDevices);
    }

    #[test]
    fn nvidia_gpus_are_visible_by_device_nodes_or_the_driver() {
        assert_eq!(nvidia_gpus_visible(&FakeProbe::without_nvidia()), None);
        let nodes_only = FakeProbe {
            device_nodes: true,
            ..FakeProbe::without_nvidia()
        };
        assert!(nvidia_gpus_visible(&nodes_only)
            .unwrap()
            .contains("/dev/nvidia"));
        let driver_sees = FakeProbe {
            device_nodes: false,
            ..FakeProbe::with_gpus(vec![h100(0)])
        };
        assert!(nvidia_gpus_visible(&driver_sees)
            .unwrap()
            .contains("sees 1 GPU"));
        // A stub driver library, or one that reports no device: no GPU.
        let stub = FakeProbe {
            device_nodes: false,
            count: Err(DriverInitError {
                text: "CUDA_ERROR_STUB_LIBRARY".into(),
                no_gpu: true,
            }),
            ..FakeProbe::with_gpus(Vec::new())
        };
        assert_eq!(nvidia_gpus_visible(&stub), None);
        // A driver that fails otherwise (a kernel module of another version): GPUs are there.
        let broken = FakeProbe {
            count: Err(DriverInitError {
                text: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH".into(),
                no_gpu: false,
            }),
            ..stub
        };
        assert!(nvidia_gpus_visible(&broken)
            .unwrap()
            .contains("DRIVER_MISMATCH"));
    }

    #[test]
    fn this_machine_shows_no_nvidia_gpu_when_it_has_no_driver() {
        if CudaLibrary::Driver.is_present() || SystemProbe.device_nodes_present() {
            eprintln!("skipped: NVIDIA software or device nodes are present here");
            return;
        }
        assert_eq!(nvidia_gpus_visible_here(), None);
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
