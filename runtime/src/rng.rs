//! Seeded standard-normal noise for initial latents and stochastic schedulers.
//!
//! Not torch's generator: a given seed gives different noise than diffusers does. Parity tests
//! pass the reference's initial latents explicitly.

/// SplitMix64 stream with Box–Muller normals (deterministic across platforms).
#[derive(Debug, Clone)]
pub struct NormalRng {
    state: u64,
    spare: Option<f64>,
}

impl NormalRng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x6d6f_7469_6f6e_7274, // "motionrt"
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s as f32;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        self.spare = Some(r * th.sin());
        (r * th.cos()) as f32
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub fn fill(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.normal();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_and_determinism() {
        let mut a = NormalRng::new(7);
        let v: Vec<f32> = (0..200_000).map(|_| a.normal()).collect();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        let mut b = NormalRng::new(7);
        assert!(v.iter().take(10).all(|&x| x == b.normal()));
        assert_ne!(NormalRng::new(8).normal(), v[0]);
        let mut c = NormalRng::new(1);
        let ints: Vec<u64> = (0..10_000).map(|_| c.below(10)).collect();
        assert!(ints.iter().all(|&x| x < 10));
        assert!((0..10).all(|k| ints.iter().filter(|&&x| x == k).count() > 900));
    }
}
