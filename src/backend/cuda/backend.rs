//! A GPU group as one worker's backend: the model's layers split across the group's GPUs,
//! batches forwarded there, and the tail (distances, r_target filter) computed on the last
//! GPU so that only the proofs come back.

use super::forward::{self, TailOutput};
use super::gpu::{Gpu, GpuError};
use super::graphs::GroupGraphCounters;
use super::model::{self, GpuModel, RESERVE_BYTES};
use super::peer::{self, PeerLink};
use super::GpuInfo;
use crate::backend::{
    downcast_model, Backend, BackendError, BatchResult, JobSpec, Model, PreparedBatch,
};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use std::sync::Arc;

/// One GPU group, brought up.
#[derive(Debug)]
pub struct CudaBackend {
    gpus: Vec<Arc<Gpu>>,
    /// Replay each batch size's launch sequence as a captured CUDA graph (`--cuda-graphs`).
    graphs: bool,
    /// What the graphs did on this group.
    graph_counters: GroupGraphCounters,
    /// How the residual crosses from each GPU to the next (one link fewer than GPUs).
    links: Vec<PeerLink>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl CudaBackend {
    /// Bring up every GPU of a group (contexts, kernels, cuBLASLt), in order.
    pub fn open(group: &[GpuInfo]) -> Result<Self, GpuError> {
        let gpus = group
            .iter()
            .map(|g| Gpu::open(g).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_gpus(gpus))
    }

    /// A group of GPUs already brought up (shared with other groupings of the same GPUs),
    /// with peer access enabled between consecutive GPUs where the pair supports it.
    pub fn from_gpus(gpus: Vec<Arc<Gpu>>) -> Self {
        assert!(!gpus.is_empty(), "a GPU group has at least one GPU");
        let links: Vec<PeerLink> = gpus.windows(2).map(|w| peer::link(&w[0], &w[1])).collect();
        for (w, l) in gpus.windows(2).zip(&links) {
            tracing::info!(
                "{} -> {}: the residual travels {l}",
                w[0].info.device_name(),
                w[1].info.device_name()
            );
        }
        CudaBackend {
            gpus,
            graphs: false,
            graph_counters: GroupGraphCounters::default(),
            links,
        }
    }

    /// How the residual crosses from each GPU of the group to the next.
    pub fn peer_links(&self) -> &[PeerLink] {
        &self.links
    }

    /// Capture each batch size's launch sequence into a CUDA graph and replay it (single-GPU
    /// groups; off by default).
    pub fn with_graphs(mut self, on: bool) -> Self {
        self.graphs = on;
        self
    }

    pub fn gpus(&self) -> &[Arc<Gpu>] {
        &self.gpus
    }

    /// What CUDA graphs did on this group so far.
    pub fn graph_counts(&self) -> crate::telemetry::GraphCounts {
        self.graph_counters.snapshot()
    }

    /// The graph counters to pass to the forward pass: None with graphs off.
    fn graphs(&self) -> Option<&GroupGraphCounters> {
        self.graphs.then_some(&self.graph_counters)
    }

    fn model<'a>(&self, model: &'a Model) -> Result<&'a GpuModel, BackendError> {
        downcast_model(model, &self.name())
    }
}

/// `cuda:0`, or `cuda:0+1` for a group of two.
fn group_name(gpus: &[Arc<Gpu>]) -> String {
    let ids: Vec<String> = gpus.iter().map(|g| g.ordinal().to_string()).collect();
    format!("cuda:{}", ids.join("+"))
}

/// The architectures whose tensor cores multiply E4M3 (Ada sm_89, Hopper sm_90, Blackwell
/// sm_100 and later).
pub fn has_fp8(compute_capability: (i32, i32)) -> bool {
    compute_capability >= (8, 9)
}

/// Whether a group of GPUs (in order) can serve `params` in `dtype`: valid params; for FP8
/// (`use_fp8`) a GPU that multiplies E4M3, f16 or bf16 activations and every product's
/// sizes a multiple of 16; and every stage with one nonce's scratch within its GPU's total
/// memory (free memory depends on which models are cached; building evicts them as needed).
pub fn check_group(params: &Params, dtype: Dtype, gpus: &[GpuInfo]) -> Result<(), BackendError> {
    params
        .validate()
        .map_err(|e| BackendError::Unsupported(e.to_string()))?;
    if params.use_fp8 {
        check_fp8(params, dtype, gpus)?;
    }
    let n = gpus.len().min(params.n_layers_usize().max(1));
    let ranges = model::stage_layers(params.n_layers_usize(), n);
    for (s, (gpu, layers)) in gpus.iter().zip(&ranges).enumerate() {
        let (first, last) = (s == 0, s + 1 == n);
        let build = model::stage_build_bytes(params, dtype, layers, last);
        let one_nonce = model::scratch_bytes_per_nonce(params, dtype, first, last);
        let need = build + one_nonce + RESERVE_BYTES;
        if need > gpu.total_bytes {
            return Err(BackendError::OutOfMemory(format!(
                "params: this model needs {:.1} GiB on {} ({} of its {} layers in {}{}: \
                 {:.1} GiB to build, {:.2} GiB of working memory for one nonce from seq_len {} \
                 with dim {} and the FFN hidden size {}), which has {:.1} GiB",
                need as f64 / GIB,
                gpu.device_name(),
                layers.len(),
                params.n_layers,
                dtype.as_str(),
                if params.use_fp8 {
                    " with FP8 weights"
                } else {
                    ""
                },
                build as f64 / GIB,
                one_nonce as f64 / GIB,
                params.seq_len,
                params.dim,
                params.ffn_hidden(),
                gpu.total_bytes as f64 / GIB
            )));
        }
    }
    Ok(())
}

/// FP8 needs the hardware, 16-bit activations, and cuBLASLt's FP8 shapes: every product's
/// inner size and output width a multiple of 16. Never a silent fallback to f16.
fn check_fp8(params: &Params, dtype: Dtype, gpus: &[GpuInfo]) -> Result<(), BackendError> {
    if let Some(g) = gpus.iter().find(|g| !has_fp8(g.compute_capability)) {
        let (major, minor) = g.compute_capability;
        return Err(BackendError::Unsupported(format!(
            "params.use_fp8: {} is sm_{major}{minor}; FP8 products need sm_89, sm_90 or \
             sm_100 and later; send use_fp8 false",
            g.device_name()
        )));
    }
    if dtype == Dtype::F32 {
        return Err(BackendError::Unsupported(
            "params.use_fp8: FP8 products write f16 or bf16 activations, and this server \
             computes in f32 (--dtype f16, bf16 or fp8)"
                .into(),
        ));
    }
    let hd = params.head_dim();
    let sizes = [
        ("dim", params.dim_usize()),
        ("n_heads * head_dim", params.n_heads_usize() * hd),
        ("n_kv_heads * head_dim", params.n_kv_heads_usize() * hd),
        ("the FFN hidden size", params.ffn_hidden()),
    ];
    if let Some((what, v)) = sizes.iter().find(|(_, v)| !v.is_multiple_of(16)) {
        return Err(BackendError::Unsupported(format!(
            "params.use_fp8: {what} is {v}, and FP8 products need multiples of 16; send \
             use_fp8 false"
        )));
    }
    Ok(())
}

/// Host bytes of one nonce of a GPU batch: its inputs (f32) and its permutation (i64, drawn
/// and then laid out in one array), twice (one batch prepared while one computes).
pub fn host_bytes_per_nonce(params: &Params) -> u64 {
    let seq = params.seq_len_usize() as u64;
    let dim = params.dim_usize() as u64;
    let vocab = params.vocab_usize() as u64;
    2 * (4 * seq * dim + 2 * 8 * vocab)
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        group_name(&self.gpus)
    }

    fn check(&self, params: &Params, dtype: Dtype) -> Result<(), BackendError> {
        let gpus: Vec<GpuInfo> = self.gpus.iter().map(|g| g.info.clone()).collect();
        check_group(params, dtype, &gpus)
    }

    fn build_model(
        &self,
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
    ) -> Result<Model, BackendError> {
        let m = GpuModel::build(&self.gpus, block_hash, params, dtype)?;
        Ok(Arc::new(m))
    }

    fn forward_last_logits(
        &self,
        model: &Model,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let m = self.model(model)?;
        if batch == 0 {
            return Ok(Vec::new());
        }
        let mut state = m.scratch.lock().unwrap_or_else(|e| e.into_inner());
        forward::ensure_scratch(m, &mut state, batch, &self.graph_counters)?;
        forward::forward_logits(m, &mut state, inputs, batch, self.graphs())?;
        forward::logits_to_host(m, &state.stages, batch)
    }

    fn run_batch(
        &self,
        model: &Model,
        job: &JobSpec,
        batch: PreparedBatch,
        all_distances: bool,
    ) -> Result<BatchResult, BackendError> {
        let m = self.model(model)?;
        let n = batch.nonces.len();
        if n == 0 {
            return Ok(BatchResult::empty());
        }
        let mut state = m.scratch.lock().unwrap_or_else(|e| e.into_inner());
        forward::ensure_scratch(m, &mut state, n, &self.graph_counters)?;
        // Queue the forward pass first: the permutations are laid out on the host while the
        // GPUs work.
        forward::forward_logits(m, &mut state, &batch.inputs, n, self.graphs())?;
        let vocab = m.params.vocab_usize();
        let mut perm = Vec::with_capacity(n * vocab);
        for p in &batch.permutations {
            perm.extend_from_slice(p);
        }
        match forward::tail_on_device(m, &state.stages, &perm, n, job.r_target, all_distances)? {
            TailOutput::All(dist) => Ok(BatchResult::from_distances(
                batch.nonces,
                dist,
                job.r_target,
            )),
            TailOutput::Valid(found) => {
                let valid_nonces = found.iter().map(|&(i, _)| batch.nonces[i]).collect();
                let valid_dist = found.iter().map(|&(_, d)| d).collect();
                Ok(BatchResult::from_valid(
                    batch.nonces,
                    valid_nonces,
                    valid_dist,
                ))
            }
        }
    }

    fn overlaps_preparation(&self) -> bool {
        true
    }

    /// On the host a GPU batch is only its inputs (f32) and permutations (i64, drawn and then
    /// laid out in one array), for two batches at once (one prepared while one computes);
    /// device memory is [`Backend::max_batch`]'s concern.
    fn bytes_per_nonce(&self, params: &Params) -> u64 {
        host_bytes_per_nonce(params)
    }

    fn max_batch(&self, model: &Model, _params: &Params) -> Option<usize> {
        let m = self.model(model).ok()?;
        m.max_batch().ok().map(|b| b.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn gpus(gib: &[u64]) -> Vec<GpuInfo> {
        gib.iter()
            .enumerate()
            .map(|(i, g)| GpuInfo {
                ordinal: i,
                name: "a simulated GPU".into(),
                total_bytes: g * GB,
                free_bytes: g * GB,
                compute_capability: (9, 0),
            })
            .collect()
    }

    #[test]
    fn v2_fits_one_80gb_gpu_or_two_24gb_ones_and_not_one_24gb_one() {
        let v2 = Params::v2();
        check_group(&v2, Dtype::F16, &gpus(&[79])).unwrap();
        check_group(&v2, Dtype::Bf16, &gpus(&[79])).unwrap();
        check_group(&v2, Dtype::F16, &gpus(&[23, 23])).unwrap();
        let e = check_group(&v2, Dtype::F16, &gpus(&[23])).unwrap_err();
        assert!(matches!(e, BackendError::OutOfMemory(_)), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("cuda:0") && text.contains("64 of its 64 layers"),
            "{text}"
        );
        // f32 doubles the weights (66 GiB): one 79 GiB GPU still holds them, a 64 GiB one
        // does not.
        check_group(&v2, Dtype::F32, &gpus(&[79])).unwrap();
        assert!(check_group(&v2, Dtype::F32, &gpus(&[64])).is_err());
        check_group(&v2, Dtype::F32, &gpus(&[64, 64])).unwrap();
    }

    #[test]
    fn fp8_needs_the_hardware_16_bit_activations_and_multiples_of_16() {
        let mut v2 = Params::v2();
        v2.use_fp8 = true;
        // On Hopper, V2 in FP8: 17.7 GB of E4M3 weights fit, and fit a 24 GiB GPU too.
        check_group(&v2, Dtype::F16, &gpus(&[79])).unwrap();
        check_group(&v2, Dtype::Bf16, &gpus(&[23])).unwrap();
        // An A100 (sm_80) has no FP8: refused by name, never computed in f16 instead.
        let mut a100 = gpus(&[79]);
        a100[0].compute_capability = (8, 0);
        let e = check_group(&v2, Dtype::F16, &a100).unwrap_err().to_string();
        assert!(
            e.contains("cuda:0 is sm_80") && e.contains("use_fp8"),
            "{e}"
        );
        // Ada (sm_89) and Blackwell (sm_100) have it.
        let mut ada = gpus(&[47]);
        ada[0].compute_capability = (8, 9);
        check_group(&v2, Dtype::F16, &ada).unwrap();
        assert!(has_fp8((10, 0)) && has_fp8((12, 0)) && !has_fp8((8, 6)));
        // f32 activations cannot take FP8 products.
        let e = check_group(&v2, Dtype::F32, &gpus(&[79]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32"), "{e}");
        // A size that is not a multiple of 16: head_dim 28 x 3 heads = 84.
        let mut odd = Params {
            dim: 84,
            n_heads: 3,
            n_kv_heads: 3,
            n_layers: 2,
            vocab_size: 100,
            seq_len: 4,
            multiple_of: 32,
            ..Params::default()
        };
        odd.use_fp8 = true;
        let e = check_group(&odd, Dtype::F16, &gpus(&[79]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dim is 84") && e.contains("multiples of 16"),
            "{e}"
        );
    }

    #[test]
    fn one_nonce_of_working_memory_is_part_of_the_check() {
        // 0.6 GB of f16 weights, and about 3.9 GB of scratch for one nonce of 32768 positions.
        let p = Params {
            dim: 4096,
            n_layers: 1,
            n_heads: 32,
            n_kv_heads: 32,
            vocab_size: 8192,
            seq_len: 32768,
            ..Params::default()
        };
        let one = model::scratch_bytes_per_nonce(&p, Dtype::F16, true, true);
        assert!(one > 3 * GB, "{one}");
        check_group(&p, Dtype::F16, &gpus(&[24])).unwrap();
        let e = check_group(&p, Dtype::F16, &gpus(&[5])).unwrap_err();
        assert!(matches!(e, BackendError::OutOfMemory(_)), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("working memory for one nonce from seq_len 32768"),
            "{text}"
        );
        // Without that nonce the model itself would fit.
        let build = model::stage_build_bytes(&p, Dtype::F16, &(0..1), true);
        assert!(build + RESERVE_BYTES < 5 * GB, "{build}");
        // The allocation's sizes are the check's.
        let sizes = model::ScratchSizes::new(&p, Dtype::F16, 3, true, true);
        let per = model::ScratchSizes::new(&p, Dtype::F16, 1, true, true).bytes();
        assert!(sizes.bytes() <= 3 * per && sizes.bytes() > 2 * per);
        assert_eq!(per, one);
    }

    #[test]
    fn invalid_params_are_refused_before_any_memory_question() {
        let mut bad = Params::v1();
        bad.n_heads = 7;
        assert!(matches!(
            check_group(&bad, Dtype::F16, &gpus(&[79])).unwrap_err(),
            BackendError::Unsupported(_)
        ));
    }

    #[test]
    fn host_bytes_of_a_gpu_batch_are_inputs_and_permutations() {
        let v2 = Params::v2();
        // 2 x (256 x 1792 x 4 + 2 x 8196 x 8) bytes: about 3.9 MB per nonce, so the default
        // 2 GiB host budget allows batches of about 540.
        let per = host_bytes_per_nonce(&v2);
        assert_eq!(per, 2 * (1_835_008 + 131_136));
        let cap = (2u64 << 30) / per;
        assert!((500..600).contains(&cap), "{cap}");
    }
}
