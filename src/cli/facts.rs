//! `llama-pow facts`: the hashes an operator compares with the reference's.

use crate::pow::facts::{self, Facts, FactsInput, ParamSelection};
use crate::pow::request::ComputeRequest;

pub fn run(req: &ComputeRequest, params_named: &[String]) -> anyhow::Result<Facts> {
    let selection = if params_named.is_empty() {
        ParamSelection::All
    } else {
        ParamSelection::Named(params_named.to_vec())
    };
    let nonces: Vec<u64> = req.nonces().collect();
    let p = &req.proof;
    Ok(facts::compute(&FactsInput {
        block_hash: &p.block_hash,
        public_key: &p.public_key,
        params: &p.params,
        dtype: req.dtype,
        nonces: &nonces,
        selection: &selection,
    })?)
}
