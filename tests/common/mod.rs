//! Helpers shared by the integration tests: fixture paths, opening the GPU, loading models.

// Every test file compiles this module and uses only some of its helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use paligemma::gpu::{Gpu, GpuOptions};
use paligemma::model::{ModelBuilder, PaliGemma};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// A fixture checkpoint made by `scripts/make_fixtures.py`, e.g. `tiny-mqa-f32`.
pub fn fixture_model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// An image under `tests/fixtures/images`.
pub fn fixture_image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

/// The trained tiny model `assets/tiny-shapes`.
pub fn shapes_model() -> PathBuf {
    root().join("assets/tiny-shapes")
}

/// A sample scene under `assets/scenes` (`scene_000.png` ...).
pub fn scene(i: usize) -> PathBuf {
    root().join(format!("assets/scenes/scene_{i:03}.png"))
}

/// Open the GPU, optionally forcing weights into bindings of at most `limit` bytes. Tests
/// need an adapter; without one they fail with the driver installation hint.
pub fn gpu(limit: Option<u64>) -> Arc<Gpu> {
    Gpu::new(GpuOptions {
        weight_binding_limit: limit,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Load the checkpoint in `dir` on `gpu` with the default options (f16, no adapter).
pub fn load(gpu: &Arc<Gpu>, dir: &Path) -> PaliGemma {
    ModelBuilder::new(dir)
        .gpu(gpu.clone())
        .build()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Token ids saved as an int64 `.npy` file.
pub fn read_ids(path: &Path) -> Vec<u32> {
    paligemma::npy::read_i64(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .data
        .iter()
        .map(|&x| x as u32)
        .collect()
}
