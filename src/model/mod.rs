//! The model: configuration, checkpoint loading and the forward passes.

pub mod config;
pub mod gemma;
pub mod paligemma;
pub mod siglip;
pub mod weights;

pub use config::{PaliGemmaConfig, TextConfig, VisionConfig};
pub use paligemma::{resolve_model_dir, ImageEncoder, LoadOptions, PaliGemma};
pub use weights::{Checkpoint, WeightFormat};
