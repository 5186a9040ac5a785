//! Telemetry: GPU readings through NVML ([`gpu`]), the Prometheus registry that the engine and
//! the HTTP server share ([`metrics`]), peak figures of known GPU models ([`sku`]) and facts
//! about this machine and process ([`system`]). Nothing here knows about HTTP.

pub mod gpu;
pub mod metrics;
pub mod sku;
pub mod system;

pub use gpu::{GpuMonitor, GpuSample};
pub use metrics::{
    cuda_graph_counters, DeviceSelfTest, GraphCounters, GraphCounts, JobState, Metrics,
    SelfTestStatus,
};
