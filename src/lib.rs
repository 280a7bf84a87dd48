//! PaliGemma vision-language inference on any GPU through wgpu compute shaders.
//!
//! The crate is organised like the model: [`gpu`] holds the device, tensors and pipeline cache,
//! [`ops`] one typed launcher per WGSL kernel (each with a plain-Rust reference), [`model`] the
//! checkpoint loader and the SigLIP / Gemma forward passes, and [`processor`] the image and
//! prompt preprocessing.

pub mod error;
pub mod generate;
pub mod gpu;
pub mod model;
pub mod npy;
pub mod ops;
pub mod processor;
pub mod tasks;

pub use error::{Error, Result};
