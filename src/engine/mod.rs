//! Running proof jobs on devices: batches of nonces in, distances and proofs out, one job
//! owning the devices at a time.
//!
//! Three rooms: [`job`] is the vocabulary (what a job is, how it is steered, what it reports),
//! [`scheduler`] runs jobs (preemption, the model cache, one worker thread per device), and
//! [`worker`] is the loop each worker runs (its nonces through one prepare-ahead pipeline).
//! [`sizer`] picks batch sizes, [`cache`] keeps built models, [`signal`] wakes waiting
//! threads, [`heap`] hands the memory of finished jobs back to the system. Devices are
//! [`crate::backend::Backend`]s; nothing here names one.

pub mod cache;
pub mod heap;
pub mod job;
pub mod scheduler;
pub mod signal;
pub mod sizer;
mod worker;

#[cfg(test)]
mod tests;

pub use job::{
    Assignment, BatchReport, GenerateJob, Job, JobControl, JobEnd, JobError, JobEvent, JobHandle,
    ModelSpec, RangeJob, StopReason, SubmitError, ValidateJob,
};
pub use scheduler::{Engine, EngineOptions, EngineStatus};
