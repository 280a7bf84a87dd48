//! Shared helpers for kernel tests: a GPU (lavapipe in CI), seeded random data, f16 rounding
//! and a tolerance check that reports the worst element.

use std::sync::Arc;

use crate::gpu::{Gpu, GpuOptions};

/// Open the GPU, optionally forcing a weight binding limit. Tests need an adapter; without
/// one they fail with the driver installation hint.
pub fn gpu_with_limit(limit: Option<u64>) -> Arc<Gpu> {
    Gpu::new(GpuOptions {
        weight_binding_limit: limit,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Deterministic pseudo-random values uniform in [-scale, scale].
pub fn rand_vec(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Round every value to the nearest f16 (what weight upload does).
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
}

/// Assert `got` and `want` agree within `tol` (absolute, scaled up for large values).
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / (1.0 + w.abs());
        if err.is_nan() || err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: element {} got {} want {} (relative error {})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0
    );
}
