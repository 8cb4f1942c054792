//! Seeded, named random streams so that every random choice is reproducible from one seed.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// A ChaCha8 stream derived from `seed`, a purpose label and an index (e.g. the epoch).
///
/// Distinct labels or indices give independent streams, so resuming at an epoch boundary
/// replays exactly what an uninterrupted run would have drawn.
pub fn seeded_rng(seed: u64, purpose: &str, index: u64) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update((purpose.len() as u64).to_le_bytes());
    h.update(purpose.as_bytes());
    h.update(index.to_le_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}
