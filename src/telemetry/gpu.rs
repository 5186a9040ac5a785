//! GPU readings through NVML, which nvml-wrapper loads at run time. Without the library, or
//! without a GPU, every query gives an empty list: a machine without NVIDIA's driver runs
//! the server and the bench as well, only without GPU figures.

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set to `0`, `off` or `false` to leave NVML alone (no library is loaded).
pub const DISABLE_ENV: &str = "LLAMA_POW_NVML";

/// One GPU at one moment. A reading the GPU or its driver does not support is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub power_watts: Option<f64>,
    pub temperature_celsius: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub graphics_clock_mhz: Option<u32>,
}

struct Inner {
    nvml: Option<Nvml>,
    /// Why there is no NVML.
    unavailable: Option<String>,
    last: Mutex<Option<(Instant, Vec<GpuSample>)>>,
}

/// NVML, if it could be loaded. Cheap to clone and shareable across threads.
#[derive(Clone)]
pub struct GpuMonitor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GpuMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMonitor")
            .field("available", &self.available())
            .field("unavailable", &self.inner.unavailable)
            .finish()
    }
}

impl GpuMonitor {
    /// Load NVML from the system's library (unless [`DISABLE_ENV`] says not to).
    pub fn open() -> Self {
        if let Ok(v) = std::env::var(DISABLE_ENV) {
            if matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "off" | "false" | "no"
            ) {
                return Self::unavailable(format!("NVML disabled by {DISABLE_ENV}={v}"));
            }
        }
        Self::from_init(Nvml::init())
    }

    /// Load NVML from the library file at `path`.
    pub fn open_library(path: &std::path::Path) -> Self {
        Self::from_init(Nvml::builder().lib_path(path.as_os_str()).init())
    }

    /// Whatever NVML's initialisation gave.
    pub fn from_init(r: Result<Nvml, NvmlError>) -> Self {
        match r {
            Ok(nvml) => GpuMonitor {
                inner: Arc::new(Inner {
                    nvml: Some(nvml),
                    unavailable: None,
                    last: Mutex::new(None),
                }),
            },
            Err(e) => Self::unavailable(format!("NVML unavailable: {e}")),
        }
    }

    /// A monitor that reports no GPU, for this reason.
    pub fn unavailable(reason: String) -> Self {
        GpuMonitor {
            inner: Arc::new(Inner {
                nvml: None,
                unavailable: Some(reason),
                last: Mutex::new(None),
            }),
        }
    }

    /// Whether NVML was loaded (it may still see no GPU).
    pub fn available(&self) -> bool {
        self.inner.nvml.is_some()
    }

    /// Why NVML could not be used, if it could not.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.inner.unavailable.as_deref()
    }

    /// The driver's version, when NVML is loaded.
    pub fn driver_version(&self) -> Option<String> {
        self.inner.nvml.as_ref()?.sys_driver_version().ok()
    }

    /// The CUDA version the driver supports ("12.4"), when NVML is loaded.
    pub fn cuda_driver_version(&self) -> Option<String> {
        let v = self.inner.nvml.as_ref()?.sys_cuda_driver_version().ok()?;
        Some(format!("{}.{}", v / 1000, (v % 1000) / 10))
    }

    /// Read every GPU now. Empty without NVML or without GPUs; a GPU that cannot be opened
    /// is left out.
    pub fn sample(&self) -> Vec<GpuSample> {
        let Some(nvml) = &self.inner.nvml else {
            return Vec::new();
        };
        let Ok(count) = nvml.device_count() else {
            return Vec::new();
        };
        (0..count)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                let util = d.utilization_rates().ok();
                Some(GpuSample {
                    index: i,
                    name: d.name().unwrap_or_else(|_| format!("GPU {i}")),
                    uuid: d.uuid().ok(),
                    memory_used_bytes: mem.as_ref().map(|m| m.used),
                    memory_total_bytes: mem.as_ref().map(|m| m.total),
                    utilization_gpu_percent: util.as_ref().map(|u| u.gpu),
                    utilization_memory_percent: util.as_ref().map(|u| u.memory),
                    power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                    temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok(),
                    sm_clock_mhz: d.clock_info(Clock::SM).ok(),
                    memory_clock_mhz: d.clock_info(Clock::Memory).ok(),
                    graphics_clock_mhz: d.clock_info(Clock::Graphics).ok(),
                })
            })
            .collect()
    }

    /// The latest readings, taken again when older than `max_age`: /health and /metrics may
    /// be polled often, and each reading costs driver calls.
    pub fn recent(&self, max_age: Duration) -> Vec<GpuSample> {
        if self.inner.nvml.is_none() {
            return Vec::new();
        }
        let mut last = self.inner.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, s)) = last.as_ref() {
            if t.elapsed() <= max_age {
                return s.clone();
            }
        }
        let s = self.sample();
        *last = Some((Instant::now(), s.clone()));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_gives_no_gpu_and_a_reason() {
        let m = GpuMonitor::open_library(std::path::Path::new("/nonexistent/libnvidia-ml.so.1"));
        assert!(!m.available());
        assert!(m.unavailable_reason().unwrap().contains("NVML unavailable"));
        assert!(m.sample().is_empty());
        assert!(m.recent(Duration::from_secs(1)).is_empty());
        assert!(m.driver_version().is_none());
        assert!(m.cuda_driver_version().is_none());
    }

    #[test]
    fn the_system_library_never_panics() {
        // With or without NVIDIA's driver on this machine: a list, possibly empty.
        let m = GpuMonitor::open();
        let s = m.sample();
        assert!(m.available() || s.is_empty());
        for g in &s {
            assert!(!g.name.is_empty());
        }
    }
}
