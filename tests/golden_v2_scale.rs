//! PARAMS_V2 at full size (17.8 B parameters): everything in v2_scale_facts.json, exactly,
//! computed from the 888 M-value pool without materialising the model.

mod common;

use common::*;
use llama_pow::pow::dtype::Dtype;
use llama_pow::pow::facts::{self, FactsInput, ParamSelection};
use llama_pow::pow::params::Params;
use llama_pow::pow::request::parse_params;

#[test]
fn v2_scale_facts_match_the_reference() {
    let case = load("v2_scale_facts.json");
    let params = parse_params(&case["params"]).unwrap();
    assert_eq!(params, Params::v2(), "the golden params are PARAMS_V2");
    let nonces = u64s(&case["nonces"]);
    let golden_params = case["parameters"].as_array().unwrap();
    let sliced: Vec<String> = golden_params
        .iter()
        .filter(|p| p.get("sha256_f16le").is_some())
        .map(|p| str_of(&p["name"]).to_owned())
        .collect();
    assert_eq!(sliced.len(), 5);

    let started = std::time::Instant::now();
    let f = facts::compute(&FactsInput {
        block_hash: str_of(&case["block_hash"]),
        public_key: str_of(&case["public_key"]),
        params: &params,
        dtype: Dtype::F16,
        nonces: &nonces,
        selection: &ParamSelection::Named(sliced),
    })
    .unwrap();
    eprintln!("v2 facts in {:.1} s", started.elapsed().as_secs_f64());

    assert_eq!(f.total_params, case["total_params"].as_u64().unwrap());
    assert_eq!(f.pool_size, case["pool_size"].as_u64().unwrap());
    assert_eq!(
        f.pool_sha256_f16le.as_deref(),
        case["pool_sha256_f16le"].as_str()
    );
    let first8: Vec<f64> = f.pool_first8.iter().map(|&x| x as f64).collect();
    assert_eq!(first8, f64s(&case["pool_first8"]));
    assert_eq!(f.parameters.len(), golden_params.len());
    for (ours, want) in f.parameters.iter().zip(golden_params) {
        let name = str_of(&want["name"]);
        assert_eq!(ours.name, name);
        let shape: Vec<usize> = u64s(&want["shape"]).iter().map(|&d| d as usize).collect();
        assert_eq!(ours.shape, shape, "{name}");
        assert_eq!(ours.numel, want["numel"].as_u64().unwrap(), "{name}");
        assert_eq!(
            ours.name_hash,
            want["name_hash"].as_u64().unwrap(),
            "{name}"
        );
        if let Some(h) = want.get("sha256_f16le") {
            assert_eq!(ours.sha256_f16le.as_deref(), h.as_str(), "{name} values");
            // "start" in the golden file is where the slice begins in the pool; a tiled
            // parameter's rotated tiling starts at its shift.
            let start = want["start"].as_u64().unwrap();
            match ours.start {
                Some(s) => assert_eq!(s, start, "{name} start"),
                None => assert_eq!(ours.name_hash % ours.numel, start, "{name} shift"),
            }
        } else {
            assert!(ours.sha256_f16le.is_none(), "{name} was not asked for");
        }
    }
    assert_eq!(f.inputs_sha256_f16le, strs(&case["inputs_sha256_f16le"]));
    assert_eq!(
        f.permutations_sha256_i64le,
        strs(&case["permutations_sha256_i64le"])
    );
    assert_eq!(f.target_sha256_f64le, str_of(&case["target_sha256_f64le"]));
}
