//! The forward pass on a GPU group, step for step the CPU backend's
//! ([`crate::backend::cpu`]): a [`Pass`] holds what the CPU's functions take besides their
//! buffers (the GPU, the dtype, a stage's scratch, the sizes) and has the same steps under the
//! same names (`linear`, `rmsnorm`, `add_round`, `attention`, `silu_mul`, `ffn_block`,
//! `block`), in the same order, with the same rounding points and the same shortcut in the
//! last layer (keys and values of every position, everything else for the last position
//! only). The CPU module is the readable reference; this one queues the same steps on a
//! stream.
//!
//! Then the tail: logits gathered by each nonce's permutation, normalised, the distance to
//! the target and the r_target filter, all on the device, so that only the proofs' indices
//! and distances (or every distance, when asked) come back.

use super::gemm::GemmShape;
use super::gpu::{DevBuf, DevView, Elem, Gpu};
use super::graphs::{GraphStep, GroupGraphCounters};
use super::launch::attention::AttnShape;
use super::launch::fp8::E4m3Out;
use super::launch::tail::FilterOut;
use super::launch::{attention, elementwise, fp8, rmsnorm, rope, tail};
use super::model::{ForwardState, GpuLayer, GpuModel, Head, Stage, StageScratch, Weight};
use super::pipeline::{self, StageStreams};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use cudarc::driver::CudaEvent;
use std::ops::Range;

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

/// One stage's forward steps: its GPU, the model dtype, its scratch buffers and RoPE table,
/// and the model's sizes.
struct Pass<'a> {
    gpu: &'a Gpu,
    dtype: Dtype,
    stage: &'a Stage,
    s: &'a StageScratch,
    d: Dims,
}

impl<'a> Pass<'a> {
    fn new(model: &'a GpuModel, stage: &'a Stage, s: &'a StageScratch) -> Self {
        Pass {
            gpu: &stage.gpu,
            dtype: model.dtype,
            stage,
            s,
            d: Dims::of(&model.params),
        }
    }

    /// `dst[m, n] = round_T(x[m, k] . w[n, k]^T)` through cuBLASLt; row `i` of `x` starts
    /// `x_stride` values after row `i - 1`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        dst: DevView<'_>,
        x: DevView<'_>,
        m: usize,
        x_stride: usize,
        k: usize,
        w: &Weight,
        n: usize,
    ) -> Result<(), BackendError> {
        self.linear_amax(dst, x, m, x_stride, k, w, n, false)
    }

    /// [`Pass::linear`]. An FP8 weight takes its input quantised to E4M3 first (one scale
    /// for the whole input), then the FP8 product; with `amax_known` the input's largest
    /// magnitude is already in the scratch's `amax` (the kernel that wrote the input found
    /// it), so quantising takes one pass instead of two.
    #[allow(clippy::too_many_arguments)]
    fn linear_amax(
        &self,
        dst: DevView<'_>,
        x: DevView<'_>,
        m: usize,
        x_stride: usize,
        k: usize,
        w: &Weight,
        n: usize,
        amax_known: bool,
    ) -> Result<(), BackendError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let gpu = self.gpu;
        let t = Elem::storage(self.dtype);
        let shape = GemmShape {
            dtype: self.dtype,
            m,
            n,
            k,
            x_stride,
        };
        let dst_addr = dst.check(gpu, "linear dst", t, m * n)?;
        let fail = |e: super::gemm::GemmError| BackendError::Device(e.to_string());
        match w {
            Weight::Dense(w) => {
                let x_addr = x.check(gpu, "linear x", t, (m - 1) * x_stride + k)?;
                let w_addr = w.view().check(gpu, "linear w", t, n * k)?;
                disjoint("linear", dst, &[x, w.view()])?;
                // SAFETY: dst, x and w are on this GPU, of the dtype, and hold m * n,
                // (m - 1) * x_stride + k and n * k values (checked above); dst overlaps
                // neither input (checked above); the buffers are freed stream-ordered on this
                // GPU's stream, after the product has run.
                unsafe { gpu.gemm.linear(shape, dst_addr, x_addr, w_addr) }.map_err(fail)
            }
            Weight::Fp8 { data, scale } => {
                let q = self
                    .s
                    .fp8
                    .as_ref()
                    .expect("an FP8 model's scratch has the quantisation buffers");
                let out = E4m3Out {
                    codes: q.x8.view(),
                    scale: q.x_scale.view(),
                    amax: q.amax.view(),
                };
                fp8::quantize_e4m3(gpu, self.dtype, x, m, k, x_stride, amax_known, out)?;
                let shape = GemmShape {
                    x_stride: k,
                    ..shape
                };
                let x8 = q.x8.view().check(gpu, "linear x8", Elem::E4M3, m * k)?;
                let w8 = data.view().check(gpu, "linear w8", Elem::E4M3, n * k)?;
                let x_scale = q.x_scale.view().check(gpu, "x scale", Elem::F32, 1)?;
                let w_scale = scale.view().check(gpu, "w scale", Elem::F32, 1)?;
                // SAFETY: x8 holds the m * k codes just written, w8 the [n, k] E4M3 weight,
                // the scales one f32 each, dst m * n values of the dtype (all checked above),
                // all on this GPU and freed stream-ordered after the product has run; dst is
                // a scratch buffer of the dtype, so it overlaps no E4M3 or f32 buffer.
                unsafe {
                    gpu.gemm
                        .linear_fp8(shape, dst_addr, x8, w8, x_scale, w_scale)
                }
                .map_err(fail)
            }
        }
    }

    /// `out = RMSNorm(x) * weight` on `rows` rows.
    fn rmsnorm(
        &self,
        x: DevView<'_>,
        weight: &DevBuf,
        out: DevView<'_>,
        rows: usize,
    ) -> Result<(), BackendError> {
        let (dim, eps) = (self.d.dim, self.d.eps);
        rmsnorm::rmsnorm(self.gpu, self.dtype, x, weight.view(), out, rows, dim, eps)
    }

    /// `x = round_T(x + y)` over `n` values.
    fn add_round(&self, x: DevView<'_>, y: DevView<'_>, n: usize) -> Result<(), BackendError> {
        elementwise::add(self.gpu, self.dtype, x, y, n)
    }

    /// Rotate `rows` rows of `width` values; row `r` sits at position
    /// `first_pos + r % rows_per_batch` (the CPU's `RopeTable::apply`).
    fn rope(
        &self,
        x: DevView<'_>,
        width: usize,
        rows: usize,
        rows_per_batch: usize,
        first_pos: usize,
    ) -> Result<(), BackendError> {
        let (cos, sin) = (self.stage.rope_cos.view(), self.stage.rope_sin.view());
        let hd = self.d.hd;
        let r = (rows, width, hd, rows_per_batch, first_pos);
        rope::rope(self.gpu, self.dtype, x, cos, sin, r.0, r.1, r.2, r.3, r.4)
    }

    fn attention(
        &self,
        q: DevView<'_>,
        k: DevView<'_>,
        v: DevView<'_>,
        out: DevView<'_>,
        shape: AttnShape,
    ) -> Result<(), BackendError> {
        attention::attention(self.gpu, self.dtype, q, k, v, out, shape)
    }

    /// `a = round_T(round_T(silu(a)) * b)` over `n` values. When the product after it takes
    /// its input in FP8 (`w2` is FP8), the kernel also finds the largest magnitude it
    /// writes, which spares the quantisation a pass over the widest activation of the
    /// block; returns whether it did.
    fn silu_mul(
        &self,
        a: DevView<'_>,
        b: DevView<'_>,
        n: usize,
        w2: &Weight,
    ) -> Result<bool, BackendError> {
        match (w2, &self.s.fp8) {
            (Weight::Fp8 { .. }, Some(q)) => {
                let amax = q.amax.view();
                elementwise::silu_mul_amax(self.gpu, self.dtype, a, b, n, amax)?;
                Ok(true)
            }
            _ => elementwise::silu_mul(self.gpu, self.dtype, a, b, n).map(|()| false),
        }
    }

    /// `x = x + FFN(RMSNorm_f(x))` on `rows` rows.
    fn ffn_block(&self, x: DevView<'_>, rows: usize, lw: &GpuLayer) -> Result<(), BackendError> {
        let (s, dim, hidden) = (self.s, self.d.dim, self.d.hidden);
        let (xn, h1, h3) = (s.xn.view(), s.h1.view(), s.h3.view());
        self.rmsnorm(x, &lw.ffn_norm, xn, rows)?;
        self.linear(h1, xn, rows, dim, dim, &lw.w1, hidden)?;
        self.linear(h3, xn, rows, dim, dim, &lw.w3, hidden)?;
        let amax_known = self.silu_mul(h1, h3, rows * hidden, &lw.w2)?;
        let out = s.tmp.view();
        self.linear_amax(out, h1, rows, hidden, hidden, &lw.w2, dim, amax_known)?;
        self.add_round(x, out, rows * dim)
    }

    /// One transformer block on the residual `x` (`batch * seq` rows). When `last`, only
    /// each nonce's last position is carried on, in `xl` (`batch` rows). Returns where the
    /// residual is after the block.
    fn block(
        &self,
        x: DevView<'a>,
        xl: DevView<'a>,
        batch: usize,
        lw: &GpuLayer,
        last: bool,
    ) -> Result<DevView<'a>, BackendError> {
        let Dims {
            dim,
            seq,
            n_heads,
            n_kv_heads,
            hd,
            ..
        } = self.d;
        let s = self.s;
        let m = batch * seq;
        let q_width = n_heads * hd;
        let kv_width = n_kv_heads * hd;
        let xn = s.xn.view();
        self.rmsnorm(x, &lw.attention_norm, xn, m)?;
        let (k, v) = (s.k.view(), s.v.view());
        self.linear(k, xn, m, dim, dim, &lw.wk, kv_width)?;
        self.linear(v, xn, m, dim, dim, &lw.wv, kv_width)?;
        self.rope(k, kv_width, m, seq, 0)?;
        let qr = if last { 1 } else { seq };
        let mq = batch * qr;
        let q = s.q.view();
        if last {
            // Row b of the product is the last position of nonce b: rows `seq * dim` apart.
            let x_last = xn.from((seq - 1) * dim);
            self.linear(q, x_last, batch, seq * dim, dim, &lw.wq, q_width)?;
        } else {
            self.linear(q, xn, m, dim, dim, &lw.wq, q_width)?;
        }
        self.rope(q, q_width, mq, qr, seq - qr)?;
        let shape = AttnShape {
            batch,
            seq,
            n_heads,
            n_kv_heads,
            head_dim: hd,
            q_rows_per_batch: qr,
        };
        let att = s.att.view();
        self.attention(q, k, v, att, shape)?;
        let proj = s.tmp.view();
        self.linear(proj, att, mq, q_width, q_width, &lw.wo, dim)?;
        let xr = if last {
            // The CPU compacts the last rows in place; here they are gathered into `xl`.
            let last_rows = x.from((seq - 1) * dim);
            elementwise::gather_rows(self.gpu, self.dtype, last_rows, xl, batch, dim, seq * dim)?;
            xl
        } else {
            x
        };
        self.add_round(xr, proj, mq * dim)?;
        self.ffn_block(xr, mq, lw)?;
        Ok(xr)
    }

    /// The final norm and the output projection of the `batch` last positions in
    /// `residual`, into `logits` (`batch * vocab` values of the dtype).
    fn head(
        &self,
        residual: DevView<'_>,
        batch: usize,
        head: &Head,
        logits: DevView<'_>,
    ) -> Result<(), BackendError> {
        let (dim, vocab) = (self.d.dim, self.d.vocab);
        let xn = self.s.xn.view();
        self.rmsnorm(residual, &head.norm, xn, batch)?;
        self.linear(logits, xn, batch, dim, dim, &head.output, vocab)
    }
}

/// An error unless `dst` shares no byte with any of `inputs` (a product or kernel that
/// reads what it writes would read half-written values).
fn disjoint(what: &str, dst: DevView<'_>, inputs: &[DevView<'_>]) -> Result<(), BackendError> {
    match inputs.iter().find(|x| !dst.is_disjoint(x)) {
        None => Ok(()),
        Some(x) => Err(BackendError::Device(format!(
            "internal: {what} writes {dst:?}, which overlaps its input {x:?}"
        ))),
    }
}

/// Make sure every stage has scratch buffers for `batch` nonces. Reallocating them drops
/// the graphs captured on the old ones (counted in `counters`).
pub fn ensure_scratch(
    model: &GpuModel,
    state: &mut ForwardState,
    batch: usize,
    counters: &GroupGraphCounters,
) -> Result<(), BackendError> {
    let n = model.stages.len();
    if state.stages.len() == n && state.stages.iter().all(|s| s.capacity >= batch) {
        return Ok(());
    }
    // Free the old buffers (and the graphs that use them) before asking for the larger
    // ones, once nothing queued uses them any more.
    for stage in &model.stages {
        stage.gpu.sync()?;
    }
    counters.dropped(state.graphs.drop_graphs());
    state.stages.clear();
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
        state.stages.push(StageScratch::new(
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
/// With `graphs` (and a single GPU), the launch sequence after the inputs' copy runs as a
/// CUDA graph where [`GraphBook`](super::graphs::GraphBook) says so: directly the first time
/// a batch size comes, captured the second, replayed after that.
pub fn forward_logits(
    model: &GpuModel,
    state: &mut ForwardState,
    inputs: &[f32],
    batch: usize,
    graphs: Option<&GroupGraphCounters>,
) -> Result<(), BackendError> {
    let d = Dims::of(&model.params);
    let m = batch * d.seq;
    assert_eq!(
        inputs.len(),
        m * d.dim,
        "inputs must hold batch * seq_len * dim values"
    );
    let first = &model.stages[0];
    let staged = state.stages[0]
        .inputs
        .as_ref()
        .expect("the first stage has an input buffer");
    first.gpu.copy_in(inputs, staged.view())?;
    match graphs {
        Some(counters) if model.stages.len() == 1 => run_with_graphs(model, state, batch, counters),
        _ => {
            let n_micro = pipeline::micro_batches(batch, model.stages.len()).len();
            ensure_events(model, state, n_micro)?;
            queue_forward(model, &state.stages, &state.events, batch)
        }
    }
}

/// Make sure every stage but the last has an event for each of `n_micro` micro-batches.
fn ensure_events(
    model: &GpuModel,
    state: &mut ForwardState,
    n_micro: usize,
) -> Result<(), BackendError> {
    let n = model.stages.len();
    state.events.resize_with(n, Vec::new);
    for (stage, events) in model.stages[..n - 1].iter().zip(&mut state.events) {
        while events.len() < n_micro {
            let e = stage
                .gpu
                .ctx
                .new_event(None)
                .map_err(|e| stage.gpu.err("creating an event", e))?;
            events.push(e);
        }
    }
    Ok(())
}

/// The launch sequence of `batch` as its [`GraphStep`] says: directly, captured then
/// launched, or replayed.
fn run_with_graphs(
    model: &GpuModel,
    state: &mut ForwardState,
    batch: usize,
    counters: &GroupGraphCounters,
) -> Result<(), BackendError> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let gpu = &*model.stages[0].gpu;
    match state.graphs.step(batch) {
        GraphStep::Replay => {
            let graph = state
                .graphs
                .graph(batch)
                .expect("a size to replay has a graph");
            graph
                .0
                .launch()
                .map_err(|e| gpu.err("launching the graph", e))?;
            counters.replay();
            Ok(())
        }
        GraphStep::Direct => {
            if state.graphs.has_failed(batch) {
                counters.fallback();
            }
            queue_forward(model, &state.stages, &[], batch)?;
            state.graphs.ran_direct(batch);
            Ok(())
        }
        GraphStep::Capture => {
            gpu.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(|e| gpu.err("starting a graph capture", e))?;
            let queued = queue_forward(model, &state.stages, &[], batch);
            let captured = gpu.stream.end_capture(CUgraphInstantiate_flags(0));
            match (queued, captured) {
                (Ok(()), Ok(Some(g))) => {
                    g.launch().map_err(|e| gpu.err("launching the graph", e))?;
                    state.graphs.captured(batch, SendGraph(g));
                    counters.capture();
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
                    state.graphs.capture_failed(batch);
                    counters.fallback();
                    // Nothing captured ran: queue it for real.
                    gpu.sync()?;
                    queue_forward(model, &state.stages, &[], batch)
                }
            }
        }
    }
}

/// A captured graph, kept with the scratch buffers whose addresses it holds.
pub struct SendGraph(pub cudarc::driver::CudaGraph);

// SAFETY: a graph is a driver object that may be used from any thread, one at a time; it is
// only ever used under the model's scratch lock, which holds it.
unsafe impl Send for SendGraph {}

impl std::fmt::Debug for SendGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaGraph")
    }
}

/// Queue the forward pass after the inputs' copy on every stage, as the pipeline's
/// [`schedule`](pipeline::schedule) says: per micro-batch, the inputs into the dtype, every
/// block, the final norm and the output projection; `events` has one event per micro-batch
/// for each stage but the last (none for one GPU).
fn queue_forward(
    model: &GpuModel,
    scratch: &[StageScratch],
    events: &[Vec<CudaEvent>],
    batch: usize,
) -> Result<(), BackendError> {
    let micro = pipeline::micro_batches(batch, model.stages.len());
    let ops = pipeline::schedule(model.stages.len(), micro.len());
    let mut streams = GroupStreams {
        model,
        scratch,
        events,
        micro: &micro,
        d: Dims::of(&model.params),
    };
    pipeline::run(&mut streams, &ops)
}

/// The streams of a model's stages, for the pipeline's schedule.
struct GroupStreams<'a> {
    model: &'a GpuModel,
    scratch: &'a [StageScratch],
    events: &'a [Vec<CudaEvent>],
    micro: &'a [Range<usize>],
    d: Dims,
}

impl GroupStreams<'_> {
    /// Micro-batch `micro`'s rows of a stage's residual: (first value, values).
    fn residual_rows(&self, micro: usize) -> (usize, usize) {
        let r = &self.micro[micro];
        let per = self.d.seq * self.d.dim;
        (r.start * per, r.len() * per)
    }
}

impl StageStreams for GroupStreams<'_> {
    type Error = BackendError;

    fn wait(&mut self, stage: usize, micro: usize) -> Result<(), BackendError> {
        let gpu = &self.model.stages[stage].gpu;
        gpu.stream
            .wait(&self.events[stage - 1][micro])
            .map_err(|e| gpu.err("waiting for the previous GPU", e))
    }

    fn record(&mut self, stage: usize, micro: usize) -> Result<(), BackendError> {
        let gpu = &self.model.stages[stage].gpu;
        self.events[stage][micro]
            .record(&gpu.stream)
            .map_err(|e| gpu.err("recording an event", e))
    }

    fn receive(&mut self, stage: usize, micro: usize) -> Result<(), BackendError> {
        let prev = &self.model.stages[stage - 1].gpu;
        let this = &self.model.stages[stage].gpu;
        let t = Elem::storage(self.model.dtype);
        let (first, n) = self.residual_rows(micro);
        let sent = self.scratch[stage - 1].x.view().slice(first, n);
        let kept = self.scratch[stage].x.view().slice(first, n);
        let from = sent.check(prev, "the residual sent on", t, n)?;
        let to = kept.check(this, "the residual received", t, n)?;
        this.ctx.bind_to_thread().map_err(|e| this.err("bind", e))?;
        // SAFETY: both views hold this micro-batch's n residual values of the dtype on their
        // GPUs (checked above). The source rows were written by the previous stage's compute
        // of this micro-batch, which this stream waits for (the schedule's Wait comes first),
        // and nothing writes them again in this batch; the destination rows are this
        // micro-batch's own, written next by this stream's compute, after the copy. Peer
        // access or not (peer.rs), cuMemcpyPeerAsync copies between the two contexts.
        unsafe {
            cudarc::driver::result::memcpy_peer_async(
                this.ctx.cu_ctx(),
                to,
                prev.ctx.cu_ctx(),
                from,
                n * t.bytes(),
                this.stream.cu_stream(),
            )
        }
        .map_err(|e| this.err("copying the residual between GPUs", e))
    }

    fn compute(&mut self, stage: usize, micro: usize) -> Result<(), BackendError> {
        let model = self.model;
        let (st, s) = (&model.stages[stage], &self.scratch[stage]);
        let (d, dtype) = (self.d, model.dtype);
        let r = self.micro[micro].clone();
        let rows = r.len();
        let (first, n) = self.residual_rows(micro);
        let x = s.x.view().slice(first, n);
        let xl = s.xl.view().slice(r.start * d.dim, rows * d.dim);
        if stage == 0 {
            let inputs = s
                .inputs
                .as_ref()
                .expect("the first stage has an input buffer");
            elementwise::from_f32(&st.gpu, dtype, inputs.view().slice(first, n), x, n)?;
        }
        let pass = Pass::new(model, st, s);
        let n_layers = model.params.n_layers_usize();
        let mut residual = x;
        for (lw, l) in st.weights.iter().zip(st.layers.clone()) {
            residual = pass.block(x, xl, rows, lw, l + 1 == n_layers)?;
        }
        if stage + 1 < model.stages.len() {
            return Ok(());
        }
        if n_layers == 0 {
            // No layers: keep the last position of each nonce.
            let last_rows = x.from((d.seq - 1) * d.dim);
            let stride = d.seq * d.dim;
            elementwise::gather_rows(&st.gpu, dtype, last_rows, xl, rows, d.dim, stride)?;
            residual = xl;
        }
        let head = st.head.as_ref().expect("the last stage has the head");
        let t = s
            .tail
            .as_ref()
            .expect("the last stage has the tail buffers");
        let logits = t.logits.view().slice(r.start * d.vocab, rows * d.vocab);
        pass.head(residual, rows, head, logits)
    }
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
    let (logits, logits_f32) = (t.logits.view(), t.logits_f32.view());
    elementwise::to_f32(gpu, model.dtype, logits, logits_f32, batch * vocab)?;
    let mut out = vec![0f32; batch * vocab];
    gpu.copy_out(logits_f32, &mut out)?;
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
    gpu.copy_in(perm, t.perm.view())?;
    let (logits, o, dist) = (t.logits.view(), t.o.view(), t.dist.view());
    tail::gather(gpu, model.dtype, logits, t.perm.view(), o, batch, vocab)?;
    tail::distance(gpu, o, head.target.view(), dist, batch, vocab)?;
    if all_distances {
        let mut all = vec![0f64; batch];
        gpu.copy_out(dist, &mut all)?;
        return Ok(TailOutput::All(all));
    }
    let out = FilterOut {
        count: t.count.view(),
        index: t.index.view(),
        valid_dist: t.valid_dist.view(),
    };
    tail::filter(gpu, dist, batch, r_target, out)?;
    let mut count = [0i32; 1];
    gpu.copy_out(t.count.view(), &mut count)?;
    let n = usize::try_from(count[0])
        .ok()
        .filter(|&n| n <= batch)
        .ok_or_else(|| {
            BackendError::Device(format!("the r_target filter counted {} proofs", count[0]))
        })?;
    let mut index = vec![0i32; n];
    let mut valid = vec![0f64; n];
    gpu.copy_out(t.index.view(), &mut index)?;
    gpu.copy_out(t.valid_dist.view(), &mut valid)?;
    let mut found = Vec::with_capacity(n);
    for (i, d) in index.into_iter().zip(valid) {
        let i = usize::try_from(i)
            .ok()
            .filter(|&i| i < batch)
            .ok_or_else(|| BackendError::Device(format!("the filter returned index {i}")))?;
        found.push((i, d));
    }
    Ok(TailOutput::Valid(found))
}
