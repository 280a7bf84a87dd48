//! PaliGemma Studio: a desktop app on eframe/egui that runs paligemma-wgpu on the window's
//! own wgpu device. [`StudioApp`] is the window; [`engine`] the worker thread that owns the
//! model; [`task`] the task picker's prompts.

pub mod app;
pub mod engine;
pub mod task;

pub use app::{Outcome, StartOptions, StudioApp};
pub use paligemma::model::cached_models;

/// The repository's shipped demo model, `assets/tiny-shapes`, when it can be found (from the
/// current directory, else next to this crate's sources).
pub fn default_model() -> Option<std::path::PathBuf> {
    asset("tiny-shapes")
}

/// The repository's sample scene `assets/scenes/scene_003.png` (two circles and a triangle),
/// when it can be found.
pub fn default_image() -> Option<std::path::PathBuf> {
    asset("scenes/scene_003.png")
}

fn asset(rel: &str) -> Option<std::path::PathBuf> {
    let here = std::path::Path::new("assets").join(rel);
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets")
        .join(rel);
    [here, repo].into_iter().find(|p| p.exists())
}

/// How eframe (and the UI tests) create the window's wgpu device: the adapter's own limits
/// rather than the WebGPU defaults, so the model's weights can use the largest bindings the
/// GPU offers. The engine requires no optional feature.
pub fn wgpu_setup() -> egui_wgpu::WgpuSetup {
    let mut setup = egui_wgpu::WgpuSetupCreateNew::without_display_handle();
    setup.device_descriptor = std::sync::Arc::new(|adapter| wgpu::DeviceDescriptor {
        label: Some("studio"),
        required_limits: adapter.limits(),
        ..Default::default()
    });
    egui_wgpu::WgpuSetup::CreateNew(setup)
}

/// eframe's wgpu options with [`wgpu_setup`].
pub fn wgpu_configuration() -> egui_wgpu::WgpuConfiguration {
    egui_wgpu::WgpuConfiguration {
        wgpu_setup: wgpu_setup(),
        ..Default::default()
    }
}
