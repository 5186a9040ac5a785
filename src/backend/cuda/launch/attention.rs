//! Launcher of `kernels/attention.cu`: the shared-memory kernel when the device can give it
//! the keys and values of a head, the general one otherwise. The general one keeps the
//! scores of `chunk` positions in shared memory and walks longer rows a chunk at a time in
//! the same order ([`plan`]), so that every seq_len the params allow runs, on every GPU, with
//! the CPU's sums.

use super::{int, kernel};
use crate::backend::cuda::gpu::{storage_bytes, DevView, Elem, Gpu};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Warps and query rows per block of `attention_smem`, as in the kernel.
const SMEM_WARPS: usize = 4;
const SMEM_ROWS: usize = 32;
/// Dynamic shared memory a block gets without opting in.
const DEFAULT_SHARED: usize = 48 * 1024;
/// Shared memory the general kernel declares statically (a maximum per warp and two
/// scalars: 136 bytes), rounded up: what its dynamic part leaves of the device's limit.
const GENERAL_STATIC_SHARED: usize = 1024;

/// Shapes of one attention call (see the kernel's header).
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Query rows per nonce: `seq` (every position) or 1 (the last position only).
    pub q_rows_per_batch: usize,
}

/// Shared memory `attention_smem` needs: keys and values of one head (storage type, padded
/// to 16 bytes), then one query row and one row of scores per warp in f32.
pub fn smem_bytes(seq: usize, head_dim: usize, dtype: Dtype) -> usize {
    let kv = (2 * seq * head_dim * storage_bytes(dtype)).div_ceil(16) * 16;
    kv + SMEM_WARPS * head_dim * 4 + SMEM_WARPS * seq * 4
}

/// How one attention call is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnPlan {
    /// `attention_smem` with this much dynamic shared memory.
    Smem { bytes: usize },
    /// `attention`, the scores of `chunk` positions at a time in `chunk * 4` bytes of dynamic
    /// shared memory (every row in one chunk when `chunk == seq`).
    General { chunk: usize },
}

impl AttnPlan {
    /// Dynamic shared memory of the launch.
    pub fn shared_bytes(self) -> usize {
        match self {
            AttnPlan::Smem { bytes } => bytes,
            AttnPlan::General { chunk } => chunk * 4,
        }
    }
}

/// The launch for `seq` positions of `head_dim` on a device whose blocks may opt in to
/// `max_shared_optin` bytes of shared memory (0 when it reports none): the shared-memory
/// kernel when a head's keys and values fit, else the general kernel with as many scores in
/// shared memory as fit, up to the whole row.
pub fn plan(seq: usize, head_dim: usize, dtype: Dtype, max_shared_optin: usize) -> AttnPlan {
    let limit = DEFAULT_SHARED.max(max_shared_optin);
    let smem = smem_bytes(seq, head_dim, dtype);
    if smem <= limit {
        return AttnPlan::Smem { bytes: smem };
    }
    let chunk = ((limit - GENERAL_STATIC_SHARED) / 4).min(seq).max(1);
    AttnPlan::General { chunk }
}

/// Causal attention of `q` (rotated) against `k` / `v` into `out` (the layout of q).
pub(crate) fn attention(
    gpu: &Gpu,
    dtype: Dtype,
    q: DevView<'_>,
    k: DevView<'_>,
    v: DevView<'_>,
    out: DevView<'_>,
    sh: AttnShape,
) -> Result<(), BackendError> {
    if sh.batch == 0 || sh.q_rows_per_batch == 0 {
        return Ok(());
    }
    let t = Elem::storage(dtype);
    let q_values = sh.batch * sh.q_rows_per_batch * sh.n_heads * sh.head_dim;
    let kv_values = sh.batch * sh.seq * sh.n_kv_heads * sh.head_dim;
    let q = q.check(gpu, "attention q", t, q_values)?;
    let k = k.check(gpu, "attention k", t, kv_values)?;
    let v = v.check(gpu, "attention v", t, kv_values)?;
    let out = out.check(gpu, "attention out", t, q_values)?;
    let (seq, n_heads) = (int("seq_len", sh.seq)?, int("n_heads", sh.n_heads)?);
    let n_kv = int("n_kv_heads", sh.n_kv_heads)?;
    let hd = int("head_dim", sh.head_dim)?;
    let qr = int("query rows", sh.q_rows_per_batch)?;
    let grid = |what: &str, v: usize| {
        u32::try_from(v).map_err(|_| {
            BackendError::Unsupported(format!("{what} = {v} is too large for one launch"))
        })
    };
    // The reference divides by the Python float sqrt(head_dim), converted to f32.
    let scale = (sh.head_dim as f64).sqrt() as f32;
    let launch = plan(sh.seq, sh.head_dim, dtype, gpu.max_shared_optin);
    let shared = launch.shared_bytes();
    let (name, cfg) = match launch {
        AttnPlan::Smem { .. } => (
            "attention_smem",
            LaunchConfig {
                grid_dim: (
                    grid("batch * n_heads", sh.batch * sh.n_heads)?,
                    grid("query blocks", sh.q_rows_per_batch.div_ceil(SMEM_ROWS))?,
                    1,
                ),
                block_dim: (32 * SMEM_WARPS as u32, 1, 1),
                shared_mem_bytes: shared as u32,
            },
        ),
        AttnPlan::General { .. } => (
            "attention",
            LaunchConfig {
                grid_dim: (
                    grid("batch * query rows", sh.batch * sh.q_rows_per_batch)?,
                    grid("n_heads", sh.n_heads)?,
                    1,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: shared as u32,
            },
        ),
    };
    let f = kernel(gpu, name, dtype)?;
    if shared > DEFAULT_SHARED {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .map_err(|e| {
            gpu.err(
                &format!("raising {name}'s shared memory to {shared} bytes"),
                e,
            )
        })?;
    }
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&q)
        .arg(&k)
        .arg(&v)
        .arg(&out)
        .arg(&seq)
        .arg(&n_heads)
        .arg(&n_kv)
        .arg(&hd)
        .arg(&qr)
        .arg(&scale);
    let chunk = match launch {
        AttnPlan::General { chunk } => Some(int("chunk", chunk)?),
        AttnPlan::Smem { .. } => None,
    };
    if let Some(chunk) = &chunk {
        a.arg(chunk);
    }
    // SAFETY: both kernels take (const S* q, const S* k, const S* v, S* out, int seq,
    // int n_heads, int n_kv_heads, int head_dim, int q_rows_per_batch, float scale), the
    // general one then `int chunk`, in this order, as pushed above; q and out hold batch *
    // q_rows_per_batch rows of n_heads * head_dim values, k and v batch * seq rows of
    // n_kv_heads * head_dim, on this GPU (checked above); the dynamic shared memory is what
    // the chosen kernel's header asks for (`chunk * 4` bytes for the general one, which
    // never holds more than chunk scores), within the limit the function was raised to.
    unsafe { gpu.run(&mut a, name, cfg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opt-in limits per block: Ampere A100 (sm_80), Ada (sm_89), Hopper (sm_90).
    const A100: usize = 163 * 1024;
    const ADA: usize = 99 * 1024;
    const HOPPER: usize = 227 * 1024;

    #[test]
    fn every_seq_len_has_a_launch_and_long_rows_are_chunked() {
        // PARAMS_V2 takes the shared-memory kernel everywhere, even without opting in.
        for limit in [0, ADA, A100, HOPPER] {
            assert!(matches!(
                plan(256, 28, Dtype::F16, limit),
                AttnPlan::Smem { bytes } if bytes <= DEFAULT_SHARED
            ));
        }
        // The longest seq_len the params allow: whole rows in shared memory on Hopper and
        // A100 (opted in), two chunks on Ada, three without opting in.
        let max = crate::pow::params::limits::MAX_SEQ_LEN as usize;
        for (limit, chunks) in [(HOPPER, 1), (A100, 1), (ADA, 2), (0, 3)] {
            let p = plan(max, 128, Dtype::F16, limit);
            let AttnPlan::General { chunk } = p else {
                panic!("{p:?}");
            };
            assert_eq!(max.div_ceil(chunk), chunks, "limit {limit}");
            assert!(p.shared_bytes() + GENERAL_STATIC_SHARED <= limit.max(DEFAULT_SHARED));
        }
        // A row that no longer fits without opting in: the old fixed seq * 4 bytes failed
        // at launch from here on.
        let p = plan(12_300, 128, Dtype::F16, 0);
        assert!(
            matches!(p, AttnPlan::General { chunk } if chunk < 12_300),
            "{p:?}"
        );
        // Short rows never take more shared memory than the row.
        let p = plan(40, 4096, Dtype::F32, 0);
        assert_eq!(p, AttnPlan::General { chunk: 40 });
    }

    #[test]
    fn shared_memory_of_v2_fits_without_opting_in() {
        // PARAMS_V2: seq 256, head_dim 28.
        let f16 = smem_bytes(256, 28, Dtype::F16);
        assert_eq!(f16, 28672 + 4 * 28 * 4 + 4 * 256 * 4);
        assert!(f16 <= DEFAULT_SHARED);
        assert!(smem_bytes(256, 28, Dtype::F32) > DEFAULT_SHARED);
        // Padding keeps the f32 part 16-byte aligned for odd sizes.
        assert_eq!(smem_bytes(3, 6, Dtype::F16) % 4, 0);
        assert_eq!((2 * 3 * 6 * 2usize).div_ceil(16) * 16, 80);
    }
}
