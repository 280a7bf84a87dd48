//! Turning user inputs (images, prompts) into model inputs.

pub mod image;
pub mod prompt;
