//! A small, fast, seeded generator for stochastic rounding.
//!
//! Stochastic quantizers draw one uniform number per element, so the generator sits on the
//! hot path. [`DitherRng`] is wyrand (64-bit state, one multiply per draw); quantizers accept
//! any [`rand::RngCore`], and use this one where speed matters.

use rand::RngCore;

/// wyrand: a 64-bit counter-based generator; not cryptographic, statistically sound for dithering.
#[derive(Debug, Clone)]
pub struct DitherRng {
    state: u64,
}

impl DitherRng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The current state: `DitherRng::new(g.state())` continues `g`'s stream exactly.
    pub fn state(&self) -> u64 {
        self.state
    }
}

impl RngCore for DitherRng {
    #[inline]
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    #[inline]
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Two independent uniforms in `[0, 1)` with 24 bits of resolution from one 64-bit draw.
#[inline]
pub(crate) fn uniform_pair<R: RngCore + ?Sized>(rng: &mut R) -> (f32, f32) {
    const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
    let r = rng.next_u64();
    (
        ((r >> 40) as u32) as f32 * SCALE,
        (((r >> 8) & 0xff_ffff) as u32) as f32 * SCALE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_are_in_range_and_roughly_uniform() {
        let mut rng = DitherRng::new(7);
        let mut sum = 0.0f64;
        let n = 100_000;
        for _ in 0..n {
            let (a, b) = uniform_pair(&mut rng);
            assert!((0.0..1.0).contains(&a) && (0.0..1.0).contains(&b));
            sum += f64::from(a) + f64::from(b);
        }
        let mean = sum / (2 * n) as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
    }

    #[test]
    fn streams_depend_on_the_seed_only() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = DitherRng::new(1);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = DitherRng::new(1);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut r = DitherRng::new(2);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
