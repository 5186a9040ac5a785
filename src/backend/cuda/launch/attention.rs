//! Launcher of `kernels/attention.cu`: the shared-memory kernel when the device can give it
//! the keys and values of a head, the general one otherwise.

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
    // The reference divides by the Python float sqrt(head_dim), converted to f32.
    let scale = (sh.head_dim as f64).sqrt() as f32;
    let smem = smem_bytes(sh.seq, sh.head_dim, dtype);
    let fits = smem <= DEFAULT_SHARED.max(gpu.max_shared_optin);
    let (name, f, cfg) = if fits {
        let f = kernel(gpu, "attention_smem", dtype)?;
        if smem > DEFAULT_SHARED {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| gpu.err("raising attention's shared memory", e))?;
        }
        let cfg = LaunchConfig {
            grid_dim: (
                (sh.batch * sh.n_heads) as u32,
                sh.q_rows_per_batch.div_ceil(SMEM_ROWS) as u32,
                1,
            ),
            block_dim: (32 * SMEM_WARPS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        ("attention_smem", f, cfg)
    } else {
        let f = kernel(gpu, "attention", dtype)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (sh.batch * sh.q_rows_per_batch) as u32,
                sh.n_heads as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (sh.seq * 4) as u32,
        };
        ("attention", f, cfg)
    };
    {
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
        // SAFETY: both kernels take (const S* q, const S* k, const S* v, S* out, int seq,
        // int n_heads, int n_kv_heads, int head_dim, int q_rows_per_batch, float scale) in this
        // order; q and out hold batch * q_rows_per_batch rows of n_heads * head_dim values, k
        // and v batch * seq rows of n_kv_heads * head_dim, on this GPU (checked above); the
        // dynamic shared memory is what the chosen kernel's header asks for.
        unsafe { gpu.run(&mut a, name, cfg) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
