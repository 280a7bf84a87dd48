//! Turning user inputs (images, prompts) into model inputs.

pub mod image;
mod jpeg;
pub mod prompt;
