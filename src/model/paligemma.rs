//! PaliGemma: SigLIP + projector + Gemma, with its processors, loaded from a checkpoint
//! directory. Load once, then run any number of (image, prompt) requests.

use std::sync::Arc;
use std::time::Instant;

use super::config::PaliGemmaConfig;
use super::gemma::Gemma;
use super::siglip::VisionTower;
use super::weights::{Checkpoint, WeightFormat};
use crate::gpu::Gpu;
use crate::processor::image::{ImageProcessor, PixelValues};
use crate::processor::prompt::PromptProcessor;
use crate::{Error, Result};

/// A loaded PaliGemma model ([`super::ModelBuilder`] loads one).
pub struct PaliGemma {
    gpu: Arc<Gpu>,
    /// The parsed `config.json`.
    pub config: PaliGemmaConfig,
    vision: VisionTower,
    text: Gemma,
    /// Image preprocessing from `preprocessor_config.json`.
    pub images: ImageProcessor,
    prompts: Option<PromptProcessor>,
    load_s: f64,
    weights: WeightFormat,
}

/// Just the image half of PaliGemma (SigLIP + projector) with its preprocessing, for
/// computing image embeddings without loading the language model.
pub struct ImageEncoder {
    gpu: Arc<Gpu>,
    /// The parsed `config.json`.
    pub config: PaliGemmaConfig,
    vision: VisionTower,
    /// Image preprocessing from `preprocessor_config.json`.
    pub images: ImageProcessor,
}

impl ImageEncoder {
    /// Load the vision tower and projector from `ck` (see [`super::ModelBuilder`]).
    pub(super) fn from_checkpoint(
        gpu: Arc<Gpu>,
        config: PaliGemmaConfig,
        ck: &Checkpoint,
        images: ImageProcessor,
    ) -> Result<Self> {
        let vision = VisionTower::load(ck, &gpu, &config)?;
        Ok(ImageEncoder {
            gpu,
            config,
            vision,
            images,
        })
    }

    /// Projector output `[num_image_tokens, hidden]` row-major for preprocessed pixels.
    pub fn encode(&self, pixels: &PixelValues) -> Result<Vec<f32>> {
        self.vision.encode(&self.gpu, pixels)
    }
}

impl PaliGemma {
    /// Load both towers from `ck` (see [`super::ModelBuilder`]); `start` is when the load
    /// began, for [`PaliGemma::load_seconds`]. Without `prompts` (synthetic weights), use
    /// [`PaliGemma::generate_ids`].
    pub(super) fn from_checkpoint(
        gpu: Arc<Gpu>,
        config: PaliGemmaConfig,
        ck: &Checkpoint,
        images: ImageProcessor,
        prompts: Option<PromptProcessor>,
        start: Instant,
    ) -> Result<Self> {
        let vision = VisionTower::load(ck, &gpu, &config)?;
        let text = Gemma::load(ck, &gpu, &config.text)?;
        Ok(PaliGemma {
            gpu,
            config,
            vision,
            text,
            images,
            prompts,
            load_s: start.elapsed().as_secs_f64(),
            weights: ck.weight_format(),
        })
    }

    /// How the weight matrices are stored on the GPU.
    pub fn weight_format(&self) -> WeightFormat {
        self.weights
    }

    /// The tokenizer and prompt layout.
    pub fn prompts(&self) -> Result<&PromptProcessor> {
        self.prompts
            .as_ref()
            .ok_or_else(|| Error::Model("this model has no tokenizer (synthetic weights)".into()))
    }

    /// Prompt ids for a model without a tokenizer: image placeholders, `<bos>`, then `text`.
    pub fn placeholder_prompt(&self, text: &[u32]) -> Vec<u32> {
        self.placeholder_prompt_images(1, text)
    }

    /// As [`PaliGemma::placeholder_prompt`] for a prompt about `images` images: one block of
    /// image placeholders per image, then `<bos>` and `text`.
    pub fn placeholder_prompt_images(&self, images: usize, text: &[u32]) -> Vec<u32> {
        let n = images * self.config.num_image_tokens();
        let mut ids = vec![self.config.image_token_index; n];
        ids.push(self.config.bos_token_id);
        ids.extend_from_slice(text);
        ids
    }

    /// The GPU the model runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Seconds the load took.
    pub fn load_seconds(&self) -> f64 {
        self.load_s
    }

    /// Run the vision tower and projector: `[num_image_tokens, hidden]` row-major, before
    /// any scaling by the language model.
    pub fn encode_image(&self, pixels: &PixelValues) -> Result<Vec<f32>> {
        self.vision.encode(&self.gpu, pixels)
    }

    /// The vision tower and projector.
    pub(crate) fn vision_tower(&self) -> &VisionTower {
        &self.vision
    }

    /// The language model.
    pub(crate) fn decoder(&self) -> &Gemma {
        &self.text
    }
}
