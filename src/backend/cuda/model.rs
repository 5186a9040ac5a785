//! A model resident on a GPU group: the weights of a block hash built on the devices from the
//! pool, the RoPE table, the target vector, and the scratch buffers of the forward pass.
//!
//! The pool (5% of the parameters) is drawn on the host on all threads, exactly as the CPU
//! backend draws it; each GPU of the group receives it in chunks, rounds it to the model
//! dtype on the device, and fills every parameter of its layers with the `weights` kernels.
//! The full model never exists in host memory (PARAMS_V2: a 3.6 GB pool in, 35 GB of
//! weights made on the device).
//!
//! A group of several GPUs splits the layers into consecutive stages, one per GPU; the last
//! one also holds the final norm, the output projection and the tail.

use super::forward::SendGraph;
use super::gpu::{storage_bytes, DevBuf, Elem, Gpu};
use super::graphs::GraphBook;
use super::launch::fp8::E4m3Out;
use super::launch::weights::fill;
use super::launch::{elementwise, fp8};
use crate::backend::cpu::RopeTable;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::pow::proof;
use crate::pow::weights::{self, name_hash, param_specs, ParamKind, ParamSpec, PoolSlice};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// f32 values copied to the device per chunk while the pool is rounded there.
const POOL_CHUNK: usize = 1 << 25;
/// Device memory left free for cuBLASLt's workspace, the driver and fragmentation.
pub const RESERVE_BYTES: u64 = 1 << 30;

/// A linear layer's weight on the device (row-major `[out, in]`): in the model dtype, or,
/// for FP8 products (`use_fp8`), in E4M3 with its per-tensor scale (the largest magnitude
/// over 448), quantised once when the model is built.
#[derive(Debug)]
pub enum Weight {
    Dense(DevBuf),
    Fp8 {
        /// One byte per value.
        data: DevBuf,
        /// One f32 on the device.
        scale: DevBuf,
    },
}

impl Weight {
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(b) => b.bytes(),
            Weight::Fp8 { data, scale } => data.bytes() + scale.bytes(),
        }
    }
}

/// One transformer block's weights on a device.
#[derive(Debug)]
pub struct GpuLayer {
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    pub w1: Weight,
    pub w2: Weight,
    pub w3: Weight,
    pub attention_norm: DevBuf,
    pub ffn_norm: DevBuf,
}

/// What only the last stage holds: the final norm, the output projection, the target.
#[derive(Debug)]
pub struct Head {
    pub norm: DevBuf,
    /// The output projection, always in the model dtype (see [`is_block_linear`]).
    pub output: Weight,
    /// The unit target vector (f64, vocab values).
    pub target: DevBuf,
}

/// The layers one GPU of the group computes.
#[derive(Debug)]
pub struct Stage {
    pub gpu: Arc<Gpu>,
    pub layers: Range<usize>,
    pub weights: Vec<GpuLayer>,
    /// The RoPE table (f32, rounded to the dtype), `seq_len * head_dim / 2` values each.
    pub rope_cos: DevBuf,
    pub rope_sin: DevBuf,
    pub head: Option<Head>,
}

/// A model on a GPU group, ready for batches.
#[derive(Debug)]
pub struct GpuModel {
    pub params: Params,
    pub dtype: Dtype,
    pub block_hash: String,
    pub stages: Vec<Stage>,
    /// Scratch buffers, one set per stage, grown to the largest batch seen, and the CUDA
    /// graphs captured on them. One batch at a time runs on a model (its worker's), the lock
    /// only makes that explicit.
    pub scratch: Mutex<ForwardState>,
}

/// What the forward pass of a model keeps from batch to batch.
#[derive(Debug, Default)]
pub struct ForwardState {
    /// One set per stage (empty until the first batch).
    pub stages: Vec<StageScratch>,
    /// Graphs of the single-GPU launch sequence, per batch size; they hold the scratch
    /// buffers' addresses, so they are dropped before the buffers are reallocated.
    pub graphs: GraphBook<SendGraph>,
    /// Groups of several GPUs: per stage but the last, one event per micro-batch, recorded
    /// when the stage has computed it (see `pipeline.rs`).
    pub events: Vec<Vec<cudarc::driver::CudaEvent>>,
}

/// The consecutive layer ranges of `n_gpus` stages: as equal as possible, the first stages
/// taking one more layer when they do not divide evenly (the last stage also carries the
/// output projection).
pub fn stage_layers(n_layers: usize, n_gpus: usize) -> Vec<Range<usize>> {
    let n = n_gpus.max(1);
    let (per, extra) = (n_layers / n, n_layers % n);
    let mut start = 0;
    (0..n)
        .map(|s| {
            let len = per + usize::from(s < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Whether a parameter is a linear layer's weight of a block (FP8 when `use_fp8`; the
/// output projection stays in the model dtype: it is small, and the logits are what the
/// distance is made of).
fn is_block_linear(kind: ParamKind) -> bool {
    matches!(
        kind,
        ParamKind::Wq
            | ParamKind::Wk
            | ParamKind::Wv
            | ParamKind::Wo
            | ParamKind::W1
            | ParamKind::W2
            | ParamKind::W3
    )
}

/// Bytes of the weights one stage holds.
pub fn stage_weight_bytes(params: &Params, dtype: Dtype, layers: &Range<usize>, last: bool) -> u64 {
    let elem = storage_bytes(dtype) as u64;
    param_specs(params)
        .iter()
        .filter(|s| match s.layer {
            Some(l) => layers.contains(&l),
            None => last && matches!(s.kind, ParamKind::Norm | ParamKind::Output),
        })
        .map(|s| {
            if params.use_fp8 && is_block_linear(s.kind) {
                s.numel() + 4
            } else {
                s.numel() * elem
            }
        })
        .sum()
}

/// The largest block weight's bytes in the model dtype (FP8 weights pass through it once,
/// before quantisation).
fn largest_block_weight_bytes(params: &Params, dtype: Dtype) -> u64 {
    param_specs(params)
        .iter()
        .filter(|s| is_block_linear(s.kind))
        .map(|s| s.numel() * storage_bytes(dtype) as u64)
        .max()
        .unwrap_or(0)
}

/// Device bytes needed while a stage is built: its weights, the pool in the dtype, and the
/// f32 staging chunk.
pub fn stage_build_bytes(params: &Params, dtype: Dtype, layers: &Range<usize>, last: bool) -> u64 {
    let pool = weights::pool_size(weights::total_params(params));
    let elem = storage_bytes(dtype) as u64;
    let staging = if dtype == Dtype::F32 {
        0
    } else {
        (POOL_CHUNK as u64).min(pool) * 4
    };
    let fp8_transit = if params.use_fp8 {
        largest_block_weight_bytes(params, dtype)
    } else {
        0
    };
    stage_weight_bytes(params, dtype, layers, last) + pool * elem + staging + fp8_transit
}

/// Device bytes one nonce of a batch takes in the scratch buffers of a stage: what
/// [`StageScratch::new`] allocates for a capacity of one ([`ScratchSizes`]; the few
/// fixed-size buffers are counted with it).
pub fn scratch_bytes_per_nonce(params: &Params, dtype: Dtype, first: bool, last: bool) -> u64 {
    ScratchSizes::new(params, dtype, 1, first, last).bytes()
}

/// One device buffer's element size and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufSize {
    pub elem: Elem,
    pub len: usize,
}

impl BufSize {
    pub fn bytes(self) -> u64 {
        self.elem.bytes() as u64 * self.len as u64
    }
}

/// The sizes of one stage's scratch buffers for `capacity` nonces: what [`StageScratch::new`]
/// allocates and what the memory check and batch cap count ([`scratch_bytes_per_nonce`]),
/// from this one place so that they cannot disagree.
#[derive(Debug, Clone, Copy)]
pub struct ScratchSizes {
    /// x, xn, tmp (rows of dim), q, att (of q_width), k, v (of kv_width), h1, h3 (hidden):
    /// in the dtype.
    pub x: BufSize,
    pub xn: BufSize,
    pub q: BufSize,
    pub k: BufSize,
    pub v: BufSize,
    pub att: BufSize,
    pub tmp: BufSize,
    pub h1: BufSize,
    pub h3: BufSize,
    /// The compacted last row of each nonce.
    pub xl: BufSize,
    /// First stage: the f32 inputs as they arrive.
    pub inputs: Option<BufSize>,
    /// Last stage: logits (dtype and f32), permutations (i64), gathered o (f32), distances
    /// (f64), the proof count (i32), their indices (i32) and distances (f64).
    pub tail: Option<[BufSize; 8]>,
    /// FP8 models: the quantised activations of the widest product input (one byte each),
    /// their amax and scale (one f32 each).
    pub fp8: Option<[BufSize; 3]>,
}

impl ScratchSizes {
    pub fn new(params: &Params, dtype: Dtype, capacity: usize, first: bool, last: bool) -> Self {
        let m = capacity * params.seq_len_usize();
        let dim = params.dim_usize();
        let hd = params.head_dim();
        let qw = params.n_heads_usize() * hd;
        let kvw = params.n_kv_heads_usize() * hd;
        let hidden = params.ffn_hidden();
        let vocab = params.vocab_usize();
        let t = |len: usize| BufSize {
            elem: Elem::storage(dtype),
            len,
        };
        let b = |elem: Elem, len: usize| BufSize { elem, len };
        ScratchSizes {
            x: t(m * dim),
            xn: t(m * dim),
            q: t(m * qw),
            k: t(m * kvw),
            v: t(m * kvw),
            att: t(m * qw),
            tmp: t(m * dim),
            h1: t(m * hidden),
            h3: t(m * hidden),
            xl: t(capacity * dim),
            inputs: first.then(|| b(Elem::F32, m * dim)),
            tail: last.then(|| {
                [
                    t(capacity * vocab),
                    b(Elem::F32, capacity * vocab),
                    b(Elem::I64, capacity * vocab),
                    b(Elem::F32, capacity * vocab),
                    b(Elem::F64, capacity),
                    b(Elem::I32, 1),
                    b(Elem::I32, capacity),
                    b(Elem::F64, capacity),
                ]
            }),
            fp8: params.use_fp8.then(|| {
                [
                    b(Elem::E4M3, m * dim.max(qw).max(hidden)),
                    b(Elem::U32, 1),
                    b(Elem::F32, 1),
                ]
            }),
        }
    }

    /// Every buffer's bytes, added up.
    pub fn bytes(&self) -> u64 {
        let fixed = [
            self.x, self.xn, self.q, self.k, self.v, self.att, self.tmp, self.h1, self.h3, self.xl,
        ];
        fixed
            .iter()
            .chain(self.inputs.iter())
            .chain(self.tail.iter().flatten())
            .chain(self.fp8.iter().flatten())
            .map(|b| b.bytes())
            .sum()
    }
}

/// Scratch buffers of one stage, for up to `capacity` nonces.
#[derive(Debug)]
pub struct StageScratch {
    pub capacity: usize,
    pub x: DevBuf,
    pub xn: DevBuf,
    pub q: DevBuf,
    pub k: DevBuf,
    pub v: DevBuf,
    pub att: DevBuf,
    pub tmp: DevBuf,
    pub h1: DevBuf,
    pub h3: DevBuf,
    /// The last position of each nonce, carried on from the last layer's attention.
    pub xl: DevBuf,
    /// First stage: the inputs in f32, as they come from the host.
    pub inputs: Option<DevBuf>,
    /// Last stage: the tail's buffers.
    pub tail: Option<TailScratch>,
    /// FP8 models: the quantised activations of a product.
    pub fp8: Option<Fp8Scratch>,
}

/// Where a product's input is quantised to E4M3 (FP8 models).
#[derive(Debug)]
pub struct Fp8Scratch {
    /// The activations in E4M3, one byte each: room for the widest input.
    pub x8: DevBuf,
    /// Their largest magnitude (bits of an f32, one u32) and their scale (one f32).
    pub amax: DevBuf,
    pub x_scale: DevBuf,
}

/// The tail's buffers (last stage).
#[derive(Debug)]
pub struct TailScratch {
    /// Logits in the dtype, `capacity * vocab`.
    pub logits: DevBuf,
    /// Logits as f32 (for callers that want them).
    pub logits_f32: DevBuf,
    /// Permutations, i64.
    pub perm: DevBuf,
    /// Gathered logits, f32.
    pub o: DevBuf,
    /// Distances, f64.
    pub dist: DevBuf,
    /// Number of proofs (one i32), their batch indices (i32) and distances (f64).
    pub count: DevBuf,
    pub index: DevBuf,
    pub valid_dist: DevBuf,
}

impl StageScratch {
    /// Buffers for `capacity` nonces on `gpu`.
    pub fn new(
        gpu: &Gpu,
        params: &Params,
        dtype: Dtype,
        capacity: usize,
        first: bool,
        last: bool,
    ) -> Result<Self, BackendError> {
        let z = ScratchSizes::new(params, dtype, capacity, first, last);
        let a = |b: BufSize| gpu.alloc(b.elem, b.len);
        let tail = match z.tail {
            Some([logits, logits_f32, perm, o, dist, count, index, valid_dist]) => {
                Some(TailScratch {
                    logits: a(logits)?,
                    logits_f32: a(logits_f32)?,
                    perm: a(perm)?,
                    o: a(o)?,
                    dist: a(dist)?,
                    count: a(count)?,
                    index: a(index)?,
                    valid_dist: a(valid_dist)?,
                })
            }
            None => None,
        };
        Ok(StageScratch {
            capacity,
            x: a(z.x)?,
            xn: a(z.xn)?,
            q: a(z.q)?,
            k: a(z.k)?,
            v: a(z.v)?,
            att: a(z.att)?,
            tmp: a(z.tmp)?,
            h1: a(z.h1)?,
            h3: a(z.h3)?,
            xl: a(z.xl)?,
            inputs: z.inputs.map(a).transpose()?,
            tail,
            fp8: match z.fp8 {
                Some([x8, amax, x_scale]) => Some(Fp8Scratch {
                    x8: a(x8)?,
                    amax: a(amax)?,
                    x_scale: a(x_scale)?,
                }),
                None => None,
            },
        })
    }
}

impl GpuModel {
    /// Build the weights of `params` for `block_hash` on `gpus` (one stage each).
    pub fn build(
        gpus: &[Arc<Gpu>],
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
    ) -> Result<Self, BackendError> {
        assert!(!gpus.is_empty(), "a model needs at least one GPU");
        // Never a stage without layers: the last layer must run on the last stage.
        let gpus = &gpus[..gpus.len().min(params.n_layers_usize().max(1))];
        let ranges = stage_layers(params.n_layers_usize(), gpus.len());
        // Refuse before drawing anything when a device cannot hold its stage.
        for (s, (gpu, layers)) in gpus.iter().zip(&ranges).enumerate() {
            let last = s + 1 == gpus.len();
            let need = stage_build_bytes(params, dtype, layers, last) + RESERVE_BYTES;
            // Memory of models just evicted is released at a synchronisation.
            gpu.sync()?;
            let (free, _) = gpu.mem_info()?;
            if need > free {
                return Err(BackendError::OutOfMemory(format!(
                    "cuda:{}: building layers {}..{} of this model in {} needs {:.2} GiB, \
                     {:.2} GiB are free",
                    gpu.ordinal(),
                    layers.start,
                    layers.end,
                    dtype.as_str(),
                    need as f64 / (1u64 << 30) as f64,
                    free as f64 / (1u64 << 30) as f64
                )));
            }
        }
        let psize = weights::pool_size(weights::total_params(params));
        let pool = weights::build_pool(block_hash, psize, dtype);
        let specs: Vec<ParamSpec> = param_specs(params)
            .into_iter()
            .filter(|s| s.kind != ParamKind::TokEmbeddings)
            .collect();
        let rope = RopeTable::new(params, dtype);
        let target = proof::target(block_hash, params.vocab_usize());
        let mut stages = Vec::with_capacity(gpus.len());
        for (s, (gpu, layers)) in gpus.iter().zip(ranges).enumerate() {
            let last = s + 1 == gpus.len();
            stages.push(build_stage(
                gpu,
                block_hash,
                dtype,
                params.use_fp8,
                &pool,
                &specs,
                layers,
                last,
                &rope,
                &target,
            )?);
        }
        let scratch = Mutex::new(ForwardState::default());
        Ok(GpuModel {
            params: params.clone(),
            dtype,
            block_hash: block_hash.to_string(),
            stages,
            scratch,
        })
    }

    /// Device bytes of the weights, over every stage.
    pub fn weight_bytes(&self) -> u64 {
        self.stages
            .iter()
            .map(|s| {
                let layers: usize = s
                    .weights
                    .iter()
                    .map(|l| {
                        [&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3]
                            .iter()
                            .map(|w| w.bytes())
                            .sum::<usize>()
                            + l.attention_norm.bytes()
                            + l.ffn_norm.bytes()
                    })
                    .sum();
                let head = s
                    .head
                    .as_ref()
                    .map_or(0, |h| h.norm.bytes() + h.output.bytes());
                (layers + head) as u64
            })
            .sum()
    }

    /// The largest batch every stage can hold scratch buffers for, from free device memory
    /// (plus what the current scratch buffers already hold).
    pub fn max_batch(&self) -> Result<usize, BackendError> {
        let held: Vec<u64> = {
            let scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            self.stages
                .iter()
                .enumerate()
                .map(|(i, _)| {
                    scratch.stages.get(i).map_or(0, |s| {
                        s.capacity as u64
                            * scratch_bytes_per_nonce(
                                &self.params,
                                self.dtype,
                                i == 0,
                                i + 1 == self.stages.len(),
                            )
                    })
                })
                .collect()
        };
        self.max_batch_holding(&held)
    }

    /// [`GpuModel::max_batch`] when the scratch buffers of stage `i` hold `held[i]` bytes
    /// (none past the slice's end). Takes no lock: for callers that hold the scratch.
    pub fn max_batch_holding(&self, held: &[u64]) -> Result<usize, BackendError> {
        let mut best = usize::MAX;
        for (i, stage) in self.stages.iter().enumerate() {
            let (free, _) = stage.gpu.mem_info()?;
            let per = scratch_bytes_per_nonce(
                &self.params,
                self.dtype,
                i == 0,
                i + 1 == self.stages.len(),
            )
            .max(1);
            let avail = (free + held.get(i).copied().unwrap_or(0)).saturating_sub(RESERVE_BYTES);
            best = best.min((avail / per) as usize);
        }
        Ok(best)
    }
}

/// Build one stage on its GPU: the pool in the dtype, then every parameter of its layers
/// (and the head on the last stage), then the pool is freed.
#[allow(clippy::too_many_arguments)]
fn build_stage(
    gpu: &Arc<Gpu>,
    block_hash: &str,
    dtype: Dtype,
    fp8: bool,
    pool: &[f32],
    specs: &[ParamSpec],
    layers: Range<usize>,
    last: bool,
    rope: &RopeTable,
    target: &[f64],
) -> Result<Stage, BackendError> {
    let dev_pool = upload_pool(gpu, dtype, pool)?;
    let make = |spec: &ParamSpec| -> Result<DevBuf, BackendError> {
        let numel = spec.numel() as usize;
        let buf = gpu.alloc_dtype(dtype, numel)?;
        let slice = PoolSlice::new(
            name_hash(block_hash, &spec.name),
            spec.numel(),
            pool.len() as u64,
        );
        fill(gpu, dtype, dev_pool.view(), slice, buf.view(), numel)?;
        Ok(buf)
    };
    let fp8_amax = if fp8 {
        Some(gpu.alloc(Elem::U32, 1)?)
    } else {
        None
    };
    let linear = |spec: &ParamSpec| -> Result<Weight, BackendError> {
        let dense = make(spec)?;
        let Some(amax) = &fp8_amax else {
            return Ok(Weight::Dense(dense));
        };
        // Quantised from the dtype's values; the dense copy is freed (in stream order,
        // after the quantisation has read it) when it drops here.
        let numel = spec.numel() as usize;
        let data = gpu.alloc(Elem::E4M3, numel)?;
        let scale = gpu.alloc(Elem::F32, 1)?;
        let out = E4m3Out {
            codes: data.view(),
            scale: scale.view(),
            amax: amax.view(),
        };
        fp8::quantize_e4m3(gpu, dtype, dense.view(), 1, numel, numel, false, out)?;
        Ok(Weight::Fp8 { data, scale })
    };
    let mut weights = Vec::with_capacity(layers.len());
    for l in layers.clone() {
        // Nine per layer, in named_parameters() order.
        let of = |kind: ParamKind| {
            specs
                .iter()
                .find(|s| s.layer == Some(l) && s.kind == kind)
                .expect("every layer has its nine parameters")
        };
        weights.push(GpuLayer {
            wq: linear(of(ParamKind::Wq))?,
            wk: linear(of(ParamKind::Wk))?,
            wv: linear(of(ParamKind::Wv))?,
            wo: linear(of(ParamKind::Wo))?,
            w1: linear(of(ParamKind::W1))?,
            w2: linear(of(ParamKind::W2))?,
            w3: linear(of(ParamKind::W3))?,
            attention_norm: make(of(ParamKind::AttentionNorm))?,
            ffn_norm: make(of(ParamKind::FfnNorm))?,
        });
    }
    let head = if last {
        let of = |kind: ParamKind| {
            specs
                .iter()
                .find(|s| s.kind == kind)
                .expect("norm.weight and output.weight exist")
        };
        Some(Head {
            norm: make(of(ParamKind::Norm))?,
            output: Weight::Dense(make(of(ParamKind::Output))?),
            target: gpu.upload(target)?,
        })
    } else {
        None
    };
    let stage = Stage {
        gpu: gpu.clone(),
        layers,
        weights,
        rope_cos: gpu.upload(&rope.cos)?,
        rope_sin: gpu.upload(&rope.sin)?,
        head,
    };
    drop(dev_pool);
    // Surface any failure of the fills now, not in the first batch.
    gpu.sync()?;
    Ok(stage)
}

/// The pool on the device in the model dtype. f32 models take it as it is; f16 / bf16 ones
/// receive it in f32 chunks through one staging buffer and round it there (the values are
/// already exact in the dtype, so the rounding is exact too).
fn upload_pool(gpu: &Gpu, dtype: Dtype, pool: &[f32]) -> Result<DevBuf, BackendError> {
    if dtype == Dtype::F32 {
        return gpu.upload(pool);
    }
    let dev = gpu.alloc_dtype(dtype, pool.len())?;
    let staging = gpu.alloc(Elem::F32, POOL_CHUNK.min(pool.len()).max(1))?;
    for (c, chunk) in pool.chunks(POOL_CHUNK).enumerate() {
        // The copy into the staging buffer is queued after the previous chunk's rounding
        // on the same stream, so reusing it is safe without waiting.
        gpu.copy_in(chunk, staging.view())?;
        let dst = dev.from(c * POOL_CHUNK);
        elementwise::from_f32(gpu, dtype, staging.view(), dst, chunk.len())?;
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_cover_every_layer_in_order() {
        for n_layers in [1usize, 2, 5, 16, 64, 65] {
            for n_gpus in [1usize, 2, 3, 4, 8] {
                let r = stage_layers(n_layers, n_gpus);
                assert_eq!(r.len(), n_gpus);
                assert_eq!(r[0].start, 0);
                assert_eq!(r.last().unwrap().end, n_layers);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
    }

    #[test]
    fn v2_weights_and_scratch_sizes() {
        let p = Params::v2();
        let all = 0..64;
        let bytes = stage_weight_bytes(&p, Dtype::F16, &all, true);
        // Everything but tok_embeddings, two bytes each.
        let total = weights::total_params(&p);
        let emb = (p.vocab_size * p.dim) as u64;
        assert_eq!(bytes, 2 * (total - emb));
        // Split over two GPUs, the stages add up to the whole.
        let r = stage_layers(64, 2);
        let a = stage_weight_bytes(&p, Dtype::F16, &r[0], false);
        let b = stage_weight_bytes(&p, Dtype::F16, &r[1], true);
        assert_eq!(a + b, bytes);
        // About 58 MB of scratch per nonce in f16 (h1 and h3 dominate: 2 x 256 x 49152 x 2).
        let per = scratch_bytes_per_nonce(&p, Dtype::F16, true, true);
        assert!((50_000_000..70_000_000).contains(&per), "{per}");
        // FP8: the seven block weights at one byte each (and a 4-byte scale), the norms and
        // the output projection in f16.
        let mut p8 = p.clone();
        p8.use_fp8 = true;
        let dim = p.dim as u64;
        let vocab = p.vocab_size as u64;
        let norms = 2 * (64 * 2 * dim + dim);
        let output = 2 * vocab * dim;
        let linear = total - emb - (64 * 2 * dim + dim) - vocab * dim;
        assert_eq!(
            stage_weight_bytes(&p8, Dtype::F16, &all, true),
            linear + 64 * 7 * 4 + norms + output
        );
        assert!(scratch_bytes_per_nonce(&p8, Dtype::F16, true, true) > per);
        // The V2 build fits an 80 GB GPU with room for batches.
        let build = stage_build_bytes(&p, Dtype::F16, &all, true);
        assert!(build < 40 * (1u64 << 30), "{build}");
    }
}
