//! The CPU backend's model: every linear weight packed, in the model dtype, for the product
//! path chosen when the model is built; the norm weights as f32 values of the dtype.
//!
//! [`ModelWeights`] stays the readable form (f32 vectors in PyTorch's shapes, what the golden
//! tests inspect); the forward pass runs on a [`CpuModel`], and accepts either through
//! [`CpuWeights`] (a `ModelWeights` is packed on each call, which suits tests and tools, not
//! serving).

use super::matmul::{Kernel, PackError, PackedWeight};
use super::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::pow::weights::{self, ModelWeights, ParamKind, ParamSpec, PoolSlice};
use rayon::prelude::*;
use std::borrow::Cow;

/// One transformer block's packed weights.
#[derive(Debug, Clone)]
pub struct CpuLayer {
    pub wq: PackedWeight,
    pub wk: PackedWeight,
    pub wv: PackedWeight,
    pub wo: PackedWeight,
    pub w1: PackedWeight,
    pub w2: PackedWeight,
    pub w3: PackedWeight,
    pub attention_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
}

/// A model ready for the CPU forward pass.
#[derive(Debug, Clone)]
pub struct CpuModel {
    pub params: Params,
    pub dtype: Dtype,
    /// The product path the weights are packed for.
    pub kernel: Kernel,
    pub layers: Vec<CpuLayer>,
    pub norm: Vec<f32>,
    pub output: PackedWeight,
}

/// A parameter's values, packed when it is a linear weight.
enum Built {
    Linear(PackedWeight),
    Vector(Vec<f32>),
}

impl CpuModel {
    /// Build every parameter the forward pass reads from the pool of `block_hash`, packed
    /// for the path [`Kernel::select`] picks on this machine.
    pub fn build(block_hash: &str, params: &Params, dtype: Dtype) -> Result<Self, BackendError> {
        let kernel = Kernel::select(dtype).map_err(|e| BackendError::Unsupported(e.to_string()))?;
        let pool = weights::build_pool(
            block_hash,
            weights::pool_size(weights::total_params(params)),
            dtype,
        );
        Self::from_pool(block_hash, params, dtype, &pool, kernel).map_err(pack_failed)
    }

    /// Build from an already drawn pool, packed for `kernel`. One parameter at a time (on
    /// every thread) goes through f32, so the f32 model never exists as a whole.
    pub fn from_pool(
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
        pool: &[f32],
        kernel: Kernel,
    ) -> Result<Self, PackError> {
        let specs: Vec<ParamSpec> = weights::param_specs(params)
            .into_iter()
            .filter(|s| s.kind != ParamKind::TokEmbeddings)
            .collect();
        let built = specs
            .par_iter()
            .map(|spec| {
                let numel = spec.numel() as usize;
                let slice = PoolSlice::new(
                    weights::name_hash(block_hash, &spec.name),
                    numel as u64,
                    pool.len() as u64,
                );
                let mut v = vec![0f32; numel];
                slice.fill(pool, &mut v);
                build_param(spec, v, dtype, kernel)
            })
            .collect::<Result<Vec<Built>, PackError>>()?;
        Ok(assemble(params, dtype, kernel, specs.iter().zip(built)))
    }

    /// Pack the readable weights for `kernel`.
    pub fn from_weights(w: &ModelWeights, kernel: Kernel) -> Result<Self, PackError> {
        let specs: Vec<ParamSpec> = weights::param_specs(&w.params)
            .into_iter()
            .filter(|s| s.kind != ParamKind::TokEmbeddings)
            .collect();
        let values = |spec: &ParamSpec| -> &[f32] {
            let layer = || &w.layers[spec.layer.expect("per-layer parameter")];
            match spec.kind {
                ParamKind::Wq => &layer().wq,
                ParamKind::Wk => &layer().wk,
                ParamKind::Wv => &layer().wv,
                ParamKind::Wo => &layer().wo,
                ParamKind::W1 => &layer().w1,
                ParamKind::W2 => &layer().w2,
                ParamKind::W3 => &layer().w3,
                ParamKind::AttentionNorm => &layer().attention_norm,
                ParamKind::FfnNorm => &layer().ffn_norm,
                ParamKind::Norm => &w.norm,
                ParamKind::Output => &w.output,
                ParamKind::TokEmbeddings => unreachable!("filtered out"),
            }
        };
        let built = specs
            .par_iter()
            .map(|spec| build_param(spec, values(spec).to_vec(), w.dtype, kernel))
            .collect::<Result<Vec<Built>, PackError>>()?;
        Ok(assemble(
            &w.params,
            w.dtype,
            kernel,
            specs.iter().zip(built),
        ))
    }

    /// Bytes held by the weights.
    pub fn bytes(&self) -> usize {
        let vecs = |v: &Vec<f32>| 4 * v.len();
        self.layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3]
                    .iter()
                    .map(|w| w.bytes())
                    .sum::<usize>()
                    + vecs(&l.attention_norm)
                    + vecs(&l.ffn_norm)
            })
            .sum::<usize>()
            + vecs(&self.norm)
            + self.output.bytes()
    }
}

fn pack_failed(e: PackError) -> BackendError {
    BackendError::Unsupported(format!("the CPU model's weights could not be packed: {e}"))
}

fn build_param(
    spec: &ParamSpec,
    values: Vec<f32>,
    dtype: Dtype,
    kernel: Kernel,
) -> Result<Built, PackError> {
    Ok(match spec.shape[..] {
        [n, k] => Built::Linear(PackedWeight::pack(&values, n, k, dtype, kernel.layout())?),
        _ => Built::Vector(values),
    })
}

/// Put the built parameters in their places (by kind and layer, not by position).
fn assemble<'a>(
    params: &Params,
    dtype: Dtype,
    kernel: Kernel,
    built: impl Iterator<Item = (&'a ParamSpec, Built)>,
) -> CpuModel {
    #[derive(Default)]
    struct Slots {
        linear: [Option<PackedWeight>; 7],
        attention_norm: Option<Vec<f32>>,
        ffn_norm: Option<Vec<f32>>,
    }
    let mut layers: Vec<Slots> = (0..params.n_layers_usize())
        .map(|_| Slots::default())
        .collect();
    let (mut norm, mut output) = (None, None);
    for (spec, b) in built {
        let slots = spec.layer.map(|l| &mut layers[l]);
        match (spec.kind, b, slots) {
            (ParamKind::Norm, Built::Vector(v), None) => norm = Some(v),
            (ParamKind::Output, Built::Linear(w), None) => output = Some(w),
            (ParamKind::AttentionNorm, Built::Vector(v), Some(s)) => s.attention_norm = Some(v),
            (ParamKind::FfnNorm, Built::Vector(v), Some(s)) => s.ffn_norm = Some(v),
            (kind, Built::Linear(w), Some(s)) => {
                let i = match kind {
                    ParamKind::Wq => 0,
                    ParamKind::Wk => 1,
                    ParamKind::Wv => 2,
                    ParamKind::Wo => 3,
                    ParamKind::W1 => 4,
                    ParamKind::W2 => 5,
                    ParamKind::W3 => 6,
                    other => unreachable!("{other:?} is not a layer's linear weight"),
                };
                s.linear[i] = Some(w);
            }
            (kind, _, _) => unreachable!("{kind:?}: shape or layer does not match its kind"),
        }
    }
    let layers = layers
        .into_iter()
        .map(|s| {
            let [wq, wk, wv, wo, w1, w2, w3] = s.linear.map(|w| w.expect("every linear weight"));
            CpuLayer {
                wq,
                wk,
                wv,
                wo,
                w1,
                w2,
                w3,
                attention_norm: s.attention_norm.expect("attention_norm"),
                ffn_norm: s.ffn_norm.expect("ffn_norm"),
            }
        })
        .collect();
    CpuModel {
        params: params.clone(),
        dtype,
        kernel,
        layers,
        norm: norm.expect("norm.weight"),
        output: output.expect("output.weight"),
    }
}

/// Weights the CPU forward pass runs: a [`CpuModel`] as it is, or the readable
/// [`ModelWeights`] packed for this machine's path on each call.
pub trait CpuWeights {
    fn params(&self) -> &Params;
    /// The packed model.
    fn packed(&self) -> Result<Cow<'_, CpuModel>, BackendError>;
}

impl CpuWeights for CpuModel {
    fn params(&self) -> &Params {
        &self.params
    }

    fn packed(&self) -> Result<Cow<'_, CpuModel>, BackendError> {
        Ok(Cow::Borrowed(self))
    }
}

impl CpuWeights for ModelWeights {
    fn params(&self) -> &Params {
        &self.params
    }

    fn packed(&self) -> Result<Cow<'_, CpuModel>, BackendError> {
        let kernel =
            Kernel::select(self.dtype).map_err(|e| BackendError::Unsupported(e.to_string()))?;
        Ok(Cow::Owned(
            CpuModel::from_weights(self, kernel).map_err(pack_failed)?,
        ))
    }
}
