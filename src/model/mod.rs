//! The model: configuration, checkpoint loading and the forward passes.

pub mod config;
pub mod weights;

pub use config::{PaliGemmaConfig, TextConfig, VisionConfig};
pub use weights::Checkpoint;
