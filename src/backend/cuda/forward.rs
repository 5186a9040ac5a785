//! The forward pass on a GPU group, step for step the CPU backend's
//! ([`crate::backend::cpu`]): the same functions under the same names (`rmsnorm`, `linear`,
//! `attention`, `silu_mul`, `add_round`, `ffn_block`, `block`), the same rounding points,
//! and the same shortcut in the last layer (keys and values of every position, everything
//! else for the last position only). The CPU module is the readable reference; this one
//! queues the same steps on a stream.
//!
//! Then the tail: logits gathered by each nonce's permutation, normalised, the distance to
//! the target and the r_target filter, all on the device, so that only the proofs' indices
//! and distances (or every distance, when asked) come back.

use super::gemm::GemmShape;
use super::gpu::Gpu;
use super::launch::attention::AttnShape;
use super::launch::{attention as att, elementwise, fp8, rmsnorm as norm, rope as rot, tail};
use super::model::{GpuLayer, GpuModel, Stage, StageScratch, Weight};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;

/// Model sizes as usize.
#[derive(Clone, Copy)]
struct Dims {
    dim: usize,
    seq: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    hidden: usize,
    vocab: usize,
    eps: f32,
}

impl Dims {
    fn of(p: &Params) -> Self {
        Dims {
            dim: p.dim_usize(),
            seq: p.seq_len_usize(),
            n_heads: p.n_heads_usize(),
            n_kv_heads: p.n_kv_heads_usize(),
            hd: p.head_dim(),
            hidden: p.ffn_hidden(),
            vocab: p.vocab_usize(),
            eps: p.norm_eps as f32,
        }
    }
}

/// `dst[m, n] = round_T(x[m, k] . w[n, k]^T)` through cuBLASLt; row `i` of `x` starts
/// `x_stride` values after row `i - 1`. An FP8 weight takes its input quantised to E4M3
/// first (one scale for the whole input), then the FP8 product.
#[allow(clippy::too_many_arguments)]
fn linear(
    gpu: &Gpu,
    dtype: Dtype,
    dst: u64,
    x: u64,
    m: usize,
    x_stride: usize,
    k: usize,
    w: &Weight,
    n: usize,
    s: &StageScratch,
) -> Result<(), BackendError> {
    linear_amax(gpu, dtype, dst, x, m, x_stride, k, w, n, s, false)
}

/// [`linear`]; with `amax_known`, an FP8 weight's input already has its largest magnitude in
/// the scratch's `amax` (the kernel that wrote the input found it), so quantising it takes
/// one pass instead of two.
#[allow(clippy::too_many_arguments)]
fn linear_amax(
    gpu: &Gpu,
    dtype: Dtype,
    dst: u64,
    x: u64,
    m: usize,
    x_stride: usize,
    k: usize,
    w: &Weight,
    n: usize,
    s: &StageScratch,
    amax_known: bool,
) -> Result<(), BackendError> {
    match w {
        Weight::Dense(w) => linear_dense(gpu, dtype, dst, x, m, x_stride, k, w.ptr(), n),
        Weight::Fp8 { data, scale } => {
            if m == 0 || n == 0 {
                return Ok(());
            }
            let q = s
                .fp8
                .as_ref()
                .expect("an FP8 model's scratch has the quantisation buffers");
            fp8::quantize_e4m3(
                gpu,
                dtype,
                x,
                m,
                k,
                x_stride,
                q.amax.ptr(),
                amax_known,
                q.x8.ptr(),
                q.x_scale.ptr(),
            )?;
            let shape = GemmShape {
                dtype,
                m,
                n,
                k,
                x_stride: k,
            };
            // SAFETY: x8 holds the m * k quantised inputs just written (the scratch has room
            // for the widest input), data the [n, k] E4M3 weight, the scales one f32 each,
            // dst m * n values of the dtype; all on this GPU, alive until the stream is
            // synchronised at the end of the batch.
            unsafe {
                gpu.gemm.linear_fp8(
                    shape,
                    dst,
                    q.x8.ptr(),
                    data.ptr(),
                    q.x_scale.ptr(),
                    scale.ptr(),
                )
            }
            .map_err(|e| BackendError::Device(e.to_string()))
        }
    }
}

/// [`linear`] with a weight in the model dtype.
#[allow(clippy::too_many_arguments)]
fn linear_dense(
    gpu: &Gpu,
    dtype: Dtype,
    dst: u64,
    x: u64,
    m: usize,
    x_stride: usize,
    k: usize,
    w: u64,
    n: usize,
) -> Result<(), BackendError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let shape = GemmShape {
        dtype,
        m,
        n,
        k,
        x_stride,
    };
    // SAFETY: the callers pass buffers of this GPU sized for the shape: dst holds m * n
    // values, x (m - 1) * x_stride + k, w n * k (a [n, k] weight), all of the dtype, and dst
    // is a scratch buffer distinct from both inputs.
    unsafe { gpu.gemm.linear(shape, dst, x, w) }.map_err(|e| BackendError::Device(e.to_string()))
}

/// `x = x + FFN(RMSNorm_f(x))` on `rows` rows at `x`.
fn ffn_block(
    gpu: &Gpu,
    dtype: Dtype,
    x: u64,
    rows: usize,
    lw: &GpuLayer,
    s: &StageScratch,
    d: Dims,
) -> Result<(), BackendError> {
    let (dim, hidden) = (d.dim, d.hidden);
    norm::rmsnorm(
        gpu,
        dtype,
        x,
        lw.ffn_norm.ptr(),
        s.xn.ptr(),
        rows,
        dim,
        d.eps,
    )?;
    linear(
        gpu,
        dtype,
        s.h1.ptr(),
        s.xn.ptr(),
        rows,
        dim,
        dim,
        &lw.w1,
        hidden,
        s,
    )?;
    linear(
        gpu,
        dtype,
        s.h3.ptr(),
        s.xn.ptr(),
        rows,
        dim,
        dim,
        &lw.w3,
        hidden,
        s,
    )?;
    // In FP8 the product below quantises its input: find the input's largest magnitude
    // while writing it, which spares a pass over the widest activation of the block.
    let fused = match (&lw.w2, &s.fp8) {
        (Weight::Fp8 { .. }, Some(q)) => {
            elementwise::silu_mul_amax(
                gpu,
                dtype,
                s.h1.ptr(),
                s.h3.ptr(),
                rows * hidden,
                q.amax.ptr(),
            )?;
            true
        }
        _ => {
            elementwise::silu_mul(gpu, dtype, s.h1.ptr(), s.h3.ptr(), rows * hidden)?;
            false
        }
    };
    linear_amax(
        gpu,
        dtype,
        s.tmp.ptr(),
        s.h1.ptr(),
        rows,
        hidden,
        hidden,
        &lw.w2,
        dim,
        s,
        fused,
    )?;
    elementwise::add(gpu, dtype, x, s.tmp.ptr(), rows * dim)
}

/// One transformer block on the residual `s.x` (`batch * seq` rows). When `last`, only each
/// nonce's last position is carried on, in `s.xl` (`batch` rows). Returns where the
/// residual is after the block.
#[allow(clippy::too_many_arguments)]
fn block(
    stage: &Stage,
    dtype: Dtype,
    batch: usize,
    lw: &GpuLayer,
    s: &StageScratch,
    d: Dims,
    last: bool,
) -> Result<u64, BackendError> {
    let gpu = &*stage.gpu;
    let Dims {
        dim,
        seq,
        n_heads,
        n_kv_heads,
        hd,
        ..
    } = d;
    let m = batch * seq;
    let q_width = n_heads * hd;
    let kv_width = n_kv_heads * hd;
    let (cos, sin) = (stage.rope_cos.ptr(), stage.rope_sin.ptr());
    norm::rmsnorm(
        gpu,
        dtype,
        s.x.ptr(),
        lw.attention_norm.ptr(),
        s.xn.ptr(),
        m,
        dim,
        d.eps,
    )?;
    linear(
        gpu,
        dtype,
        s.k.ptr(),
        s.xn.ptr(),
        m,
        dim,
        dim,
        &lw.wk,
        kv_width,
        s,
    )?;
    linear(
        gpu,
        dtype,
        s.v.ptr(),
        s.xn.ptr(),
        m,
        dim,
        dim,
        &lw.wv,
        kv_width,
        s,
    )?;
    rot::rope(gpu, dtype, s.k.ptr(), cos, sin, m, kv_width, hd, seq, 0)?;
    let qr = if last { 1 } else { seq };
    let mq = batch * qr;
    if last {
        // Row b of the product is the last position of nonce b: rows `seq * dim` apart.
        let x_last = s.xn.at((seq - 1) * dim);
        linear(
            gpu,
            dtype,
            s.q.ptr(),
            x_last,
            batch,
            seq * dim,
            dim,
            &lw.wq,
            q_width,
            s,
        )?;
    } else {
        linear(
            gpu,
            dtype,
            s.q.ptr(),
            s.xn.ptr(),
            m,
            dim,
            dim,
            &lw.wq,
            q_width,
            s,
        )?;
    }
    rot::rope(
        gpu,
        dtype,
        s.q.ptr(),
        cos,
        sin,
        mq,
        q_width,
        hd,
        qr,
        seq - qr,
    )?;
    let shape = AttnShape {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim: hd,
        q_rows_per_batch: qr,
    };
    att::attention(
        gpu,
        dtype,
        s.q.ptr(),
        s.k.ptr(),
        s.v.ptr(),
        s.att.ptr(),
        shape,
    )?;
    linear(
        gpu,
        dtype,
        s.tmp.ptr(),
        s.att.ptr(),
        mq,
        q_width,
        q_width,
        &lw.wo,
        dim,
        s,
    )?;
    let x = if last {
        elementwise::gather_rows(
            gpu,
            dtype,
            s.x.at((seq - 1) * dim),
            s.xl.ptr(),
            batch,
            dim,
            seq * dim,
        )?;
        s.xl.ptr()
    } else {
        s.x.ptr()
    };
    elementwise::add(gpu, dtype, x, s.tmp.ptr(), mq * dim)?;
    ffn_block(gpu, dtype, x, mq, lw, s, d)?;
    Ok(x)
}

/// Make sure every stage has scratch buffers for `batch` nonces.
pub fn ensure_scratch(
    model: &GpuModel,
    scratch: &mut Vec<StageScratch>,
    batch: usize,
) -> Result<(), BackendError> {
    let n = model.stages.len();
    if scratch.len() == n && scratch.iter().all(|s| s.capacity >= batch) {
        return Ok(());
    }
    // Free the old buffers (and the graphs that use them) before asking for the larger
    // ones, once nothing queued uses them any more.
    for stage in &model.stages {
        stage.gpu.sync()?;
    }
    scratch.clear();
    for stage in &model.stages {
        stage.gpu.sync()?;
    }
    // Grow to the next power of two (when memory allows) rather than to the exact size, so
    // that a batch size ramping up does not pay for an allocation at every step.
    let roomy = batch
        .next_power_of_two()
        .min(model.max_batch_holding(&[]).unwrap_or(batch))
        .max(batch);
    for (i, stage) in model.stages.iter().enumerate() {
        scratch.push(StageScratch::new(
            &stage.gpu,
            &model.params,
            model.dtype,
            roomy,
            i == 0,
            i + 1 == n,
        )?);
    }
    Ok(())
}

/// The forward pass of `batch` nonces' `inputs` (`batch * seq_len * dim` f32 values, exact
/// in the model dtype), leaving the last position's logits in the last stage's
/// `tail.logits` (dtype, `batch * vocab`). The scratch must hold `batch` nonces.
///
/// With `graphs` (and a single GPU), the launch sequence after the inputs' copy is captured
/// once per batch size into a CUDA graph and replayed: one launch instead of a few thousand.
/// A sequence that cannot be captured runs as it is, and is not tried again.
pub fn forward_logits(
    model: &GpuModel,
    scratch: &[StageScratch],
    inputs: &[f32],
    batch: usize,
    graphs: bool,
) -> Result<(), BackendError> {
    let d = Dims::of(&model.params);
    let m = batch * d.seq;
    assert_eq!(
        inputs.len(),
        m * d.dim,
        "inputs must hold batch * seq_len * dim values"
    );
    let first = &model.stages[0];
    let staged = scratch[0]
        .inputs
        .as_ref()
        .expect("the first stage has an input buffer");
    first.gpu.copy_in(inputs, staged, 0)?;
    if graphs && model.stages.len() == 1 {
        replay_or_capture(model, scratch, batch)
    } else {
        queue_forward(model, scratch, batch)
    }
}

/// Launch the captured graph of `batch`, capturing it first when there is none yet.
fn replay_or_capture(
    model: &GpuModel,
    scratch: &[StageScratch],
    batch: usize,
) -> Result<(), BackendError> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let gpu = &*model.stages[0].gpu;
    let mut graphs = scratch[0].graphs.lock().unwrap_or_else(|e| e.into_inner());
    match graphs.get(&batch) {
        Some(Some(g)) => return g.0.launch().map_err(|e| gpu.err("launching the graph", e)),
        Some(None) => return queue_forward(model, scratch, batch),
        None => {}
    }
    gpu.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| gpu.err("starting a graph capture", e))?;
    let queued = queue_forward(model, scratch, batch);
    let captured = gpu.stream.end_capture(CUgraphInstantiate_flags(0));
    match (queued, captured) {
        (Ok(()), Ok(Some(g))) => {
            g.launch().map_err(|e| gpu.err("launching the graph", e))?;
            graphs.insert(batch, Some(SendGraph(g)));
            Ok(())
        }
        (queued, captured) => {
            let why = match (&queued, &captured) {
                (Err(e), _) => e.to_string(),
                (_, Err(e)) => e.to_string(),
                _ => "the capture was empty".to_string(),
            };
            tracing::warn!(
                "{}: batches of {batch} run without a CUDA graph: {why}",
                gpu.info.device_name()
            );
            graphs.insert(batch, None);
            // Nothing captured ran: queue it for real.
            gpu.sync()?;
            queue_forward(model, scratch, batch)
        }
    }
}

/// A captured graph, kept with the scratch buffers whose addresses it holds.
pub struct SendGraph(pub cudarc::driver::CudaGraph);

// SAFETY: a graph is a driver object that may be used from any thread, one at a time; it is
// only ever used under its scratch buffers' mutex (and the model's scratch lock around it).
unsafe impl Send for SendGraph {}

impl std::fmt::Debug for SendGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaGraph")
    }
}

/// Queue the forward pass after the inputs' copy: the inputs into the dtype, every block,
/// the final norm and the output projection.
fn queue_forward(
    model: &GpuModel,
    scratch: &[StageScratch],
    batch: usize,
) -> Result<(), BackendError> {
    let d = Dims::of(&model.params);
    let dtype = model.dtype;
    let m = batch * d.seq;
    let first = &model.stages[0];
    let s0 = &scratch[0];
    let staged = s0
        .inputs
        .as_ref()
        .expect("the first stage has an input buffer");
    elementwise::from_f32(&first.gpu, dtype, staged.ptr(), s0.x.ptr(), m * d.dim)?;
    let n_layers = model.params.n_layers_usize();
    let n_stages = model.stages.len();
    let mut residual = s0.x.ptr();
    for (i, (stage, s)) in model.stages.iter().zip(scratch).enumerate() {
        if i > 0 {
            // The residual moves on to the next GPU of the group.
            let prev = &model.stages[i - 1];
            prev.gpu.sync()?;
            let bytes = m * d.dim * super::gpu::storage_bytes(dtype);
            stage
                .gpu
                .ctx
                .bind_to_thread()
                .map_err(|e| stage.gpu.err("bind", e))?;
            // SAFETY: both buffers hold m * dim values of the dtype (the previous stage's
            // residual, this stage's x); the previous stream is idle (synchronised above)
            // and this stream orders the copy before its next launch.
            unsafe {
                cudarc::driver::result::memcpy_peer_async(
                    stage.gpu.ctx.cu_ctx(),
                    s.x.ptr(),
                    prev.gpu.ctx.cu_ctx(),
                    residual,
                    bytes,
                    stage.gpu.stream.cu_stream(),
                )
            }
            .map_err(|e| stage.gpu.err("copying the residual between GPUs", e))?;
            residual = s.x.ptr();
        }
        for (lw, l) in stage.weights.iter().zip(stage.layers.clone()) {
            residual = block(stage, dtype, batch, lw, s, d, l + 1 == n_layers)?;
        }
        if i + 1 == n_stages {
            let head = stage.head.as_ref().expect("the last stage has the head");
            let t = s
                .tail
                .as_ref()
                .expect("the last stage has the tail buffers");
            let gpu = &*stage.gpu;
            if n_layers == 0 {
                // No layers: keep the last position of each nonce.
                elementwise::gather_rows(
                    gpu,
                    dtype,
                    s.x.at((d.seq - 1) * d.dim),
                    s.xl.ptr(),
                    batch,
                    d.dim,
                    d.seq * d.dim,
                )?;
                residual = s.xl.ptr();
            }
            norm::rmsnorm(
                gpu,
                dtype,
                residual,
                head.norm.ptr(),
                s.xn.ptr(),
                batch,
                d.dim,
                d.eps,
            )?;
            linear_dense(
                gpu,
                dtype,
                t.logits.ptr(),
                s.xn.ptr(),
                batch,
                d.dim,
                d.dim,
                head.output.ptr(),
                d.vocab,
            )?;
        }
    }
    Ok(())
}

/// The logits of the last position as f32, `batch * vocab` values (after
/// [`forward_logits`]).
pub fn logits_to_host(
    model: &GpuModel,
    scratch: &[StageScratch],
    batch: usize,
) -> Result<Vec<f32>, BackendError> {
    let vocab = model.params.vocab_usize();
    let stage = model.stages.last().expect("a model has stages");
    let t = scratch
        .last()
        .and_then(|s| s.tail.as_ref())
        .expect("the last stage has the tail buffers");
    let gpu = &*stage.gpu;
    elementwise::to_f32(
        gpu,
        model.dtype,
        t.logits.ptr(),
        t.logits_f32.ptr(),
        batch * vocab,
    )?;
    let mut out = vec![0f32; batch * vocab];
    gpu.copy_out(&t.logits_f32, 0, &mut out)?;
    Ok(out)
}

/// What the tail hands back.
#[derive(Debug, Clone, PartialEq)]
pub enum TailOutput {
    /// Every nonce's distance, in batch order.
    All(Vec<f64>),
    /// The proofs: (batch index, distance), in batch order.
    Valid(Vec<(usize, f64)>),
}

/// The tail on the last stage (after [`forward_logits`]): gather by `perm` (`batch *
/// vocab` i64, each nonce's permutation), normalise, distance to the target, and either
/// every distance or the r_target filter's survivors back to the host.
pub fn tail_on_device(
    model: &GpuModel,
    scratch: &[StageScratch],
    perm: &[i64],
    batch: usize,
    r_target: f64,
    all_distances: bool,
) -> Result<TailOutput, BackendError> {
    let vocab = model.params.vocab_usize();
    assert_eq!(
        perm.len(),
        batch * vocab,
        "one permutation of vocab per nonce"
    );
    let stage = model.stages.last().expect("a model has stages");
    let head = stage.head.as_ref().expect("the last stage has the head");
    let t = scratch
        .last()
        .and_then(|s| s.tail.as_ref())
        .expect("the last stage has the tail buffers");
    let gpu = &*stage.gpu;
    gpu.copy_in(perm, &t.perm, 0)?;
    tail::gather(
        gpu,
        model.dtype,
        t.logits.ptr(),
        t.perm.ptr(),
        t.o.ptr(),
        batch,
        vocab,
    )?;
    tail::distance(
        gpu,
        t.o.ptr(),
        head.target.ptr(),
        t.dist.ptr(),
        batch,
        vocab,
    )?;
    if all_distances {
        let mut dist = vec![0f64; batch];
        gpu.copy_out(&t.dist, 0, &mut dist)?;
        return Ok(TailOutput::All(dist));
    }
    tail::filter(
        gpu,
        t.dist.ptr(),
        batch,
        r_target,
        t.count.ptr(),
        t.index.ptr(),
        t.valid_dist.ptr(),
    )?;
    let mut count = [0i32; 1];
    gpu.copy_out(&t.count, 0, &mut count)?;
    let n = usize::try_from(count[0])
        .ok()
        .filter(|&n| n <= batch)
        .ok_or_else(|| {
            BackendError::Device(format!("the r_target filter counted {} proofs", count[0]))
        })?;
    let mut index = vec![0i32; n];
    let mut dist = vec![0f64; n];
    gpu.copy_out(&t.index, 0, &mut index)?;
    gpu.copy_out(&t.valid_dist, 0, &mut dist)?;
    let mut out = Vec::with_capacity(n);
    for (i, d) in index.into_iter().zip(dist) {
        let i = usize::try_from(i)
            .ok()
            .filter(|&i| i < batch)
            .ok_or_else(|| BackendError::Device(format!("the filter returned index {i}")))?;
        out.push((i, d));
    }
    Ok(TailOutput::Valid(out))
}
