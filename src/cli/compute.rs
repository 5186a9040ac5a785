//! `llama-pow compute`: distances of `count` consecutive nonces on the CPU backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::engine::batch::{self, BatchResult, JobSpec};
use crate::pow::request::{ComputeRequest, DEFAULT_BATCH_SIZE};

/// Compute every nonce of the request, in batches of its batch_size.
pub fn run(req: &ComputeRequest) -> anyhow::Result<BatchResult> {
    let p = &req.proof;
    let backend = CpuBackend::new();
    let model = backend.build_model(&p.block_hash, &p.params, req.dtype)?;
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
        out.extend(batch::run(&backend, &model, &job, chunk.to_vec())?);
    }
    Ok(out)
}
