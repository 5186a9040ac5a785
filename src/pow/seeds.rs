//! The seed-string conventions: which string seeds which random stream.
//!
//! `seeded(s, k)` is the reference's `get_rng(s, k)`: the entropy is SHA-256 of
//! `"{s}_{i}"` for i in 0..k, each digest read as eight little-endian u32 words, fed to
//! numpy's `SeedSequence` and then to `PCG64`.

use super::rng::Generator;
use sha2::{Digest, Sha256};

/// Number of SHA-256 digests in the entropy of the weights and input streams.
pub const WEIGHTS_HASHES: usize = 4;
pub const INPUT_HASHES: usize = 4;
/// Number of SHA-256 digests in the entropy of the permutation and target streams.
pub const PERMUTATION_HASHES: usize = 1;
pub const TARGET_HASHES: usize = 1;

/// The SeedSequence entropy words for `(s, k)`.
pub fn entropy(seed_string: &str, num_hashes: usize) -> Vec<u32> {
    let mut words = Vec::with_capacity(8 * num_hashes);
    for i in 0..num_hashes {
        let digest = Sha256::digest(format!("{seed_string}_{i}").as_bytes());
        words.extend(
            digest
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    words
}

/// numpy's `default_rng(SeedSequence(entropy(s, k)))`.
pub fn seeded(seed_string: &str, num_hashes: usize) -> Generator {
    Generator::from_entropy(&entropy(seed_string, num_hashes))
}

/// The stream the weight pool is drawn from: the block hash itself.
pub fn weights_seed(block_hash: &str) -> String {
    block_hash.to_owned()
}

/// The stream of a nonce's input embeddings.
pub fn input_seed(block_hash: &str, public_key: &str, nonce: u64) -> String {
    format!("{block_hash}_{public_key}_nonce{nonce}")
}

/// The stream of a nonce's output permutation (note the extra underscore after "nonce").
pub fn permutation_seed(block_hash: &str, public_key: &str, nonce: u64) -> String {
    format!("{block_hash}_{public_key}_nonce_{nonce}_permutations")
}

/// The stream of the target vector.
pub fn target_seed(block_hash: &str) -> String {
    format!("{block_hash}_target")
}

/// The string hashed for a parameter's pool offset.
pub fn param_name_seed(block_hash: &str, name: &str) -> String {
    format!("{block_hash}_{name}")
}
