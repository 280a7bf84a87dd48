//! The one way to load a model: [`ModelBuilder`], on the caller's thread
//! ([`ModelBuilder::build`]) or on a worker thread that the caller polls without blocking
//! ([`ModelBuilder::spawn`]), with progress reports and cancellation.
//!
//! ```no_run
//! use paligemma::model::ModelBuilder;
//!
//! let mut loading = ModelBuilder::new("paligemma-3b-mix-224").spawn();
//! let model = loop {
//!     if let Some(result) = loading.try_take() {
//!         break result?;
//!     }
//!     if let Some(p) = loading.progress() {
//!         eprintln!("{} / {} bytes ({})", p.bytes_done, p.bytes_total, p.tensor);
//!     }
//!     std::thread::sleep(std::time::Duration::from_millis(100)); // draw a frame instead
//! };
//! # Ok::<(), paligemma::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::config::PaliGemmaConfig;
use super::paligemma::{ImageEncoder, PaliGemma};
use super::weights::{Checkpoint, WeightFormat};
use crate::gpu::{Gpu, GpuOptions};
use crate::processor::image::{ImageProcessor, PreprocessorConfig};
use crate::processor::prompt::PromptProcessor;
use crate::{Error, Result};

/// How far a load has got, as reported to [`ModelBuilder::on_progress`] and
/// [`LoadHandle::progress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProgress {
    /// Bytes of the checkpoint's tensors converted and uploaded so far. Never decreases; the
    /// last report of a successful load has `bytes_done == bytes_total`.
    pub bytes_done: u64,
    /// Bytes of the tensors this load reads (for [`ModelBuilder::build_encoder`], the vision
    /// tower's and the projector's only), as stored in the checkpoint files.
    pub bytes_total: u64,
    /// The tensor being loaded (its name in the published layout, e.g.
    /// `language_model.model.embed_tokens.weight`); empty in a final report that counts
    /// tensors of the checkpoint the model does not use.
    pub tensor: String,
}

/// Cancels a load from any thread: the load stops before its next tensor (or within a large
/// one, every 16 MiB), frees everything it allocated and returns [`Error::Cancelled`].
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the load to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

enum Source {
    Dir(PathBuf),
    Synthetic {
        config: Box<PaliGemmaConfig>,
        seed: u64,
    },
}

type ProgressFn = Box<dyn FnMut(&LoadProgress) + Send>;

/// Loads a [`PaliGemma`] or an [`ImageEncoder`]: from a checkpoint directory
/// ([`ModelBuilder::new`]) or with seeded random weights ([`ModelBuilder::synthetic`]), on a
/// given GPU or one it opens, with the weights in any [`WeightFormat`], an optional LoRA
/// adapter, progress reports and a [`CancelToken`].
pub struct ModelBuilder {
    source: Source,
    gpu: Option<Arc<Gpu>>,
    /// `None`: as the checkpoint stores them (f16, or the format `paligemma quantize` wrote).
    weights: Option<WeightFormat>,
    adapter: Option<PathBuf>,
    max_binding: Option<u64>,
    on_progress: Option<ProgressFn>,
    cancel: CancelToken,
}

impl ModelBuilder {
    /// Load the checkpoint in `dir` (`config.json`, `*.safetensors`, `tokenizer.json`,
    /// optionally `preprocessor_config.json`; see [`super::resolve_model_dir`] for Hugging
    /// Face cache ids).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_source(Source::Dir(dir.into()))
    }

    /// A model of `config`'s shapes with seeded random weights and no tokenizer, built in
    /// memory (benchmarks, full-size shape tests): use [`PaliGemma::generate_ids`] with it.
    /// Synthetic loads report no progress (they can still be cancelled).
    pub fn synthetic(config: PaliGemmaConfig, seed: u64) -> Self {
        Self::with_source(Source::Synthetic {
            config: Box::new(config),
            seed,
        })
    }

    fn with_source(source: Source) -> Self {
        ModelBuilder {
            source,
            gpu: None,
            weights: None,
            adapter: None,
            max_binding: None,
            on_progress: None,
            cancel: CancelToken::new(),
        }
    }

    /// Load onto `gpu` (e.g. one made with [`Gpu::from_device`] on the application's own
    /// device). Without it, the builder opens one with [`Gpu::new`].
    pub fn gpu(mut self, gpu: Arc<Gpu>) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// Store the weight matrices as f16 or quantised to int8 / int4. By default they load as
    /// the checkpoint stores them: f16, or the format of a checkpoint written by
    /// [`super::save_quantized`] (`paligemma quantize`), which loads in that format only.
    pub fn weights(mut self, format: WeightFormat) -> Self {
        self.weights = Some(format);
        self
    }

    /// Merge the PEFT LoRA adapter in `dir` into the weights as they load.
    pub fn adapter(mut self, dir: impl Into<PathBuf>) -> Self {
        self.adapter = Some(dir.into());
        self
    }

    /// Split weights into GPU bindings of at most `bytes` (a testing aid for the split path).
    /// It configures the GPU the builder opens, so it cannot be combined with
    /// [`ModelBuilder::gpu`] (set [`GpuOptions::weight_binding_limit`] there instead).
    pub fn max_binding(mut self, bytes: u64) -> Self {
        self.max_binding = Some(bytes);
        self
    }

    /// Call `f` on the loading thread as the weights load: after each tensor of the checkpoint
    /// and every 16 MiB within a large one (see [`LoadProgress`]; synthetic models report
    /// nothing).
    pub fn on_progress(mut self, f: impl FnMut(&LoadProgress) + Send + 'static) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }

    /// Stop the load, with [`Error::Cancelled`], once `token` is cancelled.
    pub fn cancel_token(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    /// Load the whole model on this thread.
    pub fn build(self) -> Result<PaliGemma> {
        let load = self.open(|_| true)?;
        let model = PaliGemma::from_checkpoint(
            load.gpu,
            load.config,
            &load.checkpoint,
            load.images,
            load.prompts,
            load.start,
        )?;
        load.checkpoint.finish_progress();
        Ok(model)
    }

    /// Load only the vision tower and projector (image embeddings) on this thread.
    pub fn build_encoder(self) -> Result<ImageEncoder> {
        let load = self.open(|name| {
            name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.")
        })?;
        let encoder =
            ImageEncoder::from_checkpoint(load.gpu, load.config, &load.checkpoint, load.images)?;
        load.checkpoint.finish_progress();
        Ok(encoder)
    }

    /// Load the whole model on a worker thread; the returned handle is polled without
    /// blocking.
    pub fn spawn(self) -> LoadHandle<PaliGemma> {
        self.spawn_with(Self::build)
    }

    /// As [`ModelBuilder::spawn`] for [`ModelBuilder::build_encoder`].
    pub fn spawn_encoder(self) -> LoadHandle<ImageEncoder> {
        self.spawn_with(Self::build_encoder)
    }

    fn spawn_with<T: Send + 'static>(mut self, build: fn(Self) -> Result<T>) -> LoadHandle<T> {
        let latest = Arc::new(Mutex::new(None));
        let shared = Arc::clone(&latest);
        let mut user = self.on_progress.take();
        self.on_progress = Some(Box::new(move |p: &LoadProgress| {
            *shared.lock().expect("progress lock") = Some(p.clone());
            if let Some(f) = user.as_mut() {
                f(p);
            }
        }));
        let cancel = self.cancel.clone();
        LoadHandle {
            state: State::Running(std::thread::spawn(move || build(self))),
            latest,
            cancel,
        }
    }

    /// Open the GPU and the checkpoint, with progress for the tensors `in_scope` says the
    /// load reads.
    fn open(self, in_scope: impl Fn(&str) -> bool) -> Result<Opened> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if let (Source::Synthetic { .. }, Some(adapter)) = (&self.source, &self.adapter) {
            return Err(Error::Model(format!(
                "the LoRA adapter {} needs a checkpoint directory, not synthetic weights",
                adapter.display()
            )));
        }
        let gpu = match (self.gpu, self.max_binding) {
            (Some(_), Some(_)) => {
                return Err(Error::Gpu(
                    "max_binding configures the GPU the builder opens; with a given GPU set \
                     GpuOptions::weight_binding_limit when creating it"
                        .into(),
                ))
            }
            (Some(gpu), None) => gpu,
            (None, limit) => Gpu::new(GpuOptions {
                weight_binding_limit: limit,
            })?,
        };
        let start = Instant::now();
        let (config, mut checkpoint, images, prompts) = match self.source {
            Source::Dir(dir) => {
                if !dir.is_dir() {
                    return Err(Error::Model(format!(
                        "{} is not a directory",
                        dir.display()
                    )));
                }
                let config = PaliGemmaConfig::from_file(&dir.join("config.json"))?;
                let mut ck = Checkpoint::open(&dir)?;
                match (self.weights, ck.stored_format()) {
                    (Some(asked), Some(stored)) if asked != stored => {
                        return Err(Error::Model(format!(
                            "{} was quantised to {stored} by paligemma quantize and loads only \
                             as {stored}, not as {asked} (load the original checkpoint for \
                             {asked})",
                            dir.display()
                        )))
                    }
                    _ => {}
                }
                if let Some(adapter) = &self.adapter {
                    ck.add_adapter(adapter)?;
                }
                if let Some(f) = self.on_progress {
                    ck.report_progress(in_scope, f);
                }
                let images = image_processor(&dir, &config)?;
                let prompts = PromptProcessor::from_dir(&dir, &config)?;
                (config, ck, images, Some(prompts))
            }
            Source::Synthetic { config, seed } => {
                let images = ImageProcessor::new(PreprocessorConfig::paligemma(
                    config.vision.image_size as u32,
                ));
                (*config, Checkpoint::synthetic(seed), images, None)
            }
        };
        let format = self.weights.or(checkpoint.stored_format());
        checkpoint.set_weight_format(format.unwrap_or_default());
        checkpoint.set_cancel(self.cancel);
        Ok(Opened {
            gpu,
            config,
            checkpoint,
            images,
            prompts,
            start,
        })
    }
}

/// What [`ModelBuilder::open`] prepares for the towers' loaders.
struct Opened {
    gpu: Arc<Gpu>,
    config: PaliGemmaConfig,
    checkpoint: Checkpoint,
    images: ImageProcessor,
    prompts: Option<PromptProcessor>,
    start: Instant,
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

enum State<T> {
    Running(JoinHandle<Result<T>>),
    Taken,
}

/// A load running on a worker thread ([`ModelBuilder::spawn`]). Poll it from a render loop
/// with [`LoadHandle::try_take`] and [`LoadHandle::progress`]; dropping it before the load
/// finishes cancels the load.
pub struct LoadHandle<T> {
    state: State<T>,
    latest: Arc<Mutex<Option<LoadProgress>>>,
    cancel: CancelToken,
}

impl<T> LoadHandle<T> {
    /// The latest progress report, if any yet (synthetic models report none).
    pub fn progress(&self) -> Option<LoadProgress> {
        self.latest.lock().expect("progress lock").clone()
    }

    /// Whether the worker has finished (the result is then ready for
    /// [`LoadHandle::try_take`]).
    pub fn is_finished(&self) -> bool {
        match &self.state {
            State::Running(worker) => worker.is_finished(),
            State::Taken => true,
        }
    }

    /// Ask the load to stop; it then finishes with [`Error::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The result once the load has finished, without blocking: `None` while it runs, and
    /// after the result has been taken.
    pub fn try_take(&mut self) -> Option<Result<T>> {
        match &self.state {
            State::Running(worker) if worker.is_finished() => {}
            _ => return None,
        }
        match std::mem::replace(&mut self.state, State::Taken) {
            State::Running(worker) => Some(join_worker(worker)),
            State::Taken => None,
        }
    }

    /// Wait for the load to finish.
    pub fn join(mut self) -> Result<T> {
        match std::mem::replace(&mut self.state, State::Taken) {
            State::Running(worker) => join_worker(worker),
            State::Taken => Err(Error::Request(
                "the load's result was already taken with try_take".into(),
            )),
        }
    }
}

/// The worker's result; a panic in the worker resumes on the caller's thread.
fn join_worker<T>(worker: JoinHandle<Result<T>>) -> Result<T> {
    worker
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl<T> Drop for LoadHandle<T> {
    fn drop(&mut self) {
        if matches!(self.state, State::Running(_)) {
            self.cancel.cancel();
        }
    }
}
