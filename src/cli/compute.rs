//! `llama-pow compute`: distances of `count` consecutive nonces on the CPU backend, or on the
//! first GPU group with `--device cuda` (the distances then come from the GPU's own tail: the
//! way to compare a GPU against the reference nonce by nonce).

use super::devices::{resolve_devices, DeviceChoice};
use crate::backend::batch;
use crate::backend::{Backend, BatchResult, JobSpec};
use crate::pow::request::{ComputeRequest, DEFAULT_BATCH_SIZE};
use std::sync::Arc;

/// Compute every nonce of the request on `device`, in batches of its batch_size.
pub fn run(req: &ComputeRequest, device: DeviceChoice) -> anyhow::Result<BatchResult> {
    let p = &req.proof;
    let (devices, note) = resolve_devices(device, &p.params, false)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    run_on(req, &devices[0])
}

/// [`run`] on a given device.
pub fn run_on(req: &ComputeRequest, device: &Arc<dyn Backend>) -> anyhow::Result<BatchResult> {
    let p = &req.proof;
    device.check(&p.params, req.dtype)?;
    let model = device.build_model(&p.block_hash, &p.params, req.dtype)?;
    let job = JobSpec::new(
        &p.block_hash,
        &p.public_key,
        &p.params,
        req.dtype,
        p.r_target,
    );
    let batch_size = p.batch_size.unwrap_or(DEFAULT_BATCH_SIZE) as usize;
    let nonces: Vec<u64> = req.nonces().collect();
    let mut out = BatchResult::empty();
    for chunk in nonces.chunks(batch_size) {
        let prepared = batch::prepare(&job, chunk.to_vec());
        out.extend(device.run_batch(&model, &job, prepared, true)?);
    }
    Ok(out)
}
