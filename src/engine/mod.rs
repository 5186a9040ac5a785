//! Running proof jobs on devices: batches of nonces in, distances and proofs out, one job
//! owning the devices at a time (see [`job`]).

pub mod batch;
pub mod cache;
pub mod device;
pub mod groups;
pub mod job;
pub mod sizer;

pub use device::{CpuDevice, Device};
pub use job::{
    Assignment, BatchReport, Engine, EngineOptions, EngineStatus, GenerateJob, Job, JobControl,
    JobEnd, JobError, JobEvent, JobHandle, ModelSpec, RangeJob, StopReason, SubmitError,
};
pub mod cuda_device;
