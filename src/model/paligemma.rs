//! PaliGemma: SigLIP + projector + Gemma, with its processors, loaded from a checkpoint
//! directory. Load once, then run any number of (image, prompt) requests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::config::PaliGemmaConfig;
use super::gemma::Gemma;
use super::siglip::VisionTower;
use super::weights::{Checkpoint, WeightFormat};
use crate::gpu::{Gpu, GpuOptions};
use crate::processor::image::{ImageProcessor, PixelValues, PreprocessorConfig};
use crate::processor::prompt::PromptProcessor;
use crate::{Error, Result};

/// Options for loading a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// GPU options (e.g. a forced weight binding limit).
    pub gpu: GpuOptions,
    /// Show a progress bar on stderr while the weights upload.
    pub progress: bool,
    /// A PEFT LoRA adapter directory to merge into the weights at load.
    pub adapter: Option<PathBuf>,
    /// How the weight matrices are stored: f16, or quantised to int8 / int4 (norms, biases,
    /// the patch and position embeddings stay as they are).
    pub weights: WeightFormat,
}

/// A loaded PaliGemma model.
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
}

/// Find a model: a directory path, or `org/name` in the local Hugging Face cache
/// (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let how = "download it first, e.g. accept the Gemma licence on the model's Hugging Face page, \
               then `huggingface-cli download google/paligemma-3b-mix-224` (or `git clone` the \
               repository) and pass --model with the downloaded directory";
    let parts: Vec<&str> = spec.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) || path.exists() {
        return Err(Error::Model(format!(
            "{spec} is not a model directory; {how}"
        )));
    }
    let hub = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HF_HOME") {
            Some(home) => PathBuf::from(home).join("hub"),
            None => std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/huggingface/hub"),
        },
    };
    let repo = hub.join(format!("models--{}--{}", parts[0], parts[1]));
    let snapshots = repo.join("snapshots");
    if let Ok(main) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(main.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let newest = std::fs::read_dir(&snapshots).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
    });
    newest.ok_or_else(|| {
        Error::Model(format!(
            "model {spec} is not in the local Hugging Face cache ({}); {how}",
            repo.display()
        ))
    })
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

fn image_processor(dir: &Path, config: &PaliGemmaConfig) -> Result<ImageProcessor> {
    let pre = dir.join("preprocessor_config.json");
    let pre = if pre.is_file() {
        PreprocessorConfig::from_file(&pre)?
    } else {
        PreprocessorConfig::paligemma(config.vision.image_size as u32)
    };
    let size = config.vision.image_size;
    if pre.height != size as u32 || pre.width != size as u32 {
        return Err(Error::Model(format!(
            "preprocessor_config.json resizes to {}x{} but the vision tower takes {size}x{size}",
            pre.height, pre.width
        )));
    }
    Ok(ImageProcessor::new(pre))
}

fn open_checkpoint(dir: &Path, options: &LoadOptions) -> Result<(PaliGemmaConfig, Checkpoint)> {
    if !dir.is_dir() {
        return Err(Error::Model(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let config = PaliGemmaConfig::from_file(&dir.join("config.json"))?;
    let mut ck = Checkpoint::open(dir)?;
    ck.set_weight_format(options.weights);
    if let Some(adapter) = &options.adapter {
        ck.add_adapter(adapter)?;
    }
    if options.progress {
        ck.show_progress();
    }
    Ok((config, ck))
}

impl ImageEncoder {
    /// Load the vision tower and projector of the model in `dir` on `gpu` (`options.gpu` is
    /// not used).
    pub fn load_on(gpu: Arc<Gpu>, dir: &Path, options: &LoadOptions) -> Result<Self> {
        let (config, mut ck) = open_checkpoint(dir, options)?;
        let images = image_processor(dir, &config)?;
        let vision = VisionTower::load(&ck, &gpu, &config)?;
        ck.finish_progress();
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
    /// Open the GPU and load the model in `dir`.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let gpu = Gpu::new(options.gpu.clone())?;
        Self::load_with(gpu, dir, options)
    }

    /// Load the model in `dir` on an already open GPU.
    pub fn load_on(gpu: Arc<Gpu>, dir: &Path, progress: bool) -> Result<Self> {
        let options = LoadOptions {
            progress,
            ..Default::default()
        };
        Self::load_with(gpu, dir, &options)
    }

    /// Load the model in `dir` on an already open GPU with `options` (progress bar, LoRA
    /// adapter; `options.gpu` is not used).
    pub fn load_with(gpu: Arc<Gpu>, dir: &Path, options: &LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let (config, mut ck) = open_checkpoint(dir, options)?;
        let images = image_processor(dir, &config)?;
        let prompts = PromptProcessor::from_dir(dir, &config)?;
        let vision = VisionTower::load(&ck, &gpu, &config)?;
        let text = Gemma::load(&ck, &gpu, &config.text)?;
        ck.finish_progress();
        Ok(PaliGemma {
            gpu,
            config,
            vision,
            text,
            images,
            prompts: Some(prompts),
            load_s: start.elapsed().as_secs_f64(),
        })
    }

    /// A model of `config`'s shapes with seeded random weights and no tokenizer, built in
    /// memory (benchmarks, full-size shape tests). Use [`PaliGemma::generate_ids`] with it.
    pub fn synthetic(gpu: Arc<Gpu>, config: PaliGemmaConfig, seed: u64) -> Result<Self> {
        Self::synthetic_with(gpu, config, seed, WeightFormat::F16)
    }

    /// As [`PaliGemma::synthetic`], with the weight matrices stored in `weights`.
    pub fn synthetic_with(
        gpu: Arc<Gpu>,
        config: PaliGemmaConfig,
        seed: u64,
        weights: WeightFormat,
    ) -> Result<Self> {
        let start = Instant::now();
        let mut ck = Checkpoint::synthetic(seed);
        ck.set_weight_format(weights);
        let vision = VisionTower::load(&ck, &gpu, &config)?;
        let text = Gemma::load(&ck, &gpu, &config.text)?;
        Ok(PaliGemma {
            images: ImageProcessor::new(PreprocessorConfig::paligemma(
                config.vision.image_size as u32,
            )),
            gpu,
            config,
            vision,
            text,
            prompts: None,
            load_s: start.elapsed().as_secs_f64(),
        })
    }

    /// The tokenizer and prompt layout.
    pub fn prompts(&self) -> Result<&PromptProcessor> {
        self.prompts
            .as_ref()
            .ok_or_else(|| Error::Model("this model has no tokenizer (synthetic weights)".into()))
    }

    /// Prompt ids for a model without a tokenizer: image placeholders, `<bos>`, then `text`.
    pub fn placeholder_prompt(&self, text: &[u32]) -> Vec<u32> {
        let mut ids = vec![self.config.image_token_index; self.config.num_image_tokens()];
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
