//! The model: configuration, checkpoint loading and the forward passes.

pub mod builder;
pub mod config;
pub mod gemma;
pub mod hub;
pub mod kind;
pub mod paligemma;
pub mod siglip;
pub mod weights;

pub use builder::{CancelToken, LoadHandle, LoadProgress, ModelBuilder};
pub use config::{PaliGemmaConfig, TextConfig, VisionConfig};
pub use hub::{cached_models, hub_cache_dir, resolve_model_dir, resolve_model_dir_at};
pub use kind::{CheckpointKind, Variant};
pub use paligemma::{ImageEncoder, PaliGemma};
pub use weights::{save_quantized, Checkpoint, SavedCheckpoint, WeightFormat};
